"""TokenVM's counters, carried on vLLM's own stats path and exported on ``/metrics``.

The scheduler side owns every counter (workers report bytes and times to it in their step
metadata), returns them from ``get_kv_connector_stats``, and vLLM ships them to the front end,
where ``TokenVMPromMetrics`` adds them to Prometheus counters named ``tokenvm:<counter>_total``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.v1.metrics.utils import create_metric_per_engine

COUNTERS: dict[str, str] = {
    "lookup_blocks": "Blocks looked up beyond vLLM's own prefix-cache hit",
    "host_hit_blocks": "Blocks found in the host tier at lookup",
    "loaded_blocks": "Blocks copied host -> GPU instead of being recomputed",
    "stored_blocks": "Blocks copied GPU -> host",
    "store_skipped_blocks": "Full blocks not stored because every host slot was pinned",
    "host_evicted_blocks": "Blocks evicted from the host tier to make room",
    "layerwise_loaded_blocks": "Blocks loaded layer by layer under the forward that needed "
                               "them (load_mode=layerwise, each layer awaiting only its copy)",
    "sync_loaded_blocks": "Blocks loaded whole before the forward that needed them, the "
                          "forward waiting for the copy on the GPU (load_mode=sync)",
    "failed_load_blocks": "Blocks whose load failed (vLLM recomputes them)",
    "disk_recovered_blocks": "Blocks found on disk at start-up (survived a restart)",
    "disk_promoted_blocks": "Blocks read disk -> host ahead of their request (prefetch)",
    "disk_read_failed_blocks": "Disk reads that failed verification or I/O (treated as misses)",
    "disk_written_blocks": "Blocks copied host -> disk",
    "disk_write_failed_blocks": "Host -> disk copies that failed (disk full, I/O error)",
    "disk_write_skipped_blocks": "Blocks not written to disk (queue full or every slot pinned)",
    "lookup_deferred": "Lookups answered 'ask again' while a prefetch was in flight",
    "load_deferred": "Lookups answered 'ask again' to put off a load that would evict "
                     "prefix-cached GPU blocks (load_defer_steps)",
    "load_early_finished": "Requests whose finished load the scheduler took from the worker "
                           "in its own process, before vLLM's report (load_early_finish)",
    "lookup_deferred_loading": "Lookups answered 'ask again' because another request was "
                               "loading the same blocks (they become vLLM cache hits)",
    "prefetch_on_time_blocks": "Prefetched blocks that were in host memory at the first lookup",
    "prefetch_late_blocks": "Prefetched blocks the request had to wait for (lookup deferred)",
    "fenced_jobs": "Copies a forward had to wait for (their GPU blocks were re-allocated): copy "
                   "time not hidden under compute",
    "remote_lookup_blocks": "Blocks asked of the remote tier (Redis) because host and disk "
                            "lacked them",
    "remote_miss_blocks": "Blocks the remote tier did not hold at lookup (or did not answer "
                          "for in time)",
    "remote_hit_blocks": "Blocks read from the remote tier into host memory",
    "remote_skipped_blocks": "Blocks the remote tier held but were recomputed instead: reading "
                             "them was estimated slower (remote_reads=auto)",
    "remote_read_failed_blocks": "Remote reads that failed (gone, timed out or failed their "
                                 "checks): recomputed",
    "remote_read_unanswered_blocks": "Of the failed remote reads, those the server did not "
                                     "answer in time (the block is still taken to be there: "
                                     "its recompute is not written back)",
    "remote_written_blocks": "Blocks copied host -> remote tier",
    "remote_write_failed_blocks": "Host -> remote copies that failed (server down, full, slow)",
    "remote_write_skipped_blocks": "Blocks not sent to the remote tier (too many in flight)",
    "remote_write_known_blocks": "Blocks not sent to the remote tier because it was seen "
                                 "holding them within the last 10 minutes (or half its TTL)",
    "remote_read_bytes": "Bytes read from the remote tier (values: header and block)",
    "remote_written_bytes": "Bytes written to the remote tier (values: header and block)",
    "remote_corrupt_blocks": "Remote values that failed their checks (deleted)",
    "remote_timeouts": "Remote calls with no answer within remote_timeout_s",
    "remote_failed_batches": "Remote batches that failed (timeouts, connection errors)",
    "remote_dropped_batches": "Remote batches refused because the client's queue was full",
    "remote_expired_batches": "Remote read batches that waited past remote_timeout_s in the queue",
    "remote_outages": "Times the remote tier became unreachable (then retried in the "
                      "background)",
    "remote_io_process_exits": "Times a worker's remote I/O process (remote_process) exited "
                               "and was started again",
    "elastic_grown_groups": "Elastic GPU KV: page groups made usable (mapped) ahead of demand",
    "elastic_shrunk_groups": "Elastic GPU KV: page groups given back (unmapped) after an idle "
                             "period",
    "elastic_unparked_blocks": "Elastic GPU KV: blocks handed back to vLLM's free queue by a "
                               "grow",
    "elastic_parked_blocks": "Elastic GPU KV: blocks taken out of vLLM's use by a shrink",
    "elastic_spilled_blocks": "Elastic GPU KV: prefix-cached blocks dropped from vLLM's cache "
                              "by a shrink, each READABLE in TokenVM's tiers first",
    "elastic_spill_store_blocks": "Elastic GPU KV: blocks a shrink had to store to host first "
                                  "(not there yet)",
    "elastic_spill_dropped_blocks": "Elastic GPU KV: cached blocks a shrink left unstored "
                                    "(more than the host and disk tiers hold; the coldest)",
    "elastic_failed_maps": "Elastic GPU KV: page-group maps that failed (out of memory)",
    "elastic_reserve_waits": "Elastic GPU KV: grows cut short because the workers' reserve of "
                             "created, unmapped memory was used up (more once they refill it)",
    "host_released_bytes": "Host tier bytes given back to the OS under memory pressure "
                           "(host_min_available_bytes), all pools",
    "host_shrinks": "Host tier shrinks under memory pressure",
    "host_grows": "Host tier grows back after memory pressure eased",
    "host_shrink_dropped_blocks": "Host blocks dropped because their slot was given back "
                                  "(copies on disk stay readable)",
    "load_bytes": "Bytes copied host -> GPU",
    "store_bytes": "Bytes copied GPU -> host",
    "load_seconds": "Seconds spent in host -> GPU copies",
    "store_seconds": "Seconds spent in GPU -> host copies",
}


HISTOGRAMS: dict[str, str] = {
    "load_job_seconds": "Duration of each host -> GPU copy job (one per parked request)",
    "store_job_seconds": "Duration of each GPU -> host copy job (one per engine step)",
    "disk_io_seconds": "Time from submit to completion seen, per disk read or write",
    "remote_io_seconds": "Time from submit to completion seen, per remote batch (lookup, read "
                         "or write)",
    "elastic_apply_seconds": "Elastic GPU KV: time a worker spent applying one step's map and "
                             "unmap commands before its forward",
}
GAUGES: dict[str, str] = {
    "elastic_usable_blocks": "Elastic GPU KV: blocks vLLM may use now (mapped page groups)",
    "host_usable_bytes": "Host tier bytes per pool usable now (less than host_bytes after a "
                         "shrink under memory pressure)",
    "elastic_mapped_bytes": "Elastic GPU KV: bytes of mapped page groups (on CPU nothing is "
                            "really mapped: what would be)",
    "elastic_reserve_bytes": "Elastic GPU KV: bytes each worker holds created but unmapped, "
                             "for the next grows (latest report; 0 when idle)",
}
"""Levels, not totals: each interval carries the latest value (absent: not reported)."""
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass
class TokenVMStats(KVConnectorStats):
    """``data``: each name of ``COUNTERS`` -> a number accumulated over one interval, each name
    of ``HISTOGRAMS`` -> the list of observations of that interval, each name of ``GAUGES`` ->
    its latest level. Sparse: a name is present only once the interval reported it. vLLM ships
    ``data`` from the engine core to the front end on every step whose stats are not empty,
    and the front end rebuilds and aggregates it there: with every name filled in (64 of them)
    that cost 22 µs a step on the CPU VM against 6 µs for the few a busy step reports."""

    def set(self, name: str, value: float) -> None:
        """Report gauge ``name``'s current level (the latest one wins on aggregation)."""
        self.data[name] = value

    def add(self, name: str, value: float) -> None:
        if value:  # (a zero would travel for nothing)
            self.data[name] = self.data.get(name, 0) + value

    def observe(self, name: str, values: list[float]) -> None:
        if values:
            self.data.setdefault(name, []).extend(values)

    def reset(self) -> None:
        self.data: dict[str, Any] = {}

    def aggregate(self, other: KVConnectorStats) -> TokenVMStats:
        for name, value in other.data.items():
            if name in COUNTERS:
                self.data[name] = self.data.get(name, 0) + value
            elif name in HISTOGRAMS:
                self.data.setdefault(name, []).extend(value)
            elif name in GAUGES and value is not None:
                self.data[name] = value
        return self

    def reduce(self) -> dict[str, int | float]:
        summary = {name: round(self.data[name], 6) for name in COUNTERS if self.data.get(name)}
        for name in HISTOGRAMS:
            values = self.data.get(name) or []
            if values:
                summary[f"{name}_mean"] = round(sum(values) / len(values), 6)
        for name in GAUGES:
            if self.data.get(name) is not None:
                summary[name] = self.data[name]
        return summary

    def is_empty(self) -> bool:
        return not any(self.data.get(name) for name in (*COUNTERS, *HISTOGRAMS)) and all(
            self.data.get(name) is None for name in GAUGES)


