"""Eviction policies: which unpinned block a full tier gives up first.

Pure Python with no heavy imports: ``tokenvm_vllm.config`` imports ``POLICIES`` to validate the
``policy`` setting. ``simulator`` compares the policies on synthetic traces.
"""

from tokenvm_vllm.policies.arc import ARCPolicy
from tokenvm_vllm.policies.base import EvictionPolicy
from tokenvm_vllm.policies.lru import LRUPolicy
from tokenvm_vllm.policies.queue_aware import QueueAwarePolicy
from tokenvm_vllm.policies.two_q import TwoQPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {
    "lru": LRUPolicy,
    "2q": TwoQPolicy,
    "arc": ARCPolicy,
    "queue_aware": QueueAwarePolicy,
}


def make_policy(name: str) -> EvictionPolicy:
    """Build the policy called ``name`` (a key of ``POLICIES``) with its default arguments."""
    try:
        return POLICIES[name]()
    except KeyError:
        valid = ", ".join(POLICIES)
        raise ValueError(f"tokenvm: unknown policy {name!r}; valid: {valid}") from None


__all__ = [
    "POLICIES",
    "ARCPolicy",
    "EvictionPolicy",
    "LRUPolicy",
    "QueueAwarePolicy",
    "TwoQPolicy",
    "make_policy",
]
