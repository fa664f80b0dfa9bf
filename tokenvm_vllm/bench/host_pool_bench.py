"""How long a host pool keeps start-up waiting: lazily pinned against eagerly pinned (issue #13).

    python -m tokenvm_vllm.bench.host_pool_bench --gib 20

Measures, on a CUDA machine, with 2 MiB slots: the time to construct a lazily pinned pool (what
start-up waits for now), the time until its background thread has pinned all of it, the longest
stall of the main thread while that thread pins (the register call releases the GIL, so a step
loop keeps running), one copy to a slot far ahead of the thread (pinned on demand), the time to
unregister it, and the time to construct an eagerly pinned pool of the same size
(``torch.empty(pin_memory=True)``, what start-up waited for before). Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tokenvm_vllm.transfer.host_pool import HostPool

SLOT_BYTES = 2 * 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=20.0, help="pool size in GiB")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager pool")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("host_pool_bench: needs a CUDA GPU")
    torch.zeros(1, device="cuda")  # CUDA's own start-up outside the timings
    torch.cuda.synchronize()
    slots = int(args.gib * 2**30) // SLOT_BYTES
    result: dict[str, float | int | str] = {"gib": slots * SLOT_BYTES / 2**30, "slots": slots}

    start = time.perf_counter()
    pool = HostPool(slots, SLOT_BYTES, pin=True)
    result["lazy_construct_s"] = time.perf_counter() - start
    assert pool.pinner is not None, "pinned eagerly: this GPU cannot use registered memory"
    # A copy to the last slot, far ahead of the background thread: pinned on demand.
    gpu = torch.full((SLOT_BYTES,), 7, dtype=torch.uint8, device="cuda")
    copy_start = time.perf_counter()
    pool.ensure_pinned([slots - 1])
    pool.buffer[slots - 1].copy_(gpu, non_blocking=True)
    torch.cuda.synchronize()
    result["first_copy_far_ahead_s"] = time.perf_counter() - copy_start
    assert int(pool.buffer[slots - 1, :16].sum()) == 7 * 16
    # A stand-in for the engine's step loop: how long can the main thread be kept waiting?
    longest = 0.0
    last = time.perf_counter()
    while not pool.pinner.done.is_set():
        time.sleep(0.001)
        now = time.perf_counter()
        longest = max(longest, now - last)
        last = now
    result["fully_pinned_s"] = time.perf_counter() - start
    result["pinner_pinned_seconds"] = pool.pinner.pinned_seconds or -1.0
    result["main_thread_longest_stall_ms"] = longest * 1000
    result["chunks"] = pool.pinner.num_chunks
    result["on_demand_chunks"] = pool.pinner.on_demand_chunks
    result["error"] = pool.pinner.error or ""
    start = time.perf_counter()
    pool.close()
    result["unregister_s"] = time.perf_counter() - start
    del pool

    if not args.no_eager:
        start = time.perf_counter()
        eager = torch.empty((slots, SLOT_BYTES), dtype=torch.uint8, pin_memory=True)
        result["eager_construct_s"] = time.perf_counter() - start
        del eager
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
