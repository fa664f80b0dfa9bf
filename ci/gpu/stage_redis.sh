#!/usr/bin/env bash
# Stage Redis for the GPU machine (which has no redis-server and no network): this machine's
# redis-server, redis-cli and redis-benchmark with the shared libraries they need beyond glibc,
# and the pure-Python `redis` client, into .gpu/redis (ignored by git; about 10 MiB). Carry it
# with the device call; ci/gpu/run.sh's `remote` stage puts it on PATH, LD_LIBRARY_PATH and
# PYTHONPATH.
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
find "$dest/py" -name __pycache__ -prune -exec rm -rf {} +
du -sh "$dest"
