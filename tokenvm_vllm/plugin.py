"""vLLM general-plugin entry point: registers the ``TokenVM`` KV connector name.

vLLM calls ``register()`` once in every process it starts (front end, engine core, workers), and
the front end resolves the connector class at config time, so the name must be registered there
too. The call is idempotent and imports nothing heavy: the connector module is loaded lazily by
vLLM's factory only when a ``TokenVM`` connector is actually built. It also hooks the worker
right after it loaded the model (``compat.install_worker_loaded_hook``), where ``pin_mode:
overlap`` starts registering the host pool (``connector/early_pool.py``, imported only there).
"""

from __future__ import annotations

from typing import Any

from tokenvm_vllm import CONNECTOR_NAME, compat


def register() -> None:
    """Register ``TokenVM`` with vLLM's ``KVConnectorFactory`` (no-op if already registered)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    compat.install_worker_loaded_hook(start_host_pool_early)
    if CONNECTOR_NAME in KVConnectorFactory._registry:
        return
    KVConnectorFactory.register_connector(
        CONNECTOR_NAME, "tokenvm_vllm.connector.connector", "TokenVMConnector"
    )


def start_host_pool_early(vllm_config: Any) -> None:
    """The worker loaded the model: start registering the host pool if TokenVM will want it."""
    from tokenvm_vllm.connector.early_pool import start_host_pool_early as start

    start(vllm_config)
