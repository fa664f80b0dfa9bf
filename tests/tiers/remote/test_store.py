"""``RemoteStore`` against real redis-server processes on 127.0.0.1: round trips, checks, and
the faults of issue #15 (down at start-up, killed mid-run, slow, full, restarted empty).

Every test runs with both clients (``client_kind``): the raw-socket fast path (``raw``, what
``auto`` picks for a standalone server) and redis-py."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from tests.redis_servers import HOST, RedisServer, free_port, require_redis_binaries
from tokenvm_vllm.keys import make_block_key
from tokenvm_vllm.tiers.remote.keys import remote_key
from tokenvm_vllm.tiers.remote.raw import RawRedis
from tokenvm_vllm.tiers.remote.store import RemoteStore, Unanswered

NS = bytes(range(16))
SLOT = 8192


def keys(n: int, salt: int = 0) -> list[bytes]:
    return [make_block_key(bytes([salt]) + i.to_bytes(31, "big")) for i in range(n)]


def payloads(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, SLOT, dtype=np.uint8) for _ in range(n)]


def make_store(url: str, **kwargs: object) -> RemoteStore:
    settings: dict[str, object] = dict(timeout_s=0.5, retry_interval_s=0.2)
    settings.update(kwargs)
    return RemoteStore(url, NS, 0, SLOT, **settings)  # type: ignore[arg-type]


@pytest.fixture(autouse=True, params=["raw", "redis-py"])
def client_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every ``RemoteStore`` made in the test uses this client (its ``client=`` default)."""
    kind = str(request.param)
    defaults = RemoteStore.__init__.__kwdefaults__
    assert defaults is not None and "client" in defaults
    monkeypatch.setitem(defaults, "client", kind)
    return kind


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RemoteStore]:
    with make_store(redis_server.url) as s:
        yield s


