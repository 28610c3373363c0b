"""Unified paged attention in Triton: one kernel serves decode tokens and prefill chunks over a paged KV cache.

Layout (fixed by the engine): ``k_cache``/``v_cache`` are ``[num_blocks, block_size, num_kv_heads, head_dim]``;
logical block ``b`` of sequence ``i`` is physical block ``block_tables[i, b]``.  The K/V of this step's tokens must
already be in the cache.  Everything is CUDA-graph capturable: the launch grid depends only on Python ints (shapes and
``max_query_len``), and the KV loop bounds are read from ``seq_lens`` on the device.

Design (like vLLM's unified Triton attention): one program per (sequence, block of ``BLOCK_Q`` queries, kv head,
KV split).  The ``BLOCK_Q`` queries times the ``G`` query heads sharing that kv head form one ``BLOCK_M`` row tile, so
each K/V tile is loaded once for the whole GQA group and ``tl.dot`` always gets >= 16 rows, even in decode.  Keys are
visited in tiles of ``TILE_N`` positions, each key's address being looked up through the block table, so ``TILE_N``
is independent of ``block_size``.  Key tiles that lie wholly below a query tile's first position are visible to
every row, so they run without any mask; only the diagonal tiles, a split's ragged end and sliding-window layers take
the masked path.  Logits are kept in log2 units (``exp2``; the scale is folded with log2(e)).  Attention sinks (gpt-oss: one logit per query head in the softmax denominator,
attached to no value) start each row's running softmax state as a key of that logit with a zero value.  When the grid
would be too small to fill the GPU (decode of few sequences with long contexts) the key range is cut into
``num_splits`` parts; each stores its partial softmax state, and the last of a tile's splits to finish (counted with
an atomic in ``split_counters``) merges them into the output, so no second kernel is launched. Only split 0 starts
from the sink, so the merge counts it once. ``num_splits`` is a run-time argument (not specialised), so one compiled kernel serves every
split count: the variants compiled at start-up are then the query tiles alone, and no step compiles during a run.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .attention import decode_order

__all__ = ["paged_attention", "write_kv", "compiled_variants"]


@triton.jit
def _tanh(x):
    """tanh from exp (tl has no stable portable tanh); saturates correctly to +-1 when exp overflows."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


MAX_SPLITS = 16
LOG2E = 1.4426950408889634  # logits are kept in log2 units: exp2(x * log2(e)) = exp(x), one multiply fewer


@triton.jit
def _attend_tile(q, k_ptr, v_ptr, bt_row, start, hi, q_pos, row_valid, offs_d, d_valid, kv_head,
                 m_i, l_i, acc, qk_scale, softcap, sliding_window,
                 stride_kb, stride_ks, stride_kh, stride_kd,
                 stride_vb, stride_vs, stride_vh, stride_vd,
                 BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, MASKED: tl.constexpr,
                 USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One tile of TILE_N keys from ``start`` into the running softmax state (log2 units: exp2 of scaled logits).
    MASKED=False: every key of the tile is below ``hi`` and visible to every row (no masks, no masked loads)."""
    offs_n = tl.arange(0, TILE_N)
    k_pos = start + offs_n
    if MASKED:
        k_valid = k_pos < hi  # also guarantees we never read block-table entries past the sequence
        phys = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
    else:
        phys = tl.load(bt_row + k_pos // BLOCK_SIZE).to(tl.int64)
    slot = k_pos % BLOCK_SIZE
    k_off = phys * stride_kb + slot * stride_ks + kv_head * stride_kh
    v_off = phys * stride_vb + slot * stride_vs + kv_head * stride_vh

    # K loaded already transposed ([HEAD_DIM_PAD, TILE_N]) so the dot needs no tl.trans.
    if MASKED:
        k = tl.load(k_ptr + k_off[None, :] + offs_d[:, None] * stride_kd,
                    mask=k_valid[None, :] & d_valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + k_off[None, :] + offs_d[:, None] * stride_kd, mask=d_valid[:, None], other=0.0)
    s = tl.dot(q, k, input_precision=DOT_PRECISION)
    if USE_SOFTCAP:
        s = softcap * _tanh(s * (qk_scale / 1.4426950408889634) / softcap) * 1.4426950408889634
    else:
        s = s * qk_scale
    if MASKED:
        mask = row_valid[:, None] & k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            mask = mask & (k_pos[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(mask, s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # Masked V rows must be 0, not garbage: 0 * NaN would poison the accumulator.
    if MASKED:
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :] * stride_vd,
                    mask=k_valid[:, None] & d_valid[None, :], other=0.0)
    else:
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :] * stride_vd, mask=d_valid[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _new_slot(slot_ptr, block_tables_ptr, stride_bt, seq, token, seq_len, BLOCK_SIZE: tl.constexpr,
              SLOT_FROM_TABLE: tl.constexpr):
    """Cache slot of a decode row's new token: ``slot[token]``, or (SLOT_FROM_TABLE) from the sequence's block-table
    row at the token's position ``seq_len - 1``, as ``ModelRunner`` would compute the slot mapping (no kernels of its
    own in the decode graph)."""
    if SLOT_FROM_TABLE:
        p = seq_len - 1
        phys = tl.load(block_tables_ptr + seq.to(tl.int64) * stride_bt + p // BLOCK_SIZE).to(tl.int64)
        slot = phys * BLOCK_SIZE + p % BLOCK_SIZE
    else:
        slot = tl.load(slot_ptr + token).to(tl.int64)
    return slot


@triton.jit
def _start_state(sinks_ptr, head, row_valid, BLOCK_M: tl.constexpr, USE_SINKS: tl.constexpr):
    """A decode loop's softmax state (running max, sum) at a sequence's first tile; USE_SINKS: as
    ``_paged_attention_kernel``'s first split, the sink as a key already seen."""
    if USE_SINKS:
        m0 = tl.load(sinks_ptr + head, mask=row_valid, other=-1.0e30).to(tl.float32) * 1.4426950408889634
        l0 = tl.where(row_valid, 1.0, 0.0)
    else:
        m0 = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    return m0, l0


