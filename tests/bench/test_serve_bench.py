"""The serving benchmark's own logic: configuration specs, metric scraping, ratios.

(Running it needs real servers: ``python -m tokenvm_vllm.bench.serve_bench run``; the numbers
in results/serve_h200 come from the GPU machine.)"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tokenvm_vllm.bench import serve_bench
from tokenvm_vllm.bench.serve_bench import ServerConfig, counters, report
from tokenvm_vllm.bench.server import ApiServer, ServerError, metric_samples
from tokenvm_vllm.bench.stats import queue_by_second


def opts(**kw: object) -> argparse.Namespace:
    base = {"kv_gib": 6.0, "floor_kv_gib": 30.0, "host_gib": 20.0, "tensor_parallel_size": 1}
    return argparse.Namespace(**(base | kw))


def test_config_specs_pick_runner_cache_and_offload() -> None:
    tokenvm = ServerConfig.parse("tokenvm_v1:copy_path=uva,write_mode=write_back", opts())
    assert tokenvm.env == {"VLLM_USE_V2_MODEL_RUNNER": "0"} and tokenvm.runner == "V1"
    assert tokenvm.kind == "tokenvm"
    transfer = json.loads(tokenvm.args[tokenvm.args.index("--kv-transfer-config") + 1])
    assert transfer["kv_connector"] == "TokenVM"
    assert transfer["kv_connector_extra_config"] == {
        "host_bytes": "20480MiB", "copy_path": "uva", "write_mode": "write_back"}
    native = ServerConfig.parse("native_v2", opts())
    assert native.env == {"VLLM_USE_V2_MODEL_RUNNER": "1"} and native.runner == "V2"
    assert native.args[native.args.index("--kv-offloading-size") + 1] == "20.0"
    floor = ServerConfig.parse("floor", opts())
    assert floor.env == {} and floor.args == ["--kv-cache-memory-bytes", str(30 * 2**30)]
    with pytest.raises(SystemExit, match="unknown configuration"):
        ServerConfig.parse("lmcache_v2", opts())
    with pytest.raises(SystemExit, match="tokenvm only"):
        ServerConfig.parse("native:copy_path=uva", opts())


def test_labels_and_tensor_parallel_split_host_memory_like_vllm() -> None:
    shared = ServerConfig.parse("tokenvm_v2@b:remote_url=redis://127.0.0.1:6379/0",
                                opts(tensor_parallel_size=2))
    assert shared.kind == "tokenvm" and shared.runner == "V2"
    assert shared.remote_url == "redis://127.0.0.1:6379/0"
    assert shared.args[shared.args.index("--tensor-parallel-size") + 1] == "2"
    transfer = json.loads(shared.args[shared.args.index("--kv-transfer-config") + 1])
    # TokenVM's host_bytes is per rank; vLLM's --kv-offloading-size is the total of all ranks
    assert transfer["kv_connector_extra_config"]["host_bytes"] == "10240MiB"
    native = ServerConfig.parse("native@x", opts(tensor_parallel_size=2))
    assert native.kind == "native" and native.remote_url is None
    assert native.args[native.args.index("--kv-offloading-size") + 1] == "20.0"
    assert "--tensor-parallel-size" not in ServerConfig.parse("none", opts()).args


def test_config_list_keeps_each_servers_settings_together() -> None:
    text = ("none,tokenvm@a:remote_url=redis://h:1/0,remote_ttl_s=60,"
            "tokenvm@b:remote_url=redis://h:1/0,native_v1")
    assert serve_bench.split_specs(text) == [
        "none", "tokenvm@a:remote_url=redis://h:1/0,remote_ttl_s=60",
        "tokenvm@b:remote_url=redis://h:1/0", "native_v1"]


def test_counters_from_prometheus_text() -> None:
    text = "\n".join([
        "# HELP vllm:prompt_tokens_by_source_total Prompt tokens by source.",
        'vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"} '
        "163840.0",
        'vllm:prompt_tokens_by_source_total{engine="1",model_name="m",source="local_compute"} '
        "10.0",
        'vllm:prompt_tokens_by_source_created{source="local_compute"} 1.7e9',
        'tokenvm:loaded_blocks_total{engine="0",model_name="m"} 12.0',
        "tokenvm:loaded_blocks_created 1.7e9",
        'vllm:num_preemptions_total{engine="0",model_name="m"} 3.0',
        'vllm:e2e_request_latency_seconds_bucket{le="+Inf"} 5.0',
        'vllm:e2e_request_latency_seconds_sum{engine="0"} 9.0',
        'tokenvm:elastic_apply_seconds_bucket{engine="0",le="0.001"} 3.0',
        'tokenvm:elastic_apply_seconds_sum{engine="0"} 0.25',
        'tokenvm:elastic_apply_seconds_count{engine="0"} 4.0',
    ])
    assert counters(metric_samples(text)) == {
        "prompt_tokens[local_compute]": 163850.0, "tokenvm:loaded_blocks_total": 12.0,
        "num_preemptions": 3.0, "tokenvm:elastic_apply_seconds_sum": 0.25,
        "tokenvm:elastic_apply_seconds_count": 4.0}


def write_result(directory: Path, config: str, runner: str, tok_s: float, ttft: float,
                 computed: float, round_no: int = 1) -> None:
    client = {"total_token_throughput": tok_s, "median_ttft_ms": ttft, "p99_ttft_ms": 2 * ttft,
              "mean_tpot_ms": 10.0, "median_itl_ms": ttft / 10, "p90_itl_ms": ttft / 5}
    workload = {"client": client, "counters": {"prompt_tokens[local_compute]": computed}}
    (directory / f"{serve_bench.file_slug(config, round_no)}.json").write_text(json.dumps(
        {"config": config, "round": round_no, "runner": runner, "workloads": {"p8": workload}}))


def test_report_ratios_against_native_same_runner_best_native_and_floor(tmp_path: Path) -> None:
    (tmp_path / "settings.json").write_text(json.dumps(
        {"prefixes": 2, "prefix_len": 100, "num_prompts": 10, "suffix_len": 10}))
    write_result(tmp_path, "floor", "default", 200.0, 50.0, 300.0)
    write_result(tmp_path, "native_v1", "V1", 100.0, 100.0, 300.0)
    write_result(tmp_path, "native_v2", "V2", 80.0, 100.0, 300.0)
    write_result(tmp_path, "tokenvm_v2", "V2", 120.0, 80.0, 330.0)
    rows = {r["config"]: r for r in report(serve_bench.load_results([tmp_path]))}
    mine = rows["tokenvm_v2"]
    assert mine["x_native_same"] == pytest.approx(1.5)  # against native on V2
    assert mine["x_native_best"] == pytest.approx(1.2)  # against native on V1, the better
    assert mine["x_base"] == pytest.approx(0.6)  # against the floor
    assert mine["ttft_x_native_same"] == pytest.approx(0.8)
    assert mine["x_min_computed"] == pytest.approx(1.1)  # minimum: 2 x 100 + 10 x 10
    # one round each: no spread, so no ratio is marked as noise (nor native against itself)
    assert not mine["within_spread"] and not rows["native_v2"]["within_spread"]


def test_rounds_report_the_median_and_the_spread(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--rounds 3``: each configuration's three interleaved runs come back as one row of
    medians, with the throughput's spread, and the ratios are taken between the medians."""
    for round_no, (native, mine) in enumerate([(100.0, 90.0), (80.0, 120.0), (90.0, 110.0)], 1):
        write_result(tmp_path, "native_v2", "V2", native, 100.0, 300.0, round_no)
        write_result(tmp_path, "tokenvm_v2", "V2", mine, 50.0 * round_no, 300.0, round_no)
    results = serve_bench.load_results([tmp_path])
    assert set(results) == {"native_v2", "tokenvm_v2"}
    rows = {r["config"]: r for r in report(results)}
    mine = rows["tokenvm_v2"]
    assert mine["tok_s"] == 110.0 and mine["ttft_p50"] == 100.0  # medians, not round 1
    assert mine["itl_p50"] == 10.0 and mine["itl_p90"] == 20.0
    assert mine["rounds"] == 3 and mine["spread"] == pytest.approx(30 / 110)
    assert mine["x_native_same"] == pytest.approx(110 / 90)
    assert rows["native_v2"]["spread"] == pytest.approx(20 / 90)
    # 1.22x, but TokenVM's own rounds spread 27%: the report marks the ratio as noise
    assert mine["within_spread"] and not rows["native_v2"]["within_spread"]
    assert "* throughput against native on the same runner" in capsys.readouterr().out


