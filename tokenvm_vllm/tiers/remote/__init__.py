"""The remote tier: blocks shared by every server of a deployment through Redis (or Valkey).

``url.py`` parses ``remote_url`` (standalone or a cluster seed list) and masks its secrets,
``keys.py`` names a block in Redis, ``value.py`` is the stored bytes (the disk tier's slot header
and the payload), ``store.py`` is the client (``RemoteStore``): its own threads, bounded queues,
timeouts, and serving without the tier while the server is away. The worker's
``transfer/remote_mover.py`` drives the store; the scheduler side plans through ``TierManager``.

Nothing is imported here: ``config.py`` uses ``url.py`` without loading the Redis client.
"""
