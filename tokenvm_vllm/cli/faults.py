"""``tokenvm faults``: fault injection on the real vLLM engine, each case against its expectation.

Every case runs the prefix-reuse workload in its own engine process (CPU or GPU, whatever vLLM is
installed) and compares its greedy outputs token for token with a run without TokenVM. Disk faults
are real where a test can make them real (a slot file replaced by a directory, ``kill -9`` during
disk writes) and injected at the file layer otherwise (``debug_disk_faults``: the store sees the
same ``OSError`` the kernel would raise). The table printed at the end is the README's.

    tokenvm faults [--out DIR] [--cycles 20] [--cases a,b]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ENV = {"PYTHONHASHSEED": "0"}  # block hashes (disk keys) equal in every run


@dataclass
class Row:
    case: str
    expected: str
    outcome: str
    outputs: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.outcome.startswith("as expected")


def _workload() -> Any:
    from tokenvm_vllm.bench.prefix_reuse import Workload

    return Workload(documents=16, questions=2, prefix_blocks=8, suffix_tokens=24, max_tokens=8,
                    batch_size=4)


class Suite:
    """The engines and disk directories shared by the cases, under ``out``."""

    def __init__(self, out: Path, cycles: int) -> None:
        from tokenvm_vllm.bench.prefix_reuse import EngineSettings
        from tokenvm_vllm.tiny_llama import write_tiny_llama

        self.out = out
        self.cycles = cycles
        self.workload = _workload()
        model = str(write_tiny_llama(out / "tiny-llama"))
        self.base = EngineSettings(model=model, num_gpu_blocks=48, max_model_len=1024)
        self.baseline = self.run("baseline", self.base)["outputs"]
        self._filled: Path | None = None

    def run(self, name: str, settings: Any) -> dict[str, Any]:
        from tokenvm_vllm.bench.prefix_reuse import run_in_subprocess

        return run_in_subprocess(settings, self.workload, self.out / f"{name}.json", env=ENV)

    def tokenvm(self, disk: Path | None, host_bytes: str = "2MiB", **extra: Any) -> Any:
        if disk is not None:
            extra = {"disk_path": str(disk), "disk_bytes": "64MiB", **extra}
        if any(key.startswith("debug_") for key in extra):
            extra["testing"] = True
        return replace(self.base, connector="tokenvm", host_bytes=host_bytes, extra_config=extra)

    def same(self, result: dict[str, Any]) -> str:
        outputs = result["outputs"]
        equal = sum(outputs.get(k) == v for k, v in self.baseline.items())
        return f"{equal}/{len(self.baseline)} equal"

    def filled_disk(self, name: str) -> Path:
        """A copy of a disk tier that a complete earlier run filled (made once)."""
        if self._filled is None:
            self._filled = self.out / "filled"
            self.run("fill", self.tokenvm(self._filled))
        copy = self.out / name
        shutil.copytree(self._filled, copy)
        return copy


def _counters(result: dict[str, Any], *names: str) -> dict[str, float]:
    return {name: result["counters"].get(f"tokenvm:{name}", 0.0) for name in names}


def case_disk_full(suite: Suite) -> tuple[str, str]:
    result = suite.run("disk_full", suite.tokenvm(suite.out / "disk_full",
                                                  debug_disk_faults="write:ENOSPC:1"))
    c = _counters(result, "disk_write_failed_blocks", "disk_written_blocks", "loaded_blocks")
    ok = c["disk_write_failed_blocks"] > 0 and c["disk_written_blocks"] == 0
    return (("as expected" if ok else "UNEXPECTED") + f": {c['disk_write_failed_blocks']:.0f} "
            f"disk writes failed, host tier still served {c['loaded_blocks']:.0f} blocks",
            suite.same(result))


def case_read_errors(suite: Suite) -> tuple[str, str]:
    disk = suite.filled_disk("read_errors")
    result = suite.run("read_errors", suite.tokenvm(disk, debug_disk_faults="read:EIO:2"))
    c = _counters(result, "disk_read_failed_blocks", "disk_promoted_blocks")
    ok = c["disk_read_failed_blocks"] > 0 and c["disk_promoted_blocks"] > 0
    return (("as expected" if ok else "UNEXPECTED") + f": {c['disk_read_failed_blocks']:.0f} "
            f"reads failed (misses, recomputed), {c['disk_promoted_blocks']:.0f} promoted",
            suite.same(result))


def case_slot_file_is_a_directory(suite: Suite) -> tuple[str, str]:
    disk = suite.filled_disk("directory")
    slot_file = disk / "rank-0" / "slots-1.bin"
    slot_file.unlink()
    slot_file.mkdir()
    try:
        suite.run("directory", suite.tokenvm(disk))
    except RuntimeError:
        log = (suite.out / "directory.log").read_text(errors="replace")
        lines = [line for line in log.splitlines() if "DiskStoreError: tokenvm:" in line]
        named = bool(lines) and "slots-1.bin" in lines[-1]
        text = lines[-1].split("tokenvm:", 1)[1].strip() if lines else "no DiskStoreError line"
        return (("as expected" if named else "UNEXPECTED") + f": start-up refused: {text}",
                "n/a (no server)")
    return "UNEXPECTED: the engine started with a directory as slot file", "-"


KILL_HOOK = Path(__file__).parent / "kill_hook"
"""A ``sitecustomize`` that SIGKILLs an engine at a disk write that finds others in flight."""
MIN_IN_FLIGHT = 2
KILL_LINE = re.compile(r"^kill submitted=(\d+) done=(\d+) in_flight=(\d+)$", re.MULTILINE)


@dataclass(frozen=True)
class Kill:
    """What the kill hook logged when it sent SIGKILL: disk writes submitted, completed, and
    queued but not completed (``in_flight``)."""

    submitted: int
    done: int
    in_flight: int


def kill_during_writes(settings: Any, workload: Any, out: Path, run: int,
                       kill_at_write: int) -> Kill | None:
    """Run an engine (``prefix_reuse``, results to ``out/killed-<run>.json``) that SIGKILLs its
    process group at a disk write submission (the ``kill_at_write``-th or later) that finds
    ``MIN_IN_FLIGHT`` writes queued and not completed (``kill_hook/sitecustomize.py``).

    Returns the hook's counts; None if the engine ended another way (finished unkilled, or
    crashed). Used by ``case_kill_9`` and ``tests/e2e/test_disk_kill_restart.py``."""
    from tokenvm_vllm.bench.prefix_reuse import engine_command

    write_log = out / f"killed-{run}.writes"
    env = {**os.environ, **ENV, "KILLHOOK_WRITE_LOG": str(write_log),
           "KILLHOOK_KILL_AT_WRITE": str(kill_at_write),
           "KILLHOOK_MIN_IN_FLIGHT": str(MIN_IN_FLIGHT),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(KILL_HOOK),
                                                        os.environ.get("PYTHONPATH")]))}
    with open(out / f"killed-{run}.log", "w") as log:
        proc = subprocess.Popen(engine_command(settings, workload, out / f"killed-{run}.json"),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)
    try:
        returncode = proc.wait(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers, or a run that was never killed
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)
    kills = KILL_LINE.findall(write_log.read_text()) if write_log.exists() else []
    if returncode != -signal.SIGKILL or len(kills) != 1:
        return None
    submitted, done, in_flight = map(int, kills[0])
    return Kill(submitted, done, in_flight)


def _kill_during_writes(suite: Suite, settings: Any, run: int, kill_at_write: int) -> int:
    """Writes in flight at cycle ``run``'s kill (0 if it did not land). Each cycle asks other
    questions (seed), so it has new blocks to write: with the same workload every time, later
    cycles find their blocks on disk and write too few to be killed mid-write."""
    kill = kill_during_writes(settings, replace(suite.workload, seed=run + 1), suite.out, run,
                              kill_at_write)
    return kill.in_flight if kill is not None else 0


def case_kill_9(suite: Suite) -> tuple[str, str]:
    disk = suite.out / "killed"
    settings = suite.tokenvm(disk)
    rng = random.Random(0)
    in_flight = [_kill_during_writes(suite, settings, run, rng.randint(4, 40))
                 for run in range(suite.cycles)]
    landed = sum(n >= MIN_IN_FLIGHT for n in in_flight)
    result = suite.run("after_kills", settings)
    c = _counters(result, "disk_recovered_blocks", "disk_promoted_blocks",
                  "disk_read_failed_blocks")
    equal = suite.same(result)
    exact = equal.split("/")[0] == str(len(suite.baseline))
    ok = landed == suite.cycles and c["disk_promoted_blocks"] > 0 and exact
    text = (f"{landed}/{suite.cycles} kills landed with {min(in_flight)}-{max(in_flight)} disk "
            f"writes in flight; the restart recovered "
            f"{c['disk_recovered_blocks']:.0f} blocks, served {c['disk_promoted_blocks']:.0f} "
            f"from disk, rejected {c['disk_read_failed_blocks']:.0f} (torn or stale)")
    return ("as expected" if ok else "UNEXPECTED") + ": " + text, equal


def case_host_pressure(suite: Suite) -> tuple[str, str]:
    result = suite.run("host_pressure", suite.tokenvm(None, host_bytes="1MiB"))
    c = _counters(result, "loaded_blocks", "stored_blocks")
    ok = c["stored_blocks"] > 0
    return (("as expected" if ok else "UNEXPECTED") + f": 1 MiB host tier, "
            f"{c['stored_blocks']:.0f} stores, {c['loaded_blocks']:.0f} loads (constant "
            f"eviction)", suite.same(result))


def case_load_timeout(suite: Suite) -> tuple[str, str]:
    disk = suite.filled_disk("timeout")
    result = suite.run("load_timeout", suite.tokenvm(
        disk, debug_disk_faults="read:slow0.5:1", disk_prefetch_timeout_s=0.05))
    c = _counters(result, "prefetch_late_blocks", "prefetch_on_time_blocks")
    ok = c["prefetch_late_blocks"] > 0
    return (("as expected" if ok else "UNEXPECTED") + f": every disk read takes 0.5 s; "
            f"requests waited at most 0.05 s and ran with what was ready "
            f"({c['prefetch_late_blocks']:.0f} blocks arrived too late and were recomputed, "
            f"{c['prefetch_on_time_blocks']:.0f} on time)", suite.same(result))


CASES: dict[str, tuple[str, Callable[[Suite], tuple[str, str]]]] = {
    "disk full mid-run": ("disk writes fail and are counted; host tier keeps working; exact",
                          case_disk_full),
    "disk read errors (EIO)": ("failed reads are misses, recomputed; exact", case_read_errors),
    "slot file replaced by a directory": ("start-up refused with one line naming the file",
                                          case_slot_file_is_a_directory),
    "kill -9 during disk writes, restart": ("torn slots rejected, the rest served; exact",
                                            case_kill_9),
    "host memory pressure (1 MiB tier)": ("constant eviction; exact", case_host_pressure),
    "disk load times out": ("requests stop waiting after disk_prefetch_timeout_s; exact",
                            case_load_timeout),
}


def run_cases(out: Path, cycles: int, names: list[str] | None = None,
              progress: Callable[[str], None] = print) -> list[Row]:
    """Run the named cases (all by default) and return their rows; never raises for a case."""
    out.mkdir(parents=True, exist_ok=True)
    suite = Suite(out, cycles)
    rows = []
    for name, (expected, fn) in CASES.items():
        if names is not None and not any(part.lower() in name.lower() for part in names):
            continue
        progress(f"case: {name} ...")
        start = time.perf_counter()
        try:
            outcome, outputs = fn(suite)
        except Exception as exc:  # a case that crashes is a result, not a crash of the table
            outcome, outputs = f"UNEXPECTED: {type(exc).__name__}: {exc}".splitlines()[0], "-"
        rows.append(Row(name, expected, outcome, outputs, time.perf_counter() - start))
    return rows


def table(rows: list[Row]) -> str:
    """A Markdown table of the rows."""
    lines = ["| case | expected | outcome | outputs vs no TokenVM | s |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r.case} | {r.expected} | {r.outcome} | {r.outputs} | {r.seconds:.0f} |"
              for r in rows]
    return "\n".join(lines)


def cmd_faults(args: argparse.Namespace) -> int:
    """Run the suite, print the table; 1 if any case did not go as expected."""
    names = [n.strip() for n in args.cases.split(",") if n.strip()] if args.cases else None
    if names is not None and not any(part.lower() in case.lower() for part in names
                                     for case in CASES):
        print(f"tokenvm faults: error: --cases {args.cases!r} matches no case; cases: "
              f"{'; '.join(CASES)}", file=sys.stderr)
        return 2
    rows = run_cases(Path(args.out), args.cycles, names,
                     progress=lambda text: print(text, flush=True))
    print()
    print(table(rows))
    return 0 if all(row.passed for row in rows) else 1
