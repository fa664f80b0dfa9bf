"""Plots of the benchmark JSON files (copy bench, revisit bench) as PNGs.

    python -m tokenvm_vllm.bench.plots results/     # writes results/*.png next to the JSON
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def plot_copy_bench(data: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    blocks = [row["blocks"] for row in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, style in [("memcpy h2d", "k--"), ("tokenvm h2d", "b-o"), ("tokenvm d2h", "g-o"),
                        ("tokenvm both", "m-o"), ("vllm dma 2M h2d", "r-s"),
                        ("vllm dma 64K h2d", "y-s")]:
        ax.plot(blocks, [row[name] for row in rows], style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("blocks per copy (2 MiB each, Llama-3.1-8B shape)")
    ax.set_ylabel("GB/s")
    ax.set_title(f"Copy bandwidth, {data['gpu']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_revisit(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(names, [results[n]["revisit_median_ms"] for n in names], color="tab:blue",
             label="p50")
    left.errorbar(names, [results[n]["revisit_median_ms"] for n in names],
                  yerr=[[0] * len(names),
                        [results[n]["revisit_p90_ms"] - results[n]["revisit_median_ms"]
                         for n in names]], fmt="none", ecolor="k", capsize=4, label="to p90")
    left.set_ylabel("revisit latency, ms (8k prefix)")
    left.legend()
    right.bar(names, [results[n]["first_pass_s"] for n in names], color="tab:gray")
    right.set_ylabel("first pass, s")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=20)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_timeline(results: dict[str, Any], out: Path) -> None:
    """One revisit, per TokenVM configuration: events and the copy on a shared time axis, with
    the median revisit of no-copy (gpu_hit) and vLLM native configurations as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [name for name in results if results[name].get("timeline_ms")]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.8 * len(rows)))
    for y, name in enumerate(rows):
        t = results[name]["timeline_ms"]
        ax.barh(y, t["copy_device_ms"], left=t["load-submitted"], color="tab:orange",
                label="host->GPU copy (device time)" if y == 0 else None)
        ax.barh(y, t["generate-end"], color="none", edgecolor="k")
        for event, marker in (("lookup", "o"), ("load-finished", "s")):
            ax.plot(t[event], y, marker, color="k")
            ax.annotate(event, (t[event], y + 0.28), fontsize=7, ha="center")
    for name, style in (("gpu_hit", "g--"), ("native", "r:")):
        if name in results:
            ms = results[name]["revisit_median_ms"]
            ax.axvline(ms, color=style[0], linestyle=style[1:], label=f"{name} p50 {ms:.0f} ms")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("ms after the client's generate() call (medians of single revisits)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="folder with copy_bench*.json / revisit*.json")
    args = parser.parse_args()
    folder = Path(args.folder)
    for path in sorted(folder.glob("copy_bench*.json")):
        plot_copy_bench(json.loads(path.read_text()), path.with_suffix(".png"))
        print("wrote", path.with_suffix(".png"))
    for path in sorted(folder.glob("revisit*.json")):
        results = json.loads(path.read_text())
        plot_revisit(results, path.with_suffix(".png"))
        print("wrote", path.with_suffix(".png"))
        if any(r.get("timeline_ms") for r in results.values()):
            timeline = path.with_name(path.stem + "_timeline.png")
            plot_timeline(results, timeline)
            print("wrote", timeline)


if __name__ == "__main__":
    main()
