"""``RequestState``: what the scheduler side remembers about one live request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenvm_vllm.keys import BlockKey

if TYPE_CHECKING:
    from vllm.v1.request import Request


@dataclass
class RequestState:
    """What the scheduler side remembers about one live request."""

    request: Request
    keys: list[BlockKey] = field(default_factory=list)
    """The request's block keys so far, from its first block (each computed once)."""
    block_ids: list[list[int]] = field(default_factory=list)
    """The request's GPU block ids per KV cache group, as vLLM allocated them (a
    sliding-window group holds ``compat.NULL_BLOCK_ID`` where vLLM skipped a block). Ids of
    blocks vLLM freed later, once they fell out of the window, stay here: see
    ``GroupInfo.first_needed_block`` for which ones are still the request's."""
    next_store_block: int = 0
    """Blocks below this index are stored, loaded or local hits: never stored again."""
    local_blocks: int = 0
    """vLLM's own prefix-cache hit (blocks) at the last lookup."""
    hit_blocks: int = 0
    """The host hit the last lookup promised, in blocks after ``local_blocks``."""
    load_job_id: int | None = None
    in_step_load: tuple[int, int] | None = None
    """(job id, first block) of a load in flight that the request runs beside, in the same
    step (``load_mode`` layerwise or sync). Until it completes the request's new blocks are
    not stored: if the load fails, the forward that ran beside it read bad KV, and the blocks
    it filled are recomputed by vLLM before they may be stored."""
    protected: list[BlockKey] = field(default_factory=list)
    """Prompt block keys the eviction policy protects while the request lives."""
    promotions: set[int] = field(default_factory=set)
    """Disk -> host jobs in flight for this request's prefix."""
    prefetched_blocks: int = 0
    """Promotions issued for this request, not yet judged on time or late."""
    lookup_deferred: bool = False
    load_defers: int = 0
    """Steps this request's load was put off (``load_defer_steps``)."""
    first_deferred: float = 0.0
    """When (``time.monotonic``) its load was first put off, 0.0 if never
    (``load_defer_max_s``)."""
    prefetch_deadline: float = 0.0
    remote_asked: bool = False
    """A remote lookup was issued for this request (one per request)."""
    remote_lookup: int | None = None
    """The remote lookup job in flight, if any."""
    remote_reads: set[int] = field(default_factory=set)
    """Remote -> host jobs in flight for this request's prefix."""
