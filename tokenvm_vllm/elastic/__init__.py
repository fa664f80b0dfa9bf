"""Elastic GPU KV memory (issue #13): virtual ranges backed by physical pages mapped on demand.

- ``vmm``: the CUDA driver's virtual-memory API through ctypes (no build step), ``VirtualRange``.
- ``page_groups``: pure-Python accounting: which pages hold which blocks, the map-ahead planner,
  the shrink policy, and the ``Mapper`` interface between them and the hardware.
- ``pool``: ``ElasticPool``, the scheduler side wired into vLLM's ``BlockPool`` (``elastic``
  setting): blocks outside the mapped page groups are parked, growth ahead of demand, shrink
  after idle or under a lowered ceiling with cached blocks stored to host first.

Wired on CPU only (``NullMapper``: CPU has no VMM, so what changes is which blocks vLLM may use).
On CUDA, backing vLLM's KV tensors with ``VirtualRange``s (the allocation hook) is not built yet,
so ``elastic`` is refused there; ``VmmMapper`` is tested alone (``tests/elastic``,
``bench/vmm_bench.py``).
"""
