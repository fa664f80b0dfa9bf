"""The remote tier inside vLLM's real Scheduler (CPU) with TokenVM's real worker side and a
real redis-server on 127.0.0.1: one "server" stores blocks, a fresh one with an empty host tier
serves them from Redis. The harness's fake forward checks every loaded KV position."""

from __future__ import annotations

import glob
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.connector.test_scheduler_level import prompts
from tests.harness import Harness
from tests.redis_servers import HOST, RedisServer, free_port


def remote_harness(make_harness: Callable[..., Harness], url: str, **extra: Any) -> Harness:
    model_dir = extra.pop("model_dir", None)
    config = {"host_bytes": 64 * 256, "remote_url": url, "remote_timeout_s": 1.0, **extra}
    return make_harness(model_dir, num_gpu_blocks=24, extra_config=config)


def serve(h: Harness, seed: int, salt: str | None = None) -> None:
    (p,) = prompts(1, prefix_blocks=8, suffix=5, seed=seed)
    h.add(p, cache_salt=salt)
    h.run()


@pytest.mark.parametrize("process", [False, True], ids=["threads", "process"])
def test_fresh_server_is_served_from_redis(make_harness: Callable[..., Harness],
                                           redis_server: RedisServer, process: bool) -> None:
    first = remote_harness(make_harness, redis_server.url, remote_process=process)
    if process:  # the pool is shared with the child through an open file, not a name
        assert first.worker.worker.shares_pool
        assert not glob.glob(f"/dev/shm/tokenvm-remote-{os.getpid()}-*")
    serve(first, 1000)
    assert first.stats["remote_written_blocks"] >= 8
    assert int(redis_server.cli("DBSIZE")) >= 8
    first.worker.worker.shutdown()
    second = remote_harness(make_harness, redis_server.url, remote_process=process)
    serve(second, 1000)  # empty host: the prefix comes from Redis, checked position by position
    assert second.stats["remote_hit_blocks"] >= 8
    assert second.stats["loaded_blocks"] >= 8
    assert second.stats["remote_read_bytes"] >= 8 * 256
    assert second.histograms["remote_io_seconds"]
    serve(second, 1001)  # a prefix nobody saw: looked up, missed, computed
    assert second.stats["remote_miss_blocks"] >= 8
    second.worker.worker.shutdown()  # (with remote_process: its child exits now, not at exit)


def test_cache_salt_and_namespace_isolate_blocks(make_harness: Callable[..., Harness],
                                                 redis_server: RedisServer,
                                                 tmp_path: Path) -> None:
    first = remote_harness(make_harness, redis_server.url)
    serve(first, 1100, salt="tenant-a")
    first.worker.worker.shutdown()
    other_salt = remote_harness(make_harness, redis_server.url)
    serve(other_salt, 1100, salt="tenant-b")
    assert other_salt.stats.get("remote_hit_blocks", 0) == 0
    from tokenvm_vllm.tiny_llama import write_tiny_llama

    other_model = str(write_tiny_llama(tmp_path / "other-model", weights=False))
    other_ns = remote_harness(make_harness, redis_server.url, model_dir=other_model)
    serve(other_ns, 1100, salt="tenant-a")
    assert other_ns.stats.get("remote_hit_blocks", 0) == 0
    assert other_ns.stats.get("loaded_blocks", 0) == 0


def test_corrupted_values_are_misses_and_recomputed(make_harness: Callable[..., Harness],
                                                    redis_server: RedisServer) -> None:
    first = remote_harness(make_harness, redis_server.url)
    serve(first, 1200)
    first.worker.worker.shutdown()
    names = redis_server.cli("--scan", "--pattern", "tokenvm:*").split()
    assert len(names) >= 8
    for name in names:
        redis_server.cli("SETRANGE", name, str(4096 + 10), "\x7f")
    second = remote_harness(make_harness, redis_server.url)
    serve(second, 1200)  # the fake forward would raise on a bad block
    assert second.stats["remote_read_failed_blocks"] >= 8
    assert second.stats["remote_corrupt_blocks"] >= 8
    assert second.stats.get("loaded_blocks", 0) == 0
    assert int(redis_server.cli("DBSIZE")) >= 8  # rewritten by the recompute's stores


