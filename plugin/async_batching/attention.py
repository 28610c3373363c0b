"""The attention function registered in transformers' ``AttentionInterface``.

The model's own code calls it per layer with the packed ``[1, heads, T, dim]`` query/key/value of one step. It writes
K/V into the paged cache at the step's slots, then attends each query over its sequence's cached blocks (causal,
sliding window, logit soft-capping and attention sinks respected). The model runner passes the step's ``StepContext``
as the keyword argument ``paged_step`` of the model's forward; transformers hands such keyword arguments down to the
attention call.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

ATTN_NAME = "async_batching_paged"


@dataclass
class AttentionMetadata:
    """Device tensors describing one packed step (see the Triton kernel for their meaning)."""

    # int64 [T]: flat cache slot of each token's K/V; None: made by ``slot_fn`` where first needed (``slots()``), and
    # a decode launch with the fused write reads each row's slot from its block-table row instead (DECODE_SLOTS_IN_KERNEL)
    slot_mapping: Optional[torch.Tensor]
    query_start_loc: torch.Tensor  # int32 [B+1]
    seq_lens: torch.Tensor  # int32 [B]: context length after this step
    block_tables: torch.Tensor  # int32 [B, W]
    max_query_len: int
    split_counters: Optional[torch.Tensor] = None  # int32 zeros the Triton kernel's KV-split merge counts in
    order: Optional[torch.Tensor] = None  # int32 [B]: the order a decode launch visits its sequences in (see below)
    maxnreg: int = 0  # a register cap for the Triton kernel's decode launches (DECODE_MAXNREG), 0: none
    decode_warps: int = 0  # warps of the Triton kernel's decode programs at head dims <= 64 (DECODE_WARPS), 0: its 4
    decode_warps_maxnreg: int = 0  # those small programs' register cap (DECODE_WARPS_MAXNREG), 0: none
    heads_per_program: int = 0  # decode launches: Triton programs over groups of kv heads (DECODE_HEADS_PER_PROGRAM)
    pairs: bool = False  # decode launches at head dims <= 64: Triton programs over pairs of sequences (DECODE_PAIRS)
    # (seq [N], blk [N], block_q): a flat launch's query blocks (``q_block_table``; prefill graph steps), else None
    q_blocks: Optional[tuple] = None
    slot_fn: Optional[Callable[[], torch.Tensor]] = None  # makes ``slot_mapping`` where it is None (``slots()``)

    def slots(self) -> torch.Tensor:
        """The step's slot mapping, made (once) by ``slot_fn`` if the step was staged without one."""
        if self.slot_mapping is None and self.slot_fn is not None:
            self.slot_mapping = self.slot_fn()
        return self.slot_mapping


class StepContext:
    """What the attention function needs during one forward: the cache, the metadata and the kernel."""

    def __init__(self, k_cache: dict, v_cache: dict, kernel: Callable, write: Optional[Callable] = None):
        self.k_cache = k_cache
        self.v_cache = v_cache
        self.kernel = kernel
        self.write = write or index_copy_kv  # writes the step's K/V into the cache: (k, v, kc, vc, slot_mapping)
        self.meta: Optional[AttentionMetadata] = None
        self.probe: Optional[dict] = None  # when set, record layer shapes instead of attending
        # decode steps: the kernel writes the step's K/V itself (``new_kv``), no write launch (Triton kernel only)
        self.fused_write = False

