"""The fault-injection suite (``tokenvm faults``) on the real CPU engine, one test per case.

Each case must go as expected and, where a server runs, give outputs token-for-token equal to a
run without TokenVM. CI runs 2 ``kill -9`` cycles (``TOKENVM_FAULT_CYCLES`` overrides); the
README's table comes from ``tokenvm faults`` with 20.
"""

from __future__ import annotations

import os

import pytest

from tokenvm_vllm.cli.faults import CASES, Suite

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Suite:
    cycles = int(os.environ.get("TOKENVM_FAULT_CYCLES", "2"))
    return Suite(tmp_path_factory.mktemp("faults"), cycles)


@pytest.mark.parametrize("name", list(CASES))
def test_fault_case(suite, name):
    _expected, run = CASES[name]
    outcome, outputs = run(suite)
    assert outcome.startswith("as expected"), outcome
    total = len(suite.baseline)
    assert outputs in (f"{total}/{total} equal", "n/a (no server)"), outputs
