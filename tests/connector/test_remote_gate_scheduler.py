"""remote_reads (issue #15) inside vLLM's real Scheduler (CPU), TokenVM's real worker side and a
real redis-server on 127.0.0.1. The server is made slow for real (``CLIENT PAUSE``: every
command waits) while one request's blocks are read from it, so the scheduler measures a read
rate far below what the harness computes; a later request whose prefix Redis also holds is
then recomputed under ``auto`` (a skip, counted) and still read under ``always``."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.connector.test_remote_scheduler_level import remote_harness, serve
from tests.connector.test_scheduler_level import prompts
from tests.harness import Harness
from tests.redis_servers import RedisServer
from tokenvm_vllm.connector.scheduler import TokenVMScheduler

PAUSE_MS = 400
"""How long Redis answers nothing while the first request's blocks are read: 8 blocks in
>= 0.4 s, against the harness computing a 133-token prompt in a few milliseconds."""


def read_slowly(h: Harness, redis_server: RedisServer, seed: int) -> None:
    """Serve the prompt of ``seed`` from Redis, pausing Redis once its reads are planned (the
    lookup itself ran at full speed)."""
    (p,) = prompts(1, prefix_blocks=8, suffix=5, seed=seed)
    req_id = h.add(p)
    scheduler = h.connector.scheduler
    assert isinstance(scheduler, TokenVMScheduler)
    for _ in range(2000):
        state = scheduler.requests.get(req_id)
        if state is not None and state.remote_reads:
            break
        h.step()
    else:
        raise AssertionError("the request's remote reads were never planned")
    redis_server.cli("CLIENT", "PAUSE", str(PAUSE_MS), "ALL")
    h.run(max_steps=1_000_000)  # the steps spin while Redis is paused


@pytest.mark.parametrize("mode", ["auto", "always"])
def test_slow_remote_reads_are_skipped_and_recomputed(
        make_harness: Callable[..., Harness], redis_server: RedisServer, mode: str,
        tokenvm_log: Callable[[], list[str]]) -> None:
    first = remote_harness(make_harness, redis_server.url)
    serve(first, 1500)
    serve(first, 1501)
    serve(first, 1503)
    assert first.stats["remote_written_blocks"] >= 24
    first.worker.worker.shutdown()

    second = remote_harness(make_harness, redis_server.url, remote_reads=mode)
    scheduler = second.connector.scheduler
    assert isinstance(scheduler, TokenVMScheduler)
    assert (scheduler.remote_gate is None) == (mode == "always")
    serve(second, 1502)  # nobody's prefix: computed in full (the compute rate's sample)
    read_slowly(second, redis_server, 1500)  # cold start: read, however slowly
    assert second.stats["remote_hit_blocks"] >= 8
    loaded, hits = second.stats["loaded_blocks"], second.stats["remote_hit_blocks"]
    if scheduler.remote_gate is not None:
        gate = scheduler.remote_gate
        assert gate.read_rate is not None and gate.compute_rate is not None
        # 16 tokens a block: reading is the slower way (by ~100x here)
        assert gate.read_rate * 16 < gate.compute_rate, gate.describe()

    lines = tokenvm_log()
    serve(second, 1501)  # in Redis too, but now known to be slow
    serve(second, 1503)  # another one: skipped too, not logged again
    skip_lines = [line for line in lines if "recomputing instead" in line]
    if mode == "auto":
        assert second.stats["remote_skipped_blocks"] >= 16
        assert second.stats["remote_hit_blocks"] == hits  # nothing read
        assert second.stats["loaded_blocks"] == loaded  # computed (the forward checks its KV)
        assert len(skip_lines) == 1 and "blocks/s" in skip_lines[0], skip_lines
    else:
        assert second.stats.get("remote_skipped_blocks", 0) == 0
        assert second.stats["remote_hit_blocks"] >= hits + 16
        assert second.stats["loaded_blocks"] >= loaded + 16
        assert skip_lines == []
