#!/usr/bin/env bash
# Stage Redis for the GPU machine (which has no redis-server and no network): this machine's
# redis-server, redis-cli and redis-benchmark with the shared libraries they need beyond glibc,
# and the `redis` client with hiredis (both TokenVM dependencies the vLLM bundle lacks: without
# `redis` TokenVM does not import), into .gpu/redis (ignored by git; about 10 MiB). Carry it
# with the device call (next to .gpu/p2: they fit in one call's 64 MiB); ci/gpu/run.sh puts the
# client on PYTHONPATH, and its `remote` stage the tools on PATH (each with its own libraries).
set -euo pipefail
dest=.gpu/redis
rm -rf "$dest" && mkdir -p "$dest/bin" "$dest/real" "$dest/lib" "$dest/py"
for tool in redis-server redis-cli redis-benchmark; do
  cp -L "$(command -v $tool)" "$dest/real/$tool"
  # The libraries only for Redis (they include a libstdc++ that must not reach vLLM's Python);
  # exec -a: redis-server is a link to redis-check-rdb, and the name it runs under picks the mode.
  printf '#!/bin/bash\nhere=$(dirname "$(readlink -f "$0")")/..\nLD_LIBRARY_PATH="$here/lib" exec -a %s "$here/real/%s" "$@"\n' \
    "$tool" "$tool" > "$dest/bin/$tool"
  chmod +x "$dest/bin/$tool"
  ldd "$(command -v $tool)" | awk '/=> \//{print $3}' | while read -r lib; do
    case $(basename "$lib") in libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*) ;;
      *) cp -Ln "$lib" "$dest/lib/" ;;
    esac
  done
done
py=${PYTHON:-.venv/bin/python}
cp -r "$("$py" -c 'import os, redis; print(os.path.dirname(redis.__file__))')" "$dest/py/"
# hiredis (a TokenVM dependency): redis-py's C reply parser; without it large GETs crawl at a
# fraction of what the server gives (seen on the H200: 0.35 GB/s against redis-benchmark's 2.2).
# The GPU machine runs CPython 3.12.
"$py" -m pip download -q hiredis --only-binary :all: --python-version 3.12 \
  --platform manylinux_2_17_x86_64 --no-deps -d "$dest/wheels"
"$py" -m zipfile -e "$dest"/wheels/hiredis-*.whl "$dest/py/" && rm -rf "$dest/wheels"
find "$dest/py" -name __pycache__ -prune -exec rm -rf {} +
du -sh "$dest"
