"""``tokenvm inspect PATH``: summarise a disk-tier store directory, read-only.

PATH is one store or the configured ``disk_path`` (then every ``rank-<r>`` store in it).

Never writes to the store and works while an engine is using it (``tiers/disk/inspect.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict
from typing import Any

from tokenvm_vllm.cli import human_size as _size
from tokenvm_vllm.tiers.disk.format import SLOT_FILE
from tokenvm_vllm.tiers.disk.fsutil import DiskStoreError
from tokenvm_vllm.tiers.disk.inspect import StoreSummary, inspect_store

RANK_DIR = re.compile(r"^rank-(\d+)$")


def store_dirs(path: str) -> list[str]:
    """The store directories ``path`` names: itself when it holds slot files, else its
    ``rank-<r>`` subdirectories (the configured ``disk_path``), in rank order; else itself (so
    the error names it)."""
    try:
        names = os.listdir(path)
    except OSError:
        return [path]
    if any(SLOT_FILE.match(name) for name in names):
        return [path]
    ranks = sorted((int(m.group(1)), name) for name in names
                   if (m := RANK_DIR.match(name)) and os.path.isdir(os.path.join(path, name)))
    return [os.path.join(path, name) for _rank, name in ranks] or [path]


def cmd_inspect(args: argparse.Namespace) -> int:
    """Summarise a store, or every rank's store under a configured ``disk_path``; 1 (with a
    one-line error on stderr) if PATH holds no store. A ``redis://`` or ``rediss://`` PATH is
    a remote store: ``tokenvm remote-inspect`` does the work."""
    if args.path.startswith(("redis://", "rediss://")):
        from tokenvm_vllm.cli.remote import cmd_remote_inspect

        if args.verify:
            print("tokenvm inspect: error: --verify reads disk slots; a remote store's values "
                  "are checked when a server reads them", file=sys.stderr)
            return 1
        return cmd_remote_inspect(argparse.Namespace(url=args.path, prefix=args.prefix,
                                                     limit=args.limit, json=args.json))
    dirs = store_dirs(args.path)
    summaries = []
    for directory in dirs:
        try:
            summaries.append(inspect_store(directory, verify_payloads=args.verify))
        except (DiskStoreError, OSError) as exc:
            print(f"tokenvm inspect: error: {exc}", file=sys.stderr)
            return 1
    if args.json:
        if len(dirs) == 1 and os.path.abspath(dirs[0]) == os.path.abspath(args.path):
            print(json.dumps(_json(summaries[0]), indent=2))
        else:
            print(json.dumps({"ranks": {os.path.basename(d): _json(summary) for d, summary
                                        in zip(dirs, summaries, strict=True)}}, indent=2))
        return 0
    for index, summary in enumerate(summaries):
        if index:
            print()
        _print_summary(summary)
    return 0


def _json(summary: StoreSummary) -> dict[str, Any]:
    data = asdict(summary)
    data["blocks_by_namespace"] = {ns.hex(): n for ns, n in summary.blocks_by_namespace.items()}
    data["files"] = [{"name": n, "bytes": b} for n, b in summary.files]
    return data


def _print_summary(summary: StoreSummary) -> None:
    slot_bytes = summary.slot_bytes or 0
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
