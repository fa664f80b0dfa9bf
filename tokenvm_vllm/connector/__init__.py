"""The vLLM connector: ``connector.py`` (the class vLLM builds), ``scheduler.py`` (engine-core
side: glue between vLLM's hooks, ``tiers/manager.py`` and ``jobs.py``), ``jobs.py`` (the job
table and fences), ``worker.py`` (GPU-worker side: copies), ``metadata.py`` (what crosses
between them once per step), ``stats.py`` (counters for vLLM's metrics).

Nothing is imported here: ``tokenvm_vllm.plugin`` must stay light.
"""
