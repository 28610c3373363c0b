"""The fused MLP tail kernel (``triton_fused_mlp``): ``(silu(g) * u) @ b (+ r)`` equals the unfused arithmetic, for
every launch configuration, with ``g`` and ``u`` the strided halves of one gate/up product, ``b`` a transposed weight,
ragged row and column counts and a depth that is not a multiple of the key tile. On CPU it runs in Triton's
interpreter (skipped where Triton is not installed)."""

import pytest
import torch

pytest.importorskip("triton")

from async_batching import triton_fused_mlp  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def unfused(g, u, b, r):
    """What the compiled layer computes without the fusion: the activation rounded to the weights' dtype, the
    product rounded, then the residual added."""
    act = (torch.nn.functional.silu(g.double()) * u.double()).to(g.dtype)
    out = (act.double() @ b.double()).to(g.dtype)
    return out if r is None else (out.double() + r.double()).to(g.dtype)


@pytest.mark.parametrize("config", [c for _, c in triton_fused_mlp.CONFIGS], ids=lambda c: "x".join(map(str, c[:3])))
@pytest.mark.parametrize("dtype", [
    pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
    # the interpreter's bf16 products are wrong (numpy has no bf16): bf16 runs compiled, on a GPU
    pytest.param(torch.bfloat16, id="bf16", marks=[pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cpu", reason="needs CUDA")]),
])
@pytest.mark.parametrize("M,K,N", [(1, 128, 64), (37, 96, 130), (130, 192, 72)])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_tail_equals_silu_mul_then_product_then_residual_add(config, dtype, M, K, N, residual):
    torch.manual_seed(M * 7 + K + N)
    gu = torch.randn(M, 2 * K, device=DEVICE).to(dtype)
    g, u = gu[:, :K], gu[:, K:]  # the gate/up product's halves: row stride 2K
    w = (torch.randn(N, K, device=DEVICE) / K ** 0.5).to(dtype)  # the down projection's weight [out, in]
    r = torch.randn(M, N, device=DEVICE).to(dtype) if residual else None
    got = triton_fused_mlp.silu_mul_mm(g, u, w.t(), r, config=config)
    want = unfused(g, u, w.t(), r)
    assert got.shape == (M, N) and got.dtype == dtype
    if dtype == torch.float32:  # full-precision products: only the summation order differs
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # one rounding of the product may land on the neighbouring 16-bit value
        torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=2e-2)


def test_launches_are_picked_by_row_count_from_the_table():
    bounds = [bound for bound, _ in triton_fused_mlp.CONFIGS]
    assert bounds == sorted(bounds)
    for bound, cfg in triton_fused_mlp.CONFIGS[:-1]:
        assert triton_fused_mlp.config_for(bound) == cfg and triton_fused_mlp.config_for(bound + 1) != cfg
    assert triton_fused_mlp.config_for(10 ** 7) == triton_fused_mlp.CONFIGS[-1][1]


def test_zero_rows_give_an_empty_result():
    g = torch.zeros(0, 64, device=DEVICE)
    assert triton_fused_mlp.silu_mul_mm(g, g, torch.zeros(64, 32, device=DEVICE)).shape == (0, 32)
