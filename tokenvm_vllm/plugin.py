"""vLLM general-plugin entry point: registers the ``TokenVM`` KV connector name.

vLLM calls ``register()`` once in every process it starts (front end, engine core, workers), and
the front end resolves the connector class at config time, so the name must be registered there
too. The call is idempotent and imports nothing heavy: the connector module is loaded lazily by
vLLM's factory only when a ``TokenVM`` connector is actually built.
"""

from __future__ import annotations

from tokenvm_vllm import CONNECTOR_NAME


def register() -> None:
    """Register ``TokenVM`` with vLLM's ``KVConnectorFactory`` (no-op if already registered)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME in KVConnectorFactory._registry:
        return
    KVConnectorFactory.register_connector(
        CONNECTOR_NAME, "tokenvm_vllm.connector.connector", "TokenVMConnector"
    )
