# Sourced by a device call's script (one `run` on the GPU machine), after the bundle's p0 and p1
# were copied to /tmp/parts by earlier calls (three since the bundle is cut in 40 MiB pieces to
# fit a call's 64 MiB beside the working tree: ci/gpu/split_bundle.sh says how):
#
#   source ci/gpu/calls.sh                 # unpacks p2 and .gpu/redis.txz, installs TokenVM
#   stage wave1 0 wave WAVE_ARGS="..." &   # ci/gpu/run.sh on GPU 0, files under $OUT/wave1
#   stage serve1 1 serve SERVE_ARGS="..." &
#   finish 520                             # wait (at most 520 s after the start), tar each stage
#
# A call that lands on a fresh machine (no /tmp/parts) exits 3 at once, printing FRESH MACHINE.
# ``finish`` waits on this shell's own jobs (never ``pgrep``, which matches its own command
# line) and tars every stage directory, finished or cut off, into $OUT/NAME.tgz: the device tool
# brings back at most 8 files from $OUT.
set -u
if [ ! -f /tmp/site/.done ]; then
  if [ -f /tmp/parts/p0 ] && [ -f /tmp/parts/p1 ] && [ -f .gpu/p2 ]; then
    cp .gpu/p2 /tmp/parts/ && mkdir -p /tmp/site \
      && cat /tmp/parts/p* | xz -dc -T0 | tar -xf - -C /tmp/site && touch /tmp/site/.done
  else echo "FRESH MACHINE: no bundle parts (p0/p1 missing)"; exit 3; fi
fi
[ -d .gpu/redis ] || tar xJf .gpu/redis.txz -C .gpu/
export PYTHONPATH="/tmp/site:$PWD:$PWD/.gpu/redis/py" PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /tmp/install0.log 2>&1
python3 -c "import redis" || { echo "no redis module: carry .gpu/redis.txz"; exit 2; }
TOP=$OUT

# stage NAME GPU STAGES [VAR=VALUE...]: ci/gpu/run.sh STAGES on GPU, its files under $TOP/NAME
# (synchronous: put & after it to run stages on several GPUs at once). STAGE_TIMEOUT=S among
# the VARs ends the stage (and its servers and engines: timeout signals its process group)
# after S seconds, for a stage that has no timeout of its own, so the next one still runs.
stage() {
  local name=$1 gpu=$2 stages=$3; shift 3
  mkdir -p "$TOP/$name"
  ( export CUDA_VISIBLE_DEVICES=$gpu OUT="$TOP/$name" WORK="/tmp/w_$name" "$@"
    timeout --kill-after=15 "${STAGE_TIMEOUT:-0}" bash ci/gpu/run.sh "$stages" \
      > "$TOP/$name/run.log" 2>&1 )
}

# finish DEADLINE_S: wait for this shell's background jobs until DEADLINE_S after the script's
# start, then tar each stage directory into $TOP/NAME.tgz
finish() {
  while [ "$SECONDS" -lt "$1" ] && [ -n "$(jobs -rp)" ]; do sleep 2; done
  echo "finish at ${SECONDS}s, still running: $(jobs -rp | wc -l)"
  for d in "$TOP"/*/; do
    local n; n=$(basename "$d")
    tar czf "$TOP/$n.tgz" -C "$TOP" "$n" && rm -rf "$d"
  done
}
