"""Triton paged attention (and the torch path of attention.py) against a pure-torch float64 oracle.

Without CUDA the kernels run in Triton's CPU interpreter (fp32 at 1e-4, fp16 at 1e-2).  The interpreter is chosen
when ``triton.jit`` decorates a function -- triton's own helpers included -- so TRITON_INTERPRET=1 must be in the
environment before triton is first imported: that is why it is set at the very top of this module (if triton was
imported earlier without it, one test reruns this file in a fresh process instead).  With CUDA the same cases run
compiled, in fp32, fp16 and (marked ``gpu``) bf16, plus GPU-only realistic-size and CUDA-graph tests.
"""

import math
import os
import subprocess
import sys

import torch

# Must happen before `import triton` / importing the kernel module (see module docstring).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from async_batching import triton_paged_attention as tpa  # noqa: E402
from engine_helpers import record_launches  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# In a full CPU run another test module (e.g. via lightning -> torch) may import triton first; triton's own @jit
# helpers (tl.max, tl.cdiv, ...) are then compiled-mode functions that interpreted kernels cannot call.  The cases
# below are then skipped here and run by one test in a fresh interpreter process instead (see end of module).
DELEGATED = INTERPRET and type(tl.cdiv).__name__ != "InterpretedFunction"

ON_GPU = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if ON_GPU else "cpu"

