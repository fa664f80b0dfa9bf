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
    out = write_tiny_llama(path, shape=shape, seed=seed, weights=True)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["layer_types"] = types
    config["sliding_window"] = sliding_window
    config_path.write_text(json.dumps(config, indent=2))
    return out
