"""Start-up phases from a server's log (``bench/startup.py``), and ``serve_bench`` keeping them
for a server whose benchmark was cut off (what a start-up comparison run usually is)."""

# ruff: noqa: E501  (log lines are quoted as the servers wrote them)
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from tokenvm_vllm.bench import serve_bench, startup
from tokenvm_vllm.bench.serve_bench import ServerConfig

# Lines as vLLM 0.26 and TokenVM wrote them on the H200 (2026-12-01, pin_mode: overlap)
OVERLAP_LOG = """\
(EngineCore pid=784) INFO 12-01 05:31:15 [model_runner.py:305] Model loading took 15.0 GiB and 2.141951 seconds
(EngineCore pid=784) INFO 12-01 05:31:39 [host_pool.py:526] TokenVM host pool: 10240 slots x 2097152 bytes = 20.00 GiB (pageable, pinned lazily, RAM used as slots are written) allocated in 0.00 s
(EngineCore pid=784) INFO 12-01 05:31:53 [host_pool.py:404] TokenVM host pool fully pinned: 20.00 GiB in 640 chunks in 12.82 s after start-up (639 in the background, 1 on demand by copies)
(EngineCore pid=784) INFO 12-01 05:31:46 [model_runner.py:747] Graph capturing finished in 2 secs, took 0.16 GiB
(EngineCore pid=784) INFO 12-01 05:32:03 [jit_monitor.py:79] Kernel JIT monitor activated; monitored JIT compilations during inference will use mode=warn.
(EngineCore pid=784) INFO 12-01 05:32:04 [core.py:340] init engine (profile, create kv cache, warmup model) took 49.21 s (compilation: 22.25 s)
(EngineCore pid=784) INFO 12-01 05:32:24 [worker.py:685] TokenVM host pool: registered during warm-up; the first step waited 0.00 s for it
"""
NONE_LOG = """\
(EngineCore pid=1393) INFO 12-01 05:33:01 [model_runner.py:305] Model loading took 15.0 GiB and 1.041951 seconds
(EngineCore pid=1393) INFO 12-01 05:33:59 [model_runner.py:747] Graph capturing finished in 1 secs, took 0.16 GiB
(EngineCore pid=1393) INFO 12-01 05:34:02 [jit_monitor.py:79] Kernel JIT monitor activated; monitored JIT compilations during inference will use mode=warn.
(EngineCore pid=1393) INFO 12-01 05:34:03 [core.py:340] init engine (profile, create kv cache, warmup model) took 44.05 s (compilation: 22.90 s)
"""


def test_phases_from_a_log_and_the_slowest_worker() -> None:
    phases = startup.parse(OVERLAP_LOG.splitlines())
    assert phases == pytest.approx({
        "engine_init_s": 49.21, "compile_s": 22.25, "init_minus_compile_s": 26.96,
        "load_s": 2.141951, "load_and_init_s": 51.351951, "pool_alloc_s": 0.0, "pool_pinned_s": 12.82, "first_step_wait_s": 0.0,
        "kernel_warmup_s": 17.0, "without_warmup_s": 34.351951})
    # The warm-up spans the log's time stamps, across midnight too
    midnight = ["x INFO 12-31 23:59:58 [model_runner.py:747] Graph capturing finished in 1 secs",
                "x INFO 01-01 00:00:03 [jit_monitor.py:79] Kernel JIT monitor activated; ..."]
    assert startup.parse(midnight) == {"kernel_warmup_s": 5.0}
    # Two workers (tensor parallel): each phase is the slower worker's
    second = OVERLAP_LOG.replace("in 12.82 s after", "in 14.50 s after")
    assert startup.parse((OVERLAP_LOG + second).splitlines())["pool_pinned_s"] == 14.5
    assert startup.parse(["nothing here"]) == {}


