"""The remote tier's settings: defaults, bad values as one line, the password never shown."""

from __future__ import annotations

import pytest

from tokenvm_vllm import config as cfg
from tokenvm_vllm.config import TokenVMConfigError, load_config


def test_remote_settings_parse_from_env_and_extra_config() -> None:
    config = load_config({"remote_url": "redis://127.0.0.1:6379/1", "remote_ttl_s": "60"},
                         environ={"TOKENVM_REMOTE_IO_THREADS": "2"})
    assert config.remote_url == "redis://127.0.0.1:6379/1" and config.remote_ttl_s == 60.0
    assert config.remote_io_threads == 2 and config.remote_key_prefix == "tokenvm"
    assert config.remote_write_threads == 4
    assert load_config({"remote_write_threads": 3}, environ={}).remote_write_threads == 3
    assert load_config({}, environ={}).remote_url == ""  # no remote tier by default


def test_remote_reads_is_auto_unless_always() -> None:
    assert load_config({}, environ={}).remote_reads is cfg.RemoteReads.AUTO
    assert load_config({}, environ={"TOKENVM_REMOTE_READS": " Always"}).remote_reads is (
        cfg.RemoteReads.ALWAYS)


@pytest.mark.parametrize("key, value, words", [
    ("remote_url", "http://u:pw-secret@127.0.0.1:1", "is not a Redis URL"),
    ("remote_url", "redis://:pw-secret@127.0.0.1", "is not host:port"),
    ("remote_key_prefix", "a:b", "remote_key_prefix='a:b'"),
    ("remote_key_prefix", "", "must be non-empty"),
    ("remote_ttl_s", 0, "remote_ttl_s=0.0"),
    ("remote_timeout_s", 120, "remote_timeout_s=120.0"),
    ("remote_timeout_s", "soon", "is not a number"),
    ("remote_io_threads", 0, "remote_io_threads=0"),
    ("remote_io_threads", 1000, "between 1 and 256"),
    ("remote_write_threads", 0, "remote_write_threads=0 must be between 1 and 256"),
    ("remote_max_pending_writes", 0, "remote_max_pending_writes=0"),
    ("remote_batch_bytes", 0, "remote_batch_bytes=0"),
    ("remote_reads", "never", "remote_reads='never' is not one of auto, always"),
])
def test_bad_remote_values_are_one_clear_line(key: str, value: object, words: str) -> None:
    with pytest.raises(TokenVMConfigError, match=None) as err:
        load_config({key: value}, environ={})
    message = str(err.value)
    assert words in message and key in message and "\n" not in message
    assert "pw-secret" not in message


def test_settings_line_masks_the_password() -> None:
    config, sources = cfg.load_config_and_sources(
        {"remote_url": "rediss://app:pw-secret@127.0.0.1:6380/0"}, environ={})
    line = cfg.settings_line(config, sources)
    assert "pw-secret" not in line
    assert "remote_url='rediss://app:***@127.0.0.1:6380/0' (extra config)" in line
