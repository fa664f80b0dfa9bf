"""How much the remote tier's background writes slow the thread beside them (issue #15).

    python -m tokenvm_vllm.bench.remote_gil URL [--threads 1,2,4] [--seconds 2] [--json OUT]

In a vLLM worker the remote tier's writes run on their own threads in the same process as the
engine thread that launches the model's kernels. In eager mode that thread is CPU-bound Python
and C++ calling in and out of Python's GIL, so any thread that takes the GIL delays it: on the
H200 a server writing its blocks to Redis lost 25% of its throughput (TPOT 1.41x) with 4 write
threads. This benchmark stands in a main-thread loop of small in-place torch ops for the
engine thread and measures its time per op: alone, beside ``redis-benchmark`` writing values
of the same size to the same server (a separate process: CPU and memory-bandwidth contention,
no GIL), and beside a ``RemoteStore`` writing with each number of write threads (one submitter
keeping four batches in flight, as a worker's steps do), first in this process
(``remote_process: false``), then in a child process over a shared pool file
(``remote_process: true``: only the submitter and the thread reading the child's answers stay
here). It prints the slowdown against the loop alone and per GB/s written, so runs at
different write rates compare.

The server must accept writes (keys expire after 10 minutes and are deleted at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from typing import Any

import numpy as np

from tokenvm_vllm.bench.remote_bench import benchmark_args, benchmark_keyspace
from tokenvm_vllm.keys import make_block_key
from tokenvm_vllm.tiers.disk.format import HEADER_BYTES
from tokenvm_vllm.tiers.remote.io_process import ProcessSlotIO
from tokenvm_vllm.tiers.remote.store import RemoteStore
from tokenvm_vllm.tiers.remote.url import parse_remote_url

NAMESPACE = b"remote-gil-ns!!!"
BATCH = 16
KEYS = 256
"""Distinct keys written over and over (a bounded footprint on the server)."""


def op_time_us(seconds: float) -> float:
    """Median time of one small in-place torch add over ``seconds`` of repeated rounds."""
    import torch

    a, b = torch.zeros(64), torch.ones(64)
    rounds: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(rounds) < 3:
        start = time.perf_counter()
        for _ in range(5000):
            a.add_(b)
        rounds.append((time.perf_counter() - start) / 5000 * 1e6)
    return statistics.median(rounds)


def with_store_writes(url: str, block_bytes: int, threads: int, seconds: float,
                      process: bool = False) -> dict[str, Any]:
    """The op time while one submitter keeps 4 write batches in flight on a store with
    ``threads`` write threads; the GB/s of block payload written meanwhile. ``process``: the
    store runs in a child process over a shared pool file (``remote_process: true``), as
    ``ProcessSlotIO``; else in this process, as ``ThreadSlotIO``."""
    keys = [make_block_key(i.to_bytes(8, "big") * 4) for i in range(KEYS)]
    settings: dict[str, Any] = dict(key_prefix="tokenvm-gil", ttl_s=600, timeout_s=5.0,
                                    io_threads=1, write_threads=threads, max_pending_writes=8)
    rows = [np.random.default_rng(i).integers(0, 255, block_bytes, dtype=np.uint8)
            for i in range(BATCH)]
    written = [0]
    stop = threading.Event()
    with contextlib.ExitStack() as stack:
        io: Any
        if process:
            directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
            tmp = stack.enter_context(tempfile.NamedTemporaryFile(dir=directory))
            tmp.truncate(BATCH * block_bytes)
            pool = np.memmap(tmp.name, dtype=np.uint8, mode="r+", shape=(BATCH, block_bytes))
            pool[:] = rows  # the same bytes as the in-process rows
            io = ProcessSlotIO(tmp.name, BATCH, block_bytes, False, dict(
                url=url, namespace=NAMESPACE, tp_rank=0, slot_bytes=block_bytes, **settings))
            stack.callback(io.close)
            payload: Any = list(range(BATCH))
        else:
            io = stack.enter_context(RemoteStore(url, NAMESPACE, 0, block_bytes, **settings))
            payload = rows

        def submit() -> None:
            inflight = []
            i = 0
            while not stop.is_set():
                batch = [keys[(i * BATCH + j) % KEYS] for j in range(BATCH)]
                i += 1
                inflight.append(io.put(batch, payload))
                if len(inflight) >= 4:
                    written[0] += sum(inflight.pop(0).result())
            for future in inflight:
                written[0] += sum(future.result())

        submitter = threading.Thread(target=submit, name="tokenvm-gil-submit")
        submitter.start()
        time.sleep(0.3)  # past the start
        before, start = written[0], time.monotonic()
        op = op_time_us(seconds)
        gbs = (written[0] - before) * block_bytes / (time.monotonic() - start) / 1e9
        stop.set()
        submitter.join()
    with RemoteStore(url, NAMESPACE, 0, block_bytes, **settings) as store:
        store.delete(keys).result(10)
    return {"threads": threads, "process": process, "op_us": op, "written_gb_s": gbs}


def with_redis_benchmark(url: str, block_bytes: int, seconds: float) -> dict[str, Any] | None:
    """The op time while ``redis-benchmark`` SETs values of the same size over ``KEYS`` keys
    (None without the tool, or for a cluster or TLS, as in ``remote_bench``)."""
    exe = shutil.which("redis-benchmark")
    target = parse_remote_url(url)
    if exe is None or target.cluster or target.tls:
        return None
    value_bytes = block_bytes + HEADER_BYTES
    command = [exe, *benchmark_args(target), "-t", "set", "-d", str(value_bytes),
               "-n", "10000000", "-c", "1", "-P", "4", "-r", str(KEYS), "-q"]
    bench = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        return {"op_us": op_time_us(seconds)}
    finally:
        bench.kill()
        bench.wait()
        benchmark_keyspace(target, KEYS, value_bytes, fill=False)  # its keys have no TTL


def run(url: str, block_bytes: int, threads: list[int], seconds: float) -> dict[str, Any]:
    alone = op_time_us(seconds)
    result: dict[str, Any] = {"block_bytes": block_bytes, "alone_op_us": alone, "store": []}
    print(f"main-thread op alone: {alone:.2f} us", flush=True)
    plain = with_redis_benchmark(url, block_bytes, seconds)
    if plain is not None:
        plain["x_alone"] = plain["op_us"] / alone
        result["redis_benchmark"] = plain
        print(f"beside redis-benchmark SET (another process): {plain['op_us']:.2f} us "
              f"= {plain['x_alone']:.2f}x", flush=True)
    for process in (False, True):
        for n in threads:
            row = with_store_writes(url, block_bytes, n, seconds, process)
            row["x_alone"] = row["op_us"] / alone
            row["slowdown_per_gb_s"] = ((row["x_alone"] - 1) / row["written_gb_s"]
                                        if row["written_gb_s"] > 0 else None)
            result["store"].append(row)
            per = row["slowdown_per_gb_s"]
            where = "a child process" if process else "this process"
            print(f"beside RemoteStore writes in {where}, {n} write thread(s): "
                  f"{row['op_us']:.2f} us = {row['x_alone']:.2f}x while writing "
                  f"{row['written_gb_s']:.2f} GB/s"
                  + (f" (+{per:.2f}x per GB/s)" if per is not None else ""), flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="remote_url of a server you may write to")
    parser.add_argument("--block-bytes", type=int, default=2 << 20,
                        help="bytes per block (2 MiB: a Llama-8B block of 16 tokens)")
    parser.add_argument("--threads", default="1,2,4", help="write thread counts to try")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if not threads or min(threads) < 1:
        parser.error(f"--threads={args.threads!r}: give positive counts such as 1,2,4")
    result = run(args.url, args.block_bytes, threads, args.seconds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
