"""``host_bytes: "auto"`` (issue #13 item 4): parsing, the one resolution (in the scheduler) and its
errors, and the workers adopting the scheduler's count from the connector metadata.

The scheduler-level tests replace the memory reading (``mem_available``) with a fixed number: the
real one would give the harness's 256-byte blocks tens of millions of slots and make the counts
depend on what else this machine runs. Everything else is real (vLLM's scheduler, the
worker side, the CPU copy engine).
"""

from __future__ import annotations

import pytest

from tests.connector.test_scheduler_level import evict_everything, prompts
from tokenvm_vllm.config import (
    HOST_BYTES_AUTO_FRACTION,
    TokenVMConfigError,
    check_host_memory,
    load_config_and_sources,
    settings_line,
)
from tokenvm_vllm.connector.metadata import TokenVMConnectorMetadata
from tokenvm_vllm.transfer import host_pool
from tokenvm_vllm.transfer.host_pool import (
    AUTO_RESERVE_BYTES,
    auto_slot_bound,
    host_slots_for,
    mem_available,
)


@pytest.mark.parametrize("text", ["auto", "AUTO", " auto "])
def test_auto_is_accepted_from_extra_config_and_env(text):
    config, sources = load_config_and_sources({"host_bytes": text}, environ={})
    assert config.host_bytes == "auto"
    assert "host_bytes='auto' (extra config)" in settings_line(config, sources)
    config, _ = load_config_and_sources({}, environ={"TOKENVM_HOST_BYTES": text})
    assert config.host_bytes == "auto"


@pytest.mark.parametrize("value", ["autox", "auto:0.5", "half"])
def test_bad_host_bytes_names_the_three_forms(value):
    with pytest.raises(TokenVMConfigError) as err:
        load_config_and_sources({"host_bytes": value}, environ={})
    message = str(err.value)
    assert f"host_bytes={value!r}" in message and "'auto'" in message and "\n" not in message


def test_auto_needs_no_upfront_memory_check():
    check_host_memory("auto", workers=1000)  # sized from what is available: nothing to refuse
    with pytest.raises(TokenVMConfigError, match="MemAvailable"):
        check_host_memory(2**59)


def test_auto_is_a_fraction_of_available_shared_by_workers_in_whole_slots():
    available = 10 * 2**30 + 12345
    slots, how = host_slots_for("auto", 3 * 2**20, workers=2, available=available)
    share = int(available * HOST_BYTES_AUTO_FRACTION) // 2
    assert slots == share // (3 * 2**20) and slots * 3 * 2**20 <= share
    assert (slots + 1) * 3 * 2**20 > share  # rounded down, not further
    for number in (str(available), str(share), str(slots), "2 worker(s)", "0.5 x given"):
        assert number in how, how
    # one worker gets twice as much (within a slot)
    assert host_slots_for("auto", 3 * 2**20, workers=1, available=available)[0] // 2 in (
        slots, slots - 1, slots + 1)


def test_auto_with_too_little_memory_for_one_slot_is_one_clear_line():
    with pytest.raises(TokenVMConfigError) as err:
        host_slots_for("auto", 2**30, workers=4, available=3 * 2**30)
    message = str(err.value)
    assert message.startswith("tokenvm: host_bytes='auto'") and "\n" not in message
    assert f"{3 * 2**30}" in message and "less than one block" in message
    assert "set host_bytes to a size" in message


def test_fixed_size_slots_and_error():
    assert host_slots_for(10 * 4096 + 5, 4096, workers=8)[0] == 10
    with pytest.raises(TokenVMConfigError, match="host_bytes=100 is smaller than one block"):
        host_slots_for(100, 4096, workers=1)


def test_the_workers_bound_covers_any_measurement():
    slot = 64 * 2**20
    available, _ = mem_available()
    assert auto_slot_bound(slot) >= host_slots_for("auto", slot, 2, available=available)[0]
    # even a machine whose RAM grew after the workers reserved (a VM's balloon): capped
    slots, how = host_slots_for("auto", slot, 1, available=2**50)
    assert slots == auto_slot_bound(slot) == AUTO_RESERVE_BYTES // slot and "capped" in how


@pytest.fixture
def fixed_memory(monkeypatch):
    """MemAvailable for 200 slots of the harness (one worker, halved)."""
    def install(slot_bytes: int) -> None:
        available = int(200 * slot_bytes / HOST_BYTES_AUTO_FRACTION)
        monkeypatch.setattr(host_pool, "mem_available", lambda: (available, "MemAvailable"))
    return install


def slot_bytes_of_harness(make_harness) -> int:
    return make_harness().worker.worker.slot_bytes


def test_workers_adopt_the_schedulers_count_and_kv_stays_exact(make_harness, fixed_memory,
                                                              tokenvm_log):
    fixed_memory(slot_bytes_of_harness(make_harness))
    h = make_harness(num_gpu_blocks=24, extra_config={"host_bytes": "auto"})
    worker = h.worker.worker
    assert h.connector.scheduler.tiers.host.num_slots == 200
    bound = auto_slot_bound(worker.slot_bytes)
    assert worker._pool.num_slots == bound  # reserved for the largest count 'auto' can give
    assert worker._host_slots is None  # not known before the scheduler speaks
    log = tokenvm_log()
    first, again = prompts(2, prefix_blocks=8, suffix=5, seed=11)
    h.add(first)
    h.run()
    assert worker._host_slots == 200
    evict_everything(h, seed=12)
    h.add(again)
    h.run()  # the harness's fake model checks every KV position it reads
    assert h.stats["loaded_blocks"] == 8
    assert any("the scheduler chose 200 host slots" in line for line in log), log


def test_a_worker_refuses_a_count_it_cannot_hold(make_harness, fixed_memory):
    fixed_memory(slot_bytes_of_harness(make_harness))
    h = make_harness(extra_config={"host_bytes": "auto"})
    worker = h.worker.worker
    bound = worker._pool.num_slots
    with pytest.raises(RuntimeError, match=f"scheduler uses {bound + 1} host slots but this "
                                           f"worker's pool has {bound}"):
        worker.start_load_kv(TokenVMConnectorMetadata(host_slots=bound + 1))
    worker.start_load_kv(TokenVMConnectorMetadata(host_slots=200))
    with pytest.raises(RuntimeError, match="scheduler uses 39 host slots"):
        worker.start_load_kv(TokenVMConnectorMetadata(host_slots=39))


def test_a_fixed_size_worker_checks_the_schedulers_count(make_harness):
    h = make_harness(extra_config={"host_bytes": 8 * 256})
    worker = h.worker.worker
    assert worker._host_slots == h.connector.scheduler.tiers.host.num_slots
    with pytest.raises(RuntimeError, match="must see the same host_bytes"):
        worker.start_store(TokenVMConnectorMetadata(host_slots=worker._host_slots + 1))
