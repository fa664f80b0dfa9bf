"""The tiers below vLLM's GPU cache. Scheduler side: ``manager.py`` (the one ``TierManager``)
over ``residency.py`` (the index) and ``slot_tier.py`` (``host_tier.py``, ``disk_tier.py``).
Worker side: the disk store's bytes."""
