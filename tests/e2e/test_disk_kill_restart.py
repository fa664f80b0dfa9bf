"""The disk tier in the real vLLM engine on CPU: kill -9 during disk writes, restart, exact outputs.

Each engine runs in its own process with ``PYTHONHASHSEED`` fixed, so block hashes (and the disk
blocks' keys) are the same in every run. The host tier is kept tiny so blocks really go to disk.

The kill is proven to land while disk writes are in flight: ``kill_hook/sitecustomize.py`` counts
the store's writes inside the engine and SIGKILLs the process group only when at least
``MIN_IN_FLIGHT`` writes have been queued and not completed, logging the counts first; the test
reads that log after the engine died.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from tokenvm_vllm.bench.prefix_reuse import (
    EngineSettings,
    Workload,
    run_in_subprocess,
)
from tokenvm_vllm.cli import faults

pytestmark = pytest.mark.e2e

WORKLOAD = Workload(documents=16, questions=2, prefix_blocks=8, suffix_tokens=24, max_tokens=8,
                    batch_size=4)
ENV = faults.ENV


def kill_during_disk_writes(settings: EngineSettings, workload: Workload, tmp: Path,
                            run: int, kill_at_write: int) -> int:
    """``faults.kill_during_writes``, asserting the kill landed as the hook promises: at the
    ``kill_at_write``-th write or later, with ``MIN_IN_FLIGHT`` writes queued and not completed,
    before the engine finished its workload. Returns the writes in flight."""
    kill = faults.kill_during_writes(settings, workload, tmp, run, kill_at_write)
    assert kill is not None, f"run {run}: the engine was not killed by the hook"
    assert kill.submitted >= kill_at_write
    assert kill.in_flight == kill.submitted - kill.done >= faults.MIN_IN_FLIGHT
    assert not (tmp / f"killed-{run}.json").exists()  # it died before finishing the workload
    return kill.in_flight


def test_kill_9_during_disk_writes_then_restart_is_exact(tmp_path, engine_settings):
    disk = tmp_path / "disk"
    base = engine_settings(num_gpu_blocks=48, max_model_len=1024)
    tokenvm = replace(base, connector="tokenvm", host_bytes="2MiB",
                      extra_config={"disk_path": str(disk), "disk_bytes": "64MiB"})
    baseline = run_in_subprocess(base, WORKLOAD, tmp_path / "baseline.json", env=ENV)
    rng = random.Random(0)
    in_flight = [kill_during_disk_writes(tokenvm, WORKLOAD, tmp_path, run, rng.randint(4, 40))
                 for run in range(3)]
    print(f"disk writes in flight at each kill: {in_flight}")
    assert all(in_flight), f"an engine was not killed with disk writes in flight: {in_flight}"
    final = run_in_subprocess(tokenvm, WORKLOAD, tmp_path / "final.json", env=ENV)
    assert final["outputs"] == baseline["outputs"]
    counters = final["counters"]
    assert counters["tokenvm:disk_recovered_blocks"] > 0
    assert counters["tokenvm:disk_promoted_blocks"] > 0
    assert counters["vllm:prompt_tokens_by_source[external_kv_transfer]"] > 0
    assert (disk / "rank-0").stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in (disk / "rank-0").glob("slots-*"))
