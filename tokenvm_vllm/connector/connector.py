"""``TokenVMConnector``: the class vLLM builds for ``"kv_connector": "TokenVM"``.

vLLM makes one instance per role: ``SCHEDULER`` in the engine-core process and ``WORKER`` in each
worker. This class only routes vLLM's calls to ``TokenVMScheduler`` (scheduler.py) or
``TokenVMWorker`` (worker.py); the logic lives there.

Hybrid KV cache manager (``SupportsHMA``): implemented, so vLLM keeps its hybrid manager on
and a model with sliding-window and full-attention layers gets one KV cache group per kind
(sliding-window blocks that fall out of the window are freed). TokenVM keys, stores and loads
each group's blocks separately (``scheduler.py``: a hit every group can honor; sliding-window
groups need only the blocks inside the window before the hit point). Groups that are not
attention (Mamba / linear-attention state) are refused at start-up with one line
(``transfer/layout.py: kv_cache_groups``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)

from tokenvm_vllm.config import (
    DebugKnobWarning,
    LoadMode,
    TokenVMConfig,
    check_host_memory,
    load_config_and_sources,
    log_settings,
)
from tokenvm_vllm.connector.metadata import TokenVMConnectorMetadata
from tokenvm_vllm.connector.scheduler import TokenVMScheduler
from tokenvm_vllm.connector.stats import TokenVMPromMetrics, TokenVMStats
from tokenvm_vllm.connector.worker import TokenVMWorker
from tokenvm_vllm.elastic.pool import check_platform
from tokenvm_vllm.transfer.host_pool import early_registration_bytes

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class TokenVMConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        transfer_config = vllm_config.kv_transfer_config
        assert transfer_config is not None  # vLLM builds a connector only when one is configured
        config, sources = load_config_and_sources(transfer_config.kv_connector_extra_config)
        log_settings(config, sources)
        check_platform(config.elastic)
        self.scheduler: TokenVMScheduler | None = None
        self.worker: TokenVMWorker | None = None
        self._debug_warning: DebugKnobWarning | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = TokenVMScheduler(vllm_config, kv_cache_config, config)
        else:
            check_host_memory(config.host_bytes, pin=_pins(config),
                              held=early_registration_bytes())
            self._debug_warning = DebugKnobWarning(config)  # where the knobs act
            self.worker = TokenVMWorker(vllm_config, kv_cache_config, config)

    @classmethod
    def validate_early(cls, extra_config: dict[str, Any] | None,
                       vllm_config: VllmConfig | None = None) -> TokenVMConfig:
        """Validate the settings where vLLM first shows them to the connector class, in the
        process that parsed the arguments and before any model weights load, so a bad setting
        stops the server at once with one line. Also checks the host tier of every worker on
        this machine against the available RAM. Raises ``TokenVMConfigError``."""
        config, sources = load_config_and_sources(extra_config)
        log_settings(config, sources)
        check_platform(config.elastic)
        workers = 1
        if vllm_config is not None:
            parallel = vllm_config.parallel_config
            workers = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
        check_host_memory(config.host_bytes, workers=workers, pin=_pins(config))
        return config

    @property
    def prefer_cross_layer_blocks(self) -> bool:
        """vLLM 0.26's V1 runner then registers one cross-layer tensor (see worker.py)."""
        return self.worker is not None and self.worker.prefers_cross_layer_blocks

    @property
    def requires_kv_delivery(self) -> bool:
        """A cache: a dropped store is a future miss, never a lost hand-off (vLLM >= 0.32)."""
        return False

    # -- scheduler side --------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self.scheduler is not None
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self.scheduler is not None
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.scheduler is not None
        return self.scheduler.build_connector_meta(scheduler_output)

    def on_new_request(self, request: Request) -> None:
        assert self.scheduler is not None
        self.scheduler.on_new_request(request)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self.scheduler is not None
        self.scheduler.update_connector_output(connector_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self.scheduler is not None
        return self.scheduler.request_finished(request, block_ids)

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        """vLLM calls this instead of ``request_finished`` for a ``SupportsHMA`` connector,
        once per request with every group's blocks (never delays the free, as above)."""
        assert self.scheduler is not None
        return self.scheduler.request_finished(request, block_ids[0] if block_ids else [])

    def bind_gpu_block_pool(self, gpu_block_pool: Any) -> None:
        super().bind_gpu_block_pool(gpu_block_pool)
        if self.scheduler is not None:
            self.scheduler.bind_gpu_block_pool(gpu_block_pool)

    def has_pending_push_work(self) -> bool:
        return self.scheduler is not None and self.scheduler.has_pending_work()

    def reset_cache(self) -> bool | None:
        return self.scheduler.reset_cache() if self.scheduler is not None else None

    def get_kv_connector_stats(self) -> TokenVMStats | None:
        return self.scheduler.get_stats() if self.scheduler is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> TokenVMStats:
        return TokenVMStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> TokenVMPromMetrics:
        return TokenVMPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # -- worker side -------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker is not None
        self.worker.register_kv_caches(kv_caches)

    def register_cross_layers_kv_cache(self, kv_cache: torch.Tensor, attn_backend: Any) -> None:
        """vLLM 0.26, V1 runner, when ``prefer_cross_layer_blocks`` (instead of the above)."""
        assert self.worker is not None
        self.worker.register_cross_layers_kv_cache(kv_cache, attn_backend)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        assert self.worker is not None and isinstance(
            kv_connector_metadata, TokenVMConnectorMetadata)
        self.worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self.worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, TokenVMConnectorMetadata)
        self.worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        assert self.worker is not None
        self.worker.wait_for_layer_load(layer_name)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Layer-wise loads need ``wait_for_layer_load`` to run between graph pieces: a FULL
        CUDA graph would replay the attention layers without it. Async and sync loads do not
        (a sync load's forward waits for the whole copy before the graph is replayed), so their
        graphs stay FULL. vLLM calls this while it builds its config (front end, FULL CUDA
        graphs only): the settings are validated here."""
        return cls.validate_early(extra_config).load_mode is LoadMode.LAYERWISE

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        """No layout requirement (TokenVM reads the layout vLLM chose). vLLM calls this when it
        picks the attention backend's KV layout: the settings are validated here too."""
        transfer_config = vllm_config.kv_transfer_config
        if transfer_config is not None:
            cls.validate_early(transfer_config.kv_connector_extra_config, vllm_config)
        return None

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # stores are batched per step in get_finished

    def wait_for_save(self) -> None:
        return  # stores never block the forward; blocks they read are fenced on re-use

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self.worker is not None
        if self.has_connector_metadata():
            meta = self._get_connector_metadata()
            assert isinstance(meta, TokenVMConnectorMetadata)
            self.worker.start_store(meta)
        return None, self.worker.get_finished() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self.worker is not None
        return self.worker.get_block_ids_with_load_errors()

    def build_connector_worker_meta(self) -> Any:
        assert self.worker is not None
        return self.worker.build_worker_meta()

    def shutdown(self) -> None:
        if self._debug_warning is not None:
            self._debug_warning.stop()
        if self.worker is not None:
            self.worker.shutdown()


def _pins(config: TokenVMConfig) -> bool:
    """Whether the host pool will be pinned: pin_memory on and a CUDA device present."""
    import torch

    return config.pin_memory and torch.cuda.is_available()
