"""TokenVM: a KV-cache virtual-memory plugin for vLLM (GPU VRAM -> pinned host RAM).

Importing this package is light (no torch, no vLLM): vLLM loads ``tokenvm_vllm.plugin:register``
in every process, and only the connector module pulls in vLLM.
"""

__version__ = "0.1.0"
CONNECTOR_NAME = "TokenVM"
