"""Packs one step into a flat int32 buffer, runs the Hugging Face model on the packed ``[1, T]`` batch, keeps only the
logits it needs (each sampling request's last position, and the scored positions of scoring requests), and replays
CUDA graphs for decode steps."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import traceback
import weakref
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import numpy as np
import torch

from . import attention, fused_projections, gc_freeze
from .attention import AttentionMetadata, StepContext, q_block_table
from .compiled_layers import CompiledLayers, size_oblivious
from .kv_cache import HIT_TABLE_ENTRIES, SCRATCH_ROW, LayerSpec, PagedKVCache, block_table_rows
from .sampling import SAMPLING_INTS_PER_ROW, SamplingInputs, SamplingPlan, SamplingState, sampling_inputs, stage_sampling
from .scheduler import StepPlan

log = logging.getLogger(__name__)

# The head of every step's buffer, in this order. A decode step padded to a graph bucket of B rows has a head of
# fixed size (7 segments of B or B+1 ints), so graph replay copies ``buf[:head]`` into the graph's static input.
HEAD = ("input_ids", "positions", "token_rows", "query_start_loc", "seq_lens", "seq_rows", "logits_idx")
LOGITS_BYTES = 256 << 20  # float32 logits of one step's scored rows stay under this (scoring in bounded chunks)


@dataclass
class StepLayout:
    """Where each segment of a step sits in the flat int32 buffer, plus the host-known sizes."""

    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)
    size: int = 0
    num_tokens: int = 0  # T (padded for graphs)
    num_seqs: int = 0  # B (padded for graphs)
    num_samples: int = 0  # sampling rows of logits (the first rows)
    num_score_rows: int = 0  # scoring rows of logits (after the sampling rows)
    max_query_len: int = 1
    graph_batch: int = 0  # >0: replay the decode graph of this batch size
    prefill_graph: int = 0  # >0: replay the prefill graph of this token bucket (PREFILL_GRAPHS)
    sampling: SamplingPlan = field(default_factory=SamplingPlan)
    logprobs_k: int = -1  # -1: no logprobs
    checked: bool = False  # tensor parallel: the step's CRC travels (``plan_crc``); a flag follows the tokens out
    sample_rows: list = field(default_factory=list)  # request of each sampled row, in order
    window: int = 1  # forwards of a decode window (``advance`` between them); 1: one step

    def add(self, name: str, arr: np.ndarray) -> None:
        self.offsets[name] = (self.size, len(arr))
        self.size += len(arr)


def _longest_first(seq_lens: np.ndarray) -> np.ndarray:
    """``attention.decode_order`` on the host: indices of ``seq_lens`` longest first, ties in their order (int32)."""
    return np.argsort(-seq_lens.astype(np.int64), kind="stable").astype(np.int32)


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a captured decode graph: powers of two to 32, then steps of 32."""
    out = [b for b in (1, 2, 4, 8, 16) if b < max_batch]
    out += list(range(32, max_batch, 32))
    return out + [max_batch]


class PrefillGraph(NamedTuple):
    """One captured prefill graph: replayed after its head (``head`` ints, the flat launch's table included) is copied
    into ``static_in``; it holds up to ``seqs`` sequences and a table of ``slots`` query blocks."""

    graph: "torch.cuda.CUDAGraph"
    static_in: torch.Tensor
    static_logits: torch.Tensor
    head: int
    seqs: int
    slots: int


def prefill_graph_buckets(max_batch_tokens: int, max_num_seqs: int, max_model_len: int) -> list[int]:
    """Token counts that get a captured prefill graph (``PREFILL_GRAPHS``), largest first: the step budget, then up
    to ``PREFILL_GRAPH_BUCKETS - 1`` more, the k-th about the budget / sqrt(2)^k (multiples of ``PREFILL_GRAPH_ROUND``,
    at least ``PREFILL_GRAPH_MIN_TOKENS``), so a step padded to the next bucket up does at most ~41% more work than it
    needs. The budget is capped at what ``max_num_seqs`` sequences of ``max_model_len`` tokens can fill."""
    top = min(max_batch_tokens, max_num_seqs * max_model_len)
    out = [top]
    for k in range(1, PREFILL_GRAPH_BUCKETS):
        nxt = int(top / 2 ** (k / 2)) // PREFILL_GRAPH_ROUND * PREFILL_GRAPH_ROUND
        if nxt < PREFILL_GRAPH_MIN_TOKENS or nxt >= out[-1]:
            break
        out.append(nxt)
    return out


