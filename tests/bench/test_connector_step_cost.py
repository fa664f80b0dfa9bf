"""bench/connector_step_cost.py: vLLM's Scheduler with and without TokenVM over one workload."""

from __future__ import annotations

from tokenvm_vllm.bench import connector_step_cost as cs


def test_both_configurations_run_the_workload_and_tokenvm_loads_from_host(
        tiny_model_config: str, capsys) -> None:
    """A small P workload whose prefixes do not all fit the GPU's 3,072 blocks (8 prefixes of
    480 blocks): both engines finish every request, both kinds of step are timed, and TokenVM
    computes fewer prompt tokens (the evicted prefixes come back from host)."""
    result = cs.run(tiny_model_config, requests=24, concurrency=4, prefixes=8,
                    prefix_blocks=480, suffix=16, output_tokens=3, host_slots=8192,
                    progress=lambda message: None)
    for name in ("none", "tokenvm"):
        for kind in ("decode", "prompt"):
            engine = result[name][kind]["engine"]
            assert engine["steps"] > 0 and 0 < engine["p50_us"] <= engine["mean_us"] * 50
            assert engine["mean_us"] < 1e6  # a step's Python, not a clock reading
    assert result["none"]["decode"]["worker"]["mean_us"] == 0  # no connector, no worker calls
    assert result["tokenvm"]["prompt"]["worker"]["mean_us"] > 0
    none, tokenvm = (result[n]["prompt_tokens_computed"] for n in ("none", "tokenvm"))
    assert 0 < tokenvm < none <= 24 * (480 * cs.BLOCK_SIZE + 16)
    cs.print_result(result)
    out = capsys.readouterr().out
    assert "decode" in out and "prompt tokens computed: none" in out
