"""Moving block bytes: the KV layout of vLLM's cache, the host pool, and the copy engines."""