def test_rounds_alternate_the_order_and_can_start_later() -> None:
    """Even rounds run the configurations in reverse, so none always runs second; a later
    call's ``--first-round 2`` continues the alternation."""
    assert serve_bench.run_order(["a", "b", "c"], 1, 3) == [
        (1, "a"), (1, "b"), (1, "c"), (2, "c"), (2, "b"), (2, "a"), (3, "a"), (3, "b"), (3, "c")]
    assert serve_bench.run_order(["a", "b"], 2, 1) == [(2, "b"), (2, "a")]


def test_file_slug_keeps_the_label_and_marks_later_rounds() -> None:
    """One stem for a server's result, start-up and log files (two spellings once made the
    start-up file and the result of one server differ)."""
    assert serve_bench.file_slug("tokenvm_v2@defer:load_defer_steps=5", 1) == (
        "tokenvm_v2@defer-load_defer_steps-5")
    assert serve_bench.file_slug("native_v1", 2) == "native_v1.r2"


def test_start_ups_are_listed_in_the_order_the_servers_ran(tmp_path: Path) -> None:
    """Files of one call come back with new times when copied or checked out: start-ups
    recorded with ``started_at`` sort by it; older ones by the run order in settings.json;
    the directories in the order given."""
    older, newer = tmp_path / "older", tmp_path / "newer"
    older.mkdir()
    newer.mkdir()
    # second round of "a,b": b ran first; the files' times say the opposite
    (older / "settings.json").write_text(json.dumps(
        {"configs": "a,b@x:load_defer_steps=5", "first_round": 2, "rounds": 1}))
    for name, mtime in (("a", 100), ("b@x:load_defer_steps=5", 200)):
        path = older / f"{serve_bench.file_slug(name, 2)}.startup.json"
        path.write_text(json.dumps({"config": name, "round": 2}))
        os.utime(path, (mtime, mtime))
    for name, started in (("c", 20.0), ("d", 10.0)):
        (newer / f"{name}.startup.json").write_text(json.dumps(
            {"config": name, "round": 1, "started_at": started}))
    order = [s["config"] for s in serve_bench.load_startups([older, newer])]
    assert order == ["b@x:load_defer_steps=5", "a", "d", "c"]


