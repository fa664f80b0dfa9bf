"""The slot files of one store directory: lock, O_DIRECT probe, preallocation, addressing.

``path/`` (mode 0700, checked) holds ``slots-0.bin`` ... ``slots-{n-1}.bin`` (mode 0600,
preallocated with ``posix_fallocate``) and a ``lock`` file (an exclusive ``flock`` so two processes,
e.g. two tensor-parallel ranks given the same path, cannot share a store). Slots are numbered
``0 .. num_slots-1`` and laid out contiguously, ``slots_per_file`` per file, ``stride`` bytes each.
No vLLM or torch imports.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os

from tokenvm_vllm.tiers.disk import fsutil
from tokenvm_vllm.tiers.disk.format import SLOT_FILE
from tokenvm_vllm.tiers.disk.fsutil import DiskStoreError

logger = logging.getLogger("vllm.tokenvm")


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
        for i in range(self.num_files):
            fd = fsutil.open_in_dir(self.path, f"slots-{i}.bin", flags)
            self.fds.append(fd)
            self._preallocate(fd, self.file_size(i), os.path.join(self.path, f"slots-{i}.bin"))
            if not self.o_direct:
                # Slots are read and written whole, at random; readahead only wastes I/O.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        # Files left by an earlier configuration with more files only waste disk space.
        for name in os.listdir(self.path):
            match = SLOT_FILE.match(name)
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
