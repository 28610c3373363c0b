"""Benchmark workloads: a model shape built with random weights and a seeded set of random-token requests."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

GENERATORS = ("uniform", "shared_prefix", "nano_vllm", "score_pairs")
LM_HEAD_CONVENTIONS = ("every_prompt_token", "kept_logits")


@dataclass
class Requests:
    """What one workload submits, in order: prompts, each one's new-token budget, and (scoring) its continuation.

    ``cached`` is how many leading prompt tokens an earlier request already computed (a shared prefix): the prefill
    a prefix cache could skip. For scoring, ``prompts`` are the contexts and ``new_tokens`` are all 0.
    """

    prompts: list[list[int]]
    new_tokens: list[int]
    cached: list[int]
    continuations: Optional[list[list[int]]] = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def scoring(self) -> bool:
        return self.continuations is not None

    def head(self, n: int) -> "Requests":
        """The first ``n`` requests (what a capped baseline, the warm-up or the profiled run submits)."""
        conts = None if self.continuations is None else self.continuations[:n]
        return Requests(self.prompts[:n], self.new_tokens[:n], self.cached[:n], conts)

    def with_new_tokens(self, cap: int) -> "Requests":
        """The same prompts with every budget cut to at most ``cap`` tokens (warm-up and profiled runs)."""
        return Requests(self.prompts, [min(m, cap) for m in self.new_tokens], self.cached, self.continuations)

    def total_lens(self) -> list[int]:
        """Tokens the model reads per request before decoding: the prompt (scoring: context + continuation)."""
        if self.continuations is None:
            return [len(p) for p in self.prompts]
        return [len(p) + len(c) for p, c in zip(self.prompts, self.continuations)]

    def logits_kept(self) -> int:
        """Prefill rows whose logits are needed: the last prompt position per request, or every continuation token."""
        if self.continuations is None:
            return len(self.prompts)
        return sum(len(c) for c in self.continuations)


def _range(value: Union[int, list, tuple]) -> tuple[int, int]:
    """An inclusive (lo, hi) range from an int or a two-element list."""
    if isinstance(value, int):
        return value, value
    lo, hi = value
    return int(lo), int(hi)


@dataclass
class Workload:
    """One row of BENCHMARKS.md: model shape, request count, how the requests are drawn, output lengths.

    Generators (all seeded, pure Python RNG, identical in every process):
    ``uniform``: prompt lengths uniform in ``prompt_len``, ids uniform in [3, vocab).
    ``shared_prefix``: ``prefix.groups`` groups of consecutive requests; each group's prompts start with the same
    ``prefix.len`` random tokens, then ``prompt_len`` unique ones.
    ``nano_vllm``: nano-vllm's bench.py draw order exactly: prompts of ``randint(*prompt_len)`` ids
    ``randint(*token_ids)``, then each request's ``randint(*new_tokens)``, from ``random.seed(seed)``.
    ``score_pairs``: (context, continuation) pairs, lengths uniform in ``prompt_len`` and ``continuation_len``.
    """

    name: str
    model: dict[str, Any]
    requests: int
    prompt_len: tuple[int, int]  # inclusive range, drawn uniformly
    new_tokens: Union[int, tuple[int, int]]  # fixed, or an inclusive range drawn per request
    dtype: str = "bfloat16"
    seed: int = 0
    max_requests: dict[str, Optional[int]] = field(default_factory=dict)  # per-variant caps for slow baselines
    profile: dict[str, int] = field(default_factory=dict)  # the profiled slice: requests, new_tokens
    description: str = ""
    generator: str = "uniform"
    prefix: dict[str, int] = field(default_factory=dict)  # shared_prefix: groups, len
    token_ids: Optional[tuple[int, int]] = None  # inclusive id range (nano_vllm); default [3, vocab)
    continuation_len: Optional[tuple[int, int]] = None  # score_pairs
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields besides max_new_tokens (greedy: {})
    expected_output_tokens: Optional[int] = None  # asserted at start-up (W7: nano-vllm's 133,966)
    roofline_lm_head: str = "every_prompt_token"  # or kept_logits: see roofline.prefill_flops
    extra_variants: list[str] = field(default_factory=list)  # run whatever `variants` says (W2s: the greedy reference)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Workload":
        d = dict(d)
        d["prompt_len"] = tuple(d["prompt_len"])
        if not isinstance(d["new_tokens"], int):
            d["new_tokens"] = tuple(d["new_tokens"])
        for key in ("token_ids", "continuation_len"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        for key in ("max_requests", "profile", "prefix", "sampling"):
            d[key] = dict(d.get(key) or {})
        d["extra_variants"] = list(d.get("extra_variants") or [])
        workload = cls(**d)
        workload.validate()
        return workload

    def validate(self) -> None:
        """Raise a ValueError naming the workload and key for a setting the generators cannot use."""
        def bad(msg: str) -> None:
            raise ValueError(f"workload {self.name}: {msg}")

        if self.generator not in GENERATORS:
            bad(f"generator={self.generator!r}; expected one of {GENERATORS}")
        if self.roofline_lm_head not in LM_HEAD_CONVENTIONS:
            bad(f"roofline_lm_head={self.roofline_lm_head!r}; expected one of {LM_HEAD_CONVENTIONS}")
        if self.generator == "shared_prefix":
            groups, plen = int(self.prefix.get("groups", 0)), int(self.prefix.get("len", 0))
            if groups < 1 or plen < 1 or self.requests % groups:
                bad(f"prefix={self.prefix} needs groups >= 1 dividing requests={self.requests} and len >= 1")
        if self.generator == "score_pairs" and self.continuation_len is None:
            bad("generator score_pairs needs continuation_len: [lo, hi]")

    @property
    def max_new_tokens(self) -> int:
        """The largest per-request budget (what sizes a static batch's generate call)."""
        return _range(self.new_tokens)[1]

    def build(self) -> Requests:
        """Every request of the workload, in submission order."""
        rng = random.Random(self.seed)
        vocab = int(self.model["vocab_size"])
        lo, hi = self.prompt_len
        id_lo, id_hi = self.token_ids or (3, vocab - 1)  # skip ids 0..2 (pad/bos/eos in most vocabs)
        draw = lambda n: [rng.randint(id_lo, id_hi) for _ in range(n)]  # noqa: E731
        continuations = None
        cached = [0] * self.requests
        if self.generator == "nano_vllm":
            # bench.py: [[randint(0, 10000) for _ in range(randint(100, 1024))] for _ in range(256)], then
            # [SamplingParams(..., max_tokens=randint(100, 1024)) for _ in range(256)]: lengths before their ids.
            prompts = [[rng.randint(id_lo, id_hi) for _ in range(rng.randint(lo, hi))] for _ in range(self.requests)]
        elif self.generator == "shared_prefix":
            groups, plen = int(self.prefix["groups"]), int(self.prefix["len"])
            per_group = self.requests // groups
            prefixes = [draw(plen) for _ in range(groups)]
            prompts = [prefixes[i // per_group] + draw(rng.randint(lo, hi)) for i in range(self.requests)]
            cached = [0 if i % per_group == 0 else plen for i in range(self.requests)]
        elif self.generator == "score_pairs":
            c_lo, c_hi = self.continuation_len
            prompts, continuations = [], []
            for _ in range(self.requests):
                prompts.append(draw(rng.randint(lo, hi)))
                continuations.append(draw(rng.randint(c_lo, c_hi)))
        else:
            prompts = [draw(rng.randint(lo, hi)) for _ in range(self.requests)]
        if continuations is not None:
            new_tokens = [0] * self.requests
        elif isinstance(self.new_tokens, int):
            new_tokens = [self.new_tokens] * self.requests
        else:
            new_tokens = [rng.randint(*self.new_tokens) for _ in range(self.requests)]
        if self.expected_output_tokens is not None and sum(new_tokens) != self.expected_output_tokens:
            raise AssertionError(f"workload {self.name}: {sum(new_tokens)} output tokens drawn, the workload "
                                 f"specifies {self.expected_output_tokens}: the generator no longer matches its source")
        return Requests(prompts, new_tokens, cached, continuations)

    def prompts(self) -> list[list[int]]:
        """The prompts (scoring: the contexts), identical for every variant and process."""
        return self.build().prompts

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

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
    """What the roofline needs to know about the model: parameters read and FLOPs per token, KV bytes per token.

    ``matmul_params`` counts every weight a token is multiplied with, all experts included; ``active_matmul_params``
    counts a mixture-of-experts layer's experts at ``active_experts / experts`` of their size (the weights one token
    reads). Both include the LM head (``lm_head_params``) and exclude an untied input embedding.
    """

    params: int  # all parameters
    matmul_params: int  # parameters read (and multiplied) per token: all but an untied input embedding
    kv_bytes_per_token: int
    dtype_bytes: int
    lm_head_params: int = 0
    active_matmul_params: int = 0
    layers: int = 0
    q_heads: int = 0
    head_dim: int = 0
    experts: int = 0  # 0: dense
    active_experts: int = 0
    expert_params: int = 0  # all experts of all layers

    @property
    def attention_flops_per_pair(self) -> int:
        """FLOPs per (query, key) pair over the whole model: QK^T and PV, 2 FLOPs each, per head dimension."""
        return 4 * self.layers * self.q_heads * self.head_dim

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
        experts = int(getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None) or 0)
        active = int(getattr(text, "num_experts_per_tok", None) or 0) if experts else 0
        expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n) if experts else 0
        active_params = matmul_params - expert_params + (expert_params * active // experts if experts else 0)
        return cls(
            params=params, matmul_params=matmul_params, kv_bytes_per_token=kv, dtype_bytes=dtype_bytes,
            lm_head_params=out.weight.numel() if out is not None else 0, active_matmul_params=active_params,
            layers=text.num_hidden_layers, q_heads=heads, head_dim=head_dim,
            experts=experts, active_experts=active, expert_params=expert_params,
        )
