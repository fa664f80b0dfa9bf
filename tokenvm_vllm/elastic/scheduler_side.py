"""``SchedulerElastic``: everything elastic mode does in the scheduler, behind four hook points.

``connector/scheduler.py`` calls, and only calls:

- ``between_steps(demand)`` from ``on_new_request`` (an idle engine does not step, so an idle
  period ends here): read the ceiling file, maybe shrink, then map ahead for the new request;
- ``before_alloc(demand)`` from ``get_num_new_matched_tokens`` (vLLM allocates next; growing only
  adds free blocks, safe inside ``schedule``; shrinking is not, see ``pool.py``);
- ``end_of_schedule()`` at the start of ``build_connector_meta``: ceiling file, observe the
  step's use, maybe shrink (may hand blocks to the store planner's spill list);
- ``after_meta(demand)`` at its end: map ahead for the next step's allocations.

``take_commands()`` gives the map/unmap commands recorded since the last call, for the step's
metadata (``protocol.py``). Commands recorded by ``after_meta`` travel with the next step: the
blocks they make usable can only be handed out by the next ``schedule``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from tokenvm_vllm.config import TokenVMConfig, TokenVMConfigError, parse_size
from tokenvm_vllm.elastic.pool import ElasticPool, layout_for
from tokenvm_vllm.elastic.protocol import Command, CommandMapper

logger = logging.getLogger("vllm.tokenvm")


def blocks_needed(num_tokens: int, have_blocks: int, block_size: int, num_groups: int) -> int:
    """Blocks a request of ``num_tokens`` tokens holding ``have_blocks`` (per group) still needs
    for its prompt and one more token, in every KV cache group (an over-estimate: local prefix
    hits need no new block)."""
    return num_groups * max(0, -(-(num_tokens + 1) // block_size) - have_blocks)


class SchedulerElastic:
    """Builds the ``ElasticPool`` on vLLM's fresh block pool with a ``CommandMapper`` and runs it.

    ``is_spilled(key)``: the key is READABLE in host or disk; ``request_store(pairs)``: store
    ``(key, block)`` pairs to host in the next store job; ``max_step_blocks``: what one step can
    allocate at most (caps the map-ahead); ``reserve_blocks``: kept free on top of demand."""

    def __init__(self, block_pool: Any, kv_cache_config: Any, config: TokenVMConfig, *,
                 is_spilled: Callable[[Any], bool],
                 request_store: Callable[[list[tuple[Any, int]]], None],
                 reserve_blocks: int, max_step_blocks: int) -> None:
        self.config = config
        self.mapper = CommandMapper()
        self.pool = ElasticPool(
            block_pool, layout_for(kv_cache_config, config.elastic_page_bytes), self.mapper,
            floor_bytes=config.gpu_kv_floor_bytes,
            ceiling_bytes=config.gpu_kv_ceiling_bytes or None, idle_s=config.shrink_idle_s,
            is_spilled=is_spilled, request_store=request_store, reserve_blocks=reserve_blocks)
        # The start set: every worker maps it itself when it allocates the KV tensors
        # (protocol.initial_groups), before warm-up runs touch the null block.
        self.mapper.take()
        self.max_step_blocks = max_step_blocks
        self._ceiling_checked_at = float("-inf")
        self._ceiling_file_seen: tuple[int, int] | None = None

    # -- hook points ------------------------------------------------------------------------

    def between_steps(self, demand: int) -> None:
        self._read_ceiling_file()
        self.pool.maybe_shrink()
        self.pool.grow(demand)

    def before_alloc(self, demand: int) -> None:
        self.pool.grow(demand)

    def end_of_schedule(self) -> None:
        self._read_ceiling_file()
        self.pool.observe()
        self.pool.maybe_shrink()

    def after_meta(self, demand: int) -> None:
        self.pool.grow(min(self.max_step_blocks, demand))

    def take_commands(self) -> list[Command]:
        return self.mapper.take()

    @property
    def shrink_pending(self) -> bool:
        return self.pool.shrink_pending

    def export(self, stats: Any) -> None:
        """Add the counters since the last call to ``stats`` (``tokenvm:elastic_*``)."""
        for name, count in vars(self.pool.take_counters()).items():
            stats.add(f"elastic_{name}", count)
        stats.set("elastic_usable_blocks", self.pool.usable_blocks)
        stats.set("elastic_mapped_bytes", self.pool.mapped_bytes)

    # -- the ceiling file -------------------------------------------------------------------

    def _read_ceiling_file(self) -> None:
        """``elastic_ceiling_file``: apply a new ceiling when the file changed (its mtime and
        size, looked at no more than once a second). A missing file or a bad value keeps the
        ceiling in force and logs one line, once per change of the file."""
        path = self.config.elastic_ceiling_file
        now = time.monotonic()
        if not path or now < self._ceiling_checked_at + 1.0:
            return
        self._ceiling_checked_at = now
        try:
            stat = os.stat(path)
            seen = (stat.st_mtime_ns, stat.st_size)
            if seen == self._ceiling_file_seen:
                return
            self._ceiling_file_seen = seen
            with open(path) as f:
                text = f.read().strip()
            ceiling = parse_size("elastic_ceiling_file", text)
        except FileNotFoundError:
            return
        except (OSError, TokenVMConfigError) as err:
            logger.warning("TokenVM elastic: %s: %s; the ceiling stays %d bytes (write a size "
                           "such as '6GiB' to the file)", path, err,
                           self.pool.groups.ceiling_bytes)
            return
        self.pool.set_ceiling(ceiling or self.pool.groups.total_bytes)
        logger.info("TokenVM elastic: ceiling from %s: %d bytes (%s)", path,
                    self.pool.groups.ceiling_bytes, text)
