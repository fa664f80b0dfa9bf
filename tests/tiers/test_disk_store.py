"""DiskStore (worker bytes on disk) and DiskTier (scheduler bookkeeping of disk slots)."""

from __future__ import annotations

import errno
import logging
import os
import stat

import numpy as np
import pytest
import torch

from tokenvm_vllm.policies import make_policy
from tokenvm_vllm.tiers.disk import DiskStore, DiskStoreError
from tokenvm_vllm.tiers.disk import format as fmt
from tokenvm_vllm.tiers.disk.format import HEADER_BYTES
from tokenvm_vllm.tiers.disk.inspect import inspect_store
from tokenvm_vllm.tiers.disk_tier import DiskTier
from tokenvm_vllm.tiers.residency import BlockState, ResidencyIndex, Tier

NS = bytes(range(16))
OTHER_NS = bytes(range(1, 17))
SLOT_BYTES = 10_000  # deliberately not a multiple of 4096: exercises the padding
STRIDE = HEADER_BYTES + 12_288


def key(i: int) -> bytes:
    return i.to_bytes(32, "big") + (0).to_bytes(4, "big")


def payload(i: int, n: int = SLOT_BYTES) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8)


def open_store(path, num_slots: int = 16, namespace: bytes = NS, **kw) -> DiskStore:
    return DiskStore(str(path), num_slots * STRIDE, SLOT_BYTES, namespace, **kw)


def read(store: DiskStore, slot: int, k: bytes) -> np.ndarray | None:
    out = np.zeros(store.slot_bytes, dtype=np.uint8)
    return out if store.read(slot, k, out).result() else None


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        value = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([value ^ 0x10]))


@pytest.fixture
def store(tmp_path):
    with open_store(tmp_path / "disk") as s:
        yield s


# -- DiskStore: data path ------------------------------------------------------------------------


def test_layout_and_alignment(store):
    assert store.slot_stride == STRIDE and store.slot_stride % 4096 == 0
    assert store.num_slots == 16
    assert store.num_files == 4 and store.slots_per_file == 4
    for slot in range(store.num_slots):
        path, offset = store.slot_location(slot)
        assert offset % 4096 == 0
        assert os.path.getsize(path) == 4 * STRIDE


def test_round_trip_many_in_flight(tmp_path):
    n = 48
    with open_store(tmp_path / "d", num_slots=n, io_threads=6) as store:
        # Payloads as torch rows of a host-pool-like tensor, numpy arrays and memoryviews.
        pool = torch.from_numpy(np.stack([payload(i) for i in range(n)]))
        sources = [pool[i] if i % 3 == 0 else payload(i) if i % 3 == 1
                   else memoryview(payload(i).tobytes()) for i in range(n)]
        writes = [store.write(i, key(i), sources[i]) for i in range(n)]
        assert all(f.result() for f in writes)
        outs = torch.zeros((n, SLOT_BYTES), dtype=torch.uint8)
        reads = [store.read(i, key(i), outs[i]) for i in range(n)]
        # Reading the same slot many times concurrently is fine too.
        extra = [np.zeros(SLOT_BYTES, np.uint8) for _ in range(16)]
        reads_same = [store.read(5, key(5), buf) for buf in extra]
        assert all(f.result() for f in reads + reads_same)
        for i in range(n):
            assert np.array_equal(outs[i].numpy(), payload(i))
        for buf in extra:
            assert np.array_equal(buf, payload(5))
        stats = store.stats()
        assert stats["writes"] == n and stats["read_hits"] == n + 16 and stats["errors"] == 0


def test_wrong_key_or_empty_slot_is_a_miss_and_leaves_out_untouched(store):
    assert store.write(0, key(0), payload(0)).result()
    out = np.full(SLOT_BYTES, 7, dtype=np.uint8)
    assert not store.read(0, key(1), out).result()
    assert not store.read(1, key(1), out).result()  # never written: zeros, bad magic
    assert (out == 7).all()
    assert store.stats()["read_misses"] == 2