def test_rounds_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--rounds 0: give 1 or more"):
        serve_bench.main(["run", "--model", "m", "--out", str(tmp_path), "--rounds", "0"])
    with pytest.raises(SystemExit, match="--first-round 0: give 1 or more"):
        serve_bench.main(["run", "--model", "m", "--out", str(tmp_path), "--first-round", "0"])


def test_a_warm_up_server_runs_first_and_stays_out_of_the_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``--warm-up-prompts N``: a throw-away server of the first configuration, N prompts of
    the first P workload, its files in OUT/warm-up/; the measured servers and the report are
    as without it."""
    calls: list[tuple[str, Path, list[str], int, int]] = []

    def run_config(config: ServerConfig, o: argparse.Namespace, out_dir: Path,
                   round_no: int = 1) -> dict[str, object]:
        calls.append((config.name, out_dir, list(o.workloads), o.num_prompts, o.prefixes))
        out_dir.mkdir(parents=True, exist_ok=True)
        tok_s = 50.0 if out_dir.name == "warm-up" else 100.0
        client = {"total_token_throughput": tok_s, "request_throughput": 1.0,
                  "median_ttft_ms": 10.0, "p99_ttft_ms": 20.0, "mean_tpot_ms": 1.0}
        result = {"config": config.name, "round": round_no, "runner": config.runner,
                  "workloads": {w: {"client": client, "counters": {}} for w in o.workloads}}
        (out_dir / f"{config.name}.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(serve_bench, "run_config", run_config)
    serve_bench.main(["run", "--model", "m", "--out", str(tmp_path), "--configs",
                      "native_v2,tokenvm_v2", "--workloads", "random,p32",
                      "--warm-up-prompts", "16", "--num-prompts", "256"])
    # The warm-up's 16 prompts go over 16 prefixes: vLLM's prefix_repetition refuses fewer
    # prompts than prefixes, and with the measured runs' 32 it never ran.
    assert calls == [("native_v2", tmp_path / "warm-up", ["p32"], 16, 16),
                     ("native_v2", tmp_path, ["random", "p32"], 256, 32),
                     ("tokenvm_v2", tmp_path, ["random", "p32"], 256, 32)]
    rows = report(serve_bench.load_results([tmp_path]))
    assert {r["tok_s"] for r in rows} == {100.0} and len(rows) == 4
    assert "warm-up: native_v2, 16 prompts of p32 (in no report)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--warm-up-prompts -1: give 0"):
        serve_bench.main(["run", "--model", "m", "--out", str(tmp_path),
                          "--warm-up-prompts", "-1"])


def test_fewer_prompts_than_prefixes_is_refused_before_any_server(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--num-prompts 16 is below --prefixes 32: .* give "
                       "--num-prompts 32 or more"):
        serve_bench.main(["run", "--model", "m", "--out", str(tmp_path / "o"), "--workloads",
                          "p8", "--num-prompts", "16"])
    assert not (tmp_path / "o").exists()


def test_a_failing_client_is_reported_with_its_last_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that exits non-zero raises with the end of its log (what a device call's
    serve_bench log then shows), after the server's counters were scraped as usual."""
    class Server:
        port = 1

        def metrics(self) -> list[tuple[str, dict[str, str], float]]:
            return []

        def cpu_seconds(self) -> dict[str, float]:
            return {}

    script = "import sys; print('loading'); sys.exit('ValueError: num_requests (16) too few')"
    monkeypatch.setattr(serve_bench, "client_command",
                        lambda *a: [sys.executable, "-c", script])
    o = argparse.Namespace(workload_timeout=60, sample_s=1.0)
    with pytest.raises(RuntimeError, match=r"vllm bench serve \(p8\) exited 1: "
                       "ValueError: num_requests \\(16\\) too few"):
        serve_bench.run_client(Server(), "p8", o, tmp_path, "s", 0.0,  # type: ignore[arg-type]
                               "tokenvm_v2")
    assert "loading" in (tmp_path / "s.p8.client.log").read_text()


