"""Issue #11 item 6: a restart whose namespace differs from the slots on disk says how many slots
it skipped and which setting differed, instead of silently adopting nothing."""

from __future__ import annotations

import logging
from dataclasses import asdict, replace

import numpy as np

from tokenvm_vllm.keys import Namespace
from tokenvm_vllm.tiers.disk import DiskStore
from tokenvm_vllm.tiers.disk.format import slot_stride

SLOT_BYTES = 8192
CAPACITY = 16 * slot_stride(SLOT_BYTES)
BASE = Namespace(model="/models/tiny", kv_dtype="torch.float32", block_size=32, tp_rank=0,
                 tp_size=1, pp_size=1, hash_algo="sha256", hash_seed="0", layout="[(1, 2)]")


def open_store(path, namespace: Namespace) -> DiskStore:
    return DiskStore(str(path), CAPACITY, SLOT_BYTES, namespace.fingerprint(),
                     namespace_fields=asdict(namespace))


def fill(path, namespace: Namespace, slots: list[int]) -> None:
    with open_store(path, namespace) as store:
        for slot in slots:
            data = np.full(SLOT_BYTES, slot, np.uint8)
            assert store.write(slot, slot.to_bytes(36, "big"), data).result()


def skip_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "skipped" in r.getMessage()]


def test_hash_seed_change_names_pythonhashseed(tmp_path, caplog):
    fill(tmp_path / "d", BASE, [0, 1, 2])
    with caplog.at_level(logging.INFO, logger="vllm.tokenvm"):
        with open_store(tmp_path / "d", replace(BASE, hash_seed="random")) as store:
            assert store.scan() == {}
    lines = skip_lines(caplog)
    assert len(lines) == 1, lines
    assert "skipped 3 slots" in lines[0]
    assert "hash_seed '0' -> now 'random'" in lines[0]
    assert "set PYTHONHASHSEED=0" in lines[0]


def test_each_other_namespace_is_explained(tmp_path, caplog):
    fill(tmp_path / "d", BASE, [0, 1])
    fill(tmp_path / "d", replace(BASE, block_size=16), [5])
    with caplog.at_level(logging.INFO, logger="vllm.tokenvm"):
        with open_store(tmp_path / "d", replace(BASE, kv_dtype="torch.bfloat16")) as store:
            assert store.scan() == {}
    (line,) = skip_lines(caplog)
    assert "skipped 3 slots" in line
    assert "2 of namespace" in line and "1 of namespace" in line
    assert "kv_dtype 'torch.float32' -> now 'torch.bfloat16'" in line
    assert "block_size 16 -> now 32" in line


def test_same_namespace_restart_is_silent(tmp_path, caplog):
    fill(tmp_path / "d", BASE, [0, 1])
    with caplog.at_level(logging.INFO, logger="vllm.tokenvm"):
        with open_store(tmp_path / "d", BASE) as store:
            assert len(store.scan()) == 2
    assert skip_lines(caplog) == []


def test_slots_without_a_recorded_namespace_are_still_counted(tmp_path, caplog):
    with DiskStore(str(tmp_path / "d"), CAPACITY, SLOT_BYTES, bytes(16)) as store:
        assert store.write(0, b"x" * 36, np.zeros(SLOT_BYTES, np.uint8)).result()
    with caplog.at_level(logging.INFO, logger="vllm.tokenvm"):
        with open_store(tmp_path / "d", BASE) as store:
            assert store.scan() == {}
    (line,) = skip_lines(caplog)
    assert "skipped 1 slots" in line and "not recorded" in line
