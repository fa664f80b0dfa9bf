"""How a host pool's pinning costs serving: lazily (paced or not) against eagerly (issue #13).

    python -m tokenvm_vllm.bench.host_pool_bench --gib 20

On a CUDA machine, with 2 MiB slots, for each lazy variant (``paced``: the default 32 MiB
chunks at 10% duty; ``unpaced``: 256 MiB chunks back to back, what the first serving run used):
the time to construct the pool (what start-up waits for), the time until the background thread
has pinned all of it, one copy to a slot far ahead of the thread (pinned on demand), and a
stand-in for the engine's step loop running meanwhile: a 4096^3 bf16 matmul plus a synchronize,
back to back, whose step times (p50, p99, max) are compared with the same loop on an idle
pool. A serving run stalled for the 9 s of unpaced pinning (``results/lazy_pinning_stall_h200``):
registering pinned memory holds up the process's GPU work, which the step times show and a
Python-only loop would not. Then the eager pool (``torch.empty(pin_memory=True)``, what start-up
waits for with ``pin_mode: eager``, 6.4 s for 20 GiB on the H200: mapped, then registered in 32
MiB chunks; ``--no-eager`` skips it) next to the single ``cudaHostAlloc`` eager pinning used
before (13.1 s; ``--cuda-host-alloc``). Prints one JSON line last.

    python -m tokenvm_vllm.bench.host_pool_bench --gib 20 --variants=, --cuda-host-alloc

``--register-variants`` (no pool, no step loop): registering ``--gib`` of anonymous memory in 32
MiB chunks, as the pool does, with 4 KiB pages faulted in by the registration itself (what the
pool did before 2026-12-01), faulted in first (``MADV_POPULATE_WRITE``, timed apart: it runs
outside CUDA's lock), on transparent huge pages (``MADV_HUGEPAGE``), and both (what the pool
does now): 0.336, 0.041, 0.223 and 0.022 s/GiB on the H200 host (4 GiB).

    python -m tokenvm_vllm.bench.host_pool_bench --gib 4 --register-variants --variants=, --no-eager
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from tokenvm_vllm.bench.stats import percentile
from tokenvm_vllm.transfer.host_pool import (
    BACKGROUND_DUTY,
    CHUNK_BYTES,
    EarlyRegistration,
    HostPool,
    _cuda_register,
    advise_huge_pages,
    populate,
)

SLOT_BYTES = 2 * 2**20
VARIANTS = {"paced": (CHUNK_BYTES, BACKGROUND_DUTY), "unpaced": (256 * 2**20, 1.0)}


def step_times(until: Any, seconds: float | None = None) -> list[float]:
    """Run matmul + synchronize steps until ``until()`` is true (or for ``seconds``); their
    durations in ms."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    times: list[float] = []
    stop = None if seconds is None else time.perf_counter() + seconds
    while not (until() if stop is None else time.perf_counter() >= stop):
        began = time.perf_counter()
        (a @ a).sum().item()
        times.append((time.perf_counter() - began) * 1000)
    return times


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"steps": len(ordered), "p50_ms": statistics.median(ordered),
            "p99_ms": percentile(ordered, 0.99),
            "max_ms": ordered[-1], "sum_ms": sum(ordered)}


def lazy_variant(slots: int, chunk_bytes: int, duty: float) -> dict[str, Any]:
    result: dict[str, Any] = {"chunk_bytes": chunk_bytes, "duty": duty}
    start = time.perf_counter()
    pool = HostPool(slots, SLOT_BYTES, pin=True, chunk_bytes=chunk_bytes, duty=duty)
    result["construct_s"] = time.perf_counter() - start
    assert pool.pinner is not None, "pinned eagerly: this GPU cannot use registered memory"
    gpu = torch.full((SLOT_BYTES,), 7, dtype=torch.uint8, device="cuda")
    copy_start = time.perf_counter()
    pool.ensure_pinned([slots - 1])  # far ahead of the background thread: pinned on demand
    pool.buffer[slots - 1].copy_(gpu, non_blocking=True)
    torch.cuda.synchronize()
    result["first_copy_far_ahead_s"] = time.perf_counter() - copy_start
    assert int(pool.buffer[slots - 1, :16].sum()) == 7 * 16
    result["steps_while_pinning"] = summary(step_times(pool.pinner.done.is_set))
    result["fully_pinned_s"] = time.perf_counter() - start
    result["chunks"] = pool.pinner.num_chunks
    result["error"] = pool.pinner.error or ""
    start = time.perf_counter()
    pool.close()
    result["unregister_s"] = time.perf_counter() - start
    return result