STEP_KWARG = "paged_step"  # the forward keyword that carries the StepContext down to the attention function
# Decode steps' K/V written by the attention kernel itself (one launch a layer fewer), with DECODE_MAXNREG's cap. On by
# default since session 18, as one of ``ours_async_stacked``'s levers (with PREFILL_OWN_COMPILE, head-major KV blocks
# and combo kernels): W7 25,060 out tok/s against 24,572 on the H200 (session 16). Read when an engine is built.
FUSED_DECODE_WRITE = True
# Decode launches of the Triton kernel visit their sequences longest context first (``AttentionMetadata.order``, an
# argsort of the step's context lengths made once a forward, inside the decode graphs): the GPU starts programs in
# grid order, so the launch's last wave is short programs, not long ones. On the H200: session 14 (variant
# ours_async_longest_first) W7 +3.0% (medians of 3 calls, 24,523 vs 23,812), W1 inside its spread; session 15's
# sweep, with the order made outside the timed graph, W1's decode attention 1.06x and W2's and W7's 1.01-1.02x
# (attention_tuning_h200.md); with prefill graphs, W1 149,055 out tok/s (42.5% of roofline). On by default since
# session 16, with PREFILL_GRAPHS (the whole GPU suite run with both on). Read when an engine is built.
DECODE_LONGEST_FIRST = True
# A register cap (ptxas ``maxnreg``) for decode launches of the Triton kernel at head dims up to 64; 0: none, as in
# use. The fused decode write (FUSED_DECODE_WRITE) raises W1's decode kernel from 96 registers a thread to 120, so an
# SM holds 4 of its programs instead of 5; capped at 96 it compiles without spills and keeps 5
# (recipes/bench/kernel_preflight.py). At head dim 128 the decode launch is bound by shared memory (3 programs an SM
# at 73,728 B), so the kernel ignores the cap there. Measured on the H200 (session 14) with the fused write and combo
# kernels (variant ours_async_fewer_kernels_capped): W1 median 140,185 out tok/s against 142,268, no gain; 96 by
# default since session 18, with the fused write (see FUSED_DECODE_WRITE). Like the two flags above, read when an
# engine is built.
DECODE_MAXNREG = 96
# Decode steps staged without a slot mapping: the attention kernel's fused write finds each row's cache slot in its
# block-table row at position ``seq_lens - 1`` (``paged_attention``'s ``new_kv`` with slots None), and the slot mapping
# is made only where something else needs it (``AttentionMetadata.slots()``: the unfused write). A decode graph made
# it with seven small kernels before the first layer (an int64 cast of the rows, the table lookup and its cast, the
# block and offset arithmetic: about 21 us of kernels in W1's 512-row forward on the H200, session 24's probe). Off: variant
# ``ours_async_graph_slots``. Read when an engine is built.
DECODE_SLOTS_IN_KERNEL = True
# Warps of a decode program of the Triton kernel at 16-bit head dims up to 64, with 64-key tiles
# (``paged_attention(decode_warps=)``), capped at DECODE_WARPS_MAXNREG registers; 0: the kernel's 4 warps over
# 128-key tiles, capped at DECODE_MAXNREG. Short contexts (W1's 64..768 keys) are a few tiles a program, and smaller
# programs keep more of them in flight an SM. Uncapped (session 19), 2 warps ran W1's decode attention alone 1.07x
# faster (W2's 1.04x), but with the fused write they take 154 registers a thread, 6 programs an SM, and W1 measured
# equal end to end. Capped at 96 (session 22) an SM holds 10 (sm_90, no spills, recipes/bench/kernel_preflight.py):
# on the H200 W1's steady decode attention took 1.341 against 1.500 ms a profiled forward, yet end to end W1 gained
# 1.1% by medians of 3 in two calls (156,170 against 154,504; 159,815 against 158,063 out tok/s: inside the spread)
# and W2 lost 1.7% (53,389 against 54,314), and in bf16 eager steps and graph replays parted on 3 of 40 sequences
# (test_graphs_vs_eager_match_rate_bf16's bound is 2): more KV split counts are possible with 64-key tiles, so
# replays of padded rows round apart more often. Off (docs/results/bench_w1_w2_w7_h200_s22.md); variants
# ``ours_async_decode_2warps_capped`` and ``ours_async_decode_2warps`` (uncapped). Read when an engine is built.
DECODE_WARPS = 0
# The register cap of those small decode programs; 0: none (variant ``ours_async_decode_2warps``, session 19's launch).
DECODE_WARPS_MAXNREG = 96
# Decode launches of the Triton kernel that do not split their KV range run one program per sequence and group of this
# many kv heads (all of them where it does not divide the kv heads; ``paged_attention(heads_per_program=)``,
# ``_paged_decode_heads_kernel``) instead of one per (sequence, kv head); 0: off. The default launch read W1's and
# W2's K/V at 3.1-3.2 TB/s (contexts of 64..768 keys) and E1's at 4.1 (800..1,060 keys) on the H200, as if each
# program paid a fixed cost of about 300 keys (session 20's reading of session 19's sweep); a program over several
# heads pays it once, with fewer programs to fill the GPU. Same values as the per-head launch through its masked loop
# (the interpreter's tests, bit for bit; fp32 == ``generate`` in decode graphs on the H200, session 21). Off: slower on
# the H200 (session 21, W1 profiled, one call): attention 1.582 ms a steady decode forward against 1.513 over all 3
# kv heads (512 programs, fewer than the 660 the GPU holds at once), W1 150,121 against 154,081 out tok/s (medians
# of 2). Variants ``ours_async_decode_heads2`` / ``_decode_all_heads``. Read when an engine is built.
DECODE_HEADS_PER_PROGRAM = 0
# Decode launches of the Triton kernel at head dims up to 64 that do not split their KV range run one program per pair
# of sequences and kv head (``paged_attention(pairs=)``, ``_paged_decode_pairs_kernel``): 2 warps over 64-key tiles,
# capped at 128 registers, each program taking the i-th and the (B-1-i)-th sequence of the longest-first order, so
# programs carry about equal work. Small programs keep more K/V in flight an SM, but a launch of them is about one
# wave whose programs are handed out once: alone (one sequence a program), the SMs that drew long contexts end it. On
# the H200 (session 25, attention_tuning.py with the engine's launch as the base): W1's decode shape 1.09x, W2's
# 1.12x, E1's 1.06x, W1's at one context 1.09-1.13x. Values as the per-sequence launch through its masked loop, bit
# for bit (the interpreter's tests). Off: the 4-warp launch of a program per (sequence, kv head). Read when an engine
# is built.
DECODE_PAIRS = True


