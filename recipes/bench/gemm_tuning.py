"""The decode steps' matrix products: cuBLAS (``F.linear``) against a split-K Triton kernel (below) over a sweep of
launches (``CANDIDATES``), each timed inside a CUDA graph over weights that do not fit in L2 (as a decode step reads
each layer's weights from memory once), at the row counts the decode graphs run.

The kernel cuts each output tile's K range into ``split_k`` parts run by separate programs; each stores its float32
partial sum and the last of a tile's splits to finish (an atomic counter, as the paged attention kernel merges its KV
splits) adds them in split order and writes the output, in one launch. The idea: cuBLAS tiles the output only, so a
256 x 1024 output makes 16-32 programs on 132 SMs, each walking all of K in sequence. Measured on an H200 (session 9,
docs/results/gemm_tuning_h200.md) it did not pay: with the weights read from memory, as in a decode step, cuBLAS was
as fast or faster on every W1, W2 and W7 product at 256-512 rows (earlier "% of bound" figures were timed with the
weights in L2), and the best launch gained 2-7% of a step's products only at 32-128 rows. So the engine keeps cuBLAS;
the kernel stays here as the record of the experiment.

    python recipes/bench/gemm_tuning.py [--out FILE.json] [--only W7]

Prints a table per workload: each product's cuBLAS time, the best Triton launch and its time, and a step's total.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.roofline import graph_ms  # noqa: E402


@triton.jit
def _split_k_matmul_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, counters_ptr,
    M, N, K, k_per_split, split_k,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    """y[M, N] = x[M, K] @ w[N, K]^T (+ b): program (n tile, m tile, split) sums ``k_per_split`` columns of K (a
    multiple of BLOCK_K). The split count is a run-time argument, so one compiled variant serves every split."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_valid = offs_m < M
    n_valid = offs_n < N
    k0 = split * k_per_split
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k0 + offs_k)[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + (k0 + offs_k)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, k_per_split, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=m_valid[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=n_valid[None, :], other=0.0)
        else:
            k_valid = (k0 + k + offs_k) < K
            a = tl.load(x_ptrs, mask=m_valid[:, None] & k_valid[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=n_valid[None, :] & k_valid[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out_mask = m_valid[:, None] & n_valid[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    if split_k == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Partial sums at [split, m, n]. Every thread's stores precede the barrier; the counter's acq_rel atomic
        # releases them to, and acquires them for, the tile's last split, whose loads bypass L1 (.cg). It adds the
        # partials in split order (the result does not depend on who finished last) and puts the counter back to 0
        # for the next launch.
        part = part_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(part + split.to(tl.int64) * M * N, acc, mask=out_mask)
        tl.debug_barrier()
        lock = counters_ptr + pid_m * tl.num_programs(0) + pid_n
        if tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu") == split_k - 1:
            tl.atomic_xchg(lock, 0, sem="relaxed", scope="gpu")
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(0, split_k):
                total += tl.load(part + s * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=out_mask)


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __str__(self) -> str:
        return (f"m{self.block_m} n{self.block_n} k{self.block_k} split{self.split_k} "
                f"w{self.num_warps} s{self.num_stages}")


# The launches tried per product shape: output tiles of 16-128 rows and 32-128 columns, the K range in 1-8 parts.
CANDIDATES = tuple(
    MatmulConfig(bm, bn, bk, sk, nw, ns)
    for bm in (16, 32, 64, 128)
    for bn in (32, 64, 128)
    for bk in (64, 128)
    for sk in (1, 2, 4, 8)
    for nw, ns in ((4, 3), (8, 3), (4, 5))
)


def counters(device: torch.device, n: int = 4096) -> torch.Tensor:
    """Zeroed int32 counters for the split-K reduction (one per output tile), left at zero by every launch. Owned
    by a caller that launches in order on one stream."""
    return torch.zeros(n, dtype=torch.int32, device=device)


def matmul(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], cfg: MatmulConfig,
           counter: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for 2-D ``x`` [M, K] (row stride free, K contiguous) and ``w`` [N, K] (contiguous
    rows), with launch ``cfg``; ``counter`` from ``counters()``, at least one per output tile."""
    M, K = x.shape
    N = w.shape[0]
    assert w.shape[1] == K and x.stride(1) == 1 and w.stride(1) == 1, "x [M, K] and w [N, K], K contiguous"
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    grid_n, grid_m = triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m)
    k_per_split = triton.cdiv(triton.cdiv(K, cfg.split_k), cfg.block_k) * cfg.block_k
    if cfg.split_k > 1:
        assert counter.numel() >= grid_n * grid_m, "too few split-K counters for this launch"
        part = torch.empty((cfg.split_k, M, N), dtype=torch.float32, device=x.device)
    else:
        part = counter  # never touched
    _split_k_matmul_kernel[(grid_n, grid_m, cfg.split_k)](
        x, w, bias if bias is not None else w, y, part, counter,
        M, N, K, k_per_split, cfg.split_k,
        x.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=k_per_split * cfg.split_k == K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y



# workload: (layers, rows to try, [(product, K, N, per layer?)]) with q/k/v and gate/up fused, as the engine runs them
SHAPES = {
    "W1": (30, (512, 128), [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576),
                                ("lm_head", 576, 49152)]),
    "W2": (16, (256, 64), [("qkv", 2048, 3072), ("o", 2048, 2048), ("gate_up", 2048, 16384), ("down", 8192, 2048),
                           ("lm_head", 2048, 128256)]),
    "W7": (28, (256, 64), [("qkv", 1024, 4096), ("o", 2048, 1024), ("gate_up", 1024, 6144),
                                    ("down", 3072, 1024), ("lm_head", 1024, 151936)]),
    "W3": (32, (32,), [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096),
                         ("lm_head", 4096, 128256)]),
}
ITERS = 20


def _weights(n: int, k: int, dev, dt) -> list[torch.Tensor]:
    """Enough distinct copies of an [n, k] weight that ITERS products read ~256 MB (beyond the 60 MB L2)."""
    copies = max(1, min(ITERS, -(-(256 << 20) // (n * k * 2))))
    return [torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5 for _ in range(copies)]


def _time(fn_for_weight, ws) -> float:
    calls = [0]

    def step():
        fn_for_weight(ws[calls[0] % len(ws)])
        calls[0] += 1

    return graph_ms(step, iters=ITERS) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None, help="comma-separated workloads (W1,W2,W7,W3)")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    counter = counters(dev, 1 << 16)
    rows = []
    t0 = time.time()
    for wl, (layers, ms, products) in SHAPES.items():
        if args.only and wl not in args.only.split(","):
            continue
        for m in ms:
            print(f"\n## {wl}, {m} rows ({layers} layers)\n")
            print("| product | K x N | cuBLAS us | best Triton us | launch | speed-up | max abs err |")
            print("|---|---|---|---|---|---|---|")
            step = {"cublas": 0.0, "best": 0.0}
            for name, k, n in products:
                ws = _weights(n, k, dev, dt)
                x = torch.randn(m, k, device=dev, dtype=dt)
                base = _time(lambda w: F.linear(x, w), ws)
                ref = F.linear(x, ws[0]).float()
                best, best_cfg, err = base, None, 0.0
                timings = {}
                for cfg in CANDIDATES:
                    if cfg.block_m > max(16, _next_pow2(m)) or _cdiv(n, cfg.block_n) * \
                            _cdiv(m, cfg.block_m) > counter.numel():
                        continue
                    try:
                        us = _time(lambda w, cfg=cfg: matmul(x, w, None, cfg, counter), ws)
                    except Exception as e:  # noqa: BLE001 -- a launch that does not fit (shared memory) is skipped
                        timings[str(cfg)] = repr(e)[:80]
                        continue
                    timings[str(cfg)] = us
                    if us < best:
                        y = matmul(x, ws[0], None, cfg, counter).float()
                        e = (y - ref).abs().max().item()
                        if e <= 0.02 * ref.abs().max().item():
                            best, best_cfg, err = us, cfg, e
                assert int(counter.abs().sum()) == 0, "split-K counters not left at zero"
                times = 1 if name == "lm_head" else layers
                step["cublas"] += base * times
                step["best"] += best * times
                print(f"| {name} | {k} x {n} | {base:.1f} | {best:.1f} | {best_cfg or 'cuBLAS'} | "
                      f"{base / best:.2f}x | {err:.3g} |", flush=True)
                rows.append({"workload": wl, "m": m, "name": name, "k": k, "n": n, "cublas_us": base, "best_us": best,
                             "best": None if best_cfg is None else best_cfg.__dict__, "timings": timings})
            print(f"\nA step's products: cuBLAS {step['cublas'] / 1e3:.3f} ms, best of both "
                  f"{step['best'] / 1e3:.3f} ms ({step['cublas'] / step['best']:.2f}x). [{time.time() - t0:.0f} s]")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(a: int) -> int:
    return 1 << (a - 1).bit_length()


if __name__ == "__main__":
    main()
