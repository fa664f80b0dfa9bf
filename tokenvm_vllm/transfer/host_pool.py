"""The host pool: the bytes of the host tier, in the worker process.

One ``uint8`` tensor of ``num_slots x slot_bytes``, allocated once at start-up: pinned (page-locked)
on CUDA so copies are asynchronous DMA, plain memory on the CPU platform. Which slot holds which
block is decided by the scheduler (``tokenvm_vllm/tiers/host_tier.py``).
"""

from __future__ import annotations

import logging
import time

import torch

logger = logging.getLogger("vllm.tokenvm")


def num_host_slots(host_bytes: int, slot_bytes: int) -> int:
    """How many whole slots ``host_bytes`` holds; at least one is required."""
    slots = host_bytes // slot_bytes
    if slots < 1:
        raise ValueError(
            f"tokenvm: host_bytes={host_bytes} is smaller than one block of all layers "
            f"({slot_bytes} bytes)")
    return slots


class HostPool:
    """``num_slots`` slots of ``slot_bytes`` each."""

    def __init__(self, num_slots: int, slot_bytes: int, pin: bool) -> None:
        start = time.perf_counter()
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.pinned = pin
        self.buffer = torch.empty((num_slots, slot_bytes), dtype=torch.uint8, pin_memory=pin)
        self.alloc_seconds = time.perf_counter() - start
        logger.info(
            "TokenVM host pool: %d slots x %d bytes = %.2f GiB (%s) allocated in %.2f s",
            num_slots, slot_bytes, num_slots * slot_bytes / 2**30,
            "pinned" if pin else "pageable", self.alloc_seconds)