def eager_variant(slots: int) -> dict[str, Any]:
    """The eager pool (``lazy=False``): construction, mapping and registering every chunk, is
    what start-up waits for; then one copy into its last slot, and the time to unregister."""
    start = time.perf_counter()
    pool = HostPool(slots, SLOT_BYTES, pin=True, lazy=False)
    result: dict[str, Any] = {"construct_s": time.perf_counter() - start}
    assert pool.pinner is not None, "allocated by cudaHostAlloc: this GPU cannot use registered"
    assert pool.pinner.registered_chunks == pool.pinner.num_chunks
    gpu = torch.full((SLOT_BYTES,), 5, dtype=torch.uint8, device="cuda")
    pool.buffer[slots - 1].copy_(gpu, non_blocking=True)
    torch.cuda.synchronize()
    assert int(pool.buffer[slots - 1, :16].sum()) == 5 * 16
    start = time.perf_counter()
    pool.close()
    result["unregister_s"] = time.perf_counter() - start
    return result


def register_variant(nbytes: int, huge: bool, fault_in: bool) -> dict[str, Any]:
    """Register ``nbytes`` of fresh memory as an early registration does (the pool's mapping
    and ``LazyPinner``, ``CHUNK_BYTES`` chunks in order), with the driver call alone, not
    faulting chunks in itself; ``huge``: on huge pages; ``fault_in``: ``populate`` it all
    first (timed apart). Unregistered and unmapped after."""
    register, unregister = _cuda_register(None, fault_in=False)
    early = EarlyRegistration(nbytes, None, register=register, unregister=unregister,
                              huge_pages=huge)
    # (asked again, idempotent: the answer says whether THP took the advice)
    result: dict[str, Any] = {"huge_pages": huge and advise_huge_pages(early.memory)}
    start = time.perf_counter()
    result["populated"] = fault_in and populate(early.pinner.address, early.nbytes)
    result["populate_s"] = time.perf_counter() - start
    start = time.perf_counter()
    early.pinner.ensure(0, early.nbytes)
    result["register_s"] = time.perf_counter() - start
    result["s_per_gib"] = result["register_s"] / (early.nbytes / 2**30)
    early.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=20.0, help="pool size in GiB")
    parser.add_argument("--variants", default="paced,unpaced", help="lazy variants to run")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager pool")
    parser.add_argument("--cuda-host-alloc", action="store_true",
                        help="also one cudaHostAlloc of the pool's size (the old eager pinning)")
    parser.add_argument("--register-variants", action="store_true",
                        help="registration alone: 4 KiB or huge pages, faulted in first or not")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("host_pool_bench: needs a CUDA GPU")
    torch.zeros(1, device="cuda")  # CUDA's own start-up outside the timings
    torch.cuda.synchronize()
    slots = int(args.gib * 2**30) // SLOT_BYTES
    result: dict[str, Any] = {"gib": slots * SLOT_BYTES / 2**30, "slots": slots,
                              "steps_idle": summary(step_times(lambda: False, seconds=3.0))}
    for name in filter(None, args.variants.split(",")):
        chunk_bytes, duty = VARIANTS[name]
        result[name] = lazy_variant(slots, chunk_bytes, duty)
        print(name, json.dumps(result[name]), flush=True)
    if not args.no_eager:
        result["eager"] = eager_variant(slots)
        print("eager (registered in chunks)", json.dumps(result["eager"]), flush=True)
    if args.register_variants:
        nbytes = slots * SLOT_BYTES
        for huge in (False, True):
            for fault_in in (False, True):
                name = f"register{'_huge' if huge else ''}{'_populated' if fault_in else ''}"
                result[name] = register_variant(nbytes, huge, fault_in)
                print(name, json.dumps(result[name]), flush=True)
    if args.cuda_host_alloc:
        start = time.perf_counter()
        pinned = torch.empty((slots, SLOT_BYTES), dtype=torch.uint8, pin_memory=True)
        result["cuda_host_alloc_s"] = time.perf_counter() - start
        del pinned
        print(f"cudaHostAlloc {result['cuda_host_alloc_s']:.2f} s", flush=True)
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "w") as out:
            json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()
