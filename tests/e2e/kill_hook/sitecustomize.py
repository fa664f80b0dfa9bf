"""Kill hook for ``test_disk_kill_restart``: SIGKILL an engine while disk writes are in flight.

Python imports ``sitecustomize`` at start-up from ``PYTHONPATH``, so putting this folder first
there installs the hook in every process of the engine, whichever one opens the disk store. It
is inert unless ``KILLHOOK_WRITE_LOG`` is set. Then it wraps ``DiskStore.write`` (the real
write still runs; the wrapper only counts) and appends to that log, one line per event, with a
single ``os.write`` on an ``O_APPEND`` descriptor (survives the kill, no buffering):

    submit <n>                      the n-th write was queued in the store
    done <n>                        a write's future completed (n completions so far)
    kill submitted=<s> done=<d> in_flight=<s-d>

Once ``KILLHOOK_KILL_AT_WRITE`` (k) writes were submitted, the first submission that finds at
least ``KILLHOOK_MIN_IN_FLIGHT`` writes submitted but not completed logs the ``kill`` line and
SIGKILLs the whole process group, holding the counter lock so no completion is counted between
the line and the kill. (Not ``TOKENVM_*`` names: TokenVM refuses unknown variables of its own.)
"""

from __future__ import annotations

import os


def _install(log_path: str) -> None:
    import signal
    import threading
    from concurrent.futures import Future
    from typing import Any

    from tokenvm_vllm.tiers.disk.store import DiskStore

    kill_at = int(os.environ.get("KILLHOOK_KILL_AT_WRITE", "0"))
    min_in_flight = int(os.environ.get("KILLHOOK_MIN_IN_FLIGHT", "2"))
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    lock = threading.Lock()
    counts = {"submitted": 0, "done": 0}
    real_write = DiskStore.write

    def on_done(_future: Future[bool]) -> None:
        with lock:
            counts["done"] += 1
            os.write(log_fd, b"done %d\n" % counts["done"])

    def write(self: Any, slot: int, key: bytes, payload: Any) -> Future[bool]:
        future = real_write(self, slot, key, payload)
        with lock:
            counts["submitted"] += 1
            submitted = counts["submitted"]
            os.write(log_fd, b"submit %d\n" % submitted)
        future.add_done_callback(on_done)
        with lock:
            in_flight = counts["submitted"] - counts["done"]
            if kill_at and submitted >= kill_at and in_flight >= min_in_flight:
                os.write(log_fd, b"kill submitted=%d done=%d in_flight=%d\n"
                         % (counts["submitted"], counts["done"], in_flight))
                os.killpg(os.getpgid(0), signal.SIGKILL)
        return future

    DiskStore.write = write  # type: ignore[method-assign]


if os.environ.get("KILLHOOK_WRITE_LOG"):
    _install(os.environ["KILLHOOK_WRITE_LOG"])
