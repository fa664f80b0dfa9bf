"""Throughput of the remote tier (``RemoteStore``) next to ``redis-benchmark`` on the same server.

For each block size: single-block puts and gets (one call at a time: latency), then batched puts
and gets (``batch`` blocks per pipeline, up to ``threads`` batches in flight: throughput), each
moving about ``megabytes`` MiB of payload. ``redis-benchmark`` then runs SET and GET, once with
one connection and no pipelining (``-c 1 -P 1``) and once with ``threads`` connections and
``batch``-deep pipelines, so each of our rows has a plain client's row to be measured against.

Like for like (what each side's server does is the same; only the client differs):

* Value size: ours are the block plus its ``HEADER_BYTES`` header, so ``redis-benchmark`` moves
  values of that size (``-d``); shares are of blocks/s (values per second), so they compare the
  same bytes on the wire. GB/s columns count the block's payload for both.
* Keys: without ``-r``, redis-benchmark SETs and GETs one key over and over (one value hot in
  the server's cache, each SET replacing a value of the same size). Here it gets a keyspace of
  as many keys as our rows use (``-r``), filled beforehand, and our puts overwrite keys an
  unmeasured first pass wrote: both sides overwrite existing values on SET and read values
  spread over the same amount of memory on GET. Not in a cluster: there redis-benchmark tags
  its key names per node itself, so it keeps its one key per node (its rows flatter it).
* Concurrency: single rows are one caller, one value at a time on both sides (ours through the
  store's I/O thread, as the tier does: that hop is part of our cost); batched rows are
  ``threads`` connections with ``batch`` requests in flight each on both sides.

Keys expire after 10 minutes; our ``{prefix}:*`` keys and redis-benchmark's ``key:*`` keyspace
(``key:000000000000`` ...) are deleted after each block size.

Single rows carry a ceiling: a call through the tier hands its work to an I/O thread and waits
for the answer (the tier's caller is vLLM's step, which never waits on the network itself), and
that hand-off alone costs a round trip between two threads (``thread_hop_s``, measured in the
same run with the store's kind of executor and no work). So even a client whose own I/O cost
no more than redis-benchmark's would reach at most ``plain / (plain + hop)`` of its calls per
second: the ``ceiling`` column (on this 2-core machine a hop took 23-39 µs on 2026-12-01, a
plain 128 KiB GET 47 µs).

Rows of source ``tokenvm`` use the store's default client (the raw-socket fast path on a
standalone server); on a standalone server the same rows follow with redis-py (source
``tokenvm redis-py``), so the fast path is measured against the old path in the same run.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from tokenvm_vllm.keys import make_block_key
from tokenvm_vllm.tiers.disk.format import HEADER_BYTES
from tokenvm_vllm.tiers.remote.store import RemoteStore
from tokenvm_vllm.tiers.remote.url import RemoteTarget, parse_remote_url

NAMESPACE = b"remote-bench-ns!"


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else 0.0


def _row(op: str, mode: str, size: int, blocks: int, seconds: float,
         latencies: Sequence[float], ok: int, source: str = "tokenvm") -> dict[str, Any]:
    return {"source": source, "op": op, "mode": mode, "block_bytes": size,
            "value_bytes": HEADER_BYTES + size, "blocks": blocks, "ok": ok,
            "seconds": round(seconds, 4),
            "blocks_per_s": round(blocks / seconds, 1) if seconds else 0.0,
            "gb_per_s": round(blocks * size / seconds / 1e9, 3) if seconds else 0.0,
            "p50_ms": round(_percentile(latencies, 50) * 1000, 3),
            "p99_ms": round(_percentile(latencies, 99) * 1000, 3)}


def thread_hop_s(calls: int = 2000) -> float:
    """p50 seconds of one call handed to a ``ThreadPoolExecutor`` thread (the store's I/O
    threads are one) and waited for, with no work: the hand-off a single-block call through
    the tier pays on top of its I/O (module docstring)."""
    with ThreadPoolExecutor(1) as executor:
        executor.submit(int).result()  # the thread exists before the first measured call
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            executor.submit(int).result()
            times.append(time.perf_counter() - start)
    return _percentile(times, 50)


def bench_store(url: str, size: int, megabytes: int, batch: int, threads: int,
                prefix: str = "tokenvm-bench", client: str = "auto") -> list[dict[str, Any]]:
    """Our four rows (put/get x single/batched) for one block size, with ``client`` (a
    ``RemoteStore`` client; rows of another than ``auto`` are labelled with it)."""
    source = "tokenvm" if client == "auto" else f"tokenvm {client}"
    store = RemoteStore(url, NAMESPACE, 0, size, key_prefix=prefix, ttl_s=600, timeout_s=10.0,
                        io_threads=threads, max_pending_reads=threads,
                        max_pending_writes=threads, client=client)
    if not store.available:
        store.close()
        raise RuntimeError(f"tokenvm: {store.where} is unreachable")
    rows = []
    try:
        total = max(batch, megabytes * 2**20 // size)
        single = max(16, min(total // 4, 2000))
        payload = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
        keys = [make_block_key(i.to_bytes(32, "big")) for i in range(total)]
        outs = [np.empty(size, np.uint8) for _ in range(batch)]
        # Unmeasured: every key written once, so measured puts overwrite values of the same
        # size, as redis-benchmark's SETs do (module docstring).
        for first in range(0, total, batch):
            store.put(keys[first:first + batch], [payload] * len(keys[first:first + batch])
                      ).result()
        for op in ("put", "get"):
            latencies = []
            ok = 0
            start = time.perf_counter()
            for key in keys[:single]:
                t0 = time.perf_counter()
                if op == "put":
                    result = store.put([key], [payload]).result()
                else:
                    result = store.get([key], outs[:1]).result()
                latencies.append(time.perf_counter() - t0)
                ok += sum(result)
            rows.append(_row(op, "single", size, single, time.perf_counter() - start,
                             latencies, ok, source))
        for op in ("put", "get"):
            ok, latencies = 0, []
            in_flight: list[tuple[float, Future[list[bool]]]] = []
            # Reads into shared buffers: every batch of a get may overwrite the last one's
            # bytes, which the benchmark never looks at (throughput only; checks still run).
            buffers = [[np.empty(size, np.uint8) for _ in range(batch)] for _ in range(threads)]
            start = time.perf_counter()
            for n, first in enumerate(range(0, total, batch)):
                chunk = keys[first:first + batch]
                while len(in_flight) >= threads:
                    t0, future = in_flight.pop(0)
                    ok += sum(future.result())
                    latencies.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                if op == "put":
                    future = store.put(chunk, [payload] * len(chunk))
                else:
                    future = store.get(chunk, buffers[n % threads][:len(chunk)])
                in_flight.append((t0, future))
            for t0, future in in_flight:
                ok += sum(future.result())
                latencies.append(time.perf_counter() - t0)
            rows.append(_row(op, f"batch {batch} x {threads}", size, total,
                             time.perf_counter() - start, latencies, ok, source))
        store.delete(keys).result()
    finally:
        store.close()
    return rows


def benchmark_args(target: RemoteTarget) -> list[str]:
    """``redis-benchmark``'s arguments to reach ``target``: host and port of its first node,
    the db (or ``--cluster``), the ACL user and the password."""
    host, port = target.nodes[0]
    args = ["-h", host, "-p", str(port)]
    if target.cluster:
        args.append("--cluster")
    else:
        args += ["--dbnum", str(target.db)]
    if target.username:
        args += ["--user", target.username]
    if target.password:
        args += ["-a", target.password, "--no-auth-warning"]
    return args


def benchmark_keyspace(target: RemoteTarget, total: int, value_bytes: int, fill: bool) -> None:
    """Write (``fill``) or delete redis-benchmark's ``-r total`` keys, ``key:%012d``."""
    from tokenvm_vllm.cli.remote import _client

    client = _client(target, 10.0)
    try:
        value = bytes(value_bytes)
        for first in range(0, total, 32):
            pipe = client.pipeline(transaction=False)
            for i in range(first, min(total, first + 32)):
                if fill:
                    pipe.set(f"key:{i:012d}", value, px=600_000)
                else:
                    pipe.delete(f"key:{i:012d}")
            pipe.execute()
    finally:
        client.close()


