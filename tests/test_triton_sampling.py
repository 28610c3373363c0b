"""The fused Triton draws (``triton_sampling``) draw exactly the tokens of the torch draws (same noise bits), for
top-k (with top-p, min-p and ties at the k-th value) and for rows without top-k (temperature, min-p); float32 and
bf16 logits. On CPU they run in Triton's interpreter (skipped where Triton is not installed)."""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from async_batching import triton_sampling  # noqa: E402
from async_batching.request import SamplingParams  # noqa: E402
from async_batching.sampling import SamplingState, _draw_full, _draw_top_k, sampling_inputs, stage_sampling, stream_seed  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Row:
    """What ``stage_sampling`` reads of a request."""

    def __init__(self, sp, i):
        self.sampling, self.seed, self.num_generated, self.row, self.uid = sp, stream_seed(3, i), 5, i + 1, i
        self.num_preemptions, self.prompt_ids, self.output_ids, self.num_known = 0, [1, 2], [], 2


def group(sp, n, V):
    plan, arrays = stage_sampling([Row(sp, i) for i in range(n)], SamplingState(n + 2, V))
    flat = torch.from_numpy(np.concatenate([a for _, a in arrays])).to(DEVICE)
    offsets, at = {}, 0
    for name, a in arrays:
        offsets[name] = (at, len(a))
        at += len(a)
    inputs = sampling_inputs(plan, lambda name: flat[offsets[name][0]:offsets[name][0] + offsets[name][1]])
    return inputs.top_k or inputs.full


@pytest.mark.parametrize("sp", [
    SamplingParams(temperature=0.8, top_k=50, top_p=0.95), SamplingParams(temperature=1.3, top_k=7),
    SamplingParams(temperature=0.7, top_k=20, min_p=0.1), SamplingParams(temperature=0.9),
    SamplingParams(temperature=0.6, min_p=0.05),
], ids=["topk+topp", "topk", "topk+minp", "temperature", "minp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("V", [3000, 10000], ids=["one-chunk", "three-chunks"])
@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass-mass", "two-pass-mass"])
def test_fused_draws_equal_the_torch_draws(sp, dtype, V, one_pass, monkeypatch):
    if one_pass is False and (sp.top_k or sp.min_p):
        pytest.skip("the mass kernel's form matters only to rows without top-k and min-p")
    monkeypatch.setattr(triton_sampling, "ONE_PASS_MASS", one_pass)
    logits = (torch.randn(16, V, generator=torch.Generator().manual_seed(1)) * 2.5).to(dtype)
    logits[:, :40] = logits[:, 40:80]  # equal logits
    logits = logits.to(DEVICE)
    g = group(sp, 16, V)
    if sp.top_k:
        want = _draw_top_k(logits, g)
        got = triton_sampling.draw_top_k(logits, None, g.temperature, g.top_k, g.top_p, g.min_p, g.lo, g.hi,
                                         g.plan.top_k_max)
    else:
        want = _draw_full(logits, g)
        got = triton_sampling.draw_full(logits, None, g.temperature, g.min_p, g.lo, g.hi)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("sp", [SamplingParams(temperature=1.0, top_k=3),
                                SamplingParams(temperature=1.0, top_k=5, top_p=0.7)], ids=["topk", "topk+topp"])
def test_fused_bucket_of_ties_draws_members_outside_the_candidates(sp):
    V = 3000
    logits = torch.randint(0, 4, (64, V), generator=torch.Generator().manual_seed(3)).float().to(DEVICE)
    g = group(sp, 64, V)
    got = triton_sampling.draw_top_k(logits, None, g.temperature, g.top_k, g.top_p, g.min_p, g.lo, g.hi,
                                     g.plan.top_k_max)
    assert got.tolist() == _draw_top_k(logits, g).tolist()
    candidates = torch.topk(logits, sp.top_k).indices
    assert any(int(t) not in c.tolist() for t, c in zip(got, candidates)), "the tie bucket never won"
    assert bool((logits.gather(1, got[:, None]) == logits.max(-1, keepdim=True).values).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("V", [1000, 9000], ids=["one-chunk", "three-chunks"])
def test_triton_argmax_equals_torch_argmax_with_ties_infinities_and_nans(dtype, V):
    """``argmax_into`` (greedy steps' tokens, written as int32 into a buffer, from logits with a row stride) gives
    torch.argmax's index on every row: the first of tied maxima wherever they fall (one chunk, chunks apart), rows of
    -inf only, +inf, NaN (torch's largest: the first NaN wins, even over +inf, in any chunk), negative maxima, and
    -0.0 tied with 0.0."""
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-50, 50, (12, V + 7), generator=g).float()
    x[0, 3] = x[0, 5000 % V] = x[0, V - 1] = 99  # ties: the first
    x[1, :] = 7.0  # every value tied: index 0
    x[2, :] = float("-inf")
    x[3, V // 2] = float("inf")
    x[4, V // 3] = float("nan")
    x[4, 5] = float("inf")  # NaN beats +inf
    x[5, [V - 2, 11, V // 2]] = float("nan")  # the first NaN
    x[6, 4096 % V] = x[6, V - 3] = 120  # the same value in two chunks (V > 4096), or in one
    x[7, V - 1] = float("nan")  # a NaN in the last chunk beats every number before it
    x[8, :] = float("-inf")
    x[8, V - 1] = -1e30  # the only finite value, in the last chunk
    x[9, :] = -3.0
    x[9, [V - 1, 7]] = 0.0
    x[9, 2] = -0.0  # -0.0 and 0.0 tie (torch compares them equal): the first
    x[10, :] = -5.0
    x[10, [V // 2, V - 4]] = -1.0  # negative maxima: the first
    x = x.to(dtype).to(DEVICE)[:, :V]  # a row stride longer than the row
    out = torch.full((16,), -1, dtype=torch.int32, device=DEVICE)
    got = triton_sampling.argmax_into(x, out)
    assert got.dtype == torch.int32 and got.data_ptr() == out.data_ptr() and out[12:].tolist() == [-1] * 4
    assert got.tolist() == x.argmax(dim=-1).tolist()
