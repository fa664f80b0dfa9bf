"""Elastic GPU KV memory (issue #13): virtual ranges backed by physical pages mapped on demand.

- ``vmm``: the CUDA driver's virtual-memory API through ctypes (no build step), ``VirtualRange``.
- ``page_groups``: pure-Python accounting: which pages hold which blocks, the map-ahead planner,
  the shrink policy, and the ``Mapper`` interface between them and the hardware.
- ``pool``: ``ElasticPool``, the scheduler side wired into vLLM's ``BlockPool`` (``elastic``
  setting): blocks outside the mapped page groups are parked, growth ahead of demand, shrink
  after idle or under a lowered ceiling with cached blocks stored to host first.
- ``scheduler_side``: ``SchedulerElastic``, the hook points ``connector/scheduler.py`` calls
  (building the pool, the ceiling file, the map-ahead estimate).
- ``protocol``: scheduler -> workers. The scheduler records map/unmap commands into each step's
  metadata (``CommandMapper``); every worker applies them before the step's loads and forward
  (``WorkerKV``), which on CUDA owns the VMM ranges backing vLLM's KV tensors: the allocation
  hook (``compat.install_elastic_kv_hook``, vLLM 0.26's V2 and V1 runners) makes each KV tensor a
  view of a range reserved at full size with only the mapped page groups backed.

On CPU the workers keep the mapped set with a ``RecordingMapper`` (no VMM: what changes is which
blocks vLLM may use, and the protocol is checked). On CUDA the hook is not yet run on a GPU
(``ci/gpu/elastic_exact.py`` is the check).
"""