@triton.jit
def _decode_loop_tile(q_ptr, k_ptr, v_ptr, out_ptr, bt_row, token, head, kv_head, t, n, kv_begin, q_pos, seq_len,
                      m0, l0, m_i, l_i, acc, row_valid, offs_d, d_valid, qk_scale, softcap, sliding_window,
                      stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
                      stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
                      BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, USE_WINDOW: tl.constexpr,
                      USE_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Key tile ``t`` of ``n`` of one (decode row ``token``, kv head) in a loop that walks several of them in turn
    (``_paged_decode_heads_kernel``'s heads, ``_paged_decode_pairs_kernel``'s sequences): the softmax state restarted
    at the first tile (to ``m0``, ``l0``), the tile attended through ``_attend_tile``'s masked path, the rows stored
    after the last tile. Returns the running state."""
    m_i = tl.where(t == 0, m0, m_i)
    l_i = tl.where(t == 0, l0, l_i)
    acc = tl.where(t == 0, 0.0, acc)
    q = tl.load(q_ptr + token * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    m_i, l_i, acc = _attend_tile(q, k_ptr, v_ptr, bt_row, kv_begin + t * TILE_N, seq_len, q_pos, row_valid,
                                 offs_d, d_valid, kv_head, m_i, l_i, acc, qk_scale, softcap, sliding_window,
                                 stride_kb, stride_ks, stride_kh, stride_kd,
                                 stride_vb, stride_vs, stride_vh, stride_vd,
                                 BLOCK_SIZE, TILE_N, True, USE_WINDOW, USE_SOFTCAP, DOT_PRECISION)
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + token * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :] & (t == n - 1))
    return m_i, l_i, acc


@triton.jit
def _store_new_kv(k_ptr, v_ptr, new_k_ptr, new_v_ptr, token, slot, kv_head, offs_d, d_valid,
                  stride_nkt, stride_nkh, stride_nvt, stride_nvh,
                  stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
                  BLOCK_SIZE: tl.constexpr):
    """A decode launch's own K/V write (WRITE_NEW): row ``token``'s new K and V of ``kv_head`` into cache ``slot``."""
    dst = (slot // BLOCK_SIZE) * stride_kb + (slot % BLOCK_SIZE) * stride_ks + kv_head * stride_kh
    k_new = tl.load(new_k_ptr + token * stride_nkt + kv_head * stride_nkh + offs_d, mask=d_valid)
    tl.store(k_ptr + dst + offs_d * stride_kd, k_new.to(k_ptr.dtype.element_ty), mask=d_valid)
    dst_v = (slot // BLOCK_SIZE) * stride_vb + (slot % BLOCK_SIZE) * stride_vs + kv_head * stride_vh
    v_new = tl.load(new_v_ptr + token * stride_nvt + kv_head * stride_nvh + offs_d, mask=d_valid)
    tl.store(v_ptr + dst_v + offs_d * stride_vd, v_new.to(v_ptr.dtype.element_ty), mask=d_valid)


# The step's query starts and sequence lengths are slices of its staging buffer, at offsets of any alignment: left
# unspecialised, so an offset does not compile a second variant in the middle of a run. Without sinks, ``sinks_ptr``
# gets a fixed dummy (it once got ``seq_lens``, whose offset changes with the step: a run compiled a second variant
# at its first step whose offset had the other alignment, about half a second inside a timed call).
@triton.jit(do_not_specialize=["num_splits", "stride_nkt", "stride_nkh", "stride_nvt", "stride_nvh"],
            do_not_specialize_on_alignment=["seq_lens_ptr", "query_start_loc_ptr", "sinks_ptr", "order_ptr",
                                            "new_k_ptr", "new_v_ptr", "slot_ptr", "qb_seq_ptr", "qb_blk_ptr"])
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    part_acc_ptr, part_m_ptr, part_l_ptr, counters_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, sinks_ptr, order_ptr,
    new_k_ptr, new_v_ptr, slot_ptr, qb_seq_ptr, qb_blk_ptr,
    stride_nkt, stride_nkh, stride_nvt, stride_nvh,
    qk_scale, softcap, sliding_window,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_bt,
    num_heads,
    num_splits,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEADS_FIRST: tl.constexpr = False,
    USE_ORDER: tl.constexpr = False,
    WRITE_NEW: tl.constexpr = False,
    SLOT_FROM_TABLE: tl.constexpr = False,
    ONE_LOOP: tl.constexpr = False,
    HEAVY_FIRST: tl.constexpr = False,
    FLAT: tl.constexpr = False,
):
    """Attention of BLOCK_Q queries x G heads (one kv head) of one sequence over one KV split.

    Grid (sequences, query blocks, kv heads x splits); HEADS_FIRST (tuning only): (kv heads x splits, sequences,
    query blocks), so the programs of one sequence's heads, whose K/V share cache lines' neighbourhood, start together.
    USE_ORDER: the i-th sequence of the grid is ``order[i]`` (longest context first: attention.DECODE_LONGEST_FIRST).
    WRITE_NEW (decode launches only, one query a sequence): the program whose key range holds the sequence's last
    position first stores that token's K and V (``new_k``/``new_v`` row ``q_start``, kv head ``kv_head``) at cache slot
    ``slot[q_start]``, then a block barrier makes the stores visible to its own loads: no separate write kernel. No
    other program reads that position (other splits cover earlier keys, other kv heads other heads).
    ONE_LOOP (tuning only): every key tile through the masked loop, one software pipeline over the whole range
    instead of two (a decode program on a short context has 3-4 tiles, and each loop's first loads wait unhidden).
    HEAVY_FIRST (tuning only): the grid's query blocks in reverse, last first. The GPU starts programs in grid order,
    and a causal query block's work grows with its position, so by default a prefill step's heaviest programs start
    last and the launch ends on a tail of them; reversed, they start first and the light ones fill in behind.
    FLAT (prefill graphs): grid (query-block slots, kv heads), one split; slot i is query block ``qb_blk[i]`` of
    sequence ``qb_seq[i]``, staged by the host, and a slot whose sequence is -1 has nothing to do. The grid depends only
    on the slots' count, not on the step's sequences or its longest query, so a CUDA graph captured once serves any
    step that fits (``ModelRunner``'s prefill graphs)."""
    if FLAT:
        seq = tl.load(qb_seq_ptr + tl.program_id(0))
        if seq < 0:
            return
        q_block = tl.load(qb_blk_ptr + tl.program_id(0))
        kv_head = tl.program_id(1)
        split = tl.program_id(1) * 0
        num_q_blocks = 1  # only the split merge's counters use it, and a flat launch has one split
        num_kv_heads = tl.num_programs(1)
    elif HEADS_FIRST:
        seq = tl.program_id(1)
        q_block = tl.program_id(2)
        kv_head = tl.program_id(0) // num_splits
        split = tl.program_id(0) % num_splits
        num_q_blocks = tl.num_programs(2)
        num_kv_heads = tl.num_programs(0) // num_splits
    else:
        seq = tl.program_id(0)
        q_block = tl.program_id(1)
        kv_head = tl.program_id(2) // num_splits
        split = tl.program_id(2) % num_splits
        num_q_blocks = tl.num_programs(1)
        num_kv_heads = tl.num_programs(2) // num_splits
    if HEAVY_FIRST:
        q_block = num_q_blocks - 1 - q_block
    if USE_ORDER:
        seq = tl.load(order_ptr + seq)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    # The grid is sized for max_query_len; shorter sequences leave programs with nothing to do.
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_start = seq_len - q_len  # absolute position of the sequence's first query

    # Row r of the tile is query (r // G) of this block, query head kv_head * G + r % G.  BLOCK_M may exceed
    # BLOCK_Q * G (padding to a power of two / to the 16-row minimum of tl.dot): those rows are masked.
    rows = tl.arange(0, BLOCK_M)
    q_idx = q_block * BLOCK_Q + rows // G
    head = kv_head * G + rows % G
    row_valid = (rows < BLOCK_Q * G) & (q_idx < q_len)
    q_pos = ctx_start + q_idx
    token = (q_start + q_idx).to(tl.int64)

    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM

    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_valid[:, None] & d_valid[None, :],
        other=0.0,
    )

    # Keys this block can see: up to its last query's position, from the first key its first query's window reaches.
    kv_end = ctx_start + tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len)
    if USE_WINDOW:
        kv_begin = tl.maximum(ctx_start + q_block * BLOCK_Q - sliding_window + 1, 0)
    else:
        kv_begin = seq_len * 0
    # Splits are TILE_N-aligned chunks of [kv_begin, kv_end); trailing splits may be empty. One split: the whole range.
    chunk = tl.cdiv(tl.cdiv(kv_end - kv_begin, num_splits), TILE_N) * TILE_N
    lo = kv_begin + split * chunk
    hi = tl.minimum(lo + chunk, kv_end)
    if WRITE_NEW:
        if (lo <= seq_len - 1) & (seq_len - 1 < hi):
            t_new = q_start.to(tl.int64)
            slot_new = _new_slot(slot_ptr, block_tables_ptr, stride_bt, seq, t_new, seq_len, BLOCK_SIZE,
                                 SLOT_FROM_TABLE)
            _store_new_kv(k_ptr, v_ptr, new_k_ptr, new_v_ptr, t_new, slot_new, kv_head,
                          offs_d, d_valid, stride_nkt, stride_nkh, stride_nvt, stride_nvh,
                          stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
                          BLOCK_SIZE)
        tl.debug_barrier()

    # Running max starts finite (not -inf) so a fully masked tile gives exp(-1e30 - -1e30) = 1, not exp(nan);
    # it is far below any real logit, so the first real key rescales the empty state by exp(-huge) = 0.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    if USE_SINKS:
        if split == 0:
            # The sink as a key already seen: logit sinks[head] (not scaled or capped), weight exp(0) = 1, value 0.
            # It is finite, so masked tiles after it still give exp(-inf - m) = 0 as above.
            m_i = tl.load(sinks_ptr + head, mask=row_valid, other=-1.0e30).to(tl.float32) * 1.4426950408889634
            l_i = tl.where(row_valid, 1.0, 0.0)

    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # Keys up to the block's first query position are visible to every row: whole tiles of them need no mask (no
    # causal, range or window test, no masked loads). The rest (the diagonal, a split's ragged end, any window) does.
    if USE_WINDOW or ONE_LOOP:
        mid = lo
    else:
        mid = lo + tl.maximum(tl.minimum(hi, ctx_start + q_block * BLOCK_Q + 1) - lo, 0) // TILE_N * TILE_N
    for start in range(lo, mid, TILE_N):
        m_i, l_i, acc = _attend_tile(q, k_ptr, v_ptr, bt_row, start, hi, q_pos, row_valid, offs_d, d_valid, kv_head,
                                     m_i, l_i, acc, qk_scale, softcap, sliding_window,
                                     stride_kb, stride_ks, stride_kh, stride_kd,
                                     stride_vb, stride_vs, stride_vh, stride_vd,
                                     BLOCK_SIZE, TILE_N, False, USE_WINDOW, USE_SOFTCAP, DOT_PRECISION)
    for start in range(mid, hi, TILE_N):
        m_i, l_i, acc = _attend_tile(q, k_ptr, v_ptr, bt_row, start, hi, q_pos, row_valid, offs_d, d_valid, kv_head,
                                     m_i, l_i, acc, qk_scale, softcap, sliding_window,
                                     stride_kb, stride_ks, stride_kh, stride_kd,
                                     stride_vb, stride_vs, stride_vh, stride_vd,
                                     BLOCK_SIZE, TILE_N, True, USE_WINDOW, USE_SOFTCAP, DOT_PRECISION)

    if num_splits == 1:
        # Every valid row saw at least its own key, so l_i > 0 there; the guard only keeps padded rows finite.
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & d_valid[None, :],
        )
    else:
        # Unnormalised partial state; an empty split leaves (m=-1e30, l=0, acc=0), which the merge weights by 0.
        part = (token * num_heads + head) * num_splits + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=row_valid[:, None] & d_valid[None, :])
        tl.store(part_m_ptr + part, m_i, mask=row_valid)
        tl.store(part_l_ptr + part, l_i, mask=row_valid)
        # The tile's last split to finish merges every split's state (no second launch). Ordering: every thread's
        # partial stores precede the barrier; the counter's acq_rel atomic (one thread, as CUDA's grid sync does)
        # releases them to, and acquires them for, the last program; its loads bypass L1 (.cg). The last program
        # puts the counter back to 0, so the next launch (the next layer, the next replay) starts from zero.
        tl.debug_barrier()
        lock = counters_ptr + (seq * num_q_blocks + q_block) * num_kv_heads + kv_head
        if tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
            tl.atomic_xchg(lock, 0, sem="relaxed", scope="gpu")
            m_run = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
            l_run = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc_run = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
            first = (token * num_heads + head) * num_splits
            for s in range(0, num_splits):
                m_s = tl.load(part_m_ptr + first + s, mask=row_valid, other=-1.0e30, cache_modifier=".cg")
                l_s = tl.load(part_l_ptr + first + s, mask=row_valid, other=0.0, cache_modifier=".cg")
                acc_s = tl.load(part_acc_ptr + (first + s)[:, None] * HEAD_DIM + offs_d[None, :],
                                mask=row_valid[:, None] & d_valid[None, :], other=0.0, cache_modifier=".cg")
                m_new = tl.maximum(m_run, m_s)
                a = tl.exp2(m_run - m_new)
                b = tl.exp2(m_s - m_new)
                l_run = l_run * a + l_s * b
                acc_run = acc_run * a[:, None] + acc_s * b[:, None]
                m_run = m_new
            out = acc_run / tl.where(l_run > 0.0, l_run, 1.0)[:, None]
            tl.store(
                out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
                out.to(out_ptr.dtype.element_ty),
                mask=row_valid[:, None] & d_valid[None, :],
            )


