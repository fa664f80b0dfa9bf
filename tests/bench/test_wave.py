"""The ``wave`` workload's own logic (issue #13): the two bursts' client commands and the memory
summary. (A whole wave runs against a real server: ``serve_bench run --workloads wave``; on this
CPU machine with a tiny model and ``elastic: true`` it shrinks at the request that ends the idle
period and grows again in ``wave2``.)"""

import argparse
from pathlib import Path

from tokenvm_vllm.bench import serve_bench, wave
from tokenvm_vllm.bench.serve_bench import client_command
from tokenvm_vllm.bench.stats import median_by_quarter


def test_both_bursts_send_the_same_prompts_at_poisson_arrivals(tmp_path: Path) -> None:
    opts = argparse.Namespace(port=1, model="m", prefix_len=64, suffix_len=8, output_len=2,
                              num_prompts=4, prefixes=2, random_prompts=1)
    first = client_command("wave1", opts, tmp_path / "a.json", 3.5, 1)
    second = client_command("wave2", opts, tmp_path / "b.json", 3.5, 1)
    assert first[first.index("--request-rate") + 1] == "3.500"
    assert first[first.index("--seed") + 1] == second[second.index("--seed") + 1]
    p8 = client_command("p8", opts, tmp_path / "c.json", 0.0, 1)
    assert p8[p8.index("--seed") + 1] != first[first.index("--seed") + 1]
    assert "--request-rate" not in p8
    # per-request TTFTs come back (serve_bench keeps four medians of them, then drops them)
    assert "--save-detailed" in first and "--save-detailed" in p8


def test_ttft_medians_by_quarter_of_the_requests_in_arrival_order() -> None:
    ttfts = [900.0, 700.0, 100.0, 120.0, 110.0, 130.0, 90.0, 95.0]
    assert median_by_quarter(ttfts) == [800.0, 110.0, 120.0, 92.5]  # the burst's start waited
    assert median_by_quarter([5.0, 1.0]) == [5.0, 1.0]
    assert median_by_quarter([]) == []


def test_summary_reads_the_levels_held_at_the_end_of_idle_and_after_the_shrink() -> None:
    samples = [
        [0.0, "wave1", 0.0, 1000.0], [1.0, "wave1", 4 * 2**20, 1200.0],
        [2.0, "idle", 4 * 2**20, 1200.0], [3.0, "idle", 4 * 2**20, 1190.0],
        [4.0, "wave2", 1 * 2**20, 1050.0], [5.0, "wave2", 3 * 2**20, 1150.0],
        [6.0, "end", 3 * 2**20, None],
    ]
    summary = wave.summarize(samples)
    assert summary["wave1"]["mapped_bytes"] == {"mean": 2 * 2**20, "peak": 4 * 2**20}
    assert summary["held_end_of_idle"] == {"mapped_bytes": 4 * 2**20, "gpu_used_mib": 1190.0}
    assert summary["held_after_shrink"] == {"mapped_bytes": 2**20, "gpu_used_mib": 1050.0}
    assert summary["wave2"]["gpu_used_mib"] == {"mean": 1100.0, "peak": 1150.0}
    fixed = wave.summarize([[0.0, "wave1", None, 900.0], [1.0, "idle", None, 900.0]])
    assert fixed["wave1"]["mapped_bytes"] == {"mean": None, "peak": None}  # not elastic
    assert fixed["held_after_shrink"] is None  # no wave2 sample


def test_long_contexts_ask_questions_about_long_documents_at_a_rate(tmp_path: Path) -> None:
    opts = argparse.Namespace(port=1, model="m", suffix_len=8, output_len=2, long_len=32768,
                              long_docs=8, long_prompts=64, long_rate=1.5)
    cmd = client_command("long", opts, tmp_path / "l.json", 0.0, 1)
    assert cmd[cmd.index("--prefix-repetition-prefix-len") + 1] == "32768"
    assert cmd[cmd.index("--prefix-repetition-num-prefixes") + 1] == "8"
    assert cmd[cmd.index("--num-prompts") + 1] == "64"
    assert cmd[cmd.index("--request-rate") + 1] == "1.500"
    summary = wave.summarize([[0.0, "long", 2.0 * 2**20, None], [1.0, "long", 4.0 * 2**20, None]])
    assert summary["long"]["mapped_bytes"] == {"mean": 3.0 * 2**20, "peak": 4.0 * 2**20}


def test_each_requests_ttft_is_kept_and_drawn_in_arrival_order(tmp_path: Path) -> None:
    """``serve_bench`` keeps every request's TTFT (ms, arrival order; a failed request has
    none) and drops the bulky lists; the wave's plot draws them for each configuration that
    has them, burst 1 then burst 2."""
    raw = {"ttfts": [0.2, 0.0, 0.65, 0.1, 0.11], "itls": [[0.01] * 32] * 5,
           "generated_texts": ["x"] * 5, "start_times": [1.0] * 5, "median_ttft_ms": 150.0}
    client = serve_bench.trim_client(raw)
    assert client["ttft_ms"] == [200.0, 650.0, 100.0, 110.0]
    assert client["ttft_p50_ms_by_quarter"] == [200.0, 650.0, 100.0, 110.0]
    assert not {"ttfts", "itls", "generated_texts", "start_times"} & client.keys()
    samples = [[0.0, "wave1", 2**20, 1000.0], [1.0, "idle", 2**20, 1000.0]]
    results = {
        "elastic": {"wave": {"samples": samples}, "workloads": {
            "wave1": {"client": client}, "wave2": {"client": {"ttft_ms": [90.0]}}}},
        "fixed": {"wave": {"samples": samples}, "settings": {"kv_gib": 6.0}, "workloads": {}},
    }
    png = tmp_path / "serve_wave.png"
    assert wave.plot(results, png) == ["elastic"]  # the fixed result kept no TTFTs
    assert png.stat().st_size > 10_000


def test_wave_ratios_compare_each_elastic_burst_with_the_fixed_pool() -> None:
    """``serve_bench`` prints issue #13's ratios itself: each elastic configuration's bursts
    against the fixed pool's (told apart by the mapped-bytes gauge: 0 on a fixed pool)."""
    def result(peak: float, tok_s: tuple[float, float], ttft: tuple[float, float]) -> dict:
        samples = [[0.0, "wave1", peak, 1000.0], [1.0, "idle", 0.0, 1000.0]]
        return {"wave": {"samples": samples}, "workloads": {
            burst: {"client": {"total_token_throughput": t, "median_ttft_ms": f,
                               "mean_tpot_ms": 5.0, "ttft_p50_ms_by_quarter": [f] * 4}}
            for burst, t, f in zip(("wave1", "wave2"), tok_s, ttft, strict=True)}}

    waves = {"elastic": result(2.0**30, (980.0, 1000.0), (110.0, 130.0)),
             "fixed": result(0.0, (1000.0, 1000.0), (100.0, 100.0))}
    rows = serve_bench.wave_ratios(waves)
    assert [(r["config"], r["burst"]) for r in rows] == [("elastic", "wave1"),
                                                          ("elastic", "wave2")]
    assert rows[0]["tok_s_x"] == 0.98 and rows[0]["ttft_p50_x"] == 1.1
    assert rows[1]["ttft_p50_x"] == 1.3 and rows[1]["fixed_quarters"] == [100.0] * 4
    assert serve_bench.wave_ratios({"elastic": waves["elastic"]}) == []  # no fixed pool
