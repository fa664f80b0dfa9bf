"""``python -m tokenvm_vllm.cli``: the same as the ``tokenvm`` console script."""

import sys

from tokenvm_vllm.cli import main

sys.exit(main())
