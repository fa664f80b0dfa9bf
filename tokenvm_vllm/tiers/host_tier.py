"""Scheduler-side bookkeeping of the host-RAM tier: a fixed number of block slots.

The bytes live in the worker's ``HostPool`` (``tokenvm_vllm/transfer/host_pool.py``); this tier
decides which slot holds which block and which block to evict (all in ``SlotTier``). Every
worker's pool has the same number of slots, so one slot number names the same place on every
tensor-parallel rank.
"""

from __future__ import annotations

from tokenvm_vllm.tiers.residency import Tier
from tokenvm_vllm.tiers.slot_tier import SlotTier


class HostTier(SlotTier):
    """Slot allocation, pinning and eviction for ``num_slots`` host slots."""

    tier = Tier.HOST
