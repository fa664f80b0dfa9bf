"""Issue #13: two vLLM servers on one GPU whose fixed KV pools, sized for their peaks, would not
both fit, with alternating bursts: both serve, token-exact, neither fails an allocation.

Three servers in turn on the machine's first GPU, each a real ``vllm.entrypoints.openai.
api_server`` (eager, as when it first passed):

1. ``reference``: no TokenVM, a fixed KV cache of ``--peak-gib``, alone on the GPU; it answers
   every prompt of the run (the expected outputs).
2. ``A`` and ``B`` together (B started once A is up: each start-up maps its whole range for
   vLLM's warm-up for a moment): TokenVM ``elastic: true``, each with a KV range of ``--peak-gib``
   (2 x peak is more than the GPU holds next to the weights), floor 0, ``shrink_idle_s``
   ``--idle-s`` and ``gpu_free_target_bytes`` ``--free-target-gib``. Bursts alternate: A gets a
   burst of ``--burst`` concurrent long prompts while B is idle, then B while A is idle, then
   each again with its first burst's prompts (revisits: spilled prefixes come back from host)
   and new ones.

Meanwhile both servers' ``tokenvm:elastic_mapped_bytes`` and the GPU's used memory are sampled.
Outputs are compared token for token with the reference (float32, ``VLLM_BATCH_INVARIANT=1``:
batch composition does not change numerics). Fails (exit 1, ``TWO-SERVERS FAIL``) on any
differing output, a request that errored, a server that died, or a failed map
(``tokenvm:elastic_failed_maps``).

    python ci/gpu/two_servers.py --out DIR            # GPU (bash ci/gpu/run.sh twoservers)
    python ci/gpu/two_servers.py --out DIR --smoke    # CPU: the script's own plumbing
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tokenvm_vllm.bench import wave
from tokenvm_vllm.bench.server import ApiServer
from tokenvm_vllm.tiny_llama import TinyLlamaShape, write_tiny_llama

# 16 layers x K,V x 8 KV heads x 128 x 4 bytes (float32) = 128 KiB of KV per token
GPU_SHAPE = TinyLlamaShape(vocab_words=4093, hidden_size=1024, intermediate_size=2816,
                           num_layers=16, num_heads=8, num_kv_heads=8,
                           max_position_embeddings=32768)
CPU_SHAPE = TinyLlamaShape(vocab_words=1021, hidden_size=128, intermediate_size=256,
                           num_layers=2, num_heads=2, num_kv_heads=2)


def log(text: str) -> None:
    print(f"[two_servers {time.strftime('%H:%M:%S')}] {text}", flush=True)


def make_prompts(n: int, tokens: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 1000) for _ in range(tokens)] for _ in range(n)]


def burst(server: ApiServer, prompts: list[list[int]], max_tokens: int) -> list[Any]:
    """Send every prompt at once (one thread each); each result: ``["ok", text]`` (the
    word-level tokenizer makes text equality token equality) or ``["error", message]``."""
    def one(prompt: list[int]) -> Any:
        try:
            reply = server.post("/v1/completions", {
                "model": server.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}, timeout=600)
            return ["ok", reply["choices"][0]["text"]]
        except Exception as err:  # noqa: BLE001 - reported as a failed request
            return ["error", f"{type(err).__name__}: {err}"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def server_args(opts: argparse.Namespace, elastic: bool) -> list[str]:
    args = ["--dtype", "float32", "--max-model-len", str(opts.prompt_tokens + 64),
            "--max-num-seqs", str(opts.burst), "--enforce-eager",
            "--kv-cache-memory-bytes", str(int(opts.peak_gib * 2**30))]
    if opts.smoke:
        args += ["--block-size", "32"]
    else:
        args += ["--gpu-memory-utilization", "0.05"]  # the KV size is given; two share the GPU
    if elastic:
        extra = {"host_bytes": f"{int(opts.host_gib * 1024)}MiB", "elastic": True,
                 "shrink_idle_s": opts.idle_s,
                 "gpu_free_target_bytes": f"{int(opts.free_target_gib * 1024)}MiB"}
        if opts.smoke:
            extra["elastic_page_bytes"] = "64KiB"
            extra.pop("gpu_free_target_bytes")  # no NVML on CPU: inert, and it would warn
        args += ["--kv-transfer-config", json.dumps({
            "kv_connector": "TokenVM", "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra})]
    return args


def start(name: str, model: str, opts: argparse.Namespace, elastic: bool) -> ApiServer:
    env = {"PYTHONHASHSEED": "0"}
    if not opts.smoke:  # (Triton kernels: GPU only)
        env["VLLM_BATCH_INVARIANT"] = "1"
    return ApiServer(model, server_args(opts, elastic), opts.out / f"{name}.server.log", env=env)


def failed_maps(server: ApiServer) -> float:
    return sum(value for name, _labels, value in server.metrics()
               if name == "tokenvm:elastic_failed_maps_total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--peak-gib", type=float, default=70.0,
                        help="each server's KV range (the reference's fixed cache)")
    parser.add_argument("--prompt-tokens", type=int, default=16000)
    parser.add_argument("--burst", type=int, default=32, help="concurrent prompts per burst")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--idle-s", type=float, default=6.0, help="shrink_idle_s of A and B")
    parser.add_argument("--free-target-gib", type=float, default=6.0)
    parser.add_argument("--host-gib", type=float, default=24.0)
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny sizes")
    opts = parser.parse_args()
    if opts.smoke:
        opts.peak_gib, opts.prompt_tokens, opts.burst, opts.host_gib = 0.01, 200, 4, 0.05
        opts.idle_s = 2.0
    opts.out.mkdir(parents=True, exist_ok=True)
    model = str(write_tiny_llama(opts.out / "model", CPU_SHAPE if opts.smoke else GPU_SHAPE))
    schedule = [("A", 1), ("B", 2), ("A", 3), ("B", 4)]  # (server, burst seed)
    bursts = {seed: make_prompts(opts.burst, opts.prompt_tokens, seed) for _, seed in schedule}
    # the second round revisits half of the first round's prompts
    half = opts.burst // 2
    bursts[3] = bursts[1][:half] + bursts[3][half:]
    bursts[4] = bursts[2][:half] + bursts[4][half:]

    log("reference (no TokenVM, fixed cache, alone)")
    reference = start("reference", model, opts, elastic=False)
    expected: dict[int, list[Any]] = {}
    try:
        reference.wait_healthy(600)
        for _, seed in schedule:
            expected[seed] = burst(reference, bursts[seed], opts.max_tokens)
    finally:
        reference.stop()

    log("A and B together (elastic)")
    # One after the other, as on any shared GPU: each start-up maps the whole KV range for a
    # moment (vLLM's warm-up) and gives it back in the empty step right after start-up.
    servers = {"A": start("A", model, opts, elastic=True)}
    samplers: dict[str, wave.Sampler] = {}
    got: dict[int, list[Any]] = {}
    problems: list[str] = []
    try:
        servers["A"].wait_healthy(600)
        time.sleep(3)
        servers["B"] = start("B", model, opts, elastic=True)
        servers["B"].wait_healthy(600)
        samplers = {name: wave.Sampler(server, 0.5) for name, server in servers.items()}
        for sampler in samplers.values():
            sampler.start()
        for name, seed in schedule:
            for other, sampler in samplers.items():
                sampler.set_phase("busy" if other == name else "idle")
            log(f"burst {seed} on {name}")
            got[seed] = burst(servers[name], bursts[seed], opts.max_tokens)
            time.sleep(opts.idle_s + 2)  # the other server's turn comes after this one idles
        for name, server in servers.items():
            if server.proc.poll() is not None:
                problems.append(f"server {name} died")
            elif failed_maps(server):
                problems.append(f"server {name}: {failed_maps(server):.0f} failed maps")
    finally:
        samples = {name: sampler.stop() for name, sampler in samplers.items()}
        for server in servers.values():
            server.stop()

    differing = {seed: [i for i, (a, b) in enumerate(zip(got.get(seed, []), expected[seed],
                                                         strict=False)) if a != b]
                 for seed in expected}
    errors = [o[1] for outs in got.values() for o in outs if o[0] == "error"]
    for seed, bad in differing.items():
        if bad:
            problems.append(f"burst {seed}: {len(bad)} of {opts.burst} outputs differ")
    if errors:
        problems.append(f"{len(errors)} requests failed: {errors[0][:200]}")
    peaks = {name: max((s[2] or 0 for s in ss), default=0) for name, ss in samples.items()}
    peaks.update({name: 0 for name in servers if name not in peaks})
    gpu_peak = max((s[3] or 0 for ss in samples.values() for s in ss), default=0)
    result = {"settings": {k: str(v) for k, v in vars(opts).items()},
              "differing": {str(k): v for k, v in differing.items()}, "errors": errors[:5],
              "mapped_peak_bytes": peaks, "gpu_used_peak_mib": gpu_peak,
              "samples": samples, "problems": problems}
    (opts.out / "two_servers.json").write_text(json.dumps(result, indent=1))
    wave.plot({f"server {n}": {"wave": {"samples": s}} for n, s in samples.items()},
              opts.out / "two_servers.png")
    log(f"mapped peak A {peaks['A'] / 2**30:.2f} GiB, B {peaks['B'] / 2**30:.2f} GiB; GPU used "
        f"peak {gpu_peak:.0f} MiB; fixed pools at peak would need {2 * opts.peak_gib:.0f} GiB")
    print("TWO-SERVERS " + ("PASS" if not problems else "FAIL: " + "; ".join(problems)))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
