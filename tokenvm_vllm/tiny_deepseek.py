"""Generate a tiny DeepSeek-V2-shaped model directory (MLA attention, no MoE, random weights).

The MLA counterpart of ``tiny_llama``: the same word-level tokenizer and std-0.02 weights
(so a wrong KV block changes greedy outputs), with DeepSeek-V2's multi-head latent attention.
vLLM caches one latent vector per token and layer, ``kv_lora_rank + qk_rope_head_dim`` wide,
shared by all heads: its KV cache is one tensor per layer of shape (blocks, block_size,
kv_lora_rank + qk_rope_head_dim), with no K/V split and no head dimension.

The latent dimensions default to DeepSeek-V2/V3's own (512 + 64, heads of 128 + 64 and 128):
vLLM's MLA kernels on Hopper (FlashAttention MLA, FlashMLA) are built for exactly those, so a
smaller latent would test a kernel refusal rather than TokenVM. Everything else is small. The
MLP is dense in every layer (``first_k_dense_replace`` = the layer count): MoE changes nothing
in the KV cache, and ``n_routed_experts`` stays an integer only because vLLM's weight loader
builds its (unused) expert mapping from it.

Tensor names are those of DeepSeek-V2 checkpoints, as vLLM's ``DeepseekV2ForCausalLM``
``load_weights`` expects them (``q_proj`` when ``q_lora_rank`` is None, otherwise ``q_a_proj``,
``q_a_layernorm`` and ``q_b_proj``; ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenvm_vllm.tiny_llama import SPECIAL_TOKENS, Normal, write_model_dir


@dataclass(frozen=True)
class TinyDeepseekShape:
    """The shape of the generated model. Defaults keep a CPU forward pass cheap."""

    vocab_words: int = 1021
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    q_lora_rank: int | None = None
    """None: queries are projected directly (``q_proj``), as in DeepSeek-V2-Lite."""
    max_position_embeddings: int = 8192

    @property
    def latent_dim(self) -> int:
        """Elements of one token's cached latent KV (per layer)."""
        return self.kv_lora_rank + self.qk_rope_head_dim


def write_tiny_deepseek(
    path: str | os.PathLike[str],
    shape: TinyDeepseekShape = TinyDeepseekShape(),
    seed: int = 0,
    weights: bool = True,
    device: str = "cpu",
) -> Path:
    """Write config.json, the tokenizer files and model.safetensors into ``path``.

    Idempotent: an existing complete directory is left as it is. ``weights=False`` writes no
    weight file (config-only, for schedulers and ``load_format="dummy"``).
    """
    if shape.kv_lora_rank <= 0 or shape.qk_rope_head_dim <= 0 or shape.qk_nope_head_dim <= 0:
        raise ValueError(
            f"tokenvm: tiny DeepSeek shape {shape}: kv_lora_rank, qk_rope_head_dim and "
            "qk_nope_head_dim must be positive (vLLM uses MLA only when they are)")
    vocab_size = len(SPECIAL_TOKENS) + shape.vocab_words
    config = {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "moe_intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_heads,
        "kv_lora_rank": shape.kv_lora_rank,
        "q_lora_rank": shape.q_lora_rank,
        "qk_rope_head_dim": shape.qk_rope_head_dim,
        "qk_nope_head_dim": shape.qk_nope_head_dim,
        "v_head_dim": shape.v_head_dim,
        # dense MLPs everywhere: no layer index reaches first_k_dense_replace
        "first_k_dense_replace": shape.num_layers,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "moe_layer_freq": 1,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": False,
        "scoring_func": "softmax",
        "routed_scaling_factor": 1.0,
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    return write_model_dir(
        path, config, shape.vocab_words, shape.max_position_embeddings,
        (lambda normal: _deepseek_tensors(shape, vocab_size, normal)) if weights else None,
        seed, device)


def _deepseek_tensors(shape: TinyDeepseekShape, vocab_size: int,
                      normal: Normal) -> dict[str, Any]:
    """DeepSeek-V2's tensors by checkpoint name (norm weights 1, everything else ``normal``)."""
    import torch

    h, inter, heads = shape.hidden_size, shape.intermediate_size, shape.num_heads
    qk_head = shape.qk_nope_head_dim + shape.qk_rope_head_dim
    tensors = {
        "model.embed_tokens.weight": normal(vocab_size, h),
        "model.norm.weight": torch.ones(h),
        "lm_head.weight": normal(vocab_size, h),
    }
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        if shape.q_lora_rank is None:
            tensors[p + "self_attn.q_proj.weight"] = normal(heads * qk_head, h)
        else:
            tensors |= {
                p + "self_attn.q_a_proj.weight": normal(shape.q_lora_rank, h),
                p + "self_attn.q_a_layernorm.weight": torch.ones(shape.q_lora_rank),
                p + "self_attn.q_b_proj.weight": normal(heads * qk_head, shape.q_lora_rank),
            }
        tensors |= {
            p + "self_attn.kv_a_proj_with_mqa.weight": normal(shape.latent_dim, h),
            p + "self_attn.kv_a_layernorm.weight": torch.ones(shape.kv_lora_rank),
            p + "self_attn.kv_b_proj.weight": normal(
                heads * (shape.qk_nope_head_dim + shape.v_head_dim), shape.kv_lora_rank),
            p + "self_attn.o_proj.weight": normal(h, heads * shape.v_head_dim),
            p + "mlp.gate_proj.weight": normal(inter, h),
            p + "mlp.up_proj.weight": normal(inter, h),
            p + "mlp.down_proj.weight": normal(h, inter),
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
        }
    return tensors
