#!/usr/bin/env bash
# The GPU job (vLLM 0.26.0 on the GPU machine). Run from the repo root after the bundle is
# unpacked into /tmp/site and .gpu/redis staged (see README "GPU runs"). Stages: tests, copy,
# exact, rows, serve, remote, vmm, hostpool, hybrid, elastic, wave, long,
# twoservers, revisit, disk.
#   bash ci/gpu/run.sh "tests copy exact"
# Work files (models, per-engine logs) go to $WORK; each stage's own log, its results JSON and a
# tarball of the logs go to $OUT (the device tool brings back at most 8 files from there). A stage
# log is written to $OUT as it runs, so a call cut short by a timeout still brings it back.
set -uo pipefail
STAGES="${1:-tests copy exact revisit}"
OUT="${OUT:-out/gpu}"
WORK="${WORK:-/tmp/tokenvm-gpu}"
mkdir -p "$OUT" "$WORK"
# .gpu/redis/py: the redis client and hiredis, which the vLLM bundle lacks (ci/gpu/stage_redis.sh)
export PYTHONPATH="/tmp/site:$PWD:$PWD/.gpu/redis/py" PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$WORK/install.log" 2>&1 \
  || echo "editable install failed (entry point unavailable): see $WORK/install.log"
# TokenVM imports the redis client, which the vLLM bundle lacks: without it every server of a
# stage dies at start-up (a call on 2026-11-30 lost its device time that way). Stop here.
python3 -c "import redis" 2>/dev/null || { echo "run.sh: no 'redis' module: unpack .gpu/redis \
(bash ci/gpu/stage_redis.sh here, then carry .gpu/redis or a tarball of it) before any stage"; exit 2; }
nvidia-smi -L
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
for stage in $STAGES; do
  echo "== $stage"
  case $stage in
    tests) python3 -m pytest -q -p no:cacheprovider tests/gpu tests/test_plugin.py \
             > "$OUT/gpu_tests.log" 2>&1; tail -3 "$OUT/gpu_tests.log" ;;
    copy) python3 -m tokenvm_vllm.bench.copy_bench --out "$OUT/copy_bench.json" \
             > "$WORK/copy_bench.log" 2>&1; tail -9 "$WORK/copy_bench.log" ;;
    exact|exact_v1|exact_v2)  # EXACT_ARGS: e.g. --configs tokenvm,native
      runner=${stage#exact}; runner=${runner#_}
      VLLM_BATCH_INVARIANT=1 python3 ci/gpu/token_exact.py --out "$WORK/$stage" \
        --runner "${runner:-default}" ${EXACT_ARGS:-} 2>&1 | tee "$OUT/$stage.log" | tail -14
      cp "$WORK/$stage/token_exact.json" "$OUT/token_$stage.json" 2>/dev/null ;;
    rows)  # issue #14: the Supported table's GPU rows, side by side on one GPU: one process per
      # row (each engine takes 0.04 of the GPU and skips vLLM's memory profiling, which another
      # engine freeing memory would fail; the checks run one request at a time, so they barely
      # share compute). ROWS: "runner:script:configs" items. Logs and JSON: $OUT/rows.tgz.
      mkdir -p "$WORK/rows"; pids=()
      default_rows="v2:exact:tokenvm_fp8 v2:exact:tokenvm_fp8_e5m2 v2:exact:tokenvm_fp8_pth
        v2:exact:tokenvm_mla,tokenvm_mla_corrupt v2:exact:tokenvm_bs32 v2:exact:tokenvm_bs64
        v2:exact:tokenvm_bs128 v2:hybrid:tokenvm,tokenvm_corrupt v1:exact:tokenvm_fp8
        v1:exact:tokenvm_fp8_e5m2 v1:exact:tokenvm_fp8_pth v1:exact:tokenvm_mla
        v1:exact:tokenvm_bs32 v1:exact:tokenvm_bs64 v1:exact:tokenvm_bs128 v1:hybrid:tokenvm"
      for row in ${ROWS:-$default_rows}; do
        IFS=: read -r r script configs <<< "$row"
        name="${r}_${script}_${configs%%,*}"
        common=(--configs "$configs" --gpu-memory-utilization 0.04 --kv-cache-memory-bytes $((2**30)))
        if [ "$script" = hybrid ]; then
          VLLM_USE_V2_MODEL_RUNNER=$([ "$r" = v1 ] && echo 0 || echo 1) \
            python3 ci/gpu/hybrid_exact.py --out "$WORK/rows/$name" "${common[@]}" \
            > "$WORK/rows/$name.log" 2>&1 &
        else
          VLLM_BATCH_INVARIANT=1 python3 ci/gpu/token_exact.py --out "$WORK/rows/$name" \
            --runner "$r" "${common[@]}" > "$WORK/rows/$name.log" 2>&1 &
        fi
        pids+=($!)
      done
      for p in "${pids[@]}"; do wait "$p"; done
      for d in "$WORK"/rows/*/; do
        for f in token_exact.json hybrid_exact.json; do
          [ -f "$d/$f" ] && cp "$d/$f" "$WORK/rows/$(basename "$d").json"
        done
      done
      # per row: its verdict and each configuration's line (cut: the output tail is limited)
      tar czf "$OUT/rows.tgz" -C "$WORK/rows" $(cd "$WORK/rows" && ls ./*.log ./*.json 2>/dev/null)
      grep -H "TOKEN-EXACT\|^  tokenvm\|^tokenvm" "$WORK"/rows/*.log | sed "s|$WORK/rows/||" \
        | cut -c1-160 ;;
    disk) python3 -m tokenvm_vllm.bench.disk_bench --path /tmp/tokenvm-disk-bench --gib 4 \
             --out "$OUT/disk_bench.json" 2>&1 | tee "$WORK/disk_bench.log" | tail -6 ;;
    serve)  # the headline: vllm serve + vllm bench serve; SERVE_ARGS picks configs/workloads
      python3 -c "from tokenvm_vllm.tiny_llama import *; write_tiny_llama('$WORK/llama8b', LLAMA_3_1_8B, weights=False)"
      # SERVE_TIMEOUT (s) ends it inside the device call's limit so the results still come back
      timeout --signal=INT "${SERVE_TIMEOUT:-540}" \
        python3 -m tokenvm_vllm.bench.serve_bench run --model "$WORK/llama8b" --dummy \
        --out "$WORK/serve" ${SERVE_ARGS:-} 2>&1 | tee "$OUT/serve${SERVE_TAG:-}.log"
      tar czf "$OUT/serve${SERVE_TAG:-}.tgz" -C "$WORK/serve" . ;;
    remote)  # issue #15: server B served from Redis what server A computed, against recompute;
      # then the remote tier's throughput next to redis-benchmark. Redis comes from .gpu/redis
      # (ci/gpu/stage_redis.sh; carry it). REMOTE_ARGS: more serve_bench arguments; REMOTE_BENCH=0
      # skips the throughput part.
      export PATH="$PWD/.gpu/redis/bin:$PATH"
      redis-server --bind 127.0.0.1 --port 6390 --save "" --appendonly no --daemonize yes \
        --maxmemory "${REDIS_MAXMEMORY:-48gb}" --maxmemory-policy allkeys-lru \
        --logfile "$WORK/redis.log" && sleep 1
      url=redis://127.0.0.1:6390/0
      remote="remote_url=$url,remote_max_pending_writes=${REMOTE_PENDING:-4096}"
      python3 -c "from tokenvm_vllm.tiny_llama import *; write_tiny_llama('$WORK/llama8b', LLAMA_3_1_8B, weights=False)"
      timeout --signal=INT "${REMOTE_TIMEOUT:-300}" \
        python3 -m tokenvm_vllm.bench.serve_bench run --model "$WORK/llama8b" --dummy \
        --out "$WORK/remote" --workloads p8 --prefixes 16 --num-prompts 16 \
        --configs "none,tokenvm@a:$remote,tokenvm@b:$remote" ${REMOTE_ARGS:-} 2>&1 \
        | tee "$OUT/remote.log"
      tar czf "$OUT/remote.tgz" -C "$WORK/remote" .
      redis-cli -p 6390 flushall > /dev/null
      # how much background writes slow the engine thread beside them, 1/2/4 write threads
      timeout 60 python3 -m tokenvm_vllm.bench.remote_gil "$url" --json "$OUT/remote_gil.json" \
        2>&1 | tee "$WORK/remote_gil.log"
      if [ "${REMOTE_BENCH:-1}" = 1 ]; then  # REMOTE_BENCH=0: the A/B only
        timeout 240 python3 -m tokenvm_vllm.cli remote-bench "$url" --json "$OUT/remote_bench.json" \
          2>&1 | tee "$WORK/remote_bench.log" | tail -14
      fi
      redis-cli -p 6390 shutdown nosave ;;
    vmm)  # issue #13: CUDA VMM map/unmap cost per page and page group, how much is hidden
      python3 -m tokenvm_vllm.bench.vmm_bench --out "$OUT/vmm_bench.json" 2>&1 \
        | tee "$WORK/vmm_bench.log" | tail -20 ;;
    hostpool)  # issue #13: a 20 GiB host pool, lazily pinned (paced, unpaced) vs eagerly, with a
      # GPU step loop running meanwhile (~2 min). HOSTPOOL_ARGS: e.g. "--variants=,
      # --cuda-host-alloc" (the eager pool against one cudaHostAlloc, without the lazy variants)
      python3 -m tokenvm_vllm.bench.host_pool_bench --gib 20 ${HOSTPOOL_ARGS:-} \
        --out "$OUT/host_pool.json" 2>&1 | tee "$OUT/host_pool.log" | tail -8 ;;
    hybrid)  # issue #14: full + sliding-window groups (SupportsHMA), token-exact
      python3 ci/gpu/hybrid_exact.py --out "$WORK/hybrid" 2>&1 | tee "$OUT/hybrid.log" | tail -12 ;;
    elastic)  # issue #13: elastic GPU KV on V2 and V1, token-exact across a shrink/grow cycle
      # ELASTIC_ARGS: e.g. --configs elastic,elastic_graphs --runners v2
      python3 ci/gpu/elastic_exact.py --out "$WORK/elastic" ${ELASTIC_ARGS:-} 2>&1 \
        | tee "$OUT/elastic.log" | tail -40
      cp "$WORK/elastic/elastic_exact.json" "$OUT/elastic_exact.json" 2>/dev/null ;;
    wave)  # issue #13: load that rises, idles and rises again (bench/wave.py): elastic GPU KV
      # against a fixed pool of the ceiling's size (--kv-gib). WAVE_EAGER=1 runs both eager, as
      # every run before 2026-12-01 W12 did; the default is CUDA graphs, what users run: eager
      # steps are bound by Python's kernel launches (13-34 ms per decode step of ~15 requests,
      # against ~7 ms of GPU work), so the same pool's TPOT swung 16-24 ms between runs.
      # WAVE_RATE (default 9 requests/s) is about 70% of what this 8B model sustains eager on
      # one H200 (~12.3/s at 4.2k-token prompts): at 15/s (before 2026-11-30) the queue grew
      # through each burst and TTFT p50 swung 0.45-1.7x between runs of the same pool.
      # WAVE_ARGS: more serve_bench arguments (~5 min eager, ~6 min with graphs).
      python3 -c "from tokenvm_vllm.tiny_llama import *; write_tiny_llama('$WORK/llama8b', LLAMA_3_1_8B, weights=False)"
      timeout --signal=INT "${WAVE_TIMEOUT:-540}" \
        python3 -m tokenvm_vllm.bench.serve_bench run --model "$WORK/llama8b" --dummy \
        --out "$WORK/wave" --workloads wave $([ "${WAVE_EAGER:-0}" = 1 ] && echo --server-arg=--enforce-eager) --wave-rate ${WAVE_RATE:-9} \
        --num-prompts 128 --wave-idle-s 40 \
        --configs "tokenvm_v2@fixed,tokenvm_v2@elastic:elastic=true,shrink_idle_s=20" \
        ${WAVE_ARGS:-} 2>&1 | tee "$OUT/wave.log"
      tar czf "$OUT/wave.tgz" -C "$WORK/wave" . ;;
    long)  # issue #13: conversations over 32k-token documents; elastic against a fixed pool of
      # the same size (--kv-gib), both eager; KV held on average next to throughput (~4 min)
      python3 -c "from tokenvm_vllm.tiny_llama import *; write_tiny_llama('$WORK/llama8b', LLAMA_3_1_8B, weights=False)"
      timeout --signal=INT "${LONG_TIMEOUT:-540}" \
        python3 -m tokenvm_vllm.bench.serve_bench run --model "$WORK/llama8b" --dummy \
        --out "$WORK/long" --workloads long --server-arg=--enforce-eager --kv-gib 30 \
        --max-model-len 36000 --long-len 32768 --long-docs 8 --long-prompts 64 --long-rate 1 \
        --configs "tokenvm_v2@fixed,tokenvm_v2@elastic:elastic=true,shrink_idle_s=10" \
        ${LONG_ARGS:-} 2>&1 | tee "$OUT/long.log"
      tar czf "$OUT/long.tgz" -C "$WORK/long" . ;;
    twoservers)  # issue #13: two elastic servers on one GPU, alternating bursts, token-exact
      # against a fixed-cache reference (ci/gpu/two_servers.py; ~5 min). TWO_ARGS: its arguments.
      timeout --signal=INT "${TWO_TIMEOUT:-560}" python3 ci/gpu/two_servers.py \
        --out "$WORK/two" ${TWO_ARGS:-} 2>&1 | tee "$OUT/two_servers.log" | tail -8
      cp "$WORK/two/two_servers.json" "$WORK/two/two_servers.png" "$OUT/" 2>/dev/null ;;
    revisit)
      python3 -c "from tokenvm_vllm.tiny_llama import *; write_tiny_llama('$WORK/llama8b', LLAMA_3_1_8B, weights=False)"
      python3 -m tokenvm_vllm.bench.revisit_bench --all --model "$WORK/llama8b" --out "$WORK/revisit" \
        ${REVISIT_ARGS:-} 2>&1 | tee "$WORK/revisit.log" | tail -8
      cp "$WORK/revisit/revisit_results.json" "$OUT/revisit_results${REVISIT_TAG:-}.json" ;;
  esac
done
tar czf "$OUT/logs.tgz" -C "$WORK" --exclude='*.safetensors' --exclude='*.json.gz' \
  $(cd "$WORK" && find . -name '*.log' -o -name '*.json' | grep -v tokenizer | grep -v config.json)
