"""``RemoteStore``: the remote tier's client over the ``redis`` package (standalone or Cluster).

Contract for callers (the scheduler's lookups, the worker's mover):

* Nothing blocks on the network. ``contains``, ``get`` and ``put`` submit one *batch* (one
  pipeline: one round trip per server node) to the store's own threads and return a
  ``Future[list[bool]]`` at once, one bool per key. Reads (``contains``, ``get``) and writes
  (``put``, ``delete``) have ``io_threads`` threads each (writes ``write_threads`` when given):
  a lookup, which a request waits for,
  never queues behind a backlog of writes (on the H200 one shared pool did exactly that).
* Queues are bounded: at most ``max_pending_reads`` read batches (``contains``, ``get``) and
  ``max_pending_writes`` write batches (``put``) wait or run; a batch that does not fit is
  refused at once (all False, counted in ``dropped_batches``).
* Every call has a deadline, ``timeout_s``: the socket timeouts, and a read batch that waited
  in the queue past it is not sent (a write batch is: late, it is still worth having). No
  answer in time is a miss (False), never an exception.
* Server down (refused, reset, unreachable, or three timeouts in a row): one warning, the store
  serves without the tier (every call False at once, no network), and a background thread tries
  again every ``retry_interval_s``; when the server answers, one info line and the tier is back.
  This is the state at start-up too if the server is not there.
* Server full (``maxmemory`` reached under ``noeviction``): writes fail (False), one warning per
  episode; reads go on.
* A value that fails its checks (``value.py``) is a miss and is deleted.
* A batch the server did not answer (refused, expired in the queue, timed out, failed, or the
  server is down) comes back as ``Unanswered``: all False, like a miss, but its blocks may well
  be on the server; a plain list of False means the server answered that it lacks them (or
  held values that failed their checks).
* The password is never logged: every line names the server by ``RemoteTarget.describe()``,
  and error texts from the client pass through ``_scrub``.
* Writes set a TTL (``ttl_s``); the server's own ``maxmemory-policy`` (e.g. ``allkeys-lru``)
  bounds it further.

Two clients behind this one contract (``client=``): ``raw.RawRedis`` for a standalone server
(plain or TLS): values read straight into ``out`` and written from the payload without copies;
and redis-py (``redis.Redis`` / ``RedisCluster``) for a cluster, or on request. ``"auto"``
picks the raw client for a standalone server. Both raise redis-py's error classes, so ``_run``
treats their timeouts, outages and error replies alike.

For ``get``, the caller must not touch an ``out`` buffer until the future is done; for ``put``,
it must keep each payload unchanged until then (the scheduler's slot pins ensure both). After a
``get`` answered False for a block, its ``out`` holds unspecified bytes (the raw client reads a
value into ``out`` before its checksum can be verified): a miss's host row is never served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from tokenvm_vllm.keys import BlockKey
from tokenvm_vllm.tiers.disk.format import CHECKSUMS, HEADER_BYTES
from tokenvm_vllm.tiers.remote.keys import key_name_prefix, namespace_pattern
from tokenvm_vllm.tiers.remote.raw import RawRedis
from tokenvm_vllm.tiers.remote.url import RemoteTarget, parse_remote_url
from tokenvm_vllm.tiers.remote.value import (
    HeaderCheck,
    decode_into,
    encode_value,
    encode_value_iov,
)

logger = logging.getLogger("vllm.tokenvm")


class Unanswered(list[bool]):
    """A batch's result when the server gave no answer for it (module docstring): ``n`` times
    False, and the keys' presence unknown."""

    def __init__(self, n: int) -> None:
        super().__init__([False] * n)


_TIMEOUTS_BEFORE_DOWN = 3
"""Consecutive failed batches (timeouts; connection errors in a cluster) after which the server
counts as down (hung, not just slow; the whole cluster, not one node failing over)."""

