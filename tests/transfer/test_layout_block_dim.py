"""Issue #11 item 7: the block dimension comes from what vLLM states, not from matching sizes,
so a block count equal to another dimension (block size, heads, head content) still works.

The tensors are built as vLLM builds its per-layer caches: a view of logical shape [blocks,
heads, tokens, content] over storage in another physical order (here [blocks, tokens, heads,
content], vLLM's LBNHC / "NHD"), and the copy engine must move exactly the requested blocks.
"""

from __future__ import annotations

import pytest
import torch

from tokenvm_vllm import compat
from tokenvm_vllm.transfer.copy_engine import TorchCopyEngine
from tokenvm_vllm.transfer.host_pool import HostPool, num_host_slots
from tokenvm_vllm.transfer.layout import KVLayout

HEADS, TOKENS, CONTENT = 4, 16, 8


def vllm_like_cache(blocks: int, heads: int, tokens: int, content: int) -> torch.Tensor:
    physical = torch.randn(blocks, tokens, heads, content)  # [B, N, H, C] in memory
    return physical.permute(0, 2, 1, 3)  # the logical [B, H, N, C] view vLLM registers


COINCIDENCES = {
    "blocks == block size": (TOKENS, HEADS, TOKENS, CONTENT),
    "blocks == heads": (HEADS, HEADS, TOKENS, CONTENT),
    "blocks == head content": (CONTENT, HEADS, TOKENS, CONTENT),
    "the issue's case: 32 blocks of 32 tokens": (32, 2, 32, 128),
}


def test_vllm_states_the_block_dimension():
    assert compat.kv_cache_block_dim() == 0


@pytest.mark.parametrize("case", list(COINCIDENCES))
def test_guessing_by_size_is_ambiguous(case):
    blocks, *_ = shape = COINCIDENCES[case]
    caches = {"layer.0": vllm_like_cache(*shape)}
    with pytest.raises(ValueError, match="cannot find the block dimension"):
        KVLayout.from_kv_caches(caches, blocks, 10**9)


@pytest.mark.parametrize("case", list(COINCIDENCES))
def test_stated_block_dimension_moves_exactly_the_requested_blocks(case):
    blocks, *_ = shape = COINCIDENCES[case]
    caches = {f"layer.{i}": vllm_like_cache(*shape) for i in range(2)}
    per_layer = caches["layer.0"].numel() // blocks * caches["layer.0"].element_size()
    slot_bytes = 2 * per_layer
    layout = KVLayout.from_kv_caches(caches, blocks, slot_bytes,
                                     block_dim=compat.kv_cache_block_dim())
    assert [layer.block_dim for layer in layout.layers] == [0, 0]
    pool = HostPool(num_host_slots(4 * slot_bytes, slot_bytes), slot_bytes, pin=False)
    engine = TorchCopyEngine(layout, caches, pool)
    original = {name: kv.clone() for name, kv in caches.items()}
    engine.store(1, [1, 2], [0, 1])
    assert [r.ok for r in engine.poll()] == [True]
    for kv in caches.values():
        kv.zero_()
    engine.load(2, [2, 3], [0, 1])  # block 1's bytes into block 2, block 2's into block 3
    assert [r.ok for r in engine.poll()] == [True]
    for name, kv in caches.items():
        assert torch.equal(kv[2], original[name][1]) and torch.equal(kv[3], original[name][2])
        untouched = [b for b in range(blocks) if b not in (2, 3)]
        assert not kv[untouched].any()  # no other block (or other dimension's slice) written


def test_a_tensor_that_contradicts_the_stated_dimension_is_refused():
    caches = {"layer.0": torch.zeros(HEADS, 10, TOKENS, CONTENT)}
    with pytest.raises(ValueError, match="states dimension 0 indexes its 10 blocks"):
        KVLayout.from_kv_caches(caches, 10, 10**9, block_dim=0)
