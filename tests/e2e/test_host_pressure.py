"""Host memory given back under memory pressure (``host_min_available_bytes``, issue #13 item
4) in the real vLLM engine on CPU: the host tier shrinks while the workload runs, grows back
once memory is available again, and greedy outputs equal those without TokenVM, token for token.

The available memory the scheduler sees comes from a file (``debug_host_available_file``, a
testing knob): it starts at 0 (pressure: the tier shrinks to its floor once it holds blocks);
when the log shows the shrink, the test writes 1 TiB (the tier grows back at the next check,
``host_regrow_after_s=0``). The worker process really releases its pool's top range.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import replace

import pytest

from tests.e2e.test_llm_exact import WORKLOAD, differing
from tokenvm_vllm.bench.prefix_reuse import run_in_subprocess

pytestmark = pytest.mark.e2e


def test_shrink_and_regrow_under_pressure_stay_token_exact(tmp_path, engine_settings):
    base = engine_settings(num_gpu_blocks=72)
    available = tmp_path / "available"
    available.write_text("0")
    settings = replace(base, connector="tokenvm", host_bytes="64MiB", extra_config={
        "host_min_available_bytes": "1GiB", "host_regrow_after_s": 0,
        "debug_host_available_file": str(available), "testing": True})
    log = tmp_path / "pressure.log"
    done = threading.Event()
    relieved: list[float] = []

    def relieve_after_shrink() -> None:
        while not done.wait(0.2):
            if log.exists() and "shrunk under memory pressure" in log.read_text():
                available.write_text("1TiB")
                relieved.append(time.monotonic())
                return

    watcher = threading.Thread(target=relieve_after_shrink, daemon=True)
    watcher.start()
    try:
        pressured = run_in_subprocess(settings, WORKLOAD, tmp_path / "pressure.json", log=log)
    finally:
        done.set()
        watcher.join()
    baseline = run_in_subprocess(base, WORKLOAD, tmp_path / "baseline.json")
    assert differing(pressured["outputs"], baseline["outputs"]) == 0
    text = log.read_text()
    shrunk = re.search(r"host tier shrunk under memory pressure: available 0 bytes < "
                       r"host_min_available_bytes=1073741824; slots (\d+) -> (\d+) of (\d+)", text)
    assert shrunk, text[-3000:]
    before, after, total = map(int, shrunk.groups())
    assert after == total // 8 and before == total  # to the floor, an eighth of the tier
    assert f"TokenVM worker: host pool slots {after}.. given back" in text
    assert relieved and f"slots {after} -> {total} of {total}" in text  # grown back
    assert pressured["counters"]["tokenvm:loaded_blocks"] > 50  # the tier kept serving loads
