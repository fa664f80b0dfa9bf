"""The disk tier in the real vLLM engine on CPU: kill -9 during disk writes, restart, exact outputs.

Each engine runs in its own process with ``PYTHONHASHSEED`` fixed, so block hashes (and the disk
blocks' keys) are the same in every run. The host tier is kept tiny so blocks really go to disk.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tokenvm_vllm.bench.prefix_reuse import (
    EngineSettings,
    Workload,
    engine_command,
    run_in_subprocess,
)

pytestmark = pytest.mark.e2e

WORKLOAD = Workload(documents=16, questions=2, prefix_blocks=8, suffix_tokens=24, max_tokens=8,
                    batch_size=4)
ENV = {"PYTHONHASHSEED": "0"}


def kill_during_disk_writes(settings: EngineSettings, workload: Workload, tmp: Path,
                            run: int, rng: random.Random) -> bool:
    """Start an engine, SIGKILL its whole process group once disk writes are under way.

    Returns whether the kill landed before the run finished on its own.
    """
    log_path = tmp / f"killed-{run}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(engine_command(settings, workload, tmp / f"killed-{run}.json"),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **ENV})
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if "TokenVM disk tier ready" in log_path.read_text():
                break
            time.sleep(0.5)
        time.sleep(rng.uniform(0.2, 1.5))  # the workload is running: stores and disk writes
        killed = proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    return killed


def test_kill_9_during_disk_writes_then_restart_is_exact(tmp_path, engine_settings):
    disk = tmp_path / "disk"
    base = engine_settings(num_gpu_blocks=48, max_model_len=1024)
    tokenvm = replace(base, connector="tokenvm", host_bytes="2MiB",
                      extra_config={"disk_path": str(disk), "disk_bytes": "64MiB"})
    baseline = run_in_subprocess(base, WORKLOAD, tmp_path / "baseline.json", env=ENV)
    rng = random.Random(0)
    kills = sum(kill_during_disk_writes(tokenvm, WORKLOAD, tmp_path, run, rng)
                for run in range(3))
    assert kills >= 2, "the engine finished before it could be killed"
    final = run_in_subprocess(tokenvm, WORKLOAD, tmp_path / "final.json", env=ENV)
    assert final["outputs"] == baseline["outputs"]
    counters = final["counters"]
    assert counters["tokenvm:disk_recovered_blocks"] > 0
    assert counters["tokenvm:disk_promoted_blocks"] > 0
    assert counters["vllm:prompt_tokens_by_source[external_kv_transfer]"] > 0
    assert (disk / "rank-0").stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in (disk / "rank-0").glob("slots-*"))
