"""The ``debug_disk_faults`` knob: parsed strictly, needs ``testing``, and the store handles an
injected error exactly like a real one (a failed write or a miss, counted), never an exception."""

from __future__ import annotations

import numpy as np
import pytest

from tokenvm_vllm.config import TokenVMConfigError, load_config, parse_disk_faults
from tokenvm_vllm.tiers.disk import DiskStore
from tokenvm_vllm.tiers.disk.faults import DiskFaults
from tokenvm_vllm.tiers.disk.format import slot_stride

SLOT_BYTES = 8192
NS = bytes(16)


def test_parse():
    assert parse_disk_faults("write:ENOSPC:1, read:slow0.25:3") == {
        "write": ("ENOSPC", 1), "read": ("slow0.25", 3)}
    assert parse_disk_faults("") == {}


@pytest.mark.parametrize("text", ["write:ENOSPC", "erase:EIO:1", "read:ENOPE:1", "read:EIO:0",
                                  "read:slowx:1"])
def test_bad_specs_name_the_key(text):
    with pytest.raises(TokenVMConfigError, match="debug_disk_faults"):
        load_config({"debug_disk_faults": text, "testing": True}, environ={})


def test_needs_the_testing_switch():
    with pytest.raises(TokenVMConfigError, match="testing=true"):
        load_config({"debug_disk_faults": "read:EIO:1"}, environ={})


def test_store_turns_injected_errors_into_failures_and_misses(tmp_path):
    faults = DiskFaults({"write": ("ENOSPC", 2), "read": ("EIO", 2)})
    data = np.ones(SLOT_BYTES, np.uint8)
    with DiskStore(str(tmp_path / "d"), 8 * slot_stride(SLOT_BYTES), SLOT_BYTES, NS,
                   faults=faults) as store:
        writes = [store.write(slot, bytes([slot]) * 36, data).result() for slot in range(4)]
        assert writes == [True, False, True, False]
        out = np.zeros(SLOT_BYTES, np.uint8)
        reads = [store.read(slot, bytes([slot]) * 36, out).result() for slot in (0, 2)]
        assert reads == [True, False]
        assert store.errors == 3 and faults.injected == 3
