"""A block's value in Redis: the disk tier's slot header, zero-padded to ``HEADER_BYTES``, then
the block's bytes.

The header is the disk slot format's (one encoder/decoder for both tiers): key echo, namespace
fingerprint, payload length and checksum, all under the header's own checksum. Remote values use
its fields as: ``slot`` = the tensor-parallel rank, ``stride`` = 0, ``seq`` = the writer's
wall-clock time in ns (``tokenvm inspect`` shows ages).

A value is served only if its header decodes, names this namespace, rank and block key, its
payload has the expected length and matches the checksum; anything else (another version, a
torn or foreign value, bit rot) is a miss, and the store deletes it.

The store's hot path uses ``encode_value_iov`` (no 4 KiB padded header built per block) and
``HeaderCheck`` (a header compared against the expected bytes without decoding it, falling back
to ``check_header`` on any difference, so both accept exactly the same headers).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from tokenvm_vllm.keys import BlockKey
from tokenvm_vllm.tiers.disk.format import (
    CHECKSUMS,
    DEFAULT_CSUM,
    HEADER_BYTES,
    HEADER_CSUM,
    PREFIX_TAIL,
    SlotHeader,
    decode_header,
    encode_header,
    header_prefix,
)

REMOTE_STRIDE = 0
"""The header's ``stride`` field in remote values (disk slots have their real stride there)."""


_PAD = memoryview(bytes(HEADER_BYTES))
"""Zeros, shared read-only by every value's header padding (never written)."""


def encode_value_iov(namespace: bytes, tp_rank: int, key: BlockKey,
                     payload: Any) -> tuple[bytes, memoryview, memoryview]:
    """The value as three buffers, sent one after another: the encoded header (short), its zero
    padding up to ``HEADER_BYTES`` (a view of one shared buffer), the payload (not copied).
    ``payload``: any C-contiguous buffer (a host-pool row as numpy, bytes, memoryview)."""
    data = memoryview(payload).cast("B")
    header = encode_header(SlotHeader(
        namespace=namespace, slot=tp_rank, stride=REMOTE_STRIDE, payload_len=data.nbytes,
        seq=time.time_ns(), payload_csum=CHECKSUMS[DEFAULT_CSUM](data), algo=DEFAULT_CSUM,
        key=bytes(key)))
    return header, _PAD[:HEADER_BYTES - len(header)], data


def encode_value_parts(namespace: bytes, tp_rank: int, key: BlockKey,
                       payload: Any) -> tuple[bytes, memoryview]:
    """The value as (zero-padded header of ``HEADER_BYTES``, the payload itself, not copied).
    ``payload``: any C-contiguous buffer (a host-pool row as numpy, bytes, memoryview)."""
    header, padding, data = encode_value_iov(namespace, tp_rank, key, payload)
    return header + padding, data


def encode_value(namespace: bytes, tp_rank: int, key: BlockKey, payload: Any) -> bytes:
    """Header + payload as one bytes object (one copy of the payload; ``encode_value_parts``
    for none)."""
    return b"".join(encode_value_parts(namespace, tp_rank, key, payload))


def check_header(header_bytes: bytes, namespace: bytes, tp_rank: int, key: BlockKey,
                 payload_len: int) -> SlotHeader | None:
    """The header if it decodes and names this namespace, rank, key and payload length with a
    known checksum algorithm (the payload's checksum is checked by the caller); else None."""
    header = decode_header(header_bytes)
    if (header is None or header.algo not in CHECKSUMS or header.namespace != namespace
            or header.slot != tp_rank or header.stride != REMOTE_STRIDE
            or header.payload_len != payload_len or header.key != key):
        return None
    return header


class HeaderCheck:
    """Checks the headers of values expected in one namespace and rank with ``payload_len``
    payload bytes, per block key, cheaply: a valid header is compared against the bytes it
    must start with (``header_prefix``), its key and its own checksum, without a 4 KiB copy or
    a decode. Anything that differs goes through ``check_header``, the reference, so this
    accepts exactly the headers ``check_header`` accepts."""

    def __init__(self, namespace: bytes, tp_rank: int, payload_len: int) -> None:
        self.namespace = namespace
        self.tp_rank = tp_rank
        self.payload_len = payload_len
        self.prefix = header_prefix(DEFAULT_CSUM, namespace, tp_rank, REMOTE_STRIDE,
                                    payload_len)
        self.checksum = CHECKSUMS[DEFAULT_CSUM]

    def __call__(self, header: bytes | memoryview, key: BlockKey) -> tuple[int, int] | None:
        """(checksum algorithm, payload checksum) from ``header`` (``HEADER_BYTES`` of a value)
        if it is a valid header of block ``key`` here; None otherwise. Never raises on bad
        bytes."""
        start = len(self.prefix) + PREFIX_TAIL.size
        end = start + len(key)
        head = bytes(header[:end + HEADER_CSUM.size])
        if len(head) == end + HEADER_CSUM.size and head.startswith(self.prefix):
            _seq, payload_csum, key_len = PREFIX_TAIL.unpack_from(head, len(self.prefix))
            if (key_len == len(key) and head[start:end] == key
                    and self.checksum(head[:end]) == HEADER_CSUM.unpack_from(head, end)[0]):
                return DEFAULT_CSUM, payload_csum
        found = check_header(bytes(header), self.namespace, self.tp_rank, key, self.payload_len)
        return None if found is None else (found.algo, found.payload_csum)


def check_value(value: bytes, namespace: bytes, tp_rank: int, key: BlockKey,
                payload_len: int) -> memoryview | None:
    """The payload of ``value`` if it is a valid block ``key`` of ``payload_len`` bytes in this
    namespace and rank; None otherwise. Never raises on bad bytes."""
    if len(value) != HEADER_BYTES + payload_len:
        return None
    header = check_header(value[:HEADER_BYTES], namespace, tp_rank, key, payload_len)
    if header is None:
        return None
    payload = memoryview(value)[HEADER_BYTES:]
    if CHECKSUMS[header.algo](payload) != header.payload_csum:
        return None
    return payload


def decode_into(value: bytes, namespace: bytes, tp_rank: int, key: BlockKey,
                out: np.ndarray) -> bool:
    """Check ``value`` (``check_value``) and copy its payload into ``out`` (a uint8 array of the
    payload's size); False, ``out`` untouched, when the value fails a check."""
    payload = check_value(value, namespace, tp_rank, key, out.nbytes)
    if payload is None:
        return False
    out.reshape(-1).view(np.uint8)[:] = np.frombuffer(payload, dtype=np.uint8)
    return True


def value_header(value: bytes) -> SlotHeader | None:
    """The decoded header of a stored value, for inspection (None when it does not decode)."""
    return decode_header(value[:HEADER_BYTES]) if len(value) >= HEADER_BYTES else None
