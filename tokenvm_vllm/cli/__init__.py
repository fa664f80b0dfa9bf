"""``tokenvm``: command-line tools for TokenVM.

    tokenvm doctor [--disk-path P]   check this machine and the TokenVM settings (cli/doctor.py)
    tokenvm inspect PATH [--json]    summarise disk_path (each rank) or one store, read-only
    tokenvm bench [--model DIR] ...  prefix-reuse benchmark without and with TokenVM (bench.py)
    tokenvm faults [--cycles 20]     fault-injection suite on the real engine (faults.py)
    tokenvm remote-inspect URL       what a Redis holds for TokenVM, per namespace (remote.py)
    tokenvm remote-bench URL         remote tier throughput next to redis-benchmark (remote.py)

Importing this package is light: torch, vLLM and matplotlib are imported by the commands that need
them, so ``tokenvm inspect`` starts fast and ``tokenvm doctor`` can report a broken install.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

GIB = 2**30
MIB = 2**20


def human_size(n: float) -> str:
    """Human-readable bytes: '512.0 MiB', '4.00 GiB'."""
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{int(n)} B"


def build_parser() -> argparse.ArgumentParser:
    # The command modules are imported here, not at the top: they import this package's helpers.
    from tokenvm_vllm.cli.bench import cmd_bench
    from tokenvm_vllm.cli.doctor import cmd_doctor
    from tokenvm_vllm.cli.faults import cmd_faults
    from tokenvm_vllm.cli.inspect import cmd_inspect
    from tokenvm_vllm.cli.remote import cmd_remote_bench, cmd_remote_inspect

    parser = argparse.ArgumentParser(prog="tokenvm", description="TokenVM tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    doctor = sub.add_parser("doctor", help="check the machine and the TokenVM settings")
    doctor.add_argument("--disk-path", help="also check this directory for a disk tier")
    doctor.set_defaults(func=cmd_doctor)

    inspect = sub.add_parser("inspect", help="summarise a disk store directory or, given a "
                                             "redis:// URL, a remote store (read-only)")
    inspect.add_argument("path", help="a store directory, the configured disk_path (every "
                                      "rank-<r> store in it), or a remote_url (redis:// or "
                                      "rediss://: as remote-inspect)")
    inspect.add_argument("--verify", action="store_true",
                         help="also read every used slot's payload and check its checksum")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.add_argument("--prefix", default="tokenvm",
                         help="a remote_url's remote_key_prefix (tokenvm)")
    inspect.add_argument("--limit", type=int, default=100_000,
                         help="a remote_url's keys to look at (100000)")
    inspect.set_defaults(func=cmd_inspect)

    bench = sub.add_parser("bench", help="prefix-reuse benchmark without and with TokenVM")
    bench.add_argument("--model", help="model directory (default: generate a tiny Llama)")
    bench.add_argument("--out", default="out/bench", help="results, plot, logs (out/bench)")
    bench.add_argument("--documents", type=int, default=16, help="shared prefixes (16)")
    bench.add_argument("--questions", type=int, default=4, help="requests per prefix (4)")
    bench.add_argument("--prefix-blocks", type=int, default=8, help="blocks per prefix (8)")
    bench.add_argument("--suffix-tokens", type=int, default=24, help="tokens per question (24)")
    bench.add_argument("--max-tokens", type=int, default=8, help="generated per request (8)")
    bench.add_argument("--batch-size", type=int, default=8, help="requests per generate (8)")
    bench.add_argument("--block-size", type=int, default=32, help="KV block tokens (32)")
    bench.add_argument("--num-gpu-blocks", type=int, default=96,
                       help="GPU KV cache blocks, small so prefixes get evicted (96)")
    bench.add_argument("--max-model-len", type=int, default=2048)
    bench.add_argument("--dtype", help="model dtype (float32 for the tiny model, else auto)")
    bench.add_argument("--host-bytes", default="64MiB", help="TokenVM host tier size (64MiB)")
    bench.add_argument("--policy", help="TokenVM eviction policy (default: the config's)")
    bench.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    bench.set_defaults(func=cmd_bench)

    faults = sub.add_parser("faults", help="fault-injection suite on the real engine, as a table")
    faults.add_argument("--out", default="out/faults", help="engine logs and results")
    faults.add_argument("--cycles", type=int, default=20, help="kill -9 cycles (20)")
    faults.add_argument("--cases", help="comma-separated words; runs the cases whose names "
                                        "contain one (default: all)")
    faults.set_defaults(func=cmd_faults)

    remote = sub.add_parser("remote-inspect", help="what a Redis holds for TokenVM (read-only)")
    remote.add_argument("url", help="remote_url: redis://[user:pass@]host:port/db or a seed list")
    remote.add_argument("--prefix", default="tokenvm", help="remote_key_prefix (tokenvm)")
    remote.add_argument("--limit", type=int, default=100_000, help="keys to look at (100000)")
    remote.add_argument("--json", action="store_true", help="print the summary as JSON")
    remote.set_defaults(func=cmd_remote_inspect)

    rbench = sub.add_parser("remote-bench", help="remote tier throughput vs redis-benchmark")
    rbench.add_argument("url", help="remote_url of a server you may write to (keys expire)")
    rbench.add_argument("--block-bytes", default="131072,1048576",
                        help="comma-separated block sizes in bytes (131072,1048576)")
    rbench.add_argument("--megabytes", type=int, default=256,
                        help="data moved per measurement (256)")
    rbench.add_argument("--batch", type=int, default=32, help="blocks per batch (32)")
    rbench.add_argument("--threads", type=int, default=4, help="remote_io_threads (4)")
    rbench.add_argument("--repeat", type=int, default=1,
                        help="rounds; each row is the best of them (1)")
    rbench.add_argument("--json", help="also write the results to this file")
    rbench.set_defaults(func=cmd_remote_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``tokenvm``. Returns (and, as a script, exits with) the status."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))
