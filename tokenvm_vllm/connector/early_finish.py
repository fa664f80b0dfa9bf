"""``load_early_finish``: the scheduler hears of a finished load from the worker in its own
process, a step or two before vLLM's own report would reach it.

vLLM's connector protocol reports a finished async load like this: the worker's
``get_finished`` runs once per step, right after the step's forward is *launched*; a copy that
ends later is seen at the next step's call; vLLM hands that step's output to the scheduler only
after it has scheduled the step after it (async scheduling), so the parked request runs about
three engine steps after its copy was queued. Traced on an H200 (README, "Step classes"): at
8 requests in flight a load waited 62 ms from the hit to its request running, for 10.5 ms of
copying (submitted -> polled 34.2 ms, polled -> finished 18.4 ms).

With world size 1 and vLLM's in-process executor (its default there) the worker side lives in
the engine-core process, on the thread that calls the scheduler. vLLM's engine loop with async
scheduling runs: schedule N+1, execute N+1 (the worker's ``get_finished`` right after the
forward is launched), wait for step N's output, ``update_from_output(N)``, schedule N+2, ...
The worker's report from ``execute N+1`` reaches the scheduler only at ``update_from_output
(N+1)``, after step N+2 was scheduled. So once the scheduler side has asked
(``TokenVMWorker.take_finished_loads``), the worker *holds* the good loads its
``get_finished`` sees end instead of reporting them, and the scheduler side, at step N's output
(``update_connector_output``, which vLLM calls *before* it reads ``finished_recving``), polls
the copies once more and adds every held or newly ended good load to the output's
``finished_recving``: the request is scheduled in step N+2, one step sooner. vLLM hears of each
request exactly once (it would assert on a second report).

Safe because a copy's completion (a CUDA event that has fired, or the CPU engine's finished
copy) is what the normal path reports too: the data is in vLLM's blocks before any kernel that
the next step launches. A failed load is never claimed early: its request and its invalid
blocks go out together in the worker's own report, as before, and so does anything held at
that moment. Everything else about the job (its host slots stay pinned, its tier movement)
still finishes when the worker's metadata reports it.

Where the worker is elsewhere (tensor or pipeline parallelism, a multiprocess executor) the
lookup finds none: the scheduler logs it once and loads finish as vLLM reports them.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from tokenvm_vllm.connector.worker import TokenVMWorker

logger = logging.getLogger("vllm.tokenvm")

_WORKERS: weakref.WeakValueDictionary[str, TokenVMWorker] = weakref.WeakValueDictionary()
"""engine id (vLLM's ``kv_transfer_config.engine_id``, one per engine) -> the worker side of
that engine in this process."""


def engine_id(vllm_config: VllmConfig) -> str:
    """The engine both sides of one connector belong to (vLLM's ``kv_transfer_config``)."""
    return str(getattr(vllm_config.kv_transfer_config, "engine_id", None) or "")


def register_worker(vllm_config: VllmConfig, worker: TokenVMWorker) -> None:
    """The worker side of this engine is in this process (called once it can copy)."""
    _WORKERS[engine_id(vllm_config)] = worker


def unregister_worker(vllm_config: VllmConfig, worker: TokenVMWorker) -> None:
    engine = engine_id(vllm_config)
    if _WORKERS.get(engine) is worker:
        del _WORKERS[engine]


class EarlyFinish:
    """The scheduler side's link to its engine's worker (``claim``)."""

    def __init__(self, vllm_config: VllmConfig) -> None:
        self.engine_id = engine_id(vllm_config)
        self.world_size = vllm_config.parallel_config.world_size
        self._worker: TokenVMWorker | None = None
        self._looked = False

    def worker(self) -> TokenVMWorker | None:
        """The worker in this process, looked up once, at the first step's output (vLLM
        registers the KV cache, and so builds the worker's copy engines, before any step);
        None where there is none, said once in the log."""
        if not self._looked:
            self._looked = True
            self._worker = _WORKERS.get(self.engine_id) if self.world_size == 1 else None
            if self._worker is None:
                logger.info("TokenVM load_early_finish: no worker of this engine in the "
                            "scheduler's process (world size %d, or a multiprocess executor); "
                            "loads finish as vLLM reports them", self.world_size)
        return self._worker

    def claim(self, finished_recving: set[str] | None) -> tuple[set[str] | None, set[str]]:
        """``finished_recving`` of a step's output with the requests whose loads the worker
        has just seen finish added; returns it and those requests."""
        worker = self.worker()
        if worker is None:
            return finished_recving, set()
        early = worker.take_finished_loads()
        if not early:
            return finished_recving, early
        return (finished_recving or set()) | early, early
