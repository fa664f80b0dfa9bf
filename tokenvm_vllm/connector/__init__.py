"""The vLLM connector: ``connector.py`` (the class vLLM builds), ``scheduler.py`` (engine-core
side: lookups, planning, residency), ``worker.py`` (GPU-worker side: copies), ``metadata.py``
(what crosses between them once per step), ``stats.py`` (counters for vLLM's metrics).

Nothing is imported here: ``tokenvm_vllm.plugin`` must stay light.
"""