def test_bad_arguments_raise_before_queueing(store):
    with pytest.raises(IndexError):
        store.write(16, key(0), payload(0))
    with pytest.raises(ValueError, match="expected 10000"):
        store.write(0, key(0), payload(0, 100))
    with pytest.raises(ValueError, match="read-only"):
        store.read(0, key(0), bytes(SLOT_BYTES))
    with pytest.raises(ValueError, match="key"):
        store.write(0, b"x" * 5000, payload(0))


def test_restart_scan_finds_blocks(tmp_path):
    path = tmp_path / "d"
    with open_store(path) as store:
        for i in range(10):
            assert store.write(i + 3, key(i), payload(i)).result()
    with open_store(path) as store:
        found = store.scan()
        assert found == {key(i): i + 3 for i in range(10)}
        assert list(found) == [key(i) for i in range(10)]  # oldest write first
        for i in range(10):
            assert np.array_equal(read(store, i + 3, key(i)), payload(i))
        assert store.scan(verify_payload=True) == found


def test_scan_keeps_higher_sequence_and_invalidates_the_other(tmp_path):
    path = tmp_path / "d"
    with open_store(path) as store:
        assert store.write(2, key(7), payload(7)).result()
        assert store.write(9, key(7), payload(7)).result()  # a lost invalidation of slot 2
    with open_store(path) as store:
        assert store.scan() == {key(7): 9}
        assert read(store, 2, key(7)) is None
    with open_store(path) as store:
        assert store.scan() == {key(7): 9}
        assert store.write(4, key(8), payload(8)).result()  # sequence moved past what was seen
        assert list(store.scan()) == [key(7), key(8)]


def test_flipped_payload_bit_is_a_miss(store):
    for i in range(3):
        assert store.write(i, key(i), payload(i)).result()
    path, offset = store.slot_location(1)
    flip_byte(path, offset + HEADER_BYTES + 1234)
    assert read(store, 1, key(1)) is None
    assert read(store, 0, key(0)) is not None and read(store, 2, key(2)) is not None
    assert key(1) in store.scan()  # payloads are verified lazily, at read time
    assert key(1) not in store.scan(verify_payload=True)


@pytest.mark.parametrize("offset", [0, 12, 30, 60, 80, 110])  # magic .. key .. header checksum
def test_flipped_header_bit_is_skipped_by_scan_and_read(store, offset):
    for i in range(3):
        assert store.write(i, key(i), payload(i)).result()
    path, slot_offset = store.slot_location(1)
    flip_byte(path, slot_offset + offset)
    assert store.scan() == {key(0): 0, key(2): 2}
    assert read(store, 1, key(1)) is None