class ModelRunner:
    """Owns the model, the KV cache tensors, the device block table and the decode CUDA graphs."""

    def __init__(self, model, config, device: torch.device, dtype: torch.dtype, tp=None):
        self.model = model
        self.tp = tp  # TensorParallelGroup, or None
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = config.block_size
        attention.register()
        self.max_model_len = self._max_model_len()
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        fuse = device.type == "cuda" if config.fuse_projections is None else bool(config.fuse_projections)
        self._unfuse = self.fused = None
        if fuse:  # before the layer probe: its eager forward shows which groups read their owner's input
            self.fused = fused_projections.acquire(model)
            self._unfuse = weakref.finalize(self, fused_projections.release, model)
        try:
            self.layers = self._probe_layers()
            self.num_fused = self.fused.verify() if fuse else 0
        except BaseException:
            if self._unfuse is not None:
                self._unfuse()
            raise
        self.vocab_size = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else model.config.vocab_size
        # Scored positions of one step, bounded so their float32 logits (and log-softmax) stay small.
        self.max_logit_rows = max(config.max_num_seqs, min(config.max_batch_tokens, LOGITS_BYTES // (4 * self.vocab_size)))
        self.num_blocks = config.num_blocks or self._auto_num_blocks()
        if tp is not None:  # the ranks of a group plan alike only with allocators of one size: the smallest
            self.num_blocks = tp.min_int(self.num_blocks)
        try:
            self.cache = PagedKVCache(self.layers, self.num_blocks, self.block_size, dtype, device, config.prefix_caching)
        except torch.OutOfMemoryError as e:
            per_block = PagedKVCache.bytes_per_block(self.layers, self.block_size, dtype)
            raise MemoryError(
                f"the KV cache of {self.num_blocks} blocks ({self.num_blocks * per_block / 2**30:.2f} GiB) does not fit "
                f"on {device}: lower batcher.num_blocks (or set it to null to size it from memory_fraction), or "
                "batcher.memory_fraction"
            ) from e
        # Persistent device block table: one row per admitted request, updated incrementally (new blocks only).
        self.block_table = torch.zeros(block_table_rows(config.max_num_seqs), self.max_blocks_per_seq,
                                       dtype=torch.int32, device=device)
        # Repetition penalties: the token ids each table row's request has seen.
        self.sampling_state = SamplingState(len(self.block_table), self.vocab_size)
        self.kernel = self._choose_kernel()
        self.ctx = StepContext(self.cache.k, self.cache.v, self.kernel,
                               attention.triton_write_kv if self.backend == "triton" else attention.index_copy_kv)
        self.ctx.fused_write = self.backend == "triton" and attention.FUSED_DECODE_WRITE
        # decode launches of the Triton kernel: longest context first, a register cap (read once, like fused_write)
        self.longest_first = self.backend == "triton" and attention.DECODE_LONGEST_FIRST
        self.host_order = HOST_DECODE_ORDER
        self.decode_maxnreg = attention.DECODE_MAXNREG if self.backend == "triton" else 0
        self.decode_warps = attention.DECODE_WARPS if self.backend == "triton" else 0
        self.decode_warps_maxnreg = attention.DECODE_WARPS_MAXNREG if self.decode_warps else 0
        self.decode_heads = attention.DECODE_HEADS_PER_PROGRAM if self.backend == "triton" else 0
        self.decode_pairs = self.backend == "triton" and attention.DECODE_PAIRS
        # decode steps' slot mapping left to the fused write, made only where something else needs it
        self.slots_in_kernel = self.ctx.fused_write and attention.DECODE_SLOTS_IN_KERNEL
        # The attention kernel's KV-split merge counters: this runner's launches are ordered on one stream and each
        # leaves them at zero, so one buffer serves every step and every captured graph.
        self.split_counters = None
        if self.backend == "triton":
            from .triton_paged_attention import split_counters
            self.split_counters = split_counters(device)
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.graphs: dict[int, tuple] = {}  # decode batch size -> (graph, static input, static logits, head size)
        self.graph_pool = None
        self.prefill_graphs: dict[int, PrefillGraph] = {}  # PREFILL_GRAPHS: token bucket -> its graph, smallest first
        # the scheduler's cap on generation steps (graph_step_tokens; set by the engine before ``start``): no prefill
        # graph is captured past it, and ``start`` drops it where no prefill graph was captured
        self.graph_step_tokens: Optional[int] = None
        self._flat_block_q = 0  # queries per block of the prefill graphs' flat attention launches
        self.compute_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # DECODE_SPLIT_MIN_ROWS: the second half of a split decode graph runs on this stream, with its own counters
        self.side_stream = torch.cuda.Stream(device) if device.type == "cuda" and DECODE_SPLIT_MIN_ROWS else None
        self.side_counters = (torch.zeros_like(self.split_counters)
                              if self.side_stream is not None and self.split_counters is not None else None)
        self.want_graphs = device.type == "cuda" and config.cuda_graphs is not False and self.backend == "triton"
        if config.cuda_graphs and not self.want_graphs:
            why = (f"the model is on {device}" if device.type != "cuda"
                   else "attention_backend 'triton' (Triton not available?)")
            raise ValueError(f"BatcherConfig.cuda_graphs=True needs a CUDA device and the Triton kernel: {why}; "
                             "use cuda_graphs=null (auto) or false")
        # With ``compile``, decode steps (one query per sequence) call the model with its layers compiled once for all
        # batch sizes (``CompiledLayers``: dynamic shapes; compiled in ``warmup`` and graph capture, before any request
        # runs), and the decode graphs capture that code: fused kernels, no host cost at replay. Prefill and mixed
        # steps run outside the graphs, so the compiled code's host cost (a guard check and a call per layer) is paid
        # on every call; it is below an uncompiled forward's (measured: see ``PREFILL_COMPILE_MIN_WORK``), so they
        # call the compiled model too, from ``prefill_compile_min_tokens`` tokens (``PREFILL_COMPILE_MIN_WORK`` / the
        # model's parameters: 1 by default). Auto (None): on with decode graphs, where replay hides the compiled code's host
        # cost; uncompiled decode steps on the CPU are host-bound, and compiling would only add start-up time.
        self.compile = self.want_graphs if config.compile is None else bool(config.compile)
        self._compiled = CompiledLayers(model, dynamic=True) if self.compile else None
        # Token ids and kept rows reach the model as int32 views of the step's buffer (in a decode graph every cast is
        # a kernel), except into a model compiled whole, whose graph guards on them as it saw them at warm-up: fresh
        # int64 tensors (a view of the buffer carries another dispatch key set, and would compile again).
        self._fresh_inputs = self._compiled is not None and self._compiled.whole
        self._params = _param_count(model)
        self.prefill_compile_min_tokens = max(1, int(min(PREFILL_COMPILE_MIN_WORK / self._params, 2 ** 62)))
        # Off for good if a prefill step would compile during a run; never on where no step reaches the threshold
        # (nothing to compile at start-up then).
        self._compiled_prefill = self.compile and self.prefill_compile_min_tokens <= config.max_batch_tokens
        # PREFILL_OWN_COMPILE: prefill steps through graphs of their own, compiled first on a full-budget step, so
        # inductor sizes their kernels' launches for prefill shapes (see CompiledLayers' own_frame); else they share
        # the decode steps' graphs, whose kernels were sized for DECODE_TUNE_ROWS rows. Under a cache key of their own
        # (PREFILL_CACHE_TAG): a layer's graph is the same for both, and inductor's FX-graph cache, which does not key
        # on size hints, returned the decode graph's compiled code (and its kernels) for it (found on the CPU, session
        # 13).
        self._compiled_pf = (CompiledLayers(model, own_frame=True, dynamic=True, options=PREFILL_OWN_OPTIONS)
                             if self._compiled_prefill and PREFILL_OWN_COMPILE else None)
        # Decode windows (BatcherConfig.decode_window): auto where decode steps replay graphs, whose host cost is
        # the engine's own; one step at a time under tensor parallelism (each step's tokens are agreed by the group).
        window = config.decode_window if config.decode_window is not None else (
            DECODE_WINDOW if self.want_graphs else 1)
        self.decode_window = 1 if tp is not None else window
        # Prefill and mixed steps replayed from CUDA graphs of a few token buckets (read once, like the flags of
        # attention.py); not under tensor parallelism, whose steps agree on their tokens outside the forward.
        # Nor for mixture-of-experts models (their decode graphs pick an experts implementation that makes no host
        # sync; prefill graphs do not, yet).
        possible = self.want_graphs and tp is None and _experts_candidates(model) == [None]
        if config.prefill_graphs and not possible:
            why = ("decode steps do not run in CUDA graphs here (cuda_graphs, a CUDA device and the Triton kernel)"
                   if not self.want_graphs else "tensor parallelism" if tp is not None else
                   "a mixture-of-experts model")
            raise ValueError(f"BatcherConfig.prefill_graphs=True is not supported with {why}; use prefill_graphs=null "
                             "(auto) or false")
        self.want_prefill_graphs = possible and (PREFILL_GRAPHS if config.prefill_graphs is None
                                                 else config.prefill_graphs)
        if self.want_prefill_graphs:
            from .triton_paged_attention import flat_block_q

            heads = {(spec.num_kv_heads, spec.head_dim) for spec in self.layers.values()}
            cfg = model.config
            q_heads = getattr(cfg, "num_attention_heads", None)
            if len(heads) != 1 or not q_heads:  # layers of several shapes: one table cannot serve every layer
                self.want_prefill_graphs = False
                log.warning("%s: prefill CUDA graphs off: its attention layers are not all of one shape (kv heads, "
                            "head dim: %s; query heads: %s)", type(model).__name__, sorted(heads), q_heads)
            else:
                (kv_heads, head_dim), = heads
                self._flat_block_q = flat_block_q(q_heads, kv_heads, head_dim, dtype)
        self._running = False

    def start(self) -> None:
        """Compile and tune at start-up (kernel variants, ``compile``), then capture the decode graphs (and the prefill
        graphs)."""
        if self.device.type == "cuda" or self.compile:
            self.warmup()
        if self.want_graphs:
            self.capture_graphs(min(self.config.max_num_seqs, self.config.cuda_graph_max_batch), self.compute_stream)
        if self.want_prefill_graphs and self.graphs:
            self.capture_prefill_graphs(self.compute_stream)
        if not self.prefill_graphs:  # none captured after all: every step is launched from the host, uncapped
            self.graph_step_tokens = None
        self._running = True  # from here on, compiled code that would compile again is not called (``_forward``)

    def staging_ints(self) -> int:
        """Int32 words the largest step stages, so every slot can hold it. With T tokens (at most the token budget or
        the largest graph bucket), B sequences and R logits rows (sampling rows plus scored rows, at most T):
        head 3T + (B+1) + 2B + R; scored targets R; carry-over 2B; table updates 3 x (new blocks <= T/bs + B, plus
        prefix hits <= HIT_TABLE_ENTRIES); sampling: what ``stage_sampling`` stages per row; tensor parallel: one CRC
        word (within the spare 64); a prefill graph's step: its flat attention launch's table, two words a slot. A
        decode window of W steps adds up to 1 + W / bs blocks per sequence and two noise words per row for each draw
        after the first; a decode step its launches' longest-first order, B words."""
        T = max(self.config.max_batch_tokens, max(self.graphs, default=0))
        B = self.config.max_num_seqs + 1
        slots = max((g.slots for g in self.prefill_graphs.values()), default=0)  # captured at start-up, before this
        R = T + B
        W = self.decode_window
        table = T // self.block_size + B + HIT_TABLE_ENTRIES + B * (1 + W // self.block_size)
        return (3 * T + 6 * B + 2 * R + 2 * B + 3 * table + SAMPLING_INTS_PER_ROW * B + 2 * (W - 1) * B + 2 * slots
                + 64)

    def release(self) -> None:
        """Drop the graphs and the KV cache (the batcher is closed); the last engine on the model unfuses it."""
        self.graphs.clear()
        self.prefill_graphs.clear()
        self.graph_pool = None
        self.cache.release()
        if self._unfuse is not None:
            self._unfuse()
        if self.device.type == "cuda" and hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
            # cuBLAS keeps a workspace per (handle, stream), allocated through torch's allocator and never freed on
            # its own: the compute stream's would outlive the engine (64 MiB left allocated after an evaluation, H200).
            # Cleared workspaces are allocated again at the next matmul of whichever stream needs one.
            torch.cuda.synchronize(self.device)
            torch._C._cuda_clearCublasWorkspaces()

    # --- set-up ---------------------------------------------------------------------------------------------
    def _max_model_len(self) -> int:
        cfg = self.model.config
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1 << 20
        if self.config.max_model_len:
            limit = min(limit, self.config.max_model_len)
        return int(limit)

    @contextlib.contextmanager
    def installed(self):
        """Route the model's attention through our function for the duration of a forward, then restore it."""
        cfg = self.model.config
        previous = cfg._attn_implementation
        cfg._attn_implementation = attention.ATTN_NAME
        try:
            yield
        finally:
            cfg._attn_implementation = previous

    @torch.no_grad()
    def _probe_layers(self) -> dict[int, LayerSpec]:
        ctx = StepContext({}, {}, None)
        ctx.probe = {}
        with self.installed():
            ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
            self.model(input_ids=ids, position_ids=torch.arange(2, device=self.device)[None], use_cache=False,
                       **{attention.STEP_KWARG: ctx})
        if not ctx.probe:
            raise ValueError(
                f"{type(self.model).__name__} does not call transformers' attention interface; "
                "the continuous batcher needs a model whose attention goes through AttentionInterface"
            )
        if None in ctx.probe:
            raise ValueError(f"{type(self.model).__name__}'s attention modules have no layer_idx")
        return {i: LayerSpec(*shape) for i, shape in ctx.probe.items()}

    def _auto_num_blocks(self) -> int:
        per_block = PagedKVCache.bytes_per_block(self.layers, self.block_size, self.dtype)
        if self.device.type == "cuda":
            # memory a previous engine held but no longer uses counts as free, even one dropped without close() and
            # kept by a reference cycle that gc_freeze froze
            gc_freeze.collect_all()
            torch.cuda.empty_cache()
            free, _total = torch.cuda.mem_get_info(self.device)
            hidden = getattr(self.model.config, "hidden_size", 4096)
            # Activations of the largest step and the logits of the largest batch stay outside the cache.
            reserve = 24 * self.config.max_batch_tokens * hidden * 4 + 4 * self.max_logit_rows * self.vocab_size * 4
            budget = free * self.config.memory_fraction - reserve - (1 << 30)
        else:
            budget = min(512 << 20, self.config.max_num_seqs * self.max_model_len * per_block // self.block_size)
        n = int(budget // per_block)
        if n < 2:
            raise MemoryError(
                f"no room for the KV cache: {budget / 2**20:.0f} MiB left after the model and activations, "
                f"{per_block / 2**20:.2f} MiB per block; lower batcher.max_batch_tokens or max_num_seqs, raise "
                "memory_fraction, or set num_blocks"
            )
        return n

    def _choose_kernel(self):
        backend = self.config.attention_backend
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" and _triton_ok() else "torch"
        if backend == "triton":
            if self.device.type != "cuda":
                raise ValueError("BatcherConfig.attention_backend='triton' needs a CUDA device; use 'torch' or 'auto'")
            self.backend = "triton"
            return attention.triton_paged_attention
        self.backend = "torch"
        return attention.torch_paged_attention

    # --- packing --------------------------------------------------------------------------------------------
    def prepare(self, plan: StepPlan, slot) -> StepLayout:
        """Write the step's inputs into the slot's pinned int32 buffer; vectorised except one pass over the seqs."""
        seqs = plan.seqs
        B = len(seqs)
        starts_l: list[int] = []
        q_lens_l: list[int] = []
        rows_l: list[int] = []
        logits_l: list[int] = []  # the last token of each sampling sequence
        ids: list[int] = []
        carry_dst: list[int] = []
        carry_src: list[int] = []
        upd_r: list[int] = []
        upd_c: list[int] = []
        upd_v: list[int] = []
        score_idx: list[int] = []
        score_targets: list[int] = []
        lay = StepLayout(window=plan.window)
        sample_rows = lay.sample_rows
        t = 0
        # One pass over the sequences, into Python lists (a numpy element write costs more than a list append); the
        # hot path of a decode step: one token each, carried over on the GPU.
        for s in seqs:
            req = s.req
            n = s.num_tokens
            start = s.start
            row = req.row
            starts_l.append(start)
            q_lens_l.append(n)
            rows_l.append(row)
            end = start + n
            p = len(req.prompt_ids)
            known = p + len(req.output_ids)
            if start < known:
                stop = end if end < known else known
                if stop <= p:
                    ids.extend(req.prompt_ids[start:stop])
                elif start >= p:
                    ids.extend(req.output_ids[start - p:stop - p])
                else:
                    ids.extend(req.prompt_ids[start:])
                    ids.extend(req.output_ids[:stop - p])
            t += n
            if end > known:  # the last input is the token the step in flight is sampling: carried over on the GPU
                carry_dst.append(t - 1)
                carry_src.append(req.carry_row)
                ids.append(0)
            new_blocks = s.new_blocks
            if new_blocks:
                k = len(new_blocks)
                base = len(req.block_ids) - k
                upd_r.extend([row] * k)
                upd_c.extend(range(base, base + k))
                upd_v.extend(new_blocks)
            if s.samples:
                logits_l.append(t - 1)
                sample_rows.append(req)
            elif s.score_rows:
                first = t - n + s.score_from - start
                score_idx.extend(range(first, first + s.score_rows))
                score_targets.extend(req.prompt_ids[s.score_from + 1:s.score_from + 1 + s.score_rows])
        T = t
        starts = np.array(starts_l, np.int32)
        q_lens = np.array(q_lens_l, np.int32)
        rows = np.array(rows_l, np.int32)
        qsl = np.zeros(B + 1, np.int32)
        np.cumsum(q_lens, out=qsl[1:])
        seq_lens = starts + q_lens
        positions = np.arange(T, dtype=np.int32) + np.repeat(starts - qsl[:-1], q_lens)
        token_rows = np.repeat(rows, q_lens)
        logits_idx = np.array(logits_l, np.int32)
        input_ids = np.array(ids, dtype=np.int32)
        lay.num_samples = len(logits_idx)
        lay.num_score_rows = len(score_idx)
        if score_idx:
            logits_idx = np.concatenate([logits_idx, np.asarray(score_idx, np.int32)])
        lay.max_query_len = int(q_lens.max())
        table = None
        pg = (self._prefill_bucket(T, B) if self.prefill_graphs and not plan.is_decode_only and not score_idx
              else None)
        if pg is not None:  # padded to the bucket's graph: tokens on the scratch row, empty sequences, kept row 0
            tb, bb, slots = pg
            table = q_block_table(q_lens, self._flat_block_q, slots)
            pad_t, pad_b = tb - T, bb - B
            input_ids = np.concatenate([input_ids, np.zeros(pad_t, np.int32)])
            positions = np.concatenate([positions, np.zeros(pad_t, np.int32)])
            token_rows = np.concatenate([token_rows, np.full(pad_t, SCRATCH_ROW, np.int32)])
            qsl = np.concatenate([qsl, np.full(pad_b, T, np.int32)])
            seq_lens = np.concatenate([seq_lens, np.zeros(pad_b, np.int32)])
            rows = np.concatenate([rows, np.full(pad_b, SCRATCH_ROW, np.int32)])
            logits_idx = np.concatenate([logits_idx, np.zeros(bb - len(logits_idx), np.int32)])
            B, T = bb, tb
            lay.prefill_graph = tb
            # the prefill path of the forward (compiled prefill code, no fused decode write), even for one-token rows
            lay.max_query_len = max(lay.max_query_len, 2)
        gb = self._graph_batch(B) if self.graphs and plan.is_decode_only else 0
        if gb:
            pad = gb - B
            input_ids = np.concatenate([input_ids, np.zeros(pad, np.int32)])
            positions = np.concatenate([positions, np.zeros(pad, np.int32)])
            token_rows = np.concatenate([token_rows, np.full(pad, SCRATCH_ROW, np.int32)])
            qsl = np.arange(gb + 1, dtype=np.int32)
            seq_lens = np.concatenate([seq_lens, np.ones(pad, np.int32)])
            rows = np.concatenate([rows, np.full(pad, SCRATCH_ROW, np.int32)])
            logits_idx = np.arange(gb, dtype=np.int32)
            B = T = gb
        lay.graph_batch = gb
        lay.num_tokens, lay.num_seqs = T, B
        parts = [input_ids, positions, token_rows, qsl, seq_lens, rows, logits_idx]
        for name, arr in zip(HEAD, parts):
            lay.add(name, arr)
        if lay.max_query_len == 1 and self.longest_first and self.host_order:  # in a decode graph's head, as the table
            order = _longest_first(seq_lens)
            parts.append(order)
            lay.add("order", order)
        if table is not None:  # inside the graph's head: copied into its static input with the rest
            for name, arr in zip(("qb_seq", "qb_blk"), table):
                parts.append(arr)
                lay.add(name, arr)
        for name, arr in (("carry_dst", carry_dst), ("carry_src", carry_src), ("upd_rows", upd_r), ("upd_cols", upd_c),
                          ("upd_vals", upd_v), ("score_targets", score_targets)):
            arr = np.asarray(arr, dtype=np.int32)
            parts.append(arr)
            lay.add(name, arr)
        self._prepare_sampling(lay, parts)
        total = np.concatenate(parts)
        if self.tp is not None:  # what this rank staged, so the group can check that every rank staged the same
            crc = np.array([zlib.crc32(total)], np.uint32).view(np.int32)
            lay.add("plan_crc", crc)
            lay.checked = True
            total = np.concatenate([total, crc])
        if len(total) > len(slot.host_in_np):  # slots hold ``staging_ints()``, the largest possible step
            raise RuntimeError(f"a step needs {len(total)} staging ints, the slots hold {len(slot.host_in_np)}")
        slot.host_in_np[: len(total)] = total
        return lay

    def _prefill_slots(self, tokens: int) -> int:
        """Query-block slots of a prefill graph of ``tokens`` tokens: its blocks, plus one ragged block a sequence."""
        return -(-tokens // self._flat_block_q) + min(self.config.max_num_seqs, tokens)

    def _prefill_bucket(self, T: int, B: int) -> Optional[tuple[int, int, int]]:
        """(tokens, sequences, table slots) of the smallest prefill graph a step of ``T`` tokens and ``B`` sequences
        fits, if padding it there at most doubles its tokens and adds at most ``PREFILL_GRAPH_MAX_PAD_WORK`` tokens x
        parameters; None: the step runs outside the graphs."""
        for tb, g in self.prefill_graphs.items():  # smallest first
            if T <= tb and B <= g.seqs:
                ok = 2 * T >= tb and (tb - T) * self._params <= PREFILL_GRAPH_MAX_PAD_WORK
                return (tb, g.seqs, g.slots) if ok else None
        return None

    def _graph_batch(self, B: int) -> int:
        for b in self.graphs:
            if b >= B:
                return b
        return 0

    def _prepare_sampling(self, lay: StepLayout, parts: list) -> None:
        reqs = lay.sample_rows
        lay.logprobs_k = max((r.sampling.logprobs for r in reqs if r.sampling.logprobs is not None), default=-1)
        lay.sampling, arrays = stage_sampling(reqs, self.sampling_state, lay.window)
        for name, arr in arrays:
            parts.append(arr)
            lay.add(name, arr)

    # --- running --------------------------------------------------------------------------------------------
    def _seg(self, buf: torch.Tensor, lay: StepLayout, name: str) -> torch.Tensor:
        off, n = lay.offsets[name]
        return buf[off:off + n]

    def apply_updates(self, buf: torch.Tensor, lay: StepLayout, prev_tokens: Optional[torch.Tensor]) -> None:
        """Carry-over gather and block-table updates, on the compute stream, before the forward."""
        seg = lambda n: self._seg(buf, lay, n)  # noqa: E731
        if lay.offsets["carry_dst"][1]:
            ids = seg("input_ids")
            ids.index_copy_(0, seg("carry_dst").long(), prev_tokens.index_select(0, seg("carry_src").long()))
        if lay.offsets["upd_rows"][1]:
            self.block_table[seg("upd_rows").long(), seg("upd_cols").long()] = seg("upd_vals")

    def _metadata(self, buf: torch.Tensor, lay: StepLayout, lo: int = 0, hi: Optional[int] = None,
                  counters: Optional[torch.Tensor] = None, pos: Optional[torch.Tensor] = None) -> AttentionMetadata:
        """The step's attention metadata; with ``lo``/``hi``, that of decode rows ``lo:hi`` alone (one token a row).
        ``pos``: the rows' positions as int64, where the caller has them. Indices stay int32 where torch takes them
        (advanced indexing, ``index_select``): in a decode graph every cast is a kernel."""
        seg = lambda n: self._seg(buf, lay, n)[lo:hi]  # noqa: E731
        pos = seg("positions").long() if pos is None else pos

        def slots() -> torch.Tensor:
            blk = self.block_table[seg("token_rows"), pos // self.block_size].long()
            return blk * self.block_size + pos % self.block_size

        qsl = self._seg(buf, lay, "query_start_loc")[lo:None if hi is None else hi + 1]
        seq_lens = seg("seq_lens")
        decode = lay.max_query_len == 1
        lazy = decode and self.slots_in_kernel  # (a prefill graph's flat launch is never a decode step)
        return AttentionMetadata(
            slot_mapping=None if lazy else slots(),
            slot_fn=slots if lazy else None,
            query_start_loc=qsl - lo if lo else qsl,
            seq_lens=seq_lens,
            block_tables=self.block_table.index_select(0, seg("seq_rows")),
            max_query_len=lay.max_query_len,
            split_counters=self.split_counters if counters is None else counters,
            order=self._decode_order(buf, lay, seq_lens, lo, hi) if decode and self.longest_first else None,
            maxnreg=self.decode_maxnreg if decode else 0,
            decode_warps=self.decode_warps if decode else 0,
            decode_warps_maxnreg=self.decode_warps_maxnreg if decode else 0,
            heads_per_program=self.decode_heads if decode else 0,
            pairs=self.decode_pairs and decode,
            q_blocks=(seg("qb_seq"), seg("qb_blk"), self._flat_block_q) if "qb_seq" in lay.offsets else None,
        )

    def _decode_order(self, buf: torch.Tensor, lay: StepLayout, seq_lens: torch.Tensor, lo: int,
                      hi: Optional[int]) -> torch.Tensor:
        """A decode launch's longest-first order: the one ``prepare`` staged (made on the host, once a decode window:
        every sequence of a window gains one position a forward, so the order holds for all its forwards; a sort in
        the decode graph cost W1's forward 20 us on the H200), or for a row range of a split forward, sorted here."""
        if "order" in lay.offsets and lo == 0 and hi is None:
            return self._seg(buf, lay, "order")
        return attention.decode_order(seq_lens)

    def _inputs(self, buf: torch.Tensor, lay: StepLayout, lo: int = 0, hi: Optional[int] = None,
                counters: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's inputs of rows ``lo:hi`` (token ids ``[1, T]``, positions ``[1, T]``, kept rows ``[R]``, the
        latter not yet shifted by ``lo``), with the step's attention metadata put in place. Token ids and kept rows
        are int32 views of the buffer (in a decode graph every cast is a kernel), or int64 copies into a model compiled
        whole (``_fresh_inputs``); positions are int64, as the compiled rotary embedding was traced on them."""
        pos = self._seg(buf, lay, "positions")[lo:hi].long()
        self.ctx.meta = self._metadata(buf, lay, lo, hi, counters, pos=pos)
        ids = self._seg(buf, lay, "input_ids")[lo:hi][None]
        keep = self._seg(buf, lay, "logits_idx")[lo:hi]
        if self._fresh_inputs:
            ids, keep = ids.long(), keep.long()
        return ids, pos[None], keep

    def _forward(self, buf: torch.Tensor, lay: StepLayout, lo: int = 0, hi: Optional[int] = None,
                 counters: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The step's forward: logits of its kept rows. ``lo``/``hi``: decode rows ``lo:hi`` alone (``_forward_split``);
        ``counters``: the attention kernel's split counters of a launch that may run beside the runner's own."""
        assert (lo, hi) == (0, None) or lay.max_query_len == 1, "a row range needs a decode step (one token a row)"
        ids, pos, keep = self._inputs(buf, lay, lo, hi, counters)
        if lay.graph_batch and GRAPH_KEEP_ALL:  # a decode graph keeps every row, in order (staged as 0..batch-1)
            keep = None
        elif lo:
            keep = keep - lo
        kw = {attention.STEP_KWARG: self.ctx}
        if self._compiled is not None:
            if lay.max_query_len == 1:
                what = f"a decode step of {ids.shape[1]} sequences"
                logits = self._compiled_logits("decode", what, ids, pos, keep, kw)
            elif self._compiled_prefill and lay.num_tokens >= self.prefill_compile_min_tokens:
                what = f"a prefill step of {lay.num_tokens} tokens"
                logits = self._compiled_logits("prefill", what, ids, pos, keep, kw)
            else:
                logits = None
            if logits is not None:
                return logits
        return self._logits(self.model, ids, pos, keep, kw)

    def _split_rows(self, batch: int) -> int:
        """Rows of a decode graph's first half, 0 if that graph runs as one forward (``DECODE_SPLIT_MIN_ROWS``)."""
        if DECODE_SPLIT_MIN_ROWS < 2 or batch < DECODE_SPLIT_MIN_ROWS or self.tp is not None:
            return 0
        return batch // 2

    def _forward_split(self, buf: torch.Tensor, lay: StepLayout, half: int) -> torch.Tensor:
        """A decode step as two forwards, rows ``:half`` on the current stream and ``half:`` on ``side_stream``, which
        forks from the current stream's work so far and joins it before the logits are concatenated: captured in a
        graph, two branches whose kernels the GPU runs side by side. They write different cache slots, read only
        their own rows' blocks, and launch the attention kernel with counters of their own (``side_counters``).
        Without a side stream (CPU) the halves run one after the other."""
        side = self.side_stream
        main = torch.cuda.current_stream(self.device) if side is not None else None
        if side is not None:
            side.wait_stream(main)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            second = self._forward(buf, lay, half, None, self.side_counters)
        first = self._forward(buf, lay, 0, half)
        if side is not None:
            main.wait_stream(side)
        return torch.cat([first, second])

    def _compiled_logits(self, kind: str, what: str, ids, pos, keep, kw) -> Optional[torch.Tensor]:
        """The step through the compiled model; None if it would compile again during a run.

        A step outside the graphs (prefill and mixed steps; decode steps with graphs off or more sequences than the
        largest graph) runs compiled code only if it needs no new compile. One that would (a guard the model's state
        no longer passes, e.g. a hook added after start-up) stalls the job for as long as compiling takes, so the
        engine drops that kind of compiled step instead (a decode step: all compiled code), says why once, and runs
        this and later steps of that kind uncompiled."""
        model = self._compiled_pf if kind == "prefill" and self._compiled_pf is not None else self._compiled
        if not self._running:  # warm-up and capture: compiling is what they are for
            return self._logits(model, ids, pos, keep, kw)
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return self._logits(model, ids, pos, keep, kw)
        except RuntimeError as e:
            if "Detected recompile" not in str(e):
                raise
            if kind == "prefill":
                self._compiled_prefill = False
            else:
                self._compiled = None
            log.warning("%s: %s would compile again during the run; %s steps run uncompiled from now on: %s",
                        type(self.model).__name__, what, kind, " ".join(str(e).split())[:300])
        return None

    def _logits(self, call, ids: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor, kw: dict) -> torch.Tensor:
        # the compiled attention op's context (attention.py), for this forward only: nothing of the step (its metadata
        # views of the device buffers) stays referenced from the thread once it returns
        attention.activate(kw.get(attention.STEP_KWARG))
        try:
            if keep is None:  # every row (logits_to_keep=0: all of them, no gather)
                kw = {**kw, "logits_to_keep": 0} if self._keep_arg else kw
                return call(input_ids=ids, position_ids=pos, use_cache=False, **kw).logits[0]
            if self._keep_arg:
                return call(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=keep, **kw).logits[0]
            return call(input_ids=ids, position_ids=pos, use_cache=False, **kw).logits[0].index_select(0, keep)
        finally:
            attention.activate(None)

    @torch.no_grad()
    def forward(self, buf: torch.Tensor, lay: StepLayout) -> torch.Tensor:
        """Logits ``[num_samples, V]`` of the step whose inputs sit in the device buffer ``buf``."""
        if lay.graph_batch:
            graph, static_in, static_logits, head = self.graphs[lay.graph_batch]
        elif lay.prefill_graph:
            pg = self.prefill_graphs[lay.prefill_graph]
            graph, static_in, static_logits, head = pg.graph, pg.static_in, pg.static_logits, pg.head
        else:
            with self.installed():
                return self._forward(buf, lay)
        static_in[:head].copy_(buf[:head])
        graph.replay()
        return static_logits[: lay.num_samples]

    def score_rows(self, logits: torch.Tensor, buf: torch.Tensor, lay: StepLayout, out: torch.Tensor) -> None:
        """For each scored row: the log-probability of its target token and whether the target was the argmax."""
        x = logits.float()
        target = self._seg(buf, lay, "score_targets").long()
        out[:, 0] = torch.log_softmax(x, dim=-1).gather(1, target[:, None])[:, 0]
        out[:, 1] = (x.argmax(dim=-1) == target).float()

    def agree(self, buf: torch.Tensor, lay: StepLayout, dev_tokens: torch.Tensor) -> None:
        """Tensor parallel: the group's rank 0 tokens in ``dev_tokens[:k]`` on every rank, and at ``dev_tokens[k]``
        a flag set where a rank staged another step (see ``TensorParallelGroup.agree``)."""
        k = lay.num_samples
        self.tp.agree(dev_tokens[:k], self._seg(buf, lay, "plan_crc"), dev_tokens[k:k + 1])

    def sampling_inputs(self, buf: torch.Tensor, lay: StepLayout, sub: int = 0) -> Optional[SamplingInputs]:
        return sampling_inputs(lay.sampling, lambda name: self._seg(buf, lay, name), sub)

    def advance(self, buf: torch.Tensor, lay: StepLayout, tokens: torch.Tensor) -> None:
        """The next forward of a decode window, on the device: each sequence's input is the token just sampled
        (``tokens``, row i = sequence i), one position further; graph padding rows stay as staged. Slot mapping and
        block tables follow from positions and the table (their blocks were staged with the window's first step)."""
        n = lay.num_samples
        self._seg(buf, lay, "input_ids")[:n].copy_(tokens)
        self._seg(buf, lay, "positions")[:n] += 1
        self._seg(buf, lay, "seq_lens")[:n] += 1

    def _scratch_step(self, num_seqs: int, q_len: int) -> tuple[StepLayout, torch.Tensor]:
        """A step of ``num_seqs`` sequences of ``q_len`` tokens on the scratch row (writes only the scratch block)."""
        b, t = num_seqs, num_seqs * q_len
        lay = StepLayout(num_tokens=t, num_seqs=b, num_samples=b, max_query_len=q_len)
        qsl = np.arange(b + 1, dtype=np.int32) * q_len
        parts = [np.zeros(t, np.int32), np.tile(np.arange(q_len, dtype=np.int32), b), np.full(t, SCRATCH_ROW, np.int32),
                 qsl, np.full(b, q_len, np.int32), np.full(b, SCRATCH_ROW, np.int32), qsl[1:] - 1]
        for name, arr in zip(HEAD, parts):
            lay.add(name, arr)
        if q_len == 1 and self.longest_first and self.host_order:  # as ``prepare`` stages a decode step
            parts.append(_longest_first(parts[4]))
            lay.add("order", parts[-1])
        return lay, torch.from_numpy(np.concatenate(parts)).to(self.device)

    def _scratch_prefill_step(self, tokens: int, seqs: int, slots: int) -> tuple[StepLayout, torch.Tensor]:
        """A prefill graph's step at its full size: ``seqs`` sequences on the scratch row (their K/V go to the scratch
        block) filling as many of ``tokens`` tokens as ``max_model_len`` lets them, the rest padding, as ``prepare``
        pads a real step; one kept row a sequence."""
        q_len = max(1, min(self.max_model_len, tokens // seqs))
        real = seqs * q_len
        lay = StepLayout(num_tokens=tokens, num_seqs=seqs, num_samples=seqs, max_query_len=max(2, q_len),
                         prefill_graph=tokens)
        qsl = np.arange(seqs + 1, dtype=np.int32) * q_len
        positions = np.zeros(tokens, np.int32)
        positions[:real] = np.tile(np.arange(q_len, dtype=np.int32), seqs)
        parts = [np.zeros(tokens, np.int32), positions, np.full(tokens, SCRATCH_ROW, np.int32), qsl,
                 np.full(seqs, q_len, np.int32), np.full(seqs, SCRATCH_ROW, np.int32), qsl[1:] - 1]
        parts += list(q_block_table([q_len] * seqs, self._flat_block_q, slots))
        for name, arr in zip(HEAD + ("qb_seq", "qb_blk"), parts):
            lay.add(name, arr)
        return lay, torch.from_numpy(np.concatenate(parts)).to(self.device)

    def _prefill_graph_sizes(self) -> list[tuple[int, int, int]]:
        """(token bucket, most sequences, query-block slots) of each prefill graph to capture, largest bucket first."""
        cfg = self.config
        top = self.graph_step_tokens or cfg.max_batch_tokens  # the cap, where set, is below the budget
        return [(tb, min(cfg.max_num_seqs, tb), self._prefill_slots(tb))
                for tb in prefill_graph_buckets(top, cfg.max_num_seqs, self.max_model_len)]

    def capture_prefill_graphs(self, stream: torch.cuda.Stream) -> None:
        """Capture one graph of the prefill forward per token bucket (``prefill_graph_buckets``), largest first, in the
        decode graphs' pool (one step runs at a time). Their attention is a flat launch whose grid depends only on the
        bucket, so one graph serves every step that fits it. Failing that, prefill steps run as before, one line
        logged."""
        try:
            with gc_freeze.no_collection():
                for tb, bb, slots in self._prefill_graph_sizes():
                    lay, static_in = self._scratch_prefill_step(tb, bb, slots)
                    graph, static_logits = self._capture(self._forward, static_in, lay, stream)
                    self.prefill_graphs[tb] = PrefillGraph(graph, static_in, static_logits,
                                                           lay.offsets["qb_blk"][0] + slots, bb, slots)
        except Exception as e:  # noqa: BLE001 -- as capture_graphs: prefill steps still run outside graphs
            self.prefill_graphs = {}
            log.warning("%s: prefill CUDA graphs off, prefill steps run outside graphs: %s", type(self.model).__name__,
                        _why(e))
            return
        self.prefill_graphs = dict(sorted(self.prefill_graphs.items()))

    def _untimed_mode(self):
        """Grad mode of warm-up and capture: with ``compile``, inference mode as the steps run (compiled code is
        specialised on it, so anything else would compile a second time)."""
        return torch.inference_mode() if self.compile else torch.no_grad()

    def warmup(self) -> None:
        """Run steps of every query tile once so kernel compilation happens now, not during a run: Triton specialises
        the attention kernel on the query tile (a power of two up to 128 queries; the KV split count is a run-time
        argument, and a one-sequence step takes the split path); with ``compile``, the decode steps first (see
        ``_compile_decode``)."""
        if self._compiled is not None:
            self._compile_decode()
        if self._compiled is not None and self._compiled_prefill:
            self._compile_prefill()
        logits = None
        for q_len in (1, 2, 4, 8, 16, 32, 64, 128):
            if q_len <= self.config.max_batch_tokens:
                logits = self._scratch_forward(1, q_len)
        if self.device.type == "cuda":
            self._warm_sampling(logits.dtype if logits is not None else self.dtype)
            torch.cuda.synchronize(self.device)

    def _warm_sampling(self, dtype: torch.dtype) -> None:
        """Compile the fused sampling draws' common kinds (``triton_sampling.warm_up``) at start-up. Without Triton
        the draws are torch's own, with nothing to compile; a failure here leaves them to compile at first use."""
        from .sampling import _fused_draws

        fused = _fused_draws()
        if fused is None:
            return
        try:
            with torch.cuda.device(self.device), self._untimed_mode():
                fused.warm_up(self.device, dtype, self.vocab_size)
        except Exception as e:  # noqa: BLE001 -- a compile failure must not stop the engine; the first draw shows it
            log.warning("%s: sampling kernels not compiled at start-up: %s", type(self.model).__name__, _why(e))

    def _scratch_forward(self, num_seqs: int, q_len: int) -> torch.Tensor:
        lay, buf = self._scratch_step(num_seqs, q_len)
        with self._untimed_mode(), self.installed():
            return self._forward(buf, lay)

    def _compile_decode(self) -> None:
        """Compile the decode forward for every batch size (torch.compile specialises sizes 1 and 2, hence three
        shapes). A model torch.compile cannot compile keeps uncompiled decode steps, with one line logged: like the
        CUDA graphs, ``compile`` never stops an engine from being built."""
        sizes = [1, 2, 3]
        if DECODE_TUNE_ROWS > 3:  # the dynamic-shape graph traced (and its kernels autotuned) on a large batch first
            tune = min(DECODE_TUNE_ROWS, self.config.max_num_seqs, self.config.max_batch_tokens)
            # size-oblivious tracing (compiled_layers.SIZE_OBLIVIOUS): traced on the large batch before one row, the
            # dynamic graph serves one row too (traced on one row first, it would equate the batch dimension with
            # the token count and be traced again)
            sizes.insert(0 if size_oblivious() else 1, tune)
        try:
            for num_seqs in sizes:
                self._scratch_forward(num_seqs, 1)
        except Exception as e:  # noqa: BLE001 -- dynamo/inductor failures have no common base class
            self._compiled = None  # never called again (dynamo's caches stay: other engines may use them)
            log.warning("%s: compile off, decode steps run uncompiled: %s", type(self.model).__name__, _why(e))

    def _compile_prefill(self) -> None:
        """Compile the prefill/mixed-step forward: token and kept-row counts independent (the decode code has one
        size for both), with 0, 1 and more kept rows (a step whose chunks all end mid-prompt keeps none; torch.compile
        specialises sizes 0 and 1). Failing that, prefill steps stay eager. With graphs of their own
        (``PREFILL_OWN_COMPILE``) the first call is a step of the full token budget: inductor takes its kernels' size
        hints from it and autotunes their launches on it."""
        if self._compiled_pf is not None:
            q_len = max(1, min(128, self.max_model_len, self.config.max_batch_tokens))
            num_seqs, model = max(3, self.config.max_batch_tokens // q_len), self._compiled_pf
        else:
            q_len, num_seqs, model = 8, 3, self._compiled
        tag = _prefill_cache_tag() if self._compiled_pf is not None else contextlib.nullcontext()
        try:
            # inputs made inside too: compiled code checks inference mode
            with self._untimed_mode(), self.installed(), tag:
                lay, buf = self._scratch_step(num_seqs, q_len)
                ids, pos, keep = self._inputs(buf, lay)
                for kept in (0, 1, 3):
                    self._logits(model, ids, pos, keep[:kept], {attention.STEP_KWARG: self.ctx})
        except Exception as e:  # noqa: BLE001 -- as _compile_decode
            self._compiled_prefill = False
            log.warning("%s: prefill steps run uncompiled: %s", type(self.model).__name__, _why(e))

    # --- CUDA graphs ----------------------------------------------------------------------------------------
    def capture_graphs(self, max_batch: int, stream: torch.cuda.Stream) -> None:
        """Capture one decode graph per batch bucket, largest first, sharing one memory pool.

        A model whose decode step cannot be captured keeps eager decode steps, with one line logged: construction
        never fails here. Host syncs, the usual reason, are found by an eager step first (see _host_syncs_raise)."""
        buckets = graph_buckets(max_batch)
        try:
            experts = self._capturable_experts(stream, buckets[0])
            with _experts_implementation(self.model, experts), gc_freeze.no_collection():
                self.graph_pool = torch.cuda.graph_pool_handle()
                for b in reversed(buckets):
                    lay, static_in = self._scratch_step(b, 1)
                    lay.graph_batch = b
                    half = self._split_rows(b)
                    step = functools.partial(self._forward_split, half=half) if half else self._forward
                    graph, static_logits = self._capture(step, static_in, lay, stream)
                    self.graphs[b] = (graph, static_in, static_logits, lay.size)
        except Exception as e:  # noqa: BLE001 -- whatever stops the capture, eager decode steps still run the model
            # Dropping the graphs releases their pool. The stream contexts above have restored the current stream.
            self.graphs, self.graph_pool = {}, None
            if self.config.compile is None:  # auto compile goes with the graphs: uncompiled, eager steps cost less host time
                self.compile, self._compiled = False, None
            log.warning("%s: CUDA graphs off, decode steps run eagerly: %s", type(self.model).__name__, _why(e))
            return
        self.graphs = dict(sorted(self.graphs.items()))

    def _capture(self, step, static_in: torch.Tensor, lay: StepLayout, stream: torch.cuda.Stream):
        """``step(static_in, lay)`` captured in a CUDA graph in the runner's pool: (graph, its static logits). Two
        warm-up calls first keep lazy initialisation and Triton compilation (and a split forward's side-stream cuBLAS
        workspace) out of the graph."""
        with torch.cuda.stream(stream), self._untimed_mode(), self.installed():
            for _ in range(2):
                step(static_in, lay)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool, stream=stream):
                static_logits = step(static_in, lay)
        return graph, static_logits

    def _capturable_experts(self, stream: torch.cuda.Stream, batch: int) -> Optional[str]:
        """The experts implementation (None: the model's own) whose decode step makes no host sync; raises the model's
        own sync when every candidate syncs (a dense model has only its own).

        transformers' default ``grouped_mm`` calls torch's grouped GEMM, whose CUDA kernel runs only for bf16 on
        sm90/sm100; for other dtypes torch loops over the groups after copying their offsets to the host. Its
        ``batched_mm`` gathers each token's experts and runs one batched matmul, all on the device."""
        lay, buf = self._scratch_step(batch, 1)

        def decode_step():
            with torch.cuda.stream(stream), self._untimed_mode(), self.installed():
                self._forward(buf, lay)

        own_error = None
        for impl in _experts_candidates(self.model):
            with _experts_implementation(self.model, impl):
                decode_step()  # lazy initialisation and compilation (Triton's decode tiles, dynamo) before syncs raise
                stream.synchronize()
                try:
                    with _host_syncs_raise():
                        decode_step()
                except RuntimeError as e:
                    own_error = own_error or e
                    continue
                finally:
                    stream.synchronize()
            if impl is not None:
                log.info("%s: decode graphs run the experts with transformers' %r (%s)", type(self.model).__name__,
                         impl, _why(own_error))
            own_error = None  # the exception's traceback holds this frame (and self): no cycle left behind
            return impl
        try:
            raise own_error
        finally:
            own_error = None


# Prefill and mixed steps call the compiled model when tokens x parameters reach this. Sessions 5-10 used 4e12 (~8
# TFLOP of matrix products), when a compiled forward broke its graph at every attention call and cost the host more
# than an uncompiled one. With the layers compiled whole (session 10) it costs less, and its GPU time is lower too:
# one step on an H200 (session 11, step_probe.py), compiled vs uncompiled, wall ms: W7 (0.6B) 1,688 tokens 20.5 vs
# 33.6, 15,705 tokens 50.3 vs 94.3; W1 (135M) 8,073 tokens 23.9 vs 31.1, 65,065 tokens 72.1 vs 122.9 (host ms of the
# forward 25-30 vs 35-54). So every prefill step runs compiled; the threshold stays as a knob for the benchmark.
PREFILL_COMPILE_MIN_WORK = 0.0
# Prefill steps compiled apart from decode steps, first on a full-budget step (CompiledLayers' own_frame): on an H200
# (session 11, step_probe.py), the fused pointwise and norm kernels of a compiled prefill step ran at 1.3-2.5 TB/s
# (W7: 16 of 43 GPU ms a 16k-token step; W1: 21 of 50 ms a 65k-token step), having been sized for the decode
# steps' few rows. Off until session 18. Measured on the H200 (session 12) at the same speed as DECODE_TUNE_ROWS
# (W1 141,828 vs 141,842 out tok/s; W7 23,629 vs 23,639; variant ours_async_prefill_own_compile), but that run's
# prefill graphs were the decode graphs' compiled code, loaded from inductor's FX-graph cache; compiled apart since
# (session 13). On by default since session 18, one of ``ours_async_stacked``'s levers (W7 25,060 out tok/s against
# 24,572 on the H200, session 16), at 7-17 s more start-up (a second compile of the layers; session 18: W1 49 s
# against 39, W7 61 against 44).
PREFILL_OWN_COMPILE = True
# Decode graphs keep every row's logits (``logits_to_keep=0``): their kept rows are staged as 0..batch-1, so the gather
# of the kept rows' hidden states (and its index cast) did nothing but cost two kernels before the LM head (about 5
# us of W1's 512-row forward on the H200, session 24's probe). Off: variant ``ours_async_graph_slots``. Read when a
# forward is traced or captured.
GRAPH_KEEP_ALL = True
# Prefill and mixed steps replayed from CUDA graphs, one per token bucket (``prefill_graph_buckets``: the step budget
# and up to PREFILL_GRAPH_BUCKETS - 1 smaller ones, the k-th ~ budget / sqrt(2)^k, none under
# PREFILL_GRAPH_MIN_TOKENS); a step is padded to the smallest bucket it fits if that at most doubles its tokens and
# stays within PREFILL_GRAPH_MAX_PAD_WORK, else it runs as before, as do scoring steps. On an H200 (session 15,
# benchmark call facts) a prefill step's host launch took 30-43 ms on W1 and W7, about as long as or longer than its
# GPU work (W7: 34 ms of kernels), so those steps ran at the host's pace and W1's prefill phase varied by 40 ms from
# call to call; a replay costs the host one copy and one launch. Measured on the H200 (session 15, 3 timed calls
# each): W7 24,377 out tok/s against 23,963 (medians 24,360 and 23,963, spreads 0.2% and 0.8%), host 1.8 ms a prefill
# launch against 21-40, TTFT 0.197 s against 0.254; W1, with longest-first decode, 149,055 (median 147,065, spread
# 1.4%) against 141,308 (141,120). On by default since session 16 (the whole GPU suite run with it on);
# BatcherConfig.prefill_graphs overrides it. Read when an engine is built.
PREFILL_GRAPHS = True
# Buckets down to 512 tokens: a job with turnover admits requests in mixed steps of a few prompts and the running
# decode rows (512 rows and a 300-token prompt: 812 tokens), which paid a prefill step's whole host launch too. Each
# bucket costs ~0.15 s of start-up (session 15: 6 buckets and the decode graphs captured in 2.4 s, 1.6 s without);
# the buckets share one pool, so the largest sets the memory.
PREFILL_GRAPH_BUCKETS = 16
PREFILL_GRAPH_MIN_TOKENS = 512
PREFILL_GRAPH_ROUND = 256
# A step is padded to a bucket only if the padding is at most this many tokens x parameters (2x that in FLOPs of
# matrix products: about 10 ms of an H200): on a small model a padded step still costs the GPU less than an eager one
# costs the host; on a large one (8B: 500 padding tokens) a step that fills no bucket runs outside the graphs.
PREFILL_GRAPH_MAX_PAD_WORK = 4e12
# How they stay apart in torch's compile caches, which key on a graph but not on the size hints of its first trace:
# compiled under a cache-key tag of their own (``torch.compiler.config.cache_key_tag``, joined to any the user set),
# so the FX-graph and AOTAutograd caches hold their code apart from the decode graphs' (a later start-up loads both).
# A torch without that tag compiles them with the FX-graph cache off (PREFILL_OWN_OPTIONS): at every start-up.
PREFILL_CACHE_TAG = "async_batching.prefill"
PREFILL_OWN_OPTIONS = {} if hasattr(torch.compiler.config, "cache_key_tag") else {"fx_graph_cache": False}


def _prefill_cache_tag():
    """Context in which the prefill steps' own graphs compile: under their cache-key tag (where torch has one)."""
    cfg = torch.compiler.config
    if not hasattr(cfg, "cache_key_tag"):
        return contextlib.nullcontext()
    return cfg.patch(cache_key_tag="|".join(t for t in (cfg.cache_key_tag, PREFILL_CACHE_TAG) if t))
# Decode steps' compiled code traced first on this many rows (capped by max_num_seqs and the token budget) instead of
# 2-3: inductor sizes the fused kernels' launches from the first shapes, and the decode graphs replay them at up to
# 512 rows, and prefill steps call the same graphs (PREFILL_OWN_COMPILE off). On the H200 (session 12, one run):
# W1 141,842 out tok/s against 131,242 traced on 2-3 rows (a second run without it: 131,953), TTFT p50 0.151 vs
# 0.209 s; W7 23,639 vs 23,439 (noise). Session 13, each variant compiling into caches of its own: 145,975 vs 133,900
# (TTFT 0.137 vs 0.197 s; medians of 3 calls 143,369 vs 137,974). 0: traced on 1-3 rows (ours_async_no_decode_tune).
DECODE_TUNE_ROWS = 256
# Decode graphs of at least this many rows run their rows as two halves, each a whole forward, on two streams that
# the graph joins before the logits (see ``_forward_split``). A decode step's products and small kernels each fill
# a fraction of the GPU (a W7 product at 256 rows: 4-7 us, ~20-40% of its bound; ~12 kernels a layer), so the two
# halves' kernels can run side by side; each half reads the weights again (the LM head too). Off: measured slower
# on the H200 (session 12, from 64 rows: W1 129,313 vs 131,953 out tok/s, W7 22,971 vs 23,661; variant
# ours_async_split_decode); session 21, from 256 rows: W1 140,390 against 150,397 (medians of 2; a steady forward
# 4.53 ms of wall, 646 kernels, against 2.67 ms). Never under tensor parallelism (collectives on two streams).
DECODE_SPLIT_MIN_ROWS = 0
# Decode launches' longest-first order (attention.DECODE_LONGEST_FIRST) made by the host as it stages a decode step
# (``_longest_first``, once a decode window) and copied into the graph with the step's inputs, instead of an argsort
# inside every decode forward (on the H200, session 20: the sort's 20 us left W1's profiled decode forward, whose
# tokens over the whole run stayed identical). Off: variant ``ours_async_device_order``. Read when an engine is built.
HOST_DECODE_ORDER = True
DECODE_WINDOW = 4  # BatcherConfig.decode_window's default where decode steps replay CUDA graphs
# The step token budget's default (BatcherConfig.max_batch_tokens=None). A prefill step launched from the host
# costs it the model's layers called once (eager: about 30-40 ms for a 30-layer model on the H200 machine's host;
# compiled, about 30 ms) whatever its tokens; its GPU work is tokens x parameters. Below about 0.5B parameters,
# 16,384 tokens leave the GPU waiting on the host: W1 (135M) did 10 host-bound prefill steps of ~40 ms each, and ran
# 1.22x faster end to end with a 65,536-token budget (3 such steps; one H200, session 9). So the budget is raised
# until a step holds about this many tokens x parameters, up to AUTO_MAX_BATCH_TOKENS. Steps that replay prefill
# graphs (about 1 ms of host a step) are held to GRAPH_STEP_TOKENS instead (``graph_step_tokens``).
AUTO_BATCH_TOKENS = 16384
AUTO_MAX_BATCH_TOKENS = 65536
AUTO_BATCH_WORK = 8e12
# With the auto budget and prefill graphs, steps of generation requests hold at most this many tokens; steps while
# scoring requests wait or run (launched from the host: no prefill graph holds scored rows) keep the raised budget.
# W1 on the H200 (session 21, one call, medians of 2 timed calls): 154,280 out tok/s against 149,283 with 65,536-token
# steps (8,192: 152,034), TTFT p50 0.061 against 0.106 s: the first requests decode beside the later prefill chunks.
# A second call: 155,041 against 154,440. None: off.
GRAPH_STEP_TOKENS: Optional[int] = 16384


def auto_max_batch_tokens(model, device: torch.device) -> int:
    """``max_batch_tokens`` when the config leaves it None: 16,384; on CUDA, the power of two reaching
    AUTO_BATCH_WORK / parameters (this process's share under TP), capped at 65,536."""
    if device.type != "cuda":
        return AUTO_BATCH_TOKENS
    want = AUTO_BATCH_WORK / max(1, _param_count(model))
    tokens = AUTO_BATCH_TOKENS
    while tokens < want and tokens < AUTO_MAX_BATCH_TOKENS:
        tokens *= 2
    return tokens


def graph_step_tokens(auto_budget: bool, max_batch_tokens: int, prefill_graphs: bool, chunked_prefill: bool
                      ) -> Optional[int]:
    """The token cap of generation steps (``Scheduler(graph_step_tokens=)``): GRAPH_STEP_TOKENS where the budget was
    chosen automatically above it and prefill steps replay graphs; None (no cap) elsewhere, and without chunked
    prefill (a prompt must then fit one step of the whole budget)."""
    cap = GRAPH_STEP_TOKENS
    if not (auto_budget and prefill_graphs and chunked_prefill and cap) or cap >= max_batch_tokens:
        return None
    return cap


def _param_count(model) -> int:
    """Parameters this process holds (a tensor-parallel shard counts its local part)."""
    total = 0
    for p in model.parameters():
        total += (p.to_local() if hasattr(p, "to_local") else p).numel()
    return max(total, 1)


def _experts_candidates(model) -> list[Optional[str]]:
    """Experts implementations to try for capture: the model's own, then transformers' device-only ones (MoE only)."""
    can_set = getattr(model, "_can_set_experts_implementation", None)
    if not hasattr(model, "set_experts_implementation") or can_set is None or not can_set():
        return [None]
    own = model.config._experts_implementation
    return [None] + [impl for impl in ("grouped_mm", "batched_mm") if impl != own]


@contextlib.contextmanager
def _experts_implementation(model, impl: Optional[str]):
    """Run the model's experts with transformers' ``impl`` inside the block (None: leave them), then restore."""
    if impl is None:
        yield
        return
    previous = model.get_experts_implementation()
    model.set_experts_implementation(impl)
    try:
        yield
    finally:
        model.set_experts_implementation(previous)


@contextlib.contextmanager
def _host_syncs_raise():
    """torch's sync-debug mode set to raise: a host sync in an eager step is found before any capture starts. A
    capture that a sync invalidates can leave torch < 2.12's allocator believing a capture is still underway, which
    later fails its asserts (pytorch/pytorch#180395)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _why(e: BaseException) -> str:
    """The error's type and first line, and the innermost line outside torch that led to it (the model's code)."""
    first = (str(e).strip().splitlines() or [""])[0]
    outside_torch = [f for f in traceback.extract_tb(e.__traceback__) if f"{os.sep}torch{os.sep}" not in f.filename]
    if not outside_torch:
        return f"{type(e).__name__}: {first}"
    f = outside_torch[-1]
    where = os.path.join(os.path.basename(os.path.dirname(f.filename)), os.path.basename(f.filename))
    return f"{type(e).__name__}: {first} (at {where}:{f.lineno} in {f.name})"


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401

        from . import triton_paged_attention  # noqa: F401
    except Exception:
        return False
    return True


__all__ = ["ModelRunner", "StepLayout", "graph_buckets"]
