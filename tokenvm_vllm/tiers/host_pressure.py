"""Host memory given back under memory pressure (``host_min_available_bytes``, issue #13 item 4).

Scheduler side. ``HostPressure.step`` runs once per engine step (``build_connector_meta``) and
reads the machine's available memory at most once per ``CHECK_INTERVAL_S`` (one
``psutil.virtual_memory()`` call, or the testing file ``debug_host_available_file``):

* Shrink: available < threshold. The host tier gives up its top slots, enough that the bytes
  they held (per worker pool, times the pools on this machine; only slots below
  ``HostTier.high_water`` ever held RAM) bring available memory back to threshold +
  ``margin``, rounded to whole pinning chunks (``CHUNK_BYTES``: the pool registers and gives
  back in those), never below ``floor_slots`` (an eighth of the tier, at least one slot: the
  tier keeps working, with less room). The tier keeps its hottest unpinned blocks (policy
  order), as many as the kept slots hold, moving those in given-up slots down (``host_moves``
  in the metadata, copied by the workers first); the coldest are dropped at once (those on
  disk stay readable there; the rest are recomputed when next needed). Blocks being loaded,
  stored, demoted or promoted stay put, finish their copy, and are dropped then if their slot
  was given up. Once no block is left there, the step's metadata carries
  ``("release", first_slot)`` and every worker unregisters and ``madvise``s that range
  (``HostPool.release``).
* Grow: the tier is smaller than configured and available memory has stayed above threshold +
  2 x margin for ``host_regrow_after_s``: the step's metadata carries ``("grow", usable)`` (the
  workers re-pin paced, like lazy pinning; pages cost RAM again only as blocks are written) and
  the slots are usable from that step on, as much as available memory above threshold +
  2 x margin covers.

One INFO line per shrink and grow; ``export`` adds ``tokenvm:host_*`` counters and gauges.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tokenvm_vllm.config import TokenVMConfigError, parse_size
from tokenvm_vllm.tiers.host_tier import HostTier
from tokenvm_vllm.transfer.host_pool import CHUNK_BYTES, mem_available, total_memory

if TYPE_CHECKING:
    from tokenvm_vllm.connector.stats import TokenVMStats

logger = logging.getLogger("vllm.tokenvm")

CHECK_INTERVAL_S = 1.0
"""Available memory is read at most this often (not per step)."""
MARGIN_FRACTION = 0.1
"""Hysteresis: a shrink aims at threshold + this fraction of it (at least one chunk per pool);
a grow needs twice that above the threshold, so a grow cannot trigger the next shrink."""
FLOOR_FRACTION = 0.125
"""A shrink never leaves fewer usable slots than this fraction of the configured ones."""

HostCommand = tuple[str, int]
"""``("release", first_slot)`` or ``("grow", usable_slots)``, for every worker's pool."""


def file_available(path: str) -> Callable[[], int]:
    """Available memory read from ``path`` (testing: ``debug_host_available_file``); a
    missing or bad file falls back to MemAvailable (and says so once)."""
    warned: list[str] = []

    def read() -> int:
        try:
            with open(path) as file:
                return parse_size("debug_host_available_file", file.read().strip())
        except (OSError, TokenVMConfigError) as err:
            if str(err) not in warned:
                warned.append(str(err))
                logger.warning("TokenVM: debug_host_available_file=%r unusable (%s); using "
                               "MemAvailable", path, err)
            return mem_available()[0]

    return read


