"""``SchedulerElastic``: everything elastic mode does in the scheduler, behind four hook points.

``connector/scheduler.py`` calls, and only calls:

- ``between_steps(demand, serving)`` from ``on_new_request`` (an idle engine does not step, so
  an idle period ends here): read the ceiling file, maybe shrink, then map ahead for the new
  request; ``serving``: other requests are in the engine (a shrink then stores and drops
  nothing, ``ElasticPool.maybe_shrink``);
- ``before_alloc(demand)`` from ``get_num_new_matched_tokens`` (vLLM allocates next; growing only
  adds free blocks, safe inside ``schedule``; shrinking is not, see ``pool.py``);
- ``end_of_schedule(serving)`` at the start of ``build_connector_meta``: ceiling file, observe
  the step's use, maybe shrink (may hand blocks to the store planner's spill list);
- ``after_meta(demand)`` at its end: map ahead for the next step's allocations.

``take_commands()`` gives the map/unmap commands recorded since the last call and the reserve
target, for the step's metadata (``protocol.py``); with ``trace: true`` it logs them, the
workers' reported reserve and the usable blocks (``TokenVM trace <time> elastic ...``, as
``bench/timeline.py`` reads the load events), for a step that has any or changes the target.
Commands recorded by ``after_meta`` travel with the next step: the blocks they make usable can
only be handed out by the next ``schedule``. ``reported(entries)`` takes the workers' reserve
reports (``update_connector_output``): the pool maps no more than they cover
(``protocol.ReserveLedger``).

``warm_up_pending``: the workers keep the whole range mapped from vLLM's warm-up until they apply
their first step's metadata (``protocol.py``). An idle server does not step, so until then the
scheduler reports pending work (``has_pending_work``) and the engine runs one empty step right
after start-up: the warm-up memory goes back before the first request, not at it (a second
server starting on the same GPU needs it).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from tokenvm_vllm.config import TokenVMConfig, TokenVMConfigError, parse_size
from tokenvm_vllm.elastic.pool import ElasticPool, layout_for
from tokenvm_vllm.elastic.protocol import Command, CommandMapper, ReserveLedger

logger = logging.getLogger("vllm.tokenvm")


def blocks_needed(num_tokens: int, have_blocks: int, block_size: int, num_groups: int) -> int:
    """Blocks a request of ``num_tokens`` tokens holding ``have_blocks`` (per group) still needs
    for its prompt and one more token, in every KV cache group (an over-estimate: local prefix
    hits need no new block)."""
    return num_groups * max(0, -(-(num_tokens + 1) // block_size) - have_blocks)


class SchedulerElastic:
    """Builds the ``ElasticPool`` on vLLM's fresh block pool with a ``CommandMapper`` and runs it.

    ``is_spilled(key)``: the key is READABLE in host or disk; ``request_store(pairs)``: store
    ``(key, block)`` pairs to host in the next store job; ``spill_capacity()``: how many blocks
    the tiers below can take (a shrink stores at most that many); ``max_step_blocks``: what one
    step can allocate at most (caps the map-ahead); ``reserve_blocks``: kept free on top of
    demand;
    ``free_probe``: the device's free bytes (``compat.device_free_bytes_probe``), which
    ``gpu_free_target_bytes`` needs (None: that setting has no effect); ``workers``: how many
    workers report their reserve each step (vLLM's world size).

    The reserve target (``reserve_target``): while the engine serves (a request within
    ``shrink_idle_s``), enough whole groups for one step's largest growth (``max_step_blocks``
    plus ``reserve_blocks``), never more than the ceiling leaves room for; 0 when idle, so an
    idle server holds only its mapped groups."""

    def __init__(self, block_pool: Any, kv_cache_config: Any, config: TokenVMConfig, *,
                 is_spilled: Callable[[Any], bool],
                 request_store: Callable[[list[tuple[Any, int]]], None],
                 reserve_blocks: int, max_step_blocks: int,
                 spill_capacity: Callable[[], int] | None = None,
                 free_probe: Callable[[], int] | None = None, workers: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.mapper = CommandMapper()
        self.pool = ElasticPool(
            block_pool, layout_for(kv_cache_config, config.elastic_page_bytes), self.mapper,
            floor_bytes=config.gpu_kv_floor_bytes,
            ceiling_bytes=config.gpu_kv_ceiling_bytes or None, idle_s=config.shrink_idle_s,
            is_spilled=is_spilled, request_store=request_store, reserve_blocks=reserve_blocks,
            spill_capacity=spill_capacity, keep_cache=config.elastic_keep_cache)
        # The start set: every worker maps it itself when it allocates the KV tensors
        # (protocol.initial_groups), before warm-up runs touch the null block.
        self.mapper.take()
        self.ledger = ReserveLedger(workers)
        self.mapper.ledger = self.ledger  # from here on, maps only what the workers reserved
        layout = self.pool.layout
        per_group = max(1, layout.page_bytes // max(layout.block_bytes))
        self.reserve_groups = min(layout.num_groups,
                                  -(-(max_step_blocks + reserve_blocks) // per_group) + 1)
        """The reserve target while serving (before the ceiling's cap)."""
        self.warm_up_pending = True
        """No step's metadata has gone out yet: the workers still hold the warm-up mapping."""
        self._traced_target = -1
        self.max_step_blocks = max_step_blocks
        self.clock = clock
        self._polled_at = float("-inf")
        self._served_at: float | None = None
        """When a step last saw a request in the engine (``_serving``)."""
        self._ceiling_file_seen: tuple[int, int] | None = None
        self._exported: dict[str, int] = {}
        """The gauges' levels as last exported (``export`` sends only changes)."""
        self._ceiling_setting = self.pool.groups.ceiling_bytes
        """The ceiling the settings ask for (gpu_kv_ceiling_bytes, then the ceiling file); the
        pool's ceiling is this, lowered while the free-memory target needs it."""
        self._free_probe = free_probe if config.gpu_free_target_bytes else None
        self._free_limited = False
        if config.gpu_free_target_bytes and free_probe is None:
            logger.warning("TokenVM elastic: gpu_free_target_bytes=%d has no effect here (no "
                           "NVIDIA GPU or NVML to read free device memory from)",
                           config.gpu_free_target_bytes)

    # -- hook points ------------------------------------------------------------------------

    def between_steps(self, demand: int, serving: bool) -> None:
        self._poll_limits()
        self.pool.maybe_shrink(serving=self._serving(serving))
        self._served_at = self.clock()  # a request arrived: the reserve is wanted again
        self.pool.grow(demand)

    def before_alloc(self, demand: int) -> None:
        self.pool.grow(demand)

    def end_of_schedule(self, serving: bool) -> None:
        self._poll_limits()
        self.pool.observe()
        self.pool.maybe_shrink(serving=self._serving(serving))

    def _serving(self, requests_now: bool) -> bool:
        """Whether the engine held requests within the last ``shrink_idle_s``: an idle period
        is one without any request, not a gap between two (at 1 request/s there are many)."""
        now = self.clock()
        if requests_now:
            self._served_at = now
        return self._served_at is not None and now - self._served_at < self.config.shrink_idle_s

    def after_meta(self, demand: int) -> None:
        self.pool.grow(min(self.max_step_blocks, demand))

    def take_commands(self) -> tuple[list[Command], int]:
        """The commands and the reserve target for this step's metadata; the first call ends
        the warm-up mapping."""
        self.warm_up_pending = False
        commands = self.mapper.take()
        target = self.reserve_target()
        maps = sum(1 for op, _ in commands if op == "map")
        self.ledger.sent_batch(maps, target)
        if self.config.trace and (commands or target != self._traced_target):
            # (a step that changes nothing logs nothing: an idle server steps rarely, a busy
            # one at ~100 steps/s)
            self._traced_target = target
            logger.info("TokenVM trace %.6f elastic maps=%d unmaps=%d target=%d reported=%d "
                        "usable=%d", time.monotonic(), maps, len(commands) - maps, target,
                        self.ledger.reported, self.pool.usable_blocks)
        return commands, target

    def reserve_target(self) -> int:
        """Groups every worker should keep reserved (see the class docstring)."""
        if not self._serving(False):
            return 0
        groups = self.pool.groups
        room = (groups.ceiling_bytes - groups.mapped_bytes) // self.pool.layout.group_bytes(0)
        return max(0, min(self.reserve_groups, room))

    def reported(self, entries: list[tuple[int, int]]) -> None:
        """One step's reserve reports, ``(metadata applied, groups reserved)`` per worker."""
        if entries:
            self.ledger.report(entries)

    @property
    def shrink_pending(self) -> bool:
        return self.pool.shrink_pending

    @property
    def awaiting_idle_shrink(self) -> bool:
        return self.pool.awaiting_idle_shrink

    def export(self, stats: Any) -> None:
        """Add the counters since the last call to ``stats`` (``tokenvm:elastic_*``), and each
        gauge whose level changed since it was last exported. (A Prometheus gauge keeps its
        level; setting unchanged ones made every step's stats non-empty, so vLLM shipped and
        the front end processed TokenVM's stats on every step of an elastic server, where a
        fixed pool's decode steps ship none.)"""
        for name, count in vars(self.pool.take_counters()).items():
            if count:
                stats.add(f"elastic_{name}", count)
        levels = (("elastic_usable_blocks", self.pool.usable_blocks),
                  ("elastic_mapped_bytes", self.pool.mapped_bytes),
                  ("elastic_reserve_bytes",
                   self.ledger.reported * self.pool.layout.group_bytes(0)))
        for name, level in levels:
            if self._exported.get(name) != level:
                stats.set(name, level)
                self._exported[name] = level

    # -- the ceiling: the file and the free-memory target -----------------------------------

    def _poll_limits(self) -> None:
        """At most once a second: the ceiling file, then the free-memory target on top of it."""
        now = self.clock()
        if now < self._polled_at + 1.0:
            return
        self._polled_at = now
        self._read_ceiling_file()
        self._follow_free_memory()

    def _read_ceiling_file(self) -> None:
        """``elastic_ceiling_file``: apply a new ceiling when the file changed (its mtime and
        size). A missing file or a bad value keeps the ceiling in force and logs one line, once
        per change of the file."""
        path = self.config.elastic_ceiling_file
        if not path:
            return
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
        self._ceiling_setting = min(max(ceiling or self.pool.groups.total_bytes,
                                        self.pool.groups.floor_bytes),
                                    self.pool.groups.total_bytes)
        self.pool.set_ceiling(self._ceiling_setting)
        logger.info("TokenVM elastic: ceiling from %s: %d bytes (%s)", path,
                    self._ceiling_setting, text)

    def _follow_free_memory(self) -> None:
        """``gpu_free_target_bytes``: lower the pool's ceiling to what leaves that much of the
        device free (mapped + free - target, never below the floor), or raise it back toward
        the set ceiling when memory came free. A ceiling below the mapped bytes makes the next
        ``maybe_shrink`` give idle groups back at once."""
        if self._free_probe is None:
            return
        groups = self.pool.groups
        reachable = groups.mapped_bytes + self._free_probe() - self.config.gpu_free_target_bytes
        ceiling = max(groups.floor_bytes, min(self._ceiling_setting, reachable))
        if ceiling == groups.ceiling_bytes:
            return
        self.pool.set_ceiling(ceiling)
        limited = ceiling < self._ceiling_setting
        if limited != self._free_limited or ceiling < groups.mapped_bytes:
            logger.info("TokenVM elastic: %s; ceiling now %d bytes (%d mapped, set ceiling %d)",
                        f"free device memory is short of gpu_free_target_bytes="
                        f"{self.config.gpu_free_target_bytes}" if limited else
                        "free device memory is back above gpu_free_target_bytes",
                        ceiling, groups.mapped_bytes, self._ceiling_setting)
        self._free_limited = limited
