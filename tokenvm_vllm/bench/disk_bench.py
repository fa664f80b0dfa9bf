"""Disk-tier restore bandwidth against the raw O_DIRECT read bandwidth of the same disk.

Writes ``--gib`` of 2 MiB blocks (a Llama-3.1-8B block of 16 tokens) through ``DiskStore``, then,
in the same run on the same files: reads them all back through ``DiskStore`` (header and checksum
verified, every read in flight at once, ``--threads`` I/O threads), and reads the same files raw
with O_DIRECT in 2 MiB requests on the same number of threads. Prints both and the ratio.

    python -m tokenvm_vllm.bench.disk_bench --path /mnt/nvme/tokenvm-bench [--gib 4]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tokenvm_vllm.tiers.disk import DiskStore

BLOCK = 2 * 2**20


def raw_read_gbps(paths: list[Path], threads: int, o_direct: bool) -> float:
    """Read every file in BLOCK-sized aligned requests on ``threads`` threads; GB/s."""
    jobs = []
    for path in paths:
        size = path.stat().st_size
        jobs += [(path, offset) for offset in range(0, size - size % BLOCK, BLOCK)]
    flags = os.O_RDONLY | (os.O_DIRECT if o_direct else 0)
    fds = {path: os.open(path, flags) for path in paths}
    buffers = [mmap.mmap(-1, BLOCK) for _ in range(threads)]

    def read(i: int) -> int:
        buf = memoryview(buffers[i % threads])
        total = 0
        for path, offset in jobs[i::threads]:
            total += os.preadv(fds[path], [buf], offset)
        return total

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, range(threads)))
    seconds = time.perf_counter() - start
    for fd in fds.values():
        os.close(fd)
    return total / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True, help="directory on the disk to measure")
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--out", default="", help="write results JSON here")
    args = parser.parse_args()
    path = Path(args.path)
    shutil.rmtree(path, ignore_errors=True)
    store = DiskStore(str(path), int(args.gib * 2**30), BLOCK, b"disk-bench-ns-16",
                      io_threads=args.threads)
    n = store.num_slots
    payload = np.random.default_rng(0).integers(0, 256, BLOCK, dtype=np.uint8)
    print(f"writing {n} blocks of 2 MiB ({n * BLOCK / 2**30:.1f} GiB) ...", flush=True)
    start = time.perf_counter()
    futures = [store.write(slot, slot.to_bytes(8, "big"), payload) for slot in range(n)]
    assert all(f.result() for f in futures)
    write_gbps = n * BLOCK / (time.perf_counter() - start) / 1e9
    out = np.empty((args.threads * 4, BLOCK), dtype=np.uint8)
    print("restoring through DiskStore ...", flush=True)
    start = time.perf_counter()
    futures = [store.read(slot, slot.to_bytes(8, "big"), out[slot % len(out)])
               for slot in range(n)]
    ok = sum(f.result() for f in futures)
    restore_gbps = n * BLOCK / (time.perf_counter() - start) / 1e9
    o_direct = store.o_direct
    store.close()
    assert ok == n, f"{n - ok} blocks failed verification"
    files = sorted(path.glob("slots-*.bin"))
    print("raw reads of the same files ...", flush=True)
    raw_gbps = raw_read_gbps(files, args.threads, o_direct)
    result = {"blocks": n, "o_direct": o_direct, "threads": args.threads,
              "write_GBps": write_gbps, "restore_GBps": restore_gbps, "raw_read_GBps": raw_gbps,
              "restore_vs_raw": restore_gbps / raw_gbps}
    print(json.dumps(result))
    print(f"\n{'':24}{'GB/s':>8}\n{'DiskStore write':24}{write_gbps:8.2f}\n"
          f"{'DiskStore restore':24}{restore_gbps:8.2f}\n"
          f"{'raw O_DIRECT read' if o_direct else 'raw buffered read':24}{raw_gbps:8.2f}\n"
          f"{'restore / raw':24}{restore_gbps / raw_gbps:8.1%}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
