"""``pin_mode: overlap`` from the model load on (``connector/early_pool.py``): which settings
start registering the host pool right after the worker loaded the model, and the worker hook
that calls it (``compat.install_worker_loaded_hook``, through vLLM's real
``WorkerWrapperBase``). That the worker's pool then adopts the registration is tested in
``test_overlap_pinning.py`` (CPU) and ``tests/gpu/test_lazy_pool.py`` (the real CUDA calls)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from tokenvm_vllm import CONNECTOR_NAME, compat
from tokenvm_vllm.connector.early_pool import early_pool_config

GIB = 2**30


def vllm_config(extra: dict[str, Any] | None = None, connector: str = CONNECTOR_NAME,
                tp: int = 1, mla: bool = False) -> Any:
    """What ``early_pool_config`` reads of a ``VllmConfig``."""
    transfer = SimpleNamespace(kv_connector=connector, kv_connector_extra_config=extra or {})
    return SimpleNamespace(kv_transfer_config=transfer,
                           parallel_config=SimpleNamespace(tensor_parallel_size=tp),
                           model_config=SimpleNamespace(use_mla=mla))


@pytest.fixture(autouse=True)
def no_tokenvm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [n for n in os.environ if n.startswith("TOKENVM_")]:
        monkeypatch.delenv(name)


def early_pool_bytes(config: Any) -> int:
    """The bytes it would register early (0: none)."""
    settings = early_pool_config(config)
    return 0 if settings is None else settings.host_bytes


def test_the_default_settings_start_it_for_the_whole_pool() -> None:
    assert early_pool_bytes(vllm_config({"host_bytes": "1GiB"})) == GIB
    assert early_pool_bytes(vllm_config({"host_bytes": GIB, "pin_mode": "overlap"})) == GIB
    # MLA at TP=1, or without store-once, keeps a private pool per rank
    assert early_pool_bytes(vllm_config({"host_bytes": GIB}, mla=True)) == GIB
    assert early_pool_bytes(vllm_config({"host_bytes": GIB, "mla_store_once": False},
                                        tp=2, mla=True)) == GIB
    # the settings it starts with are the connector's: huge pages or not
    settings = early_pool_config(vllm_config({"host_bytes": GIB, "huge_pages": False}))
    assert settings is not None and settings.huge_pages is False


@pytest.mark.parametrize("extra,kwargs", [
    ({"host_bytes": GIB, "pin_mode": "eager"}, {}),
    ({"host_bytes": GIB, "pin_mode": "lazy"}, {}),
    ({"host_bytes": "auto"}, {}),
    ({"host_bytes": GIB, "pin_memory": False}, {}),
    ({"host_bytes": GIB, "remote_url": "redis://127.0.0.1:1/0", "remote_process": True}, {}),
    ({"host_bytes": GIB}, {"tp": 2, "mla": True}),  # one /dev/shm pool for the node's ranks
    ({"host_bytes": GIB}, {"connector": "OffloadingConnector"}),
    ({"host_bytes": GIB, "no_such_key": 1}, {}),  # the connector refuses it later, in words
    ({"host_bytes": 2**60}, {}),  # more than the machine has: the connector refuses it later
], ids=["eager", "lazy", "auto", "unpinned", "remote-process", "mla-tp2", "other-connector",
        "bad-key", "too-big"])
def test_other_settings_start_nothing(extra: dict[str, Any], kwargs: dict[str, Any]) -> None:
    assert early_pool_config(vllm_config(extra, **kwargs)) is None


def test_no_kv_transfer_config_starts_nothing() -> None:
    assert early_pool_bytes(SimpleNamespace(kv_transfer_config=None)) == 0


def test_the_hook_runs_after_the_workers_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.config import VllmConfig
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    monkeypatch.setattr(WorkerWrapperBase, "init_device", WorkerWrapperBase.init_device)
    monkeypatch.setattr(compat, "_LOADED_HOOKS", [])
    order: list[str] = []

    class Worker:
        def init_device(self) -> None:
            order.append("device")

        def load_model(self, *, load_dummy_weights: bool = False) -> str:
            order.append(f"load dummy={load_dummy_weights}")
            return "loaded"

    def hook(config: Any) -> None:
        order.append("hook")
        assert config is wrapper.vllm_config

    def failing(config: Any) -> None:
        raise RuntimeError("a broken hook")

    assert compat.install_worker_loaded_hook(failing)
    assert compat.install_worker_loaded_hook(hook)
    assert compat.install_worker_loaded_hook(hook)  # a second plugin load: wrapped once
    wrapper = WorkerWrapperBase(rpc_rank=0)
    wrapper.vllm_config = VllmConfig()
    wrapper.worker = Worker()  # type: ignore[assignment]
    wrapper.init_device()
    assert order == ["device"]  # not yet: the model loads next
    # The executor calls load_model through the wrapper (its __getattr__); the failing hook is
    # logged and never stops the worker, and the load's result and arguments pass through.
    assert wrapper.load_model(load_dummy_weights=True) == "loaded"
    assert order == ["device", "load dummy=True", "hook"]


def test_no_hook_without_init_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    monkeypatch.delattr(WorkerWrapperBase, "init_device")
    monkeypatch.setattr(compat, "_LOADED_HOOKS", [])
    assert not compat.install_worker_loaded_hook(lambda config: None)
    assert compat._LOADED_HOOKS == []


def test_on_cpu_the_hook_starts_nothing() -> None:
    from tokenvm_vllm.connector.early_pool import start_host_pool_early
    from tokenvm_vllm.transfer.host_pool import early_registration_bytes

    start_host_pool_early(vllm_config({"host_bytes": GIB}))
    assert early_registration_bytes() == 0  # no CUDA here: nothing to register with


def test_it_starts_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second model load (a weight reload) starts no second registration: the pool, built
    once, adopts only the first. A recording fake stands in for the CUDA calls."""
    import torch

    from tests.transfer.test_host_pool import Recorder
    from tokenvm_vllm.connector import early_pool
    from tokenvm_vllm.transfer import host_pool

    rec = Recorder()
    started: list[int] = []
    real_start = host_pool.start_early_registration

    def start(nbytes: int, device: int | None, **kwargs: Any) -> Any:
        started.append(nbytes)
        return real_start(nbytes, device, register=rec.register, unregister=rec.unregister,
                          **kwargs)

    monkeypatch.setattr(early_pool, "_STARTED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(host_pool, "_host_pointer_usable", lambda device: True)
    monkeypatch.setattr(host_pool, "start_early_registration", start)
    monkeypatch.setattr(compat, "install_graph_capture_guard", lambda pause, resume: True)
    config = vllm_config({"host_bytes": 64 * 4096})
    try:
        early_pool.start_host_pool_early(config)
        early_pool.start_host_pool_early(config)  # the weights loaded again
        assert started == [64 * 4096]
        assert host_pool.early_registration_bytes() == 64 * 4096
    finally:
        host_pool.discard_early_registration()
    assert rec.registered == {}