def wait_until(predicate: object, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_round_trip_with_ttl_and_stats(store: RemoteStore, redis_server: RedisServer,
                                       client_kind: str) -> None:
    assert store.raw == (client_kind == "raw")
    ks, data = keys(20), payloads(20)
    assert store.put(ks, data).result(5) == [True] * 20
    assert store.contains(ks + keys(2, salt=9)).result(5) == [True] * 20 + [False, False]
    outs = [np.zeros(SLOT, np.uint8) for _ in range(20)]
    assert store.get(ks, outs).result(5) == [True] * 20
    assert all(np.array_equal(a, b) for a, b in zip(outs, data, strict=True))
    assert store.key_of(ks[0]) == remote_key("tokenvm", NS, 0, ks[0])  # the one key format
    ttl_ms = int(redis_server.cli("PTTL", store.key_of(ks[0]).decode()))
    assert 0 < ttl_ms <= 3600_000
    stats = store.stats()
    assert stats["hit_blocks"] == 20 and stats["written_blocks"] == 20
    assert stats["read_bytes"] > 20 * SLOT and stats["written_bytes"] > 20 * SLOT
    assert {op for op, _ in store.take_latencies()} == {"put", "contains", "get"}


def test_another_namespace_rank_or_prefix_never_hits(redis_server: RedisServer,
                                                     store: RemoteStore) -> None:
    ks = keys(3)
    assert store.put(ks, payloads(3)).result(5) == [True] * 3
    out = [np.zeros(SLOT, np.uint8) for _ in ks]
    for other in (RemoteStore(redis_server.url, bytes(16), 0, SLOT),
                  RemoteStore(redis_server.url, NS, 1, SLOT),
                  RemoteStore(redis_server.url, NS, 0, SLOT, key_prefix="other")):
        with other:
            assert other.contains(ks).result(5) == [False] * 3
            missed = other.get(ks, out).result(5)
            assert missed == [False] * 3 and not isinstance(missed, Unanswered)  # answered


def test_a_value_failing_its_checks_is_a_miss_and_deleted(
        store: RemoteStore, redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    ks = keys(2)
    store.put(ks, payloads(2)).result(5)
    name = store.key_of(ks[0]).decode()
    redis_server.cli("SETRANGE", name, str(4096 + 100), "X")  # bit rot in the payload
    out = [np.zeros(SLOT, np.uint8) for _ in ks]
    with caplog.at_level(logging.WARNING, logger="vllm.tokenvm"):
        assert store.get(ks, out).result(5) == [False, True]
    assert redis_server.cli("EXISTS", name).strip() == "0"
    assert store.stats()["corrupt_blocks"] == 1
    assert "failed their checks" in caplog.text


def test_password_is_never_logged(tmp_path: object, caplog: pytest.LogCaptureFixture) -> None:
    require_redis_binaries()
    server = RedisServer(tmp_path / "pw", password="hunter2-secret").start()  # type: ignore[operator]
    try:
        with caplog.at_level(logging.INFO, logger="vllm.tokenvm"):
            with make_store(server.url) as good:
                assert good.available
                assert good.put(keys(1), payloads(1)).result(5) == [True]
            wrong = server.url.replace("hunter2-secret", "wrong-secret-xyz")
            with make_store(wrong) as bad:
                assert not bad.available
                assert bad.get(keys(1), [np.zeros(SLOT, np.uint8)]).result(5) == [False]
            server.kill()
            with make_store(server.url) as down:
                assert not down.available
        assert "unreachable" in caplog.text and "credentials" in caplog.text
        assert "hunter2-secret" not in caplog.text and "wrong-secret-xyz" not in caplog.text
        assert ":***@" in caplog.text
    finally:
        server.stop()


def test_down_at_start_up_then_back(tmp_path: object, caplog: pytest.LogCaptureFixture) -> None:
    require_redis_binaries()
    port = free_port()
    with caplog.at_level(logging.INFO, logger="vllm.tokenvm"):
        with make_store(f"redis://{HOST}:{port}/0") as store:
            assert not store.available
            start = time.monotonic()
            assert store.put(keys(4), payloads(4)).result(1) == [False] * 4
            assert store.contains(keys(4)).result(1) == [False] * 4
            assert time.monotonic() - start < 0.1  # no network while down
            server = RedisServer(tmp_path / "late", port=port).start()  # type: ignore[operator]
            try:
                assert wait_until(lambda: store.available)
                assert store.put(keys(4), payloads(4)).result(5) == [True] * 4
            finally:
                server.stop()
    # the store's own warnings (another test's engine may still log on this logger, e.g. the
    # debug-knob reminder thread every minute: seen in CI)
    warnings = [r for r in caplog.records
                if r.levelno == logging.WARNING and r.pathname.endswith("remote/store.py")]
    assert len(warnings) == 1 and "serving without the remote tier" in warnings[0].message
    assert "reachable again" in caplog.text


def test_killed_mid_run_then_restarted_empty(store: RemoteStore,
                                             redis_server: RedisServer) -> None:
    ks = keys(8)
    assert store.put(ks, payloads(8)).result(5) == [True] * 8
    redis_server.kill()
    out = [np.zeros(SLOT, np.uint8) for _ in ks]
    start = time.monotonic()
    assert store.get(ks, out).result(5) == [False] * 8  # a miss, not an exception
    assert store.put(ks, payloads(8)).result(5) == [False] * 8
    assert time.monotonic() - start < 2 * store.timeout_s + 0.5
    assert not store.available and store.outages == 1
    redis_server.start()  # same port, empty
    assert wait_until(lambda: store.available)
    assert store.get(ks, out).result(5) == [False] * 8  # the old blocks are gone: misses
    assert store.put(ks, payloads(8, seed=1)).result(5) == [True] * 8
    assert store.get(ks, out).result(5) == [True] * 8
    assert np.array_equal(out[0], payloads(8, seed=1)[0])


def test_connections_the_server_closed_while_idle_are_replaced(
        store: RemoteStore, redis_server: RedisServer) -> None:
    """The server drops idle clients (its ``timeout``, a proxy's idle limit; here CLIENT KILL):
    the next batch runs on a new connection, not a miss and an outage."""
    ks, data = keys(4), payloads(4)
    assert store.put(ks, data).result(5) == [True] * 4
    outs = [np.zeros(SLOT, np.uint8) for _ in ks]
    assert store.get(ks, outs).result(5) == [True] * 4
    killed = int(redis_server.cli("CLIENT", "KILL", "TYPE", "normal"))
    assert killed >= 1
    time.sleep(0.1)
    assert store.get(ks, outs).result(5) == [True] * 4
    assert store.contains(ks).result(5) == [True] * 4
    assert store.available and store.outages == 0


def test_slow_server_calls_time_out_as_misses(store: RemoteStore,
                                              redis_server: RedisServer) -> None:
    ks = keys(2)
    store.put(ks, payloads(2)).result(5)
    sleeper = threading.Thread(target=redis_server.cli, args=("DEBUG", "SLEEP", "1.5"))
    sleeper.start()
    time.sleep(0.1)
    start = time.monotonic()
    out = [np.zeros(SLOT, np.uint8) for _ in ks]
    late = store.get(ks, out).result(5)
    assert late == [False, False] and isinstance(late, Unanswered)  # not "gone"
    assert time.monotonic() - start < store.timeout_s + 0.4
    sleeper.join()
    assert store.stats()["timeouts"] == 1
    assert store.available  # one slow answer is not an outage
    assert store.get(ks, out).result(5) == [True, True]


def test_bounded_queue_refuses_at_once(redis_server: RedisServer) -> None:
    with make_store(redis_server.url, io_threads=1, max_pending_writes=2,
                    timeout_s=2.0) as store:
        sleeper = threading.Thread(target=redis_server.cli, args=("DEBUG", "SLEEP", "0.5"))
        sleeper.start()
        time.sleep(0.1)
        futures = [store.put(keys(1, salt=i), payloads(1)) for i in range(4)]
        assert futures[2].done() and futures[3].done()  # refused without waiting
        assert futures[2].result() == [False] and futures[3].result() == [False]
        assert [f.result(5) for f in futures[:2]] == [[True], [True]]
        sleeper.join()
        assert store.stats()["dropped_batches"] == 2


def test_full_server_refuses_writes_and_serves_reads(
        store: RemoteStore, redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    ks = keys(4)
    assert store.put(ks, payloads(4)).result(5) == [True] * 4
    used = int(redis_server.cli("INFO", "memory").split("used_memory:")[1].split()[0])
    redis_server.cli("CONFIG", "SET", "maxmemory-policy", "noeviction")
    redis_server.cli("CONFIG", "SET", "maxmemory", str(used + 40 * SLOT))
    with caplog.at_level(logging.WARNING, logger="vllm.tokenvm"):
        results = [store.put(keys(10, salt=i + 1), payloads(10)).result(5) for i in range(10)]
    flat = [ok for batch in results for ok in batch]
    assert any(flat) and not all(flat)
    assert caplog.text.count("is full") == 1
    assert store.available
    out = [np.zeros(SLOT, np.uint8) for _ in ks]
    assert store.get(ks, out).result(5) == [True] * 4


def test_an_unexpected_client_error_is_a_miss_not_an_exception(
        store: RemoteStore, monkeypatch: pytest.MonkeyPatch, client_kind: str) -> None:
    """What redis-py raised on the H200 when an outage seen by one I/O thread closed the client
    under another one's read: a ValueError, not a RedisError. It reached vLLM's step and killed
    the engine; every batch must end as misses instead."""
    import redis

    ks, data = keys(4), payloads(4)
    assert store.put(ks, data).result(5) == [True] * 4

    def closed_file(*_args: object, **_kwargs: object) -> list[object]:
        raise ValueError("I/O operation on closed file.")

    if client_kind == "raw":
        monkeypatch.setattr(RawRedis, "_batch", closed_file)
    else:
        monkeypatch.setattr(redis.client.Pipeline, "execute", closed_file)
    outs = [np.zeros(SLOT, np.uint8) for _ in range(4)]
    assert store.get(ks, outs).result(5) == [False] * 4
    assert store.put(ks, data).result(5) == [False] * 4
    assert store.contains(ks).result(5) == [False] * 4
    assert store.stats()["failed_batches"] >= 3
    monkeypatch.undo()
    assert store.get(ks, outs).result(5) == [True] * 4  # the tier is still there


def test_client_closed_during_large_reads_never_raises(redis_server: RedisServer) -> None:
    """The race itself: the client is closed (as an outage does) while large pipelined reads are
    in flight on several I/O threads; every future completes with a list of bools."""
    big = 1 << 20
    with RemoteStore(redis_server.url, NS, 0, big, timeout_s=2.0, io_threads=4,
                     retry_interval_s=0.2) as s:
        rng = np.random.default_rng(1)
        ks = keys(16, salt=5)
        assert s.put(ks, [rng.integers(0, 256, big, dtype=np.uint8) for _ in ks]).result(20) \
            == [True] * 16
        for delay in (0.0, 0.002, 0.01, 0.03):
            futures = [s.get(ks, [np.zeros(big, np.uint8) for _ in ks]) for _ in range(4)]
            time.sleep(delay)
            client = s._client  # what _mark_down closes
            if client is not None:
                s._close_client(client)
            for future in futures:
                result = future.result(20)
                assert len(result) == 16 and all(isinstance(ok, bool) for ok in result)


def hold_writes(monkeypatch: pytest.MonkeyPatch, client_kind: str) -> threading.Event:
    """From now on every write (SET pipeline) of the ``client_kind`` client waits, on the
    store's write thread, until the returned event is set (at most 10 s)."""
    import redis

    release = threading.Event()
    if client_kind == "raw":
        set_many = RawRedis.set_many

        def slow_raw_writes(client: RawRedis, *args: object, **kwargs: object) -> object:
            release.wait(10)
            return set_many(client, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(RawRedis, "set_many", slow_raw_writes)
    else:
        execute = redis.client.Pipeline.execute

        def slow_writes(pipe: redis.client.Pipeline, *args: object, **kwargs: object) -> object:
            if any(args_[0] == "SET" for args_, _ in pipe.command_stack):
                release.wait(10)
            return execute(pipe, *args, **kwargs)

        monkeypatch.setattr(redis.client.Pipeline, "execute", slow_writes)
    return release


def test_reads_and_writes_have_their_own_thread_counts(redis_server: RedisServer) -> None:
    with make_store(redis_server.url, io_threads=3, write_threads=1) as store:
        counts = {queue: pool._max_workers for queue, pool in store._executors.items()}
        assert counts == {"read": 3, "write": 1}
        ks = keys(4)
        assert store.put(ks, payloads(4)).result(5) == [True] * 4
        assert store.contains(ks).result(5) == [True] * 4
    with make_store(redis_server.url, io_threads=2) as store:  # no write_threads: the same
        assert store._executors["write"]._max_workers == 2


def test_lookups_do_not_wait_behind_a_backlog_of_writes(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, client_kind: str) -> None:
    """Every write thread is stuck in a slow write; a lookup (which a request waits for) and a
    read still answer. With one thread pool for both, they queued behind the writes (seen on
    the H200: server A's requests waited for lookups while its blocks streamed out)."""
    with make_store(redis_server.url, timeout_s=5.0, io_threads=2) as s:
        ks, data = keys(4), payloads(4)
        assert s.put(ks, data).result(5) == [True] * 4
        release = hold_writes(monkeypatch, client_kind)
        writes = [s.put(keys(2, salt=20 + i), payloads(2, seed=i)) for i in range(6)]
        time.sleep(0.2)  # both write threads are now inside slow_writes
        assert not any(w.done() for w in writes)
        try:
            assert s.contains(ks).result(3) == [True] * 4
            outs = [np.zeros(SLOT, np.uint8) for _ in range(4)]
            assert s.get(ks, outs).result(3) == [True] * 4
        finally:
            release.set()
        assert all(w.result(10) == [True, True] for w in writes)


def test_a_write_that_waited_past_the_deadline_is_still_sent(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, client_kind: str) -> None:
    """Writes queued behind a slow write go out when their turn comes, however late: a late
    block is still worth sharing. Reads that late are misses (their request has moved on). On
    the H200, expiring queued writes lost 1,537 of the 4,240 blocks server A had to share."""
    with make_store(redis_server.url, timeout_s=0.3, io_threads=1) as s:
        release = hold_writes(monkeypatch, client_kind)
        writes = [s.put(keys(2, salt=40 + i), payloads(2, seed=i)) for i in range(3)]
        time.sleep(3 * s.timeout_s)  # the second and third now waited past the deadline
        release.set()
        assert [w.result(10) for w in writes] == [[True, True]] * 3
        assert s.stats().get("expired_batches", 0) == 0
        outs = [np.zeros(SLOT, np.uint8) for _ in range(6)]
        assert s.get(keys(2, salt=41) + keys(2, salt=42) + keys(2, salt=40),
                      outs).result(5) == [True] * 6


def test_a_batch_goes_out_in_pipelines_of_batch_bytes(redis_server: RedisServer,
                                                      client_kind: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch bigger than ``batch_bytes`` is sent as several pipelines, in order: every block
    lands and comes back at its own index (a miss in the middle stays in the middle)."""
    import redis as redis_py

    calls: list[int] = []

    def spy(cls: type, name: str) -> None:
        original = getattr(cls, name)

        def counted(self: object, *args: object, **kwargs: object) -> object:
            calls.append(1)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, counted)

    if client_kind == "raw":
        spy(RawRedis, "set_many")
        spy(RawRedis, "get_into")
    else:
        spy(redis_py.client.Pipeline, "execute")
    from tokenvm_vllm.tiers.disk.format import HEADER_BYTES

    with make_store(redis_server.url, batch_bytes=3 * (HEADER_BYTES + SLOT)) as store:
        assert store.blocks_per_call == 3
        ks, data = keys(8), payloads(8, seed=4)
        assert store.put(ks[:5] + ks[6:], data[:5] + data[6:]).result(5) == [True] * 7
        assert len(calls) == 3  # 7 blocks: 3 + 3 + 1
        outs = [np.zeros(SLOT, np.uint8) for _ in range(8)]
        assert store.get(ks, outs).result(5) == [True] * 5 + [False] + [True] * 2
        assert len(calls) == 6  # 8 blocks: 3 + 3 + 2
        assert all(np.array_equal(outs[i], data[i]) for i in (0, 1, 2, 3, 4, 6, 7))
    with make_store(redis_server.url, batch_bytes=1) as store:
        assert store.blocks_per_call == 1  # at least one block per pipeline
