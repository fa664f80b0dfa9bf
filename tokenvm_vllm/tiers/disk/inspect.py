"""Read-only inspection of a disk store directory (for ``tokenvm inspect`` and ``doctor``).

Opens slot files read-only, takes no lock and creates nothing, so it works while an engine uses
the store. Headers are decoded with the store's own decoder (``format.decode_header``).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any

from tokenvm_vllm.tiers.disk.format import (
    ALIGN,
    CHECKSUMS,
    CSUM_NAMES,
    HEADER_BYTES,
    MAGIC,
    SLOT_FILE,
    decode_header,
)
from tokenvm_vllm.tiers.disk.fsutil import DiskStoreError, disk_usage, lock_holder


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
                     if (m := SLOT_FILE.match(name)) is not None)
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
    fs_total, fs_free = disk_usage(path)
    stride, slot_bytes = layout if layout is not None else (None, None)
    return StoreSummary(
        path=path, files=tuple((name, size) for (_i, name), size in zip(indexed, sizes,
                                                                         strict=True)),
        file_bytes=sum(sizes), allocated_bytes=allocated, slot_bytes=slot_bytes,
        slot_stride=stride, num_slots=sum(size // stride for size in sizes) if stride else 0,
        locked_by_pid=lock_holder(os.path.join(path, "lock")),
        fs_total_bytes=fs_total, fs_free_bytes=fs_free, **counts)


def _find_layout(fds: list[int], sizes: list[int]) -> tuple[int, int] | None:
    """(stride, slot_bytes) of the newest valid header at a file start, else of the first one
    found walking the files page by page; None when the files hold no valid header."""
    found: list[tuple[int, int, int]] = []  # (seq, stride, payload_len)
    for fd, size in zip(fds, sizes, strict=True):
        if size >= HEADER_BYTES:
            header = decode_header(os.pread(fd, HEADER_BYTES, 0))
            if header is not None and header.verifiable and header.stride > 0:
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
                header = decode_header(data[page:page + HEADER_BYTES])
                if (header is not None and header.verifiable and header.stride > 0
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
                header = decode_header(data)
                if header is None:
                    continue
                if not header.verifiable:
                    unverifiable += 1
                    continue
                if (header.slot != index * slots_per_file + within or header.stride != stride
                        or header.payload_len != slot_bytes):
                    stale += 1
                    continue
                used += 1
                by_namespace[header.namespace] = by_namespace.get(header.namespace, 0) + 1
                name = CSUM_NAMES[header.algo]
                checksums[name] = checksums.get(name, 0) + 1
                claim = (header.namespace, header.key)
                claims[claim] = claims.get(claim, 0) + 1
                if verify_payloads:
                    payload = data[HEADER_BYTES:HEADER_BYTES + header.payload_len]
                    if CHECKSUMS[header.algo](payload) != header.payload_csum:
                        bad += 1
    return {"used_slots": used, "blocks_by_namespace": by_namespace,
            "duplicate_slots": sum(n - 1 for n in claims.values()), "stale_headers": stale,
            "unverifiable_headers": unverifiable, "bad_payloads": bad if verify_payloads else None,
            "checksums": checksums}