def decode_order(seq_lens: torch.Tensor) -> torch.Tensor:
    """The sequences of a decode step, longest context first (int32 indices into ``seq_lens``)."""
    return torch.argsort(seq_lens, descending=True, stable=True).to(torch.int32)


def q_block_table(q_lens, block_q: int, slots: int):
    """The flat launch's table (numpy int32 ``seq``, ``blk`` of length ``slots``): every query block of every
    sequence (``q_lens[i]`` queries in blocks of ``block_q``), in sequence order, then empty slots (-1, 0). Raises if
    the blocks need more than ``slots``."""
    q_lens = np.asarray(q_lens, np.int64)
    per = -(-q_lens // block_q)
    n = int(per.sum())
    if n > slots:
        raise ValueError(f"{n} query blocks do not fit a flat launch of {slots} slots")
    seq = np.full(slots, -1, np.int32)
    blk = np.zeros(slots, np.int32)
    seq[:n] = np.repeat(np.arange(len(q_lens), dtype=np.int32), per)
    starts = np.cumsum(per) - per
    blk[:n] = np.arange(n, dtype=np.int32) - np.repeat(starts, per).astype(np.int32)
    return seq, blk


LAYER_ATTR = "_async_batching_layer"  # on each attention module: its layer index, a CPU int64 tensor (compiled code)


def paged_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: returns ``(out [1, T, heads, dim], None)``.

    Uncompiled, it attends through the ``StepContext`` the forward carries. Under torch.compile it is one opaque op
    (``async_batching::paged_attention``) taking only tensors and constants, so a compiled decoder layer stays one
    graph (``compiled_layers.py``): no graph break, whose guards and resumed frames each layer would otherwise pay on
    every compiled call. The op finds the step's context where the model runner put it (``activate``)."""
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    window = int(kwargs.get("sliding_window") or 0)
    softcap = float(kwargs.get("softcap") or 0.0)
    # gpt-oss's attention sinks: one learnt logit per query head (``s_aux``), see ``dense_attention``.
    sinks = kwargs.get("s_aux")
    if torch.compiler.is_compiling():
        # The layer's index as a CPU tensor (``LAYER_ATTR``, set by the probe): an int attribute, even one only
        # read here, would be a constant the compiled code guards on, so each layer would compile its own copy.
        index = getattr(module, LAYER_ATTR, None)
        if index is None:
            raise RuntimeError(f"attention '{ATTN_NAME}' compiled for a module the engine did not probe "
                               f"({type(module).__name__})")
        return torch.ops.async_batching.paged_attention(query, key, value, index, scale, window, softcap,
                                                        sinks).unsqueeze(0), None
    layer = getattr(module, "layer_idx", None)
    ctx = kwargs.get(STEP_KWARG)
    if ctx is None:
        raise RuntimeError(f"attention '{ATTN_NAME}' called without a ContinuousBatcher step (the model did not pass "
                           f"its keyword arguments down to the attention function)")
    if ctx.probe is not None:
        ctx.probe[layer] = (key.shape[1], key.shape[3], value.shape[3])
        if layer is not None:
            module.__dict__[LAYER_ATTR] = torch.tensor(layer, dtype=torch.int64)  # plain attribute, on the CPU
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[3]), None
    return _attend(ctx, query, key, value, layer, scale, window, softcap, sinks).unsqueeze(0), None


