"""Sampling draws in Triton: the same draws as ``sampling._draw_top_k`` and ``sampling._draw_full``, with the same noise
bits, in two or three kernel launches instead of about a hundred small ones (the host cost of a sampled step was its
launches).

- ``_topk_draw_kernel``: after ``torch.topk``: the row's tokens tied with its k-th value (counted over the whole
  vocabulary), the top-p nucleus (exclusive mass of strictly larger values), min-p, then a Gumbel-max race of the kept
  candidates (noise keyed by vocab id) and the bucket of ties; a winning bucket picks its member (the m-th tie in vocab
  order, m from a 52-bit uniform) in a second pass.
- ``_chunk_mass_kernel`` + ``_chunk_draw_kernel``: rows without top-k and without top-p: softmax(x / T) with min-p,
  one inverse-CDF draw in vocab order (float64 running mass): one program per (row, chunk of 4,096 ids) finds the
  chunk's largest logit and mass in one pass over it (with min-p: a pass for the row's largest logit, then one for the
  kept mass), then one program per row picks the chunk and the token inside it (a second pass over one chunk). One
  program per row over the whole row (the kernel this replaced) left the GPU mostly idle: 0.25 ms of a W7 step.
  Without min-p each chunk is loaded once (``ONE_PASS_MASS``): 45.4 against 68.3 us at 256 rows of 151,936 bf16
  logits on the H200 (session 24), the same tokens; not yet timed end to end (session 24's W7 run of the two-pass
  variant drew with the one-pass default: the variant set the flag only while the engine was built).
- ``_argmax_chunk_kernel`` + ``_argmax_merge_kernel``: greedy rows, ``torch.argmax``'s answer (the first of tied
  maxima; a NaN counts as the largest, the first NaN wins) written as int32 into the step's token buffer: one program
  per (row, chunk of 2,048 ids), then one per row over its chunks. Each value and its index are packed into one
  int64 (an order-preserving key of the float above the index's complement), so a chunk's and a row's answers are
  one integer max each. Off by default (``sampling.TRITON_ARGMAX``): its first form, one program per row over the
  whole row, took 43 us of a W1 decode forward on the H200 (512 rows of 49,152 bf16 logits) against torch's 37 us,
  and a chunked form with two index-tracking reductions a chunk 47 us against 39 (session 21).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 2048


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (wrapping arithmetic), as ``sampling._mix32``."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _bits(lo, hi, ids):
    """32 random bits per (row key, id) as ``sampling._hash``: ids are uint32 (vocab ids or lanes 2**32 - 1 - j)."""
    return _mix32(_mix32(ids ^ lo) ^ hi)


@triton.jit
def _gumbel(bits):
    u = (bits.to(tl.float64) + 0.5) * 2.3283064365386963e-10  # 2**-32
    return -tl.log(-tl.log(u))


@triton.jit
def _uniform52(a, b):
    """A uniform in (0, 1) with 52 random bits from two 32-bit draws (as ``sampling._uniform52``)."""
    hi = a.to(tl.uint64) << 20
    lo = b.to(tl.uint64) >> 12
    return ((hi | lo).to(tl.float64) + 0.5) * 2.220446049250313e-16  # 2**-52


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


# Per-row parameters are slices of the step's staging buffer, at offsets of any alignment, and the candidate count
# changes with the step's requests: none of these is specialised, so a run compiles one variant per kind of step
# (flags, candidate tile), not one per staging offset.
_STEP_ARGS = ["rows_ptr", "temp_ptr", "k_ptr", "top_p_ptr", "min_p_ptr", "lo_ptr", "hi_ptr"]


@triton.jit(do_not_specialize=["stride_c", "V", "K"], do_not_specialize_on_alignment=_STEP_ARGS)
def _topk_draw_kernel(
    x_ptr, stride_x, rows_ptr, vals_ptr, ids_ptr, stride_c,
    temp_ptr, k_ptr, top_p_ptr, min_p_ptr, lo_ptr, hi_ptr, out_ptr,
    V, K,
    HAS_ROWS: tl.constexpr, HAS_TOP_P: tl.constexpr, HAS_MIN_P: tl.constexpr,
    KP: tl.constexpr, TILE: tl.constexpr,
):
    r = tl.program_id(0)
    row = tl.load(rows_ptr + r).to(tl.int64) if HAS_ROWS else r.to(tl.int64)
    x_row = x_ptr + row * stride_x
    temp = tl.load(temp_ptr + r)
    k = tl.minimum(tl.load(k_ptr + r), K)
    lo = tl.load(lo_ptr + r).to(tl.uint32)
    hi = tl.load(hi_ptr + r).to(tl.uint32)

    j = tl.arange(0, KP)
    in_k = j < K
    vals = tl.load(vals_ptr + r * stride_c + j, mask=in_k, other=float("-inf")).to(tl.float32)
    ids = tl.load(ids_ptr + r * stride_c + j, mask=in_k, other=0)
    kth = tl.sum(tl.where(j == k - 1, vals, 0.0), 0)
    top = tl.max(vals, 0)

    # Tokens equal to the k-th value, over the whole vocabulary (transformers keeps them all).
    n_ties = tl.zeros([TILE], dtype=tl.int32)
    for start in range(0, V, TILE):
        v = start + tl.arange(0, TILE)
        xv = tl.load(x_row + v, mask=v < V, other=float("-inf")).to(tl.float32)
        n_ties += (xv == kth).to(tl.int32)
    ties = tl.sum(n_ties, 0)

    z0 = top / temp
    logw = vals / temp - z0
    logw_kth = kth / temp - z0
    w = tl.exp(logw)
    w_kth = tl.exp(logw_kth)
    above = (vals > kth) & in_k
    keep = above
    keep_ties = ties > 0
    if HAS_TOP_P:
        mass = tl.where(above, w, 0.0)
        above_total = tl.sum(mass, 0)
        limit = tl.load(top_p_ptr + r) * (above_total + ties.to(tl.float32) * w_kth)
        # Mass of strictly larger values: the exclusive prefix sum at the first candidate of each run of equal values
        # (candidates are sorted descending; the prefix sum never decreases, so a running max carries it).
        excl = tl.cumsum(mass, 0) - mass
        prev = tl.load(vals_ptr + r * stride_c + j - 1, mask=(j > 0) & in_k, other=float("inf")).to(tl.float32)
        run_start = tl.where(vals != prev, excl, 0.0)
        strictly_above = tl.associative_scan(run_start, 0, _max)
        keep = keep & (strictly_above < limit)
        keep_ties = keep_ties & (above_total < limit)
    if HAS_MIN_P:
        min_p = tl.load(min_p_ptr + r)
        keep = keep & (w >= min_p)
        keep_ties = keep_ties & (w_kth >= min_p)

    # Gumbel-max race: each kept candidate, and the bucket of ties as one entry of weight ties * w_kth (lane 0).
    race = tl.where(keep, logw.to(tl.float64) + _gumbel(_bits(lo, hi, ids.to(tl.uint32))), float("-inf"))
    best = tl.max(race, 0)
    winner = tl.min(tl.where(race == best, j, KP), 0)
    candidate = tl.sum(tl.where(j == winner, ids, 0), 0).to(tl.int64)
    lanes = tl.full([1], 0xFFFFFFFF, tl.uint32)
    bucket = logw_kth.to(tl.float64) + tl.log(ties.to(tl.float64)) + _gumbel(_bits(lo, hi, lanes))
    bucket = tl.where(keep_ties, bucket, float("-inf"))
    # The bucket's member: the m-th tie in vocab order, m = floor(u * ties) from lanes 1-2 (a second pass, kept
    # branch-free: it costs what the tie count cost).
    u = _uniform52(_bits(lo, hi, lanes - 1), _bits(lo, hi, lanes - 2))
    m = tl.minimum((u * ties.to(tl.float64)).to(tl.int32), ties - 1)
    seen = tl.zeros([1], dtype=tl.int32)
    member = tl.zeros([1], dtype=tl.int32)
    for start in range(0, V, TILE):
        v = start + tl.arange(0, TILE)
        xv = tl.load(x_row + v, mask=v < V, other=float("-inf")).to(tl.float32)
        tie = (xv == kth).to(tl.int32)
        rank = seen + tl.cumsum(tie, 0) - tie  # ties before each position
        member += tl.sum(tl.where((tie > 0) & (rank == m), v, 0), 0)
        seen += tl.sum(tie, 0)
    token = tl.where(bucket > best, member.to(tl.int64), candidate)
    tl.store(out_ptr + r + tl.arange(0, 1), token)


@triton.jit
def _tile_weights(x_row, v, V, temp, z0, min_p, HAS_MIN_P: tl.constexpr):
    """Unnormalised probabilities exp(x / T - max / T) of one tile (the top token's is 1), min-p applied: a token is
    kept when its weight is at least min_p times the top token's."""
    xv = tl.load(x_row + v, mask=v < V, other=float("-inf")).to(tl.float32)
    w = tl.exp(xv / temp - z0)
    if HAS_MIN_P:
        w = tl.where(w >= min_p, w, 0.0)
    return w


_CHUNK = 2 * _TILE  # vocab ids per program of the full draw's first pass
# Rows without min-p: each mass program loads its chunk once (a tile of the whole chunk: its largest logit, then its
# weights from registers) instead of one pass for the largest logit and a second for the weights. The draw kernel
# recomputes the chosen chunk's weights with the same expression, so the tokens drawn are the same up to the float64
# sum's rounding at a chunk's edge (which the draw already tolerates). False: the two-pass form (variant
# ``ours_async_two_pass_mass``). On the H200 (session 24, the draw alone in CUDA graphs, 151,936 ids): 1.17-1.50x at
# 32-256 rows (68.3 -> 45.4 us at 256), the same tokens; chunks of 8,192 ids were no faster.
ONE_PASS_MASS = True


@triton.jit(do_not_specialize=["V", "C"], do_not_specialize_on_alignment=["rows_ptr", "temp_ptr", "min_p_ptr"])
def _chunk_mass_kernel(
    x_ptr, stride_x, rows_ptr, temp_ptr, min_p_ptr, m_ptr, s_ptr, V, C,
    HAS_ROWS: tl.constexpr, HAS_MIN_P: tl.constexpr, PHASE: tl.constexpr, CP: tl.constexpr, TILE: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Program (r, c): chunk c of row r. PHASE 0: its largest logit ``m`` and its mass ``s`` = sum of
    exp(x / T - m / T) (float64). With min-p, PHASE 1 stores only ``m``; PHASE 2 then stores as ``s`` the mass
    relative to the row's largest logit of the chunk's tokens whose weight is >= min_p."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    row = tl.load(rows_ptr + r).to(tl.int64) if HAS_ROWS else r.to(tl.int64)
    x_row = x_ptr + row * stride_x
    temp = tl.load(temp_ptr + r)
    if PHASE == 0 and TILE == CHUNK:  # one load of the chunk: its largest logit and its weights from registers
        v = c * CHUNK + tl.arange(0, TILE)
        xv = tl.load(x_row + v, mask=v < V, other=float("-inf")).to(tl.float32)
        m = tl.max(xv, 0)
        w = tl.exp(xv / temp - m / temp)  # as _tile_weights (no min-p in phase 0)
        tl.store(s_ptr + r * C + c + tl.arange(0, 1), tl.zeros([1], dtype=tl.float64) + tl.sum(w.to(tl.float64), 0))
        tl.store(m_ptr + r * C + c, m)
        return
    if PHASE == 2:
        lanes = tl.arange(0, CP)
        m = tl.max(tl.load(m_ptr + r * C + lanes, mask=lanes < C, other=float("-inf")), 0)
    else:
        top = tl.full([TILE], float("-inf"), tl.float32)
        for start in range(c * CHUNK, c * CHUNK + CHUNK, TILE):
            v = start + tl.arange(0, TILE)
            top = tl.maximum(top, tl.load(x_row + v, mask=v < V, other=float("-inf")).to(tl.float32))
        m = tl.max(top, 0)
    if PHASE != 1:
        min_p = tl.load(min_p_ptr + r) if HAS_MIN_P else 0.0
        total = tl.zeros([1], dtype=tl.float64)
        for start in range(c * CHUNK, c * CHUNK + CHUNK, TILE):
            w = _tile_weights(x_row, start + tl.arange(0, TILE), V, temp, m / temp, min_p, HAS_MIN_P)
            total += tl.sum(w.to(tl.float64), 0)
        tl.store(s_ptr + r * C + c + tl.arange(0, 1), total)
    if PHASE != 2:  # phase 2 reads the chunks' maxima: they stay as phase 1 left them
        tl.store(m_ptr + r * C + c, m)


@triton.jit(do_not_specialize=["V", "C"], do_not_specialize_on_alignment=["rows_ptr", "temp_ptr", "min_p_ptr",
                                                                          "lo_ptr", "hi_ptr"])
def _chunk_draw_kernel(
    x_ptr, stride_x, rows_ptr, temp_ptr, min_p_ptr, lo_ptr, hi_ptr, m_ptr, s_ptr, out_ptr, V, C,
    HAS_ROWS: tl.constexpr, HAS_MIN_P: tl.constexpr, CP: tl.constexpr, TILE: tl.constexpr, CHUNK: tl.constexpr,
):
    """Row r's token: one inverse-CDF draw over the chunks' masses (rescaled to the row's largest logit), in vocab
    order, then inside the chosen chunk, whose weights are recomputed exactly as its mass was."""
    r = tl.program_id(0)
    row = tl.load(rows_ptr + r).to(tl.int64) if HAS_ROWS else r.to(tl.int64)
    x_row = x_ptr + row * stride_x
    temp = tl.load(temp_ptr + r)
    lo = tl.load(lo_ptr + r).to(tl.uint32)
    hi = tl.load(hi_ptr + r).to(tl.uint32)
    min_p = tl.load(min_p_ptr + r) if HAS_MIN_P else 0.0

    lanes = tl.arange(0, CP)
    valid = lanes < C
    m = tl.load(m_ptr + r * C + lanes, mask=valid, other=float("-inf"))
    top = tl.max(m, 0)
    if HAS_MIN_P:  # the masses are already relative to the row's largest logit
        m = tl.where(valid, top, m)
    scale = tl.where(valid, tl.exp(m / temp - top / temp), 0.0).to(tl.float64)
    mass = tl.load(s_ptr + r * C + lanes, mask=valid, other=0.0) * scale
    cum = tl.cumsum(mass, 0)
    total = tl.sum(mass, 0)
    ends = tl.full([1], 0xFFFFFFFF, tl.uint32)
    target = _uniform52(_bits(lo, hi, ends), _bits(lo, hi, ends - 1)) * total
    # The first chunk whose running mass passes the target; the last chunk of positive mass if rounding leaves the
    # target past the end.
    c = tl.min(tl.where((cum > target) & (mass > 0), lanes, CP), 0)
    c = tl.where(c < CP, c, tl.max(tl.where(mass > 0, lanes, 0), 0))
    before = tl.sum(tl.where(lanes < c, mass, 0.0), 0)
    m_c = tl.sum(tl.where(lanes == c, m, 0.0), 0)
    scale_c = tl.sum(tl.where(lanes == c, scale, 0.0), 0)

    run_mass = tl.zeros([1], dtype=tl.float64) + before
    token = tl.zeros([1], dtype=tl.int64) - 1
    last = tl.zeros([1], dtype=tl.int64)
    for start in range(0, CHUNK, TILE):
        v = c * CHUNK + start + tl.arange(0, TILE)
        w64 = _tile_weights(x_row, v, V, temp, m_c / temp, min_p, HAS_MIN_P).to(tl.float64) * scale_c
        run = run_mass + tl.cumsum(w64, 0)
        passed = (run > target) & (w64 > 0)
        first = tl.min(tl.where(passed, v, V), 0).to(tl.int64)
        token = tl.where((token < 0) & (first < V), first, token)
        last = tl.maximum(last, tl.max(tl.where(w64 > 0, v, -1), 0).to(tl.int64))
        run_mass += tl.sum(w64, 0)
    token = tl.where(token < 0, last, token)
    tl.store(out_ptr + r + tl.arange(0, 1), token)


def draw_top_k(x: torch.Tensor, rows, temperature, top_k, top_p, min_p, lo, hi, top_k_max: int) -> torch.Tensor:
    """Tokens ``[R]`` (int64) of the top-k group: ``x`` the step's logits ``[N, V]``, ``rows`` the group's rows of it
    (None: rows 0..R-1), per-row parameters ``[R]``, noise-key words ``lo``/``hi`` as int64 ``[R]``."""
    R = temperature.shape[0]
    V = x.shape[1]
    sub = x[:R] if rows is None else x.index_select(0, rows)
    K = min(top_k_max, V)
    vals, ids = torch.topk(sub, K, dim=-1)
    out = torch.empty(R, dtype=torch.int64, device=x.device)
    dummy = temperature
    _topk_draw_kernel[(R,)](
        x, x.stride(0), rows if rows is not None else lo, vals, ids, vals.stride(0),
        temperature, top_k, top_p if top_p is not None else dummy, min_p if min_p is not None else dummy, lo, hi, out,
        V, K,
        HAS_ROWS=rows is not None, HAS_TOP_P=top_p is not None, HAS_MIN_P=min_p is not None,
        KP=max(16, triton.next_power_of_2(K)), TILE=_TILE, num_warps=8,
    )
    return out


def draw_full(x: torch.Tensor, rows, temperature, min_p, lo, hi) -> torch.Tensor:
    """Tokens ``[R]`` (int64) of rows without top-k and top-p: softmax(x / T) with min-p, one inverse-CDF draw.
    The vocabulary is cut into chunks of ``_CHUNK`` ids: one program per (row, chunk) sums its mass (two passes with
    min-p, which needs the row's largest logit first), then one program per row picks a chunk and the token in it."""
    R = temperature.shape[0]
    V = x.shape[1]
    C = triton.cdiv(V, _CHUNK)
    out = torch.empty(R, dtype=torch.int64, device=x.device)
    m = torch.empty((R, C), dtype=torch.float32, device=x.device)
    s = torch.empty((R, C), dtype=torch.float64, device=x.device)
    rows_arg = rows if rows is not None else lo
    min_p_arg = min_p if min_p is not None else temperature
    common = dict(HAS_ROWS=rows is not None, HAS_MIN_P=min_p is not None, CP=max(16, triton.next_power_of_2(C)),
                  TILE=_TILE, CHUNK=_CHUNK)
    for phase in ((1, 2) if min_p is not None else (0,)):
        tile = _CHUNK if phase == 0 and ONE_PASS_MASS else _TILE
        _chunk_mass_kernel[(R, C)](x, x.stride(0), rows_arg, temperature, min_p_arg, m, s, V, C, PHASE=phase,
                                   num_warps=8, **{**common, "TILE": tile})
    _chunk_draw_kernel[(R,)](x, x.stride(0), rows_arg, temperature, min_p_arg, lo, hi, m, s, out, V, C,
                             num_warps=8, **common)
    return out


@triton.jit(do_not_specialize=["V", "C", "stride_x"], do_not_specialize_on_alignment=["x_ptr"])
def _argmax_chunk_kernel(x_ptr, stride_x, key_ptr, V, C, CHUNK: tl.constexpr):
    """Chunk ``c`` of row ``r``: the largest of its values' packed keys (below), one integer max."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    v = c * CHUNK + tl.arange(0, CHUNK)
    ok = v < V
    x = tl.load(x_ptr + r * stride_x + v, mask=ok, other=float("-inf")).to(tl.float32)
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 as +0.0: torch counts them equal (the first wins)
    bits = x.to(tl.int32, bitcast=True)
    # order-preserving unsigned key of a float: negatives' bits all flipped, positives' sign bit set; NaN the largest
    key = (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True).to(tl.int64)
    key = tl.where(x != x, tl.zeros_like(key) + 4294967295, key)
    # key in the high bits, the index's complement in the low 31: the largest value, then the first index, wins
    packed = tl.where(ok, (key << 31) | (2147483647 - v).to(tl.int64), -1)
    tl.store(key_ptr + r * C + c + tl.arange(0, 1), tl.max(packed, 0) + tl.zeros([1], dtype=tl.int64))


# The token buffer's rows of a window's later draws start at any offset: no alignment specialisation (a second
# compiled variant in the middle of a run).
@triton.jit(do_not_specialize=["C"], do_not_specialize_on_alignment=["out_ptr"])
def _argmax_merge_kernel(key_ptr, out_ptr, C, CP: tl.constexpr):
    """Row ``r``'s argmax: the largest of its chunks' packed keys, unpacked to its index."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CP)
    best = tl.max(tl.load(key_ptr + r * C + c, mask=c < C, other=-1), 0)
    tl.store(out_ptr + r + tl.arange(0, 1), (2147483647 - (best & 2147483647)).to(tl.int32) + tl.zeros([1], tl.int32))


# Ids a program of the chunk kernel reads, over ARGMAX_WARPS warps: on the H200 (session 24, CUDA graphs) 2,048 ids
# over 4 warps was the fastest or tied of 2,048-8,192 ids over 4-8 warps at 32-512 rows (38.4 us at 512 x 49,152
# bf16, where 8,192 over 8 warps took 50.0).
_ARGMAX_CHUNK = 2048
ARGMAX_WARPS = 4


def argmax_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[:R] = x.argmax(-1)`` as int32 for logits ``x`` ``[R, V]`` (a row stride of any size, unit column stride):
    one program per (row, chunk of ``_ARGMAX_CHUNK`` ids), then one per row over its chunks; returns ``out[:R]``."""
    R, V = x.shape
    assert x.stride(1) == 1 and out.dtype == torch.int32 and out.numel() >= R and V < 2**31
    if R:
        C = triton.cdiv(V, _ARGMAX_CHUNK)
        keys = torch.empty((R, C), dtype=torch.int64, device=x.device)
        _argmax_chunk_kernel[(R, C)](x, x.stride(0), keys, V, C, CHUNK=_ARGMAX_CHUNK, num_warps=ARGMAX_WARPS)
        _argmax_merge_kernel[(R,)](keys, out, C, CP=max(16, triton.next_power_of_2(C)), num_warps=1)
    return out[:R]


# Draw kinds compiled at start-up (``warm_up``): temperature-only rows (with and without min-p), and top-k rows with
# candidate widths up to 64 (top_k 1..64: transformers' default 50, Qwen's 20), with and without top-p; each for a
# group covering the whole step and for a group of some of its rows. Other kinds (penalised float32 logits, top-k
# wider than 64, top-k with min-p) compile at their first sampled step.
WARM_TOP_K_WIDTHS = (16, 32, 64)


def warm_up(device: torch.device, dtype: torch.dtype, vocab_size: int) -> None:
    """Compile the common draw kernels now, so that a run's first sampled steps do not (issue 14: the first call
    within 5% of a repeated one). The draws write only their own outputs."""
    R = 2
    x = torch.zeros(R, vocab_size, dtype=dtype, device=device)
    rows = torch.arange(R, dtype=torch.int64, device=device)
    temp = torch.ones(R, dtype=torch.float32, device=device)
    prob = torch.full((R,), 0.5, dtype=torch.float32, device=device)
    key = torch.zeros(R, 1, dtype=torch.int64, device=device)
    from . import sampling

    if sampling.TRITON_ARGMAX:
        argmax_into(x, torch.empty(R, dtype=torch.int32, device=device))
    for group_rows in (None, rows):
        for min_p in (None, prob):
            draw_full(x, group_rows, temp, min_p, key, key)
        for width in WARM_TOP_K_WIDTHS:
            k = torch.full((R,), width, dtype=torch.int64, device=device)
            for top_p in (None, prob):
                draw_top_k(x, group_rows, temp, k, top_p, None, key, key, width)


KERNELS = (_topk_draw_kernel, _chunk_mass_kernel, _chunk_draw_kernel, _argmax_chunk_kernel, _argmax_merge_kernel)


def compiled_variants() -> int:
    """Compiled variants of the draw kernels held in memory (a GPU test checks that none is added during a run)."""
    from .triton_paged_attention import count_variants

    return count_variants(*KERNELS)
