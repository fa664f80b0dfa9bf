"""The bytes of the disk tier, in the worker process: fixed-size slots in a few preallocated files.

Which slot holds which block is decided by the scheduler (``tokenvm_vllm/tiers/disk_tier.py``);
this class only moves bytes between the caller's memory (usually a host-pool row) and disk slots,
asynchronously, and verifies everything it reads. No vLLM imports.

Layout
------
``path/`` holds a few preallocated ``slots-N.bin`` files and a ``lock`` (``files.py``); every
slot is ``[ 4 KiB header ][ payload padded to 4 KiB ]`` (``format.py``), so offsets and lengths
are 4 KiB aligned and the files can be used with ``O_DIRECT``. Filesystem rules (ownership,
modes, no symlinks, the O_DIRECT probe) are in ``fsutil.py``.

Crash safety: see ``format.py`` (every slot is self-describing and self-verifying).

Concurrency contract
--------------------
``write``/``read`` return ``concurrent.futures.Future[bool]``; the I/O runs on ``io_threads``
threads (``pread``/``pwrite``/memcpy/checksums release the GIL), any number of operations may be
in flight. The caller must keep a ``payload`` unchanged, and not touch an ``out`` buffer, until
the future is done. Writes and invalidations of one slot run in submission order; the caller
(the scheduler's pinning) must not read a slot while it is being written.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from tokenvm_vllm.tiers.disk import format as fmt
from tokenvm_vllm.tiers.disk import fsutil
from tokenvm_vllm.tiers.disk.faults import NO_FAULTS, DiskFaults
from tokenvm_vllm.tiers.disk.files import SlotFiles, namespace_difference
from tokenvm_vllm.tiers.disk.format import (
    CHECKSUMS,
    CSUM_NAMES,
    HEADER_BYTES,
    MAX_KEY_BYTES,
    SlotHeader,
    byte_view,
    decode_header,
    disk_slot_count,
    encode_header,
)
from tokenvm_vllm.tiers.disk.fsutil import DiskStoreError

logger = logging.getLogger("vllm.tokenvm")


class DiskStore:
    """``num_slots`` slots of ``slot_bytes`` payload each, in preallocated files under ``path``.

    Raises ``DiskStoreError`` (one line, naming the path) when the directory or files cannot be
    set up safely. After that, bad or missing data never raises: ``read`` returns False (a miss).
    I/O errors (ENOSPC, EIO, EACCES...) make the future return False, count in ``errors`` and log
    one warning per errno.
    """

    def __init__(
        self,
        path: str,
        capacity_bytes: int,
        slot_bytes: int,
        namespace: bytes,
        *,
        num_files: int = 4,
        io_threads: int = 8,
        sync_writes: bool = False,
        namespace_fields: Mapping[str, Any] | None = None,
        faults: DiskFaults | None = None,
    ) -> None:
        self.path = os.path.abspath(path)
        if slot_bytes <= 0:
            raise DiskStoreError(f"tokenvm: disk store slot_bytes={slot_bytes} must be > 0")
        if len(namespace) != 16:
            raise DiskStoreError(
                f"tokenvm: disk store namespace must be a 16-byte fingerprint, got "
                f"{len(namespace)} bytes")
        if num_files < 1 or io_threads < 1:
            raise DiskStoreError(
                f"tokenvm: disk store num_files={num_files} and io_threads={io_threads} must "
                f"be >= 1")
        self.slot_bytes = slot_bytes
        self.namespace = bytes(namespace)
        self.slot_stride = fmt.slot_stride(slot_bytes)
        self.payload_stride = self.slot_stride - HEADER_BYTES
        self.num_slots = disk_slot_count(capacity_bytes, slot_bytes)
        if self.num_slots < 1:
            raise DiskStoreError(
                f"tokenvm: disk store capacity {capacity_bytes} bytes at {self.path} is smaller "
                f"than one slot ({self.slot_stride} bytes = 4 KiB header + {slot_bytes} bytes "
                f"payload rounded up to 4 KiB)")
        self.sync_writes = sync_writes
        self.io_threads = io_threads
        self.csum_algo = fmt.DEFAULT_CSUM
        self._faults = faults or NO_FAULTS  # testing only (debug_disk_faults)

        self._lock = threading.Lock()
        self._closed = False
        # Sequence numbers only order two headers that claim one key (see ``scan``). Starting at
        # the wall clock keeps them increasing across restarts even when ``scan`` is not called.
        self._next_seq = time.time_ns()
        self._last_mutation: dict[int, Future[bool]] = {}
        self._warned: set[str] = set()
        self.errors = 0
        self.last_error = ""
        self._counts = {"writes": 0, "write_bytes": 0, "reads": 0, "read_hits": 0,
                        "read_misses": 0, "invalidations": 0}

        self._files = SlotFiles(self.path, self.num_slots, self.slot_stride, num_files)
        self.num_files = self._files.num_files
        self.slots_per_file = self._files.slots_per_file
        self.o_direct = self._files.o_direct
        self.namespace_fields = dict(namespace_fields) if namespace_fields is not None else None
        # Earlier runs' namespaces, read before this run records its own (scan explains skips).
        self._known_namespaces = self._files.read_namespaces()
        if self.namespace_fields is not None:
            self._files.record_namespace(self.namespace, self.namespace_fields)

        # One page-aligned staging buffer per I/O thread (anonymous mmap is page aligned, which
        # O_DIRECT needs); the caller's memory is copied to/from these.
        self._staging_map = mmap.mmap(-1, self.slot_stride * io_threads)
        staging = np.frombuffer(self._staging_map, dtype=np.uint8)
        self._staging: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        for i in range(io_threads):
            self._staging.put(staging[i * self.slot_stride:(i + 1) * self.slot_stride])
        self._executor = ThreadPoolExecutor(io_threads, thread_name_prefix="tokenvm-disk")
        logger.info(
            "TokenVM disk store: %s, %d slots x %d bytes (stride %d) in %d files = %.2f GiB, "
            "%s, checksum %s%s", self.path, self.num_slots, slot_bytes, self.slot_stride,
            self.num_files, self.num_slots * self.slot_stride / 2**30,
            "O_DIRECT" if self.o_direct else "buffered I/O", CSUM_NAMES[self.csum_algo],
            ", fdatasync per write" if sync_writes else "")

    # -- addressing ----------------------------------------------------------------------------

    def slot_location(self, slot: int) -> tuple[str, int]:
        """(file path, byte offset) of ``slot``'s header. For tests and tools."""
        self._check_slot(slot)
        return self._files.location(slot)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"tokenvm: disk slot {slot} out of range 0..{self.num_slots - 1}")

    def _check_open(self) -> None:
        if self._closed:
            raise DiskStoreError(f"tokenvm: disk store {self.path} is closed")

    # -- asynchronous API ----------------------------------------------------------------------

    def write(self, slot: int, key: bytes, payload: Any) -> Future[bool]:
        """Store ``payload`` (``slot_bytes`` bytes) as ``key`` in ``slot``.

        The future is True once header and payload were written in one call (and fdatasync'ed
        with ``sync_writes``), False on an I/O error. ``payload`` must stay unchanged until then.
        Bad arguments (slot range, key or payload size) raise here, before anything is queued.
        """
        self._check_open()
        self._check_slot(slot)
        key = bytes(key)
        if not 0 < len(key) <= MAX_KEY_BYTES:
            raise ValueError(f"tokenvm: disk store key of {len(key)} bytes (max {MAX_KEY_BYTES})")
        source = byte_view(payload, self.slot_bytes, writable=False, what="payload")
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
        return self._submit_mutation(slot, self._write_now, slot, key, source, seq)

    def read(self, slot: int, key: bytes, out: Any) -> Future[bool]:
        """Copy ``slot``'s payload into ``out`` (``slot_bytes`` writable bytes) if it verifies.

        The future is True only when magic, version, namespace, slot, key, length and both
        checksums match; then ``out`` holds the payload. False is a miss (bad, stale, torn or
        missing data, or an I/O error) and ``out`` is left untouched (data is verified in a
        staging buffer before it is copied out).
        """
        self._check_open()
        self._check_slot(slot)
        target = byte_view(out, self.slot_bytes, writable=True, what="output buffer")
        return self._executor.submit(self._read_now, slot, bytes(key), target)

    def invalidate(self, slot: int) -> Future[bool]:
        """Zero ``slot``'s header, so no later ``read`` or ``scan`` finds what it held.

        Runs in order with this slot's writes: a ``write`` submitted after it lands after it.
        """
        self._check_open()
        self._check_slot(slot)
        return self._submit_mutation(slot, self._invalidate_now, slot)

    def _submit_mutation(self, slot: int, fn: Callable[..., bool], *args: Any) -> Future[bool]:
        # Writes/invalidations of one slot must land in submission order. The pool's queue is
        # FIFO, so an earlier op has already been picked up by a thread when a later one starts
        # waiting on it: waiting cannot deadlock.
        with self._lock:
            previous = self._last_mutation.get(slot)
            future = self._executor.submit(self._after, previous, fn, *args)
            self._last_mutation[slot] = future

        def forget(done: Future[bool], slot: int = slot) -> None:
            with self._lock:
                if self._last_mutation.get(slot) is done:
                    del self._last_mutation[slot]

        future.add_done_callback(forget)
        return future

    @staticmethod
    def _after(previous: Future[bool] | None, fn: Callable[..., bool], *args: Any) -> bool:
        if previous is not None:
            previous.result()  # our own ops never raise; they return False
        return fn(*args)

    # -- synchronous work (I/O threads) ----------------------------------------------------------

    def _write_now(self, slot: int, key: bytes, source: np.ndarray, seq: int) -> bool:
        buf = self._staging.get()
        try:
            fd, offset = self._files.fd_offset(slot)
            self._faults.before("write")
            payload = buf[HEADER_BYTES:HEADER_BYTES + self.slot_bytes]
            np.copyto(payload, source)
            buf[HEADER_BYTES + self.slot_bytes:] = 0  # padding: staging buffers are reused
            header = self._pack_header(slot, key, seq, CHECKSUMS[self.csum_algo](payload))
            buf[:HEADER_BYTES] = 0
            buf[:len(header)] = np.frombuffer(header, dtype=np.uint8)
            fsutil.pwrite_all(fd, buf.data, offset)  # header + payload: ONE write call
            if self.sync_writes:
                os.fdatasync(fd)
        except OSError as exc:
            self._record_error("write", slot, exc)
            return False
        finally:
            self._staging.put(buf)
        with self._lock:
            self._counts["writes"] += 1
            self._counts["write_bytes"] += self.slot_bytes
        return True

    def _read_now(self, slot: int, key: bytes, target: np.ndarray) -> bool:
        buf = self._staging.get()
        try:
            fd, offset = self._files.fd_offset(slot)
            self._faults.before("read")
            complete = fsutil.pread_all(fd, buf.data, offset)
            ok = complete and self._verify(buf, slot, key)
            if ok:
                np.copyto(target, buf[HEADER_BYTES:HEADER_BYTES + self.slot_bytes])
        except OSError as exc:
            self._record_error("read", slot, exc)
            ok = False
        finally:
            self._staging.put(buf)
        with self._lock:
            self._counts["reads"] += 1
            self._counts["read_hits" if ok else "read_misses"] += 1
        return ok

    def _invalidate_now(self, slot: int) -> bool:
        buf = self._staging.get()
        try:
            fd, offset = self._files.fd_offset(slot)
            buf[:HEADER_BYTES] = 0
            fsutil.pwrite_all(fd, buf.data[:HEADER_BYTES], offset)
            if self.sync_writes:
                os.fdatasync(fd)
        except OSError as exc:
            self._record_error("invalidate", slot, exc)
            return False
        finally:
            self._staging.put(buf)
        with self._lock:
            self._counts["invalidations"] += 1
        return True

    # -- headers --------------------------------------------------------------------------------

    def _pack_header(self, slot: int, key: bytes, seq: int, payload_csum: int) -> bytes:
        return encode_header(SlotHeader(
            namespace=self.namespace, slot=slot, stride=self.slot_stride,
            payload_len=self.slot_bytes, seq=seq, payload_csum=payload_csum,
            algo=self.csum_algo, key=key))

    def _parse_header(self, raw: np.ndarray, slot: int,
                      foreign: dict[bytes, int] | None = None) -> SlotHeader | None:
        """The header in ``raw`` (at least ``HEADER_BYTES``) if it is valid for this store's
        namespace, layout and ``slot``; None otherwise. Never raises on bad bytes. A valid
        header of another namespace is counted in ``foreign`` (namespace -> slots)."""
        header = decode_header(raw[:HEADER_BYTES].tobytes())
        if header is None:
            return None
        if not header.verifiable:
            self._warn_once(f"algo{header.algo}", "TokenVM disk store: %s has slots checksummed "
                            "with algorithm %d, unknown to this version; they read as "
                            "misses", self.path, header.algo)
            return None
        if (header.slot != slot or header.stride != self.slot_stride
                or header.payload_len != self.slot_bytes):
            return None
        if header.namespace != self.namespace:
            if foreign is not None:
                foreign[header.namespace] = foreign.get(header.namespace, 0) + 1
            return None
        return header

    def _verify(self, buf: np.ndarray, slot: int, key: bytes) -> bool:
        header = self._parse_header(buf, slot)
        if header is None or header.key != key:
            return False
        payload = buf[HEADER_BYTES:HEADER_BYTES + header.payload_len]
        return CHECKSUMS[header.algo](payload) == header.payload_csum

    # -- recovery -------------------------------------------------------------------------------

    def scan(self, verify_payload: bool = False) -> dict[bytes, int]:
        """key -> slot for every slot whose header is valid for this namespace and layout.

        Reads only the 4 KiB headers; payload checksums are verified lazily by ``read`` (pass
        ``verify_payload=True`` to read and check every payload now). When two slots claim one
        key the higher sequence number wins and the other slot is invalidated. The result is
        ordered by sequence number, oldest write first (a fair start for an LRU). Also moves the
        write sequence counter past every number seen. Call it at start-up, before any writes.
        """
        self._check_open()
        step = -(-self.num_slots // self.io_threads)
        chunks = [(lo, min(lo + step, self.num_slots)) for lo in range(0, self.num_slots, step)]
        found: list[tuple[int, int, bytes]] = []  # (seq, slot, key)
        foreign: dict[bytes, int] = {}
        # A slot that does not fit in its (truncated) file cannot be read back; skip it now.
        sizes = [os.fstat(fd).st_size for fd in self._files.fds]
        for part in self._executor.map(
                lambda c: self._scan_range(c[0], c[1], sizes, verify_payload, foreign), chunks):
            found.extend(part)
        found.sort()
        result: dict[bytes, int] = {}
        losers: list[int] = []
        for _seq, slot, key in found:  # ascending seq: a later claim replaces an earlier one
            if key in result:
                losers.append(result.pop(key))
            result[key] = slot
        for slot in losers:
            self._invalidate_now(slot)
        if found:
            with self._lock:
                self._next_seq = max(self._next_seq, found[-1][0] + 1)
        logger.info("TokenVM disk store: scan of %s found %d blocks (%d duplicate slots dropped)",
                    self.path, len(result), len(losers))
        if foreign:
            self._report_foreign(foreign)
        return result

    def _report_foreign(self, foreign: dict[bytes, int]) -> None:
        """One warning: how many slots another namespace wrote, and which setting differs."""
        current = self.namespace_fields or {}
        reasons = "; ".join(
            f"{count} of namespace {ns.hex()[:12]}: "
            + namespace_difference(self._known_namespaces.get(ns.hex()), current)
            for ns, count in sorted(foreign.items(), key=lambda item: -item[1]))
        logger.warning(
            "TokenVM disk store: skipped %d slots in %s written under other settings (not "
            "reused; overwritten as the tier fills): %s", sum(foreign.values()), self.path,
            reasons)

    def _scan_range(self, lo: int, hi: int, sizes: list[int], verify_payload: bool,
                    foreign: dict[bytes, int]) -> list[tuple[int, int, bytes]]:
        found: list[tuple[int, int, bytes]] = []
        mine: dict[bytes, int] = {}
        buf = self._staging.get()
        try:
            view = buf.data if verify_payload else buf.data[:HEADER_BYTES]
            for slot in range(lo, hi):
                fd, offset = self._files.fd_offset(slot)
                if offset + self.slot_stride > sizes[slot // self.slots_per_file]:
                    continue
                try:
                    if not fsutil.pread_all(fd, view, offset):
                        continue
                except OSError as exc:
                    self._record_error("scan", slot, exc)
                    continue
                header = self._parse_header(buf, slot, mine)
                if header is None:
                    continue
                if verify_payload and not self._verify(buf, slot, header.key):
                    continue
                found.append((header.seq, slot, header.key))
        finally:
            self._staging.put(buf)
        with self._lock:  # chunks run on several I/O threads
            for namespace, count in mine.items():
                foreign[namespace] = foreign.get(namespace, 0) + count
        return found

    # -- errors, stats, shutdown ------------------------------------------------------------------

    def _record_error(self, op: str, slot: int, exc: OSError) -> None:
        with self._lock:
            self.errors += 1
            self.last_error = f"{op} slot {slot}: {exc}"
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self._warn_once(f"errno-{name}", "TokenVM disk store: %s of slot %d in %s failed: %s "
                        "(treated as a miss; further %s errors are only counted)", op, slot,
                        self.path, exc, name)

    def _warn_once(self, kind: str, msg: str, *args: Any) -> None:
        with self._lock:
            if kind in self._warned:
                return
            self._warned.add(kind)
        logger.warning(msg, *args)

    def stats(self) -> dict[str, Any]:
        """Counters and layout, for logging and metrics. A snapshot; safe from any thread."""
        with self._lock:
            counts = dict(self._counts)
            return {
                "path": self.path, "num_slots": self.num_slots, "slot_bytes": self.slot_bytes,
                "slot_stride": self.slot_stride, "num_files": self.num_files,
                "o_direct": self.o_direct, "checksum": CSUM_NAMES[self.csum_algo],
                "sync_writes": self.sync_writes, "errors": self.errors,
                "last_error": self.last_error, "in_flight_mutations": len(self._last_mutation),
                **counts,
            }

    def close(self) -> None:
        """Wait for every queued operation, then close the files and release the lock."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        self._files.close()

    def __enter__(self) -> DiskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