Client = Any
"""``RawRedis``, ``redis.Redis`` or ``redis.cluster.RedisCluster`` (redis-py's two: their common
subset is what we use)."""

CLIENTS = ("auto", "raw", "redis-py")
"""``client=`` values: ``raw`` (standalone only), ``redis-py``, ``auto`` (raw if standalone)."""


class RemoteStore:
    """The remote tier for one namespace (a 16-byte fingerprint) and tensor-parallel rank.

    ``slot_bytes``: every block's payload size (a host-pool row). ``client``: one of
    ``CLIENTS`` (module docstring). See the module docstring for the contract; ``stats()``
    returns counters since the last call.
    """

    def __init__(
        self, url: str, namespace: bytes, tp_rank: int, slot_bytes: int, *,
        key_prefix: str = "tokenvm", ttl_s: float = 3600.0, timeout_s: float = 0.5,
        io_threads: int = 4, max_pending_reads: int = 64, max_pending_writes: int = 64,
        retry_interval_s: float = 2.0, client: str = "auto", batch_bytes: int = 32 << 20,
        write_threads: int | None = None,
    ) -> None:
        self.target: RemoteTarget = parse_remote_url(url)
        if client not in CLIENTS:
            raise ValueError(f"tokenvm: remote client={client!r} is not one of "
                             f"{', '.join(CLIENTS)}: use auto")
        if client == "raw" and self.target.cluster:
            raise ValueError(f"tokenvm: remote client='raw' serves one standalone server, but "
                             f"{self.target.describe()} is a cluster: use auto or redis-py")
        self.raw = client == "raw" or (client == "auto" and not self.target.cluster)
        """Whether this store talks to its server through ``RawRedis``."""
        self.namespace = namespace
        self.tp_rank = tp_rank
        self.slot_bytes = slot_bytes
        self.blocks_per_call = max(1, batch_bytes // (HEADER_BYTES + slot_bytes))
        """Blocks per pipeline sent to the server (``batch_bytes`` of values, at least one):
        a batch larger than that goes out as several pipelines, one after another on its
        thread. On the H200 one pipeline of 256 2-MiB values held the single-threaded server
        long enough that other threads' calls passed ``timeout_s`` and the tier was marked down."""
        self.key_prefix = key_prefix
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.timeout_s = timeout_s
        self.retry_interval_s = retry_interval_s
        self.where = self.target.describe()
        self._header_check = HeaderCheck(namespace, tp_rank, slot_bytes)
        self._name_prefix = key_name_prefix(key_prefix, namespace, tp_rank)
        threads = {"read": io_threads, "write": write_threads or io_threads}
        self._executors = {queue: ThreadPoolExecutor(threads[queue],
                                                     thread_name_prefix=f"tokenvm-remote-{queue}")
                           for queue in ("read", "write")}
        self._lock = threading.Lock()
        self._client: Client | None = None
        self._closed = threading.Event()
        self._retry_thread: threading.Thread | None = None
        self._pending = {"read": 0, "write": 0}
        self._limits = {"read": max_pending_reads, "write": max_pending_writes}
        self._timeouts_in_a_row = 0
        self._full = False
        self._warned: set[str] = set()
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self._latencies: deque[tuple[str, float]] = deque(maxlen=100_000)
        self.outages = 0
        """Times the server went away (at start-up included)."""
        self._connect_or_mark_down("start-up")

    # -- connection ------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """Whether calls go to the server now (False while it is down and being retried)."""
        return self._client is not None

    def _make_client(self) -> Client:
        target, timeout = self.target, self.timeout_s
        if self.raw:
            raw = RawRedis(target, timeout)
            raw.ping()
            return raw
        common: dict[str, Any] = dict(
            username=target.username, password=target.password, ssl=target.tls,
            socket_timeout=timeout, socket_connect_timeout=timeout, **dict(target.tls_options))
        if target.cluster:
            # One retry: after a MOVED or a dead node the client re-reads the topology first.
            client: Client = RedisCluster(
                startup_nodes=[ClusterNode(host, port)  # type: ignore[no-untyped-call]
                               for host, port in target.nodes],
                retry=Retry(NoBackoff(), 1), require_full_coverage=False, **common)
        else:
            host, port = target.nodes[0]
            client = redis.Redis(host=host, port=port, db=target.db, retry=Retry(NoBackoff(), 0),
                                 **common)
        client.ping()
        return client

    def _connect_or_mark_down(self, when: str) -> bool:
        try:
            client = self._make_client()
        except (redis.RedisError, OSError) as err:
            self._mark_down(err, when)
            return False
        with self._lock:
            self._client = client
            self._timeouts_in_a_row = 0
        logger.info("TokenVM remote tier: connected to %s", self.where)
        return True

    def _mark_down(self, err: BaseException, when: str) -> None:
        """Serve without the tier from now on; warn once per outage; retry in the background."""
        with self._lock:
            client, self._client = self._client, None
            first = client is not None or when == "start-up"
            if first:
                self.outages += 1
            start_retry = (self._retry_thread is None or not self._retry_thread.is_alive())
            if start_retry and not self._closed.is_set():
                self._retry_thread = threading.Thread(
                    target=self._retry_loop, name="tokenvm-remote-retry", daemon=True)
                self._retry_thread.start()
        if client is not None:
            self._close_client(client)
        if first:
            self._count("outages", 1)
            logger.warning(
                "TokenVM remote tier: %s is unreachable at %s (%s); serving without the remote "
                "tier, retrying every %.1fs", self.where, when, self._scrub(err),
                self.retry_interval_s)
            if isinstance(err, redis.AuthenticationError):
                logger.warning("TokenVM remote tier: %s refused the credentials in remote_url: "
                               "check the user and password", self.where)

    def _retry_loop(self) -> None:
        while not self._closed.wait(self.retry_interval_s):
            if self._client is not None:
                return
            try:
                client = self._make_client()
            except (redis.RedisError, OSError):
                continue
            with self._lock:
                if self._closed.is_set():
                    self._close_client(client)
                    return
                self._client = client
                self._timeouts_in_a_row = 0
                self._full = False
            logger.info("TokenVM remote tier: %s is reachable again; remote tier back",
                        self.where)
            return

    @staticmethod
    def _close_client(client: Client) -> None:
        try:
            client.close()
        except (redis.RedisError, OSError):
            pass

    def _scrub(self, err: BaseException | str) -> str:
        """An error's text with the password (if any) masked."""
        text = str(err)
        if self.target.password:
            text = text.replace(self.target.password, "***")
        return text

    def _count(self, name: str, n: int) -> None:
        with self._counts_lock:
            self._counts[name] += n

    def _count_many(self, **counts: int) -> None:
        """Several counters under one lock (a batch's counters together)."""
        with self._counts_lock:
            self._counts.update(counts)

    def _warn_once(self, kind: str, msg: str, *args: Any) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning(msg, *args)

    # -- batches -------------------------------------------------------------------------------

    def key_of(self, key: BlockKey) -> bytes:
        """Block ``key``'s Redis key (``keys.remote_key``, its fixed start computed once)."""
        return self._name_prefix + key.hex().encode()

    def contains(self, keys: Sequence[BlockKey]) -> Future[list[bool]]:
        """Which ``keys`` the server holds now (EXISTS; the value is checked only on ``get``)."""
        names = [self.key_of(key) for key in keys]

        def run(client: Client) -> list[bool]:
            if isinstance(client, RawRedis):
                return client.exists_many(names)
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.exists(name)
            return [result is True or (isinstance(result, int) and result > 0)
                    for result in pipe.execute(raise_on_error=False)]

        return self._submit("read", "contains", len(keys), run)

    def get(self, keys: Sequence[BlockKey], outs: Sequence[np.ndarray]) -> Future[list[bool]]:
        """Read each block into its ``out`` (a C-contiguous array of ``slot_bytes`` bytes, e.g.
        a host-pool row). True: ``out`` holds the verified bytes; False: a miss, ``out``'s
        bytes unspecified (module docstring)."""
        if len(keys) != len(outs):
            raise ValueError(f"tokenvm: remote get of {len(keys)} keys into {len(outs)} buffers")
        names = [self.key_of(key) for key in keys]
        views = [out.reshape(-1).view(np.uint8) for out in outs]
        for view in views:
            if view.nbytes != self.slot_bytes:
                raise ValueError(f"tokenvm: remote get buffer of {view.nbytes} bytes, expected "
                                 f"{self.slot_bytes}")

        def run(client: Client) -> list[bool]:
            ok: list[bool] = []
            bad: list[bytes] = []
            for part in self._calls(len(names)):
                if isinstance(client, RawRedis):
                    ok_part, bad_part = self._raw_get(client, names[part], keys[part],
                                                      views[part])
                else:
                    ok_part, bad_part = self._redispy_get(client, names[part], keys[part],
                                                          views[part])
                ok += ok_part
                bad += bad_part
            if bad:
                self._count("corrupt_blocks", len(bad))
                self._warn_once("corrupt", "TokenVM remote tier: %d value(s) on %s failed their "
                                "checks (foreign, torn or another version); treated as misses "
                                "and deleted", len(bad), self.where)
                _delete_names(client, bad)
            hits = sum(ok)
            self._count_many(hit_blocks=hits, miss_blocks=len(ok) - hits,
                             read_bytes=hits * (HEADER_BYTES + self.slot_bytes))
            return ok

        return self._submit("read", "get", len(keys), run)

    def _redispy_get(self, client: Client, names: list[bytes], keys: Sequence[BlockKey],
                     views: list[np.ndarray]) -> tuple[list[bool], list[bytes]]:
        """(hit per key, names of values failing their checks) through a redis-py pipeline."""
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.get(name)
        values = pipe.execute(raise_on_error=False)
        ok, bad = [], []
        for name, key, value, view in zip(names, keys, values, views, strict=True):
            if isinstance(value, Exception) or value is None:
                ok.append(False)
                continue
            good = decode_into(value, self.namespace, self.tp_rank, key, view)
            ok.append(good)
            if not good:
                bad.append(name)
        return ok, bad

    def _raw_get(self, client: RawRedis, names: list[bytes], keys: Sequence[BlockKey],
                 views: list[np.ndarray]) -> tuple[list[bool], list[bytes]]:
        """As ``_redispy_get``, each payload received straight into its ``out`` and checked
        there: the header (key echo, namespace, rank, length), then the payload's checksum
        (``RawRedis.get_into``)."""
        headers: list[tuple[int, int] | None] = [None] * len(names)
        header_check = self._header_check

        def check(i: int, header: memoryview | None, payload: memoryview | None) -> bool:
            if header is not None:
                headers[i] = header_check(header, keys[i])
                return headers[i] is not None
            found = headers[i]
            return found is not None and CHECKSUMS[found[0]](payload) == found[1]

        results = client.get_into(names, memoryview(bytearray(HEADER_BYTES)),
                                  [memoryview(view) for view in views], check)  # type: ignore[arg-type]
        ok = [result is True for result in results]
        bad = [name for name, result in zip(names, results, strict=True) if result is False]
        return ok, bad

    def put(self, keys: Sequence[BlockKey], payloads: Sequence[Any]) -> Future[list[bool]]:
        """Store each block (``payloads[i]``: ``slot_bytes`` contiguous bytes) with the TTL.
        True once the server acknowledged it."""
        if len(keys) != len(payloads):
            raise ValueError(f"tokenvm: remote put of {len(keys)} keys with {len(payloads)} "
                             f"payloads")
        names = [self.key_of(key) for key in keys]

        def run(client: Client) -> list[bool]:
            nbytes = 0
            results: list[Any] = []
            for part in self._calls(len(names)):
                if isinstance(client, RawRedis):
                    parts = [encode_value_iov(self.namespace, self.tp_rank, key, payload)
                             for key, payload in zip(keys[part], payloads[part], strict=True)]
                    nbytes += sum(HEADER_BYTES + data.nbytes for _, _, data in parts)
                    results += client.set_many(names[part], parts, self.ttl_ms)
                else:
                    pipe = client.pipeline(transaction=False)
                    for name, key, payload in zip(names[part], keys[part], payloads[part],
                                                  strict=True):
                        value = encode_value(self.namespace, self.tp_rank, key, payload)
                        nbytes += len(value)
                        pipe.set(name, value, px=self.ttl_ms)
                    results += pipe.execute(raise_on_error=False)
            ok = [result is True for result in results]
            errors = [r for r in results if isinstance(r, Exception)]
            if errors:
                self._on_write_errors(errors)
            elif self._full:
                self._full = False
                logger.info("TokenVM remote tier: %s accepts writes again", self.where)
            written = sum(ok)
            self._count_many(written_blocks=written, write_failed_blocks=len(ok) - written,
                             written_bytes=nbytes * written // max(1, len(ok)))
            return ok

        return self._submit("write", "put", len(keys), run)

    def _on_write_errors(self, errors: list[Exception]) -> None:
        for err in errors:
            if isinstance(err, redis.OutOfMemoryError) or "OOM" in str(err):
                if not self._full:
                    self._full = True
                    self._count("full_episodes", 1)
                    logger.warning(
                        "TokenVM remote tier: %s is full (maxmemory reached and its policy "
                        "evicts nothing); blocks are not shared until it has room (set "
                        "maxmemory-policy allkeys-lru on the server)", self.where)
                return
            if isinstance(err, (redis.ConnectionError, redis.TimeoutError)):
                raise err
        self._warn_once("write-error", "TokenVM remote tier: writes to %s fail: %s",
                        self.where, self._scrub(errors[0]))

    def delete(self, keys: Sequence[BlockKey]) -> Future[list[bool]]:
        """Remove ``keys`` (True: the key existed)."""
        names = [self.key_of(key) for key in keys]

        return self._submit("write", "delete", len(keys),
                            lambda client: _delete_names(client, names))

    def _calls(self, n: int) -> list[slice]:
        """The pipelines one batch of ``n`` blocks goes out as (``blocks_per_call`` each)."""
        step = self.blocks_per_call
        return [slice(lo, min(n, lo + step)) for lo in range(0, n, step)]

    def _submit(self, queue: str, op: str, n: int,
                run: Callable[[Client], list[bool]]) -> Future[list[bool]]:
        miss: Future[list[bool]]
        if n == 0 or self._client is None or self._closed.is_set():
            miss = Future()
            miss.set_result(Unanswered(n))
            if n and self._client is None:
                self._count(f"{op}_unavailable_blocks", n)
            return miss
        with self._lock:
            if self._pending[queue] >= self._limits[queue]:
                self._count("dropped_batches", 1)
                miss = Future()
                miss.set_result(Unanswered(n))
                return miss
            self._pending[queue] += 1
        submitted = time.monotonic()
        return self._executors[queue].submit(self._run, queue, op, n, run, submitted)

    def _run(self, queue: str, op: str, n: int, run: Callable[[Client], list[bool]],
             submitted: float) -> list[bool]:
        try:
            client = self._client
            if client is None:
                return Unanswered(n)
            # A read that waited past the deadline is a miss: its request has moved on. A write
            # is sent however long it waited: it is still worth having, and its queue is
            # bounded by max_pending_writes (expiring them lost 1,537 of 4,240 blocks on the
            # H200 when batches queued behind a slow Redis).
            if queue == "read" and time.monotonic() - submitted > self.timeout_s:
                self._count("expired_batches", 1)  # waited too long in the queue: a miss
                return Unanswered(n)
            start = time.monotonic()
            try:
                result = run(client)
            except redis.TimeoutError as err:
                self._count("timeouts", 1)
                self._count("failed_batches", 1)
                self._timeouts_in_a_row += 1
                self._warn_once("timeout", "TokenVM remote tier: %s did not answer within "
                                "%.3fs (remote_timeout_s); such calls count as misses",
                                self.where, self.timeout_s)
                if self._timeouts_in_a_row >= _TIMEOUTS_BEFORE_DOWN:
                    self._mark_down(err, f"{op} (timed out {self._timeouts_in_a_row} times)")
                return Unanswered(n)
            except (redis.ConnectionError, OSError) as err:
                self._count("failed_batches", 1)
                if not self.target.cluster:
                    self._mark_down(err, op)
                    return Unanswered(n)
                # One cluster node gone: the client re-reads the topology and a replica takes
                # over; only when batch after batch fails is the whole cluster away.
                self._timeouts_in_a_row += 1
                self._warn_once("node-down", "TokenVM remote tier: a node of %s is unreachable "
                                "(%s); its blocks are misses until the cluster fails over",
                                self.where, self._scrub(err))
                if self._timeouts_in_a_row >= _TIMEOUTS_BEFORE_DOWN:
                    self._mark_down(err, f"{op} (failed {self._timeouts_in_a_row} times)")
                return Unanswered(n)
            except Exception as err:  # noqa: BLE001 - contract: a batch never raises
                # RedisError, and whatever a connection closed under this thread raises (an
                # outage seen by another thread closes the shared client: redis-py then fails
                # with ValueError "I/O operation on closed file"). The future's result is read
                # on vLLM's step path, where an exception kills the engine (seen on the H200).
                self._count("failed_batches", 1)
                self._warn_once(f"error-{type(err).__name__}", "TokenVM remote tier: %s on %s "
                                "failed: %s; counted as a miss", op, self.where, self._scrub(err))
                return Unanswered(n)
            self._timeouts_in_a_row = 0
            self._latencies.append((op, time.monotonic() - start))
            return result
        finally:
            with self._lock:
                self._pending[queue] -= 1

    # -- inspection, counters, shutdown --------------------------------------------------------

    def scan_keys(self, limit: int = 1000, every_rank: bool = True) -> list[bytes]:
        """Up to ``limit`` of this namespace's keys on the server (blocking; for tools, not the
        serving path). Empty while the server is down."""
        client = self._client
        if client is None:
            return []
        pattern = namespace_pattern(self.key_prefix, self.namespace,
                                    None if every_rank else self.tp_rank)
        keys = []
        for name in client.scan_iter(match=pattern, count=1000):
            keys.append(name)
            if len(keys) >= limit:
                break
        return keys

    def stats(self) -> Counter[str]:
        """Counters since the last call (hit_blocks, miss_blocks, read_bytes, written_blocks,
        written_bytes, write_failed_blocks, corrupt_blocks, timeouts, failed_batches,
        dropped_batches, expired_batches, outages, full_episodes, *_unavailable_blocks)."""
        with self._counts_lock:
            counts, self._counts = self._counts, Counter()
        return counts

    def take_latencies(self) -> list[tuple[str, float]]:
        """(op, seconds) of every batch answered since the last call."""
        out = []
        while self._latencies:
            out.append(self._latencies.popleft())
        return out

    def close(self) -> None:
        self._closed.set()
        for executor in self._executors.values():
            executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            self._close_client(client)

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _delete_names(client: Client, names: list[bytes]) -> list[bool]:
    """DEL each name in one pipeline, on either client (True: the key existed)."""
    if isinstance(client, RawRedis):
        return client.delete_many(names)
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.delete(name)
    return [r == 1 for r in pipe.execute(raise_on_error=False)]