# A decode launch with one program per sequence over a group of its kv heads, or all of them
# (``paged_attention(heads_per_program=)``; the sweep's ``heads_per_program``). Short contexts make short programs: on
# the H200 the default launch read K/V at 3.1-3.2 TB/s for W1's and W2's decode (contexts of 64..768 keys, 1,536 and
# 2,048 programs) and at 4.1 TB/s for E1's (800..1,060 keys, 4,096 programs), which a fixed cost of about 300 keys'
# worth a program would explain (session 20). One program walks (kv head, key tile) pairs in one loop, one software
# pipeline over its heads, instead of a program and a pipeline's start per head.
@triton.jit(do_not_specialize=["stride_nkt", "stride_nkh", "stride_nvt", "stride_nvh"],
            do_not_specialize_on_alignment=["seq_lens_ptr", "query_start_loc_ptr", "sinks_ptr", "order_ptr",
                                            "new_k_ptr", "new_v_ptr", "slot_ptr"])
def _paged_decode_heads_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, sinks_ptr, order_ptr,
    new_k_ptr, new_v_ptr, slot_ptr,
    stride_nkt, stride_nkh, stride_nvt, stride_nvh,
    qk_scale, softcap, sliding_window,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_bt,
    heads,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_ORDER: tl.constexpr = False,
    WRITE_NEW: tl.constexpr = False,
    SLOT_FROM_TABLE: tl.constexpr = False,
):
    """Decode attention of one sequence's query (one token) for a group of ``heads`` kv heads (and their query
    heads): grid (sequences, kv heads / heads). The loop visits the group's first kv head's key tiles in order, then
    the next head's: the running softmax state starts afresh at a head's first tile and the head's rows are stored
    after its last; every tile goes through ``_attend_tile``'s masked path, whose valid keys give the unmasked path's
    values. WRITE_NEW: the step's K and V of the group's kv heads are stored first, then a block barrier, as in
    ``_paged_attention_kernel``."""
    seq = tl.program_id(0)
    head0 = tl.program_id(1) * heads
    if USE_ORDER:
        seq = tl.load(order_ptr + seq)
    q_start = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == q_start:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    token = q_start.to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    row_valid = rows < G
    q_pos = tl.zeros([BLOCK_M], dtype=tl.int32) + (seq_len - 1)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    if USE_WINDOW:
        kv_begin = tl.maximum(seq_len - sliding_window, 0)
    else:
        kv_begin = seq_len * 0
    n_tiles = tl.cdiv(seq_len - kv_begin, TILE_N)
    if WRITE_NEW:
        slot = _new_slot(slot_ptr, block_tables_ptr, stride_bt, seq, token, seq_len, BLOCK_SIZE, SLOT_FROM_TABLE)
        for h in range(head0, head0 + heads):
            _store_new_kv(k_ptr, v_ptr, new_k_ptr, new_v_ptr, token, slot, h, offs_d, d_valid,
                          stride_nkt, stride_nkh, stride_nvt, stride_nvh,
                          stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
                          BLOCK_SIZE)
        tl.debug_barrier()

    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    for it in range(0, heads * n_tiles):
        kv_head = head0 + it // n_tiles
        t = it - (kv_head - head0) * n_tiles
        head = kv_head * G + rows % G
        m0, l0 = _start_state(sinks_ptr, head, row_valid, BLOCK_M, USE_SINKS)
        m_i, l_i, acc = _decode_loop_tile(q_ptr, k_ptr, v_ptr, out_ptr, bt_row, token, head, kv_head, t, n_tiles,
                                          kv_begin, q_pos, seq_len, m0, l0, m_i, l_i, acc, row_valid, offs_d, d_valid,
                                          qk_scale, softcap, sliding_window,
                                          stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
                                          stride_kb, stride_ks, stride_kh, stride_kd,
                                          stride_vb, stride_vs, stride_vh, stride_vd,
                                          BLOCK_SIZE, TILE_N, USE_WINDOW, USE_SOFTCAP, DOT_PRECISION)


