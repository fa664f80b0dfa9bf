"""A block's name in Redis.

    {prefix}:{namespace fingerprint, 32 hex}:r{tensor-parallel rank}:{block key, hex}

* ``prefix``: one per deployment (``remote_key_prefix``), so deployments sharing a server never
  read each other's blocks and an operator can list or drop one deployment's keys.
* namespace fingerprint (``keys.Namespace.fingerprint``): model, KV dtype, block size, parallel
  layout, slot layout, hash algorithm and seed. Servers share blocks only when all of these
  match. It already covers the rank; the rank is spelled out too so one rank's keys can be
  listed (``SCAN MATCH``).
* block key (``keys.BlockKey``): vLLM's block hash plus the KV group. vLLM's block hash chains
  the parent block's hash with this block's token ids and extra keys (LoRA name, multimodal
  inputs, ``cache_salt``), so it covers the whole prefix, the LoRA adapter and the salt: a block
  under another salt, adapter or prefix has another key and is never served.

No hash tag (``{...}``): in a Redis Cluster the blocks spread over every hash slot and node.
"""

from __future__ import annotations

from tokenvm_vllm.keys import BlockKey


def key_name_prefix(prefix: str, namespace: bytes, tp_rank: int) -> bytes:
    """What every block's Redis key in ``namespace`` for ``tp_rank`` starts with (a store
    computes it once; the block key's hex follows)."""
    return f"{prefix}:{namespace.hex()}:r{tp_rank}:".encode()


def remote_key(prefix: str, namespace: bytes, tp_rank: int, key: BlockKey) -> bytes:
    """The Redis key of block ``key`` in ``namespace`` (a 16-byte fingerprint) for ``tp_rank``."""
    return key_name_prefix(prefix, namespace, tp_rank) + key.hex().encode()


def namespace_pattern(prefix: str, namespace: bytes, tp_rank: int | None = None) -> str:
    """A ``SCAN MATCH`` pattern for a namespace's keys (every rank when ``tp_rank`` is None)."""
    rank = "*" if tp_rank is None else str(tp_rank)
    return f"{prefix}:{namespace.hex()}:r{rank}:*"
