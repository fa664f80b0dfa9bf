"""Testing only: disk faults injected at the file layer (``debug_disk_faults``, needs ``testing``).

The store calls ``before(op)`` right before each slot read or write; every ``every``-th such call
raises the configured ``OSError`` (as the kernel would: ENOSPC, EIO...) or sleeps (``slow``). The
store handles these exactly like real errors (a miss or a failed write, counted and logged).
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Mapping


class DiskFaults:
    """``faults``: op ('read'/'write') -> (fault, every); fault is an errno name or 'slow<s>'."""

    def __init__(self, faults: Mapping[str, tuple[str, int]]) -> None:
        self.faults = dict(faults)
        self._counts = dict.fromkeys(self.faults, 0)
        self._lock = threading.Lock()
        self.injected = 0

    def before(self, op: str) -> None:
        if op not in self.faults:
            return
        fault, every = self.faults[op]
        with self._lock:
            self._counts[op] += 1
            hit = self._counts[op] % every == 0
            self.injected += hit
        if not hit:
            return
        if fault.startswith("slow"):
            time.sleep(float(fault[len("slow"):]))
            return
        code = getattr(errno, fault)
        raise OSError(code, f"{fault} (injected by debug_disk_faults)")


NO_FAULTS = DiskFaults({})
