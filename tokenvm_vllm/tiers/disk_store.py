"""The bytes of the disk tier, in the worker process: fixed-size slots in a few preallocated files.

Which slot holds which block is decided by the scheduler (``tokenvm_vllm/tiers/disk_tier.py``);
this class only moves bytes between the caller's memory (usually a host-pool row) and disk slots,
asynchronously, and verifies everything it reads. No vLLM imports.

Layout
------
``path/`` (mode 0700, checked) holds ``slots-0.bin`` ... ``slots-{n-1}.bin`` (mode 0600,
preallocated with ``posix_fallocate``) and a ``lock`` file (an exclusive ``flock`` so two processes,
e.g. two tensor-parallel ranks given the same path, cannot share a store). Slots are numbered
``0 .. num_slots-1`` and laid out contiguously, ``slots_per_file`` per file. Each slot is::

    [ header: 4096 bytes ][ payload: slot_bytes, zero-padded up to a multiple of 4096 ]

so every slot offset and length is 4 KiB aligned and the files can be used with ``O_DIRECT``.
The header (little endian) is ``_FIXED`` below followed by the key bytes and an 8-byte header
checksum over everything before it. It records the magic, the format version, the checksum
algorithm (xxh3_64, from the required ``xxhash`` package), the 16-byte namespace fingerprint,
the slot's own index and stride (so a header read at an offset that
belongs to another layout, e.g. after ``slot_bytes`` changed, is rejected), the payload length, a
sequence number and the payload checksum.

Crash safety (why there is no journal)
--------------------------------------
A slot is written with ONE ``os.pwrite`` of the whole aligned slot (header and payload), and a
write is reported successful only after that call returns (after ``fdatasync`` too, with
``sync_writes=True``). The only thing this store promises is that it never hands back bytes that
were not written for the requested key in this namespace. Every outcome of a crash or failure
keeps that promise:

* Torn write (any subset of the slot's pages reached the disk): if the new header landed, the
  payload is a mix of old and new bytes and fails the new payload checksum; if the old header
  survived, the mixed payload fails the *old* payload checksum. Either way a miss. A header torn
  within itself fails the header checksum (all fixed fields sit in the first 512-byte sector).
* Lost write (nothing landed, e.g. page cache dropped by a crash with ``sync_writes=False``): the
  slot still holds its previous, self-consistent contents, which are valid bytes for the previous
  key. Serving them under that key is correct because keys are content addresses (vLLM's chained
  block hash inside a namespace). After a restart the scheduler only knows what ``scan`` returns,
  so nothing is "believed written" that is not on disk.
* Stale slot (the scheduler reused the slot for key B): the header names B, so a read for A fails
  the key check. A freed slot is ``invalidate``d (header zeroed) so a restart cannot resurrect a
  block the scheduler dropped; if that zeroing is itself lost in a crash, the resurrected block's
  bytes are still verified and correct for its key (see above).
* Two slots claiming one key (possible when an invalidation was lost): ``scan`` keeps the higher
  sequence number and invalidates the other.
* Truncated file, unallocated extents (read as zeros), bit rot: wrong magic, short read or a
  checksum mismatch; a miss, never an exception.

A separate manifest would only add a second thing that can tear; since every slot is
self-describing and self-verifying, the slot headers are the manifest. The checksums are not
cryptographic: they detect accidents (torn writes, media errors), not an attacker who can write
the files; the 0700/0600 modes and the ownership checks keep other users out.

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
import fcntl
import logging
import mmap
import os
import queue
import re
import shutil
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

logger = logging.getLogger("vllm.tokenvm")

ALIGN = 4096
"""Slot offsets, header size and payload padding: the O_DIRECT alignment on every common device."""
HEADER_BYTES = ALIGN
MAGIC = b"TKVMSLOT"
FORMAT_VERSION = 1

CSUM_XXH3_64 = 1
# 2 was blake2b-64, written only by builds without xxhash (now required): such slots are misses.

# magic, version, checksum algo, reserved, namespace, slot index, slot stride, payload length,
# sequence number, payload checksum, key length. The key and then the header checksum follow.
_FIXED = struct.Struct("<8sHBB16sQQQQQH")
_CSUM = struct.Struct("<Q")
MAX_KEY_BYTES = HEADER_BYTES - _FIXED.size - _CSUM.size

_SLOT_FILE = re.compile(r"^slots-(\d+)\.bin$")


def disk_slot_count(capacity_bytes: int, slot_bytes: int) -> int:
    """Slots a ``DiskStore`` of ``capacity_bytes`` holds (the scheduler sizes its tier with it)."""
    return capacity_bytes // (HEADER_BYTES + _round_up(slot_bytes, ALIGN))


class DiskStoreError(RuntimeError):
    """Setup failed (bad path, permissions, size, in use): one line, names the path."""


def _xxh3_64(data: Any) -> int:
    return xxhash.xxh3_64_intdigest(data)


_CHECKSUMS: dict[int, Callable[[Any], int]] = {CSUM_XXH3_64: _xxh3_64}
DEFAULT_CSUM = CSUM_XXH3_64
_CSUM_NAMES = {CSUM_XXH3_64: "xxh3_64"}


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _byte_view(obj: Any, nbytes: int, writable: bool, what: str) -> np.ndarray:
    """A 1-D uint8 numpy view (no copy) of a memoryview / bytes-like / numpy array / CPU tensor."""
    torch = sys.modules.get("torch")  # only if the caller already uses torch; never imported here
    if torch is not None and isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            raise ValueError(f"tokenvm: disk store {what} must be a CPU tensor, got {obj.device}")
        if not obj.is_contiguous():
            raise ValueError(f"tokenvm: disk store {what} tensor must be contiguous")
        tensor = obj.detach().reshape(-1)
        if tensor.dtype != torch.uint8:
            tensor = tensor.view(torch.uint8)
        array = tensor.numpy()
    elif isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous:
            raise ValueError(f"tokenvm: disk store {what} array must be C-contiguous")
        array = obj.reshape(-1).view(np.uint8)
    else:
        array = np.frombuffer(obj, dtype=np.uint8)
    if array.nbytes != nbytes:
        raise ValueError(
            f"tokenvm: disk store {what} has {array.nbytes} bytes, expected {nbytes}")
    if writable and not array.flags.writeable:
        raise ValueError(f"tokenvm: disk store {what} is read-only")
    return array


@dataclass(frozen=True)
class SlotHeader:
    """A parsed header whose own checksum, magic, version, namespace, slot and length verified."""

    key: bytes
    seq: int
    payload_len: int
    payload_csum: int
    csum_algo: int


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
        self.payload_stride = _round_up(slot_bytes, ALIGN)
        self.slot_stride = HEADER_BYTES + self.payload_stride
        self.num_slots = disk_slot_count(capacity_bytes, slot_bytes)
        if self.num_slots < 1:
            raise DiskStoreError(
                f"tokenvm: disk store capacity {capacity_bytes} bytes at {self.path} is smaller "
                f"than one slot ({self.slot_stride} bytes = 4 KiB header + {slot_bytes} bytes "
                f"payload rounded up to 4 KiB)")
        self.num_files = min(num_files, self.num_slots)
        self.slots_per_file = -(-self.num_slots // self.num_files)
        # Recompute so no file is empty (e.g. 5 slots over 4 files -> 2+2+1, 3 files).
        self.num_files = -(-self.num_slots // self.slots_per_file)
        self.sync_writes = sync_writes
        self.io_threads = io_threads
        self.csum_algo = DEFAULT_CSUM

        self._lock = threading.Lock()
        self._closed = False
        self._fds: list[int] = []
        self._lock_fd = -1
        # Sequence numbers only order two headers that claim one key (see ``scan``). Starting at
        # the wall clock keeps them increasing across restarts even when ``scan`` is not called.
        self._next_seq = time.time_ns()
        self._last_mutation: dict[int, Future[bool]] = {}
        self._warned: set[str] = set()
        self.errors = 0
        self.last_error = ""
        self._counts = {"writes": 0, "write_bytes": 0, "reads": 0, "read_hits": 0,
                        "read_misses": 0, "invalidations": 0}

        try:
            self._prepare_directory()
            self._take_lock()
            self.o_direct = self._probe_o_direct()
            self._open_files()
        except BaseException:
            self._close_fds()
            raise

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
            "O_DIRECT" if self.o_direct else "buffered I/O", _CSUM_NAMES[self.csum_algo],
            ", fdatasync per write" if sync_writes else "")

    # -- set-up --------------------------------------------------------------------------------

    def _prepare_directory(self) -> None:
        path = self.path
        if os.path.lexists(path) and not os.path.isdir(path):
            raise DiskStoreError(f"tokenvm: disk store path {path} exists and is not a directory")
        if not os.path.exists(path):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass  # created concurrently; the checks below still apply
            except OSError as exc:
                raise DiskStoreError(
                    f"tokenvm: cannot create disk store directory {path}: {exc.strerror}") from None
        try:  # e.g. a parent that is a file: makedirs' FileExistsError was swallowed above
            info = os.stat(path)
        except OSError as exc:
            raise DiskStoreError(f"tokenvm: disk store path {path}: {exc.strerror}; choose a "
                                 "directory for disk_path") from None
        if not stat.S_ISDIR(info.st_mode):
            raise DiskStoreError(f"tokenvm: disk store path {path} exists and is not a directory")
        if info.st_uid != os.geteuid():
            raise DiskStoreError(
                f"tokenvm: disk store directory {path} is owned by uid {info.st_uid}, not by this "
                f"process (uid {os.geteuid()}); refusing to store KV data there")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise DiskStoreError(
                f"tokenvm: disk store directory {path} is group- or world-writable (mode "
                f"{stat.S_IMODE(info.st_mode):o}); chmod 700 it or choose another path")
        if not os.access(path, os.W_OK | os.X_OK):
            raise DiskStoreError(f"tokenvm: disk store directory {path} is not writable")

    def _open_in_dir(self, name: str, extra_flags: int = 0) -> int:
        """Open ``path/name`` read-write (created 0600), refusing symlinks and foreign files."""
        file_path = os.path.join(self.path, name)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | extra_flags
        try:
            fd = os.open(file_path, flags, 0o600)
        except OSError as exc:
            raise DiskStoreError(
                f"tokenvm: cannot open disk store file {file_path}: {exc.strerror}") from None
        info = os.fstat(fd)
        if info.st_uid != os.geteuid() or not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise DiskStoreError(
                f"tokenvm: disk store file {file_path} is not a regular file owned by uid "
                f"{os.geteuid()}")
        if stat.S_IMODE(info.st_mode) != 0o600:
            os.fchmod(fd, 0o600)  # ours, but readable by others: KV bytes can leak prompts
        return fd

    def _take_lock(self) -> None:
        self._lock_fd = self._open_in_dir("lock")
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DiskStoreError(
                f"tokenvm: disk store directory {self.path} is in use by another DiskStore "
                f"(give each worker / tensor-parallel rank its own path)") from None

    def _probe_o_direct(self) -> bool:
        """One aligned O_DIRECT write + read of a scratch file; False (buffered) if unsupported."""
        flag = getattr(os, "O_DIRECT", 0)
        probe_name = ".o_direct_probe"
        probe_path = os.path.join(self.path, probe_name)
        if flag:
            buf = mmap.mmap(-1, ALIGN)
            buf.write(MAGIC * (ALIGN // len(MAGIC)))
            fd = -1
            try:
                fd = self._open_in_dir(probe_name, flag)
                written = os.pwrite(fd, buf, 0)
                back = mmap.mmap(-1, ALIGN)
                read = os.preadv(fd, [back], 0)
                if written == ALIGN and read == ALIGN and back[:] == buf[:]:
                    return True
            except (OSError, DiskStoreError):
                pass  # EINVAL on tmpfs and some network filesystems
            finally:
                if fd >= 0:
                    os.close(fd)
                try:
                    os.unlink(probe_path)
                except OSError:
                    pass
        logger.warning(
            "TokenVM disk store: %s does not support O_DIRECT; using buffered I/O (the page cache "
            "will also hold disk-tier data)", self.path)
        return False

    def _open_files(self) -> None:
        flags = os.O_DIRECT if self.o_direct else 0
        for i in range(self.num_files):
            first = i * self.slots_per_file
            count = min(self.slots_per_file, self.num_slots - first)
            size = count * self.slot_stride
            fd = self._open_in_dir(f"slots-{i}.bin", flags)
            self._fds.append(fd)
            self._preallocate(fd, size, os.path.join(self.path, f"slots-{i}.bin"))
            if not self.o_direct:
                # Slots are read and written whole, at random; readahead only wastes I/O.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        # Files left by an earlier configuration with more files only waste disk space.
        for name in os.listdir(self.path):
            match = _SLOT_FILE.match(name)
            if match and int(match.group(1)) >= self.num_files:
                logger.info("TokenVM disk store: removing %s (left by an earlier layout)", name)
                os.unlink(os.path.join(self.path, name))

    def _preallocate(self, fd: int, size: int, file_path: str) -> None:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskStoreError(
                    f"tokenvm: not enough disk space for {file_path} ({size} bytes)") from None
            self._warn_once(
                "fallocate", "TokenVM disk store: posix_fallocate failed on %s (%s); using "
                "ftruncate, so the disk can still run full later", file_path, exc.strerror)
        if os.fstat(fd).st_size != size:
            # Grows a sparse file where fallocate is unsupported; shrinks one from a larger layout.
            os.ftruncate(fd, size)

    # -- addressing ----------------------------------------------------------------------------

    def slot_location(self, slot: int) -> tuple[str, int]:
        """(file path, byte offset) of ``slot``'s header. For tests and tools."""
        self._check_slot(slot)
        index, within = divmod(slot, self.slots_per_file)
        return os.path.join(self.path, f"slots-{index}.bin"), within * self.slot_stride

    def _fd_offset(self, slot: int) -> tuple[int, int]:
        index, within = divmod(slot, self.slots_per_file)
        return self._fds[index], within * self.slot_stride

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
        source = _byte_view(payload, self.slot_bytes, writable=False, what="payload")
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
        target = _byte_view(out, self.slot_bytes, writable=True, what="output buffer")
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
            fd, offset = self._fd_offset(slot)
            payload = buf[HEADER_BYTES:HEADER_BYTES + self.slot_bytes]
            np.copyto(payload, source)
            buf[HEADER_BYTES + self.slot_bytes:] = 0  # padding: staging buffers are reused
            header = self._pack_header(slot, key, seq, _CHECKSUMS[self.csum_algo](payload))
            buf[:HEADER_BYTES] = 0
            buf[:len(header)] = np.frombuffer(header, dtype=np.uint8)
            self._pwrite_all(fd, memoryview(buf), offset)  # header + payload: ONE write call
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
            fd, offset = self._fd_offset(slot)
            complete = self._pread_all(fd, memoryview(buf), offset)
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
            fd, offset = self._fd_offset(slot)
            buf[:HEADER_BYTES] = 0
            self._pwrite_all(fd, memoryview(buf)[:HEADER_BYTES], offset)
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

    @staticmethod
    def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
        written = os.pwrite(fd, data, offset)
        while written < len(data):  # short writes are rare (signals, quotas); finish the slot
            more = os.pwrite(fd, data[written:], offset + written)
            if more <= 0:
                raise OSError(errno.EIO, "short write")
            written += more

    @staticmethod
    def _pread_all(fd: int, data: memoryview, offset: int) -> bool:
        """Fill ``data`` from ``offset``; False if the file ends first (truncated)."""
        done = 0
        while done < len(data):
            got = os.preadv(fd, [data[done:]], offset + done)
            if got <= 0:
                return False
            done += got
        return True

    # -- headers --------------------------------------------------------------------------------

    def _pack_header(self, slot: int, key: bytes, seq: int, payload_csum: int) -> bytes:
        body = _FIXED.pack(MAGIC, FORMAT_VERSION, self.csum_algo, 0, self.namespace, slot,
                           self.slot_stride, self.slot_bytes, seq, payload_csum, len(key)) + key
        return body + _CSUM.pack(_CHECKSUMS[self.csum_algo](body))

    def _parse_header(self, raw: np.ndarray, slot: int) -> SlotHeader | None:
        """The header in ``raw`` (at least ``HEADER_BYTES``) if it is valid for this store's
        namespace, layout and ``slot``; None otherwise. Never raises on bad bytes."""
        data = raw[:HEADER_BYTES].tobytes()
        (magic, version, algo, _reserved, namespace, slot_index, stride, payload_len, seq,
         payload_csum, key_len) = _FIXED.unpack_from(data)
        if magic != MAGIC or version != FORMAT_VERSION or key_len > MAX_KEY_BYTES:
            return None
        checksum = _CHECKSUMS.get(algo)
        if checksum is None:
            self._warn_once(f"algo{algo}", "TokenVM disk store: %s has slots checksummed with "
                            "algorithm %d, unknown to this version; "
                            "they read as misses", self.path, algo)
            return None
        end = _FIXED.size + key_len
        (header_csum,) = _CSUM.unpack_from(data, end)
        if checksum(data[:end]) != header_csum:
            return None
        if (namespace != self.namespace or slot_index != slot or stride != self.slot_stride
                or payload_len != self.slot_bytes):
            return None
        return SlotHeader(key=data[_FIXED.size:end], seq=seq, payload_len=payload_len,
                          payload_csum=payload_csum, csum_algo=algo)

    def _verify(self, buf: np.ndarray, slot: int, key: bytes) -> bool:
        header = self._parse_header(buf, slot)
        if header is None or header.key != key:
            return False
        payload = buf[HEADER_BYTES:HEADER_BYTES + header.payload_len]
        return _CHECKSUMS[header.csum_algo](payload) == header.payload_csum

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
        # A slot that does not fit in its (truncated) file cannot be read back; skip it now.
        sizes = [os.fstat(fd).st_size for fd in self._fds]
        for part in self._executor.map(
                lambda c: self._scan_range(*c, sizes, verify_payload), chunks):
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
        return result

    def _scan_range(self, lo: int, hi: int, sizes: list[int],
                    verify_payload: bool) -> list[tuple[int, int, bytes]]:
        found: list[tuple[int, int, bytes]] = []
        buf = self._staging.get()
        try:
            view = memoryview(buf) if verify_payload else memoryview(buf)[:HEADER_BYTES]
            for slot in range(lo, hi):
                fd, offset = self._fd_offset(slot)
                if offset + self.slot_stride > sizes[slot // self.slots_per_file]:
                    continue
                try:
                    if not self._pread_all(fd, view, offset):
                        continue
                except OSError as exc:
                    self._record_error("scan", slot, exc)
                    continue
                header = self._parse_header(buf, slot)
                if header is None:
                    continue
                if verify_payload and not self._verify(buf, slot, header.key):
                    continue
                found.append((header.seq, slot, header.key))
        finally:
            self._staging.put(buf)
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
                "o_direct": self.o_direct, "checksum": _CSUM_NAMES[self.csum_algo],
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
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = -1

    def __enter__(self) -> DiskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- read-only inspection (for tools: ``tokenvm inspect``) ---------------------------------------


@dataclass(frozen=True)
class StoreSummary:
    """What ``inspect_store`` found in a store directory: a snapshot, taken without writing.

    ``used_slots`` counts headers that a ``DiskStore`` opened with the same ``slot_bytes`` and the
    matching namespace would accept at ``scan`` (magic, version, header checksum, slot index and
    stride all consistent with where the header sits). Payloads are not read unless asked for.
    """

    path: str
    files: tuple[tuple[str, int], ...]
    """(file name, size in bytes) of every ``slots-N.bin``, in slot order."""
    file_bytes: int
    """Sum of the slot files' sizes."""
    allocated_bytes: int
    """Bytes the filesystem has really allocated for them (less than file_bytes when sparse)."""
    slot_bytes: int | None
    """Payload bytes per slot; None when no valid header revealed the layout."""
    slot_stride: int | None
    """Header + padded payload; None when the layout is unknown."""
    num_slots: int
    """Whole slots the files hold with that stride (0 when the layout is unknown)."""
    used_slots: int
    """Slots with a valid header for the layout (``scan`` would find them)."""
    blocks_by_namespace: dict[bytes, int]
    """16-byte namespace fingerprint -> used slots holding a block of that namespace."""
    duplicate_slots: int
    """Used slots whose (namespace, key) a slot with a higher sequence number also holds."""
    stale_headers: int
    """Valid headers at offsets of another layout (left by an earlier ``slot_bytes``); ignored."""
    unverifiable_headers: int
    """Headers checksummed with an algorithm this version does not know (another version's)."""
    bad_payloads: int | None
    """Used slots whose payload checksum failed; None unless ``verify_payloads`` was given."""
    checksums: dict[str, int]
    """Checksum algorithm name -> used slots."""
    locked_by_pid: int | None
    """Pid holding the store's ``flock`` (a running DiskStore), when /proc/locks shows it."""
    fs_total_bytes: int
    fs_free_bytes: int


@dataclass(frozen=True)
class _RawHeader:
    namespace: bytes
    slot: int
    stride: int
    payload_len: int
    seq: int
    payload_csum: int
    algo: int
    key: bytes


def _decode_header(data: bytes) -> _RawHeader | None:
    """The fields of a header whose magic, version and own checksum verify; None otherwise.

    A header checksummed with an algorithm unavailable here is returned unverified, with its
    ``algo``; callers must not trust its other fields (``algo not in _CHECKSUMS``).
    """
    if len(data) < HEADER_BYTES or data[:len(MAGIC)] != MAGIC:
        return None
    (magic, version, algo, _reserved, namespace, slot, stride, payload_len, seq, payload_csum,
     key_len) = _FIXED.unpack_from(data)
    if magic != MAGIC or version != FORMAT_VERSION or key_len > MAX_KEY_BYTES:
        return None
    end = _FIXED.size + key_len
    checksum = _CHECKSUMS.get(algo)
    if checksum is not None and checksum(data[:end]) != _CSUM.unpack_from(data, end)[0]:
        return None
    return _RawHeader(namespace=namespace, slot=slot, stride=stride, payload_len=payload_len,
                      seq=seq, payload_csum=payload_csum, algo=algo, key=data[_FIXED.size:end])


def _lock_holder(lock_path: str) -> int | None:
    """Pid holding an flock on ``lock_path`` according to /proc/locks (Linux); None if unknown."""
    try:
        info = os.stat(lock_path)
        with open("/proc/locks") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == wanted:
            try:
                return int(parts[4])
            except ValueError:
                return None
    return None


def inspect_store(path: str, *, verify_payloads: bool = False) -> StoreSummary:
    """Summarise the DiskStore directory ``path`` without modifying anything.

    Opens the slot files read-only, takes no lock (a running engine may keep writing; a header
    torn by a concurrent write simply fails its checksum) and creates no file. The layout
    (``slot_bytes``, stride) is taken from the newest valid header at the start of a slot file,
    else from the first valid header found walking the files page by page. With
    ``verify_payloads`` every used slot's payload is read and checksummed too.

    Raises ``DiskStoreError`` (one line, naming the path) when ``path`` does not exist, is not a
    directory or holds no ``slots-N.bin`` file; never on bad slot contents.
    """
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise DiskStoreError(f"tokenvm: disk store path {path} does not exist")
    if not os.path.isdir(path):
        raise DiskStoreError(f"tokenvm: disk store path {path} is not a directory")
    try:
        names = os.listdir(path)
    except OSError as exc:
        raise DiskStoreError(f"tokenvm: cannot list disk store {path}: {exc.strerror}") from None
    indexed = sorted((int(m.group(1)), name) for name in names
                     if (m := _SLOT_FILE.match(name)) is not None)
    if not indexed:
        raise DiskStoreError(
            f"tokenvm: {path} holds no TokenVM disk store (no slots-N.bin files)")
    fds: list[int] = []
    try:
        sizes: list[int] = []
        allocated = 0
        for _index, name in indexed:
            file_path = os.path.join(path, name)
            try:
                fd = os.open(file_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as exc:
                raise DiskStoreError(
                    f"tokenvm: cannot open disk store file {file_path}: {exc.strerror}") from None
            fds.append(fd)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise DiskStoreError(f"tokenvm: disk store file {file_path} is not a regular file")
            sizes.append(info.st_size)
            allocated += info.st_blocks * 512
        layout = _find_layout(fds, sizes)
        counts = _count_slots(fds, sizes, layout, verify_payloads)
    finally:
        for fd in fds:
            os.close(fd)
    usage = shutil.disk_usage(path)
    stride, slot_bytes = layout if layout is not None else (None, None)
    return StoreSummary(
        path=path, files=tuple((name, size) for (_i, name), size in zip(indexed, sizes,
                                                                         strict=True)),
        file_bytes=sum(sizes), allocated_bytes=allocated, slot_bytes=slot_bytes,
        slot_stride=stride, num_slots=sum(size // stride for size in sizes) if stride else 0,
        locked_by_pid=_lock_holder(os.path.join(path, "lock")),
        fs_total_bytes=usage.total, fs_free_bytes=usage.free, **counts)


def _find_layout(fds: list[int], sizes: list[int]) -> tuple[int, int] | None:
    """(stride, slot_bytes) of the newest valid header at a file start, else of the first one
    found walking the files page by page; None when the files hold no valid header."""
    found: list[tuple[int, int, int]] = []  # (seq, stride, payload_len)
    for fd, size in zip(fds, sizes, strict=True):
        if size >= HEADER_BYTES:
            header = _decode_header(os.pread(fd, HEADER_BYTES, 0))
            if header is not None and header.algo in _CHECKSUMS and header.stride > 0:
                found.append((header.seq, header.stride, header.payload_len))
    if found:
        _seq, stride, payload_len = max(found)
        return stride, payload_len
    chunk = 256 * ALIGN
    for fd, size in zip(fds, sizes, strict=True):
        for base in range(0, size - HEADER_BYTES + 1, chunk):
            data = os.pread(fd, chunk + HEADER_BYTES, base)
            for page in range(0, min(chunk, len(data) - HEADER_BYTES + 1), ALIGN):
                if data[page:page + len(MAGIC)] != MAGIC:
                    continue
                header = _decode_header(data[page:page + HEADER_BYTES])
                if (header is not None and header.algo in _CHECKSUMS and header.stride > 0
                        and (base + page) % header.stride == 0):
                    return header.stride, header.payload_len
    return None


def _count_slots(fds: list[int], sizes: list[int], layout: tuple[int, int] | None,
                 verify_payloads: bool) -> dict[str, Any]:
    """The per-slot counts of ``StoreSummary`` for ``layout`` (see there)."""
    by_namespace: dict[bytes, int] = {}
    checksums: dict[str, int] = {}
    claims: dict[tuple[bytes, bytes], int] = {}
    used = stale = unverifiable = bad = 0
    if layout is not None:
        stride, slot_bytes = layout
        slots_per_file = sizes[0] // stride
        for index, (fd, size) in enumerate(zip(fds, sizes, strict=True)):
            for within in range(size // stride):
                data = os.pread(fd, stride if verify_payloads else HEADER_BYTES, within * stride)
                header = _decode_header(data)
                if header is None:
                    continue
                if header.algo not in _CHECKSUMS:
                    unverifiable += 1
                    continue
                if (header.slot != index * slots_per_file + within or header.stride != stride
                        or header.payload_len != slot_bytes):
                    stale += 1
                    continue
                used += 1
                by_namespace[header.namespace] = by_namespace.get(header.namespace, 0) + 1
                name = _CSUM_NAMES[header.algo]
                checksums[name] = checksums.get(name, 0) + 1
                claim = (header.namespace, header.key)
                claims[claim] = claims.get(claim, 0) + 1
                if verify_payloads:
                    payload = data[HEADER_BYTES:HEADER_BYTES + header.payload_len]
                    if _CHECKSUMS[header.algo](payload) != header.payload_csum:
                        bad += 1
    return {"used_slots": used, "blocks_by_namespace": by_namespace,
            "duplicate_slots": sum(n - 1 for n in claims.values()), "stale_headers": stale,
            "unverifiable_headers": unverifiable, "bad_payloads": bad if verify_payloads else None,
            "checksums": checksums}