def test_truncated_file_is_a_miss(store):
    for slot in range(4):  # all in slots-0.bin
        assert store.write(slot, key(slot), payload(slot)).result()
    path, _ = store.slot_location(0)
    os.truncate(path, STRIDE + STRIDE // 2)  # slot 1 cut in the middle, 2 and 3 gone
    assert read(store, 0, key(0)) is not None
    for slot in (1, 2, 3):
        assert read(store, slot, key(slot)) is None
    assert store.scan() == {key(0): 0}
    assert store.errors == 0


def _slot_image(store: DiskStore, slot: int) -> bytes:
    path, offset = store.slot_location(slot)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(store.slot_stride)


@pytest.mark.parametrize("half", ["first", "second"])
def test_torn_write_is_a_miss(store, half):
    assert store.write(0, key(2), payload(2)).result()
    image_new = _slot_image(store, 0)  # what a complete write of key 2 into slot 0 looks like
    assert store.write(0, key(1), payload(1)).result()  # slot 0 now holds key 1
    path, offset = store.slot_location(0)
    mid = store.slot_stride // 2
    fd = os.open(path, os.O_WRONLY)
    try:  # the write of key 2 over key 1 tore: only one half reached the disk
        if half == "first":
            os.pwrite(fd, image_new[:mid], offset)
        else:
            os.pwrite(fd, image_new[mid:], offset + mid)
    finally:
        os.close(fd)
    assert read(store, 0, key(1)) is None
    assert read(store, 0, key(2)) is None
    assert key(1) not in store.scan(verify_payload=True)
    assert key(2) not in store.scan(verify_payload=True)


def test_stale_slot_is_a_miss(store):
    assert store.write(0, key(1), payload(1)).result()
    assert store.write(0, key(2), payload(2)).result()
    assert read(store, 0, key(1)) is None
    assert np.array_equal(read(store, 0, key(2)), payload(2))


def test_invalidate_hides_block_from_read_and_scan(tmp_path):
    path = tmp_path / "d"
    with open_store(path) as store:
        assert store.write(0, key(0), payload(0)).result()
        assert store.write(1, key(1), payload(1)).result()
        assert store.invalidate(0).result()
        assert read(store, 0, key(0)) is None
    with open_store(path) as store:
        assert store.scan() == {key(1): 1}


def test_writes_and_invalidations_of_a_slot_land_in_order(store):
    futures = []
    for i in range(20):
        futures.append(store.invalidate(3))
        futures.append(store.write(3, key(i), payload(i)))
    assert all(f.result() for f in futures)
    assert np.array_equal(read(store, 3, key(19)), payload(19))
    futures = [store.write(4, key(i), payload(i)) for i in range(10)] + [store.invalidate(4)]
    assert all(f.result() for f in futures)
    assert store.scan() == {key(19): 3}


def test_wrong_namespace_is_a_miss(tmp_path):
    path = tmp_path / "d"
    with open_store(path) as store:
        assert store.write(0, key(0), payload(0)).result()
    with open_store(path, namespace=OTHER_NS) as store:
        assert store.scan() == {}
        assert read(store, 0, key(0)) is None


def test_changed_slot_size_is_a_miss(tmp_path):
    path = tmp_path / "d"
    with open_store(path) as store:
        assert store.write(0, key(0), payload(0)).result()
    with DiskStore(str(path), 16 * STRIDE, SLOT_BYTES - 8, NS) as store:
        assert store.scan() == {}
        out = np.zeros(SLOT_BYTES - 8, np.uint8)
        assert not store.read(0, key(0), out).result()


def test_slots_of_an_unknown_checksum_algorithm_are_misses(tmp_path, monkeypatch, caplog):
    """A header naming a checksum algorithm this build lacks (written by another TokenVM
    version) is a miss for scan and read, with one warning: never a crash, never its bytes."""
    path = tmp_path / "d"
    xxh3 = fmt.CHECKSUMS[fmt.CSUM_XXH3_64]
    monkeypatch.setitem(fmt.CHECKSUMS, 99, lambda data: xxh3(data) ^ 1)
    monkeypatch.setitem(fmt.CSUM_NAMES, 99, "other")
    monkeypatch.setattr(fmt, "DEFAULT_CSUM", 99)
    with open_store(path) as store:
        assert store.write(0, key(0), payload(0)).result()
        assert np.array_equal(read(store, 0, key(0)), payload(0))
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="vllm.tokenvm"), open_store(path) as store:
        assert store.scan() == {}
        assert read(store, 0, key(0)) is None
    warnings = [r for r in caplog.records if "algorithm 99" in r.getMessage()]
    assert len(warnings) == 1, caplog.text


def test_buffered_fallback_when_o_direct_is_unsupported(tmp_path, monkeypatch, caplog):
    real_open = os.open

    def no_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_direct)
    with caplog.at_level(logging.WARNING, logger="vllm.tokenvm"):
        with open_store(tmp_path / "d") as store:
            assert not store.o_direct
            assert store.write(0, key(0), payload(0)).result()
            assert np.array_equal(read(store, 0, key(0)), payload(0))
    assert sum("O_DIRECT" in r.getMessage() for r in caplog.records) == 1


# -- DiskStore: set-up and errors ----------------------------------------------------------------


