"""Eviction policies: the shared contract, then each policy's own ordering rules."""

from __future__ import annotations

import random
from collections.abc import Hashable

import pytest

from tokenvm_vllm.config import TokenVMConfigError, load_config
from tokenvm_vllm.policies import (
    POLICIES,
    ARCPolicy,
    EvictionPolicy,
    LRUPolicy,
    QueueAwarePolicy,
    TwoQPolicy,
    make_policy,
)
from tokenvm_vllm.policies.simulator import simulate

NAMES = sorted(POLICIES)


def order(policy: EvictionPolicy) -> list[Hashable]:
    return list(policy.candidates())


# -- registry and config ---------------------------------------------------------------------


def test_registry_names() -> None:
    assert set(POLICIES) == {"lru", "2q", "arc", "queue_aware"}
    assert POLICIES["2q"] is TwoQPolicy
    assert POLICIES["arc"] is ARCPolicy
    assert POLICIES["queue_aware"] is QueueAwarePolicy


@pytest.mark.parametrize("name", NAMES)
def test_make_policy_and_config_accept_every_name(name: str) -> None:
    first, second = make_policy(name), make_policy(name)
    assert type(first) is POLICIES[name]
    assert first is not second  # each tier gets its own policy: sharing one mixes their keys
    assert load_config({"policy": name}, environ={}).policy == name


def test_config_rejects_a_name_outside_the_registry_and_lists_the_registry() -> None:
    """Config validation follows the registry: checked through ``load_config``'s behaviour, not
    by comparing the config's choice table with the expression it was built from."""
    with pytest.raises(TokenVMConfigError, match="policy='mru'") as info:
        load_config({"policy": "mru"}, environ={})
    message = str(info.value)
    assert "\n" not in message
    assert all(name in message for name in POLICIES), message


def test_make_policy_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown policy 'mru'.*lru"):
        make_policy("mru")


# -- contract, for every policy --------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_insert_then_candidates_contains_it(name: str) -> None:
    policy = make_policy(name)
    assert order(policy) == [] and len(policy) == 0
    policy.insert(b"a")
    assert order(policy) == [b"a"] and len(policy) == 1
    policy.insert(b"b")
    assert sorted(order(policy)) == [b"a", b"b"] and len(policy) == 2


@pytest.mark.parametrize("name", NAMES)
def test_insert_of_resident_key_counts_once(name: str) -> None:
    policy = make_policy(name)
    policy.insert(b"a")
    policy.insert(b"a")
    assert order(policy) == [b"a"] and len(policy) == 1


@pytest.mark.parametrize("name", NAMES)
def test_remove_forgets_key(name: str) -> None:
    policy = make_policy(name)
    for key in (b"a", b"b", b"c"):
        policy.insert(key)
    policy.remove(b"b")
    assert sorted(order(policy)) == [b"a", b"c"] and len(policy) == 2
    policy.remove(b"b")  # twice: harmless
    policy.remove(b"never-seen")
    policy.touch(b"b")  # a touch must not resurrect it (ARC and 2Q keep it as a ghost)
    assert sorted(order(policy)) == [b"a", b"c"] and len(policy) == 2


@pytest.mark.parametrize("name", NAMES)
def test_touch_of_unknown_key_is_harmless(name: str) -> None:
    policy = make_policy(name)
    policy.touch(b"x")
    assert order(policy) == [] and len(policy) == 0
    policy.insert(b"a")
    policy.touch(b"x")
    assert order(policy) == [b"a"] and len(policy) == 1


@pytest.mark.parametrize("name", NAMES)
def test_first_candidate_after_each_removal_drains_every_key(name: str) -> None:
    """How a tier evicts: take the first candidate, remove it, ask again (``candidates`` is lazy
    and valid only until the policy changes)."""
    policy = make_policy(name)
    keys = [bytes([i]) for i in range(10)]
    for key in keys:
        policy.insert(key)
    seen = []
    while len(policy):
        key = next(policy.candidates())
        seen.append(key)
        policy.remove(key)
    assert sorted(seen) == keys and list(policy.candidates()) == []


