"""Filesystem probes and safe opening for the disk tier, shared by ``DiskStore`` and
``tokenvm doctor`` so both apply the same rules: a store directory must be a real directory owned
by this user and not writable by others; files are opened without following symlinks and must be
regular files owned by this user; O_DIRECT is probed by an aligned write and read-back.
No vLLM or torch imports.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import stat
import tempfile
import time

from tokenvm_vllm.tiers.disk.format import ALIGN, MAGIC

RAM_FILESYSTEMS = ("tmpfs", "ramfs", "devtmpfs")


class DiskStoreError(RuntimeError):
    """Setup failed (bad path, permissions, size, in use): one line, names the path."""


def directory_problem(path: str) -> str | None:
    """Why ``path`` (an existing directory) must not hold a store, or None when it may.

    Refused: not a directory (a symlink to one is followed here, as ``os.stat`` does; the files
    inside are never opened through symlinks), owned by another uid, group- or world-writable
    (another user could swap files in), or not writable and searchable by this process.
    """
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        return f"disk store path {path} exists and is not a directory"
    if info.st_uid != os.geteuid():
        return (f"disk store directory {path} is owned by uid {info.st_uid}, not by this process "
                f"(uid {os.geteuid()}); refusing to store KV data there")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"disk store directory {path} is group- or world-writable (mode "
                f"{stat.S_IMODE(info.st_mode):o}); chmod 700 it or choose another path")
    if not os.access(path, os.W_OK | os.X_OK):
        return f"disk store directory {path} is not writable"
    return None


def prepare_directory(path: str) -> None:
    """Create ``path`` (mode 0700, parents as needed) unless it exists, then check it.

    Raises ``DiskStoreError`` with ``directory_problem``'s reason.
    """
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
    problem = directory_problem(path)
    if problem is not None:
        raise DiskStoreError(f"tokenvm: {problem}")


def open_in_dir(directory: str, name: str, extra_flags: int = 0) -> int:
    """Open ``directory/name`` read-write (created 0600), refusing symlinks and foreign files.

    A file of ours with a looser mode is tightened to 0600 (KV bytes can leak prompts).
    """
    file_path = os.path.join(directory, name)
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | extra_flags
    try:
        fd = os.open(file_path, flags, 0o600)
    except OSError as exc:
        raise DiskStoreError(
            f"tokenvm: cannot open disk store file {file_path}: {exc.strerror} (symlinks and "
            f"non-files are refused); remove it or choose another disk_path") from None
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise DiskStoreError(
            f"tokenvm: disk store file {file_path} is not a regular file owned by uid "
            f"{os.geteuid()}; remove it or choose another disk_path")
    if stat.S_IMODE(info.st_mode) != 0o600:
        os.fchmod(fd, 0o600)
    return fd


def probe_o_direct(directory: str) -> tuple[bool, str]:
    """(supported, detail): one aligned O_DIRECT write + read-back of a temporary file.

    The file is created with ``mkstemp`` (0600, a fresh name, never a symlink) and removed again.
    Unsupported on tmpfs and some network filesystems (EINVAL).
    """
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False, "this platform has no O_DIRECT"
    try:
        handle, probe = tempfile.mkstemp(prefix=".tokenvm-o-direct-", dir=directory)
    except OSError as exc:
        return False, f"cannot create a probe file: {exc.strerror or exc}"
    os.close(handle)
    fd = -1
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | flag)
        data = mmap.mmap(-1, ALIGN)  # page aligned, as O_DIRECT needs
        data.write(MAGIC * (ALIGN // len(MAGIC)))
        back = mmap.mmap(-1, ALIGN)
        start = time.perf_counter()
        written = os.pwrite(fd, data, 0)
        read = os.preadv(fd, [back], 0)
        elapsed = time.perf_counter() - start
        if written != ALIGN or read != ALIGN or back[:] != data[:]:
            return False, "aligned write/read-back returned wrong data"
        return True, f"aligned {ALIGN}-byte write + read-back in {elapsed * 1e3:.2f} ms"
    except OSError as exc:
        return False, f"{exc.strerror or exc}"
    finally:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(probe)
        except OSError:
            pass


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer can still allocate on the filesystem holding ``path``."""
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


def disk_usage(path: str) -> tuple[int, int]:
    """(total, free) bytes of the filesystem holding ``path``."""
    usage = shutil.disk_usage(path)
    return usage.total, usage.free


def mount_of(path: str) -> tuple[str, str] | None:
    """(mount point, filesystem type) of the mount holding ``path``, from /proc/mounts."""
    real = os.path.realpath(path)
    best: tuple[str, str] | None = None
    try:
        with open("/proc/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].encode().decode("unicode_escape")  # '\040' for spaces
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) >= len(best[0])):
            best = (mount, parts[2])
    return best


def lock_holder(lock_path: str) -> int | None:
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


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset``; short writes are continued, a zero write is EIO."""
    written = os.pwrite(fd, data, offset)
    while written < len(data):  # short writes are rare (signals, quotas); finish the slot
        more = os.pwrite(fd, data[written:], offset + written)
        if more <= 0:
            raise OSError(errno.EIO, "short write")
        written += more


def pread_all(fd: int, data: memoryview, offset: int) -> bool:
    """Fill ``data`` from ``offset``; False if the file ends first (truncated)."""
    done = 0
    while done < len(data):
        got = os.preadv(fd, [data[done:]], offset + done)
        if got <= 0:
            return False
        done += got
    return True