def test_directory_and_file_modes(tmp_path):
    path = tmp_path / "fresh" / "disk"
    with open_store(path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
        names = sorted(os.listdir(path))
        assert names == ["lock", "slots-0.bin", "slots-1.bin", "slots-2.bin", "slots-3.bin"]
        for name in names:
            assert stat.S_IMODE(os.stat(path / name).st_mode) == 0o600


def test_loose_file_mode_is_tightened(tmp_path):
    path = tmp_path / "d"
    open_store(path).close()
    os.chmod(path / "slots-0.bin", 0o644)
    open_store(path).close()
    assert stat.S_IMODE(os.stat(path / "slots-0.bin").st_mode) == 0o600


def test_ftruncate_fallback_when_fallocate_is_unsupported(tmp_path, monkeypatch, caplog):
    def unsupported(*args, **kwargs):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    with caplog.at_level(logging.WARNING, logger="vllm.tokenvm"):
        with open_store(tmp_path / "d") as store:
            path, _ = store.slot_location(0)
            assert os.path.getsize(path) == 4 * STRIDE
            assert store.write(0, key(0), payload(0)).result()
    assert sum("fallocate" in r.getMessage() for r in caplog.records) == 1


def test_sync_writes_round_trip(tmp_path):
    with open_store(tmp_path / "d", sync_writes=True) as store:
        assert store.write(1, key(1), payload(1)).result()
        assert np.array_equal(read(store, 1, key(1)), payload(1))


def test_layout_change_removes_extra_files(tmp_path):
    path = tmp_path / "d"
    with open_store(path, num_files=4):
        pass
    with open_store(path, num_files=2) as store:
        assert store.num_files == 2
    assert sorted(os.listdir(path)) == ["lock", "slots-0.bin", "slots-1.bin"]


def test_capacity_smaller_than_one_slot(tmp_path):
    with pytest.raises(DiskStoreError, match="smaller than one slot") as info:
        DiskStore(str(tmp_path / "d"), STRIDE - 1, SLOT_BYTES, NS)
    assert "\n" not in str(info.value)


def test_path_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_bytes(b"x")
    with pytest.raises(DiskStoreError, match="is not a directory") as info:
        open_store(target)
    assert str(target) in str(info.value)


def test_unwritable_path(tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root ignores mode bits; simulate what a normal user would get
        def denied(path, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        monkeypatch.setattr(os, "mkdir", denied)
    with pytest.raises(DiskStoreError, match="Permission denied") as info:
        open_store(parent / "disk")
    assert str(parent / "disk") in str(info.value)


def test_group_writable_directory_is_refused(tmp_path):
    path = tmp_path / "d"
    path.mkdir()
    os.chmod(path, 0o777)
    with pytest.raises(DiskStoreError, match="world-writable"):
        open_store(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_directory_owned_by_another_user_is_refused(tmp_path):
    path = tmp_path / "d"
    path.mkdir(mode=0o700)
    os.chown(path, 65534, 65534)
    with pytest.raises(DiskStoreError, match="owned by uid 65534"):
        open_store(path)


def test_second_store_on_same_path_is_refused(tmp_path):
    with open_store(tmp_path / "d"):
        with pytest.raises(DiskStoreError, match="in use"):
            open_store(tmp_path / "d")
    open_store(tmp_path / "d").close()  # the lock went with close()


def test_full_disk_write_fails_softly(store, monkeypatch, caplog):
    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    assert store.write(0, key(0), payload(0)).result()
    monkeypatch.setattr(os, "pwrite", enospc)
    with caplog.at_level(logging.WARNING, logger="vllm.tokenvm"):
        futures = [store.write(i, key(i), payload(i)) for i in range(1, 6)]
        results = [f.result() for f in futures]
        assert not store.invalidate(0).result()
    assert results == [False] * 5
    assert store.errors == 6
    assert "No space left" in store.last_error
    warnings = [r for r in caplog.records  # (the store's own: other threads may log too)
                if r.levelno == logging.WARNING and r.pathname.endswith("disk/store.py")]
    assert len(warnings) == 1 and "ENOSPC" in warnings[0].getMessage()
    monkeypatch.undo()
    assert np.array_equal(read(store, 0, key(0)), payload(0))  # earlier data still fine


def test_read_io_error_is_a_miss(store, monkeypatch):
    assert store.write(0, key(0), payload(0)).result()

    def eio(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", eio)
    assert read(store, 0, key(0)) is None
    assert store.errors == 1


def test_closed_store_refuses_work(tmp_path):
    store = open_store(tmp_path / "d")
    store.close()
    store.close()  # idempotent
    with pytest.raises(DiskStoreError, match="closed"):
        store.write(0, key(0), payload(0))


# -- DiskTier ------------------------------------------------------------------------------------


def make_tier(num_slots: int = 3) -> tuple[DiskTier, ResidencyIndex]:
    index = ResidencyIndex()
    return DiskTier(num_slots, index, make_policy("lru")), index


def put(tier: DiskTier, k: bytes) -> int:
    slot = tier.begin_write(k)
    assert slot is not None
    tier.end_write(k, ok=True)
    return slot


def test_tier_write_states_and_prefix():
    tier, index = make_tier()
    slot = tier.begin_write(b"a")
    assert index.get(b"a", Tier.DISK).state is BlockState.WRITING
    assert tier.contains(b"a") and tier.readable_prefix([b"a"]) == 0
    tier.end_write(b"a", ok=True)
    put(tier, b"c")
    assert tier.readable_prefix([b"a", b"b", b"c"]) == 1
    assert index.get(b"a", Tier.DISK).slot == slot
    assert index.get(b"a", Tier.HOST) is None


def test_tier_lru_eviction_order():
    tier, index = make_tier(3)
    slots = {k: put(tier, k) for k in (b"a", b"b", b"c")}
    tier.touch(b"a")
    assert put(tier, b"d") == slots[b"b"]  # least recently used goes first
    tier.begin_read([b"c"])
    tier.end_read([b"c"])  # a read counts as a use
    assert put(tier, b"e") == slots[b"a"]
    assert b"a" not in index and b"b" not in index
    assert tier.evictions == 2


def test_tier_freed_slots():
    tier, _ = make_tier(2)
    sa, sb = put(tier, b"a"), put(tier, b"b")
    assert tier.take_freed_slots() == []
    assert put(tier, b"c") == sa  # evicted and reused at once: the write replaces the header
    assert tier.take_freed_slots() == []
    tier.begin_read([b"b"])
    tier.end_read([b"b"], drop=True)  # the read found it bad
    assert tier.take_freed_slots() == [sb]
    assert tier.take_freed_slots() == []  # reported once
    slot = tier.begin_write(b"d")
    tier.end_write(b"d", ok=False)  # may have left an old or torn header
    assert tier.take_freed_slots() == [slot]
    assert tier.clear() == 1
    assert tier.take_freed_slots() == [sa]
    assert tier.num_used == 0


def test_tier_adopt():
    tier, index = make_tier(4)
    adopted = tier.adopt({b"old": 2, b"new": 0})
    assert adopted == 2 and tier.num_used == 2
    assert index.get(b"old", Tier.DISK).state is BlockState.READABLE
    assert tier.readable_prefix([b"old", b"new"]) == 2
    new_slots = {put(tier, b"x"), put(tier, b"y")}
    assert new_slots == {1, 3}
    assert put(tier, b"z") == 2  # adopted in scan order: the oldest write is evicted first
    with pytest.raises(ValueError, match="in use"):
        tier.adopt({b"q": 0})
    with pytest.raises(ValueError, match="out of range"):
        tier.adopt({b"q": 9})


def test_tier_adopt_skips_resident_keys_and_frees_their_slot():
    tier, _ = make_tier(4)
    put(tier, b"a")  # slot 0
    assert tier.adopt({b"a": 3, b"b": 1}) == 1
    assert tier.take_freed_slots() == [3]
    assert tier.num_used == 2


def test_store_and_tier_together_across_restart(tmp_path):
    path = tmp_path / "d"
    tier, _ = make_tier(4)
    with open_store(path, num_slots=4) as store:
        for i in range(6):  # two evictions
            slot = tier.begin_write(key(i))
            for freed in tier.take_freed_slots():
                store.invalidate(freed)
            tier.end_write(key(i), store.write(slot, key(i), payload(i)).result())
        tier.begin_read([key(5)])
        tier.end_read([key(5)], drop=True)
        for freed in tier.take_freed_slots():
            assert store.invalidate(freed).result()
    tier2, _ = make_tier(4)
    with open_store(path, num_slots=4) as store:
        assert tier2.adopt(store.scan()) == 3
        assert tier2.readable_prefix([key(2), key(3), key(4)]) == 3
        assert not tier2.contains(key(5))
        for k in (key(2), key(3), key(4)):
            (slot,) = tier2.begin_read([k])
            assert np.array_equal(read(store, slot, k), payload(int.from_bytes(k[:32], "big")))
            tier2.end_read([k])


# -- inspect_store: read-only summary ----------------------------------------------------------


def _snapshot(path) -> dict[str, tuple[int, int, bytes]]:
    return {name: (os.stat(path / name).st_mtime_ns, os.stat(path / name).st_mode,
                   (path / name).read_bytes()) for name in sorted(os.listdir(path))}


def test_inspect_store_counts_blocks_per_namespace_without_writing(tmp_path):
    path = tmp_path / "d"
    with open_store(path) as store:
        assert all(store.write(slot, key(slot), payload(slot)).result() for slot in (0, 1, 2))
    with open_store(path, namespace=OTHER_NS) as store:
        assert all(store.write(slot, key(slot), payload(slot)).result() for slot in (5, 9))
    before = _snapshot(path)
    summary = inspect_store(str(path))
    assert _snapshot(path) == before
    assert summary.num_slots == 16 and summary.used_slots == 5
    assert summary.slot_bytes == SLOT_BYTES and summary.slot_stride == STRIDE
    assert summary.blocks_by_namespace == {NS: 3, OTHER_NS: 2}
    assert [name for name, _ in summary.files] == [f"slots-{i}.bin" for i in range(4)]
    assert summary.file_bytes == 16 * STRIDE
    assert summary.duplicate_slots == summary.stale_headers == 0
    assert summary.bad_payloads is None and summary.locked_by_pid is None
    assert 0 < summary.fs_free_bytes <= summary.fs_total_bytes


def test_inspect_store_finds_layout_without_a_header_at_a_file_start(tmp_path):
    path = tmp_path / "d"
    with open_store(path) as store:
        assert store.write(3, key(3), payload(3)).result()  # file 0, third slot
    summary = inspect_store(str(path))
    assert (summary.slot_stride, summary.used_slots) == (STRIDE, 1)


def test_inspect_store_empty_store_has_unknown_layout(tmp_path):
    open_store(tmp_path / "d").close()
    summary = inspect_store(str(tmp_path / "d"))
    assert summary.slot_bytes is None and summary.num_slots == 0 and summary.used_slots == 0


def test_inspect_store_verify_duplicates_and_lock(tmp_path):
    path = tmp_path / "d"
    with open_store(path) as store:
        for slot in (0, 1, 2):
            assert store.write(slot, key(7 if slot < 2 else slot), payload(slot)).result()
        assert inspect_store(str(path)).locked_by_pid == os.getpid()
        file_path, offset = store.slot_location(2)
    flip_byte(file_path, offset + HEADER_BYTES + 5)
    summary = inspect_store(str(path), verify_payloads=True)
    assert summary.used_slots == 3 and summary.duplicate_slots == 1
    assert summary.bad_payloads == 1


def test_inspect_store_refuses_missing_or_foreign_paths(tmp_path):
    with pytest.raises(DiskStoreError, match="does not exist"):
        inspect_store(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(DiskStoreError, match="not a directory"):
        inspect_store(str(tmp_path / "file"))
    with pytest.raises(DiskStoreError, match="no slots-N.bin"):
        inspect_store(str(tmp_path))
    assert not (tmp_path / "missing").exists()