def _attend(ctx: StepContext, query, key, value, layer: int, scale: float, window: int, softcap: float,
            sinks: Optional[torch.Tensor]) -> torch.Tensor:
    """Write the step's K/V of ``layer`` into the cache, then attend: ``[T, heads, dim]`` from ``[1, heads, T, dim]``."""
    q = query[0].transpose(0, 1)  # [T, H, D]
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    kc, vc = ctx.k_cache[layer], ctx.v_cache[layer]
    meta = ctx.meta
    if (ctx.fused_write and meta.max_query_len == 1 and meta.q_blocks is None and k.stride(-1) == 1
            and v.stride(-1) == 1):
        # slot_mapping None (a decode step staged without one): the kernel reads each row's slot from its table row
        return ctx.kernel(q, kc, vc, meta, scale, window, softcap, sinks, new_kv=(k, v, meta.slot_mapping))
    ctx.write(k, v, kc, vc, meta.slots())
    return ctx.kernel(q, kc, vc, meta, scale, window, softcap, sinks)


# The step context the compiled op attends with: set by the model runner before each forward, per thread (an
# engine may run its loop in a thread of its own).
_active = threading.local()


def activate(ctx: Optional[StepContext]) -> None:
    """The ``StepContext`` the compiled attention op uses in this thread from now on (None: none)."""
    _active.ctx = ctx


@torch.library.custom_op("async_batching::paged_attention", mutates_args=())
def _paged_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: torch.Tensor,
                        scale: float, window: int, softcap: float, sinks: Optional[torch.Tensor]) -> torch.Tensor:
    # The KV cache it writes is not an argument: the compiler never sees it, so nothing it does can be reordered
    # around it. Each layer's op takes the previous layer's output, which orders the ops among themselves.
    ctx = getattr(_active, "ctx", None)
    if ctx is None:
        raise RuntimeError(f"attention '{ATTN_NAME}' (compiled) called outside a ContinuousBatcher step: no step "
                           f"context is active in this thread")
    return _attend(ctx, query, key, value, int(layer), scale, window, softcap, sinks)


@_paged_attention_op.register_fake
def _(query, key, value, layer, scale, window, softcap, sinks):
    return query.new_empty(query.shape[2], query.shape[1], value.shape[3])


def dense_attention(q, k, v, qpos, kpos, klen, scale: float, window: int, softcap: float,
                    sinks: Optional[torch.Tensor] = None):
    """Dense attention of ``q [n, Q, H, D]`` over ``k, v [n, L, H, D]``; positions decide the mask.

    ``sinks [H]``: a logit per head that joins the softmax denominator without a value (gpt-oss), so the weights of
    the real keys sum to less than one."""
    allowed = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < klen[:, None, None])
    if window > 0:
        allowed &= kpos[None, None, :] > qpos[:, :, None] - window
    scores = torch.einsum("nqhd,nkhd->nhqk", q.float(), k.float()) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        sink = sinks.float()[None, :, None, None].expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.einsum("nhqk,nkhd->nqhd", probs, v.float())


