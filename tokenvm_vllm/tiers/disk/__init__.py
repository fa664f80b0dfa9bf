"""The disk tier's bytes, in the worker process.

``format.py``  the slot header (one encoder, one decoder) and checksums
``fsutil.py``  filesystem rules and probes, shared with ``tokenvm doctor``
``files.py``   a store directory's lock and preallocated slot files
``store.py``   ``DiskStore``: asynchronous, verified slot reads and writes, restart scan
``inspect.py`` read-only summary of a store directory (``tokenvm inspect``)
"""

from tokenvm_vllm.tiers.disk.format import HEADER_BYTES, disk_slot_count
from tokenvm_vllm.tiers.disk.fsutil import DiskStoreError
from tokenvm_vllm.tiers.disk.store import DiskStore

__all__ = ["HEADER_BYTES", "DiskStore", "DiskStoreError", "disk_slot_count"]