# Decode launches of one program per pair of sequences and kv head (``paged_attention(pairs=True)``,
# attention.DECODE_PAIRS; the sweep's ``pairs``). Small programs (1 warp over 32-key tiles) read W1's decode K/V
# 1.13-1.23x faster than the 4-warp launch at one context each, but only 1.02x on its mixed contexts (64..768 keys):
# 13 of them fit an SM, so the launch is about one wave whose programs are handed out once, and the SMs that drew the
# long contexts end it (no ordering of the grid helped, nor splitting long ranges, whose merges cost more; session 25).
# Program i takes the launch's i-th and (B-1-i)-th sequences (under the longest-first order: a long one and a short
# one), so programs carry about equal work; with 2 warps over 64-key tiles (PAIRS_*) that ran W1's mixed contexts
# 1.09x faster than the 4-warp launch and W2's 1.12x. ``num_seqs`` is left unspecialised: an eager decode step of any
# row count runs the variant compiled at start-up.
@triton.jit(do_not_specialize=["stride_nkt", "stride_nkh", "stride_nvt", "stride_nvh", "num_seqs"],
            do_not_specialize_on_alignment=["seq_lens_ptr", "query_start_loc_ptr", "sinks_ptr", "order_ptr",
                                            "new_k_ptr", "new_v_ptr", "slot_ptr"])
