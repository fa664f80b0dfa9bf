"""The worker metadata that tensor-parallel ranks send back is summed field by field."""

from collections import Counter
from dataclasses import fields

from tokenvm_vllm.connector.metadata import TokenVMWorkerMetadata


def test_aggregate_sums_every_field():
    a = TokenVMWorkerMetadata(
        completed=Counter({1: 1, 2: 1}), failed=Counter({2: 1}), load_bytes=10, store_bytes=20,
        load_seconds=0.5, store_seconds=0.25, layerwise_loaded_blocks=3, load_job_seconds=[0.1],
        store_job_seconds=[0.2], disk_io_seconds=[0.3], disk_scanned=1,
        disk_recovered=Counter({(b"k", 4): 1}), remote_found=Counter({(7, 3): 1}),
        remote_io_seconds=[0.01], remote_counts=Counter({"read_bytes": 100}),
        remote_went_down=1, remote_came_back=1, elastic_reserve=[(5, 2)],
        remote_unanswered=Counter({2: 1}), elastic_apply_seconds=[0.002])
    b = TokenVMWorkerMetadata(
        completed=Counter({1: 1}), failed=Counter(), load_bytes=1, store_bytes=2,
        load_seconds=0.5, store_seconds=0.5, layerwise_loaded_blocks=4, load_job_seconds=[0.4],
        store_job_seconds=[], disk_io_seconds=[0.6], disk_scanned=1,
        disk_recovered=Counter({(b"k", 4): 1, (b"j", 5): 1}), remote_found=Counter({(7, 2): 1}),
        remote_io_seconds=[0.02], remote_counts=Counter({"read_bytes": 50, "timeouts": 1}),
        remote_went_down=1, remote_came_back=0, elastic_reserve=[(5, 1)],
        remote_unanswered=Counter({2: 1, 3: 1}), elastic_apply_seconds=[0.003])
    total = a.aggregate(b)
    assert total == TokenVMWorkerMetadata(
        completed=Counter({1: 2, 2: 1}), failed=Counter({2: 1}), load_bytes=11, store_bytes=22,
        load_seconds=1.0, store_seconds=0.75, layerwise_loaded_blocks=7,
        load_job_seconds=[0.1, 0.4], store_job_seconds=[0.2], disk_io_seconds=[0.3, 0.6],
        disk_scanned=2, disk_recovered=Counter({(b"k", 4): 2, (b"j", 5): 1}),
        remote_found=Counter({(7, 3): 1, (7, 2): 1}), remote_io_seconds=[0.01, 0.02],
        remote_counts=Counter({"read_bytes": 150, "timeouts": 1}), remote_went_down=2,
        remote_came_back=1, elastic_reserve=[(5, 2), (5, 1)],
        remote_unanswered=Counter({2: 2, 3: 1}), elastic_apply_seconds=[0.002, 0.003])
    # every field was set away from its default above, so a field aggregate skipped would show
    assert all(getattr(a, f.name) != getattr(TokenVMWorkerMetadata(), f.name) for f in fields(a))
