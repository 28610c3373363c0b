"""The physical limit of a workload: prefill at the bf16 matmul rate, decode at the copy bandwidth (BENCHMARKS.md)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

import torch

from bench.workloads import ModelShape

H100_MATMUL_TFLOPS = 790.0
H100_COPY_TBPS = 3.0


@dataclass(frozen=True)
class DeviceRates:
    matmul_tflops: float
    copy_tbps: float
    source: str  # "measured on <device>" or "assumed (H100): <why>"


def graph_ms(fn, iters: int = 20, replays: int = 5, before_timing=None) -> float:
    """GPU milliseconds per call of ``fn``: ``iters`` calls captured in one CUDA graph, replayed ``replays`` times.
    ``before_timing``: called once after the warm-up replay (e.g. a barrier, so that the ranks of a collective start
    the timed replays together)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    if before_timing is not None:
        before_timing()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (iters * replays)


def time_ms(fn, iters: int, warmup: int = 1) -> float:
    """Mean milliseconds of ``fn`` over ``iters`` calls, by CUDA events, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def measure_rates(device: str = "cuda") -> DeviceRates:
    """Best bf16 matmul rate over a few big square shapes, and device-to-device copy bandwidth (read + write bytes)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return DeviceRates(H100_MATMUL_TFLOPS, H100_COPY_TBPS, f"assumed (H100): no GPU on device={device}")
    best = 0.0
    for n in (4096, 8192, 16384):
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        ms = time_ms(lambda: torch.mm(a, b), iters=20 if n < 16384 else 8)
        best = max(best, 2 * n**3 / (ms * 1e-3) / 1e12)
        del a, b
    numel = 1 << 30  # 2 GiB of bf16 per buffer: far beyond L2
    src = torch.empty(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters=20)
    tbps = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12
    del src, dst
    torch.cuda.empty_cache()
    return DeviceRates(round(best, 1), round(tbps, 3), f"measured on {torch.cuda.get_device_name()}")


@dataclass(frozen=True)
class Roofline:
    prefill_s: float
    decode_s: float
    total_s: float
    output_tokens_per_s: float  # the ceiling for this request set
    decode_steps: int
    waves: int
    prefill_flops: float = 0.0  # matmul + attention
    prefill_attention_flops: float = 0.0
    decode_weight_bytes: float = 0.0
    decode_kv_bytes: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _budgets(new_tokens: Union[int, Sequence[int]], n: int) -> list[int]:
    return [int(new_tokens)] * n if isinstance(new_tokens, int) else [int(m) for m in new_tokens]


