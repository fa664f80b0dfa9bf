"""The on-disk slot format: constants, checksums and the ONE header encoder/decoder.

Every slot is ``[ header: 4096 bytes ][ payload: slot_bytes, zero-padded to a multiple of 4096 ]``.
The header (little endian) is ``_FIXED`` below followed by the key bytes and an 8-byte header
checksum over everything before it. It records the magic, the format version, the checksum
algorithm (xxh3_64, from the required ``xxhash`` package), the 16-byte namespace fingerprint,
the slot's own index and stride (so a header read at an offset that belongs to another layout,
e.g. after ``slot_bytes`` changed, is rejected), the payload length, a sequence number and the
payload checksum. All fixed fields sit in the first 512-byte sector.

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

Both the store (``store.py``) and read-only inspection (``inspect.py``) decode headers with
``decode_header``; the checks that depend on who reads (namespace, expected slot and layout) are
theirs. No vLLM or torch imports.
"""

from __future__ import annotations

import re
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

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

SLOT_FILE = re.compile(r"^slots-(\d+)\.bin$")
"""Names of the slot files in a store directory; group 1 is the file index."""


def _xxh3_64(data: Any) -> int:
    return int(xxhash.xxh3_64_intdigest(data))


CHECKSUMS: dict[int, Callable[[Any], int]] = {CSUM_XXH3_64: _xxh3_64}
"""Checksum algorithm id -> function over a bytes-like object (the algorithms this version
knows; a slot with another id reads as a miss)."""
DEFAULT_CSUM = CSUM_XXH3_64
"""Algorithm new stores write with (read at store creation, so tests may patch it here)."""
CSUM_NAMES = {CSUM_XXH3_64: "xxh3_64"}


def round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def slot_stride(slot_bytes: int) -> int:
    """Bytes one slot takes on disk: the header plus the payload padded to ``ALIGN``."""
    return HEADER_BYTES + round_up(slot_bytes, ALIGN)


def disk_slot_count(capacity_bytes: int, slot_bytes: int) -> int:
    """Slots a ``DiskStore`` of ``capacity_bytes`` holds (the scheduler sizes its tier with it)."""
    return capacity_bytes // slot_stride(slot_bytes)


@dataclass(frozen=True)
class SlotHeader:
    """The fields of one slot header. Only ``decode_header`` and ``encode_header`` build them."""

    namespace: bytes
    slot: int
    stride: int
    payload_len: int
    seq: int
    payload_csum: int
    algo: int
    key: bytes

    @property
    def verifiable(self) -> bool:
        """Whether this process has the header's checksum algorithm. When False, the header's
        own checksum was NOT verified and no field but ``algo`` may be trusted."""
        return self.algo in CHECKSUMS


def encode_header(header: SlotHeader) -> bytes:
    """The header's bytes (shorter than ``HEADER_BYTES``; the writer zero-pads the rest)."""
    body = _FIXED.pack(MAGIC, FORMAT_VERSION, header.algo, 0, header.namespace, header.slot,
                       header.stride, header.payload_len, header.seq, header.payload_csum,
                       len(header.key)) + header.key
    return body + _CSUM.pack(CHECKSUMS[header.algo](body))


def header_prefix(algo: int, namespace: bytes, slot: int, stride: int, payload_len: int) -> bytes:
    """The bytes every header with these fields starts with (magic, version, ``algo``, the
    reserved byte as ``encode_header`` writes it, namespace, slot, stride, payload length), for
    a reader that expects exactly these fields to compare a header against without decoding
    it; ``PREFIX_TAIL`` (sequence number, payload checksum, key length) follows it."""
    return _FIXED.pack(MAGIC, FORMAT_VERSION, algo, 0, namespace, slot, stride, payload_len,
                       0, 0, 0)[:_FIXED.size - PREFIX_TAIL.size]


PREFIX_TAIL = struct.Struct("<QQH")
"""The header's last fixed fields after ``header_prefix``: sequence number, payload checksum,
key length (the key and the header's own checksum, ``HEADER_CSUM``, follow)."""
HEADER_CSUM = _CSUM
"""The header's own checksum field (after the key)."""


def decode_header(data: bytes) -> SlotHeader | None:
    """The header in ``data`` (at least ``HEADER_BYTES``) if its magic, version and own checksum
    verify; None otherwise. Never raises on bad bytes.

    A header checksummed with an algorithm unavailable here is returned unverified (see
    ``SlotHeader.verifiable``) so callers can say why they cannot use it.
    """
    if len(data) < HEADER_BYTES or data[:len(MAGIC)] != MAGIC:
        return None
    (magic, version, algo, _reserved, namespace, slot, stride, payload_len, seq, payload_csum,
     key_len) = _FIXED.unpack_from(data)
    if magic != MAGIC or version != FORMAT_VERSION or key_len > MAX_KEY_BYTES:
        return None
    end = _FIXED.size + key_len
    checksum = CHECKSUMS.get(algo)
    if checksum is not None and checksum(data[:end]) != _CSUM.unpack_from(data, end)[0]:
        return None
    return SlotHeader(namespace=namespace, slot=slot, stride=stride, payload_len=payload_len,
                      seq=seq, payload_csum=payload_csum, algo=algo,
                      key=bytes(data[_FIXED.size:end]))


def byte_view(obj: Any, nbytes: int, writable: bool, what: str) -> np.ndarray:
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
        array: np.ndarray = tensor.numpy()
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