def test_queue_aware_first_victim_skips_protected_keys_without_walking_them() -> None:
    """Protected keys sit in their own order: the first candidate is the oldest unprotected key
    however many older keys are protected; unprotecting makes a key most recently used."""
    policy = make_policy("queue_aware")
    keys = [bytes([i]) for i in range(100)]
    for key in keys:
        policy.insert(key)
    policy.protect(keys[:99])
    assert next(policy.candidates()) == keys[99]
    assert list(policy.candidates()) == [keys[99], *keys[:99]]
    policy.unprotect([keys[0]])
    assert list(policy.candidates())[:2] == [keys[99], keys[0]]
    policy.unprotect(keys[1:99])
    assert len(policy) == 100 and sorted(policy.candidates()) == keys


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations_keep_candidates_equal_to_residents(name: str, seed: int) -> None:
    """Model check: a tier-like driver with random hits, drops, evictions and protect calls."""
    rng = random.Random(seed)
    policy = make_policy(name)
    resident: set[bytes] = set()
    protected: list[list[bytes]] = []
    capacity = 12
    for step in range(3000):
        key = b"k%d" % rng.randrange(40)  # small key space: ghosts get re-inserted often
        op = rng.random()
        if op < 0.45:
            if key in resident:
                policy.touch(key)
            else:
                if len(resident) >= capacity:
                    # Like a tier that skips a pinned key: take the second candidate at times.
                    victims = order(policy)
                    victim = victims[1] if rng.random() < 0.2 else victims[0]
                    policy.remove(victim)
                    resident.remove(victim)
                policy.insert(key)
                resident.add(key)
        elif op < 0.6:
            policy.touch(key)  # resident or not
        elif op < 0.7:
            policy.remove(key)  # resident or not
            resident.discard(key)
        elif op < 0.85:
            batch = [b"k%d" % rng.randrange(40) for _ in range(rng.randint(1, 4))]
            policy.protect(batch)
            protected.append(batch)
        elif protected:
            policy.unprotect(protected.pop(rng.randrange(len(protected))))
        got = order(policy)
        assert len(got) == len(set(got)), f"step {step}: duplicate candidates {got}"
        assert set(got) == resident, f"step {step}"
        assert len(policy) == len(resident)


@pytest.mark.parametrize("cls", [TwoQPolicy, ARCPolicy])
@pytest.mark.parametrize("capacity", [4, 16, 50])
def test_adaptive_capacity_matches_given_capacity(
    cls: type[TwoQPolicy] | type[ARCPolicy], capacity: int
) -> None:
    """The docstring's claim: learning the capacity from the resident high-water mark behaves
    exactly like being told it, for a tier that only evicts when full."""
    rng = random.Random(capacity)
    trace = [rng.randrange(3 * capacity) for _ in range(4000)]
    adaptive, told = cls(), cls(capacity=capacity)
    assert simulate(adaptive, trace, capacity) == simulate(told, trace, capacity)
    assert adaptive.capacity == capacity
    assert order(adaptive) == order(told)


# -- LRU -------------------------------------------------------------------------------------


def test_lru_order() -> None:
    policy = LRUPolicy()
    for key in (b"a", b"b", b"c"):
        policy.insert(key)
    policy.touch(b"a")
    assert order(policy) == [b"b", b"c", b"a"]
    policy.insert(b"d")
    policy.touch(b"c")
    assert order(policy) == [b"b", b"a", b"d", b"c"]
    policy.remove(b"a")
    assert order(policy) == [b"b", b"d", b"c"]


# -- 2Q --------------------------------------------------------------------------------------

SCAN = [b"s%d" % i for i in range(50)]


def test_2q_keeps_rereferenced_key_through_a_scan() -> None:
    # h is hit once (promoted to Am), then 50 one-time keys stream through 4 slots.
    trace = [b"h", b"x", b"h", *SCAN, b"h"]
    two_q = TwoQPolicy()
    result = simulate(two_q, trace, capacity=4)
    assert result.hits == 2  # both re-reads of h
    assert order(two_q)[-1] == b"h"  # the one Am key goes after every A1in key
    assert simulate(LRUPolicy(), trace, capacity=4).hits == 1  # LRU loses h to the scan


def test_2q_remembers_keys_evicted_from_a1in() -> None:
    # h is pushed out of A1in by s0..s3 before any re-read; its return (a miss) finds it in
    # A1out, so it goes to Am and survives the following scan.
    trace = [b"h", *SCAN[:4], b"h", *SCAN[4:], b"h"]
    result = simulate(TwoQPolicy(), trace, capacity=4)
    assert result.hits == 1  # the last h
    # With A1out holding one key, s0's eviction (just before h returns) pushes h's ghost out.
    assert simulate(TwoQPolicy(kout=0.01), trace, capacity=4).hits == 0
    assert simulate(LRUPolicy(), trace, capacity=4).hits == 0


def test_2q_a1in_goes_first_only_while_over_its_share() -> None:
    policy = TwoQPolicy(capacity=8)  # kin = 0.25 -> A1in's share is 2 keys
    for key in (b"a", b"b", b"c"):
        policy.insert(key)
    policy.touch(b"a")  # a -> Am; A1in = [b, c], not over its share
    assert order(policy) == [b"a", b"b", b"c"]
    policy.insert(b"d")  # A1in = [b, c, d]: over its share, FIFO first
    assert order(policy) == [b"b", b"c", b"d", b"a"]


# -- ARC -------------------------------------------------------------------------------------


def test_arc_beats_lru_when_frequent_keys_meet_a_scan() -> None:
    # a and b are used twice (T2); the scan then only cycles through T1 since p stays 0.
    trace = [b"a", b"b", b"a", b"b", *SCAN[:6], b"a", b"b"]
    assert simulate(ARCPolicy(), trace, capacity=4).hits == 4
    assert simulate(LRUPolicy(), trace, capacity=4).hits == 2


