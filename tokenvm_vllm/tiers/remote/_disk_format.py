"""Temporary: the disk tier's slot header encoder/decoder under the names helper A's
``tokenvm_vllm/tiers/disk/format.py`` gives them, over today's ``disk_store.py``. Deleted (and
``value.py`` imports ``tiers.disk.format``) once that package is on main."""

from __future__ import annotations

from tokenvm_vllm.tiers.disk_store import _CHECKSUMS as CHECKSUMS
from tokenvm_vllm.tiers.disk_store import (
    _CSUM,
    _FIXED,
    DEFAULT_CSUM,
    FORMAT_VERSION,
    HEADER_BYTES,
    MAGIC,
)
from tokenvm_vllm.tiers.disk_store import _decode_header as decode_header
from tokenvm_vllm.tiers.disk_store import _RawHeader as SlotHeader


def encode_header(header: SlotHeader) -> bytes:
    body = _FIXED.pack(MAGIC, FORMAT_VERSION, header.algo, 0, header.namespace, header.slot,
                       header.stride, header.payload_len, header.seq, header.payload_csum,
                       len(header.key)) + header.key
    return body + _CSUM.pack(CHECKSUMS[header.algo](body))


__all__ = ["CHECKSUMS", "DEFAULT_CSUM", "HEADER_BYTES", "SlotHeader", "decode_header",
           "encode_header"]