def test_a_read_that_times_out_is_recomputed_and_not_written_back(
        make_harness: Callable[..., Harness], redis_server: RedisServer) -> None:
    """Redis stalls (DEBUG SLEEP) just as the second server reads a prefix its lookup found
    there: the reads time out, the prefix is recomputed (checked by the fake forward), and as
    Redis never said the blocks were gone they are not written back (a value that failed its
    checks is: the corrupted-values test above)."""
    first = remote_harness(make_harness, redis_server.url)
    serve(first, 1400)
    first.worker.worker.shutdown()
    second = remote_harness(make_harness, redis_server.url, remote_timeout_s=0.3,
                            remote_reads="always")
    scheduler = second.connector.scheduler
    plan = scheduler._plan_remote_reads
    stalls: list[threading.Thread] = []

    def stall_then_plan(state: Any, keys: Any) -> None:
        if not stalls:  # the lookup answered: stall Redis before the reads go out
            stalls.append(threading.Thread(target=redis_server.cli,
                                           args=("DEBUG", "SLEEP", "1.0")))
            stalls[0].start()
            time.sleep(0.1)
        plan(state, keys)

    scheduler._plan_remote_reads = stall_then_plan  # type: ignore[method-assign]
    (p,) = prompts(1, prefix_blocks=8, suffix=5, seed=1400)
    second.add(p)
    deadline = time.monotonic() + 10
    while ((second.scheduler.has_unfinished_requests() or second._copies_pending())
           and time.monotonic() < deadline):
        second.step()
        time.sleep(0.005)  # real time for the timeout to pass (harness steps take ~0.1 ms)
    second.run()
    stalls[0].join()
    assert second.stats["remote_read_unanswered_blocks"] >= 8
    assert second.stats["remote_read_failed_blocks"] >= 8
    assert second.stats.get("remote_hit_blocks", 0) == 0
    assert second.stats.get("remote_written_blocks", 0) == 0
    assert second.stats["remote_write_known_blocks"] >= 8


@pytest.mark.parametrize("process", [False, True], ids=["threads", "process"])
def test_redis_down_serves_without_it_then_comes_back(make_harness: Callable[..., Harness],
                                                      tmp_path: Path, process: bool) -> None:
    port = free_port()
    h = remote_harness(make_harness, f"redis://{HOST}:{port}/0", remote_process=process)
    serve(h, 1300)  # nothing listens: requests run, nothing is shared
    assert h.stats.get("remote_written_blocks", 0) == 0
    assert h.stats.get("remote_outages", 0) == 1
    # The first request came before the workers' first report; once the scheduler knows the
    # tier is down it asks nothing, so no request waits for it.
    asked, deferred = h.stats.get("remote_lookup_blocks", 0), h.stats.get("lookup_deferred", 0)
    serve(h, 1303)
    assert h.stats.get("remote_lookup_blocks", 0) == asked
    assert h.stats.get("lookup_deferred", 0) == deferred
    server = RedisServer(tmp_path / "late", port=port).start()
    try:
        io = h.worker.worker.remote.io  # type: ignore[union-attr]
        if not process:  # (the child's store retries every 2 s, its default)
            io.store.retry_interval_s = 0.1  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while not io.available and time.monotonic() < deadline:
            time.sleep(0.1)
        assert io.available
        serve(h, 1301)  # the first step's report says the store is back
        serve(h, 1302)
        assert h.stats["remote_written_blocks"] >= 8
        assert h.stats["remote_lookup_blocks"] >= 8
    finally:
        h.worker.worker.shutdown()
        server.stop()


def test_fresh_server_is_served_from_a_cluster(make_harness: Callable[..., Harness],
                                               redis_cluster: Any) -> None:
    url = "redis://" + redis_cluster.seeds
    first = remote_harness(make_harness, url, remote_key_prefix="cluster-test")
    serve(first, 1400)
    assert first.stats["remote_written_blocks"] >= 8
    assert sum(int(node.cli("DBSIZE")) > 0 for node in redis_cluster.masters()) >= 2
    first.worker.worker.shutdown()
    second = remote_harness(make_harness, url, remote_key_prefix="cluster-test")
    serve(second, 1400)
    assert second.stats["remote_hit_blocks"] >= 8
    assert second.stats["loaded_blocks"] >= 8
