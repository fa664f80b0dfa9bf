"""Issue #11 items 2-4: the settings in force are logged once, debug knobs need an explicit
testing switch and keep warning, bad values stop start-up with one line naming key, value and
what is accepted, and the connector validates where vLLM first shows it the settings."""

from __future__ import annotations

import logging
import time
import uuid

import pytest
from vllm.config import KVTransferConfig
from vllm.engine.arg_utils import EngineArgs

from tokenvm_vllm import config as cfg
from tokenvm_vllm.config import FIELDS, TokenVMConfigError, load_config
from tokenvm_vllm.connector.connector import TokenVMConnector
from tokenvm_vllm.tiny_llama import write_tiny_llama

# -- item 2: effective settings and debug knobs ---------------------------------------------------


@pytest.mark.parametrize("name,value", [("TOKENVM_DEBUG_CORRUPT_LOADS", "1"),
                                        ("TOKENVM_DEBUG_FAIL_LOAD_EVERY", "3")])
def test_a_stray_debug_env_var_alone_is_refused(name, value):
    with pytest.raises(TokenVMConfigError) as err:
        load_config({}, environ={name: value})
    message = str(err.value)
    key = name[len("TOKENVM_"):].lower()
    assert key in message and f"env {name}" in message and "testing=true" in message
    assert "\n" not in message


def test_debug_knobs_act_with_the_testing_switch():
    assert load_config({"debug_corrupt_loads": True, "testing": True}, environ={}
                       ).debug_corrupt_loads
    config = load_config({}, environ={"TOKENVM_DEBUG_FAIL_LOAD_EVERY": "2",
                                      "TOKENVM_TESTING": "1"})
    assert config.debug_fail_load_every == 2


def test_settings_line_names_every_key_and_where_non_defaults_came_from():
    config, sources = cfg.load_config_and_sources({"host_bytes": "64MiB"},
                                              environ={"TOKENVM_TRACE": "1"})
    line = cfg.settings_line(config, sources)
    assert "\n" not in line
    for key in FIELDS:
        assert f"{key}=" in line
    assert f"host_bytes={64 * 2**20} (extra config)" in line
    assert "trace=True (env TOKENVM_TRACE)" in line
    assert "policy='queue_aware'," in line  # a default: no source


def test_settings_are_logged_once_per_process(caplog):
    config, sources = cfg.load_config_and_sources({"policy": "lru", "min_load_blocks": 3},
                                              environ={})
    with caplog.at_level(logging.INFO, logger="vllm.tokenvm"):
        cfg.log_settings(config, sources)
        cfg.log_settings(config, sources)
    lines = [r for r in caplog.records if r.getMessage().startswith("TokenVM settings:")]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert "min_load_blocks=3 (extra config)" in lines[0].getMessage()


def test_debug_knob_warning_repeats_until_stopped(caplog):
    config = load_config({"debug_fail_load_every": 4, "testing": True}, environ={})
    with caplog.at_level(logging.WARNING, logger="vllm.tokenvm"):
        nag = cfg.DebugKnobWarning(config, interval_s=0.05)
        time.sleep(0.4)
        nag.stop()
        time.sleep(0.1)
        count = sum("debug_fail_load_every=4" in r.getMessage() for r in caplog.records)
        assert count >= 4  # one at start, then one per interval
        time.sleep(0.2)
        assert sum("debug_fail_load_every=4" in r.getMessage() for r in caplog.records) == count


def test_debug_knob_warning_ends_with_its_owner():
    """A connector dropped without ``stop`` (tests, a failed start-up) takes its reminder thread
    with it: it must not go on logging into later work (it did, into another test's checks)."""
    import gc

    config = load_config({"debug_fail_load_every": 4, "testing": True}, environ={})
    nag = cfg.DebugKnobWarning(config, interval_s=0.02)
    thread = nag._thread
    assert thread is not None and thread.is_alive()
    del nag
    gc.collect()
    thread.join(timeout=2)
    assert not thread.is_alive()


def test_no_debug_warning_without_knobs(caplog):
    with caplog.at_level(logging.WARNING, logger="vllm.tokenvm"):
        nag = cfg.DebugKnobWarning(load_config({}, environ={}), interval_s=0.01)
        time.sleep(0.05)
        nag.stop()
    assert not caplog.records


# -- item 3: bad values ------------------------------------------------------------------------


@pytest.mark.parametrize("extra,needles", [
    ({"host_bytes": "1e30"}, ["host_bytes='1e30'", "at most 1 EiB", "'4GiB'"]),
    ({"host_bytes": "inf"}, ["host_bytes='inf'", "not a size", "'4GiB'"]),
    ({"disk_bytes": 1e300, "disk_path": "/tmp/x"}, ["disk_bytes=1e+300", "at most 1 EiB"]),
    ({"disk_io_threads": 100000}, ["disk_io_threads=100000", "1 to 256"]),
])
def test_bad_values_name_key_value_and_what_is_accepted(extra, needles):
    with pytest.raises(TokenVMConfigError) as err:
        load_config(extra, environ={})
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_disk_path_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(TokenVMConfigError) as err:
            load_config({"disk_path": str(path), "disk_bytes": "1MiB"}, environ={})
        assert f"disk_path={str(path)!r} is not a directory" in str(err.value)
        assert "give a directory" in str(err.value)


def test_relative_disk_path_is_resolved_and_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, sources = cfg.load_config_and_sources({"disk_path": "cache/kv", "disk_bytes": "1MiB"},
                                              environ={})
    assert config.disk_path == str(tmp_path / "cache" / "kv")
    line = cfg.settings_line(config, sources)
    assert f"disk_path={str(tmp_path / 'cache' / 'kv')!r}" in line
    assert "relative 'cache/kv' resolved against" in line


def test_host_bytes_beyond_available_ram_is_refused_before_allocating():
    with pytest.raises(TokenVMConfigError) as err:
        TokenVMConnector.validate_early({"host_bytes": "1TiB"})
    message = str(err.value)
    assert "host_bytes=1099511627776" in message and "MemAvailable" in message
    assert "lower host_bytes below" in message and "\n" not in message


# -- item 4: validated where vLLM first shows the settings ---------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


def vllm_config_with(model: str, extra: dict):
    transfer = KVTransferConfig(kv_connector="TokenVM", kv_role="kv_both",
                                kv_connector_extra_config=extra)
    return EngineArgs(model=model, dtype="float32", max_model_len=512, block_size=32,
                      kv_transfer_config=transfer).create_engine_config()


def test_kv_layout_query_validates_the_settings(tiny_model):
    """vLLM asks every connector class for its KV layout when it picks the attention layout;
    a bad key must fail there, before any TokenVM object is built."""
    config = vllm_config_with(tiny_model, {"host_bytez": "1GiB"})
    with pytest.raises(TokenVMConfigError, match="'host_bytez'"):
        TokenVMConnector.get_required_kvcache_layout(config)
    good = vllm_config_with(tiny_model, {"host_bytes": f"{uuid.uuid4().int % 100 + 1}MiB"})
    assert TokenVMConnector.get_required_kvcache_layout(good) is None


def test_piecewise_query_validates_the_settings():
    with pytest.raises(TokenVMConfigError, match="debug_corrupt_loads"):
        TokenVMConnector.requires_piecewise_for_cudagraph({"debug_corrupt_loads": True})
    assert TokenVMConnector.requires_piecewise_for_cudagraph({"load_mode": "layerwise"})
