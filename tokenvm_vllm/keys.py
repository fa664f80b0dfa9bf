"""What a stored block is called: vLLM's chained block hash plus KV group, inside a namespace.

vLLM's block hash already fingerprints the whole prefix (parent hash chain, token ids, LoRA,
multimodal inputs, ``cache_salt``). The namespace adds what the hash does not cover: the model,
the KV dtype and block size, the parallel layout and the hash settings. Blocks from two namespaces
must never be mixed; the host tier lives inside one engine (one namespace), the disk tier stores
the fingerprint in every slot header.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass

BlockKey = bytes
"""vLLM block hash bytes followed by the 4-byte big-endian KV-group index."""


def make_block_key(block_hash: bytes, group_idx: int = 0) -> BlockKey:
    return bytes(block_hash) + group_idx.to_bytes(4, "big")


def with_group(key: BlockKey, group_idx: int) -> BlockKey:
    """The same block hash as ``key``, in KV cache group ``group_idx`` (hybrid models keep one
    block per group for each token range: the same hash, one key per group)."""
    return key[:-4] + group_idx.to_bytes(4, "big")


def key_group(key: BlockKey) -> int:
    """The KV cache group index of ``key``."""
    return int.from_bytes(key[-4:], "big")


@dataclass(frozen=True)
class Namespace:
    """Everything besides the block hash that decides whether stored KV bytes are reusable."""

    model: str
    kv_dtype: str
    block_size: int
    tp_rank: int
    tp_size: int
    pp_size: int
    hash_algo: str
    hash_seed: str
    """PYTHONHASHSEED, or 'random' when unset (then hashes may change with every restart)."""
    layout: str = ""
    """How a block's bytes are laid out in a slot (per-layer sizes and dimension orders)."""

    def fingerprint(self) -> bytes:
        """A stable 16-byte digest of all fields."""
        text = repr(sorted(asdict(self).items())).encode()
        return hashlib.sha256(text).digest()[:16]


def current_hash_seed() -> str:
    return os.environ.get("PYTHONHASHSEED", "random")