def _paged_decode_pairs_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, sinks_ptr, order_ptr,
    new_k_ptr, new_v_ptr, slot_ptr,
    stride_nkt, stride_nkh, stride_nvt, stride_nvh,
    qk_scale, softcap, sliding_window,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_bt,
    num_seqs,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_ORDER: tl.constexpr = False,
    WRITE_NEW: tl.constexpr = False,
    SLOT_FROM_TABLE: tl.constexpr = False,
):
    """Decode attention (one query a sequence) of two sequences for kv head ``program_id(1)``: grid (ceil(B / 2),
    kv heads). Program i takes the launch's sequences i and B-1-i (``order[i]`` and ``order[B-1-i]`` with USE_ORDER;
    the middle one alone when B is odd) and walks the first one's key tiles, then the second's, in one loop: the
    running softmax state starts afresh at a sequence's first tile and its rows are stored after its last, every tile
    through ``_attend_tile``'s masked path, as ``_paged_decode_heads_kernel`` does for a sequence's kv heads.
    WRITE_NEW: both sequences' new K and V of this kv head are stored first, then a block barrier."""
    i = tl.program_id(0)
    kv_head = tl.program_id(1)
    j = num_seqs - 1 - i
    if USE_ORDER:
        seq_a = tl.load(order_ptr + i)
        seq_b = tl.load(order_ptr + j)
    else:
        seq_a = i
        seq_b = j
    start_a = tl.load(query_start_loc_ptr + seq_a)
    start_b = tl.load(query_start_loc_ptr + seq_b)
    len_a = tl.load(seq_lens_ptr + seq_a)
    len_b = tl.load(seq_lens_ptr + seq_b)
    # a padded row (no query) has no tiles; the middle sequence of an odd count is program i's alone
    has_a = tl.load(query_start_loc_ptr + seq_a + 1) > start_a
    has_b = (tl.load(query_start_loc_ptr + seq_b + 1) > start_b) & (j > i)
    if USE_WINDOW:
        begin_a = tl.maximum(len_a - sliding_window, 0)
        begin_b = tl.maximum(len_b - sliding_window, 0)
    else:
        begin_a = len_a * 0
        begin_b = len_b * 0
    n_a = tl.where(has_a, tl.cdiv(len_a - begin_a, TILE_N), 0)
    n_b = tl.where(has_b, tl.cdiv(len_b - begin_b, TILE_N), 0)
    rows = tl.arange(0, BLOCK_M)
    row_valid = rows < G
    head = kv_head * G + rows % G
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    if WRITE_NEW:
        for second_w in tl.static_range(2):  # the pair's first sequence, then its second
            if second_w == 0:
                seq_w, start_w, len_w, has_w = seq_a, start_a, len_a, has_a
            else:
                seq_w, start_w, len_w, has_w = seq_b, start_b, len_b, has_b
            if has_w:
                t_w = start_w.to(tl.int64)
                slot_w = _new_slot(slot_ptr, block_tables_ptr, stride_bt, seq_w, t_w, len_w, BLOCK_SIZE,
                                   SLOT_FROM_TABLE)
                _store_new_kv(k_ptr, v_ptr, new_k_ptr, new_v_ptr, t_w, slot_w, kv_head, offs_d, d_valid,
                              stride_nkt, stride_nkh, stride_nvt, stride_nvh,
                              stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
                              BLOCK_SIZE)
        tl.debug_barrier()

    m0, l0 = _start_state(sinks_ptr, head, row_valid, BLOCK_M, USE_SINKS)
    m_i = m0
    l_i = l0
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    for it in range(0, n_a + n_b):
        second = it >= n_a
        t = tl.where(second, it - n_a, it)
        n = tl.where(second, n_b, n_a)
        seq = tl.where(second, seq_b, seq_a)
        seq_len = tl.where(second, len_b, len_a)
        token = tl.where(second, start_b, start_a).to(tl.int64)
        kv_begin = tl.where(second, begin_b, begin_a)
        q_pos = tl.zeros([BLOCK_M], dtype=tl.int32) + (seq_len - 1)
        bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
        m_i, l_i, acc = _decode_loop_tile(q_ptr, k_ptr, v_ptr, out_ptr, bt_row, token, head, kv_head, t, n,
                                          kv_begin, q_pos, seq_len, m0, l0, m_i, l_i, acc, row_valid, offs_d, d_valid,
                                          qk_scale, softcap, sliding_window,
                                          stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
                                          stride_kb, stride_ks, stride_kh, stride_kd,
                                          stride_vb, stride_vs, stride_vh, stride_vd,
                                          BLOCK_SIZE, TILE_N, USE_WINDOW, USE_SOFTCAP, DOT_PRECISION)


# Launch-configuration overrides (``tile_n``, ``num_warps``, ``num_stages``, ``target_m``, ``num_kv_splits``, the
# grid orders ``heads_first``, ``longest_first`` and ``heavy_first``, ``one_loop``, and ``maxnreg``: a register cap
# per thread, which ptxas meets here without spilling and which doubles the programs an SM holds for W7's prefill
# launch, 2 -> 4 at 128 registers; kernel_preflight.py) for the tuning sweep only; empty in use.
TUNING: dict = {}


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: a host-side query, safe during graph capture)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _smem_per_block(device: torch.device) -> int:
    """Shared memory a program may use on ``device`` (0 where unknown: CPU, the interpreter, an older torch)."""
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device.index if device.index is not None else torch.cuda.current_device())
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 0)


