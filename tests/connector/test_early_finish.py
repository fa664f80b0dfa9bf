"""``load_early_finish``: the scheduler takes finished loads from the worker in its process
(vLLM's real Scheduler, CPU; the harness's model checks every KV position it reads)."""

from types import SimpleNamespace
from typing import Any

from tests.connector.test_scheduler_level import evict_everything, prompts, revisit_steps
from tokenvm_vllm.connector import early_finish
from tokenvm_vllm.connector.early_finish import EarlyFinish

LAG = {"debug_lag_copies": True, "testing": True}
"""Each copy runs at the first poll after it was queued and is reported at the next, like a
CUDA copy beside a step's forward: the worker's ``get_finished``, right after the forward is
launched, sees it still running; the poll after the step sees it done."""


def churn(h: Any, rounds: int, seed: int) -> list[str]:
    """``rounds`` rounds of 6 requests on 6-block prefixes, every cached block evicted to host
    after each round (the next round loads its prefixes); returns the request ids."""
    ids = []
    for round_no in range(rounds):
        for i in range(6):
            (p,) = prompts(1, prefix_blocks=6, suffix=3 + round_no, seed=seed + i)
            ids.append(h.add(p, max_tokens=3))
        h.run()
        evict_everything(h, seed=seed + 100 + round_no)
    return ids


def test_a_parked_request_runs_a_step_sooner_with_exact_kv(make_harness) -> None:
    runs: dict[bool, tuple[int, float, float]] = {}
    for early in (False, True):
        h = make_harness(num_gpu_blocks=24, extra_config={"load_early_finish": early, **LAG})
        steps = revisit_steps(h, seed=40)  # the forward checks the loaded blocks' bytes
        runs[early] = (steps, h.stats["load_early_finished"], h.stats["loaded_blocks"])
        assert len(h.scheduler.connector.scheduler.jobs) == 0  # the job finished, as always
        assert not h.scheduler.finished_recving_kv_req_ids  # vLLM heard of it once
    assert runs[False][1:] == (0, 8)
    assert runs[True][1:] == (1, 8)
    assert runs[True][0] == runs[False][0] - 1


def test_outputs_equal_under_churn_and_revisits(make_harness) -> None:
    """Many loads, some on blocks vLLM re-uses while copies are in flight: every output the
    same with and without, and most loads handed over early."""
    outputs: dict[bool, list[list[int]]] = {}
    for early in (False, True):
        h = make_harness(num_gpu_blocks=40, max_num_seqs=4,
                         extra_config={"load_early_finish": early, **LAG})
        ids = churn(h, rounds=3, seed=500)
        outputs[early] = [h.outputs[r] for r in ids]
        load_jobs = len(h.histograms.get("load_job_seconds", []))
        assert load_jobs >= 6
        # Every load handed over early, and none of them fenced after it (its copy ended:
        # the job waits in the table only for the worker's report).
        assert h.stats["load_early_finished"] == (load_jobs if early else 0)
        assert h.stats["fenced_jobs"] == 0
    assert outputs[True] == outputs[False]


def test_loads_the_worker_saw_end_are_held_for_the_scheduler(make_harness) -> None:
    """Copies that end before ``get_finished`` polls (no lag): the worker holds the good loads
    out of its report and the scheduler side takes them at the step's output. Under vLLM's
    async scheduling that report reaches the scheduler a step later than the output of the
    step before, which is when the scheduler side asks (early_finish.py); here, in the
    harness's synchronous steps, both arrive together, so only the hand-over shows."""
    outputs: dict[bool, list[list[int]]] = {}
    for early in (False, True):
        h = make_harness(num_gpu_blocks=40, max_num_seqs=4,
                         extra_config={"load_early_finish": early})
        worker = h.worker.worker
        held: list[int] = []

        def spy(worker: Any = worker, get_finished: Any = worker.get_finished,
                held: list[int] = held) -> set[str]:
            report: set[str] = get_finished()
            held.append(len(worker._early_ready))
            return report

        worker.get_finished = spy  # type: ignore[method-assign]
        ids = churn(h, rounds=2, seed=700)
        outputs[early] = [h.outputs[r] for r in ids]
        load_jobs = len(h.histograms.get("load_job_seconds", []))
        assert load_jobs >= 6
        assert h.stats["load_early_finished"] == (load_jobs if early else 0)
        assert (max(held) > 0) == early  # held by get_finished, not reported by it
        assert not worker._early_ready  # every held load was taken
        assert not h.scheduler.finished_recving_kv_req_ids
        assert len(h.scheduler.connector.scheduler.jobs) == 0
    assert outputs[True] == outputs[False]


def test_a_failed_load_is_never_handed_over_early(make_harness) -> None:
    """Its request goes to vLLM with its invalid blocks, in the worker's own report; vLLM
    recomputes them (the forward checks the result)."""
    h = make_harness(num_gpu_blocks=24, extra_config={
        "load_early_finish": True, "debug_fail_load_every": 1, **LAG})
    first, again = prompts(2, prefix_blocks=8, suffix=5, seed=5)
    h.add(first)
    h.run()
    evict_everything(h, seed=6)
    rid = h.add(again)
    h.run()
    assert h.stats["failed_load_blocks"] == 8
    assert h.stats["load_early_finished"] == 0
    assert len(h.outputs[rid]) == 4


def config(engine: str, world_size: int = 1) -> Any:
    """What the link reads of vLLM's config: the engine id and the world size."""
    return SimpleNamespace(kv_transfer_config=SimpleNamespace(engine_id=engine),
                           parallel_config=SimpleNamespace(world_size=world_size))


def test_the_link_needs_one_worker_in_this_process() -> None:
    worker: Any = object.__new__(type("W", (), {"take_finished_loads": lambda self: {"r"}}))
    early_finish.register_worker(config("engine-a"), worker)
    try:
        assert EarlyFinish(config("engine-a")).worker() is worker
        assert EarlyFinish(config("engine-a")).claim({"x"}) == ({"x", "r"}, {"r"})
        assert EarlyFinish(config("engine-a")).claim(None) == ({"r"}, {"r"})
        # tensor parallel: every rank reports
        assert EarlyFinish(config("engine-a", world_size=2)).worker() is None
        # a worker elsewhere
        assert EarlyFinish(config("engine-b")).claim({"x"}) == ({"x"}, set())
    finally:
        early_finish.unregister_worker(config("engine-a"), worker)
    assert EarlyFinish(config("engine-a")).worker() is None