class HostPressure:
    """Decides host tier shrinks and grows from available memory; see the module docstring.

    ``threshold``: bytes (a float in (0, 1): a fraction of ``total_memory()``). ``pools``: host
    pools on this machine (one per worker, one for a shared MLA pool): what a slot given back
    frees, times. ``available``/``clock``: replaceable for tests.
    """

    def __init__(
        self, host: HostTier, slot_bytes: int, pools: int, threshold: int | float,
        regrow_after_s: float, available: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic, chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.host = host
        self.slot_bytes = slot_bytes
        self.pools = max(1, pools)
        self.threshold = int(threshold * total_memory()) if isinstance(threshold, float) else (
            int(threshold))
        self.margin = max(int(self.threshold * MARGIN_FRACTION), chunk_bytes * self.pools)
        self.regrow_after_s = regrow_after_s
        self.chunk_bytes = chunk_bytes
        self.floor_slots = max(1, math.ceil(host.num_slots * FLOOR_FRACTION))
        self._available = available or (lambda: mem_available()[0])
        self._clock = clock
        self._next_check = clock()
        self._calm_since: float | None = None
        self._pending: tuple[int, int, int] | None = None
        """A shrink waiting for copies: (usable before, available seen, blocks dropped)."""
        self.released_bytes = 0
        """Bytes of address range given back since the last ``export`` (all pools)."""
        self.shrinks = 0
        self.grows = 0
        self._dropped_seen = 0
        self._exported_dropped = 0
        self._exported_usable: int | None = None
        self._at_floor_logged = False

    @property
    def pending(self) -> bool:
        """A shrink waits for copies on its slots (the engine must keep stepping)."""
        return self._pending is not None

    def step(self) -> list[HostCommand]:
        """This step's commands for the workers (usually none)."""
        commands: list[HostCommand] = []
        if self._pending is not None:
            self._finish_shrink(commands)
            return commands
        now = self._clock()
        if now < self._next_check:
            return commands
        self._next_check = now + CHECK_INTERVAL_S
        available = self._available()
        host = self.host
        if available < self.threshold:
            self._calm_since = None
            if self._shrink(available):
                self._finish_shrink(commands)
        elif host.usable_slots < host.num_slots and available >= self.threshold + 2 * self.margin:
            if self._calm_since is None:
                self._calm_since = now
            if now - self._calm_since >= self.regrow_after_s:
                self._grow(available, commands)
                self._calm_since = None
        else:
            self._calm_since = None
        return commands

    def _shrink(self, available: int) -> bool:
        """Begin a shrink if the tier holds memory it can give back; returns whether."""
        host = self.host
        need = (self.threshold + self.margin - available) / self.pools  # bytes per pool
        resident = min(host.high_water, host.usable_slots) * self.slot_bytes
        keep_bytes = (int(resident - need) // self.chunk_bytes) * self.chunk_bytes
        usable = max(self.floor_slots, max(0, keep_bytes) // self.slot_bytes)
        if usable >= host.usable_slots or usable >= host.high_water:
            if not self._at_floor_logged:
                self._at_floor_logged = True
                logger.info(
                    "TokenVM host tier: available memory %d bytes is below "
                    "host_min_available_bytes=%d, but the tier holds nothing more it can give "
                    "back (%d of %d slots usable, %d written, floor %d)", available,
                    self.threshold, host.usable_slots, host.num_slots, host.high_water,
                    self.floor_slots)
            return False
        self._at_floor_logged = False
        before = host.usable_slots
        dropped = host.begin_shrink(usable)
        self._pending = (before, available, dropped)
        return True

    def _finish_shrink(self, commands: list[HostCommand]) -> None:
        assert self._pending is not None
        first = self.host.take_release()
        if first is None:
            return  # copies on those slots still in flight: next step
        before, available, dropped = self._pending
        self._pending = None
        commands.append(("release", first))
        given = (before - first) * self.slot_bytes * self.pools  # (pinned: less, whole chunks)
        self.released_bytes += given
        self.shrinks += 1
        logger.info(
            "TokenVM host tier shrunk under memory pressure: available %d bytes < "
            "host_min_available_bytes=%d; slots %d -> %d of %d (%d blocks dropped, %d after "
            "their copies), up to %.1f MiB given back over %d pool(s)", available,
            self.threshold, before, first, self.host.num_slots, dropped,
            self.host.shrink_dropped - self._dropped_seen - dropped, given / 2**20, self.pools)
        self._dropped_seen = self.host.shrink_dropped

    def _grow(self, available: int, commands: list[HostCommand]) -> None:
        host = self.host
        room = (available - self.threshold - 2 * self.margin) // self.pools
        usable = min(host.num_slots, host.usable_slots + max(1, room // self.slot_bytes))
        before = host.usable_slots
        host.grow(usable)
        commands.append(("grow", usable))
        self.grows += 1
        logger.info(
            "TokenVM host tier grown back: available %d bytes >= host_min_available_bytes=%d + "
            "2 x %d margin for %.0f s; slots %d -> %d of %d", available, self.threshold,
            self.margin, self.regrow_after_s, before, usable, host.num_slots)

    def export(self, stats: TokenVMStats) -> None:
        """Add the counters since the last call and the gauge to ``stats``."""
        add = stats.add
        if self.released_bytes:
            add("host_released_bytes", self.released_bytes)
            self.released_bytes = 0
        if self.shrinks:
            add("host_shrinks", self.shrinks)
            self.shrinks = 0
        if self.grows:
            add("host_grows", self.grows)
            self.grows = 0
        dropped = self.host.shrink_dropped - self._exported_dropped
        if dropped:
            add("host_shrink_dropped_blocks", dropped)
            self._exported_dropped = self.host.shrink_dropped
        usable = self.host.usable_slots * self.slot_bytes
        if usable != self._exported_usable:  # a level: sent when it changes (elastic's export)
            stats.set("host_usable_bytes", usable)
            self._exported_usable = usable