class TokenVMPromMetrics(KVConnectorPromMetrics):
    """One Prometheus counter per entry of ``COUNTERS``, labelled per engine."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            name: create_metric_per_engine(
                self._counter_cls(name=f"tokenvm:{name}", documentation=doc,
                                  labelnames=labelnames),
                per_engine_labelvalues,
            )
            for name, doc in COUNTERS.items()
        }
        self._histograms = {
            name: create_metric_per_engine(
                self._histogram_cls(name=f"tokenvm:{name}", documentation=doc,
                                    labelnames=labelnames, buckets=_BUCKETS),
                per_engine_labelvalues,
            )
            for name, doc in HISTOGRAMS.items()
        }
        self._gauges = {
            name: create_metric_per_engine(
                self._gauge_cls(name=f"tokenvm:{name}", documentation=doc,
                                labelnames=labelnames, multiprocess_mode="mostrecent"),
                per_engine_labelvalues,
            )
            for name, doc in GAUGES.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            counters = self._counters.get(name)
            if counters is not None and value:
                counters[engine_idx].inc(value)
            histograms = self._histograms.get(name)
            if histograms is not None:
                for observation in value:
                    histograms[engine_idx].observe(observation)
            gauges = self._gauges.get(name)
            if gauges is not None and value is not None:
                gauges[engine_idx].set(value)
