"""Workloads that drive a real vLLM engine with and without TokenVM (demo, tests, benchmarks)."""
