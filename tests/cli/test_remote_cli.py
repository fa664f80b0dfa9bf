"""The remote tier's tools against a real redis-server on 127.0.0.1: the doctor check,
``tokenvm remote-inspect`` and ``tokenvm remote-bench``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.redis_servers import HOST, RedisCluster, RedisServer, free_port, require_redis_binaries
from tokenvm_vllm import cli
from tokenvm_vllm.bench import remote_bench
from tokenvm_vllm.cli.remote import remote_checks
from tokenvm_vllm.keys import make_block_key
from tokenvm_vllm.tiers.remote.store import RemoteStore

NS = bytes(range(16))


def test_doctor_check_reports_version_policy_and_round_trip(redis_server: RedisServer) -> None:
    checks = remote_checks(redis_server.url, "tokenvm")
    assert checks[0][0] == "OK" and "Redis 7" in checks[0][2] and "set+get+del" in checks[0][2]
    assert ("WARN", "remote memory") == checks[-1][:2]  # no maxmemory: unbounded
    redis_server.cli("CONFIG", "SET", "maxmemory", "64mb")
    redis_server.cli("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    assert remote_checks(redis_server.url, "tokenvm")[-1][0] == "OK"
    assert int(redis_server.cli("DBSIZE")) == 0  # the probe cleaned up


def test_doctor_check_fails_clearly_and_masks_the_password(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    require_redis_binaries()
    url = f"redis://:pw-secret@{HOST}:{free_port()}/0"
    (status, name, detail), = remote_checks(url, "tokenvm", timeout_s=0.5)
    assert status == "FAIL" and name == "remote tier" and "pw-secret" not in detail
    assert "***" in detail
    for key in [k for k in os.environ if k.startswith("TOKENVM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("TOKENVM_REMOTE_URL", url)
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "pw-secret" not in out and "FAIL  remote tier" in out


def test_remote_inspect_lists_namespaces(redis_server: RedisServer,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    for rank in (0, 1):
        with RemoteStore(redis_server.url, NS, rank, 4096, key_prefix="prod") as store:
            keys = [make_block_key(bytes([i]) * 32) for i in range(3 + rank)]
            assert all(store.put(keys, [np.zeros(4096, np.uint8)] * len(keys)).result(5))
    redis_server.cli("SET", "prod:junk:r0:00", "x")
    redis_server.cli("SET", "other:x", "y")
    assert cli.main(["remote-inspect", redis_server.url, "--prefix", "prod", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    groups = {(g["namespace"], g["rank"]): g for g in summary["namespaces"]}
    assert groups[(NS.hex(), "r0")]["keys"] == 3 and groups[(NS.hex(), "r1")]["keys"] == 4
    assert groups[(NS.hex(), "r0")]["bytes"] == 3 * (4096 + 4096)
    assert groups[(NS.hex(), "r0")]["oldest_s"] < 60 and groups[("junk", "r0")]["bad_headers"] == 1
    assert summary["keys_seen"] == 8
    assert cli.main(["remote-inspect", redis_server.url, "--prefix", "prod"]) == 0
    assert f"namespace {NS.hex()} rank r1: 4 blocks" in capsys.readouterr().out
    # ``tokenvm inspect`` takes a remote_url too and answers as remote-inspect does.
    assert cli.main(["inspect", redis_server.url, "--prefix", "prod", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keys_seen"] == 8
    assert cli.main(["inspect", redis_server.url, "--prefix", "prod", "--verify"]) == 1
    assert "--verify reads disk slots" in capsys.readouterr().err


def test_remote_bench_prints_both_sources(redis_server: RedisServer, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    # 16 MiB: 64 single calls, enough for redis-benchmark's clock (shorter runs it reports
    # at an infinite rate, which leaves no share or ceiling to check)
    assert cli.main(["remote-bench", redis_server.url, "--block-bytes", "65536",
                     "--megabytes", "16", "--batch", "8", "--threads", "2",
                     "--repeat", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    hops = [r for r in rows if r["source"] == "thread hop"]
    assert len(hops) == 1 and 0 < hops[0]["seconds"] < 0.01  # one, the best of the rounds
    rows = [r for r in rows if r["source"] != "thread hop"]
    ours = [r for r in rows if r["source"] == "tokenvm"]
    assert {(r["op"], r["mode"]) for r in ours} == {
        ("put", "single"), ("get", "single"), ("put", "batch 8 x 2"), ("get", "batch 8 x 2")}
    assert all(r["ok"] == r["blocks"] and r["gb_per_s"] > 0 for r in ours)
    plain = [r for r in rows if r["source"] == "redis-benchmark"]
    assert {r["op"] for r in plain} == {"set", "get"}
    # Like for like: redis-benchmark moves values of our size (block + header).
    assert {r["value_bytes"] for r in rows} == {65536 + 4096}
    # The redis-py path next to the fast path; one row each, the best of the two rounds.
    assert len([r for r in rows if r["source"] == "tokenvm redis-py"]) == 4 and len(ours) == 4
    printed = capsys.readouterr().out
    assert "| tokenvm | get | batch 8 x 2 | 65536 |" in printed
    # Single rows carry the ceiling a thread hop leaves: plain / (plain + hop) of the plain
    # client's calls per second, below 100%; batched rows none.
    plain_get = next(r["blocks_per_s"] for r in plain
                     if r["op"] == "get" and r["mode"] == "single")
    ceiling = remote_bench.ceiling_share(plain_get, hops[0]["seconds"])
    assert 0 < ceiling < 1
    single_get = next(line for line in printed.splitlines()
                      if line.startswith("| tokenvm | get | single | 65536 |"))
    assert single_get.rstrip(" |").endswith(f"{ceiling:.0%}")
    batched = next(line for line in printed.splitlines()
                   if line.startswith("| tokenvm | get | batch 8 x 2 |"))
    assert batched.endswith("|  |")
    assert int(redis_server.cli("EVAL", "return #redis.call('keys', 'tokenvm-bench:*')",
                                "0")) == 0  # our keys are deleted after the run
    assert int(redis_server.cli("DBSIZE")) == 0  # and redis-benchmark's keyspace too


def test_remote_bench_on_a_cluster_compares_and_cleans_up(redis_cluster: RedisCluster,
                                                          tmp_path: Path) -> None:
    """On a cluster: our rows (redis-py's cluster client) next to ``redis-benchmark
    --cluster`` over its keyspace, which is filled and deleted across the masters."""
    out = tmp_path / "bench.json"
    assert cli.main(["remote-bench", "redis://" + redis_cluster.seeds, "--block-bytes",
                     "16384", "--megabytes", "1", "--batch", "8", "--threads", "2",
                     "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    ours = [r for r in rows if r["source"] == "tokenvm"]
    assert len(ours) == 4 and all(r["ok"] == r["blocks"] for r in ours)
    assert {r["op"] for r in rows if r["source"] == "redis-benchmark"} == {"set", "get"}
    # Our keys are deleted on every master (redis-benchmark keeps one key per node there).
    assert all(int(node.cli("EVAL", "return #redis.call('keys', 'tokenvm-bench:*')", "0")) == 0
               for node in redis_cluster.masters())
