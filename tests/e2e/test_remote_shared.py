"""Two vLLM engines (CPU, separate processes) sharing one Redis (standalone, then a cluster).

Engine A (TokenVM + Redis) serves a workload and writes its blocks to Redis. Engine B is a fresh
process with an empty host tier, the same Redis and the same PYTHONHASHSEED: its first pass
finds the prefixes only A computed in Redis. B's outputs must equal B without TokenVM token for
token, and B must report the hits as external (vLLM's prompt_tokens_by_source) and as remote
hits (TokenVM's counter). Once with a standalone server, once with a three-master Redis Cluster;
one engine of each pair runs its remote I/O in a child process (``remote_process``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from tests.redis_servers import RedisCluster, RedisServer, require_redis_binaries
from tokenvm_vllm.bench.prefix_reuse import EngineSettings, Workload, run_in_subprocess

pytestmark = pytest.mark.e2e

WORKLOAD = Workload(documents=4, questions=2, prefix_blocks=4, suffix_tokens=8, max_tokens=6,
                    batch_size=4)
ENV = {"PYTHONHASHSEED": "0"}  # block hashes must agree between the two processes


@pytest.fixture(scope="module")
def base(engine_settings: Callable[..., EngineSettings]) -> EngineSettings:
    return engine_settings(num_gpu_blocks=64, max_model_len=512)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, base: EngineSettings) -> dict[str, Any]:
    """B's workload without TokenVM (the reference for token-exact outputs)."""
    out = tmp_path_factory.mktemp("remote-e2e-baseline") / "baseline.json"
    return run_in_subprocess(base, WORKLOAD, out, env=ENV)


@pytest.fixture(scope="module", params=["standalone", "cluster"])
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         base: EngineSettings, baseline: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A then B against one redis-server, or against a three-master Redis Cluster."""
    require_redis_binaries()
    tmp = tmp_path_factory.mktemp(f"remote-e2e-{request.param}")
    if request.param == "cluster":
        server: RedisServer | RedisCluster = RedisCluster(tmp / "cluster", masters=3).start()
        url = "redis://" + server.seeds
    else:
        server = RedisServer(tmp / "redis").start()
        url = server.url
    try:
        # remote_reads "always": every prefix B has not seen must come from Redis. With
        # "auto" the gate's cold start lets one of a batch's requests read at a time, and the
        # rest of that batch recomputes (tests/policies/test_remote_gate.py covers the gate).
        shared = replace(base, connector="tokenvm", extra_config={
            "remote_url": url, "remote_key_prefix": "e2e", "remote_timeout_s": 2.0,
            "remote_reads": "always"})
        # The remote I/O in a child process (remote_process) for one engine of each pair: B
        # reads through it from the standalone server, A writes through it to the cluster.
        process = {**shared.extra_config, "remote_process": True}
        cluster = request.param == "cluster"
        a = replace(shared, extra_config=process) if cluster else shared
        b = shared if cluster else replace(shared, extra_config=process)
        results = {"a": run_in_subprocess(a, WORKLOAD, tmp / "a.json", env=ENV)}
        nodes = server.masters() if isinstance(server, RedisCluster) else [server]
        results["keys_after_a"] = sum(int(node.cli("DBSIZE")) for node in nodes)
        results["b"] = run_in_subprocess(b, WORKLOAD, tmp / "b.json", env=ENV)
        results["baseline"] = baseline
        yield results
    finally:
        server.stop()


def test_a_writes_its_blocks_to_redis(runs: dict[str, Any]) -> None:
    assert runs["a"]["counters"]["tokenvm:remote_written_blocks"] > 0
    assert runs["keys_after_a"] >= WORKLOAD.documents * WORKLOAD.prefix_blocks


def test_b_is_served_from_redis_token_exact(runs: dict[str, Any]) -> None:
    b, baseline = runs["b"], runs["baseline"]
    assert b["outputs"].keys() == baseline["outputs"].keys()
    differing = [k for k in b["outputs"] if b["outputs"][k] != baseline["outputs"][k]]
    assert differing == []
    counters = b["counters"]
    assert counters["tokenvm:remote_hit_blocks"] >= WORKLOAD.documents * WORKLOAD.prefix_blocks
    assert counters["tokenvm:loaded_blocks"] > 0
    assert counters["vllm:prompt_tokens_by_source[external_kv_transfer]"] > 0
    assert counters.get("tokenvm:remote_read_failed_blocks", 0) == 0
