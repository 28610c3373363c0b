"""The physical limit of a workload: prefill at the bf16 matmul rate, decode at the copy bandwidth (BENCHMARKS.md)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from bench.workloads import ModelShape

H100_MATMUL_TFLOPS = 790.0
H100_COPY_TBPS = 3.0


@dataclass(frozen=True)
class DeviceRates:
    matmul_tflops: float
    copy_tbps: float
    source: str  # "measured on <device>" or "assumed (H100): <why>"


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

    def as_dict(self) -> dict:
        return asdict(self)


def roofline(prompt_lens: Sequence[int], new_tokens: int, shape: ModelShape, rates: DeviceRates, max_num_seqs: int) -> Roofline:
    """Lower bound on time for an idealised schedule.

    Prefill: ``2 * matmul_params * prompt_tokens`` FLOPs. Decode: requests run together in waves of at most
    ``max_num_seqs`` (input order); each of the ``new_tokens - 1`` steps of a wave reads every weight once plus the
    K/V of every context in the wave (the first new token comes out of the prefill).
    """
    prompt_tokens = sum(prompt_lens)
    prefill_s = 2 * shape.matmul_params * prompt_tokens / (rates.matmul_tflops * 1e12)
    steps_per_wave = max(new_tokens - 1, 0)
    weight_bytes = shape.matmul_params * shape.dtype_bytes
    waves = math.ceil(len(prompt_lens) / max_num_seqs) if prompt_lens else 0
    decode_bytes = 0.0
    for w in range(waves):
        wave = prompt_lens[w * max_num_seqs : (w + 1) * max_num_seqs]
        # context read at step j (1-based) of request i: p_i + j tokens
        kv_tokens = steps_per_wave * sum(wave) + len(wave) * steps_per_wave * (steps_per_wave + 1) / 2
        decode_bytes += steps_per_wave * weight_bytes + kv_tokens * shape.kv_bytes_per_token
    decode_s = decode_bytes / (rates.copy_tbps * 1e12)
    total = prefill_s + decode_s
    out_tok = len(prompt_lens) * new_tokens
    return Roofline(
        prefill_s=prefill_s,
        decode_s=decode_s,
        total_s=total,
        output_tokens_per_s=out_tok / total if total > 0 else float("nan"),
        decode_steps=waves * steps_per_wave,
        waves=waves,
    )
