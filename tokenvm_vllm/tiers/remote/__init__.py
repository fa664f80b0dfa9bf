"""The remote tier: blocks shared by every server of a deployment through Redis (or Valkey).

``url.py`` parses ``remote_url`` (standalone or a cluster seed list) and masks its secrets,
``keys.py`` names a block in Redis, ``value.py`` is the stored bytes (the disk tier's slot header
and the payload), ``store.py`` is the client (``RemoteStore``): its own threads, bounded queues,
timeouts, and serving without the tier while the server is away.
"""

from tokenvm_vllm.tiers.remote.keys import remote_key
from tokenvm_vllm.tiers.remote.store import RemoteStore
from tokenvm_vllm.tiers.remote.url import RemoteTarget, mask_url, parse_remote_url

__all__ = ["RemoteStore", "RemoteTarget", "mask_url", "parse_remote_url", "remote_key"]
