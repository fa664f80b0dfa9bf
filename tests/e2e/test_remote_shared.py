"""Two vLLM engines (CPU, separate processes) sharing one real redis-server on 127.0.0.1.

Engine A (TokenVM + Redis) serves a workload and writes its blocks to Redis. Engine B is a fresh
process with an empty host tier, the same Redis and the same PYTHONHASHSEED: its first pass
finds the prefixes only A computed in Redis. B's outputs must equal B without TokenVM token for
token, and B must report the hits as external (vLLM's prompt_tokens_by_source) and as remote
hits (TokenVM's counter).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from tests.redis_servers import RedisServer, require_redis_binaries
from tokenvm_vllm.bench.prefix_reuse import EngineSettings, Workload, run_in_subprocess

pytestmark = pytest.mark.e2e

WORKLOAD = Workload(documents=4, questions=2, prefix_blocks=4, suffix_tokens=8, max_tokens=6,
                    batch_size=4)
ENV = {"PYTHONHASHSEED": "0"}  # block hashes must agree between the two processes


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    require_redis_binaries()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, redis: RedisServer,
         engine_settings: Callable[..., EngineSettings]) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("remote-e2e")
    base = engine_settings(num_gpu_blocks=64, max_model_len=512)
    shared = replace(base, connector="tokenvm", extra_config={
        "remote_url": redis.url, "remote_key_prefix": "e2e", "remote_timeout_s": 2.0})
    results = {"a": run_in_subprocess(shared, WORKLOAD, tmp / "a.json", env=ENV)}
    results["keys_after_a"] = int(redis.cli("DBSIZE"))
    results["b"] = run_in_subprocess(shared, WORKLOAD, tmp / "b.json", env=ENV)
    results["baseline"] = run_in_subprocess(base, WORKLOAD, tmp / "baseline.json", env=ENV)
    return results


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