def test_a_run_that_served_nothing_still_reports(tmp_path: Path) -> None:
    """A configuration whose client got no answer (0 tok/s) comes back as a row: the report
    must not die on it and lose the configurations that did run."""
    write_result(tmp_path, "native_v2", "V2", 100.0, 100.0, 300.0)
    write_result(tmp_path, "tokenvm_v2", "V2", 0.0, 0.0, 0.0)
    rows = {r["config"]: r for r in report(serve_bench.load_results([tmp_path]))}
    assert rows["tokenvm_v2"]["tok_s"] == 0.0 and rows["tokenvm_v2"]["spread"] == 0.0
    assert rows["native_v2"]["tok_s"] == 100.0


def test_a_taken_port_is_refused_before_the_server_starts(tmp_path: Path) -> None:
    """A server left from an earlier run on the asked port would answer /health in the new
    one's place: refuse at once, naming the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        with pytest.raises(ServerError, match=f"port {port} on 127.0.0.1 is in use"):
            ApiServer("m", [], tmp_path / "server.log", port=port)
    assert not (tmp_path / "server.log").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_signal_stops_a_run_and_its_server(tmp_path: Path, signum: int) -> None:
    """``timeout`` sends SIGTERM (or SIGINT with ``--signal=INT``): the run stops its server (in
    ``finally``) and reports what finished, instead of dying with the server still running.
    The run starts with SIGINT ignored, as a shell's background job (``cmd &``) does: SIGINT
    must still stop it."""
    script = (
        "import os, signal, sys\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job of a shell\n"
        "from tokenvm_vllm.bench import serve_bench\n"
        "def run_config(*args, **kwargs):\n"
        "    try:\n"
        f"        os.kill(os.getpid(), {int(signum)})\n"
        "        signal.pause()\n"
        "    finally:\n"
        "        print('server stopped', flush=True)\n"
        "serve_bench.run_config = run_config\n"
        f"serve_bench.main(['run', '--model', 'm', '--out', {str(tmp_path)!r}, "
        "'--configs', 'none', '--workloads', 'p8'])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "server stopped" in done.stdout
    assert "interrupted: reporting the configurations that finished" in done.stdout + done.stderr


def test_a_stop_interrupted_midway_still_kills_the_server(tmp_path: Path) -> None:
    """An interrupt while ``stop`` waits for vLLM's clean shutdown (a second signal from
    ``timeout``) must not leave the server running: it would hold the GPU and the port."""
    server = object.__new__(ApiServer)  # a stand-in server: a process that ignores SIGINT
    server.proc = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, "
         "signal.SIG_IGN); print('up', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, start_new_session=True)
    assert server.proc.stdout is not None and server.proc.stdout.readline() == b"up\n"
    # SIGUSR1 with serve_bench's own handler, not SIGINT: a shell that starts a job in the
    # background (`nohup ... &`) ignores SIGINT for it, and Python then never raises
    # KeyboardInterrupt.
    previous = signal.signal(signal.SIGUSR1, serve_bench._interrupt)
    interrupt = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    try:
        interrupt.start()
        with pytest.raises(KeyboardInterrupt):
            server.stop()  # waits up to 30 s for the ignored SIGINT; interrupted after 0.5 s
    finally:
        interrupt.join()
        signal.signal(signal.SIGUSR1, previous)
    assert server.proc.wait(timeout=10) == -signal.SIGKILL


def test_queue_by_second_counts_waiting_and_decoding_requests() -> None:
    """Two requests: A sent at 0, first token at 1.5, done at 2.5; B sent at 1.0, first token
    at 2.0, done at 2.2. Second 0: A waits the whole second; second 1: A waits half of it
    and B all of it; second 2, to the last end at 2.5: A decodes throughout, B for 0.2 of its
    0.5 s (a last, partial second is averaged over what it has)."""
    rows = queue_by_second([10.0, 11.0], [11.5, 12.0], [12.5, 12.2], sample_s=0.1)
    assert [round(w, 2) for w, _ in rows] == [1.0, 1.5, 0.0]
    assert [round(d, 2) for _, d in rows] == [0.0, 0.5, 1.4]
    assert queue_by_second([], [], []) == []


def test_run_client_keeps_each_requests_end_and_the_queue_per_second(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The end of a request is its first token plus its inter-token latencies; the waiting /
    decoding counts per second are printed and kept (any server, no trace needed)."""
    class Server:
        port = 1

        def metrics(self) -> list[tuple[str, dict[str, str], float]]:
            return []

        def __init__(self) -> None:
            self.cpu = iter([{"VLLM::EngineCore": 1.0, "python3": 2.0},
                             {"VLLM::EngineCore": 3.5, "python3": 2.5}])

        def cpu_seconds(self) -> dict[str, float]:
            return next(self.cpu)

    raw = {"start_times": [100.0, 100.5], "ttfts": [0.25, 1.0], "itls": [[0.5, 0.5], [0.25]],
           "total_token_throughput": 10.0, "median_ttft_ms": 600.0, "mean_tpot_ms": 1.0}
    script = ("import json, sys; json.dump(" + repr(raw) + ", open(sys.argv[1], 'w'))")

    def command(workload: str, opts: Any, out: Path, rate: float, port: int) -> list[str]:
        return [sys.executable, "-c", script, str(out)]

    monkeypatch.setattr(serve_bench, "client_command", command)
    o = argparse.Namespace(workload_timeout=60, sample_s=1.0)
    entry = serve_bench.run_client(Server(), "poisson", o, tmp_path, "s", 1.0,  # type: ignore[arg-type]
                                   "native_v2")
    assert entry["requests"]["end_s"] == [101.25, 101.75]
    assert entry["requests"]["first_token_s"] == [100.25, 101.5]
    # second 0: request 1 waits 0.25 s and decodes 0.75 s, request 2 waits 0.5 s; second 1
    # (to the last end, 1.75): request 2 waits 0.5 of 0.75 s and decodes 0.25, request 1 0.25
    assert entry["queue_by_second"] == [[0.8, 0.8], [0.7, 0.7]]
    out = capsys.readouterr().out
    assert "poisson requests waiting / decoding, mean per second: 1/1 1/1" in out
    # each server process's CPU over the run, by name, the busiest first
    assert entry["cpu_s"] == {"VLLM::EngineCore": 2.5, "python3": 0.5}
    assert "poisson CPU s of the server's processes (share of " in out
    assert out.index("VLLM::EngineCore 2.5") < out.index("python3 0.5")


def test_report_draws_the_queue_of_workloads_with_arrivals_at_a_rate(tmp_path: Path) -> None:
    """``serve_queue.png`` beside the report's PNG, for the Poisson workload only (closed-loop
    workloads have no rate); results without the queue (older runs) draw nothing."""
    def entry(rate: float, queue: list[list[float]] | None) -> dict[str, Any]:
        client = {"total_token_throughput": 10.0, "median_ttft_ms": 5.0, "ttft_ms": [5.0, 7.0]}
        return {"client": client, "rate": rate, "counters": {},
                **({"queue_by_second": queue} if queue else {})}

    results = {"native_v2": {"workloads": {"poisson": entry(2.0, [[1.0, 0.0], [0.5, 1.0]]),
                                           "p8": entry(0.0, [[8.0, 0.0]])}},
               "tokenvm_v2": {"workloads": {"poisson": entry(2.0, [[1.0, 1.0]])}}}
    png = tmp_path / "queue.png"
    assert serve_bench.plot_queues(results, png) == ["poisson"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    old = {"native_v2": {"workloads": {"poisson": entry(2.0, None)}}}
    assert serve_bench.plot_queues(old, tmp_path / "none.png") == []
    assert not (tmp_path / "none.png").exists()
