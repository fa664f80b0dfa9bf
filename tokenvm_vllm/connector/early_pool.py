"""The worker side's first act: start registering the host pool as soon as the worker has
loaded the model, while vLLM compiles it (``pin_mode: overlap``, the default).

Registering 20 GiB with CUDA takes 8-13 s on an H200 host, and while a chunk is being
registered the driver holds the process's other CUDA calls. vLLM builds the connector's worker
side (``connector/worker.py``) only in ``initialize_from_config``, after loading, compiling and
profiling the model; started there, registration overlapped only vLLM's warm-up and added ~6 s
to start-up (2026-12-01). Started at the worker's ``init_device`` instead, it held up the model
load (dummy weights: 2.1 -> 11-12 s on V2, 0.5 -> 7.5 s on V1), serialised rather than
overlapped. So it starts right after the load (``compat.install_worker_loaded_hook``, which
the plugin installs in every process), beside ``torch.compile``, which is CPU work (5-26 s).
The pool the worker builds later adopts this memory and its running registration
(``transfer/host_pool.py``: ``EarlyRegistration``, ``take_early_registration``).

Only where the worker will build a private, fixed-size, lazily pinned pool on a GPU that can
use registered memory: ``pin_mode: overlap``, ``pin_memory``, an integer ``host_bytes``, no
pool shared with the remote tier's I/O process (``remote_process``) or with other ranks (MLA at
TP>1 with ``mla_store_once``). Everything else, and any setting the connector will reject,
starts nothing here: the worker then does what it did before. A prediction this module gets
wrong costs time, never correctness: a registration no pool adopts is released
(``discard_early_registration``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from tokenvm_vllm import CONNECTOR_NAME

if TYPE_CHECKING:
    from tokenvm_vllm.config import TokenVMConfig

logger = logging.getLogger("vllm.tokenvm")

_STARTED = False
"""Whether this process started one already: vLLM may load weights again (a reload), and the
pool, built once, adopts only the first registration."""


def early_pool_config(vllm_config: Any) -> TokenVMConfig | None:
    """This worker's TokenVM settings if its host pool should start registering early
    (``host_bytes``: how much), else None (not TokenVM, another pin mode, 'auto', a shared
    pool, settings the connector will refuse)."""
    from tokenvm_vllm.config import TokenVMConfigError, check_host_memory, load_config

    transfer = getattr(vllm_config, "kv_transfer_config", None)
    if transfer is None or transfer.kv_connector != CONNECTOR_NAME:
        return None
    try:
        config = load_config(transfer.kv_connector_extra_config)
        check_host_memory(config.host_bytes)  # (the worker warns about ulimit -l later)
    except TokenVMConfigError:
        return None  # the connector says what is wrong, in its own words, when it is built
    if config.pin_mode != "overlap" or not config.pin_memory or not isinstance(
            config.host_bytes, int):
        return None
    if config.remote_url and config.remote_process:
        return None  # a file mapping shared with the I/O process
    parallel = vllm_config.parallel_config
    model = getattr(vllm_config, "model_config", None)
    if config.mla_store_once and parallel.tensor_parallel_size > 1 and bool(
            getattr(model, "use_mla", False)):
        return None  # one pool in /dev/shm for this node's ranks
    return config


def start_host_pool_early(vllm_config: Any) -> None:
    """Start registering this worker's host pool on a thread, held around vLLM's CUDA graph
    captures (``compat.install_graph_capture_guard``), if ``early_pool_config`` says so; once
    per process."""
    import torch

    from tokenvm_vllm import compat
    from tokenvm_vllm.transfer.host_pool import (
        _host_pointer_usable,
        discard_early_registration,
        start_early_registration,
    )

    global _STARTED
    config = early_pool_config(vllm_config)
    if _STARTED or config is None or not torch.cuda.is_available():
        return
    _STARTED = True
    device = torch.cuda.current_device()
    if not _host_pointer_usable(device):
        return  # the pool will be one cudaHostAlloc, as with pin_mode eager
    assert isinstance(config.host_bytes, int)  # ("auto" starts nothing: early_pool_config)
    early = start_early_registration(config.host_bytes, device, start=False,
                                     huge_pages=config.huge_pages)
    if not compat.install_graph_capture_guard(early.pinner.pause, early.pinner.resume):
        discard_early_registration()  # the worker registers it before answering, as before
        return
    early.start()
    logger.info("TokenVM host pool: registering %.2f GiB on a thread from the model load on, "
                "while vLLM compiles (pin_mode overlap; held while vLLM captures CUDA graphs; "
                "the pool adopts it)", early.nbytes / 2**30)
