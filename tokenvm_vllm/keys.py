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
import uuid
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
    """What the cached bytes encode (``kv_dtype_name``): vLLM's ``cache_dtype`` setting and the
    KV tensor's element type. Not the tensor dtype alone: every fp8 variant (e4m3, e5m2,
    per-token-head) is a ``torch.uint8`` tensor of the same size."""
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


_PROCESS_NONCE = uuid.uuid4().hex[:12]
"""Distinguishes this process's KV from every other's where the bytes depend on the run."""


def kv_dtype_name(cache_dtype: str, tensor_dtype: str, dynamic_scales: bool = False) -> str:
    """The namespace's ``kv_dtype``: vLLM's ``--kv-cache-dtype`` (``cache_config.cache_dtype``)
    and the dtype of the KV tensors vLLM registers, e.g. ``"fp8_e5m2/torch.uint8"``.

    vLLM allocates every fp8 cache (``fp8``, ``fp8_e4m3``, ``fp8_e5m2``, ``fp8_per_token_head``)
    as ``torch.uint8`` (``STR_DTYPE_TO_TORCH_DTYPE``), so the tensor dtype alone would let an
    e5m2 disk or remote store serve an e4m3 engine. ``"fp8"`` and ``"fp8_e4m3"`` are kept apart
    although CUDA treats them alike (on ROCm ``fp8`` is e4m3fnuz): a missed reuse, never a wrong
    one.

    ``dynamic_scales``: vLLM computes this engine's per-layer k/v scales from its first batch
    (``calculate_kv_scales``, vLLM 0.26; removed by 0.32), so fp8 bytes written by this
    process mean something else in any other one: the name then carries a per-process nonce
    and the disk and remote tiers share nothing across processes.
    """
    name = f"{cache_dtype}/{tensor_dtype}"
    if dynamic_scales and cache_dtype.startswith(("fp8", "int8", "int4", "nvfp4")):
        name += f"/dynamic-scales-{_PROCESS_NONCE}"
    return name
