"""Fixtures: real Redis servers on 127.0.0.1 (``tests/redis_servers.py``), stopped afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_servers import RedisCluster, RedisServer, require_redis_binaries


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh standalone server per test (tests kill, fill and restart it)."""
    require_redis_binaries()
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """Three masters, no replicas, shared by a module's tests (joining takes about a second)."""
    require_redis_binaries()
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster"), masters=3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster_with_replicas(tmp_path: Path) -> Iterator[RedisCluster]:
    """Three masters with one replica each, per test (failover tests kill masters)."""
    require_redis_binaries()
    cluster = RedisCluster(tmp_path / "cluster", masters=3, replicas=1).start()
    try:
        yield cluster
    finally:
        cluster.stop()
