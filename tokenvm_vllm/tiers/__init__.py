"""The tiers below vLLM's GPU cache: the residency index and the host-RAM tier."""
