"""The tail of a gated MLP as one Triton kernel: ``out = (silu(g) * u) @ b``, plus ``r`` when given.

``g`` and ``u`` are ``[M, K]`` (any strides: in the engine they are the two halves of the fused gate/up product),
``b`` is ``[K, N]`` (the down projection's weight, transposed: a view), ``r`` ``[M, N]`` (the residual stream).
Unfused, a decode step runs this as three kernels a layer (inductor's silu-mul, the down product, the residual add)
and writes and reads the ``[M, K]`` activation in between; here each program computes its tile of the activation
from ``g`` and ``u`` as it loads them (fp32, rounded to the weight's dtype as the unfused kernel stores it), feeds it
to the matrix unit, and adds the residual to the rounded product (as the unfused add does).

Launches are picked by ``M`` alone from ``CONFIGS`` (few, so that the engine's graph captures at start-up compile
every one a run can use: ``M`` itself is not specialised).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["M"])
def _silu_mul_mm_kernel(g_ptr, u_ptr, b_ptr, r_ptr, c_ptr, M, N, K,
                        s_gm, s_gk, s_um, s_uk, s_bk, s_bn, s_rm, s_rn, s_cm, s_cn,
                        HAS_R: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n  # programs of GROUP_M row tiles run together: their b tiles are shared in L2
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mask_m = rm < M
    mask_n = rn < N
    g_ptrs = g_ptr + rm[:, None].to(tl.int64) * s_gm + rk[None, :] * s_gk
    u_ptrs = u_ptr + rm[:, None].to(tl.int64) * s_um + rk[None, :] * s_uk
    b_ptrs = b_ptr + rk[:, None] * s_bk + rn[None, :] * s_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            g = tl.load(g_ptrs, mask=mask_m[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            mk = (k0 + rk) < K
            g = tl.load(g_ptrs, mask=mask_m[:, None] & mk[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=mask_m[:, None] & mk[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mk[:, None] & mask_n[None, :], other=0.0)
        gf = g.to(tl.float32)
        a = (gf * tl.sigmoid(gf) * u.to(tl.float32)).to(b.dtype)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        g_ptrs += BK * s_gk
        u_ptrs += BK * s_uk
        b_ptrs += BK * s_bk
    out = acc.to(c_ptr.dtype.element_ty)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_R:
        r = tl.load(r_ptr + rm[:, None].to(tl.int64) * s_rm + rn[None, :] * s_rn, mask=mask, other=0.0)
        out = (out.to(tl.float32) + r.to(tl.float32)).to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * s_cm + rn[None, :] * s_cn, out, mask=mask)


# (largest M, (BM, BN, BK, GROUP_M, num_warps, num_stages)), the first whose M bound fits; fp32 inputs take a third
# of the stages (their tiles are twice the bytes and the dot runs in full precision). Chosen on the H200 with
# recipes/bench/fused_mlp_tuning.py (docs/results/fused_mlp_h200.md).
CONFIGS: list[tuple[int, tuple[int, int, int, int, int, int]]] = [
    (32, (16, 64, 128, 1, 4, 4)),
    (1024, (64, 64, 64, 8, 4, 4)),
    (1 << 62, (128, 128, 64, 8, 8, 3)),
]


def config_for(m: int) -> tuple[int, int, int, int, int, int]:
    for bound, cfg in CONFIGS:
        if m <= bound:
            return cfg
    return CONFIGS[-1][1]


def silu_mul_mm(g: torch.Tensor, u: torch.Tensor, b: torch.Tensor, r: Optional[torch.Tensor] = None,
                config: Optional[tuple] = None) -> torch.Tensor:
    """``(silu(g) * u) @ b (+ r)`` in one launch (``config``: a ``CONFIGS`` entry's launch, else by ``M``)."""
    M, K = g.shape
    N = b.shape[1]
    out = torch.empty((M, N), device=g.device, dtype=g.dtype)
    if M == 0:
        return out
    bm, bn, bk, group_m, warps, stages = config or config_for(M)
    ieee = g.dtype == torch.float32
    if ieee:
        stages = max(1, stages // 3)
    rr = r if r is not None else out
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _silu_mul_mm_kernel[grid](g, u, b, rr, out, M, N, K,
                              g.stride(0), g.stride(1), u.stride(0), u.stride(1), b.stride(0), b.stride(1),
                              rr.stride(0), rr.stride(1), out.stride(0), out.stride(1),
                              HAS_R=r is not None, IEEE=ieee, EVEN_K=K % bk == 0,
                              BM=bm, BN=bn, BK=bk, GROUP_M=group_m, num_warps=warps, num_stages=stages)
    return out
