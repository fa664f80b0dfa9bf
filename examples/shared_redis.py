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
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokenvm_vllm.bench.server import ApiServer, ServerError, free_port
from tokenvm_vllm.tiny_llama import TinyLlamaShape, word, write_tiny_llama

BLOCK_SIZE = 32


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


def start_server(model: str, redis_url: str, dtype: str, log: Path,
                 extra: list[str]) -> ApiServer:
    transfer = {"kv_connector": "TokenVM", "kv_role": "kv_both",
                "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": {"host_bytes": "256MiB", "remote_url": redis_url}}
    args = ["--dtype", dtype, "--block-size", str(BLOCK_SIZE), "--max-model-len", "1024",
            "--enforce-eager", "--gpu-memory-utilization", "0.15",
            "--kv-transfer-config", json.dumps(transfer), *extra]
    # the same PYTHONHASHSEED in every server: the same block hashes, so the same Redis keys
    return ApiServer(model, args, log, env={"PYTHONHASHSEED": "0"})


def remote_counters(server: ApiServer) -> dict[str, float]:
    """TokenVM's remote-tier totals and vLLM's prompt tokens by source."""
    totals: dict[str, float] = {}
    for name, labels, value in server.metrics():
        if not name.startswith(("tokenvm:remote", "vllm:prompt_tokens_by_source")):
            continue
        if not name.endswith(("_total", "_seconds_sum", "_seconds_count")):
            continue
        if "by_source" in name:
            name += f"[{labels.get('source', '')}]"
        totals[name] = totals.get(name, 0.0) + value
    return totals


def stop_redis(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
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

    servers: dict[str, ApiServer] = {}
    try:
        for name in ("A", "B"):
            servers[name] = start_server(model, redis_url, args.dtype,
                                         out / f"server-{name}.log", extra)
            print(f"server {name}: {servers[name].url} (log {servers[name].log})")
        for server in servers.values():
            try:
                server.wait_healthy(args.startup_timeout)
            except ServerError as err:
                sys.exit(str(err))

        def ask(server: ApiServer, prompt: str) -> str:
            return str(server.complete(prompt, max_tokens=8)["choices"][0]["text"])

        for i, doc in enumerate(docs):
            print(f"A doc {i}: {ask(servers['A'], doc + ' ' + question())!r}")
        time.sleep(3)  # A's blocks go to Redis in the background
        for i, doc in enumerate(docs):
            print(f"B doc {i}: {ask(servers['B'], doc + ' ' + question())!r}")
        time.sleep(12)  # vLLM publishes counters every few seconds
        for name, server in servers.items():
            print(f"server {name}:", json.dumps(remote_counters(server), indent=1))
        print("B's prefixes came from Redis when tokenvm:remote_hit_blocks_total > 0 and "
              "vllm:prompt_tokens_by_source_total[external_kv_transfer] > 0 on B")
    finally:
        for server in servers.values():
            server.stop()
        if redis_proc is not None:
            stop_redis(redis_proc)


if __name__ == "__main__":
    main()