def redis_benchmark(url: str, size: int, megabytes: int, batch: int,
                    threads: int) -> list[dict[str, Any]]:
    """``redis-benchmark`` SET/GET of values of our size (``HEADER_BYTES + size``) over a
    keyspace of as many keys as our rows use, single and pipelined (module docstring). Empty
    when the tool is missing or the URL is TLS (not compared then)."""
    target = parse_remote_url(url)
    if shutil.which("redis-benchmark") is None or target.tls:
        return []
    host, port = target.nodes[0]
    total = max(batch, megabytes * 2**20 // size)
    value_bytes = HEADER_BYTES + size
    rows = []
    # In a cluster redis-benchmark names its keys with a hash tag of its own per node
    # (key:{tag}:...), which cannot be filled beforehand: it keeps one key per node there.
    keyspace = not target.cluster
    if keyspace:
        benchmark_keyspace(target, total, value_bytes, fill=True)
    try:
        for mode, clients, pipeline, requests in (
                ("single", 1, 1, max(16, min(total // 4, 2000))),
                (f"batch {batch} x {threads}", threads, batch, total)):
            cmd = ["redis-benchmark", *benchmark_args(target), "-t", "set,get",
                   "-d", str(value_bytes), "-n", str(requests),
                   "-c", str(clients), "-P", str(pipeline), "--csv"]
            if keyspace:
                cmd += ["-r", str(total)]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                    check=False)
            # With --cluster the CSV follows a list of the masters: start at its header.
            csv_text = result.stdout[max(0, result.stdout.find('"test",')):]
            for record in csv.DictReader(io.StringIO(csv_text)):
                rps = float(record["rps"])
                rows.append({"source": "redis-benchmark", "op": record["test"].lower(),
                             "mode": mode, "block_bytes": size, "value_bytes": value_bytes,
                             "blocks": requests, "ok": requests,
                             "seconds": round(requests / rps, 4) if rps else 0.0,
                             "blocks_per_s": rps, "gb_per_s": round(rps * size / 1e9, 3),
                             "p50_ms": float(record.get("p50_latency_ms", 0) or 0),
                             "p99_ms": float(record.get("p99_latency_ms", 0) or 0)})
    finally:
        if keyspace:
            benchmark_keyspace(target, total, value_bytes, fill=False)
    return rows


def run(url: str, sizes: Sequence[int], megabytes: int, batch: int,
        threads: int, repeat: int = 1) -> list[dict[str, Any]]:
    """Every row, best of ``repeat`` rounds (highest GB/s). Each round runs every source once
    per size, one after another, so a busy machine's slow moments fall on all of them alike
    rather than on whichever source ran then."""
    if repeat < 1:
        raise ValueError(f"tokenvm: remote-bench --repeat={repeat}: give 1 or more")
    best: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    standalone = not parse_remote_url(url).cluster
    for _ in range(repeat):
        hop = thread_hop_s()
        hop_row = {"source": "thread hop", "op": "none", "mode": "single", "block_bytes": 0,
                   "seconds": hop, "p50_ms": round(hop * 1000, 4)}
        key = ("thread hop", "none", "single", 0)
        if key not in best or hop < best[key]["seconds"]:  # the best round, as every row
            best[key] = hop_row
        for size in sizes:
            rows = bench_store(url, size, megabytes, batch, threads)
            if standalone:  # the old path, for comparison
                rows += bench_store(url, size, megabytes, batch, threads, client="redis-py")
            rows += redis_benchmark(url, size, megabytes, batch, threads)
            for row in rows:
                key = (row["source"], row["op"], row["mode"], row["block_bytes"])
                if key not in best or row["gb_per_s"] > best[key]["gb_per_s"]:
                    best[key] = row
    return sorted(best.values(), key=lambda r: (r["block_bytes"], _SOURCES.index(r["source"])
                                                if r["source"] in _SOURCES else 9))


_SOURCES = ["thread hop", "tokenvm", "tokenvm redis-py", "redis-benchmark"]


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table; each TokenVM row with its share of redis-benchmark's blocks/s (values
    of the same size per second; GB/s columns count the block's payload on both sides) and,
    for single rows, the ceiling a thread hop leaves (``ceiling``; module docstring)."""
    plain = {(r["op"].replace("put", "set"), r["mode"], r["block_bytes"]): r["blocks_per_s"]
             for r in rows if r["source"] == "redis-benchmark"}
    hop = next((r["seconds"] for r in rows if r["source"] == "thread hop"), None)
    lines = ["| source | op | mode | block | blocks/s | GB/s | p50 ms | p99 ms | vs plain | "
             "ceiling |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["source"] == "thread hop":
            lines.append(f"| thread hop | none | single | | | | {r['p50_ms']:.3f} | | | |")
            continue
        base = plain.get((r["op"].replace("put", "set"), r["mode"], r["block_bytes"]))
        share = ceiling = ""
        # (redis-benchmark reports an infinite rate for a run shorter than its clock's tick)
        if r["source"].startswith("tokenvm") and base and math.isfinite(base):
            share = f"{r['blocks_per_s'] / base:.0%}"
            if r["mode"] == "single" and hop is not None:
                ceiling = f"{ceiling_share(base, hop):.0%}"
        lines.append(f"| {r['source']} | {r['op']} | {r['mode']} | {r['block_bytes']} | "
                     f"{r['blocks_per_s']:.0f} | {r['gb_per_s']:.3f} | {r['p50_ms']:.3f} | "
                     f"{r['p99_ms']:.3f} | {share} | {ceiling} |")
    return "\n".join(lines)


def ceiling_share(plain_calls_per_s: float, hop_s: float) -> float:
    """The most of a plain client's single calls per second that a client paying a thread hop
    per call on top of the plain client's own call time can reach."""
    plain_s = 1.0 / plain_calls_per_s
    return plain_s / (plain_s + hop_s)
