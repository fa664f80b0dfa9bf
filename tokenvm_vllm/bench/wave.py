"""The serving benchmark's ``wave`` workload (issue #13): load that rises, falls to idle and rises
again, with the KV memory a server holds sampled over time.

Three phases on one server: ``wave1``, a burst of ``prefix_repetition`` prompts at Poisson
arrivals; ``idle``, ``--wave-idle-s`` seconds without requests (elastic mode shrinks
``shrink_idle_s`` into it: TokenVM keeps the idle engine stepping until then), ended by one short
request; ``wave2``, the same burst again (same seed: the same prompts, so every prefix is a
revisit, and a prefix spilled by the shrink comes back from host instead of being recomputed).

Meanwhile a ``Sampler`` thread reads, every ``--sample-s`` seconds, the server's
``tokenvm:elastic_mapped_bytes`` gauge (elastic mode only) and the GPU memory in use
(``nvidia-smi``, where there is one). ``summarize`` turns the samples into the numbers issue #13
asks for (mean mapped bytes per phase, what is held at the end of the idle period and after the
shrink) and ``plot`` draws mapped and used memory over time for every configuration.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tokenvm_vllm.bench.server import ApiServer

MAPPED = "tokenvm:elastic_mapped_bytes"
PHASES = ("wave1", "idle", "wave2")


def gpu_used_mib() -> float | None:
    """Memory in use on this process's first visible GPU (``nvidia-smi``), or None (no GPU)."""
    if shutil.which("nvidia-smi") is None:
        return None
    index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    try:
        out = subprocess.run(["nvidia-smi", "-i", index, "--query-gpu=memory.used",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
        return float(out.strip().splitlines()[0])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None


class Sampler(threading.Thread):
    """Samples ``[monotonic time, phase, mapped bytes or None, GPU MiB used or None]`` every
    ``every_s`` seconds until ``stop``; ``phase`` is whatever ``set_phase`` said last."""

    def __init__(self, server: ApiServer, every_s: float) -> None:
        super().__init__(name="wave-sampler", daemon=True)
        self.server = server
        self.every_s = every_s
        self.phase = "start"
        self.samples: list[list[Any]] = []
        self._stop_event = threading.Event()

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.sample()  # a sample at every phase boundary

    def sample(self) -> None:
        mapped: float | None = None
        try:
            for name, _labels, value in self.server.metrics():
                if name == MAPPED:
                    mapped = (mapped or 0.0) + value
        except OSError:  # the server is busy or going away: keep what the GPU says
            pass
        self.samples.append([time.monotonic(), self.phase, mapped, gpu_used_mib()])

    def run(self) -> None:
        while not self._stop_event.wait(self.every_s):
            self.sample()

    def stop(self) -> list[list[Any]]:
        self._stop_event.set()
        self.join(timeout=30)
        return self.samples


def summarize(samples: list[list[Any]]) -> dict[str, Any]:
    """Per phase (the wave's three, and any other the samples name): mean and peak of the
    mapped bytes and of the GPU memory used; and the two
    levels issue #13 judges: ``held_end_of_idle`` (the last idle sample before the request that
    ends it) and ``held_after_shrink`` (the first sample of ``wave2``)."""

    def stats(column: int, phase: str) -> dict[str, float | None]:
        values = [s[column] for s in samples if s[1] == phase and s[column] is not None]
        if not values:
            return {"mean": None, "peak": None}
        return {"mean": sum(values) / len(values), "peak": max(values)}

    phases = dict.fromkeys([*PHASES, *(s[1] for s in samples)])  # (the wave's, then any other)
    summary: dict[str, Any] = {
        phase: {"mapped_bytes": stats(2, phase), "gpu_used_mib": stats(3, phase)}
        for phase in phases}
    idle = [s for s in samples if s[1] == "idle"]
    wave2 = [s for s in samples if s[1] == "wave2"]
    summary["held_end_of_idle"] = {"mapped_bytes": idle[-1][2], "gpu_used_mib": idle[-1][3]} \
        if idle else None
    summary["held_after_shrink"] = {"mapped_bytes": wave2[0][2], "gpu_used_mib": wave2[0][3]} \
        if wave2 else None
    return summary


def poke(server: ApiServer) -> None:
    """One short request, the end of the idle period (the first arrival after it)."""
    server.complete([3, 5, 7, 11], max_tokens=1)


def is_elastic(data: dict[str, Any]) -> bool:
    """Whether a wave result's server mapped KV memory elastically: its mapped-bytes samples
    read above 0 at some point (the gauge reads 0 on a fixed pool)."""
    return any(s[2] for s in data.get("wave", {}).get("samples") or [])


def plot(results: dict[str, dict[str, Any]], png: Path) -> list[str]:
    """KV bytes held (elastic: mapped; a fixed pool: its size, the settings' ``kv_gib``) and
    GPU memory used over time, one line per configuration; below, each request's TTFT in
    arrival order, burst 1 then burst 2 (where a result has them: ``serve_bench`` keeps them
    since 2026-12-01). Returns the configurations whose TTFTs were drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(10, 10))
    top = fig.add_subplot(3, 1, 1)
    bottom = fig.add_subplot(3, 1, 2, sharex=top)
    requests = fig.add_subplot(3, 1, 3)
    drawn: list[str] = []
    for name, data in results.items():
        ttfts = [t for burst in ("wave1", "wave2") for t in
                 data.get("workloads", {}).get(burst, {}).get("client", {}).get("ttft_ms", [])]
        if ttfts:
            requests.plot(range(len(ttfts)), ttfts, ".", markersize=3, label=name[:40])
            drawn.append(name)
    requests.set_xlabel("request, in arrival order (burst 1, then burst 2)")
    requests.set_ylabel("TTFT (ms)")
    requests.grid(alpha=0.3)
    if requests.get_legend_handles_labels()[0]:
        requests.legend(fontsize=7)
    for name, data in results.items():
        samples = data.get("wave", {}).get("samples") or []
        if not samples:
            continue
        t0 = samples[0][0]
        times = [s[0] - t0 for s in samples]
        kv_gib = data.get("settings", {}).get("kv_gib")
        if is_elastic(data):
            top.plot(times, [(s[2] or 0) / 2**30 for s in samples], label=name[:40])
        elif kv_gib is not None:  # (the mapped-bytes gauge reads 0 without elastic mode)
            top.plot(times, [float(kv_gib)] * len(times), label=f"{name[:32]} (fixed)")
        if any(s[3] is not None for s in samples):
            bottom.plot(times, [(s[3] or 0) / 1024 for s in samples], label=name[:40])
    top.set_ylabel("KV held (GiB)")
    bottom.set_ylabel("GPU memory used (GiB)")
    bottom.set_xlabel("seconds (wave1, idle, wave2)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("wave workload: KV memory over time, and each request's TTFT")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return drawn
