"""Benchmark workloads: a model shape built with random weights and a seeded set of random-token prompts."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class Workload:
    """One row of BENCHMARKS.md: model shape, request count, prompt length range, fixed output length."""

    name: str
    model: dict[str, Any]
    requests: int
    prompt_len: tuple[int, int]  # inclusive range, drawn uniformly
    new_tokens: int
    dtype: str = "bfloat16"
    seed: int = 0
    max_requests: dict[str, Optional[int]] = field(default_factory=dict)  # per-variant caps for slow baselines
    profile: dict[str, int] = field(default_factory=dict)  # the profiled slice: requests, new_tokens
    description: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Workload":
        d = dict(d)
        d["prompt_len"] = tuple(d["prompt_len"])
        d["max_requests"] = dict(d.get("max_requests") or {})
        d["profile"] = dict(d.get("profile") or {})
        return cls(**d)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def prompts(self) -> list[list[int]]:
        """Random token prompts, identical for every variant and process (seeded, pure Python RNG)."""
        rng = random.Random(self.seed)
        vocab = int(self.model["vocab_size"])
        lo, hi = self.prompt_len
        out = []
        for _ in range(self.requests):
            n = rng.randint(lo, hi)
            out.append([rng.randrange(3, vocab) for _ in range(n)])  # skip ids 0..2 (pad/bos/eos in most vocabs)
        return out

    def cap_for(self, variant: str) -> int:
        """How many requests ``variant`` runs: all, unless the workload caps this (slow) baseline."""
        cap = self.max_requests.get(variant)
        return self.requests if cap is None else max(1, min(int(cap), self.requests))

    def hf_config(self):
        """A transformers config of the model shape, with no special tokens so nothing stops generation early."""
        from transformers import AutoConfig

        kw = dict(self.model)
        model_type = kw.pop("model_type")
        kw.setdefault("bos_token_id", None)
        kw.setdefault("eos_token_id", None)
        kw.setdefault("pad_token_id", None)
        return AutoConfig.for_model(model_type, **kw)

    def build_model(self, device: str, attn_implementation: Optional[str] = None):
        """Random-init model in the workload dtype, created directly on ``device`` (fast even for 8B)."""
        from transformers import AutoModelForCausalLM

        torch.manual_seed(self.seed)
        kw = {"dtype": self.torch_dtype}
        if attn_implementation is not None:
            kw["attn_implementation"] = attn_implementation
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(self.hf_config(), **kw)
        model.generation_config.eos_token_id = None  # generate() would otherwise fill it back in from here
        model.generation_config.pad_token_id = 0
        return model.eval()


@dataclass(frozen=True)
class ModelShape:
    """What the roofline needs to know about the model: parameters read and FLOPs per token, KV bytes per token."""

    params: int  # all parameters
    matmul_params: int  # parameters read (and multiplied) per token: all but an untied input embedding
    kv_bytes_per_token: int
    dtype_bytes: int

    @classmethod
    def of(cls, workload: Workload) -> "ModelShape":
        """Count parameters on the meta device: exact for any architecture, no memory, no GPU."""
        from transformers import AutoModelForCausalLM

        config = workload.hf_config()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=workload.torch_dtype)
        params = sum(p.numel() for p in model.parameters())
        embed = model.get_input_embeddings().weight
        out = model.get_output_embeddings()
        tied = out is not None and out.weight is embed
        matmul_params = params if tied else params - embed.numel()
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        dtype_bytes = torch.tensor([], dtype=workload.torch_dtype).element_size()
        kv = 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes
        return cls(params=params, matmul_params=matmul_params, kv_bytes_per_token=kv, dtype_bytes=dtype_bytes)