def test_the_table_puts_each_server_next_to_no_offload() -> None:
    entries = [{"config": "none", "round": 1, "up_s": 94.0, **startup.parse(NONE_LOG.splitlines())},
               {"config": "tokenvm_v2@overlap:pin_mode=overlap", "round": 1, "up_s": 124.0,
                **startup.parse(OVERLAP_LOG.splitlines())}]
    lines = startup.table(entries).splitlines()
    overlap = lines[2].split()
    # load 2.1, engine 49.2, compilation 22.2 (49.21 - 22.25 = 26.96), +5.8 over no offload's
    # 21.15; load + engine 51.35 against 45.09: +6.3; without the kernel warm-ups (17 s
    # against 3 s): 34.35 against 42.09, -7.7
    assert overlap[:11] == ["tokenvm_v2@overlap:pin_mode=overlap", "1", "124.0", "2.1", "49.2",
                            "22.2", "27.0", "+5.8", "+6.3", "17.0", "-7.7"]
    assert overlap[-3:] == ["0.0", "12.8", "0.0"]
    assert lines[1].split()[7:11] == ["+0.0", "+0.0", "3.0", "+0.0"]
    # With rounds, each server against the no-offload server of its own round (cold compile
    # caches in round 1, warm in round 2): round 2's TokenVM, load + engine 23.35 s, is +6.3
    # over round 2's none (17.09 s), where the median of both nones would give -7.7
    warm_none = {"config": "none", "round": 2, "up_s": 50.0, **startup.parse(NONE_LOG.replace(
        "took 44.05 s (compilation: 22.90 s)", "took 16.05 s (compilation: 4.90 s)").splitlines())}
    warm_tokenvm = {"config": entries[1]["config"], "round": 2, "up_s": 60.0,
                    **startup.parse(OVERLAP_LOG.replace(
                        "took 49.21 s (compilation: 22.25 s)",
                        "took 21.21 s (compilation: 4.25 s)").splitlines())}
    rows = startup.table([*entries, warm_none, warm_tokenvm]).splitlines()
    assert rows[2].split()[7:11] == ["+5.8", "+6.3", "17.0", "-7.7"]  # round 1 as before
    assert rows[4].split()[8] == "+6.3"  # 23.35 against 17.09
    # The V1 runner's no-offload server is the base as well
    entries[0]["config"] = "none_v1"
    assert startup.table(entries).splitlines()[2].split()[7] == "+5.8"
    entries[0]["config"] = "native_v1"
    assert startup.table(entries).splitlines()[2].split()[7] == "-"


def test_a_server_cut_off_in_its_benchmark_still_reports_its_start_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A start-up comparison run is usually cut off by the device call's time limit during the
    last server's benchmark (twice on 2026-12-01): that server's start-up must survive."""

    class FakeServer:
        def __init__(self, model: str, args: list[str], log: Path, **kwargs: Any) -> None:
            self.log, self.cmd, self.stopped = log, ["vllm", *args], False
            log.write_text(OVERLAP_LOG)

        def wait_healthy(self, timeout_s: float) -> float:
            return 124.0

        def stop(self) -> None:
            self.stopped = True

    def interrupted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise KeyboardInterrupt  # `timeout --signal=INT` during the benchmark

    monkeypatch.setattr(serve_bench, "ApiServer", FakeServer)
    monkeypatch.setattr(serve_bench, "run_client", interrupted)
    opts = argparse.Namespace(
        kv_gib=6.0, floor_kv_gib=30.0, host_gib=20.0, tensor_parallel_size=1, dtype="bfloat16",
        max_num_seqs=32, max_model_len=8192, server_arg=[], dummy=True, port=8321, model="m",
        startup_timeout=10.0, workloads=["p8"])
    config = ServerConfig.parse("tokenvm_v2@overlap:pin_mode=overlap", opts)
    with pytest.raises(KeyboardInterrupt):
        serve_bench.run_config(config, opts, tmp_path, 1)
    (saved,) = tmp_path.glob("*.startup.json")
    data = json.loads(saved.read_text())
    assert data["config"] == config.name and data["up_s"] == 124.0
    assert data["pool_pinned_s"] == 12.82 and data["first_step_wait_s"] == 0.0
    serve_bench.main(["report", str(tmp_path)])
    assert "tokenvm_v2@overlap:pin_mode=overlap" in capsys.readouterr().out.split("start-up")[-1]
