"""``compat.install_graph_capture_guard`` on CPU: ``pin_mode: overlap`` holds the host pool's
registration while vLLM captures CUDA graphs. vLLM's two runners' ``capture_model`` are
replaced by recording stand-ins (a real capture needs a GPU: ``tests/gpu/test_lazy_pool.py``);
the guard wraps them, and calls pause before and resume after, also when the capture raises."""

from __future__ import annotations

from typing import Any

import pytest

from tokenvm_vllm import compat


@pytest.fixture
def runners(monkeypatch):
    """Both runner classes with a recording ``capture_model``; the guard list emptied."""
    from vllm.v1.worker.gpu import model_runner as v2_runner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner

    calls: list[str] = []

    def make(name: str) -> Any:
        def capture_model(self: Any) -> int:
            calls.append(f"capture {name}")
            if getattr(self, "fail", False):
                raise RuntimeError("capture failed (fake)")
            return 7
        return capture_model

    monkeypatch.setattr(V1Runner, "capture_model", make("v1"))
    monkeypatch.setattr(v2_runner.GPUModelRunner, "capture_model", make("v2"))
    monkeypatch.setattr(compat, "_CAPTURE_GUARDS", [])
    return calls, V1Runner, v2_runner.GPUModelRunner


class Runner:
    fail = False


def test_the_guard_pauses_around_each_capture_of_both_runners(runners):
    calls, v1, v2 = runners

    def pause() -> None:
        calls.append("pause")

    def resume() -> None:
        calls.append("resume")

    assert compat.install_graph_capture_guard(pause, resume)
    assert compat.install_graph_capture_guard(pause, resume)  # a second engine: wrapped once
    compat.remove_graph_capture_guard(pause)
    assert compat.install_graph_capture_guard(pause, resume)
    assert v1.capture_model(Runner()) == 7
    assert v2.capture_model(Runner()) == 7
    assert calls == ["pause", "capture v1", "resume", "pause", "capture v2", "resume"]
    calls.clear()
    failing = Runner()
    failing.fail = True
    with pytest.raises(RuntimeError, match="fake"):
        v2.capture_model(failing)
    assert calls == ["pause", "capture v2", "resume"]  # resumed although the capture raised
    calls.clear()
    compat.remove_graph_capture_guard(pause)
    v1.capture_model(Runner())
    assert calls == ["capture v1"]


def test_no_guard_without_capture_model(monkeypatch, runners):
    _, v1, _ = runners
    monkeypatch.delattr(v1, "capture_model")
    assert not compat.install_graph_capture_guard(lambda: None, lambda: None)
    assert compat._CAPTURE_GUARDS == []
