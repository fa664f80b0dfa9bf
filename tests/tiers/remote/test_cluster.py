"""``RemoteStore`` on a real three-master Redis Cluster (127.0.0.1): keys spread over the nodes,
batches cross hash slots, and a master failing over to its replica."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from tests.redis_servers import RedisCluster
from tests.tiers.remote.test_store import SLOT, keys, make_store, payloads


def test_batches_spread_over_every_master(redis_cluster: RedisCluster) -> None:
    with make_store("redis://" + redis_cluster.seeds) as store:
        assert store.available
        ks, data = keys(60), payloads(60)
        assert store.put(ks, data).result(10) == [True] * 60
        sizes = [int(node.cli("DBSIZE")) for node in redis_cluster.masters()]
        assert len(sizes) == 3 and all(size > 0 for size in sizes) and sum(sizes) >= 60
        outs = [np.zeros(SLOT, np.uint8) for _ in ks]
        assert store.get(ks, outs).result(10) == [True] * 60
        assert all(np.array_equal(a, b) for a, b in zip(outs, data, strict=True))
        assert store.contains(keys(3, salt=5)).result(10) == [False] * 3
        assert len(store.scan_keys()) >= 60


def test_one_seed_with_cluster_flag_finds_the_rest(redis_cluster: RedisCluster) -> None:
    seed = redis_cluster.seeds.split(",")[0]
    with make_store(f"redis://{seed}?cluster=1") as store:
        assert store.put(keys(30, salt=7), payloads(30)).result(10) == [True] * 30


def test_master_failover(redis_cluster_with_replicas: RedisCluster,
                         caplog: pytest.LogCaptureFixture) -> None:
    cluster = redis_cluster_with_replicas
    caplog.set_level(logging.WARNING, logger="vllm.tokenvm")
    with make_store("redis://" + cluster.seeds, timeout_s=0.5) as store:
        ks, data = keys(40), payloads(40)
        assert store.put(ks, data).result(10) == [True] * 40
        time.sleep(0.3)  # let the replicas catch up
        victim = cluster.masters()[0]
        victim.kill()
        # Calls during the failover are misses (no exception); afterwards the replica serves.
        deadline = time.monotonic() + 20
        outs = [np.zeros(SLOT, np.uint8) for _ in ks]
        while time.monotonic() < deadline:
            if all(store.get(ks, outs).result(10)):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("blocks not served again within 20s of the failover")
        assert all(np.array_equal(a, b) for a, b in zip(outs, data, strict=True))
        assert store.put(keys(10, salt=3), payloads(10)).result(10) == [True] * 10
        assert store.available
    assert caplog.text.count("a node of") <= 1  # warned once, not per failed batch