def test_arc_target_adapts_to_ghost_hits() -> None:
    arc = ARCPolicy()
    assert simulate(arc, [b"a", b"a", b"b", b"c"], capacity=2).hits == 1
    # T2 = [a], T1 = [c], B1 = [b]; p = 0, so T1 goes first.
    assert arc.p == 0 and order(arc) == [b"c", b"a"]
    arc.remove(b"c")  # the tier evicts c (-> B1) to make room for b
    arc.insert(b"b")  # ghost hit in B1: "T1 was too small"
    assert arc.p == 1
    assert order(arc) == [b"a", b"b"]  # both in T2 now
    arc.remove(b"a")  # -> B2
    arc.insert(b"d")  # T1 = [d], T2 = [b]
    # |T1| = 1 is not above p = 1: the recency side is now protected, T2 goes first.
    assert order(arc) == [b"b", b"d"]
    arc.remove(b"b")  # -> B2
    arc.insert(b"a")  # ghost hit in B2: "T2 was too small"
    assert arc.p == 0
    assert order(arc)[0] == b"d"  # T1 goes first again


def test_arc_ghost_lists_stay_bounded() -> None:
    rng = random.Random(0)
    arc, capacity = ARCPolicy(), 8
    resident: set[int] = set()
    ghost_seen = False
    for _ in range(5000):
        key = rng.randrange(40)
        if key in resident:
            arc.touch(key)
            continue
        if len(resident) == capacity:
            victim = order(arc)[0]
            arc.remove(victim)
            resident.remove(victim)
        arc.insert(key)
        resident.add(key)
        t1, t2, b1, b2 = len(arc._t1), len(arc._t2), len(arc._b1), len(arc._b2)
        assert t1 + b1 <= capacity and t1 + t2 + b1 + b2 <= 2 * capacity
        assert 0 <= arc.p <= capacity
        ghost_seen = ghost_seen or b2 > 0
    assert ghost_seen  # the bound was exercised on both ghost lists


# -- queue-aware -----------------------------------------------------------------------------


def test_queue_aware_puts_protected_keys_last() -> None:
    policy = QueueAwarePolicy()
    for key in (b"a", b"b", b"c", b"d"):
        policy.insert(key)
    policy.protect([b"a", b"c"])
    assert order(policy) == [b"b", b"d", b"a", b"c"]  # both groups in LRU order
    policy.touch(b"a")
    assert order(policy) == [b"b", b"d", b"c", b"a"]
    policy.protect([b"b", b"d"])  # everything protected: still evictable; protecting is a use
    assert order(policy) == [b"c", b"a", b"b", b"d"]


def test_queue_aware_reference_counts() -> None:
    policy = QueueAwarePolicy()
    for key in (b"a", b"b", b"c"):
        policy.insert(key)
    policy.protect([b"a"])
    policy.protect([b"a", b"b"])
    policy.unprotect([b"a"])
    assert order(policy) == [b"c", b"a", b"b"]  # a still holds one reference
    policy.unprotect([b"a", b"b"])  # back among the unprotected, as just used
    assert order(policy) == [b"c", b"a", b"b"]
    policy.unprotect([b"a"])  # unmatched: ignored, must not go negative
    policy.protect([b"a"])
    assert order(policy) == [b"c", b"b", b"a"]
    policy.unprotect([b"a"])
    policy.protect([b"b", b"b"])  # a key listed twice needs two unprotects
    policy.unprotect([b"b"])
    assert policy.is_protected(b"b") and order(policy) == [b"c", b"a", b"b"]
    policy.unprotect([b"b"])
    assert not policy.is_protected(b"b") and order(policy) == [b"c", b"a", b"b"]
    assert not policy.is_protected(b"a") and not policy.is_protected(b"c")


def test_queue_aware_protection_outlives_residency() -> None:
    policy = QueueAwarePolicy()
    policy.protect([b"x"])  # a queued request needs x before it is stored
    policy.insert(b"x")
    policy.insert(b"y")
    assert order(policy) == [b"y", b"x"]
    policy.remove(b"x")
    policy.insert(b"x")
    policy.insert(b"z")
    assert order(policy) == [b"y", b"z", b"x"]


def test_queue_aware_tier_takes_unprotected_victim() -> None:
    policy = QueueAwarePolicy()
    policy.protect([b"a"])
    # a is the oldest, so LRU would evict it at c; the queue-aware policy takes b instead.
    result = simulate(policy, [b"a", b"b", b"c", b"a"], capacity=2)
    assert result.hits == 1
    assert simulate(LRUPolicy(), [b"a", b"b", b"c", b"a"], capacity=2).hits == 0


@pytest.mark.parametrize("name", ["lru", "2q", "arc"])
def test_other_policies_ignore_protection(name: str) -> None:
    policy, reference = make_policy(name), make_policy(name)
    for key in (b"a", b"b", b"c"):
        policy.insert(key)
        reference.insert(key)
    policy.protect([b"a", b"b"])
    assert order(policy) == order(reference)
    policy.unprotect([b"a", b"b", b"a"])
    assert order(policy) == order(reference)
