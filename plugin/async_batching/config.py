"""Configuration dataclasses; the same classes are registered in Hydra's ConfigStore (see ``hydra_conf``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Optional

SCHEDULER_POLICIES = ("decode_first", "prefill_first", "shortest_first")
MODES = ("sync", "async")
ATTENTION_BACKENDS = ("auto", "triton", "torch")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class BatcherConfig:
    """Knobs of the continuous batcher: KV cache, scheduler and executor."""

    block_size: int = 16
    num_blocks: Optional[int] = None  # None: sized from memory_fraction of free device memory
    memory_fraction: float = 0.85
    # Token budget of one step (prefill chunks + decodes). None: 16384, raised on CUDA for models small enough that
    # a step's GPU work would not cover its host cost (model_runner.auto_max_batch_tokens: up to 65536); generation
    # steps replayed from prefill graphs then hold at most 16384 (model_runner.GRAPH_STEP_TOKENS).
    max_batch_tokens: Optional[int] = None
    max_num_seqs: int = 512
    scheduler: str = "decode_first"
    chunked_prefill: bool = True
    prefix_caching: bool = True  # reuse the KV blocks of shared prompt prefixes (cached blocks are evicted LRU)
    mode: str = "async"
    # Decode steps planned together: when a step would be decode-only (no prompt to prefill, no logprobs, penalties
    # or scores), it runs as a window of this many forwards, each fed the tokens the previous one sampled on the
    # device, with one plan, one staging and one result pass on the host (the host cost of small models' decode
    # steps, spread over the window). Tokens past a request's stop are dropped; at most window - 1 extra forwards per
    # request. None: DECODE_WINDOW (model_runner) where decode steps run in CUDA graphs, 1 elsewhere.
    decode_window: Optional[int] = None
    # Admission in batches: while requests run, waiting ones are admitted once this many of them fit (sequence slots
    # and, by their prompts, free KV blocks), or all of them do. A step that admits is a prefill/mixed step, which
    # runs outside the decode graphs at a host cost of a compiled call per layer (about 20-45 ms on the H200 machine);
    # admitting each request as soon as another finishes made most steps of a long job such steps. None (auto): 1 (at
    # once) until measured on a GPU; scheduler.ADMIT_IN_BATCHES_WITH_GRAPHS makes it max_num_seqs // 8 with graphs.
    admit_threshold: Optional[int] = None
    cuda_graphs: Optional[bool] = None  # None: on for CUDA, off elsewhere
    cuda_graph_max_batch: int = 512
    # Prefill and mixed steps padded to a few token buckets and replayed from CUDA graphs (their host launch, 20-45 ms
    # on the H200 machine, becomes ~1.5 ms). Needs the decode graphs; not under tensor parallelism nor for
    # mixture-of-experts models. None (auto): on wherever that is possible (model_runner.PREFILL_GRAPHS); false
    # keeps every prefill and mixed step eager-launched.
    prefill_graphs: Optional[bool] = None
    # torch.compile the model's layers (dynamic shapes, compiled at start-up) for decode steps (the decode graphs
    # capture them) and for prefill/mixed steps (model_runner.PREFILL_COMPILE_MIN_WORK: all of them since session 11).
    # None: on where decode steps run in CUDA graphs (CUDA with the Triton kernel), off elsewhere.
    compile: Optional[bool] = None
    attention_backend: str = "auto"  # auto: triton on CUDA, torch elsewhere
    # q/k/v and gate/up projections as one matrix product each (fused_projections; the model's code unchanged).
    # None: on for CUDA, where small decode products cost a kernel's fixed time; off elsewhere.
    fuse_projections: Optional[bool] = None
    device: Optional[str] = None  # None: the model's device
    dtype: Optional[str] = None  # None: the model's dtype
    max_model_len: Optional[int] = None  # None: the model's max_position_embeddings
    seed: int = 0  # default sampling seed for requests that give none
    tensor_parallel_size: int = 1  # ranks that hold one model (transformers' TP plan); each group serves one data shard
    # The sums of row-parallel layers under TP: "auto" (symmetric-memory all-reduces for small messages where the
    # GPUs map each other's memory, NCCL otherwise: all_reduce.py), "nccl" (transformers' own all-reduces).
    tp_all_reduce: str = "auto"

    def validate(self) -> "BatcherConfig":
        """Raise a ValueError naming the key and the accepted values for any bad setting."""

        def bad(key: str, accepted: str) -> None:
            raise ValueError(f"BatcherConfig.{key}={getattr(self, key)!r} is invalid: expected {accepted}")

        if not isinstance(self.block_size, int) or self.block_size < 1 or self.block_size & (self.block_size - 1):
            bad("block_size", "a power of two >= 1 (e.g. 16)")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 1):
            bad("num_blocks", "a positive int, or None to size the cache from memory_fraction")
        if not 0.0 < float(self.memory_fraction) <= 1.0:
            bad("memory_fraction", "a fraction in (0, 1]")
        if self.max_batch_tokens is not None and (not isinstance(self.max_batch_tokens, int)
                                                  or self.max_batch_tokens < 1):
            bad("max_batch_tokens", "a positive int, or None (auto)")
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            bad("max_num_seqs", "a positive int")
        if self.scheduler not in SCHEDULER_POLICIES:
            bad("scheduler", f"one of {SCHEDULER_POLICIES}")
        if self.mode not in MODES:
            bad("mode", f"one of {MODES}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            bad("attention_backend", f"one of {ATTENTION_BACKENDS}")
        if self.dtype is not None and self.dtype not in DTYPES:
            bad("dtype", f"one of {DTYPES} or None")
        if self.cuda_graphs not in (None, True, False):
            bad("cuda_graphs", "true, false or null (auto)")
        if self.prefill_graphs not in (None, True, False):
            bad("prefill_graphs", "true, false or null (auto)")
        if self.prefix_caching not in (True, False):
            bad("prefix_caching", "true or false")
        if self.compile not in (None, True, False):
            bad("compile", "true, false or null (auto: on with CUDA graphs)")
        if self.fuse_projections not in (None, True, False):
            bad("fuse_projections", "true, false or null (auto: on for CUDA)")
        if self.decode_window is not None and (not isinstance(self.decode_window, int) or not
                                               1 <= self.decode_window <= 64):
            bad("decode_window", "an int in [1, 64], or None (auto)")
        if self.admit_threshold is not None and (not isinstance(self.admit_threshold, int)
                                                 or self.admit_threshold < 1):
            bad("admit_threshold", "a positive int (1: admit at once), or None (auto)")
        if not isinstance(self.cuda_graph_max_batch, int) or self.cuda_graph_max_batch < 1:
            bad("cuda_graph_max_batch", "a positive int")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            bad("max_model_len", "an int >= 2, or None")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            bad("tensor_parallel_size", "a positive int (1: the whole model on each rank)")
        if self.tp_all_reduce not in ("auto", "nccl"):
            bad("tp_all_reduce", "'auto' or 'nccl'")
        if not self.chunked_prefill and self.max_batch_tokens is not None and self.max_batch_tokens < 2:
            bad("max_batch_tokens", "at least the longest prompt when chunked_prefill is false")
        return self

    @classmethod
    def from_overrides(cls, config: "BatcherConfig | dict | None" = None, **overrides: Any) -> "BatcherConfig":
        """Build a config from a base (dataclass, mapping or None) plus keyword overrides; unknown keys are an error."""
        if config is None:
            base: dict[str, Any] = {}
        elif isinstance(config, BatcherConfig):
            base = dataclasses.asdict(config)
        else:
            base = dict(config)
        base.update(overrides)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(base) - names)
        if unknown:
            raise TypeError(f"unknown BatcherConfig field(s) {unknown}; accepted: {sorted(names)}")
        return cls(**base).validate()


__all__ = ["BatcherConfig", "SCHEDULER_POLICIES", "MODES", "ATTENTION_BACKENDS"]
