"""Two vLLM servers sharing one Redis through TokenVM: B is served what only A computed.

Starts (all on 127.0.0.1) a redis-server unless ``--redis-url`` names one, then server A and
server B (``python -m vllm.entrypoints.openai.api_server`` with the TokenVM connector and the
same ``remote_url`` and PYTHONHASHSEED), sends documents with questions to A, waits for A's
blocks to reach Redis, sends the same documents with new questions to B, and prints B's
answers next to A's and the counters that show where B's prefixes came from:

    python examples/shared_redis.py                      # tiny generated Llama, CPU or GPU
    python examples/shared_redis.py --model DIR --dtype auto --redis-url redis://127.0.0.1:6379/0

``remote_url`` takes ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS) or a
cluster seed list ``redis://host1:port1,host2:port2``; see examples/shared_redis.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tokenvm_vllm.tiny_llama import TinyLlamaShape, word, write_tiny_llama

BLOCK_SIZE = 32


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A throwaway redis-server on 127.0.0.1 (no persistence, evicts LRU keys when full)."""
    if shutil.which("redis-server") is None:
        sys.exit("redis-server not found: install it (apt-get install -y redis-server) or pass "
                 "--redis-url")
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no", "--dir", str(workdir), "--maxmemory", "1gb",
         "--maxmemory-policy", "allkeys-lru"], stdout=subprocess.DEVNULL, start_new_session=True)
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


def start_server(model: str, port: int, redis_url: str, dtype: str, log: Path,
                 extra: list[str]) -> subprocess.Popen[bytes]:
    transfer = {"kv_connector": "TokenVM", "kv_role": "kv_both",
                "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": {"host_bytes": "256MiB", "remote_url": redis_url}}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
           "--block-size", str(BLOCK_SIZE), "--max-model-len", "1024", "--enforce-eager",
           "--gpu-memory-utilization", "0.15", "--kv-transfer-config", json.dumps(transfer),
           *extra]
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # same block hashes in every server
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def http(url: str, body: dict[str, Any] | None = None, timeout: float = 120) -> str:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return str(response.read().decode())


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited; see {log}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            http(url + "/health", timeout=2)
            return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    sys.exit(f"server {url} not healthy after {timeout_s} s; see {log}")


def counters(url: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for line in http(url + "/metrics").splitlines():
        if line.startswith(("tokenvm:remote", "vllm:prompt_tokens_by_source")):
            name_part, _, value = line.rpartition(" ")
            name = name_part.split("{", 1)[0]
            if not name.endswith(("_total", "_seconds_sum", "_seconds_count")):
                continue
            if "by_source" in name:
                name += "[" + name_part.split('source="', 1)[1].split('"', 1)[0] + "]"
            totals[name] = totals.get(name, 0.0) + float(value)
    return totals


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory or name (default: a tiny Llama)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--out", default="", help="logs and the tiny model (default: a tmp dir)")
    parser.add_argument("--startup-timeout", type=float, default=300)
    args, extra = parser.parse_known_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="tokenvm-shared-redis-"))
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(write_tiny_llama(out / "tiny-llama"))
    redis_proc, redis_url = (None, args.redis_url) if args.redis_url else start_redis(out)
    rng = random.Random(0)
    vocab = TinyLlamaShape().vocab_words
    docs = [" ".join(word(rng.randrange(vocab)) for _ in range(8 * BLOCK_SIZE))
            for _ in range(args.documents)]

    def question() -> str:
        return " ".join(word(rng.randrange(vocab)) for _ in range(10))

    servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    try:
        for name in ("A", "B"):
            port = free_port()
            log = out / f"server-{name}.log"
            servers[name] = (start_server(model, port, redis_url, args.dtype, log, extra),
                             f"http://127.0.0.1:{port}")
            print(f"server {name}: http://127.0.0.1:{port} (log {log})")
        for name, (proc, url) in servers.items():
            wait_healthy(url, proc, out / f"server-{name}.log", args.startup_timeout)

        def ask(url: str, prompt: str) -> str:
            body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
            return str(json.loads(http(url + "/v1/completions", body))["choices"][0]["text"])

        url_a, url_b = servers["A"][1], servers["B"][1]
        for i, doc in enumerate(docs):
            print(f"A doc {i}: {ask(url_a, doc + ' ' + question())!r}")
        time.sleep(3)  # A's blocks go to Redis in the background
        for i, doc in enumerate(docs):
            print(f"B doc {i}: {ask(url_b, doc + ' ' + question())!r}")
        time.sleep(12)  # vLLM publishes counters every few seconds
        for name, (_, url) in servers.items():
            print(f"server {name}:", json.dumps(counters(url), indent=1))
        print("B's prefixes came from Redis when tokenvm:remote_hit_blocks_total > 0 and "
              "vllm:prompt_tokens_by_source_total[external_kv_transfer] > 0 on B")
    finally:
        for proc, _ in servers.values():
            stop(proc)
        if redis_proc is not None:
            stop(redis_proc)


if __name__ == "__main__":
    main()