@functools.lru_cache(maxsize=None)
def _unused_partials(device: torch.device) -> torch.Tensor:
    return torch.empty(1, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _unused_counters(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


# The pairs launch (``paged_attention(pairs=True)``, attention.DECODE_PAIRS): 2 warps over 64-key tiles, 2 pipeline
# stages, capped at 128 registers (sm_90: no spills; kernel_preflight.py). Chosen on the H200 (session 25) over 1 warp
# and 32-key tiles (0.84-0.86x of the 4-warp launch on W1's decode shape when paired: half as many programs), 4 warps
# (0.73-0.95x), 32- and 128-key tiles (0.74-0.97x), 3 stages (1.06x against 1.09x) and caps of 96 or none (1.05-1.08x).
PAIRS_TILE_N = 64
PAIRS_WARPS = 2
PAIRS_MAXNREG = 128

# Automatic splits: until the launch has SPLIT_PROGRAMS_PER_SM programs per streaming multiprocessor, at most
# MAX_AUTO_SPLITS. On an H200 (attention_tuning.py, docs/results/attention_tuning_h200.md, session 8), W3's decode (32
# sequences of equal length, 8 kv heads: 256 programs) with 128-key tiles ran 1.11-1.17x faster unsplit than with the
# 4 splits of 64-key tiles that 4 programs per SM had given; 48 sequences of 1,000-2,000 tokens (W7's tail) 1.17x.
# Beyond 8 splits the merge by the last program (one split after another) cost more than a second kernel would.
SPLIT_PROGRAMS_PER_SM = 1
MAX_AUTO_SPLITS = 8


def _target_rows(max_query_len: int, head_dim: int, dtype: torch.dtype) -> int:
    """Query rows (queries x GQA heads) a prefill or mixed launch aims its tile at. 64 (128 at head_dim <= 64) for
    16-bit inputs: each K/V tile is amortised over many query rows; decode uses BLOCK_Q = 1 and only the GQA group
    fills the rows. tl.dot needs >= 16 rows, hence the floor on BLOCK_M. fp32 dots run on FMA units ("ieee") and
    spill registers with 64-row tiles on sm_90 (ptxas -v), so fp32 aims at 16 rows."""
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    target_m = 16 if dtype == torch.float32 else (128 if head_dim_pad <= 64 else 64)
    if TUNING and max_query_len > 1:  # the sweep's query tile of prefill and mixed steps
        target_m = TUNING.get("target_m", target_m)
    return target_m


def flat_block_q(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Queries per query block of a flat launch (``q_blocks``): a prefill launch's tile, whatever the step's queries."""
    G = num_heads // num_kv_heads
    return max(1, _target_rows(1 << 30, head_dim, dtype) // triton.next_power_of_2(G))


def _split_target(device: torch.device) -> int:
    """Programs a launch should have before its KV range is split."""
    return SPLIT_PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def split_counters(device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters for the split merge, enough for any launch that splits automatically (its programs
    are fewer than ``_split_target``). Owned by a caller that launches in order on one stream (the model runner):
    every launch leaves them at zero again."""
    n = _split_target(device) if device.type == "cuda" else 1
    return torch.zeros(n, dtype=torch.int32, device=device)


def _auto_num_splits(q: torch.Tensor, programs: int, max_ctx: int, tile_n: int, head_dim: int) -> int:
    """Split the KV range only when the grid is too small to fill the GPU (few-sequence, long-context decode)."""
    if q.device.type != "cuda":
        return 1  # CPU runs are the Triton interpreter: extra programs only cost time
    target = _split_target(q.device)
    splits = 1
    # Each split should keep >= 4 key tiles of the longest possible context (the block table's width bounds it).
    max_useful = max(1, max_ctx // (4 * tile_n))
    scratch_per_split = q.shape[0] * q.shape[1] * (head_dim + 2) * 4
    while (programs * splits < target and splits * 2 <= min(MAX_AUTO_SPLITS, max_useful)
           and scratch_per_split * splits * 2 <= (256 << 20)):
        splits *= 2
    return splits


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int = 0,
    softcap: float = 0.0,
    out: Optional[torch.Tensor] = None,
    num_kv_splits: int = 0,
    sinks: Optional[torch.Tensor] = None,
    split_counters: Optional[torch.Tensor] = None,
    new_kv: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    order: Optional[torch.Tensor] = None,
    maxnreg: int = 0,
    q_blocks: Optional[tuple[torch.Tensor, torch.Tensor, int]] = None,
    decode_warps: int = 0,
    decode_warps_maxnreg: int = 0,
    heads_per_program: int = 0,
    pairs: bool = False,
) -> torch.Tensor:
    """Causal attention of the packed queries ``q`` [T, num_heads, head_dim] over the paged KV cache.

    ``max_query_len`` must be >= every sequence's query count (an upper bound is fine: it only sizes the grid).
    Returns ``out`` [T, num_heads, head_dim] in q's dtype; rows of ``out`` not covered by ``query_start_loc`` are left
    untouched.  ``num_kv_splits``: 0 picks automatically, otherwise a power of two forcing that many KV splits.
    ``sinks``: optional ``[num_heads]`` attention-sink logits (any float dtype), one extra softmax term per head.
    ``split_counters``: int32 zeros from ``split_counters()`` that the KV-split merge counts in (and leaves at zero);
    None, or too few for this launch: a zeroed buffer is made for the call.
    ``new_kv``: ``(k, v, slot_mapping)`` of a decode launch (``max_query_len == 1``; k, v ``[T, kv_heads, head_dim]``
    with a contiguous last dim): the kernel writes them into the cache itself before attending (``write_kv``'s work,
    without its launch). ``slot_mapping`` None: row i's slot is the one its block-table row holds for its new token's
    position ``seq_lens[i] - 1`` (``block_tables[i, p // block_size] * block_size + p % block_size``), so a decode
    step needs no slot mapping of its own.
    ``order``: int32 ``[B]``, a permutation of the sequences: the launch's i-th sequence is ``order[i]`` (the GPU starts
    programs in grid order; ``attention.DECODE_LONGEST_FIRST`` passes the longest contexts first).
    ``maxnreg``: a register cap for ptxas on decode launches at head dims up to 64 (``attention.DECODE_MAXNREG``; at
    128 a decode launch is bound by shared memory and the cap is ignored).
    ``decode_warps``: warps of a decode program at 16-bit head dims up to 64 (``attention.DECODE_WARPS``); 0 keeps the
    kernel's 4 warps over 128-key tiles. 2 and 1 take 64-key tiles, capped at ``decode_warps_maxnreg`` registers where
    given (``attention.DECODE_WARPS_MAXNREG``: W1's 2-warp program with the fused write compiles to 96 without spills
    on sm_90), not at ``maxnreg``, which caps the launches that keep the kernel's own tile (fp32, head dims past 64).
    ``heads_per_program``: 2 or more: a decode launch that would not split its KV range gets one program per
    sequence and group of that many kv heads (all of them where that does not divide the kv heads;
    ``_paged_decode_heads_kernel``) instead of one per (sequence, kv head); the same values.
    ``pairs``: a decode launch at head dims up to 64 that would not split its KV range gets one program per pair of
    sequences (the i-th and the (B-1-i)-th of the launch's order) and kv head (``_paged_decode_pairs_kernel``; 2
    warps over 64-key tiles, capped at 128 registers: ``PAIRS_*``) instead of one per (sequence, kv head); the same
    values as that launch through its masked loop (``one_loop``). ``heads_per_program`` takes precedence.
    ``q_blocks``: ``(seq, blk, block_q)``, int32 vectors of one length N and the query tile their table was made for
    (``flat_block_q``; checked): a flat launch of N query-block slots, slot i being query block ``blk[i]`` of sequence
    ``seq[i]``, -1 for an empty slot (``attention.q_block_table`` makes them). Its grid depends on N alone, so a CUDA
    graph captured once serves every step whose table fits; one KV split; ``max_query_len`` then only has to be >= 1.
    """
    T, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, head_dim_kv = k_cache.shape
    B = seq_lens.shape[0]
    assert v_cache.shape == k_cache.shape, "k_cache and v_cache must have the same shape"
    assert head_dim_kv == head_dim, f"q head_dim {head_dim} != cache head_dim {head_dim_kv}"
    assert num_heads % num_kv_heads == 0, f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}"
    assert block_size & (block_size - 1) == 0, f"block_size {block_size} must be a power of two"
    assert query_start_loc.shape[0] == B + 1 and block_tables.shape[0] >= B
    assert k_cache.dtype == v_cache.dtype == q.dtype, "q, k_cache and v_cache must share a dtype"
    assert block_tables.stride(1) == 1, "block_tables rows must be contiguous"
    if sinks is not None:
        assert sinks.shape == (num_heads,) and sinks.stride(0) == 1, f"sinks must be [{num_heads}] and contiguous"
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if B == 0 or T == 0 or max_query_len <= 0:
        return out

    G = num_heads // num_kv_heads
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    if q_blocks is not None:  # a flat launch: prefill tiles, even for a step of one-token rows
        max_query_len = max(max_query_len, 2)
    target_m = _target_rows(max_query_len, head_dim, q.dtype)
    if q_blocks is not None:  # the query tile its table was made for (any step length)
        qb_seq, qb_blk, table_block_q = q_blocks
        block_q = flat_block_q(num_heads, num_kv_heads, head_dim, q.dtype)
        if table_block_q != block_q:
            raise ValueError(f"q_blocks: a table of {table_block_q}-query blocks for a launch whose query tile is "
                             f"{block_q} queries ({num_heads} heads, {num_kv_heads} kv heads, head_dim {head_dim})")
        assert qb_seq.shape == qb_blk.shape and qb_seq.dim() == 1, "q_blocks: two int32 vectors of one length"
        assert not num_kv_splits or num_kv_splits == 1, "a flat launch has one KV split"
    else:
        block_q = min(triton.next_power_of_2(max_query_len), max(1, target_m // triton.next_power_of_2(G)))
    block_m = max(16, triton.next_power_of_2(block_q * G))
    tile_n = 32 if head_dim_pad >= 256 else 64
    # fp32: 8 warps from head_dim 128 (4 warps spill there). 16-bit: decode tiles (one query) take 4 warps (keys: below);
    # query tiles of prefill and mixed steps take 32 keys and 4 warps, which ran 1.85x faster than 64 keys and 8 warps
    # at head_dim 128 (8 x 1024-token prompts) and 1.03-1.10x at head_dim 64 on an H200 (attention_tuning.py, in
    # docs/results/attention_tuning_h200.md): 8 warps for a 64x128 accumulator eased register pressure but cost time.
    if target_m == 16:
        num_warps = 8 if head_dim_pad >= 128 or block_m * head_dim_pad >= 64 * 128 else 4
    else:
        num_warps = 8 if head_dim_pad >= 256 and block_m * head_dim_pad >= 64 * 128 else 4  # head_dim 256: as before
        if block_q > 1:
            tile_n = 32
        # Since keys below a query tile's first position are visited without masks (session 5's kernel), 128-row
        # query tiles of 64 keys and 8 warps ran 1.16-1.19x faster than 64 rows at head_dim 64 on W4's long prompts
        # and 1.01-1.04x on 512-800-token ones; at head_dim 128 they were slower (0.97x), so 64 rows stay there
        # (attention_tuning.py on an H200, docs/results/attention_tuning_h200.md).
        if block_m >= 128 and head_dim_pad <= 64:
            tile_n, num_warps = 64, 8
        # Decode (one query a sequence): 128-key tiles, where two pipeline stages of them fit in shared memory. With
        # splits kept for launches of fewer programs than SMs, they ran 1.02-1.17x faster than 64 keys on the W1, W2,
        # W3 and W7 decode shapes, 0.97-0.98x on two (E1; W3's requests at contexts spread over 256..2304), on an H200
        # (session 8, docs/results/attention_tuning_h200.md).
        if max_query_len == 1 and head_dim_pad <= 128 and _smem_per_block(q.device) >= 2 * 2 * 128 * head_dim_pad * 2 + 8192:
            tile_n = 128
    # Decode at head dims up to 64 with small programs (``decode_warps``; attention.DECODE_WARPS, off): short contexts
    # are a few key tiles a program, so a launch's speed is how many programs an SM keeps in flight. 2 warps and
    # 64-key tiles ran W1's decode shape 1.07x faster than 4 warps and 128 keys on an H200, W7's head dim 128 0.95x
    # (session 19, attention_tuning_h200.md); capped at 96 registers (10 programs an SM), W1's steady decode
    # attention in the engine 1.12x, end to end inside the spread (session 22).
    small_decode = bool(decode_warps) and max_query_len == 1 and head_dim_pad <= 64 and q.element_size() == 2
    if small_decode:
        tile_n, num_warps = 64, decode_warps
    num_stages = 2
    if TUNING:  # recipes/bench/attention_tuning.py's sweep
        tile_n = TUNING.get("tile_n", tile_n)
        num_warps = TUNING.get("num_warps", num_warps)
        num_stages = TUNING.get("num_stages", num_stages)
    num_q_blocks = triton.cdiv(max_query_len, block_q)

    num_kv_splits = TUNING.get("num_kv_splits", num_kv_splits) if TUNING else num_kv_splits
    maxnreg = (decode_warps_maxnreg if small_decode else maxnreg) if max_query_len == 1 and head_dim_pad <= 64 else 0
    maxnreg = TUNING.get("maxnreg", maxnreg) if TUNING else maxnreg  # the sweep's own cap overrides, any launch
    programs = B * num_q_blocks * num_kv_heads
    if q_blocks is not None:
        num_splits = 1
    elif num_kv_splits:
        assert num_kv_splits & (num_kv_splits - 1) == 0 and num_kv_splits <= MAX_SPLITS, \
            f"num_kv_splits must be a power of two <= {MAX_SPLITS}"
        num_splits = num_kv_splits
    else:
        num_splits = _auto_num_splits(q, programs, block_tables.shape[1] * block_size, tile_n, head_dim)

    if num_splits > 1:
        part_acc = torch.empty((T, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_m = torch.empty((T, num_heads, num_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        if split_counters is None or split_counters.numel() < programs:
            split_counters = torch.zeros(programs, dtype=torch.int32, device=q.device)
    else:
        # Never touched with one split, but float32 like real partials: the kernel's signature (so its compiled
        # variant) is the same with and without splits.
        part_acc = part_m = part_l = _unused_partials(q.device)
    if split_counters is None:
        split_counters = _unused_counters(q.device)

    slot_from_table = False
    if new_kv is not None:
        new_k, new_v, new_slots = new_kv
        assert max_query_len == 1, "new_kv: decode launches only (one query a sequence)"
        assert new_k.shape == new_v.shape == (T, num_kv_heads, head_dim)
        assert new_slots is None or new_slots.shape == (T,)
        assert new_k.stride(2) == 1 and new_v.stride(2) == 1, "new_kv: k and v need a contiguous last dim"
        if new_slots is None:  # each row's slot from its block-table row at position seq_len - 1
            slot_from_table, new_slots = True, seq_lens
    else:
        new_k = new_v = new_slots = seq_lens  # never read
    heads = int(TUNING.get("heads_per_program", heads_per_program)) if TUNING else heads_per_program
    heads = heads if num_kv_heads % max(heads, 1) == 0 else num_kv_heads
    grouped = heads > 1 and max_query_len == 1 and q_blocks is None and num_splits == 1
    heads_first = bool(TUNING.get("heads_first")) if TUNING else False
    if order is None and TUNING:  # the sweep's longest-first order, computed once outside timing, or here
        order = TUNING.get("order")
    if order is None and TUNING and TUNING.get("longest_first"):
        order = decode_order(seq_lens)
    launch = dict(num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    # the two kernels' shared arguments: the step's tensors, then scalars and strides
    tensors = (block_tables, seq_lens, query_start_loc, sinks if sinks is not None else _unused_partials(q.device),
               order if order is not None else seq_lens, new_k, new_v, new_slots)
    strides = (new_k.stride(0), new_k.stride(1) if new_kv is not None else 0,
               new_v.stride(0), new_v.stride(1) if new_kv is not None else 0,
               float(scale) * LOG2E, float(softcap) if softcap else 1.0, int(sliding_window),
               q.stride(0), q.stride(1), q.stride(2),
               k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
               v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
               out.stride(0), out.stride(1), out.stride(2),
               block_tables.stride(0))
    flags = dict(USE_WINDOW=sliding_window > 0, USE_SOFTCAP=softcap > 0, USE_SINKS=sinks is not None,
                 # fp32 models want fp32 accuracy (TF32 would miss the reference by ~1e-3); 16-bit inputs ignore this.
                 DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                 USE_ORDER=order is not None, WRITE_NEW=new_kv is not None, SLOT_FROM_TABLE=slot_from_table)
    pairs = bool(TUNING.get("pairs", pairs)) if TUNING else pairs
    if (pairs and max_query_len == 1 and q_blocks is None and num_splits == 1 and not grouped
            and (head_dim_pad <= 64 or TUNING)):
        p_launch = dict(num_warps=PAIRS_WARPS, num_stages=2, maxnreg=PAIRS_MAXNREG)
        p_tile = PAIRS_TILE_N
        if TUNING:  # the sweep's own tile, warps, stages and cap
            p_tile = TUNING.get("tile_n", p_tile)
            p_launch.update({k: TUNING[k] for k in ("num_warps", "num_stages", "maxnreg") if k in TUNING})
        if not p_launch["maxnreg"]:
            del p_launch["maxnreg"]
        _paged_decode_pairs_kernel[((B + 1) // 2, num_kv_heads)](
            q, k_cache, v_cache, out, *tensors, *strides, B,
            G=G, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size, BLOCK_M=block_m, TILE_N=p_tile,
            **flags, **p_launch,
        )
        return out
    if grouped:
        _paged_decode_heads_kernel[(B, num_kv_heads // heads)](
            q, k_cache, v_cache, out, *tensors, *strides, heads,
            G=G, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size, BLOCK_M=block_m, TILE_N=tile_n,
            **flags, **launch,
        )
        return out
    if q_blocks is not None:
        grid = (qb_seq.shape[0], num_kv_heads)
    elif heads_first:
        grid = (num_kv_heads * num_splits, B, num_q_blocks)
    else:
        grid = (B, num_q_blocks, num_kv_heads * num_splits)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out,
        part_acc, part_m, part_l, split_counters,
        *tensors,
        qb_seq if q_blocks is not None else seq_lens, qb_blk if q_blocks is not None else seq_lens,
        *strides,
        num_heads,
        num_splits,
        G=G,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        TILE_N=tile_n,
        HEADS_FIRST=heads_first,
        ONE_LOOP=bool(TUNING.get("one_loop")) if TUNING else False,
        HEAVY_FIRST=bool(TUNING.get("heavy_first")) and q_blocks is None if TUNING else False,
        FLAT=q_blocks is not None,
        **flags,
        **launch,
    )
    return out


# Strides of k and v change with the step's token count (transformers hands them over as [1, heads, T, dim] views):
# left unspecialised, as are the pointers (views at any offset), so no step compiles a second variant mid-run.
@triton.jit(do_not_specialize=["stride_kt", "stride_kh", "stride_vt", "stride_vh"],
            do_not_specialize_on_alignment=["k_ptr", "v_ptr", "slot_ptr"])
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    BLOCK_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_STRIDES: tl.constexpr,
):
    """Token t's keys and values (every kv head) into cache slot ``slot_mapping[t]``: one launch for both caches.
    The caches' strides are [block, slot, kv head] (dim contiguous). BLOCK_STRIDES: a slot is addressed as (block,
    slot in block), for a head-major layout; else as a flat slot of the contiguous engine layout."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HEAD_DIM_PAD)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    if BLOCK_STRIDES:
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + h * stride_ch + d
    else:
        dst = slot * stride_cs + h * stride_ch + d
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """``k_cache.view(-1, heads, dim)[slot_mapping] = k`` and the same for ``v`` (k, v: [T, kv_heads, dim], any
    strides with a contiguous last dim), in one kernel instead of two ``index_copy_``: a decode step writes every
    layer's K and V, and at a few hundred tokens each copy costs a launch's fixed time (about 2.8 us on an H200).
    The caches: [blocks, block_size, kv_heads, dim] with a contiguous last dim, as the engine's or a head-major
    layout hands them out (``kv_cache.KV_LAYOUT``), both with the same strides."""
    T, kv_heads, head_dim = k.shape
    assert v.shape == k.shape and k.stride(2) == 1 and v.stride(2) == 1, "k and v: [T, kv_heads, dim], dim contiguous"
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (kv_heads, head_dim)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and slot_mapping.shape == (T,)
    if T == 0:
        return
    heads_pad, dim_pad = triton.next_power_of_2(kv_heads), triton.next_power_of_2(head_dim)
    _write_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], NUM_KV_HEADS=kv_heads, HEADS_PAD=heads_pad, HEAD_DIM=head_dim, HEAD_DIM_PAD=dim_pad,
        BLOCK_STRIDES=not k_cache.is_contiguous(),
        num_warps=4 if heads_pad * dim_pad >= 1024 else 1,
    )


KERNELS = (_paged_attention_kernel, _paged_decode_heads_kernel, _paged_decode_pairs_kernel, _write_kv_kernel)


def compiled_variants() -> int:
    """Compiled variants of this module's kernels held in memory (a test checks that none is added during a run)."""
    return count_variants(*KERNELS)


def count_variants(*kernels) -> int:
    """Compiled variants of Triton ``kernels`` held in memory, across Triton versions' cache layouts."""
    total = 0
    for fn in kernels:
        caches = getattr(fn, "device_caches", None)
        if caches is not None:
            total += sum(len(entry[0]) for entry in caches.values())
        else:
            total += sum(len(c) for c in getattr(fn, "cache", {}).values())
    return total
