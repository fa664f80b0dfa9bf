"""Shared fixtures: the tiny generated Llama, vLLM-scheduler harnesses and engine settings.

Layout: ``tests/<package folder>/`` mirrors ``tokenvm_vllm/<package folder>/``; top-level modules
(``config.py``, ``plugin.py``) are tested in ``tests/`` itself; ``tests/e2e/`` holds every test
that starts a real vLLM engine or server (marked ``e2e``: ``pytest -m "not e2e"`` is the fast
suite); ``tests/gpu/`` needs CUDA and skips without it.

Collection stays light: vLLM and torch are imported by the fixtures that need them, not here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.harness import Harness
    from tests.redis_servers import RedisCluster, RedisServer
    from tokenvm_vllm.bench.prefix_reuse import EngineSettings

E2E_DIR = Path(__file__).parent / "e2e"


@pytest.fixture(scope="session")
def tiny_model_config(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama directory without weights: enough for vLLM's config and scheduler (the
    scheduler-level harness never runs a forward)."""
    from tokenvm_vllm.tiny_llama import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny-config"), weights=False))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Llama with std-0.02 random weights (deterministic, seed 0): outputs depend on the
    whole context, so a wrong KV block changes them. Read-only for the tests that share it."""
    from tokenvm_vllm.tiny_llama import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), weights=True))


@pytest.fixture
def make_harness(tiny_model_config: str) -> Callable[..., Harness]:
    """``make_harness(**kwargs)`` -> ``tests.harness.Harness`` on the tiny model's config: vLLM's
    real ``Scheduler`` with TokenVM's scheduler side and the real worker side on CPU tensors.
    ``model_dir=`` overrides the model (e.g. another namespace)."""
    from tests.harness import Harness

    def make(model_dir: str | None = None, **kwargs: Any) -> Harness:
        return Harness(model_dir or tiny_model_config, **kwargs)

    return make


@pytest.fixture(scope="session")
def engine_settings(tiny_llama: str) -> Callable[..., EngineSettings]:
    """``engine_settings(**kwargs)`` -> ``EngineSettings`` for the tiny Llama (no connector
    unless ``connector=`` says so); run it with ``bench.prefix_reuse.run_in_subprocess``."""
    from tokenvm_vllm.bench.prefix_reuse import EngineSettings

    def make(**kwargs: Any) -> EngineSettings:
        return EngineSettings(model=tiny_llama, **kwargs)

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test under tests/e2e/ without the ``e2e`` marker would slip into the fast suite: refuse
    to run rather than make ``-m "not e2e"`` silently slow."""
    unmarked = [item.nodeid for item in items
                if E2E_DIR in item.path.parents and item.get_closest_marker("e2e") is None]
    if unmarked:
        raise pytest.UsageError(
            f"tests under {E2E_DIR} need the e2e marker (add `pytestmark = pytest.mark.e2e`): "
            + ", ".join(unmarked))


# -- real Redis servers on 127.0.0.1 (the remote tier; tests/redis_servers.py) ---------------

@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh standalone redis-server per test (tests kill, fill and restart it)."""
    from tests.redis_servers import RedisServer, require_redis_binaries

    require_redis_binaries()
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """Three masters, no replicas, shared by a module's tests (joining takes about a second)."""
    from tests.redis_servers import RedisCluster, require_redis_binaries

    require_redis_binaries()
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster"), masters=3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster_with_replicas(tmp_path: Path) -> Iterator[RedisCluster]:
    """Three masters with one replica each, per test (failover tests kill masters)."""
    from tests.redis_servers import RedisCluster, require_redis_binaries

    require_redis_binaries()
    cluster = RedisCluster(tmp_path / "cluster", masters=3, replicas=1).start()
    try:
        yield cluster
    finally:
        cluster.stop()


class Lines(logging.Handler):
    """The log lines of TokenVM's logger (vLLM's loggers do not propagate to pytest's)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def tokenvm_log():
    """Call it to start collecting (after building engines: vLLM's logging set-up resets the
    handlers of child loggers); returns the list the lines go to."""
    logger = logging.getLogger("vllm.tokenvm")
    handler, level = Lines(), logger.level

    def attach() -> list[str]:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        return handler.lines

    yield attach
    logger.removeHandler(handler)
    logger.setLevel(level)