# (dtype, tolerance) per backend.  fp16 also runs in the interpreter: 16-bit inputs select the 64-row prefill tiles
# (fp32 uses 16-row ones), so this covers that configuration on CPU.  bf16 only makes sense compiled on a GPU.
BACKENDS = [
    pytest.param((torch.float32, 1e-4), id="fp32"),
    pytest.param((torch.float16, 1e-2), id="fp16"),
    pytest.param((torch.bfloat16, 2e-2), id="bf16",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs CUDA")]),
]


def paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len: int,
                              scale: float, sliding_window: int = 0, softcap: float = 0.0, out=None, sinks=None):
    """Oracle: gather each sequence's keys through its block table, mask, softmax in float64.

    ``sinks [H]``: as gpt-oss's eager attention, one more logit per head in the softmax, dropped before the values."""
    T, H, D = q.shape
    _, block_size, KVH, _ = k_cache.shape
    G = H // KVH
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for i, L in enumerate(lens):
        s0, s1 = qsl[i], qsl[i + 1]
        if s1 == s0:
            continue
        blocks = block_tables[i, : (L + block_size - 1) // block_size].long()
        k = k_cache[blocks].reshape(-1, KVH, D)[:L].double().repeat_interleave(G, dim=1)  # [L, H, D]
        v = v_cache[blocks].reshape(-1, KVH, D)[:L].double().repeat_interleave(G, dim=1)
        qi = q[s0:s1].double()
        scores = torch.einsum("qhd,khd->hqk", qi, k) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(L - (s1 - s0), L, device=q.device)[:, None]
        k_pos = torch.arange(L, device=q.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window:
            allowed &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        if sinks is not None:
            sink_col = sinks.double()[:, None, None].expand(H, s1 - s0, 1)
            probs = torch.cat([scores, sink_col], dim=-1).softmax(-1)[..., :-1]
        else:
            probs = scores.softmax(-1)
        out[s0:s1] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
    return out


def make_batch(specs, *, num_kv_heads=2, group=2, head_dim=32, block_size=16, dtype=torch.float32, seed=0,
               extra_rows=0):
    """Random paged cache + packed queries for `specs` = [(seq_len, q_len), ...]; physical blocks are shuffled.

    q is a non-contiguous view into a fused qkv-like buffer, as the engine produces.  Block-table entries past each
    sequence's blocks are -1, and every cache slot outside a sequence's context (block 0, unowned blocks, the tail of
    each last block) is NaN, so any read the kernel should not make poisons the result.
    """
    g = torch.Generator().manual_seed(seed)
    H = num_kv_heads * group
    nblocks = [max(1, math.ceil(L / block_size)) for L, _ in specs]
    total_blocks = sum(nblocks) + 3  # block 0 (what a masked block-table load falls back to) + 2 nobody owns
    perm = 1 + torch.randperm(total_blocks - 1, generator=g)
    width = max(nblocks) + 2
    block_tables = torch.full((len(specs), width), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(nblocks):
        block_tables[i, :n] = perm[used:used + n].int()
        used += n
    shape = (total_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    owned = torch.zeros(total_blocks * block_size, dtype=torch.bool)
    for i, (L, _) in enumerate(specs):
        blocks = block_tables[i, : math.ceil(L / block_size)].long()
        slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:L]
        owned[slots] = True
    for cache in (k_cache, v_cache):
        cache.view(-1, num_kv_heads, head_dim)[~owned] = float("nan")
    q_lens = [ql for _, ql in specs]
    T = sum(q_lens) + extra_rows
    fused = torch.randn(T, (H + 2 * num_kv_heads) * head_dim, generator=g).to(dtype)
    q = fused[:, : H * head_dim].view(T, H, head_dim)
    query_start_loc = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    seq_lens = torch.tensor([L for L, _ in specs], dtype=torch.int32)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens,
                query_start_loc=query_start_loc)
    return {k: v.to(DEVICE) for k, v in args.items()}, max(q_lens)


def check(specs, backend, *, scale=None, sliding_window=0, softcap=0.0, num_kv_splits=0, sinks=None, **batch_kw):
    """Run kernel and oracle on one batch; every output row must be written and match."""
    dtype, tol = backend
    args, max_q = make_batch(specs, dtype=dtype, **batch_kw)
    head_dim = args["q"].shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if sinks is not None:
        sinks = sinks.to(DEVICE)
    out = torch.full(args["q"].shape, float("nan"), dtype=dtype, device=DEVICE)
    tpa.paged_attention(**args, max_query_len=max_q, scale=scale, sliding_window=sliding_window, softcap=softcap,
                        out=out, num_kv_splits=num_kv_splits, sinks=sinks)
    ref = paged_attention_reference(**args, max_query_len=max_q, scale=scale, sliding_window=sliding_window,
                                    softcap=softcap, sinks=sinks)
    assert not out.isnan().any(), "some output rows were not written"
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_decode_over_contexts_of_various_lengths(backend, block_size):
    check([(1, 1), (7, 1), (16, 1), (33, 1), (70, 1)], backend, block_size=block_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [16, 64])
def test_a_head_major_cache_given_as_a_strided_view_gives_the_same_output_bit_for_bit(backend, block_size):
    """The kernel reads the cache through its strides: the same K/V stored head-major in each block ([block, kv head,
    slot, dim], a head's keys of a block contiguous) and handed over as a [block, slot, kv head, dim] view gives the
    engine's layout's output exactly (decode rows and a prefill chunk; the layout the tuning sweep times)."""
    dtype, tol = backend
    args, max_q = make_batch([(70, 1), (33, 1), (45, 12), (5, 1)], dtype=dtype, block_size=block_size,
                             num_kv_heads=3, group=3)
    scale = 1.0 / math.sqrt(args["q"].shape[-1])
    token_major = tpa.paged_attention(**args, max_query_len=max_q, scale=scale)
    head_major = {name: args[name].permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
                  for name in ("k_cache", "v_cache")}
    assert head_major["k_cache"].stride(1) == args["q"].shape[-1] and not head_major["k_cache"].is_contiguous()
    out = tpa.paged_attention(**{**args, **head_major}, max_query_len=max_q, scale=scale)
    assert not token_major.isnan().any()
    assert torch.equal(out, token_major)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_chunk_continues_existing_context(backend):
    check([(40, 13), (25, 9)], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_prompts_attend_causally_to_themselves(backend):
    check([(19, 19), (1, 1), (37, 37)], backend, block_size=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_decode_chunk_and_prompt_in_one_call(backend):
    check([(50, 1), (30, 30), (45, 12), (3, 1), (17, 17)], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", [1, 2, 4])
def test_gqa_query_heads_share_their_kv_head(backend, group):
    check([(21, 1), (26, 26), (40, 7)], backend, num_kv_heads=2, group=group)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", [16, 64, 96])
def test_head_dims_including_non_power_of_two(backend, head_dim):
    check([(23, 1), (18, 18), (35, 6)], backend, head_dim=head_dim, num_kv_heads=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [1, 4, 17])
def test_sliding_window_limits_keys_to_last_w_positions(backend, window):
    check([(60, 1), (40, 40), (75, 20), (5, 1)], backend, sliding_window=window)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_caps_logits_before_masking(backend):
    # Large scale pushes logits well past the cap so tanh saturation matters.
    check([(33, 1), (20, 20), (41, 9)], backend, scale=1.0, softcap=5.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_default_scale(backend):
    check([(29, 1), (22, 22)], backend, scale=0.37)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("splits", [2, 4])
def test_split_kv_merges_to_the_unsplit_result(backend, splits):
    # Includes a sequence shorter than one split (empty splits) and a windowed variant.
    specs = [(150, 1), (3, 1), (90, 5), (70, 1)]
    check(specs, backend, num_kv_splits=splits, group=4)
    check(specs, backend, num_kv_splits=splits, group=4, sliding_window=20, softcap=8.0)


def sink_logits(num_heads: int, seed: int = 0) -> torch.Tensor:
    """Sinks spanning the range where they matter: from negligible (-6) to dominating real keys' logits (+6)."""
    g = torch.Generator().manual_seed(seed)
    return torch.linspace(-6.0, 6.0, num_heads)[torch.randperm(num_heads, generator=g)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [0, 17])
@pytest.mark.parametrize("group", [1, 4])
def test_sinks_join_the_softmax_denominator(backend, window, group):
    specs = [(50, 1), (30, 30), (45, 12), (3, 1), (17, 17)]
    out = check(specs, backend, sliding_window=window, group=group, sinks=sink_logits(2 * group))
    # The sinks must matter here, or the comparison above would not test them.
    args, max_q = make_batch(specs, dtype=backend[0], group=group)
    plain = paged_attention_reference(**args, max_query_len=max_q, scale=1 / math.sqrt(32), sliding_window=window)
    assert (out.float() - plain.float()).abs().max() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_merge_leaves_the_callers_counters_at_zero_for_the_next_launch(backend):
    # The last split of each tile merges and resets its counter: the same buffer serves launch after launch (layers,
    # graph replays) and each gives the unsplit result.
    _launches_match_and_leave_counters_at_zero(backend, [(150, 1), (3, 1), (90, 5), (70, 1)], (4, 2, 4))


def _launches_match_and_leave_counters_at_zero(backend, specs, split_counts):
    """One counters buffer for launch after launch with these KV split counts: each launch equals the reference
    and leaves every counter at zero."""
    dtype, tol = backend
    args, max_q = make_batch(specs, dtype=dtype, group=4)
    counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    ref = paged_attention_reference(**args, max_query_len=max_q, scale=0.2)
    for splits in split_counts:
        out = torch.full(args["q"].shape, float("nan"), dtype=dtype, device=DEVICE)
        tpa.paged_attention(**args, max_query_len=max_q, scale=0.2, out=out, num_kv_splits=splits,
                            split_counters=counters)
        assert counters.eq(0).all(), f"counters left at {counters.nonzero().flatten().tolist()}"
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", [dict(heads_first=True), dict(longest_first=True),
                                   dict(heads_first=True, longest_first=True)])
def test_tuning_grid_orders_give_the_same_attention_and_leave_counters_at_zero(backend, order, monkeypatch):
    """The sweep's grid orders (kv heads first; longest context first) map programs to the same (sequence, query
    block, head, split) work: results equal the reference, with and without KV splits, and the split merge counts in
    the same counters (left at zero)."""
    monkeypatch.setattr(tpa, "TUNING", dict(order))
    _launches_match_and_leave_counters_at_zero(backend, [(150, 1), (3, 1), (90, 5), (70, 1), (12, 12)], (1, 2, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_given_sequence_order_gives_the_same_attention(backend, monkeypatch):
    """The sweep hands the kernel its longest-first order computed once (``TUNING["order"]``), as the engine would stage
    it, instead of an argsort per launch: any permutation of the sequences maps each program to the same work, and the
    programs follow the order they are given (all sent to one sequence, the other rows stay untouched)."""
    dtype, tol = backend
    specs = [(150, 1), (3, 1), (90, 1), (70, 1), (12, 1)]
    args, max_q = make_batch(specs, dtype=dtype, group=4)
    ref = paged_attention_reference(**args, max_query_len=max_q, scale=0.2)
    for order in ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        monkeypatch.setattr(tpa, "TUNING", dict(order=torch.tensor(order, dtype=torch.int32, device=DEVICE)))
        out = torch.full(args["q"].shape, float("nan"), dtype=dtype, device=DEVICE)
        tpa.paged_attention(**args, max_query_len=max_q, scale=0.2, out=out)
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    # the order is what the programs follow: every program sent to sequence 2 leaves the other rows untouched
    monkeypatch.setattr(tpa, "TUNING", dict(order=torch.full((5,), 2, dtype=torch.int32, device=DEVICE)))
    out = torch.full(args["q"].shape, float("nan"), dtype=dtype, device=DEVICE)
    tpa.paged_attention(**args, max_query_len=max_q, scale=0.2, out=out, num_kv_splits=1)  # one program a (seq, head)
    torch.testing.assert_close(out[2].float(), ref[2].float(), atol=tol, rtol=tol)
    assert out[[0, 1, 3, 4]].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_engines_adapter_hands_the_kernel_the_steps_order_and_register_cap(backend):
    """``attention.triton_paged_attention`` (what the engine calls) passes ``AttentionMetadata.order`` and ``.maxnreg``
    to the kernel: the longest-first order of ``decode_order`` gives the reference, and an order that sends every
    program to one sequence leaves the other rows untouched."""
    from async_batching.attention import AttentionMetadata, decode_order, triton_paged_attention

    dtype, tol = backend
    specs = [(150, 1), (3, 1), (90, 1), (70, 1), (12, 1)]
    args, max_q = make_batch(specs, dtype=dtype, group=4)
    ref = paged_attention_reference(**args, max_query_len=max_q, scale=0.2)
    meta = lambda order: AttentionMetadata(slot_mapping=None, query_start_loc=args["query_start_loc"],  # noqa: E731
                                           seq_lens=args["seq_lens"], block_tables=args["block_tables"],
                                           max_query_len=max_q, order=order, maxnreg=96)
    assert decode_order(args["seq_lens"]).tolist() == [0, 2, 3, 4, 1]
    out = triton_paged_attention(args["q"], args["k_cache"], args["v_cache"], meta(decode_order(args["seq_lens"])),
                                 0.2, 0, 0.0)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    one = torch.full((5,), 3, dtype=torch.int32, device=DEVICE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tpa, "_auto_num_splits", lambda *a, **k: 1)  # one program a (sequence, head): no split merge
        out = triton_paged_attention(args["q"], args["k_cache"], args["v_cache"], meta(one), 0.2, 0, 0.0)
    torch.testing.assert_close(out[3].float(), ref[3].float(), atol=tol, rtol=tol)
    assert out[[0, 1, 2, 4]].isnan().all() or not out[[0, 1, 2, 4]].float().allclose(ref[[0, 1, 2, 4]].float())
    # ``AttentionMetadata.heads_per_program`` (attention.DECODE_HEADS_PER_PROGRAM): the launch goes to the kernel
    # of kv-head groups, a program per sequence and pair of the batch's 4 kv heads
    with pytest.MonkeyPatch.context() as mp:
        launched = record_launches(mp, tpa, "_paged_decode_heads_kernel")
        mp.setattr(tpa, "_auto_num_splits", lambda *a, **k: 1)
        grouped = AttentionMetadata(slot_mapping=None, query_start_loc=args["query_start_loc"],
                                    seq_lens=args["seq_lens"], block_tables=args["block_tables"],
                                    max_query_len=max_q, order=decode_order(args["seq_lens"]), heads_per_program=2)
        out = triton_paged_attention(args["q"], args["k_cache"], args["v_cache"], grouped, 0.2, 0, 0.0)
    assert launched == [(5, args["k_cache"].shape[2] // 2)]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_heavy_first_query_blocks_give_the_same_attention_and_leave_counters_at_zero(backend, monkeypatch):
    """The sweep's ``heavy_first`` (the grid's query blocks last first): each program does the same (sequence, query
    block) work, so results equal the reference on prompts of several query blocks, chunks and decode rows, with and
    without KV splits, and the split merge leaves its counters at zero."""
    monkeypatch.setattr(tpa, "TUNING", dict(heavy_first=True))
    _launches_match_and_leave_counters_at_zero(backend, [(150, 150), (3, 1), (90, 40), (70, 70), (12, 12)], (1, 2, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_register_cap_leaves_the_attention_unchanged(backend, monkeypatch):
    """The sweep's ``maxnreg`` and the engine's decode cap (``paged_attention(maxnreg=)``, from
    ``attention.DECODE_MAXNREG``) change how the kernel is compiled, not what it computes: decode rows, chunks and
    prompts equal the reference, with and without KV splits."""
    monkeypatch.setattr(tpa, "TUNING", dict(maxnreg=128))
    _launches_match_and_leave_counters_at_zero(backend, [(150, 150), (3, 1), (90, 40), (70, 1)], (1, 2))
    monkeypatch.setattr(tpa, "TUNING", {})
    dtype, tol = backend
    args, max_q = make_batch([(150, 1), (3, 1), (70, 1)], dtype=dtype, group=4)
    ref = paged_attention_reference(**args, max_query_len=max_q, scale=0.2)
    for splits in (1, 2):
        out = tpa.paged_attention(**args, max_query_len=max_q, scale=0.2, num_kv_splits=splits, maxnreg=96)
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("warps", [1, 2])
def test_small_decode_programs_give_the_same_attention_as_their_forced_tile(backend, warps, monkeypatch):
    """``paged_attention(decode_warps=)`` (``attention.DECODE_WARPS``): at 16-bit head dims up to 64 a decode launch
    takes that many warps over 64-key tiles, capped by ``decode_warps_maxnreg`` where given
    (``attention.DECODE_WARPS_MAXNREG``) and uncapped where not (``maxnreg`` caps the kernel's own launch), and equals
    both the reference and the sweep's launch forced to that configuration bit for bit, with and without KV splits;
    fp32 and steps with several queries a sequence keep the kernel's own launch (the same bits as without it)."""
    dtype, tol = backend
    for specs in ([(150, 1), (3, 1), (90, 1), (200, 1)], [(150, 150), (3, 1), (90, 40)]):
        args, max_q = make_batch(specs, dtype=dtype, group=4)
        ref = paged_attention_reference(**args, max_query_len=max_q, scale=0.2)
        small = dtype != torch.float32 and max_q == 1
        for splits in (1, 2):
            run = lambda **kw: tpa.paged_attention(**args, max_query_len=max_q, scale=0.2,  # noqa: E731
                                                   num_kv_splits=splits, **kw)
            with pytest.MonkeyPatch.context() as mp:
                caps = record_launches(mp, tpa, "_paged_attention_kernel", flag="maxnreg")
                out = run(decode_warps=warps, maxnreg=80, decode_warps_maxnreg=96)
                run(decode_warps=warps, maxnreg=80)
            # small programs take their own cap (or none); fp32 keeps the kernel's launch and ``maxnreg``
            want = ([96, None] if small else [80, 80]) if max_q == 1 else [None, None]
            assert caps == want, (specs, caps)
            torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
            if small:
                monkeypatch.setattr(tpa, "TUNING", dict(tile_n=64, num_warps=warps, maxnreg=0))
            same = run(maxnreg=96)
            monkeypatch.setattr(tpa, "TUNING", {})
            assert torch.equal(out, same), f"{specs}, {splits} splits: not the launch it should have picked"


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_loop_over_every_key_tile_gives_the_same_attention_and_leaves_counters_at_zero(backend, monkeypatch):
    """The sweep's ``one_loop`` (every key tile through the masked loop): results equal the reference on decode rows,
    prefill chunks and whole prompts, with and without KV splits, with the split counters left at zero."""
    monkeypatch.setattr(tpa, "TUNING", dict(one_loop=True))
    _launches_match_and_leave_counters_at_zero(backend, [(150, 1), (3, 1), (90, 5), (70, 1), (12, 12)], (1, 2, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("splits", [2, 4])
def test_sinks_are_counted_once_when_kv_splits_merge(backend, splits):
    specs = [(100, 1), (3, 1), (40, 5)]  # with 4 splits of 64 keys the last two are empty
    check(specs, backend, num_kv_splits=splits, group=4, sinks=sink_logits(8, seed=1))
    check(specs, backend, num_kv_splits=splits, group=4, sinks=sink_logits(8, seed=2), sliding_window=20)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_stored_in_16_bit_and_far_above_the_logits(backend):
    """gpt-oss keeps sinks in the model dtype; a sink of +40 leaves the keys weights near exp(-40), not NaN."""
    sinks = torch.tensor([40.0, -3.0, 0.5, 12.0]).to(torch.bfloat16)
    check([(33, 1), (20, 20), (41, 9)], backend, sinks=sinks)


@pytest.mark.parametrize("window", [0, 17])
def test_torch_path_with_sinks_matches_the_reference(window):
    """attention.py's CPU path (decode rows batched, prefill chunks one by one) against the same oracle."""
    from async_batching.attention import AttentionMetadata, torch_paged_attention

    specs = [(50, 1), (30, 30), (45, 12), (3, 1), (17, 17)]
    args, max_q = make_batch(specs, group=2)
    for name in ("k_cache", "v_cache"):  # it reads whole blocks (masked): the engine's cache is zero-initialised
        args[name] = args[name].nan_to_num(0.0)
    sinks = sink_logits(4, seed=3).to(DEVICE)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), query_start_loc=args["query_start_loc"],
                             seq_lens=args["seq_lens"], block_tables=args["block_tables"], max_query_len=max_q)
    out = torch_paged_attention(args["q"], args["k_cache"], args["v_cache"], meta, 0.2, window, 0.0, sinks)
    ref = paged_attention_reference(**args, max_query_len=max_q, scale=0.2, sliding_window=window, sinks=sinks)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_prefill_spans_several_query_blocks(backend):
    # q_len > BLOCK_Q (16 for fp32, 64 for 16-bit with G=1): several query-block programs, causal diagonal in tiles.
    check([(140, 130), (9, 1)], backend, num_kv_heads=1, group=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_outside_query_start_loc_and_empty_sequences_are_untouched(backend):
    """Padded rows (CUDA-graph padding) and zero-length sequences must not be written or crash the kernel."""
    dtype, tol = backend
    specs = [(12, 1), (0, 0), (20, 4)]
    for splits in (0, 2):
        args, max_q = make_batch(specs, dtype=dtype, extra_rows=3)
        out = torch.full(args["q"].shape, float("nan"), dtype=dtype, device=DEVICE)
        tpa.paged_attention(**args, max_query_len=max_q, scale=0.2, out=out, num_kv_splits=splits)
        ref = paged_attention_reference(**args, max_query_len=max_q, scale=0.2)
        torch.testing.assert_close(out[:5].float(), ref[:5].float(), atol=tol, rtol=tol)
        assert out[5:].isnan().all()


def _flat_table(args, slots_extra=3):
    """The flat launch's (seq, blk) table of a batch, on the device, with ``slots_extra`` empty slots."""
    from async_batching.attention import q_block_table

    q = args["q"]
    bq = tpa.flat_block_q(q.shape[1], args["k_cache"].shape[2], q.shape[2], q.dtype)
    q_lens = (args["query_start_loc"][1:] - args["query_start_loc"][:-1]).tolist()
    n = sum(-(-ql // bq) for ql in q_lens)
    seq, blk = q_block_table(q_lens, bq, n + slots_extra)
    return torch.from_numpy(seq).to(DEVICE), torch.from_numpy(blk).to(DEVICE), bq


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", [1, 3, 4])
def test_a_flat_launch_equals_the_grid_launch_bit_for_bit_and_leaves_padded_rows_untouched(backend, group):
    """A flat launch (``q_blocks``: one program per query block from a host-made table, -1 slots empty) does each
    (sequence, query block) the grid launch does with the same tile, so prompts, chunks on a context, decode rows and an
    empty sequence give the same bits as the grid launch of a prefill step (and match the reference); rows past the
    last sequence (padding) stay unwritten."""
    dtype, tol = backend
    specs = [(150, 150), (3, 1), (90, 40), (0, 0), (70, 70), (12, 12), (41, 1)]
    args, max_q = make_batch(specs, dtype=dtype, group=group, extra_rows=5)
    qb = _flat_table(args)
    out = torch.full(args["q"].shape, float("nan"), dtype=dtype, device=DEVICE)
    tpa.paged_attention(**args, max_query_len=1, scale=0.2, out=out, q_blocks=qb)
    grid = torch.full_like(out, float("nan"))
    tpa.paged_attention(**args, max_query_len=max_q, scale=0.2, out=grid)
    n = int(args["query_start_loc"][-1])
    assert torch.equal(out[:n], grid[:n]) and out[n:].isnan().all()
    ref = paged_attention_reference(**args, max_query_len=max_q, scale=0.2)
    torch.testing.assert_close(out[:n].float(), ref[:n].float(), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match=f"a table of {qb[2] * 2}-query blocks for a launch whose query tile is"):
        tpa.paged_attention(**args, max_query_len=1, scale=0.2, out=out, q_blocks=(qb[0], qb[1], qb[2] * 2))


def test_q_block_table_lists_every_query_block_once_then_empty_slots():
    from async_batching.attention import q_block_table

    seq, blk = q_block_table([5, 0, 1, 8], 4, 8)
    assert seq.tolist() == [0, 0, 2, 3, 3, -1, -1, -1] and blk.tolist() == [0, 1, 0, 0, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="5 query blocks do not fit a flat launch of 4 slots"):
        q_block_table([5, 0, 1, 8], 4, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_writes_into_a_strided_output_view(backend):
    dtype, tol = backend
    args, max_q = make_batch([(27, 1), (14, 14)], dtype=dtype)
    T, H, D = args["q"].shape
    buf = torch.full((T, H, D + 8), float("nan"), dtype=dtype, device=DEVICE)
    out = buf[:, :, :D]
    result = tpa.paged_attention(**args, max_query_len=max_q, scale=0.15, out=out)
    assert result.data_ptr() == out.data_ptr()
    ref = paged_attention_reference(**args, max_query_len=max_q, scale=0.15)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    assert buf[:, :, D:].isnan().all()


def test_allocates_output_in_query_dtype_when_none_given():
    args, max_q = make_batch([(10, 1), (6, 6)])
    result = tpa.paged_attention(**args, max_query_len=max_q, scale=0.2)
    assert result.shape == args["q"].shape and result.dtype == args["q"].dtype
    ref = paged_attention_reference(**args, max_query_len=max_q, scale=0.2)
    torch.testing.assert_close(result, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# GPU-only: realistic sizes and CUDA-graph capture (compiled kernels; too slow for the interpreter).

@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,num_kv_heads,group", [(128, 8, 4), (256, 4, 2), (80, 4, 8), (64, 1, 7)])
@pytest.mark.parametrize("splits", [0, 1, 8])
def test_gpu_realistic_shapes(dtype, head_dim, num_kv_heads, group, splits):
    specs = [(2300, 1)] * 6 + [(700, 256), (513, 513), (1, 1), (1000, 37)]
    check(specs, (dtype, 2e-2), head_dim=head_dim, num_kv_heads=num_kv_heads, group=group, num_kv_splits=splits,
          sliding_window=0 if splits != 8 else 300)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_gpu_split_merge_by_the_last_program_reads_every_split_in_a_graph_replayed_many_times():
    # The race the merge could have: the last program of a tile reading a split's partial state before it is
    # visible. Its merge order is fixed, so every replay must give the same bits, equal to the unsplit kernel's
    # result within rounding; the counters must be back at zero after each replay.
    dtype = torch.bfloat16
    args, max_q = make_batch([(1500, 1)] * 24 + [(37, 1), (3000, 1)], dtype=dtype, num_kv_heads=8, group=4,
                             head_dim=128, block_size=16, seed=5)
    counters = torch.zeros(4096, dtype=torch.int32, device=DEVICE)  # room for every program of the launch
    out = torch.empty(args["q"].shape, dtype=dtype, device=DEVICE)
    ref = tpa.paged_attention(**args, max_query_len=max_q, scale=0.09, num_kv_splits=1)

    def step():
        for _ in range(8):  # eight launches per replay, like layers
            tpa.paged_attention(**args, max_query_len=max_q, scale=0.09, out=out, num_kv_splits=16,
                                split_counters=counters)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    first = None
    for _ in range(200):
        graph.replay()
        torch.cuda.synchronize()
        assert counters.eq(0).all()
        if first is None:
            first = out.clone()
            torch.testing.assert_close(first.float(), ref.float(), atol=2e-2, rtol=2e-2)
        else:
            assert torch.equal(out, first), "a replay merged different split states"


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("splits", [0, 1, 4])
def test_gpu_cuda_graph_replay_follows_new_metadata(splits):
    """Capture once, then change seq_lens / block tables / queries in place: replay must track the new values."""
    dtype = torch.bfloat16
    specs_a = [(300, 1), (17, 1), (90, 1), (1, 1)]
    specs_b = [(41, 1), (250, 1), (2, 1), (129, 1)]
    args, max_q = make_batch(specs_a, dtype=dtype, num_kv_heads=4, group=4, head_dim=128, seed=1)
    args_b, _ = make_batch(specs_b, dtype=dtype, num_kv_heads=4, group=4, head_dim=128, seed=2)
    # Same cache size in both batches isn't guaranteed; pad the block table / cache of A to fit B's contents.
    out = torch.empty(args["q"].shape, dtype=dtype, device=DEVICE)
    static = {k: v.clone() for k, v in args.items()}
    nb = max(static["k_cache"].shape[0], args_b["k_cache"].shape[0])
    width = max(static["block_tables"].shape[1], args_b["block_tables"].shape[1])
    for name in ("k_cache", "v_cache"):
        buf = torch.zeros((nb,) + static[name].shape[1:], dtype=dtype, device=DEVICE)
        buf[: static[name].shape[0]] = static[name]
        static[name] = buf
    bt = torch.full((len(specs_a), width), -1, dtype=torch.int32, device=DEVICE)
    bt[:, : static["block_tables"].shape[1]] = static["block_tables"]
    static["block_tables"] = bt

    def step():
        tpa.paged_attention(**static, max_query_len=max_q, scale=0.1, out=out, num_kv_splits=splits)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up compiles outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for src in (args, args_b):
        for name, t in src.items():
            if name in ("k_cache", "v_cache"):
                static[name].zero_()
                static[name][: t.shape[0]] = t
            elif name == "block_tables":
                static[name].fill_(-1)
                static[name][:, : t.shape[1]] = t
            else:
                static[name].copy_(t)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = paged_attention_reference(**static, max_query_len=max_q, scale=0.1)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_gpu_flat_launch_captured_once_serves_steps_of_other_shapes():
    """The prefill graphs' premise: a flat launch captured in a CUDA graph for N slots, replayed after the step's
    queries, contexts, block tables and table change in place (other sequence counts and query lengths, padded), gives
    the reference's attention for each step."""
    dtype = torch.bfloat16
    steps = [[(300, 300), (17, 1), (90, 40), (1, 1)], [(41, 41), (250, 120), (2, 2), (129, 1)], [(700, 500)]]
    batches = [make_batch(sp, dtype=dtype, num_kv_heads=2, group=3, head_dim=64, seed=i)[0] for i, sp in enumerate(steps)]
    T = max(b["q"].shape[0] for b in batches) + 7
    B = max(b["seq_lens"].shape[0] for b in batches) + 1
    nb = max(b["k_cache"].shape[0] for b in batches)
    width = max(b["block_tables"].shape[1] for b in batches)
    bq = tpa.flat_block_q(6, 2, 64, dtype)
    slots = -(-T // bq) + B
    static = dict(q=torch.zeros(T, 6, 64, dtype=dtype, device=DEVICE),
                  k_cache=torch.zeros(nb, 16, 2, 64, dtype=dtype, device=DEVICE),
                  v_cache=torch.zeros(nb, 16, 2, 64, dtype=dtype, device=DEVICE),
                  block_tables=torch.zeros(B, width, dtype=torch.int32, device=DEVICE),
                  seq_lens=torch.zeros(B, dtype=torch.int32, device=DEVICE),
                  query_start_loc=torch.zeros(B + 1, dtype=torch.int32, device=DEVICE))
    seq = torch.full((slots,), -1, dtype=torch.int32, device=DEVICE)
    blk = torch.zeros(slots, dtype=torch.int32, device=DEVICE)
    out = torch.empty(T, 6, 64, dtype=dtype, device=DEVICE)

    def step():
        tpa.paged_attention(**static, max_query_len=1, scale=0.1, out=out, q_blocks=(seq, blk, bq))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    from async_batching.attention import q_block_table

    for b in batches:
        n, nseq = b["q"].shape[0], b["seq_lens"].shape[0]
        for name in static:
            static[name].zero_()
        static["q"][:n] = b["q"]
        static["k_cache"][: b["k_cache"].shape[0]] = b["k_cache"]
        static["v_cache"][: b["v_cache"].shape[0]] = b["v_cache"]
        static["block_tables"][:nseq, : b["block_tables"].shape[1]] = b["block_tables"]
        static["seq_lens"][:nseq] = b["seq_lens"]
        static["query_start_loc"][: nseq + 1] = b["query_start_loc"]
        static["query_start_loc"][nseq + 1:] = n  # padded sequences: empty
        q_lens = (b["query_start_loc"][1:] - b["query_start_loc"][:-1]).tolist()
        t_seq, t_blk = q_block_table(q_lens, bq, slots)
        seq.copy_(torch.from_numpy(t_seq))
        blk.copy_(torch.from_numpy(t_blk))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = paged_attention_reference(**b, max_query_len=max(q_lens), scale=0.1)
        torch.testing.assert_close(out[:n].float(), ref.float(), atol=2e-2, rtol=2e-2)
        assert out[n:].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_heads,head_dim", [(1, 64), (2, 128), (3, 80)])
def test_write_kv_puts_each_token_in_its_slot_and_leaves_the_rest(backend, kv_heads, head_dim):
    """The fused K/V write equals two ``index_copy_`` into the flat caches, from [1, heads, T, dim] views transposed to
    [T, heads, dim] as the attention function receives them; slots no token maps to keep their contents. The same
    holds for caches stored head-major in each block (``kv_cache.KV_LAYOUT = "head"``), through the kernel and through
    the torch path."""
    from async_batching.attention import index_copy_kv

    dtype, _ = backend
    g = torch.Generator().manual_seed(kv_heads * 100 + head_dim)
    T, blocks, block_size = 37, 9, 8
    slots = torch.randperm(blocks * block_size, generator=g)[:T].to(DEVICE)
    key = torch.randn(1, kv_heads, T, head_dim, generator=g).to(DEVICE, dtype)
    value = torch.randn(1, kv_heads, T, head_dim, generator=g).to(DEVICE, dtype)
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
    kc = torch.randn(blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    vc = torch.randn(blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    want_k, want_v = kc.clone(), vc.clone()
    index_copy_kv(k, v, want_k, want_v, slots)
    # the same caches stored head-major in each block, handed over as [block, slot, head, dim] views
    head_k, head_v = (c.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3) for c in (kc, vc))
    head_ref_k, head_ref_v = head_k.clone(), head_v.clone()
    index_copy_kv(k, v, head_ref_k, head_ref_v, slots)  # its (block, slot) path for a non-contiguous cache
    tpa.write_kv(k, v, kc, vc, slots)
    tpa.write_kv(k, v, head_k, head_v, slots)
    assert torch.equal(kc.view(-1, kv_heads, head_dim)[slots], k)
    assert torch.equal(vc.view(-1, kv_heads, head_dim)[slots], v)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    assert head_k.is_contiguous() == (kv_heads == 1)  # one kv head: both layouts are the same memory
    assert torch.equal(head_k, want_k) and torch.equal(head_v, want_v)
    assert torch.equal(head_ref_k, want_k) and torch.equal(head_ref_v, want_v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("splits,window,head_dim", [(0, 0, 32), (1, 0, 80), (2, 0, 32), (4, 5, 32), (4, 0, 64)])
def test_decode_launch_writing_its_own_kv_equals_write_kv_then_attention(backend, splits, window, head_dim):
    """``new_kv``: the decode launch stores each sequence's new K/V (at the slot of its last position) itself before
    attending. Output and both caches equal ``write_kv`` followed by the plain launch, bit for bit, with KV splits
    (only the split holding the last position writes) and a sliding window, whether the slots are given or (slots
    None) read from each sequence's block-table row at position ``seq_lens - 1``; K/V come as the strided
    [T, heads, dim] views of [1, heads, T, dim] that the attention function receives."""
    dtype, _ = backend
    specs = [(1, 1), (9, 1), (16, 1), (17, 1), (70, 1), (130, 1)]
    args, _ = make_batch(specs, dtype=dtype, head_dim=head_dim, block_size=16, seed=head_dim + splits)
    kv_heads = args["k_cache"].shape[2]
    T = len(specs)
    g = torch.Generator().manual_seed(7)
    key = torch.randn(1, kv_heads, T, head_dim, generator=g).to(DEVICE, dtype)
    value = torch.randn(1, kv_heads, T, head_dim, generator=g).to(DEVICE, dtype)
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
    last = (args["seq_lens"] - 1).long()
    blocks = args["block_tables"].long().gather(1, (last // 16)[:, None])[:, 0]
    slots = blocks * 16 + last % 16
    scale = head_dim ** -0.5
    runs = []
    for mode in ("write_kv", "given slots", "slots from the table"):
        kc, vc = args["k_cache"].clone(), args["v_cache"].clone()
        if mode == "write_kv":
            tpa.write_kv(k, v, kc, vc, slots)
        new_kv = None if mode == "write_kv" else (k, v, slots if mode == "given slots" else None)
        out = tpa.paged_attention(args["q"], kc, vc, args["block_tables"], args["seq_lens"],
                                  args["query_start_loc"], 1, scale, sliding_window=window, num_kv_splits=splits,
                                  new_kv=new_kv)
        runs.append((out, kc, vc))
    want, want_k, want_v = runs[0]
    assert not torch.equal(want_k, args["k_cache"])  # the new keys landed somewhere
    for got, got_k, got_v in runs[1:]:
        assert not got.isnan().any()
        for a, b in ((got, want), (got_k, want_k), (got_v, want_v)):
            torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window,softcap,with_sinks,fused,head_dim,kv_heads,per_program",
                         [(0, 0.0, False, False, 32, 3, 3), (0, 0.0, False, True, 64, 3, 3),
                          (20, 0.0, False, True, 32, 4, 2), (0, 30.0, True, False, 80, 4, 4),
                          (0, 0.0, False, True, 32, 3, 2)],
                         ids=["all-3", "all-3-fused-write", "pairs-of-4-window", "all-4-softcap-sinks-dim80",
                              "pairs-of-3-means-all"])
def test_decode_programs_over_kv_head_groups_equal_a_program_per_head(backend, window, softcap, with_sinks, fused,
                                                                       head_dim, kv_heads, per_program, monkeypatch):
    """``heads_per_program``: one decode program per sequence and group of kv heads walks the group's key tiles in one
    loop (a group size that does not divide the kv heads takes all of them). Output (and, with ``new_kv``, both
    caches, the grouped launch reading its slots from the block table) equal the launch of a program per (sequence,
    kv head), given the slots, with every tile through the masked loop
    (``one_loop``) bit for bit, under a window, soft-capping, sinks and a longest-first order, and the reference within
    the backend's tolerance; with splits asked for, the launch keeps its split programs."""
    dtype, tol = backend
    specs = [(1, 1), (9, 1), (16, 1), (70, 1), (150, 1), (33, 1)]
    args, _ = make_batch(specs, dtype=dtype, group=3, num_kv_heads=kv_heads, head_dim=head_dim,
                         seed=head_dim + window + kv_heads)
    T = len(specs)
    g = torch.Generator().manual_seed(11)
    k = torch.randn(T, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    v = torch.randn(T, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    last = (args["seq_lens"] - 1).long()
    slots = args["block_tables"].long().gather(1, (last // 16)[:, None])[:, 0] * 16 + last % 16
    sinks = sink_logits(3 * kv_heads, seed=4).to(DEVICE) if with_sinks else None
    order = torch.tensor([4, 3, 5, 2, 1, 0], dtype=torch.int32, device=DEVICE)
    launched = record_launches(monkeypatch, tpa, "_paged_decode_heads_kernel")
    runs = []
    for tuning in (dict(one_loop=True, order=order), dict(heads_per_program=per_program, order=order)):
        monkeypatch.setattr(tpa, "TUNING", tuning)
        kc, vc = args["k_cache"].clone(), args["v_cache"].clone()
        out = torch.full(args["q"].shape, float("nan"), dtype=dtype, device=DEVICE)
        tpa.paged_attention(args["q"], kc, vc, args["block_tables"], args["seq_lens"], args["query_start_loc"], 1,
                            0.2, sliding_window=window, softcap=softcap, out=out, num_kv_splits=1, sinks=sinks,
                            new_kv=(k, v, slots if tuning.get("one_loop") else None) if fused else None)
        runs.append((out, kc, vc))
    group = per_program if kv_heads % per_program == 0 else kv_heads
    assert launched == [(T, kv_heads // group)]
    ref = _assert_equal_runs_and_reference(runs, args, window, softcap, sinks, tol)
    # splits asked for: the split launch (a program per (sequence, head, split)), with its merge, still the reference
    monkeypatch.setattr(tpa, "TUNING", dict(heads_per_program=per_program))
    _assert_split_launch_gives(ref, tol, args, window, softcap, sinks, (k, v, slots) if fused else None)
    assert len(launched) == 1


def _assert_equal_runs_and_reference(runs, args, window, softcap, sinks, tol):
    """Two decode launches' ``(out, k_cache, v_cache)``: equal bit for bit, every row written, the second within
    ``tol`` of the reference over its caches (returned)."""
    (want, want_k, want_v), (got, got_k, got_v) = runs
    assert not got.isnan().any(), "some output rows were not written"
    for a, b in ((got, want), (got_k, want_k), (got_v, want_v)):
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)
    ref = paged_attention_reference(args["q"], got_k, got_v, args["block_tables"], args["seq_lens"],
                                    args["query_start_loc"], 1, 0.2, sliding_window=window, softcap=softcap,
                                    sinks=sinks)
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
    return ref


def _assert_split_launch_gives(ref, tol, args, window, softcap, sinks, new_kv, **launch):
    """A decode launch of ``args`` asked for 2 KV splits (on copies of the caches) is ``ref`` within ``tol``."""
    kc, vc = args["k_cache"].clone(), args["v_cache"].clone()
    split = tpa.paged_attention(args["q"], kc, vc, args["block_tables"], args["seq_lens"], args["query_start_loc"], 1,
                                0.2, sliding_window=window, softcap=softcap, num_kv_splits=2, sinks=sinks,
                                new_kv=new_kv, **launch)
    torch.testing.assert_close(split.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window,softcap,with_sinks,fused,head_dim,kv_heads,rows",
                         [(0, 0.0, False, False, 32, 3, 6), (0, 0.0, False, True, 64, 3, 7),
                          (20, 0.0, False, True, 32, 2, 6), (0, 30.0, True, False, 64, 2, 7),
                          (0, 0.0, True, True, 16, 4, 1)],
                         ids=["even", "odd-fused-write", "window-fused-write", "softcap-sinks-odd", "one-row"])
def test_decode_programs_over_pairs_of_sequences_equal_a_program_per_sequence(backend, window, softcap, with_sinks,
                                                                              fused, head_dim, kv_heads, rows,
                                                                              monkeypatch):
    """``pairs`` (attention.DECODE_PAIRS): a decode program per pair of sequences (the launch order's i-th and
    (B-1-i)-th; an odd count's middle one alone) and kv head walks both sequences' key tiles in one loop. Output (and,
    with ``new_kv``, both caches, the paired launch reading its slots from the block table) equal the launch of a
    program per (sequence, kv head), given the slots, with every tile through the masked loop (``one_loop``) and the
    pairs launch's key tile and warps, bit for bit, under a window, soft-capping, sinks, a longest-first order and a
    padded row (no query); the launch's grid is
    (ceil(B / 2), kv heads), and within the backend's tolerance of the reference. With splits asked for, the launch
    keeps its split programs."""
    from async_batching.attention import decode_order

    dtype, tol = backend
    lens = [1, 9, 16, 70, 150, 33, 64][:rows]
    specs = [(n, 1) for n in lens] + [(0, 0)]  # the last row padded, as in a decode graph
    args, _ = make_batch(specs, dtype=dtype, group=3, num_kv_heads=kv_heads, head_dim=head_dim,
                         seed=head_dim + window + kv_heads + rows)
    T, B = rows, rows + 1
    g = torch.Generator().manual_seed(12)
    k = torch.randn(T, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    v = torch.randn(T, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    last = (args["seq_lens"][:T] - 1).long()
    slots = args["block_tables"][:T].long().gather(1, (last // 16)[:, None])[:, 0] * 16 + last % 16
    sinks = sink_logits(3 * kv_heads, seed=5).to(DEVICE) if with_sinks else None
    order = decode_order(args["seq_lens"])
    launched = record_launches(monkeypatch, tpa, "_paged_decode_pairs_kernel")
    runs = []
    # the per-sequence launch with the pairs launch's own key tile (the order of a row's sums) and warps
    same_tiles = dict(one_loop=True, tile_n=tpa.PAIRS_TILE_N, num_warps=tpa.PAIRS_WARPS)
    for tuning, pairs in ((same_tiles, False), ({}, True)):
        monkeypatch.setattr(tpa, "TUNING", tuning)
        kc, vc = args["k_cache"].clone(), args["v_cache"].clone()
        out = torch.full(args["q"].shape, float("nan"), dtype=dtype, device=DEVICE)
        tpa.paged_attention(args["q"], kc, vc, args["block_tables"], args["seq_lens"], args["query_start_loc"], 1,
                            0.2, sliding_window=window, softcap=softcap, out=out, num_kv_splits=1, sinks=sinks,
                            new_kv=(k, v, None if pairs else slots) if fused else None, order=order, pairs=pairs)
        runs.append((out, kc, vc))
    assert launched == [((B + 1) // 2, kv_heads)]
    ref = _assert_equal_runs_and_reference(runs, args, window, softcap, sinks, tol)
    monkeypatch.setattr(tpa, "TUNING", {})  # splits asked for: the split launch, with its merge, still the reference
    _assert_split_launch_gives(ref, tol, args, window, softcap, sinks, (k, v, slots) if fused else None, pairs=True)
    assert len(launched) == 1


def test_cases_pass_in_a_fresh_interpreter_process():
    """Only when triton was imported before TRITON_INTERPRET=1 took effect: rerun this file where it is set first."""
    if not DELEGATED:
        pytest.skip("the cases ran in this process")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu",
                           os.path.abspath(__file__)], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


if DELEGATED:
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and _name != "test_cases_pass_in_a_fresh_interpreter_process":
            globals()[_name] = pytest.mark.skip(reason="run by test_cases_pass_in_a_fresh_interpreter_process")(_fn)
