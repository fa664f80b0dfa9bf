"""The slot files of one store directory: lock, O_DIRECT probe, preallocation, addressing.

``path/`` (mode 0700, checked) holds ``slots-0.bin`` ... ``slots-{n-1}.bin`` (mode 0600,
preallocated with ``posix_fallocate``) and a ``lock`` file (an exclusive ``flock`` so two processes,
e.g. two tensor-parallel ranks given the same path, cannot share a store). Slots are numbered
``0 .. num_slots-1`` and laid out contiguously, ``slots_per_file`` per file, ``stride`` bytes each.

``namespace.json`` maps each namespace fingerprint that wrote here to its fields (model, dtype,
block size, hash seed...). Slots never depend on it (the fingerprint in each header decides); it
only lets a restart say WHICH setting differs when it skips another namespace's slots.
No vLLM or torch imports.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import stat
from collections.abc import Mapping
from typing import Any

from tokenvm_vllm.tiers.disk import fsutil
from tokenvm_vllm.tiers.disk.format import SLOT_FILE
from tokenvm_vllm.tiers.disk.fsutil import DiskStoreError

logger = logging.getLogger("vllm.tokenvm")

NAMESPACE_FILE = "namespace.json"
MAX_MANIFEST_NAMESPACES = 32


class SlotFiles:
    """Open (creating and preallocating as needed) the slot files of a store at ``path``.

    Raises ``DiskStoreError`` (one line, naming the path) when the directory or the files cannot
    be set up safely; nothing stays open then. ``close`` releases the files and the lock.
    """

    def __init__(self, path: str, num_slots: int, stride: int, num_files: int) -> None:
        self.path = path
        self.num_slots = num_slots
        self.stride = stride
        self.slots_per_file = -(-num_slots // min(num_files, num_slots))
        # Recompute so no file is empty (e.g. 5 slots over 4 files -> 2+2+1, 3 files).
        self.num_files = -(-num_slots // self.slots_per_file)
        self.fds: list[int] = []
        self._lock_fd = -1
        self.o_direct = False
        self._fallocate_warned = False
        try:
            fsutil.prepare_directory(path)
            self._take_lock()
            self.o_direct = self._probe_o_direct()
            self._open_files()
        except BaseException:
            self.close()
            raise

    def _take_lock(self) -> None:
        self._lock_fd = fsutil.open_in_dir(self.path, "lock")
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DiskStoreError(
                f"tokenvm: disk store directory {self.path} is in use by another DiskStore "
                f"(give each worker / tensor-parallel rank its own path)") from None

    def _probe_o_direct(self) -> bool:
        supported, detail = fsutil.probe_o_direct(self.path)
        if not supported:
            logger.warning(
                "TokenVM disk store: %s does not support O_DIRECT (%s); using buffered I/O (the "
                "page cache will also hold disk-tier data)", self.path, detail)
        return supported

    def file_size(self, index: int) -> int:
        """Bytes file ``index`` must have: its slots times the stride."""
        first = index * self.slots_per_file
        return min(self.slots_per_file, self.num_slots - first) * self.stride

    def _open_files(self) -> None:
        flags = os.O_DIRECT if self.o_direct else 0
        names = [f"slots-{i}.bin" for i in range(self.num_files)]
        # What earlier runs left (name -> size): kept as it was if this start fails.
        before = {name: os.lstat(os.path.join(self.path, name)).st_size for name in names
                  if os.path.lexists(os.path.join(self.path, name))}
        self._check_free_space(names)
        try:
            for i, name in enumerate(names):
                fd = fsutil.open_in_dir(self.path, name, flags)
                self.fds.append(fd)
                self._preallocate(fd, self.file_size(i), os.path.join(self.path, name))
                if not self.o_direct:
                    # Slots are read and written whole, at random; readahead only wastes I/O.
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        except BaseException:
            self._undo_allocation(names[:len(self.fds)], before)
            raise
        # Files left by an earlier configuration with more files only waste disk space.
        for name in os.listdir(self.path):
            match = SLOT_FILE.match(name)
            if match and int(match.group(1)) >= self.num_files:
                logger.info("TokenVM disk store: removing %s (left by an earlier layout)", name)
                os.unlink(os.path.join(self.path, name))

    def _check_free_space(self, names: list[str]) -> None:
        """Refuse before allocating anything when the filesystem cannot hold the files (what
        they already have allocated counts as available: a restart needs no new space)."""
        missing = 0
        for i, name in enumerate(names):
            try:
                allocated = os.lstat(os.path.join(self.path, name)).st_blocks * 512
            except FileNotFoundError:
                allocated = 0
            missing += max(0, self.file_size(i) - allocated)
        free = fsutil.free_bytes(self.path)
        if missing > free:
            total = self.num_slots * self.stride
            raise DiskStoreError(
                f"tokenvm: disk_bytes={total} ({total / 2**30:.2f} GiB) needs {missing} more "
                f"bytes at {self.path} but its filesystem has {free} bytes "
                f"({free / 2**30:.2f} GiB) free; lower disk_bytes or free space there")

    def _undo_allocation(self, names: list[str], before: dict[str, int]) -> None:
        """Give back what this start allocated: remove files it created, shrink files an
        earlier run left back to their earlier size (their slots keep what was stored)."""
        self.close()
        for name in names:
            file_path = os.path.join(self.path, name)
            try:
                if name in before:
                    fd = os.open(file_path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                    try:
                        if os.fstat(fd).st_size > before[name]:
                            os.ftruncate(fd, before[name])
                    finally:
                        os.close(fd)
                else:
                    os.unlink(file_path)
            except OSError as exc:
                logger.warning("TokenVM disk store: could not give back %s: %s", file_path, exc)
        kept = ", ".join(sorted(before)) or "none"
        logger.warning(
            "TokenVM disk store: removed what this start allocated in %s; files of earlier runs "
            "kept with their blocks: %s", self.path, kept)

    def _preallocate(self, fd: int, size: int, file_path: str) -> None:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                free = fsutil.free_bytes(self.path)
                raise DiskStoreError(
                    f"tokenvm: ran out of disk space ({errno.errorcode[exc.errno]}) allocating "
                    f"{file_path} ({size} bytes; {free} bytes free now); this start's "
                    f"allocations were removed, earlier runs' blocks kept; lower disk_bytes or "
                    f"free space") from None
            if not self._fallocate_warned:  # once per store: every file fails the same way
                self._fallocate_warned = True
                logger.warning(
                    "TokenVM disk store: posix_fallocate failed on %s (%s); using ftruncate, so "
                    "the disk can still run full later", file_path, exc.strerror)
        if os.fstat(fd).st_size != size:
            # Grows a sparse file where fallocate is unsupported; shrinks one from a larger layout.
            os.ftruncate(fd, size)

    def location(self, slot: int) -> tuple[str, int]:
        """(file path, byte offset) of ``slot``'s header."""
        index, within = divmod(slot, self.slots_per_file)
        return os.path.join(self.path, f"slots-{index}.bin"), within * self.stride

    def fd_offset(self, slot: int) -> tuple[int, int]:
        """(open file descriptor, byte offset) of ``slot``'s header."""
        index, within = divmod(slot, self.slots_per_file)
        return self.fds[index], within * self.stride

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = -1

    def read_namespaces(self) -> dict[str, dict[str, Any]]:
        """fingerprint hex -> namespace fields, from ``namespace.json``; {} if absent or bad."""
        file_path = os.path.join(self.path, NAMESPACE_FILE)
        try:
            fd = os.open(file_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return {}
        try:
            info = os.fstat(fd)
            if info.st_uid != os.geteuid() or not stat.S_ISREG(info.st_mode):
                return {}
            data = json.loads(os.read(fd, 1 << 20))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}
        finally:
            os.close(fd)

    def record_namespace(self, fingerprint: bytes, fields: Mapping[str, Any]) -> None:
        """Add this run's namespace to ``namespace.json`` (atomically: write, then rename)."""
        known = self.read_namespaces()
        known.pop(fingerprint.hex(), None)
        known[fingerprint.hex()] = dict(fields)  # newest last; the oldest are dropped
        known = dict(list(known.items())[-MAX_MANIFEST_NAMESPACES:])
        tmp = NAMESPACE_FILE + ".tmp"
        try:
            fd = fsutil.open_in_dir(self.path, tmp)
            try:
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(known, indent=1, default=str).encode())
            finally:
                os.close(fd)
            os.replace(os.path.join(self.path, tmp), os.path.join(self.path, NAMESPACE_FILE))
        except (OSError, DiskStoreError) as exc:  # only diagnostics are lost
            logger.warning("TokenVM disk store: cannot record the namespace in %s: %s",
                           self.path, exc)


def namespace_difference(stored: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str:
    """Which namespace fields differ, for a log line; what to do for a hash seed change."""
    if stored is None:
        return "written by a run whose settings were not recorded"
    diffs = [key for key in current if stored.get(key) != current[key]]
    if not diffs:
        return "same recorded settings but another fingerprint (another TokenVM version?)"
    text = ", ".join(f"{key} {stored.get(key)!r} -> now {current[key]!r}" for key in diffs)
    if "hash_seed" in diffs:
        seed = stored.get("hash_seed")
        text += (f"; set PYTHONHASHSEED={seed} to reuse them" if seed != "random" else
                 "; the earlier run had no PYTHONHASHSEED, so its blocks cannot be found again")
    return text
