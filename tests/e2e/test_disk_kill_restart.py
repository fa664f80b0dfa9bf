"""The disk tier in the real vLLM engine on CPU: kill -9 during disk writes, restart, exact outputs.

Each engine runs in its own process with ``PYTHONHASHSEED`` fixed, so block hashes (and the disk
blocks' keys) are the same in every run. The host tier is kept tiny so blocks really go to disk.

The kill is proven to land while disk writes are in flight: ``kill_hook/sitecustomize.py`` counts
the store's writes inside the engine and SIGKILLs the process group only when at least
``MIN_IN_FLIGHT`` writes have been queued and not completed, logging the counts first; the test
reads that log after the engine died.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from tokenvm_vllm.bench.prefix_reuse import (
    EngineSettings,
    Workload,
    engine_command,
    run_in_subprocess,
)
from tokenvm_vllm.cli import faults

pytestmark = pytest.mark.e2e

WORKLOAD = Workload(documents=16, questions=2, prefix_blocks=8, suffix_tokens=24, max_tokens=8,
                    batch_size=4)
ENV = {"PYTHONHASHSEED": "0"}
KILL_HOOK = faults.KILL_HOOK
MIN_IN_FLIGHT = 2
"""Writes queued and not completed when the kill is sent: the one just submitted and another."""
KILL_LINE = re.compile(r"^kill submitted=(\d+) done=(\d+) in_flight=(\d+)$", re.MULTILINE)


def kill_during_disk_writes(settings: EngineSettings, workload: Workload, tmp: Path,
                            run: int, kill_at_write: int) -> int:
    """Run an engine that SIGKILLs its process group at a disk write submission (the
    ``kill_at_write``-th or later) that finds ``MIN_IN_FLIGHT`` writes in flight.

    Returns the writes in flight when the kill was sent; 0 if the engine ended another way.
    """
    write_log = tmp / f"killed-{run}.writes"
    env = {**os.environ, **ENV, "KILLHOOK_WRITE_LOG": str(write_log),
           "KILLHOOK_KILL_AT_WRITE": str(kill_at_write),
           "KILLHOOK_MIN_IN_FLIGHT": str(MIN_IN_FLIGHT),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(KILL_HOOK),
                                                        os.environ.get("PYTHONPATH")]))}
    with open(tmp / f"killed-{run}.log", "w") as log:
        proc = subprocess.Popen(engine_command(settings, workload, tmp / f"killed-{run}.json"),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)
    try:
        returncode = proc.wait(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers, or a run that never got killed
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)
    kills = KILL_LINE.findall(write_log.read_text()) if write_log.exists() else []
    if returncode != -signal.SIGKILL or not kills:
        return 0
    assert len(kills) == 1, kills
    submitted, done, in_flight = map(int, kills[0])
    assert submitted >= kill_at_write and in_flight == submitted - done >= MIN_IN_FLIGHT
    assert not (tmp / f"killed-{run}.json").exists()  # it died before finishing the workload
    return in_flight


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
