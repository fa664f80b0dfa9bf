"""The vLLM entry point registers the TokenVM connector name, idempotently."""

from importlib.metadata import entry_points

from tokenvm_vllm import CONNECTOR_NAME


def test_entry_point_is_declared():
    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "tokenvm_vllm.plugin:register" in names


def test_register_is_idempotent_and_resolves_the_class():
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from tokenvm_vllm.connector.connector import TokenVMConnector
    from tokenvm_vllm.plugin import register

    register()
    register()  # vLLM calls it in every process, possibly more than once
    config = KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both")
    assert KVConnectorFactory.get_connector_class(config) is TokenVMConnector


def test_vllm_plugin_loader_registers_it():
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    assert CONNECTOR_NAME in KVConnectorFactory._registry


def test_plugin_module_is_light():
    import subprocess
    import sys

    code = ("import sys, tokenvm_vllm.plugin; "
            "print(any(m == 'torch' or m.startswith('vllm') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