def prefill_flops(
    shape: ModelShape, prompt_lens: Sequence[int], cached_lens: Optional[Sequence[int]] = None,
    logits_rows: Optional[int] = None,
) -> tuple[float, float]:
    """(all FLOPs, attention FLOPs) of computing the prompt tokens that no earlier request already computed.

    Matmul: ``2 * (active_matmul_params - lm_head_params)`` per computed token plus ``2 * lm_head_params`` per row
    whose logits are kept; ``logits_rows=None`` counts the LM head on every computed token (the convention of the
    published W1-W3 rooflines). Attention: ``4 * layers * q_heads * head_dim`` per causal (query, key) pair; a prompt
    of p tokens whose first c are cached has ``p(p+1)/2 - c(c+1)/2`` pairs.
    """
    cached = list(cached_lens) if cached_lens is not None else [0] * len(prompt_lens)
    computed = sum(p - c for p, c in zip(prompt_lens, cached))
    pairs = sum(p * (p + 1) // 2 - c * (c + 1) // 2 for p, c in zip(prompt_lens, cached))
    active = shape.active_matmul_params or shape.matmul_params
    if logits_rows is None:
        matmul = 2.0 * active * computed
    else:
        matmul = 2.0 * (active - shape.lm_head_params) * computed + 2.0 * shape.lm_head_params * logits_rows
    attention = float(shape.attention_flops_per_pair) * pairs
    return matmul + attention, attention


def decode_steps(new_tokens: Sequence[int], max_num_seqs: int) -> int:
    """Fewest decode steps: every request's ``n - 1`` rows (the first token comes out of the prefill), at most
    ``max_num_seqs`` rows a step, and no request faster than one token a step."""
    rows = [max(n - 1, 0) for n in new_tokens]
    if not rows:
        return 0
    return max(math.ceil(sum(rows) / max_num_seqs), max(rows))


def decode_kv_tokens(prompt_lens: Sequence[int], new_tokens: Sequence[int]) -> int:
    """Context tokens read over all decode rows: at step j (1-based) a request of p prompt tokens reads p + j."""
    total = 0
    for p, n in zip(prompt_lens, new_tokens):
        rows = max(n - 1, 0)
        total += rows * p + rows * (rows + 1) // 2
    return total


def decode_flops(shape: ModelShape, prompt_lens: Sequence[int], new_tokens: Sequence[int]) -> float:
    """FLOPs of the decode rows: ``2 * active_matmul_params`` each, plus attention over the context read."""
    rows = sum(max(n - 1, 0) for n in new_tokens)
    active = shape.active_matmul_params or shape.matmul_params
    return 2.0 * active * rows + float(shape.attention_flops_per_pair) * decode_kv_tokens(prompt_lens, new_tokens)


def model_flops(
    shape: ModelShape, prompt_lens: Sequence[int], new_tokens: Union[int, Sequence[int]],
    cached_lens: Optional[Sequence[int]] = None, logits_rows: Optional[int] = None,
) -> float:
    """The useful FLOPs of a run (the '% matrix rate' numerator): prefill with the LM head only where logits are kept
    (``logits_rows``, default one per request), plus every decode row. Work a prefix cache could skip is not counted."""
    budgets = _budgets(new_tokens, len(prompt_lens))
    rows = len(prompt_lens) if logits_rows is None else logits_rows
    return prefill_flops(shape, prompt_lens, cached_lens, rows)[0] + decode_flops(shape, prompt_lens, budgets)


def roofline(
    prompt_lens: Sequence[int], new_tokens: Union[int, Sequence[int]], shape: ModelShape, rates: DeviceRates,
    max_num_seqs: int, *, cached_lens: Optional[Sequence[int]] = None, logits_rows: Optional[int] = None,
) -> Roofline:
    """Lower bound on time for an idealised schedule.

    Prefill: ``prefill_flops`` at the matmul rate (tokens a prefix cache could serve are not computed). Decode: the
    fewest steps (``decode_steps``), each reading every weight a token uses once (MoE: the active experts only), plus
    the K/V of every context of every decode row, at the copy bandwidth. ``new_tokens``: one budget or one per request.
    """
    budgets = _budgets(new_tokens, len(prompt_lens))
    flops, attention = prefill_flops(shape, prompt_lens, cached_lens, logits_rows)
    prefill_s = flops / (rates.matmul_tflops * 1e12)
    steps = decode_steps(budgets, max_num_seqs)
    weight_bytes = steps * (shape.active_matmul_params or shape.matmul_params) * shape.dtype_bytes
    kv_bytes = float(decode_kv_tokens(prompt_lens, budgets)) * shape.kv_bytes_per_token
    decode_s = (weight_bytes + kv_bytes) / (rates.copy_tbps * 1e12)
    total = prefill_s + decode_s
    out_tok = sum(budgets)
    return Roofline(
        prefill_s=prefill_s,
        decode_s=decode_s,
        total_s=total,
        output_tokens_per_s=out_tok / total if total > 0 else float("nan"),
        decode_steps=steps,
        waves=math.ceil(len(prompt_lens) / max_num_seqs) if prompt_lens else 0,
        prefill_flops=flops,
        prefill_attention_flops=attention,
        decode_weight_bytes=float(weight_bytes),
        decode_kv_bytes=kv_bytes,
    )


def touched_experts_weight_bytes(shape: ModelShape, rows: int) -> float:
    """Weight bytes of one MoE decode step of ``rows`` rows if routing is uniform: an expert is read once if any row
    picks it, so ``experts * (1 - (1 - k/experts)^rows)`` experts per layer are read (all 128 at batch 256)."""
    if not shape.experts:
        return float(shape.matmul_params * shape.dtype_bytes)
    touched = shape.experts * (1.0 - (1.0 - shape.active_experts / shape.experts) ** rows)
    per_expert = shape.expert_params / shape.experts
    return float((shape.matmul_params - shape.expert_params + touched * per_expert) * shape.dtype_bytes)