def index_copy_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """The step's keys and values ``[T, kv_heads, dim]`` into their cache slots (any device; a head-major cache,
    ``kv_cache.KV_LAYOUT``, through its (block, slot) pairs)."""
    for new, cache in ((k, k_cache), (v, v_cache)):
        if cache.is_contiguous():
            cache.view(-1, cache.shape[-2], cache.shape[-1]).index_copy_(0, slot_mapping, new.to(cache.dtype))
        else:
            cache[slot_mapping // cache.shape[1], slot_mapping % cache.shape[1]] = new.to(cache.dtype)


def triton_write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """GPU path of ``index_copy_kv``: one Triton kernel for both caches (``triton_paged_attention.write_kv``)."""
    from .triton_paged_attention import write_kv

    if (k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride()
            or k_cache.shape != v_cache.shape):
        return index_copy_kv(k, v, k_cache, v_cache, slot_mapping)
    write_kv(k, v, k_cache, v_cache, slot_mapping)


def triton_paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int, softcap: float,
                           sinks: Optional[torch.Tensor] = None, new_kv=None):
    """GPU path: the Triton kernel (imported on first use: Triton is optional). ``new_kv``: see ``paged_attention``."""
    from .triton_paged_attention import paged_attention

    return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                           meta.max_query_len, scale, window, softcap, sinks=sinks,
                           split_counters=meta.split_counters, new_kv=new_kv, order=meta.order,
                           maxnreg=meta.maxnreg, q_blocks=meta.q_blocks, decode_warps=meta.decode_warps,
                           decode_warps_maxnreg=meta.decode_warps_maxnreg,
                           heads_per_program=meta.heads_per_program, pairs=meta.pairs)


def torch_paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int, softcap: float,
                          sinks: Optional[torch.Tensor] = None):
    """CPU/reference path. Decode rows attend together; each prefill chunk attends on its own, so memory stays
    bounded by one chunk times its context (padding every sequence to the longest does not fit mixed steps)."""
    T, H, _ = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    out = q.new_empty(T, H, v_cache.shape[-1])
    starts = meta.query_start_loc.tolist()
    lens = meta.seq_lens.tolist()

    def kv(rows: torch.Tensor, length: int):
        nb = -(-length // bs)
        tables = meta.block_tables[rows, :nb].long()
        k = k_cache[tables].reshape(len(rows), nb * bs, kvh, -1)
        v = v_cache[tables].reshape(len(rows), nb * bs, kvh, -1)
        if kvh != H:
            k, v = k.repeat_interleave(H // kvh, dim=2), v.repeat_interleave(H // kvh, dim=2)
        return k, v, torch.arange(nb * bs, device=q.device)

    decode = [i for i in range(len(lens)) if starts[i + 1] - starts[i] == 1]
    if decode:
        seqs = torch.tensor(decode, device=q.device)
        k, v, kpos = kv(seqs, max(lens[i] for i in decode))
        klen = meta.seq_lens.long()[seqs]
        rows = meta.query_start_loc.long()[seqs]
        out[rows] = dense_attention(q[rows][:, None], k, v, (klen - 1)[:, None], kpos, klen, scale, window, softcap,
                                   sinks)[:, 0].to(q.dtype)
    for i in range(len(lens)):
        a, b = starts[i], starts[i + 1]
        if b - a <= 1:
            continue
        k, v, kpos = kv(torch.tensor([i], device=q.device), lens[i])
        klen = meta.seq_lens.long()[i:i + 1]
        qpos = torch.arange(lens[i] - (b - a), lens[i], device=q.device)[None]
        out[a:b] = dense_attention(q[None, a:b], k, v, qpos, kpos, klen, scale, window, softcap, sinks)[0].to(q.dtype)
    return out


# What the model calls (compiled: see ``paged_attention_forward``).
_REGISTERED = paged_attention_forward


def register() -> None:
    """Register our attention under ATTN_NAME (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _REGISTERED)
