"""The scheduler side's one tier manager: where each stored block lives and what may move.

``TierManager`` owns the ``ResidencyIndex``, the host tier, the optional disk tier and one
eviction policy per tier. It follows the spirit of vLLM's ``OffloadingManager``
(``vllm/v1/kv_offload/base.py``): every movement is a ``prepare_*`` that reserves and pins
slots and returns where the bytes go, then, once the workers report the copy, a ``complete_*``
with ``ok``. The manager never moves bytes (workers do) and never sees job ids (the caller's
``JobTable`` does).

States of a block in one tier (``tiers/residency.py``)::

    (absent) --prepare--> WRITING --complete(ok)--> READABLE --evicted / dropped--> (absent)
                             +------complete(failed)---------> (absent)

Pins: a WRITING slot is pinned; so is a READABLE slot with readers (a copy out of it in
flight). A pinned slot is never evicted, dropped or reused. Every ``prepare_*`` that succeeded
must be followed by exactly one matching ``complete_*`` (for each key it returned), which
releases its pins; a failed completion never leaves a block READABLE that may hold bad bytes.

Verbs, each prepare_X followed by one complete_X::

    lookup(keys)              how many keys, from the first, are READABLE in host
    prepare_load(keys)        host -> GPU: pin READABLE host slots (readers + 1)
    prepare_store(key)        GPU -> host: a host slot WRITING (may evict)
    prepare_promotions(keys)  disk -> host for the prefix host lacks: host slot WRITING,
                              disk slot read-pinned
    prepare_demotions(limit)  host -> disk for up to limit blocks complete_store made
                              READABLE: disk slot WRITING, host slot read-pinned
    remote_candidates(keys)   the keys host and disk lack, to ask the remote tier about
    prepare_remote_reads(keys) remote -> host: host slot WRITING (the remote tier has no slots)
    prepare_remote_writes(limit) host -> remote for blocks complete_store made READABLE: host
                              slot read-pinned
    touch(keys)               mark recently used (host policy)
    protect / unprotect       queued requests need these keys (queue-aware policy)
    evict(tier)               drop every unpinned block (vLLM's reset_prefix_cache)

Failed completions: ``complete_load(ok=False)`` and ``complete_promotion(ok=False)`` drop the
source copy (it may hold bad bytes: never serve it twice); ``complete_store(ok=False)``,
``complete_promotion(ok=False)`` and ``complete_demotion(ok=False)`` free the destination slot.
A failed demotion keeps the host copy READABLE.

Disk tier: none without ``disk_slots``. Until ``adopt_disk`` has taken over what the workers'
start-up scans found, it is not *ready*: no promotion or demotion is prepared (a new disk write
could land on a slot holding a recovered block).

Remote tier (``remote=True``): a Redis shared by every server, below host and beside disk. It
has no slots here (Redis keeps its own index and evicts by TTL and its maxmemory policy): the
manager only reserves and pins the host side of each copy. A block ``complete_store`` made
READABLE is queued for the remote tier as for disk, unless the remote tier was seen holding it
lately (``note_in_remote``: a lookup found it, a read or write moved it); a request's blocks
that host and disk lack are looked up (by the workers) and read into WRITING host slots.

Counters (``get_stats``): what the tiers did, by ``tokenvm:*`` counter name, since the last call.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

from tokenvm_vllm.keys import BlockKey
from tokenvm_vllm.policies import make_policy
from tokenvm_vllm.tiers.disk_tier import DiskTier
from tokenvm_vllm.tiers.host_tier import HostTier
from tokenvm_vllm.tiers.residency import ResidencyIndex, Tier


class DiskTransfer(NamedTuple):
    """One block to copy between a host slot and a disk slot (either direction)."""

    key: BlockKey
    host_slot: int
    disk_slot: int


class TierManager:
    """The residency index, the host tier, the optional disk tier and their policies.

    ``host_slots``: host-RAM slots (every worker's pool has this many). ``disk_slots``: slots
    of each worker's disk store, 0 for no disk tier. ``policy``: eviction policy name for both
    tiers (``tokenvm_vllm.policies.POLICIES``).
    """

    REMOTE_KNOWN_MAX = 1 << 16
    """How many keys known to be in the remote tier are remembered (oldest forgotten first)."""

    def __init__(self, host_slots: int, disk_slots: int = 0, policy: str = "lru",
                 remote: bool = False, remote_known_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.index = ResidencyIndex()
        self.host = HostTier(host_slots, self.index, make_policy(policy))
        self.disk = DiskTier(disk_slots, self.index, make_policy(policy)) if disk_slots else None
        self.disk_ready = False
        """True once ``adopt_disk`` ran (never without a disk tier)."""
        self._demotions_queued: deque[BlockKey] = deque()
        """Blocks made READABLE in host by ``complete_store``, to copy to disk."""
        self.remote = remote
        self._remote_writes_queued: deque[BlockKey] = deque()
        """Blocks made READABLE in host by ``complete_store``, to copy to the remote tier."""
        self._remote_known: OrderedDict[BlockKey, float] = OrderedDict()
        """Key -> when the remote tier was last seen holding it (a lookup found it, a read or
        a write of it succeeded; a failed read forgets it), oldest first. A block stored to
        host that the remote tier holds is not written again for ``remote_known_s``: a server
        that recomputed what Redis holds (its reads were skipped as slower than recompute)
        would otherwise send it all back, competing for the one Redis thread. (Redis may evict
        it meanwhile: then it is missing there until that time has passed and it is stored
        again.)"""
        self.remote_known_s = remote_known_s
        self.clock = clock
        self._counts: Counter[str] = Counter()
        self._host_evictions_seen = 0

    # -- lookups ---------------------------------------------------------------------------

    def lookup(self, keys: Sequence[BlockKey]) -> int:
        """How many of ``keys``, from the first, are READABLE in host memory (loadable now)."""
        return self.host.readable_prefix(keys)

    def contains(self, key: BlockKey, tier: Tier | None = None) -> bool:
        """Whether ``key`` is resident, in any state, in ``tier`` (None: in any tier)."""
        if tier is None:
            return key in self.index
        return self.index.get(key, tier) is not None

    def touch(self, keys: Iterable[BlockKey]) -> None:
        """Mark ``keys`` recently used in the host tier (e.g. hits vLLM served itself)."""
        for key in keys:
            self.host.touch(key)

    def protect(self, keys: Sequence[BlockKey]) -> None:
        """Queued or running requests will read ``keys``: policies that care evict them last.
        Reference counted; undo with one ``unprotect`` of the same keys."""
        self.host.policy.protect(keys)
        if self.disk is not None:
            self.disk.policy.protect(keys)

    def unprotect(self, keys: Sequence[BlockKey]) -> None:
        self.host.policy.unprotect(keys)
        if self.disk is not None:
            self.disk.policy.unprotect(keys)

    # -- host -> GPU -----------------------------------------------------------------------

    def prepare_load(self, keys: Sequence[BlockKey]) -> list[int]:
        """Pin the READABLE host copies of ``keys`` for a copy to GPU; returns their slots.
        Raises ``KeyError``, pinning nothing, if a key is not READABLE: call ``lookup`` first."""
        return self.host.begin_read(keys)

    def complete_load(self, keys: Sequence[BlockKey], ok: bool) -> None:
        """Unpin after the copy. Failed: the host copies are dropped once no other copy reads
        them (the bytes may be bad), and counted in ``failed_load_blocks``."""
        self.host.end_read(keys, drop=not ok)
        if not ok:
            self._counts["failed_load_blocks"] += len(keys)

    # -- GPU -> host -----------------------------------------------------------------------

    def prepare_store(self, key: BlockKey) -> int | None:
        """Reserve a host slot (WRITING) for ``key``, evicting the policy's best unpinned victim
        if the tier is full. None when every slot is pinned (counted: ``store_skipped_blocks``).
        ``key`` must not be in host already (``contains``)."""
        slot = self.host.begin_write(key)
        if slot is None:
            self._counts["store_skipped_blocks"] += 1
        return slot

    def complete_store(self, keys: Sequence[BlockKey], ok: bool) -> None:
        """The copies into the slots ``prepare_store`` gave finished. ok: READABLE, and queued
        for demotion to disk when there is a disk tier. Failed: the slots are freed."""
        for key in keys:
            self.host.end_write(key, ok=ok)
        if ok and self.disk is not None:
            self._demotions_queued.extend(keys)
        if ok and self.remote:
            for key in keys:
                if self._in_remote(key):
                    self._counts["remote_write_known_blocks"] += 1
                else:
                    self._remote_writes_queued.append(key)

    # -- disk -> host (promotion) ----------------------------------------------------------

    def prepare_promotions(self, keys: Sequence[BlockKey]) -> list[DiskTransfer]:
        """Disk -> host copies for the blocks of the prefix ``keys`` that host memory lacks.

        Walks ``keys`` in order: a key already in host (READABLE, or WRITING by a store or an
        earlier promotion) is skipped; the first key not READABLE on disk ends the walk (later
        blocks of a prefix are useless without it), as does a full host tier. Each returned
        transfer holds a WRITING host slot and a read-pinned disk slot until
        ``complete_promotion``. Empty unless the disk tier is ready.
        """
        if self.disk is None or not self.disk_ready:
            return []
        transfers = []
        for key in keys:
            if self.host.contains(key):
                continue
            if not self.index.is_readable(key, Tier.DISK):
                break
            host_slot = self.host.begin_write(key)
            if host_slot is None:
                break  # every host slot pinned
            (disk_slot,) = self.disk.begin_read([key])
            transfers.append(DiskTransfer(key, host_slot, disk_slot))
        return transfers

    def complete_promotion(self, key: BlockKey, ok: bool) -> None:
        """Unpin the disk copy; the host copy becomes READABLE. Failed (I/O error or a slot that
        failed verification): the disk copy is dropped and the host slot freed."""
        assert self.disk is not None
        self.disk.end_read([key], drop=not ok)
        self.host.end_write(key, ok=ok)
        self._counts["disk_promoted_blocks" if ok else "disk_read_failed_blocks"] += 1

    # -- host -> disk (demotion) -----------------------------------------------------------

    def prepare_demotions(self, limit: int) -> list[DiskTransfer]:
        """Host -> disk copies for the blocks ``complete_store`` queued, oldest first.

        Skips blocks already on disk or no longer READABLE in host. At most ``limit`` transfers
        (the caller's room for copies in flight): the rest of the queue is dropped and counted
        (``disk_write_skipped_blocks``), as is a block for which every disk slot is pinned.
        Each transfer holds a read-pinned host slot and a WRITING disk slot until
        ``complete_demotion``. While the disk tier is not ready the queue is dropped.
        """
        if self.disk is None or not self.disk_ready:
            self._demotions_queued.clear()
            return []
        transfers: list[DiskTransfer] = []
        queue = self._demotions_queued
        while queue:
            key = queue.popleft()
            if self.disk.contains(key) or not self.index.is_readable(key, Tier.HOST):
                continue
            if len(transfers) >= limit:
                self._counts["disk_write_skipped_blocks"] += 1 + len(queue)
                queue.clear()
                break
            disk_slot = self.disk.begin_write(key)
            if disk_slot is None:
                self._counts["disk_write_skipped_blocks"] += 1
                continue
            (host_slot,) = self.host.begin_read([key])
            transfers.append(DiskTransfer(key, host_slot, disk_slot))
        return transfers

    def complete_demotion(self, key: BlockKey, ok: bool) -> None:
        """Unpin the host copy (it stays READABLE either way); the disk copy becomes READABLE,
        or, failed (disk full, I/O error), its slot is freed."""
        assert self.disk is not None
        self.host.end_read([key])
        self.disk.end_write(key, ok=ok)
        self._counts["disk_written_blocks" if ok else "disk_write_failed_blocks"] += 1

    # -- remote tier ---------------------------------------------------------------------------

    def note_in_remote(self, keys: Iterable[BlockKey]) -> None:
        """The remote tier holds ``keys`` now (see ``_remote_known``)."""
        now = self.clock()
        known = self._remote_known
        for key in keys:
            known[key] = now
            known.move_to_end(key)
        while len(known) > self.REMOTE_KNOWN_MAX:
            known.popitem(last=False)

    def _in_remote(self, key: BlockKey) -> bool:
        seen = self._remote_known.get(key)
        return seen is not None and self.clock() - seen < self.remote_known_s

    def remote_candidates(self, keys: Sequence[BlockKey]) -> list[BlockKey]:
        """The keys of the prefix ``keys`` that neither host (any state) nor disk (READABLE)
        holds, in order: what to ask the remote tier for. Empty without a remote tier."""
        if not self.remote:
            return []
        return [key for key in keys
                if not self.host.contains(key) and not self.index.is_readable(key, Tier.DISK)]

    def prepare_remote_reads(self, keys: Sequence[BlockKey]) -> list[tuple[BlockKey, int]]:
        """(key, host slot WRITING) for each of ``keys`` (blocks the remote tier holds, in
        prefix order) that host memory lacks; a full host tier ends the walk. Each must be
        followed by one ``complete_remote_read``."""
        reads = []
        for key in keys:
            if self.host.contains(key):
                continue
            slot = self.host.begin_write(key)
            if slot is None:
                break  # every host slot pinned
            reads.append((key, slot))
        return reads

    def complete_remote_read(self, key: BlockKey, ok: bool, gone: bool = True) -> None:
        """The host copy becomes READABLE, or (a miss, a timeout, a value that failed its
        checks) its slot is freed. ``gone``: a failed read's server said the block is missing
        or corrupt (deleted); it is forgotten as being there, so its recompute is written
        back. A read that got no answer in time (``gone`` False) leaves what was known: the
        block is most likely still there, and writing it again would load Redis further."""
        self.host.end_write(key, ok=ok)
        self._counts["remote_hit_blocks" if ok else "remote_read_failed_blocks"] += 1
        if ok:
            self.note_in_remote((key,))
        elif gone:
            self._remote_known.pop(key, None)
        else:
            self._counts["remote_read_unanswered_blocks"] += 1

    def prepare_remote_writes(self, limit: int) -> list[tuple[BlockKey, int]]:
        """(key, host slot read-pinned) for up to ``limit`` of the blocks ``complete_store``
        queued, oldest first, still READABLE in host; the rest of the queue is dropped and
        counted (``remote_write_skipped_blocks``). Each must be followed by one
        ``complete_remote_write``."""
        writes: list[tuple[BlockKey, int]] = []
        queue = self._remote_writes_queued
        while queue:
            key = queue.popleft()
            if not self.index.is_readable(key, Tier.HOST):
                continue
            if len(writes) >= limit:
                self._counts["remote_write_skipped_blocks"] += 1 + len(queue)
                queue.clear()
                break
            (slot,) = self.host.begin_read([key])
            writes.append((key, slot))
        return writes

    def complete_remote_write(self, key: BlockKey, ok: bool) -> None:
        """Unpin the host copy (it stays READABLE either way)."""
        self.host.end_read([key])
        self._counts["remote_written_blocks" if ok else "remote_write_failed_blocks"] += 1
        if ok:
            self.note_in_remote((key,))

    # -- disk start-up and invalidation -------------------------------------------------

    def adopt_disk(self, found: Mapping[BlockKey, int]) -> int:
        """Take over the blocks every worker's start-up scan found (key -> disk slot, oldest
        first) as READABLE; the disk tier is ready from now on. Returns how many were adopted
        (also counted: ``disk_recovered_blocks``). Raises ``ValueError`` for a slot out of range
        or claimed twice (see ``DiskTier.adopt``)."""
        assert self.disk is not None and not self.disk_ready
        adopted = self.disk.adopt(found)
        self.disk_ready = True
        self._counts["disk_recovered_blocks"] += adopted
        return adopted

    def take_freed_disk_slots(self) -> list[int]:
        """Disk slots whose block was dropped since the last call: the workers must invalidate
        them (see ``DiskTier.take_freed_slots``). Empty until the disk tier is ready."""
        return self.disk.take_freed_slots() if self.disk is not None and self.disk_ready else []

    # -- eviction, work, counters -----------------------------------------------------------

    def evict(self, tier: Tier | None = None) -> int:
        """Drop every unpinned block of ``tier`` (None: both tiers); returns how many.
        Pinned blocks stay, and their copies complete normally."""
        tiers = [t for t in (self.host, self.disk) if t is not None and tier in (None, t.tier)]
        return sum(t.clear() for t in tiers)

    def has_pending_work(self) -> bool:
        """Blocks are queued for demotion or the remote tier (the engine must keep stepping to
        send them)."""
        return bool(self._demotions_queued) or bool(self._remote_writes_queued)

    def get_stats(self) -> Counter[str]:
        """Counts since the last call, by ``tokenvm:*`` counter name (zeros left out)."""
        evictions = self.host.evictions - self._host_evictions_seen
        self._host_evictions_seen = self.host.evictions
        if evictions:
            self._counts["host_evicted_blocks"] += evictions
        counts, self._counts = self._counts, Counter()
        return counts
