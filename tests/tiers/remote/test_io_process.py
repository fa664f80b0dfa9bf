"""``ProcessSlotIO``: the remote tier's I/O in a child process over a shared host pool, against
a real redis-server on 127.0.0.1 (issue #15: writes from the engine's own process cost it the
GIL). The pool is a real file mapped by this process and by the child."""

from __future__ import annotations

import mmap
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.redis_servers import RedisServer
from tests.tiers.remote.test_store import wait_until
from tokenvm_vllm.keys import make_block_key
from tokenvm_vllm.tiers.remote.io_process import ProcessSlotIO
from tokenvm_vllm.tiers.remote.store import Unanswered

NS = bytes(range(16))
SLOTS = 16
SLOT = 64 * 1024


def keys(n: int, salt: int = 0) -> list[bytes]:
    return [make_block_key(bytes([salt]) + i.to_bytes(31, "big")) for i in range(n)]


class SharedPool:
    """A pool file of ``SLOTS`` rows, mapped here as the worker maps its host pool."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        with open(path, "wb") as f:
            f.truncate(SLOTS * SLOT)
        fd = os.open(path, os.O_RDWR)
        self.map = mmap.mmap(fd, SLOTS * SLOT, flags=mmap.MAP_SHARED)
        os.close(fd)
        self.rows = np.frombuffer(self.map, dtype=np.uint8).reshape(SLOTS, SLOT)


@pytest.fixture
def pool(tmp_path: Path) -> SharedPool:
    return SharedPool(tmp_path / "pool")


def make_io(pool: SharedPool, url: str, **store: object) -> ProcessSlotIO:
    args: dict[str, object] = dict(url=url, namespace=NS, tp_rank=0, slot_bytes=SLOT,
                                   timeout_s=0.5, retry_interval_s=0.2)
    args.update(store)
    return ProcessSlotIO(pool.path, SLOTS, SLOT, False, args, retry_interval_s=0.2)


@pytest.fixture
def io(pool: SharedPool, redis_server: RedisServer) -> Iterator[ProcessSlotIO]:
    io = make_io(pool, redis_server.url)
    yield io
    io.close()


def test_blocks_round_trip_through_the_child_and_no_io_thread_runs_here(
        pool: SharedPool, redis_server: RedisServer) -> None:
    # Thread objects, not idents: a thread that ended may hand its ident to a new one (seen
    # in the full suite: the reader thread then looked old and the check found none).
    before = set(threading.enumerate())
    io = make_io(pool, redis_server.url)
    try:
        rng = np.random.default_rng(1)
        pool.rows[:4] = rng.integers(0, 256, (4, SLOT), dtype=np.uint8)
        names = keys(4)
        assert io.put(names, [0, 1, 2, 3]).result(10) == [True] * 4
        assert io.contains(names + keys(1, salt=9)).result(10) == [True] * 4 + [False]
        assert io.get(names, [8, 9, 10, 11]).result(10) == [True] * 4
        np.testing.assert_array_equal(pool.rows[8:12], pool.rows[:4])  # the child's writes
        counts = io.stats()
        assert counts["written_blocks"] == 4 and counts["hit_blocks"] == 4
        assert counts["read_bytes"] >= 4 * SLOT
        # The point of the child: the store's threads run there; here only the thread that
        # reads its answers was started.
        started = [t.name for t in threading.enumerate() if t not in before]
        assert started == ["tokenvm-remote-process"], started
        assert io.available
    finally:
        io.close()


def test_a_killed_child_fails_what_it_owed_then_another_serves(
        io: ProcessSlotIO, pool: SharedPool, redis_server: RedisServer) -> None:
    pool.rows[0] = 7
    assert io.put(keys(1), [0]).result(10) == [True]
    first = io.child_pid
    assert first is not None
    redis_server.pause()  # the child's GET waits on a server that answers nothing...
    try:
        owed = io.get(keys(1), [5])
        time.sleep(0.1)
        os.kill(first, signal.SIGKILL)  # ...when the child dies
        result = owed.result(10)
        assert isinstance(result, Unanswered) and result == [False]
        late = io.put(keys(1, salt=2), [0]).result(10)  # no child: refused at once
        assert isinstance(late, Unanswered)
        assert not io.available
        assert io.stats()["io_process_exits"] == 1
    finally:
        redis_server.resume()
    assert wait_until(lambda: io.available and io.child_pid not in (None, first), 10.0)
    assert io.get(keys(1), [6]).result(10) == [True]
    assert (pool.rows[6] == 7).all()


def test_close_stops_the_child_and_answers_everything(pool: SharedPool,
                                                      redis_server: RedisServer) -> None:
    io = make_io(pool, redis_server.url)
    pid = io.child_pid
    futures = [io.put(keys(2, salt=i), [0, 1]) for i in range(8)]
    io.close()
    assert all(f.done() for f in futures)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # type: ignore[arg-type]
    assert isinstance(io.put(keys(1), [0]).result(0), Unanswered)
    io.close()  # a second close is harmless


def test_redis_down_at_start_is_reported_and_comes_back(pool: SharedPool,
                                                        tmp_path: Path) -> None:
    from tests.redis_servers import free_port

    port = free_port()
    io = make_io(pool, f"redis://127.0.0.1:{port}/0")
    try:
        assert not io.available
        assert io.stats()["outages"] == 1  # counted at start-up, before any call
        assert isinstance(io.contains(keys(1)).result(10), Unanswered)
        server = RedisServer(tmp_path / "late", port=port).start()
        try:
            assert wait_until(lambda: io.available, 10.0)
            assert io.contains(keys(1)).result(10) == [False]
        finally:
            server.stop()
    finally:
        io.close()
