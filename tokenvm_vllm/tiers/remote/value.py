"""A block's value in Redis: the disk tier's slot header, zero-padded to ``HEADER_BYTES``, then
the block's bytes.

The header is the disk slot format's (one encoder/decoder for both tiers): key echo, namespace
fingerprint, payload length and checksum, all under the header's own checksum. Remote values use
its fields as: ``slot`` = the tensor-parallel rank, ``stride`` = 0, ``seq`` = the writer's
wall-clock time in ns (``tokenvm inspect`` shows ages).

A value is served only if its header decodes, names this namespace, rank and block key, its
payload has the expected length and matches the checksum; anything else (another version, a
torn or foreign value, bit rot) is a miss, and the store deletes it.
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
    SlotHeader,
    decode_header,
    encode_header,
)

REMOTE_STRIDE = 0
"""The header's ``stride`` field in remote values (disk slots have their real stride there)."""


def encode_value_parts(namespace: bytes, tp_rank: int, key: BlockKey,
                       payload: Any) -> tuple[bytes, memoryview]:
    """The value as (zero-padded header of ``HEADER_BYTES``, the payload itself, not copied).
    ``payload``: any C-contiguous buffer (a host-pool row as numpy, bytes, memoryview)."""
    data = memoryview(payload).cast("B")
    header = encode_header(SlotHeader(
        namespace=namespace, slot=tp_rank, stride=REMOTE_STRIDE, payload_len=data.nbytes,
        seq=time.time_ns(), payload_csum=CHECKSUMS[DEFAULT_CSUM](data), algo=DEFAULT_CSUM,
        key=bytes(key)))
    return header + bytes(HEADER_BYTES - len(header)), data


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
