"""The remote tier's tools: the ``tokenvm doctor`` connection check and ``tokenvm remote-inspect``.

    tokenvm remote-inspect URL [--prefix P] [--limit N] [--json]
        what a Redis holds for TokenVM under a key prefix: keys, bytes, age and TTL per
        namespace fingerprint and tensor-parallel rank (read-only: SCAN, MEMORY USAGE-free)

Both talk only to the server ``URL`` names; passwords are masked in everything printed.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from typing import Any

from tokenvm_vllm.cli import human_size as _size
from tokenvm_vllm.tiers.remote.url import RemoteTarget, mask_url, parse_remote_url


def _client(target: RemoteTarget, timeout_s: float) -> Any:
    """A plain redis-py client for ``target`` (the tools need no RemoteStore machinery)."""
    import redis
    from redis.cluster import ClusterNode, RedisCluster

    common: dict[str, Any] = dict(
        username=target.username, password=target.password, ssl=target.tls,
        socket_timeout=timeout_s, socket_connect_timeout=timeout_s, **dict(target.tls_options))
    if target.cluster:
        nodes = [ClusterNode(host, port)  # type: ignore[no-untyped-call]
                 for host, port in target.nodes]
        return RedisCluster(startup_nodes=nodes, **common)
    host, port = target.nodes[0]
    return redis.Redis(host=host, port=port, db=target.db, **common)


def remote_checks(url: str, prefix: str, timeout_s: float = 2.0) -> list[tuple[str, str, str]]:
    """(status, name, detail) lines for ``tokenvm doctor``: reach the server, its version, an
    eviction policy that keeps it bounded, a write/read/delete round trip. Never raises."""
    try:
        target = parse_remote_url(url)
    except ValueError as exc:
        return [("FAIL", "remote tier", str(exc))]
    where = target.describe()
    try:
        client = _client(target, timeout_s)
        start = time.perf_counter()
        client.ping()
        ping_ms = (time.perf_counter() - start) * 1000
        info = client.info("server")
        memory = client.info("memory")
        if target.cluster:  # per-node dicts: take any node's
            info = next(iter(info.values())) if "redis_version" not in info else info
            memory = next(iter(memory.values())) if "maxmemory" not in memory else memory
        probe = f"{prefix}:doctor-probe:{time.time_ns()}".encode()
        start = time.perf_counter()
        client.set(probe, b"x" * 4096, px=10_000)
        echoed = client.get(probe)
        client.delete(probe)
        round_trip_ms = (time.perf_counter() - start) * 1000
    except Exception as exc:  # doctor reports, never crashes
        text = str(exc).replace(target.password, "***") if target.password else str(exc)
        return [("FAIL", "remote tier", f"{where}: {type(exc).__name__}: {text} (the servers "
                 f"would run without the remote tier; check remote_url, the network and the "
                 f"credentials)")]
    checks = [("OK", "remote tier", f"{where}: Redis {info.get('redis_version', '?')}, ping "
               f"{ping_ms:.1f} ms, 4 KiB set+get+del {round_trip_ms:.1f} ms")]
    if echoed != b"x" * 4096:
        checks.append(("FAIL", "remote round trip", f"{where} did not return what was written"))
    maxmemory = int(memory.get("maxmemory", 0) or 0)
    policy = str(memory.get("maxmemory_policy", "?"))
    if maxmemory == 0 or policy == "noeviction":
        checks.append(("WARN", "remote memory", f"maxmemory={_size(maxmemory) if maxmemory else 0}"
                       f", maxmemory-policy={policy}: give the server a maxmemory and "
                       f"maxmemory-policy allkeys-lru, else it grows until full and then refuses "
                       f"writes"))
    else:
        checks.append(("OK", "remote memory", f"maxmemory {_size(maxmemory)}, policy {policy}"))
    return checks


def inspect_remote(url: str, prefix: str, limit: int, timeout_s: float = 5.0) -> dict[str, Any]:
    """Keys under ``prefix`` grouped by namespace fingerprint and rank: count, value bytes (the
    sum of STRLEN), the oldest and newest write (from the value headers of a sample) and the
    smallest TTL. At most ``limit`` keys are looked at."""
    from tokenvm_vllm.tiers.remote.value import value_header

    target = parse_remote_url(url)
    client = _client(target, timeout_s)
    groups: dict[tuple[str, str], dict[str, Any]] = defaultdict(
        lambda: {"keys": 0, "bytes": 0, "min_ttl_s": None, "oldest_s": None, "newest_s": None,
                 "bad_headers": 0})
    names: list[bytes] = []
    for name in client.scan_iter(match=f"{prefix}:*", count=1000):
        names.append(name)
        if len(names) >= limit:
            break
    now_ns = time.time_ns()
    for start in range(0, len(names), 256):
        chunk = names[start:start + 256]
        pipe = client.pipeline(transaction=False)
        for name in chunk:
            pipe.strlen(name)
            pipe.pttl(name)
            pipe.getrange(name, 0, 4095)
        results = pipe.execute(raise_on_error=False)
        for i, name in enumerate(chunk):
            length, ttl_ms, head = results[3 * i:3 * i + 3]
            parts = name.decode(errors="replace").split(":")
            key = (parts[1] if len(parts) > 3 else "?", parts[2] if len(parts) > 3 else "?")
            group = groups[key]
            group["keys"] += 1
            group["bytes"] += length if isinstance(length, int) else 0
            if isinstance(ttl_ms, int) and ttl_ms >= 0:
                ttl = ttl_ms / 1000
                group["min_ttl_s"] = ttl if group["min_ttl_s"] is None else min(
                    group["min_ttl_s"], ttl)
            header = value_header(head) if isinstance(head, bytes) else None
            if header is None:
                group["bad_headers"] += 1
                continue
            age = max(0.0, (now_ns - header.seq) / 1e9)
            group["oldest_s"] = age if group["oldest_s"] is None else max(group["oldest_s"], age)
            group["newest_s"] = age if group["newest_s"] is None else min(group["newest_s"], age)
    return {
        "server": target.describe(), "prefix": prefix, "keys_seen": len(names),
        "truncated": len(names) >= limit,
        "namespaces": [{"namespace": ns, "rank": rank, **group}
                       for (ns, rank), group in sorted(groups.items())],
    }


def cmd_remote_inspect(args: argparse.Namespace) -> int:
    try:
        summary = inspect_remote(args.url, args.prefix, args.limit)
    except ValueError as exc:
        print(str(exc))
        return 1
    except Exception as exc:  # a tool: one line, not a traceback
        print(f"tokenvm: cannot read {mask_url(args.url)}: {type(exc).__name__}: "
              f"{mask_url(str(exc))}")
        return 1
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    more = " (limit reached: --limit to see more)" if summary["truncated"] else ""
    print(f"{summary['server']}: {summary['keys_seen']} keys under "
          f"'{summary['prefix']}:'{more}")
    for group in summary["namespaces"]:
        ages = ("" if group["oldest_s"] is None else
                f", written {group['newest_s']:.0f}-{group['oldest_s']:.0f} s ago")
        ttl = "" if group["min_ttl_s"] is None else f", min TTL {group['min_ttl_s']:.0f} s"
        bad = f", {group['bad_headers']} unreadable" if group["bad_headers"] else ""
        print(f"  namespace {group['namespace']} rank {group['rank']}: {group['keys']} blocks, "
              f"{_size(group['bytes'])}{ages}{ttl}{bad}")
    return 0


def cmd_remote_bench(args: argparse.Namespace) -> int:
    """Print the throughput table (and write JSON with ``--json``)."""
    from tokenvm_vllm.bench.remote_bench import run, table

    try:
        sizes = [int(size) for size in args.block_bytes.split(",")]
        rows = run(args.url, sizes, args.megabytes, args.batch, args.threads, args.repeat)
    except (ValueError, RuntimeError) as exc:
        print(mask_url(str(exc)))
        return 1
    print(table(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)
    return 0
