"""``tokenvm inspect PATH``: summarise a disk-tier store directory, read-only.

Never writes to the store and works while an engine is using it (``tiers/disk/inspect.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from tokenvm_vllm.cli import human_size as _size
from tokenvm_vllm.tiers.disk.fsutil import DiskStoreError
from tokenvm_vllm.tiers.disk.inspect import inspect_store


def cmd_inspect(args: argparse.Namespace) -> int:
    """Summarise a disk store; 1 (with a one-line error on stderr) if PATH is not a store."""
    try:
        summary = inspect_store(args.path, verify_payloads=args.verify)
    except (DiskStoreError, OSError) as exc:
        print(f"tokenvm inspect: error: {exc}", file=sys.stderr)
        return 1
    slot_bytes = summary.slot_bytes or 0
    if args.json:
        data = asdict(summary)
        data["blocks_by_namespace"] = {ns.hex(): n for ns, n in
                                       summary.blocks_by_namespace.items()}
        data["files"] = [{"name": n, "bytes": b} for n, b in summary.files]
        print(json.dumps(data, indent=2))
        return 0
    lock = (f"in use by pid {summary.locked_by_pid}" if summary.locked_by_pid is not None
            else "not locked by a running engine")
    rows = [
        ("store", f"{summary.path} ({lock})"),
        ("files", f"{len(summary.files)} x slots-N.bin, {_size(summary.file_bytes)} "
                  f"({_size(summary.allocated_bytes)} allocated on disk)"),
    ]
    if summary.slot_stride is None:
        rows.append(("slots", "layout unknown: no valid slot header (an empty store)"))
    else:
        share = summary.used_slots / summary.num_slots if summary.num_slots else 0.0
        rows += [
            ("slots", f"{summary.num_slots} slots of {slot_bytes} bytes payload "
                      f"(stride {summary.slot_stride} with the 4 KiB header)"),
            ("used slots", f"{summary.used_slots} of {summary.num_slots} ({share:.1%}), "
                           f"{_size(summary.used_slots * slot_bytes)} of KV data"),
        ]
    for namespace, blocks in sorted(summary.blocks_by_namespace.items(), key=lambda kv: -kv[1]):
        rows.append(("namespace", f"{namespace.hex()}  {blocks} blocks, "
                                  f"{_size(blocks * slot_bytes)}"))
    if summary.checksums:
        rows.append(("checksums", ", ".join(f"{k}: {v}" for k, v in summary.checksums.items())))
    rows.append(("ignored", f"{summary.duplicate_slots} duplicate slots, {summary.stale_headers} "
                            f"headers of an earlier layout, {summary.unverifiable_headers} with "
                            f"an unavailable checksum"))
    if summary.bad_payloads is not None:
        rows.append(("payloads", f"{summary.bad_payloads} of {summary.used_slots} failed their "
                                 f"checksum"))
    rows.append(("filesystem", f"{_size(summary.fs_free_bytes)} free of "
                               f"{_size(summary.fs_total_bytes)}"))
    for name, text in rows:
        print(f"{name:<12} {text}")
    return 0
