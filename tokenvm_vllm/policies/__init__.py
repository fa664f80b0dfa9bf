"""Eviction policies: which unpinned block a full tier gives up first."""

from tokenvm_vllm.policies.base import EvictionPolicy
from tokenvm_vllm.policies.lru import LRUPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    """Build the policy called ``name`` (a key of ``POLICIES``)."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"tokenvm: unknown policy {name!r}; valid: {', '.join(POLICIES)}") from None


__all__ = ["POLICIES", "EvictionPolicy", "LRUPolicy", "make_policy"]
