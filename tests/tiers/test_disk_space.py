"""Issue #11 item 1: a disk tier larger than the free space is refused before anything is
allocated, and an allocation that still runs out of space gives back only what this start took.

Runs on a real 8 MiB tmpfs (mounted here: the tests run as root), so ``statvfs`` and
``posix_fallocate`` behave as on a full disk. Skipped where mounting is not allowed.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tokenvm_vllm.tiers.disk import DiskStore, DiskStoreError, fsutil
from tokenvm_vllm.tiers.disk.format import slot_stride

NS = bytes(range(16))
SLOT_BYTES = 64 * 1024
STRIDE = slot_stride(SLOT_BYTES)
TMPFS_BYTES = 8 * 2**20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs at ``tmp_path/fs``, unmounted afterwards."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def used_bytes(path: Path) -> int:
    info = os.statvfs(path)
    return (info.f_blocks - info.f_bfree) * info.f_frsize


def test_disk_bytes_above_free_space_is_refused_before_allocating(small_fs, caplog):
    store_dir = small_fs / "rank-0"
    before = used_bytes(small_fs)
    with pytest.raises(DiskStoreError) as err:
        DiskStore(str(store_dir), 16 * 2**20, SLOT_BYTES, NS)
    message = str(err.value)
    assert "disk_bytes=" in message and str(store_dir) in message and "free" in message
    assert "\n" not in message
    assert used_bytes(small_fs) - before < 64 * 1024  # nothing preallocated (a lock file only)
    assert not [n for n in os.listdir(store_dir) if n.startswith("slots-")]


def test_enospc_mid_allocation_keeps_an_earlier_runs_blocks(small_fs, monkeypatch, caplog):
    store_dir = small_fs / "rank-0"
    payload = np.arange(SLOT_BYTES, dtype=np.uint8)
    with DiskStore(str(store_dir), 8 * STRIDE, SLOT_BYTES, NS, num_files=2) as store:
        assert store.write(3, b"k" * 36, payload).result()
    earlier = {n: os.path.getsize(store_dir / n) for n in os.listdir(store_dir)
               if n.startswith("slots-")}
    # A race: the space check saw room, then someone else took it; fallocate hits ENOSPC.
    monkeypatch.setattr(fsutil, "free_bytes", lambda path: 2**40)
    with caplog.at_level(logging.WARNING, logger="vllm.tokenvm"):
        with pytest.raises(DiskStoreError) as err:
            DiskStore(str(store_dir), 400 * STRIDE, SLOT_BYTES, NS, num_files=4)
    assert "ENOSPC" in str(err.value) and "\n" not in str(err.value)
    assert any("removed what this start allocated" in r.getMessage() for r in caplog.records)
    now = {n: os.path.getsize(store_dir / n) for n in os.listdir(store_dir)
           if n.startswith("slots-")}
    assert now == earlier  # new files removed, earlier files back to their size
    assert used_bytes(small_fs) < TMPFS_BYTES // 2
    monkeypatch.undo()
    with DiskStore(str(store_dir), 8 * STRIDE, SLOT_BYTES, NS, num_files=2) as store:
        assert store.scan() == {b"k" * 36: 3}
        out = np.zeros(SLOT_BYTES, np.uint8)
        assert store.read(3, b"k" * 36, out).result() and np.array_equal(out, payload)


def test_restart_of_an_existing_store_needs_no_new_space(small_fs):
    """Space already allocated to the store's files counts as available on a restart."""
    store_dir = small_fs / "rank-0"
    capacity = (TMPFS_BYTES * 3 // 4) // STRIDE * STRIDE
    DiskStore(str(store_dir), capacity, SLOT_BYTES, NS).close()
    assert fsutil.free_bytes(str(small_fs)) < capacity  # a fresh store would not fit now
    DiskStore(str(store_dir), capacity, SLOT_BYTES, NS).close()
