"""The remote tier's I/O in a process of its own (``remote_process: true``).

Why: with tensor parallelism 1, vLLM runs the worker in its engine-core process, so the
remote tier's threads (``RemoteStore``: one pipelined batch per thread, checksums, socket
calls) share Python's GIL with the thread that schedules requests and launches the model's
kernels. On an H200 a server writing its blocks to Redis lost 25-28% of its throughput (TPOT
1.41-1.56x) against the same server storing the same blocks to host memory only; the same
writes from another process cost a loop of torch calls nothing (``bench/remote_gil.py``).

How: the worker's host pool is a file mapping (``HostPool(shared_path=...)``, in
``/dev/shm``), and a child process (``python -m tokenvm_vllm.tiers.remote.io_process``) maps
the same file and runs the ``RemoteStore``. The worker sends each batch as a small message
(keys and host-pool slot numbers, never block bytes) over a Unix socket; the child reads
values straight into, and writes them straight from, the shared rows, and answers with one
message per batch. In the worker's process one thread only waits for those answers and
resolves their futures: one short GIL hold per batch instead of the store's threads.

Contract (``ProcessSlotIO``, the ``transfer/remote_mover.py: SlotIO`` the mover uses):

* ``contains``, ``get`` and ``put`` return a ``Future[list[bool]]`` at once; every future is
  resolved exactly once, with the store's answer, or ``Unanswered`` when the child is not
  running or exits before answering (its blocks may still be on the server).
* The child answers as ``RemoteStore`` does (deadlines, bounded queues, down / full
  handling): the same settings reach it.
* A child that exits (killed, crashed) is logged with its exit code, counted
  (``io_process_exits``) and started again after ``retry_interval_s``, in the background;
  meanwhile every call is ``Unanswered`` at once and ``available`` is False.
* The child exits when the worker closes its end or dies (end of file on the socket), and
  ignores SIGINT (a Ctrl-C to the server's process group stops the server, which closes it).
* Counters (``stats()``) are the child store's, forwarded with each answer (so a batch's
  counters are in before its future resolves) and otherwise every ``STATE_INTERVAL_S`` with
  availability changes, plus ``io_process_exits``.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from tokenvm_vllm.keys import BlockKey
from tokenvm_vllm.tiers.remote.store import Unanswered

logger = logging.getLogger("vllm.tokenvm")

STATE_INTERVAL_S = 0.1
"""How often the child sends its store's counters and availability when they changed."""
START_TIMEOUT_S = 60.0
"""How long the worker waits for a child to map the pool and connect (Redis down is not a
failure: the store then retries by itself)."""


