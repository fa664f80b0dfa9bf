"""JobTable: job states, per-worker reports, per-kind counts and the fence rule."""

import pytest

from tokenvm_vllm.connector.jobs import JobId, JobKind, JobState, JobTable


def state_of(table: JobTable, job_id: JobId) -> JobState:
    job = table.get(job_id)
    assert job is not None, f"job {job_id} is not in the table"
    return job.state


def test_job_is_planned_then_in_flight_then_done_after_every_worker() -> None:
    table = JobTable(num_workers=2)
    job_id = table.add(JobKind.LOAD, [b"k1", b"k2"], [4, 5], req_id="r")
    assert state_of(table, job_id) is JobState.PLANNED
    assert table.send() == set()
    assert state_of(table, job_id) is JobState.IN_FLIGHT
    assert table.report(job_id, 1) is None  # one of two workers
    assert job_id in table
    job = table.report(job_id, 1)
    assert job is not None and job.state is JobState.DONE
    assert (job.keys, job.gpu_block_ids, job.req_id) == ([b"k1", b"k2"], [4, 5], "r")
    assert job_id not in table and len(table) == 0
    assert table.jobs_on(4) == set()


def test_one_failed_worker_fails_the_job() -> None:
    table = JobTable(num_workers=2)
    job_id = table.add(JobKind.STORE, [b"k"], [1])
    table.send()
    assert table.report(job_id, 1, failed=1) is None
    job = table.report(job_id, 1)  # the other worker succeeded: the job still failed
    assert job is not None and job.state is JobState.FAILED


def test_reports_of_finished_or_unknown_jobs_are_ignored() -> None:
    table = JobTable(num_workers=1)
    job_id = table.add(JobKind.DISK_READ, [b"k"])
    assert table.report(job_id, 1) is not None
    assert table.report(job_id, 1) is None
    assert table.report(12345, 1) is None
    assert table.in_flight(JobKind.DISK_READ) == 0


def test_ids_increase_and_counts_per_kind_are_kept() -> None:
    table = JobTable(num_workers=1)
    writes = [table.add(JobKind.DISK_WRITE, [bytes([i])]) for i in range(3)]
    table.add(JobKind.STORE, [b"s"], [7])
    assert writes == sorted(writes) and len(set(writes)) == 3
    assert table.in_flight(JobKind.DISK_WRITE) == 3
    assert table.in_flight(JobKind.STORE) == 1
    table.report(writes[1], 1)
    assert table.in_flight(JobKind.DISK_WRITE) == 2
    assert table.in_flight(JobKind.LOAD) == 0


def test_reallocated_block_fences_only_jobs_of_earlier_steps() -> None:
    table = JobTable(num_workers=1)
    old_store = table.add(JobKind.STORE, [b"a", b"b"], [3, 4])
    unrelated = table.add(JobKind.STORE, [b"c"], [9])
    assert table.send() == set()  # nothing re-allocated yet
    # Next step: vLLM hands block 4 out again and this step loads into it.
    table.reallocated([4])
    new_load = table.add(JobKind.LOAD, [b"x"], [4], req_id="r")
    assert table.jobs_on(4) == {old_store, new_load}
    fences = table.send()
    assert fences == {old_store}  # not the unrelated job, not this step's own load
    assert unrelated not in fences
    # Re-allocations are per step: the next step fences nothing unless told again.
    assert table.send() == set()
    table.report(old_store, 1)
    table.reallocated([4, 3])
    assert table.send() == {new_load}  # the finished store no longer needs a fence


def test_a_copied_job_is_not_fenced_but_waits_for_its_report() -> None:
    """``load_early_finish``: a load known to have ended needs no fence when vLLM re-uses its
    blocks; it still finishes only when the worker reports it."""
    table = JobTable(num_workers=1)
    load = table.add(JobKind.LOAD, [b"a", b"b"], [3, 4], req_id="r")
    other = table.add(JobKind.STORE, [b"c"], [4])
    table.send()
    table.copied(load)
    table.copied(99)  # (an unknown job: nothing)
    assert table.jobs_on(4) == {other} and table.jobs_on(3) == set()
    table.reallocated([3, 4])
    assert table.send() == {other}
    assert load in table and state_of(table, load) is JobState.IN_FLIGHT
    job = table.report(load, 1)
    assert job is not None and job.state is JobState.DONE and load not in table


def test_bad_inputs_are_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="num_workers >= 1, got 0"):
        JobTable(num_workers=0)
    table = JobTable(num_workers=1)
    with pytest.raises(ValueError, match=r"host->disk job has no GPU blocks, got \[1\]"):
        table.add(JobKind.DISK_WRITE, [b"k"], [1])
    assert len(table) == 0
