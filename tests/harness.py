"""Drive vLLM's real ``Scheduler`` with TokenVM's scheduler side and a fake model runner.

The fake "forward" writes, for every token position it computes, a value derived from the whole
token prefix up to that position into both K and V of the request's block (so a block's bytes
identify the prefix, like real KV). Before computing, it checks that every position the
scheduler claims is already computed (local prefix-cache hits and blocks TokenVM loaded) holds
exactly the value a computation would have written: a wrong, stale or corrupted block raises
``KVMismatch``. The worker side is the real TokenVM worker with CPU tensors and the torch copy
engine.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.engine.arg_utils import EngineArgs
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from tokenvm_vllm.connector.connector import TokenVMConnector
from tokenvm_vllm.connector.stats import COUNTERS
from tokenvm_vllm.transfer.copy_engine import CopyEngine, CopyResult

LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]


class LaggingCopyEngine(CopyEngine):
    """Wraps a synchronous engine and runs each copy two polls later, like an async GPU copy.

    A store submitted in step N runs at step N+2's poll, after the forwards of N+1 and N+2: if
    the scheduler lets vLLM re-use its GPU block meanwhile without a fence, the store copies the
    new owner's bytes and a later load fails the KV check. ``fence`` runs the jobs at once.
    """

    def __init__(self, inner: CopyEngine) -> None:
        self.inner = inner
        self.queued: list[tuple[int, Any]] = []  # (age in polls, thunk)
        self.fenced_jobs = 0

    def store(self, job_id: int, gpu_block_ids: list[int], host_slots: list[int]) -> None:
        self.queued.append((job_id, lambda: self.inner.store(job_id, gpu_block_ids, host_slots)))

    def load(self, job_id: int, gpu_block_ids: list[int], host_slots: list[int]) -> None:
        self.queued.append((job_id, lambda: self.inner.load(job_id, gpu_block_ids, host_slots)))

    def poll(self) -> list[CopyResult]:
        done = self.inner.poll()
        ready, self.queued = self.queued, []
        self._ready = getattr(self, "_ready", [])
        for _job_id, run in self._ready:
            run()
        self._ready = ready
        return done

    def fence(self, job_ids: set[int]) -> None:
        for queue_name in ("queued", "_ready"):
            queue = getattr(self, queue_name, [])
            for _job_id, run in [item for item in queue if item[0] in job_ids]:
                run()
                self.fenced_jobs += 1
            setattr(self, queue_name, [item for item in queue if item[0] not in job_ids])


class KVMismatch(AssertionError):
    """A computed position holds bytes that do not match its prefix."""


def prefix_value(tokens: list[int]) -> float:
    digest = hashlib.blake2b(repr(tokens).encode(), digest_size=3).digest()
    return float(int.from_bytes(digest, "big"))  # < 2**24: exact in float32


@dataclass
class Harness:
    model_dir: str
    block_size: int = 16
    num_gpu_blocks: int = 32
    max_num_seqs: int = 4
    max_num_batched_tokens: int = 256
    extra_config: dict[str, Any] = field(default_factory=dict)
    lagging_copies: bool = False
    layer_hooks: bool = True
    """Call ``wait_for_layer_load`` for every layer before the forward reads the KV cache, as
    vLLM's attention layers do; False imitates a model whose attention skips the hook."""
    sliding_window: int = 0
    """> 0: a hybrid model (vLLM's hybrid KV cache manager): ``LAYERS[0]`` is a sliding-window
    layer of this many tokens in KV cache group 0, ``LAYERS[1]`` full attention in group 1.
    The forward then checks, in the window layer, only the positions inside the window."""
    mla: bool = False
    """An MLA model's KV cache group (``MLAAttentionSpec``: one latent tensor per layer, here
    the same (blocks, 1, block_size, 2) float32 tensors, so the same 128 bytes per block)."""
    tensor_parallel_size: int = 1
    """What vLLM's parallel config says (``TwoRankHarness`` sets 2): the worker side reads it
    to decide whether MLA's latent KV is stored once."""
    steps: int = 0
    preemptions: int = 0
    last_scheduled_tokens: int = 0
    """Tokens the last step scheduled (0: it only waited on lookups or copies)."""
    outputs: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        args = EngineArgs(
            model=self.model_dir, dtype="float32", block_size=self.block_size,
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=4096, enable_prefix_caching=True, enable_chunked_prefill=True,
            kv_transfer_config={"kv_connector": "TokenVM", "kv_role": "kv_both",
                                "kv_load_failure_policy": "recompute",
                                # The scenarios count stores as soon as blocks fill, so they
                                # pin write-through unless a test asks for write-back.
                                "kv_connector_extra_config": {"host_bytes": "1MiB",
                                                              "write_mode": "write_through",
                                                              **self.extra_config}},
        )
        self.vllm_config = args.create_engine_config()
        self.vllm_config.cache_config.num_gpu_blocks = self.num_gpu_blocks
        parallel = self.vllm_config.parallel_config
        parallel.tensor_parallel_size = parallel.world_size = self.tensor_parallel_size
        spec: FullAttentionSpec = FullAttentionSpec(
            block_size=self.block_size, num_kv_heads=1, head_size=1, dtype=torch.float32)
        if self.mla:
            spec = MLAAttentionSpec(block_size=self.block_size, num_kv_heads=1, head_size=2,
                                    dtype=torch.float32)
        groups = [KVCacheGroupSpec(list(LAYERS), spec)]
        self.group_layers = [list(LAYERS)]
        if self.sliding_window:
            window = SlidingWindowSpec(block_size=self.block_size, num_kv_heads=1, head_size=1,
                                       dtype=torch.float32, sliding_window=self.sliding_window)
            groups = [KVCacheGroupSpec([LAYERS[0]], window), KVCacheGroupSpec([LAYERS[1]], spec)]
            self.group_layers = [[LAYERS[0]], [LAYERS[1]]]
        self.kv_cache_config = KVCacheConfig(
            num_blocks=self.num_gpu_blocks, kv_cache_tensors=[], kv_cache_groups=groups)
        self.scheduler = Scheduler(
            vllm_config=self.vllm_config, kv_cache_config=self.kv_cache_config,
            structured_output_manager=StructuredOutputManager(self.vllm_config),
            block_size=self.block_size, log_stats=True)
        self.connector = self.scheduler.connector
        assert isinstance(self.connector, TokenVMConnector)
        self.worker = TokenVMConnector(self.vllm_config, KVConnectorRole.WORKER,
                                       self.kv_cache_config)
        # vLLM's per-layer view: (num_blocks, heads, block_size, K|V content), here 1 head of
        # head size 1, so the content is [K, V]
        self.kv = {name: torch.full((self.num_gpu_blocks, 1, self.block_size, 2), -1.0)
                   for name in LAYERS}
        self.worker.register_kv_caches(self.kv)
        if self.lagging_copies:
            self.worker.worker.engine = LaggingCopyEngine(self.worker.worker.engine)
        init_none_hash(sha256)
        self._hasher = get_request_block_hasher(self.block_size, sha256)
        self._ids = itertools.count()
        # Every counter from 0 (vLLM ships only what an interval reported: TokenVMStats)
        self.stats: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self.histograms: dict[str, list[float]] = {}
        # vLLM drains the scheduler-side stats in update_from_output; tap them there.
        drain = self.connector.get_kv_connector_stats

        def tapped_stats() -> Any:
            stats = drain()
            for key, value in (stats.data if stats is not None else {}).items():
                if isinstance(value, list):  # histogram observations
                    self.histograms.setdefault(key, []).extend(value)
                else:
                    self.stats[key] = self.stats.get(key, 0) + value
            return stats

        self.connector.get_kv_connector_stats = tapped_stats  # type: ignore[method-assign]

    # -- requests ------------------------------------------------------------------------------

    def add(self, prompt: list[int], max_tokens: int = 4, cache_salt: str | None = None) -> str:
        req_id = f"req-{next(self._ids)}"
        request = Request(
            request_id=req_id, prompt_token_ids=list(prompt),
            sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            pooling_params=None, block_hasher=self._hasher, cache_salt=cache_salt)
        self.scheduler.add_request(request)
        return req_id

    def run(self, max_steps: int = 2000, timeout_s: float = 60.0) -> None:
        """Step until every request finished and TokenVM's copies are done (not waiting out an
        elastic idle period: ``run_idle`` does that, as vLLM's engine would).

        ``max_steps`` counts the steps that scheduled tokens. Steps that scheduled none (a
        lookup or copies still in flight; vLLM's engine spins through them too) count against
        ``timeout_s`` instead: how many of them fit in one wait depends on the machine, not on
        TokenVM (a Redis Cluster lookup took 80-100 ms, 1,300-1,900 empty steps, on an idle
        2-core machine, and broke a step bound of 2,000)."""
        deadline = time.monotonic() + timeout_s
        working = 0
        while working < max_steps and time.monotonic() < deadline:
            if not (self.scheduler.has_unfinished_requests()
                    or self.scheduler.has_finished_requests() or self._copies_pending()):
                return
            self.step()
            working += self.last_scheduled_tokens > 0
        raise RuntimeError("requests did not finish")

    def run_idle(self, max_steps: int = 2000) -> int:
        """Step while the connector asks vLLM to (``has_pending_push_work``), as vLLM's engine
        does with no request: elastic mode's empty steps through an idle period. Returns the
        steps taken."""
        for steps in range(max_steps):
            if not self.scheduler.has_requests():
                return steps
            self.step()
        raise RuntimeError("the connector kept the engine stepping")

    def _copies_pending(self) -> bool:
        scheduler = self.connector.scheduler
        if scheduler is None:
            return bool(self.connector.has_pending_push_work())
        return bool(scheduler.has_pending_work(idle=False))

    # -- one engine step -------------------------------------------------------------------------

    def step(self) -> None:
        output = self._begin_step([self.worker])
        req_ids, sampled = self._forward(output)
        self._end_step(output, self._runner_output(self.worker, output, req_ids, sampled))

    def _begin_step(self, workers: list[Any]) -> Any:
        """Schedule one step and hand its connector metadata to every worker (rank)."""
        output = self.scheduler.schedule()
        self.steps += 1
        self.last_scheduled_tokens = output.total_num_scheduled_tokens
        self.preemptions += len(output.preempted_req_ids or ())
        meta = output.kv_connector_metadata
        for worker in workers:
            worker.handle_preemptions(meta)
            worker.bind_connector_metadata(meta)
            worker.start_load_kv(None)
        return output

    @staticmethod
    def _runner_output(worker: Any, output: Any, req_ids: list[str],
                       sampled: list[list[int]]) -> ModelRunnerOutput:
        """One worker's (rank's) ``ModelRunnerOutput`` for the step, with its connector output."""
        finished_sending, finished_recving = worker.get_finished(output.finished_req_ids)
        connector_output = KVConnectorOutput(
            finished_sending=finished_sending, finished_recving=finished_recving,
            invalid_block_ids=worker.get_block_ids_with_load_errors(),
            kv_connector_worker_meta=worker.build_connector_worker_meta())
        worker.clear_connector_metadata()
        return ModelRunnerOutput(
            req_ids=list(req_ids), req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[list(s) for s in sampled], kv_connector_output=connector_output)

    def _end_step(self, output: Any, runner_output: ModelRunnerOutput) -> None:
        engine_outputs = self.scheduler.update_from_output(output, runner_output)
        for outputs in engine_outputs.values():
            for out in outputs.outputs:
                self.outputs.setdefault(out.request_id, []).extend(out.new_token_ids)

    def _forward(self, output: Any) -> tuple[list[str], list[list[int]]]:
        req_ids: list[str] = []
        sampled: list[list[int]] = []
        if self.layer_hooks and output.num_scheduled_tokens:
            for name in LAYERS:
                self.worker.wait_for_layer_load(name)
        for req_id, num_tokens in output.num_scheduled_tokens.items():
            request = self.scheduler.requests[req_id]
            tokens = list(request.all_token_ids)
            # schedule() already advanced num_computed_tokens past this step's tokens
            start = request.num_computed_tokens - num_tokens
            # A layer-wise load that failed leaves its blocks unwritten; the real forward reads
            # them anyway and vLLM, told after the forward, discards the step and recomputes.
            failed = self.worker.worker.pending_load_errors
            all_block_ids = self.scheduler.kv_cache_manager.get_block_ids(req_id)
            for group, layers in enumerate(self.group_layers):
                block_ids = all_block_ids[group]
                # What attention reads: every earlier position, or (sliding window) those
                # the step's first token still sees.
                window = self.sliding_window if group == 0 and len(self.group_layers) > 1 else 0
                first = max(0, start - window + 1) if window else 0
                for pos in range(first, start):  # everything already "computed" must be right
                    if block_ids[pos // self.block_size] not in failed:
                        self._check(block_ids, pos, tokens[:pos + 1], req_id, layers)
                for pos in range(start, start + num_tokens):
                    self._write(block_ids, pos, prefix_value(tokens[:pos + 1]), layers)
            req_ids.append(req_id)
            done_prompt = start + num_tokens >= request.num_tokens
            sampled.append([3 + int(prefix_value(tokens)) % 900] if done_prompt else [])
        return req_ids, sampled

    def _slot(self, block_ids: list[int], pos: int) -> tuple[int, int]:
        return block_ids[pos // self.block_size], pos % self.block_size

    def _write(self, block_ids: list[int], pos: int, value: float, layers: list[str]) -> None:
        block, offset = self._slot(block_ids, pos)
        assert block != 0, f"pos {pos} is in vLLM's null block"
        for name in layers:
            self.kv[name][block, :, offset] = value

    def _check(self, block_ids: list[int], pos: int, tokens: list[int], req_id: str,
               layers: list[str]) -> None:
        block, offset = self._slot(block_ids, pos)
        want = prefix_value(tokens)
        for name in layers:
            got = self.kv[name][block, :, offset].flatten().tolist()
            if got != [want, want]:
                raise KVMismatch(f"{req_id} pos {pos} block {block} layer {name}: {got} != {want}")
