"""Generate a tiny Llama model directory (config, word-level tokenizer, random weights).

No model can be downloaded on the machines this project runs on, so the tests, the demo and the
benchmarks make their own. The weights are initialised the way ``transformers`` does (normal, std
0.02): with vLLM's ``load_format="dummy"`` weights are so small that outputs ignore earlier context,
so a wrong KV block would go unnoticed. With std-0.02 weights a changed early token changes later
greedy outputs, which is what makes the token-for-token comparisons able to fail.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Normal = Callable[..., Any]
"""``normal(*size)``: a tensor of std-0.02 random values (see ``write_model_dir``)."""

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


@dataclass(frozen=True)
class TinyLlamaShape:
    """The shape of the generated model. Defaults keep a CPU forward pass cheap."""

    vocab_words: int = 1021
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 8192
    model_vocab_size: int = 0
    """Rows of the embedding/LM head; 0 means the tokenizer's size. Larger values give a real
    model's shape (e.g. 128256 for Llama 3) while the word-level tokenizer stays small."""


LLAMA_3_1_8B = TinyLlamaShape(vocab_words=1021, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8,
                              max_position_embeddings=131072, model_vocab_size=128256)
"""Llama-3.1-8B's shape, for timing runs with ``load_format="dummy"`` (``weights=False``)."""


def word(i: int) -> str:
    """The i-th vocabulary word (deterministic, so prompts can be built from ids)."""
    return f"w{i}"


def write_tiny_llama(
    path: str | os.PathLike[str],
    shape: TinyLlamaShape = TinyLlamaShape(),
    seed: int = 0,
    weights: bool = True,
    device: str = "cpu",
) -> Path:
    """Write config.json, tokenizer.json, tokenizer_config.json and model.safetensors into path.

    Idempotent: an existing complete directory is left as it is. ``weights=False`` writes no
    weight file (for ``load_format="dummy"`` timing runs).
    """
    vocab_size = max(len(SPECIAL_TOKENS) + shape.vocab_words, shape.model_vocab_size)
    head_dim = shape.hidden_size // shape.num_heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    return write_model_dir(
        path, config, shape.vocab_words, shape.max_position_embeddings,
        (lambda normal: _llama_tensors(shape, vocab_size, normal)) if weights else None,
        seed, device)


def write_model_dir(
    path: str | os.PathLike[str], config: dict[str, Any], vocab_words: int,
    max_positions: int, tensors: Callable[[Normal], dict[str, Any]] | None, seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Write ``config`` (config.json), the word-level tokenizer and, unless ``tensors`` is None,
    model.safetensors with the tensors ``tensors(normal)`` returns, where ``normal(*size)``
    draws std-0.02 values from a generator seeded with ``seed`` (on ``device``, returned on the
    CPU). Shared by every generated model. Idempotent: a complete directory is left as it is."""
    out = Path(path)
    done = out / ".complete"
    if done.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(out, vocab_words, max_positions)
    if tensors is not None:
        _save_weights(out / "model.safetensors", tensors, seed, device)
    done.write_text("ok\n")
    return out


def write_tokenizer(out: Path, vocab_words: int, model_max_length: int) -> None:
    """The word-level tokenizer (tokenizer.json, tokenizer_config.json): the special tokens,
    then ``word(i)`` for i < ``vocab_words``. Shared by every generated model."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i in range(vocab_words):
        vocab[word(i)] = len(SPECIAL_TOKENS) + i
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, t in enumerate(SPECIAL_TOKENS)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": False},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": False, "add_eos_token": False,
        "model_max_length": model_max_length,
    }))


def _save_weights(path: Path, tensors: Callable[[Normal], dict[str, Any]], seed: int,
                  device: str) -> None:
    """torch and safetensors are imported here only: a config-only model needs neither."""
    import torch

    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError("tokenvm: writing a generated model's weights needs the safetensors "
                          "package; install it with pip install 'tokenvm-vllm[bench]'") from None
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device) * 0.02).cpu()

    save_file(tensors(normal), str(path))


def _llama_tensors(shape: TinyLlamaShape, vocab_size: int, normal: Normal) -> dict[str, Any]:
    """Llama's tensors by checkpoint name (norm weights 1, everything else ``normal``)."""
    import torch

    head_dim = shape.hidden_size // shape.num_heads
    h, inter, kv = shape.hidden_size, shape.intermediate_size, shape.num_kv_heads * head_dim
    tensors = {
        "model.embed_tokens.weight": normal(vocab_size, h),
        "model.norm.weight": torch.ones(h),
        "lm_head.weight": normal(vocab_size, h),
    }
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": normal(h, h),
            p + "self_attn.k_proj.weight": normal(kv, h),
            p + "self_attn.v_proj.weight": normal(kv, h),
            p + "self_attn.o_proj.weight": normal(h, h),
            p + "mlp.gate_proj.weight": normal(inter, h),
            p + "mlp.up_proj.weight": normal(inter, h),
            p + "mlp.down_proj.weight": normal(h, inter),
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
        }
    return tensors


def prompt_text(token_ids: list[int]) -> str:
    """A prompt whose word-level tokenization is exactly ``token_ids`` (ids of vocabulary words)."""
    return " ".join(word(t - len(SPECIAL_TOKENS)) for t in token_ids)
