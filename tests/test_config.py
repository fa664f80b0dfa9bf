"""TokenVMConfig: defaults, sources, and one clear error for every bad input."""

import pytest

from tokenvm_vllm.config import FIELDS, TokenVMConfig, TokenVMConfigError, load_config, parse_size


def test_defaults_without_any_input():
    assert load_config({}, environ={}) == TokenVMConfig()


def test_extra_config_overrides_env():
    config = load_config({"host_bytes": "1GiB"}, environ={"TOKENVM_HOST_BYTES": "2GiB"})
    assert config.host_bytes == 2**30


def test_env_is_read():
    config = load_config({}, environ={"TOKENVM_HOST_BYTES": "3 MiB", "TOKENVM_PIN_MEMORY": "0"})
    assert config.host_bytes == 3 * 2**20
    assert config.pin_memory is False


@pytest.mark.parametrize("text,expected", [
    (4096, 4096), ("4096", 4096), ("4k", 4096), ("1.5GiB", 3 * 2**29), ("2 mb", 2 * 2**20),
])
def test_sizes(text, expected):
    assert parse_size("host_bytes", text) == expected


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        TokenVMConfig().host_bytes = 1  # type: ignore[misc]


@pytest.mark.parametrize("extra,needle", [
    ({"host_byte": 1}, "'host_byte'"),
    ({"host_bytes": "lots"}, "host_bytes='lots'"),
    ({"host_bytes": "5 parsecs"}, "unknown unit"),
    ({"host_bytes": -1}, "negative"),
    ({"host_bytes": 0}, "host_bytes=0 must be > 0"),
    ({"host_bytes": True}, "host_bytes=True"),
    ({"host_bytes": [1]}, "host_bytes=[1]"),
    ({"pin_memory": "maybe"}, "pin_memory='maybe' is not a boolean"),
    ({"pin_mode": "sometimes"}, "pin_mode='sometimes' is not one of eager, lazy, overlap"),
    ({"min_load_blocks": 0}, "min_load_blocks=0"),
    ({"min_load_blocks": "two"}, "min_load_blocks='two' is not an integer"),
    ({"min_load_blocks": 1.5}, "min_load_blocks=1.5 is not an integer"),
    ({"policy": "mru"}, "policy='mru'"),
    ({"policy": 3}, "policy=3 is not a string"),
    ({"debug_fail_load_every": -2}, "debug_fail_load_every=-2"),
    ({"debug_fail_load_rank": -2}, "debug_fail_load_rank=-2"),
])
def test_bad_input_names_the_key(extra, needle):
    with pytest.raises(TokenVMConfigError) as err:
        load_config(extra, environ={})
    message = str(err.value)
    assert needle in message
    assert "\n" not in message


def test_unknown_key_lists_valid_keys():
    with pytest.raises(TokenVMConfigError) as err:
        load_config({"nope": 1}, environ={})
    for key in FIELDS:
        assert key in str(err.value)


def test_unknown_env_var_is_an_error():
    with pytest.raises(TokenVMConfigError, match="TOKENVM_HOST_SIZE"):
        load_config({}, environ={"TOKENVM_HOST_SIZE": "1GiB"})


def test_modes_are_parsed_once_into_enum_members() -> None:
    """Modes are typed: any spelling the parser accepts becomes the member code compares with
    ``is``; the settings line still shows the plain value."""
    from tokenvm_vllm.config import CopyPath, LoadMode, WriteMode

    config = load_config({"write_mode": " Write_Back ", "load_mode": "layerwise"},
                         environ={"TOKENVM_COPY_PATH": "uva"})
    assert config.write_mode is WriteMode.WRITE_BACK
    assert config.load_mode is LoadMode.LAYERWISE and config.copy_path is CopyPath.UVA
    assert repr(config.write_mode) == "'write_back'" and str(config.copy_path) == "uva"
    assert load_config({}).write_mode is WriteMode.WRITE_THROUGH
    assert load_config({"copy_path": "DMA"}).copy_path is CopyPath.DMA
    with pytest.raises(TokenVMConfigError, match=r"^tokenvm: copy_path='nvlink' is not one of "
                                                 r"staged, uva, dma$"):
        load_config({"copy_path": "nvlink"})