class ProcessSlotIO:
    """The remote tier for one rank, run by a child process over a shared host pool.

    ``pool_path``: the host pool's file (``num_slots`` rows of ``slot_bytes``; ``reserve``: it
    is a sparse upper bound, mapped ``MAP_NORESERVE``). It is opened once here and the open
    file is handed to every child, so the caller may remove the name afterwards.
    ``store_args``: ``RemoteStore``'s keyword arguments (``url``, ``namespace``, ...).
    """

    def __init__(self, pool_path: str, num_slots: int, slot_bytes: int, reserve: bool,
                 store_args: dict[str, Any], *, retry_interval_s: float = 2.0,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        self._pool_fd = os.open(pool_path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        self._init = {"num_slots": num_slots, "slot_bytes": slot_bytes, "reserve": reserve,
                      "store_args": store_args}
        self.retry_interval_s = retry_interval_s
        self.start_timeout_s = start_timeout_s
        self.where = str(store_args.get("url", ""))
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._pending: dict[int, tuple[Future[list[bool]], int]] = {}
        self._next_id = 0
        self._counts: Counter[str] = Counter()
        self._store_available = False
        self._conn: Connection | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._closed = threading.Event()
        self.starts = 0
        """Children started (1 after a clean start-up; more after exits)."""
        self._start_child()
        self._reader = threading.Thread(target=self._read_loop, name="tokenvm-remote-process",
                                        daemon=True)
        self._reader.start()

    # -- the child's life ------------------------------------------------------------------------

    def _start_child(self) -> bool:
        """Start a child and wait for its first answer; False (child gone, logged) if it
        could not start."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tokenvm_vllm.tiers.remote.io_process",
                 str(child.fileno()), str(self._pool_fd)],
                pass_fds=(child.fileno(), self._pool_fd), stdin=subprocess.DEVNULL)
        except OSError as err:
            parent.close()
            child.close()
            logger.warning("TokenVM remote tier: cannot start its I/O process (%s); serving "
                           "without the remote tier for now", err)
            return False
        child.close()
        conn = Connection(parent.detach())
        try:
            conn.send(("init", self._init))
            if not conn.poll(self.start_timeout_s):
                raise TimeoutError(f"no answer within {self.start_timeout_s:.0f}s")
            kind, available, counts = conn.recv()
            assert kind == "ready", kind
        except (OSError, EOFError, TimeoutError, AssertionError) as err:
            conn.close()
            proc.kill()
            code = proc.wait()
            logger.warning("TokenVM remote tier: its I/O process did not start (%s, exit code "
                           "%s; its errors are in this log above); serving without the remote "
                           "tier, retrying every %.1fs", err, code, self.retry_interval_s)
            return False
        with self._lock:
            self._conn, self._child = conn, proc
            self._store_available = bool(available)
            self._counts.update(counts)
            self.starts += 1
        logger.info("TokenVM remote tier: I/O process %d serves %s", proc.pid, self.where)
        return True

    def _read_loop(self) -> None:
        """Resolve answers; on the child's exit fail what it owed and start another."""
        while not self._closed.is_set():
            conn = self._conn
            if conn is None:
                if self._closed.wait(self.retry_interval_s):
                    return
                self._start_child()
                continue
            try:
                message = conn.recv()
            except (EOFError, OSError):
                self._child_gone()
                continue
            self._dispatch(message)

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "done":
            _, request_id, results, unanswered, counts = message
            with self._lock:
                owed = self._pending.pop(request_id, None)
                self._counts.update(counts)
            if owed is not None:  # (None: ``close`` already failed it, having waited too long)
                future, n = owed
                future.set_result(Unanswered(n) if unanswered else list(results))
        elif kind == "state":
            _, available, counts = message
            with self._lock:
                self._store_available = bool(available)
                self._counts.update(counts)

    def _child_gone(self) -> None:
        with self._lock:
            conn, proc = self._conn, self._child
            self._conn, self._child = None, None
            self._store_available = False
            owed, self._pending = self._pending, {}
        if conn is not None:
            conn.close()
        code = proc.wait() if proc is not None else None
        for future, n in owed.values():
            future.set_result(Unanswered(n))
        if self._closed.is_set():
            return
        self._count("io_process_exits", 1)
        logger.warning("TokenVM remote tier: its I/O process exited (code %s) with %d batches "
                       "unanswered; serving without the remote tier, starting another in "
                       "%.1fs", code, len(owed), self.retry_interval_s)

    # -- the calls -------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """Whether calls reach the server now (the child runs and its store is connected)."""
        return self._conn is not None and self._store_available

    def contains(self, keys: Sequence[BlockKey]) -> Future[list[bool]]:
        """``RemoteStore.contains``: which keys the server holds."""
        return self._call("contains", list(keys), None)

    def get(self, keys: Sequence[BlockKey], host_slots: Sequence[int]) -> Future[list[bool]]:
        """``RemoteStore.get`` into the pool's rows ``host_slots``."""
        return self._call("get", list(keys), list(host_slots))

    def put(self, keys: Sequence[BlockKey], host_slots: Sequence[int]) -> Future[list[bool]]:
        """``RemoteStore.put`` of the pool's rows ``host_slots``."""
        return self._call("put", list(keys), list(host_slots))

    def _call(self, op: str, keys: list[BlockKey], slots: list[int] | None) -> Future[list[bool]]:
        future: Future[list[bool]] = Future()
        n = len(keys)
        with self._lock:
            conn = self._conn
            if n == 0 or conn is None or self._closed.is_set():
                if n and conn is None:
                    self._counts[f"{op}_unavailable_blocks"] += n
                future.set_result(Unanswered(n))
                return future
            request_id = self._next_id
            self._next_id += 1
            self._pending[request_id] = (future, n)
        try:
            with self._send_lock:
                conn.send((op, request_id, keys, slots))
        except OSError:
            # The child is gone: the reader sees the end of the stream and fails every pending
            # future, this one included (unless it already has).
            pass
        return future

    def _count(self, name: str, n: int) -> None:
        with self._lock:
            self._counts[name] += n

    def stats(self) -> Counter[str]:
        """The child store's counters since the last call, plus ``io_process_exits``."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
        return counts

    @property
    def child_pid(self) -> int | None:
        """The running child's process id (tests kill it), or None."""
        child = self._child
        return child.pid if child is not None else None

    def close(self) -> None:
        """Stop the child (it finishes the batches it has, then exits) and fail what it owed.
        A second call does nothing."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            conn, proc = self._conn, self._child
        if conn is not None:
            try:
                conn.send(("close",))
            except OSError:
                pass
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reader.join(timeout=10)
        with self._lock:
            owed, self._pending = self._pending, {}
            conn, self._conn, self._child = self._conn, None, None
        if conn is not None:
            conn.close()
        for future, n in owed.values():
            future.set_result(Unanswered(n))
        os.close(self._pool_fd)


# -- the child -------------------------------------------------------------------------------------


def _serve(conn: Connection, pool_fd: int) -> None:
    """The child's loop: map the pool, run a ``RemoteStore``, answer every batch."""
    import numpy as np

    from tokenvm_vllm.tiers.remote.store import RemoteStore

    kind, init = conn.recv()
    assert kind == "init", kind
    num_slots, slot_bytes = init["num_slots"], init["slot_bytes"]
    # (host_pool's _MAP_NORESERVE: that module imports torch, which this process does without)
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_NORESERVE", 0x4000) if init["reserve"] else 0)
    pool = mmap.mmap(pool_fd, num_slots * slot_bytes, flags=flags)
    rows = np.frombuffer(pool, dtype=np.uint8).reshape(num_slots, slot_bytes)
    store = RemoteStore(**init["store_args"])
    send_lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        try:
            with send_lock:
                conn.send(message)
        except OSError:  # the worker is gone; the main loop sees the end of the stream
            pass

    send(("ready", store.available, dict(store.stats())))  # e.g. an outage at start-up
    stop = threading.Event()

    def report_state() -> None:
        available = store.available
        while not stop.wait(STATE_INTERVAL_S):
            counts = store.stats()
            if counts or store.available != available:
                available = store.available
                send(("state", available, dict(counts)))

    reporter = threading.Thread(target=report_state, name="tokenvm-remote-state", daemon=True)
    reporter.start()

    def answer(request_id: int, future: Future[list[bool]]) -> None:
        if future.cancelled():  # queued when the store closed: never sent
            send(("done", request_id, [], True, {}))
            return
        results = future.result()
        # The batch's counters travel with its answer, so the worker reports them in the same
        # step as the jobs they count (the store counted them before resolving the future).
        send(("done", request_id, list(results), isinstance(results, Unanswered),
              dict(store.stats())))

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        op = message[0]
        if op == "close":
            break
        _, request_id, keys, slots = message
        if op == "contains":
            future = store.contains(keys)
        elif op == "get":
            future = store.get(keys, [rows[slot] for slot in slots])
        elif op == "put":
            future = store.put(keys, [rows[slot] for slot in slots])
        else:
            raise ValueError(f"tokenvm remote I/O process: unknown request {op!r}")
        future.add_done_callback(functools.partial(answer, request_id))
    store.close()  # lets the running batches finish (their answers go out if anyone listens)
    stop.set()
    reporter.join()
    send(("state", False, dict(store.stats())))
    conn.close()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    # Ctrl-C reaches the server's whole process group: the worker stops the child by closing
    # the socket, after its own shutdown, not the other way round.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO,
                        format="(tokenvm remote I/O pid=%(process)d) %(levelname)s %(message)s")
    _serve(Connection(int(args[0])), int(args[1]))


if __name__ == "__main__":
    main()
