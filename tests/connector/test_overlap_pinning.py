"""``pin_mode: overlap`` in TokenVM's real worker side inside vLLM's real Scheduler (CPU). This
machine has no CUDA, so the worker's ``HostPool`` is built pinned with the recording fake of
``tests/transfer/test_host_pool.py`` (slowed down) in place of the CUDA calls: registration
starts on a thread when the KV cache is registered, the capture guard is installed, the first
step waits for the rest and removes the guard, and a revisit is then served from the pool with
every loaded KV position checked by the harness's forward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.connector.test_scheduler_level import evict_everything, prompts
from tests.harness import Harness
from tests.transfer.test_host_pool import Recorder
from tokenvm_vllm import compat
from tokenvm_vllm.connector import worker as worker_module
from tokenvm_vllm.transfer.host_pool import HostPool


def pin_pools_with(rec: Recorder, monkeypatch: pytest.MonkeyPatch) -> list[HostPool]:
    """Make the worker build its ``HostPool`` pinned, with ``rec`` in place of the CUDA calls
    (4 KiB chunks); returns the list the pools built are appended to."""
    pools: list[HostPool] = []

    def pinned_pool(*args: Any, **kwargs: Any) -> HostPool:
        kwargs.update(pin=True, register=rec.register, unregister=rec.unregister,
                      chunk_bytes=4096)
        pools.append(HostPool(*args, **kwargs))
        return pools[-1]

    monkeypatch.setattr(worker_module, "HostPool", pinned_pool)
    return pools


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "no-capture-model"])
def test_overlap_registers_during_warm_up_and_the_first_step_waits(
        make_harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch,
        guarded: bool) -> None:
    rec = Recorder(delay=0.2)  # the harness is built before the thread can finish
    pools = pin_pools_with(rec, monkeypatch)
    guards: list[str] = []

    def install(pause: Any, resume: Any) -> bool:
        guards.append("install")
        return guarded

    def remove(pause: Any) -> None:
        guards.append("remove")

    engines_built_at: list[int] = []  # chunks registered when each copy engine was built
    make_copy_engine = worker_module.make_copy_engine

    def recording_engine(layout: Any, caches: Any, pool: HostPool, config: Any) -> Any:
        assert pool.pinner is not None
        engines_built_at.append(pool.pinner.registered_chunks)
        return make_copy_engine(layout, caches, pool, config)

    monkeypatch.setattr(worker_module, "make_copy_engine", recording_engine)
    monkeypatch.setattr(compat, "install_graph_capture_guard", install)
    monkeypatch.setattr(compat, "remove_graph_capture_guard", remove)
    h = make_harness(num_gpu_blocks=24, extra_config={"pin_mode": "overlap",
                                                      "host_bytes": 64 * 256})
    (pool,) = pools
    pinner = pool.pinner
    # Its log line says how it will be pinned (not "pinned lazily": it is not paced)
    assert pool.mode.startswith("pageable, registered during vLLM's warm-up (pin_mode overlap)")
    assert pinner is not None and guards == ["install"]
    # The copy engines are built before registration starts (its driver calls held theirs).
    assert engines_built_at == [0]
    if guarded:  # registering on its thread, not before register_kv_caches returned
        assert pinner._thread is not None and pinner.registered_chunks < pinner.num_chunks
    else:  # no capture to hold it around: registered at once, as 'eager'
        assert pinner._thread is None and pinner.registered_chunks == pinner.num_chunks
    (p,) = prompts(1, prefix_blocks=8, suffix=5, seed=1)
    h.add(p)
    h.run()
    assert pinner.registered_chunks == pinner.num_chunks
    assert guards == (["install", "remove"] if guarded else ["install"])
    assert pinner.on_demand_chunks == (0 if guarded else pinner.num_chunks)
    evict_everything(h, seed=2)
    rid = h.add(p)
    h.run()
    assert len(h.outputs[rid]) == 4
    assert h.stats.get("host_hit_blocks", 0) > 0  # served from the pinned pool, KV checked


@pytest.mark.parametrize("fits", [True, False], ids=["adopted", "too-small"])
def test_the_pool_adopts_the_registration_started_at_the_model_load(
        make_harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch,
        fits: bool) -> None:
    """``connector/early_pool.py`` started registering before vLLM built the connector (here:
    before the harness); the worker's pool takes that memory and its running thread instead
    of mapping its own, and serves a revisit from it. An early registration smaller than the
    pool is released and the pool registers its own, as before."""
    from tokenvm_vllm.transfer import host_pool

    rec = Recorder(delay=0.2)
    pools = pin_pools_with(rec, monkeypatch)
    monkeypatch.setattr(compat, "install_graph_capture_guard", lambda pause, resume: True)
    monkeypatch.setattr(compat, "remove_graph_capture_guard", lambda pause: None)
    host_bytes = 64 * 256
    early = host_pool.start_early_registration(
        host_bytes if fits else host_bytes // 2, None, chunk_bytes=4096,
        register=rec.register, unregister=rec.unregister)
    h = make_harness(num_gpu_blocks=24, extra_config={"pin_mode": "overlap",
                                                      "host_bytes": host_bytes})
    (pool,) = pools
    pinner = pool.pinner
    assert pinner is not None and host_pool.early_registration_bytes() == 0
    if fits:
        assert pinner is early.pinner and pool.mode.startswith(
            "registered on a thread since the model loaded")
        assert pool.buffer.data_ptr() == early.pinner.address
    else:  # released (every chunk it had registered unregistered), a pool of its own
        assert pinner is not early.pinner and early.pinner._closed
        assert all(address < early.pinner.address or address >= early.pinner.address
                   + early.nbytes for address in rec.registered)
    (p,) = prompts(1, prefix_blocks=8, suffix=5, seed=1)
    h.add(p)
    h.run()
    assert pinner.registered_chunks == pinner.num_chunks  # the first step waited for the rest
    assert pinner.on_demand_chunks == 0
    evict_everything(h, seed=2)
    rid = h.add(p)
    h.run()
    assert len(h.outputs[rid]) == 4
    assert h.stats.get("host_hit_blocks", 0) > 0  # served from the adopted pool, KV checked
