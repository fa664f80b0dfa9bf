"""The vLLM entry point registers the TokenVM connector name, idempotently.

Each test starts from a registry without ``TokenVM`` and with vLLM's "plugins already loaded"
flag cleared (the ``unregistered`` fixture), so no test passes on what an earlier test or the
scheduler-level harness registered: the order of tests does not matter.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any

import pytest

from tokenvm_vllm import CONNECTOR_NAME


@pytest.fixture
def unregistered(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """vLLM's ``KVConnectorFactory`` without TokenVM and ``load_general_plugins`` not yet run in
    this process; both are restored afterwards (other tests may need the registration)."""
    import vllm.plugins
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    monkeypatch.delitem(KVConnectorFactory._registry, CONNECTOR_NAME, raising=False)
    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    yield KVConnectorFactory


def test_entry_point_is_declared() -> None:
    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "tokenvm_vllm.plugin:register" in names


def test_register_is_idempotent_and_resolves_the_class(unregistered: Any) -> None:
    from vllm.config import KVTransferConfig

    from tokenvm_vllm.connector.connector import TokenVMConnector
    from tokenvm_vllm.plugin import register

    assert CONNECTOR_NAME not in unregistered._registry
    register()
    register()  # vLLM calls it in every process, possibly more than once
    config = KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both")
    assert unregistered.get_connector_class(config) is TokenVMConnector


def test_vllm_plugin_loader_registers_it(unregistered: Any) -> None:
    from vllm.plugins import load_general_plugins

    assert CONNECTOR_NAME not in unregistered._registry
    load_general_plugins()  # finds tokenvm_vllm.plugin:register through the entry point
    assert CONNECTOR_NAME in unregistered._registry


def test_plugin_module_is_light() -> None:
    import subprocess
    import sys

    code = ("import sys, tokenvm_vllm.plugin; "
            "print(any(m == 'torch' or m.startswith('vllm') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
