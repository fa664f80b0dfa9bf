"""Elastic GPU KV memory (issue #13): virtual ranges backed by physical pages mapped on demand.

- ``vmm``: the CUDA driver's virtual-memory API through ctypes (no build step), ``VirtualRange``.
- ``page_groups``: pure-Python accounting: which pages hold which blocks, the map-ahead planner,
  the shrink policy, and the ``Mapper`` interface between them and the hardware.

Nothing here is wired into vLLM yet; see the package's tests and ``bench/vmm_bench.py``.
"""
