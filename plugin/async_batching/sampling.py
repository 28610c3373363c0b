"""Token sampling on the model's device: greedy, repetition penalty, temperature, top-k, top-p, min-p (transformers'
order and semantics), with per-request reproducible noise and no host synchronization.

Noise is a pure function of (64-bit stream seed, generated-token index, vocab id or a per-row lane), so a seeded request
draws the same tokens whatever the batch composition, the mode (sync/async) or a preemption and recompute. It is only
computed where it can matter:
- top-k rows: the ``torch.topk`` candidates race with Gumbel noise keyed by vocab id; the tokens tied with the k-th
  value (transformers keeps them all, inside or outside the candidates) race as one bucket, whose member is then drawn
  uniformly;
- rows without top-k: one inverse-CDF draw per row (one 52-bit uniform) over the kept tokens in vocab order; top-p
  finds its nucleus threshold by sorting the logits of only the rows that ask for it.
A cut (top-k, top-p, min-p) keeps or drops tokens of equal logits together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
# Upper bound of the int32 words ``stage_sampling`` stages per row (staging is sized by it). Used: 7 (row index,
# temperature, two noise-key words, min_p, top_k or the sort position, top_p). Penalties travel in their own upload.
SAMPLING_INTS_PER_ROW = 8
_CHUNK = 1024  # inverse-CDF draws find the chunk first, then the token inside it (no [rows, vocab] prefix sum)
# Per-row noise comes from "lanes": ids 2**32 - 1, 2**32 - 2, ... that no vocabulary reaches.


def stream_seed(*parts: int) -> int:
    """A 64-bit seed derived from integers (a splitmix64 chain): distinct inputs give independent streams."""
    h = _GOLDEN
    for p in parts:
        h = (h ^ (int(p) & _M64)) & _M64
        h = (h + _GOLDEN) & _M64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _M64
        h ^= h >> 31
    return h


def request_seed(batcher_seed: int, uid: int, seed: Optional[int], sample_idx: int) -> int:
    """The sampling stream of one sequence. Seeded: sample 0 uses the seed, sample i a stream derived from (seed, i),
    so the same seed gives the same tokens in any call. Unseeded: derived from the batcher's seed and the sequence's
    uid (unique over the batcher's life), so no two sequences share noise and a job is reproducible from its config."""
    if seed is None:
        return stream_seed(batcher_seed, uid)
    return seed & _M64 if sample_idx == 0 else stream_seed(seed, sample_idx)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (a bijection; numpy wraps uint64 arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def noise_keys(seeds: np.ndarray, gen_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row 64-bit noise keys of (stream seed, generated-token index), as two int32 words (low, high)."""
    with np.errstate(over="ignore"):
        key = _mix64(_mix64(seeds.astype(np.uint64)) + (gen_idx.astype(np.uint64) + np.uint64(1)) * np.uint64(_GOLDEN))
    lo = (key & np.uint64(_M32)).astype(np.uint32).view(np.int32)
    hi = (key >> np.uint64(32)).astype(np.uint32).view(np.int32)
    return lo, hi


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32, a bijection) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _hash(lo: torch.Tensor, hi: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """32 random bits (int64) per (row key, id); ``lo``/``hi`` are ``[R, 1]``. A bijection of the id for a fixed key."""
    return _mix32(_mix32(ids ^ lo) ^ hi)


def _lanes(rows: int, count: int, device) -> torch.Tensor:
    """Ids ``[rows, count]`` of the per-row noise lanes (made on the device: no host copy)."""
    return (_M32 - torch.arange(count, device=device))[None].expand(rows, count)


def _gumbel(bits: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise (float64) from 32 random bits."""
    return -torch.log(-torch.log((bits.double() + 0.5) * 2.0**-32))


def _uniform52(bits_a: torch.Tensor, bits_b: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1) (float64) with 52 random bits from two 32-bit draws: fine enough for any vocabulary."""
    return (((bits_a << 20) | (bits_b >> 12)).double() + 0.5) * 2.0**-52


def _chunk_sums(w: torch.Tensor) -> torch.Tensor:
    """Sums of ``w [R, V]`` (float or bool) over consecutive chunks of ``_CHUNK`` vocab ids, float64 ``[R, chunks]``."""
    R, V = w.shape
    size = min(_CHUNK, V)
    full = V // size * size
    sums = w[:, :full].reshape(R, -1, size).sum(-1, dtype=torch.float64)
    if full < V:
        sums = torch.cat([sums, w[:, full:].sum(-1, keepdim=True, dtype=torch.float64)], 1)
    return sums


def _inverse_cdf(w: torch.Tensor, sums: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Vocab ids ``[R]`` drawn with probability proportional to ``w [R, V]`` (>= 0), one uniform ``u [R, 1]`` per row.

    The cumulative mass runs in vocab-id order (float64), first over chunks (``sums``), then inside the chosen chunk;
    the result always has positive weight (the clamps absorb rounding at the ends of the ranges).
    """
    R, V = w.shape
    size = min(_CHUNK, V)
    cum = sums.cumsum(-1)
    total = cum[:, -1:].contiguous()
    target = u * total
    chunk = torch.minimum(torch.searchsorted(cum, target, right=True), torch.searchsorted(cum, total))
    inside = (target - (cum.gather(1, chunk) - sums.gather(1, chunk))).clamp(min=0)
    cols = chunk * size + torch.arange(size, device=w.device)
    valid = cols < V
    local = w.gather(1, cols.clamp(max=V - 1)).double().masked_fill(~valid, 0).cumsum(-1)
    pos = torch.minimum(torch.searchsorted(local, inside, right=True), torch.searchsorted(local, local[:, -1:].contiguous()))
    return (chunk * size + pos)[:, 0].clamp_(max=V - 1)  # in range even for NaN logits (no device assert later)


# --- host side: what one step stages ----------------------------------------------------------------------------


@dataclass
class GroupPlan:
    """Host facts of one group of sampled rows (decided while staging, so the device needs no host round trip)."""

    count: int
    all_rows: bool  # the group is rows 0..count-1 in order (no index array staged)
    top_k_max: int = 0  # top-k group: the widest top_k (the candidates torch.topk returns)
    top_p: bool = False
    min_p: bool = False
    num_sort: int = 0  # rows-without-top-k group: rows with top_p < 1 (their logits are sorted)


@dataclass
class PenaltyPlan:
    """Repetition penalties of one step: a separate upload (see ``SamplingState``)."""

    state: "SamplingState"
    upload: np.ndarray  # int32: rows, table rows, penalties (float bits), cleared table rows, marked (row, token) pairs
    count: int
    num_clear: int
    num_marks: int
    all_rows: bool  # every sampling row is penalised


@dataclass
class SamplingPlan:
    """Host-side facts of one step's sampling rows."""

    greedy: bool = True  # no sampled and no penalised row: plain argmax
    num_rows: int = 0
    top_k: Optional[GroupPlan] = None  # sampled rows with top_k > 0
    full: Optional[GroupPlan] = None  # sampled rows without top_k: plain temperature, top-p, min-p
    penalty: Optional[PenaltyPlan] = None


class SamplingState:
    """What sampling keeps between steps: for repetition penalties, which token ids the request on each block-table
    row has seen (prompt and generated), as a device bool table updated with new tokens only.

    A row holds the first ``marked`` tokens of its owner's history (which only grows), plus the last input tokens of the
    steps that sampled it. A request found on a row another request wrote is staged in full once (the row is cleared
    first); afterwards only the tokens that landed since are staged, and on the device the step's last input token of
    the row (in async mode the token still in flight). The owner is ``(uid, num_preemptions)``: a step rolled back
    after staging (out of memory) may not have marked its tokens, and its requests are preempted, so they restage.
    Rows are taken over only after the previous owner's steps ran (stream order), so reuse is safe.
    """

    def __init__(self, num_rows: int, vocab_size: int):
        self.num_rows, self.vocab_size = num_rows, vocab_size
        self.presence: Optional[torch.Tensor] = None  # bool [num_rows, vocab], allocated for the first penalty
        self._owner: list = [None] * num_rows
        self._marked = [0] * num_rows  # tokens of the owner already marked

    def stage(self, rows: Sequence, idx: np.ndarray, penalties: np.ndarray) -> PenaltyPlan:
        """The upload of one step's penalised rows (``idx`` into ``rows``)."""
        table, clear, mark_rows, mark_toks = [], [], [], []
        for i in idx:
            req = rows[i]
            row = req.row
            table.append(row)
            owner = (req.uid, req.num_preemptions)
            start = self._marked[row]
            if self._owner[row] != owner:
                self._owner[row], start = owner, 0
                clear.append(row)
            known = req.num_known
            if known > start:
                p = len(req.prompt_ids)
                toks = req.prompt_ids[start:known] if start < p else []
                toks = toks + req.output_ids[max(start - p, 0):known - p]
                mark_toks.extend(toks)
                mark_rows.extend([row] * len(toks))
            self._marked[row] = known
        upload = np.concatenate([
            idx.astype(np.int32), np.asarray(table, np.int32), penalties.astype(np.float32).view(np.int32),
            np.asarray(clear, np.int32), np.asarray(mark_rows, np.int32), np.asarray(mark_toks, np.int32),
        ])
        return PenaltyPlan(self, upload, len(idx), len(clear), len(mark_toks), len(idx) == len(rows))

    def apply(self, plan: PenaltyPlan, seg: Callable[[str], torch.Tensor]) -> "PenaltyInputs":
        """Upload the step's penalty data and bring the presence table up to date (on the current stream)."""
        device = seg("logits_idx").device
        data = torch.from_numpy(plan.upload)
        if device.type == "cuda":  # pinned by the caching host allocator, which keeps it until the copy has run
            data = data.pin_memory().to(device, non_blocking=True)
        n, c, m = plan.count, plan.num_clear, plan.num_marks
        rows, table = data[:n].long(), data[n:2 * n].long()
        penalty = data[2 * n:3 * n].view(torch.float32)
        clear = data[3 * n:3 * n + c].long()
        mark_rows = data[3 * n + c:3 * n + c + m].long()
        mark_toks = data[3 * n + c + m:].long()
        if self.presence is None:
            self.presence = torch.zeros(self.num_rows, self.vocab_size, dtype=torch.bool, device=device)
        if c:
            self.presence.index_fill_(0, clear, False)
        # Flat index_fill_ with a scalar: advanced-index assignment of a Python value would copy it from the host.
        flat, vocab = self.presence.view(-1), self.vocab_size
        if m:
            flat.index_fill_(0, mark_rows * vocab + mark_toks, True)
        # The last input token of each row: the latest history token, possibly still unknown to the host.
        last = seg("input_ids").index_select(0, seg("logits_idx").index_select(0, rows)).long()
        flat.index_fill_(0, table * vocab + last, True)
        return PenaltyInputs(None if plan.all_rows else rows, penalty, self.presence.index_select(0, table))


def _f32(values) -> np.ndarray:
    return np.asarray(values, np.float32).view(np.int32)


def stage_sampling(rows: Sequence, state: Optional[SamplingState] = None,
                   window: int = 1) -> tuple[SamplingPlan, list[tuple[str, np.ndarray]]]:
    """The int32 arrays one step stages for its sampling rows (requests, in row order); none when all are greedy.
    ``window`` > 1 (a decode window, no penalties): the noise keys of the window's later draws too, as ``lo{j}`` and
    ``hi{j}`` (generated-token index + j), so every token is drawn as the step-by-step engine would draw it."""
    n = len(rows)
    sp = [r.sampling for r in rows]
    plan = SamplingPlan(num_rows=n)
    first = sp[0] if sp else None
    if all(p is first for p in sp):  # one SamplingParams for the whole step (the common case): no per-row gathering
        if first is None or (first.temperature == 0 and first.repetition_penalty == 1.0):
            return plan, []
        temp = np.full(n, first.temperature, np.float32)
        top_k = np.full(n, first.top_k, np.int32)
        top_p = np.full(n, first.top_p, np.float32)
        min_p = np.full(n, first.min_p, np.float32)
        penalty = np.full(n, first.repetition_penalty, np.float32)
    else:
        temp = np.fromiter((p.temperature for p in sp), np.float32, n)
        top_k = np.fromiter((p.top_k for p in sp), np.int32, n)
        top_p = np.fromiter((p.top_p for p in sp), np.float32, n)
        min_p = np.fromiter((p.min_p for p in sp), np.float32, n)
        penalty = np.fromiter((p.repetition_penalty for p in sp), np.float32, n)
    sampled = temp > 0
    penalised = np.flatnonzero(penalty != 1.0)
    if not sampled.any() and not len(penalised):
        return plan, []
    plan.greedy = False
    arrays: list[tuple[str, np.ndarray]] = []
    if sampled.any():
        seeds = np.fromiter((r.seed for r in rows), np.uint64, n)
        gen = np.fromiter((r.num_generated for r in rows), np.int64, n)
        lo, hi = noise_keys(seeds, gen)
        for name, members in (("top_k", sampled & (top_k > 0)), ("full", sampled & (top_k <= 0))):
            idx = np.flatnonzero(members)
            if not len(idx):
                continue
            g = GroupPlan(count=len(idx), all_rows=len(idx) == n)
            g.top_p = bool((top_p[idx] < 1.0).any())
            g.min_p = bool((min_p[idx] > 0).any())
            if not g.all_rows:
                arrays.append((f"{name}.rows", idx.astype(np.int32)))
            arrays += [(f"{name}.temperature", _f32(temp[idx])), (f"{name}.lo", lo[idx]), (f"{name}.hi", hi[idx])]
            for j in range(1, window):
                lo_j, hi_j = noise_keys(seeds[idx], gen[idx] + j)
                arrays += [(f"{name}.lo{j}", lo_j), (f"{name}.hi{j}", hi_j)]
            if g.min_p:
                arrays.append((f"{name}.min_p", _f32(min_p[idx])))
            if name == "top_k":
                g.top_k_max = int(top_k[idx].max())
                arrays.append(("top_k.k", top_k[idx]))
                if g.top_p:
                    arrays.append(("top_k.top_p", _f32(top_p[idx])))
            elif g.top_p:
                nucleus = np.flatnonzero(top_p[idx] < 1.0)
                g.num_sort = len(nucleus)
                arrays += [("full.sort", nucleus.astype(np.int32)), ("full.top_p", _f32(top_p[idx][nucleus]))]
            setattr(plan, name, g)
    if len(penalised):
        assert window == 1, "repetition penalties are staged one step at a time"
        if state is None:
            raise ValueError("repetition_penalty needs a SamplingState (the engine's presence table)")
        plan.penalty = state.stage(rows, penalised, penalty[penalised])
    return plan, arrays


# --- device side ----------------------------------------------------------------------------------------------


@dataclass
class GroupInputs:
    """Per-row parameters of one group of sampled rows, on the device."""

    plan: GroupPlan
    rows: Optional[torch.Tensor]  # int64 sampling-row indices; None: rows 0..count-1
    temperature: torch.Tensor  # float32 [R]
    lo: torch.Tensor  # int64 [R, 1]: the noise key's low word (as an unsigned value)
    hi: torch.Tensor  # int64 [R, 1]
    top_k: Optional[torch.Tensor] = None  # int64 [R]
    top_p: Optional[torch.Tensor] = None  # float32: [R] (top-k group) or [num_sort] (rows of ``sort``)
    min_p: Optional[torch.Tensor] = None  # float32 [R]
    sort: Optional[torch.Tensor] = None  # int64: positions in the group of the rows with top_p < 1


@dataclass
class PenaltyInputs:
    rows: Optional[torch.Tensor]  # int64 sampling-row indices; None: rows 0..P-1
    penalty: torch.Tensor  # float32 [P]
    seen: torch.Tensor  # bool [P, V]: token ids in the row's prompt and generated tokens


@dataclass
class SamplingInputs:
    """Everything ``sample`` needs on the device for one step."""

    num_rows: int
    top_k: Optional[GroupInputs] = None
    full: Optional[GroupInputs] = None
    penalty: Optional[PenaltyInputs] = None


def sampling_inputs(plan: SamplingPlan, seg: Callable[[str], torch.Tensor], sub: int = 0) -> Optional[SamplingInputs]:
    """The device view of what ``stage_sampling`` staged; ``seg(name)`` is the step's int32 segment of that name;
    ``sub``: the draw of a decode window (its noise keys). With penalties this also uploads the step's new tokens
    into the presence table (on the current stream)."""
    if plan.greedy:
        return None
    out = SamplingInputs(plan.num_rows)
    for name in ("top_k", "full"):
        g: Optional[GroupPlan] = getattr(plan, name)
        if g is None:
            continue
        f32 = lambda key: seg(f"{name}.{key}").view(torch.float32)  # noqa: E731
        word = lambda key: (seg(f"{name}.{key}{sub or ''}").long() & _M32)[:, None]  # noqa: E731
        gi = GroupInputs(g, None if g.all_rows else seg(f"{name}.rows").long(), f32("temperature"), word("lo"),
                         word("hi"))
        if g.min_p:
            gi.min_p = f32("min_p")
        if name == "top_k":
            gi.top_k = seg("top_k.k").long()
        if g.top_p:
            gi.top_p = f32("top_p")
        if g.num_sort:
            gi.sort = seg("full.sort").long()
        setattr(out, name, gi)
    if plan.penalty is not None:
        out.penalty = plan.penalty.state.apply(plan.penalty, seg)
    return out


# All-greedy steps on CUDA take their argmax from Triton (``sample(out=)``, ``triton_sampling.argmax_into``), which
# writes the int32 tokens where the step keeps them, instead of torch's argmax, a cast and a copy. Off: on the H200
# (session 20) its first kernel, one program per row, took 43 us of a W1 decode forward against torch's 37 us (the
# tokens of the whole W1 run identical); the chunked kernel that replaced it took 47 us against 39 (session 21,
# steady profiled forward; W1 152,376 against 154,081 out tok/s, medians of 2). Session 24's packed-key form (one
# integer max a chunk) times as torch does at 512 rows (38.4 against 38.4 us, 49,152 bf16 logits) and 2x-3x faster at
# 32-64 rows of 128,256 (9.7 against 30.5 us), in CUDA graphs on the H200; end to end equal (W1 157,112 against
# 157,740, W2 54,734 against 54,904 out tok/s, medians of 3). Variant ``ours_async_triton_argmax``.
# Read when an engine is built (its executor passes ``out`` or not).
TRITON_ARGMAX = False


def sample(logits: torch.Tensor, params: Optional[SamplingInputs],
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next tokens (int32 ``[B]``) from logits ``[B, V]``; ``params=None`` means every row is greedy.

    Rows past ``params.num_rows`` (scoring rows) get the argmax. No host synchronization: every shape and branch is
    known on the host. ``out``: an int32 ``[B]`` tensor the tokens are written into (and returned); on CUDA an
    all-greedy step's argmax is written there by one Triton launch (``triton_sampling.argmax_into``).
    """
    if params is None:
        fused = _fused_draws() if logits.is_cuda and out is not None and logits.stride(-1) == 1 else None
        if fused is not None:
            fused.argmax_into(logits, out)
            return out
        tokens = logits.argmax(dim=-1).to(torch.int32)
        return tokens if out is None else out.copy_(tokens)
    tokens = _sample(logits, params)
    return tokens if out is None else out.copy_(tokens)


def _sample(logits: torch.Tensor, params: SamplingInputs) -> torch.Tensor:
    x = logits
    if params.penalty is not None:
        x = _penalised(logits, params.penalty)
    n = params.num_rows
    drawn = sum(g.plan.count for g in (params.top_k, params.full) if g is not None)
    if drawn == n == x.shape[0]:
        out = torch.empty(n, dtype=torch.long, device=x.device)  # every row is drawn: no argmax needed
    else:
        out = x.argmax(dim=-1)
    fused = _fused_draws() if x.is_cuda else None
    for g, draw in ((params.top_k, _draw_top_k), (params.full, _draw_full)):
        if g is None:
            continue
        if fused is not None and g.sort is None:  # the same draws in one Triton kernel per group (3 launches)
            if g.top_k is not None:
                tokens = fused.draw_top_k(x, g.rows, g.temperature, g.top_k, g.top_p, g.min_p, g.lo, g.hi,
                                          g.plan.top_k_max)
            else:
                tokens = fused.draw_full(x, g.rows, g.temperature, g.min_p, g.lo, g.hi)
        else:
            rows = x[: g.plan.count] if g.rows is None else x.index_select(0, g.rows)
            tokens = draw(rows, g)
        if g.rows is None:
            out[: g.plan.count] = tokens
        else:
            out.index_copy_(0, g.rows, tokens)
    return out.to(torch.int32)


def _fused_draws():
    """The Triton draws (``triton_sampling``), or None without Triton."""
    try:
        from . import triton_sampling
    except ImportError:
        return None
    return triton_sampling


def _penalised(logits: torch.Tensor, p: PenaltyInputs) -> torch.Tensor:
    """float32 logits with transformers' repetition penalty on the penalised rows: seen tokens' logits are divided by
    the penalty when positive, multiplied when negative. ``logits`` itself is left as it is (logprobs read it)."""
    x = logits.clone() if logits.dtype == torch.float32 else logits.float()
    count = len(p.penalty)
    rows = x[:count] if p.rows is None else x.index_select(0, p.rows)
    pen = p.penalty[:, None]
    rows = torch.where(p.seen, torch.where(rows < 0, rows * pen, rows / pen), rows)
    if p.rows is None:
        x[:count] = rows
        return x
    return x.index_copy_(0, p.rows, rows)


def _draw_top_k(x: torch.Tensor, g: GroupInputs) -> torch.Tensor:
    """Draw from softmax(x / T) restricted to the top-k set (every token tied with the k-th value included), then the
    top-p nucleus, then min-p, as transformers' warpers do; exact, with noise only for the candidates."""
    R, V = x.shape
    K = min(g.plan.top_k_max, V)
    vals, ids = torch.topk(x, K, dim=-1)  # descending
    kth = vals.gather(1, (g.top_k.clamp(max=K) - 1)[:, None])  # [R, 1] the row's k-th largest logit
    temp = g.temperature[:, None]
    z = vals.float() / temp
    logw = z - z[:, :1]  # log of the unnormalised probabilities (the top candidate's is 0)
    logw_kth = kth.float() / temp - z[:, :1]
    w, w_kth = torch.exp(logw), torch.exp(logw_kth)
    above = vals > kth  # these race one by one; the tokens equal to the k-th value race as one bucket
    ties = x == kth  # [R, V]: transformers keeps every token tied with the k-th value, inside or outside the candidates
    tie_sums = _chunk_sums(ties)
    n_ties = tie_sums.sum(-1, keepdim=True)  # >= 1
    mass_above = torch.where(above, w, 0.0)
    keep, keep_ties = above, torch.ones_like(above[:, :1])
    if g.top_p is not None:
        above_total = mass_above.sum(-1, keepdim=True)
        limit = g.top_p[:, None] * (above_total + n_ties * w_kth)
        # Nucleus: keep a token when the mass strictly above its value is below top_p (of the top-k set's mass); for
        # tied candidates that is the exclusive prefix sum at the first of them.
        desc = -vals.float()
        first = torch.searchsorted(desc, desc)
        strictly_above = (mass_above.cumsum(-1) - mass_above).gather(1, first)
        keep = keep & (strictly_above < limit)
        keep_ties = above_total < limit
    if g.min_p is not None:
        keep = keep & (w >= g.min_p[:, None])
        keep_ties = keep_ties & (w_kth >= g.min_p[:, None])
    # Gumbel-max race over the candidates above the k-th value (noise keyed by vocab id) and the bucket of ties (its
    # log-weight log(n_ties) + logw_kth, noise from lane 0): each wins with probability proportional to its weight.
    # Lanes 1-2 then pick the bucket's member.
    bits = _hash(g.lo, g.hi, torch.cat([ids, _lanes(R, 3, x.device)], 1))
    logw_all = torch.cat([logw, logw_kth + torch.log(n_ties)], 1)
    race = torch.where(torch.cat([keep, keep_ties], 1), logw_all + _gumbel(bits[:, :K + 1]), -torch.inf)
    winner = race.argmax(-1, keepdim=True)
    member = _inverse_cdf(ties, tie_sums, _uniform52(bits[:, K + 1:K + 2], bits[:, K + 2:]))
    return torch.where(winner[:, 0] == K, member, ids.gather(1, winner.clamp(max=K - 1))[:, 0])


def _draw_full(x: torch.Tensor, g: GroupInputs) -> torch.Tensor:
    """Draw from softmax(x / T) over the whole vocabulary, restricted by top-p (nucleus found by sorting only the rows
    that ask for it) and min-p; one inverse-CDF draw per row, exact."""
    probs = torch.softmax(x / g.temperature[:, None], dim=-1)  # float32 (the division promotes)
    threshold = None
    if g.sort is not None:
        # Sorting the logits orders the probabilities the same way, on 16-bit keys when the model returns bf16/fp16.
        order = x.index_select(0, g.sort).sort(dim=-1, descending=True).indices
        sorted_p = probs.index_select(0, g.sort).gather(1, order)
        cum = sorted_p.cumsum(-1)
        before = cum - sorted_p
        # transformers keeps a token when the mass before it (in descending order) is below top_p of the total
        n_keep = (before < g.top_p[:, None] * cum[:, -1:]).sum(-1, keepdim=True)
        threshold = torch.zeros_like(probs[:, 0]).index_copy_(0, g.sort, sorted_p.gather(1, n_keep - 1)[:, 0])
    if g.min_p is not None:
        floor = g.min_p * probs.amax(-1)
        threshold = floor if threshold is None else torch.maximum(threshold, floor)
    w = probs if threshold is None else torch.where(probs >= threshold[:, None], probs, 0.0)
    bits = _hash(g.lo, g.hi, _lanes(len(w), 2, w.device))
    return _inverse_cdf(w, _chunk_sums(w), _uniform52(bits[:, :1], bits[:, 1:]))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the model's distribution: of the sampled tokens ``[B]``, and the top-k ``[B, k]`` (ids, values)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens.long()[:, None])[:, 0]
    if k > 0:
        vals, ids = logp.topk(k, dim=-1)
    else:
        vals = logp.new_zeros(logp.shape[0], 0)
        ids = torch.zeros(logp.shape[0], 0, dtype=torch.long, device=logp.device)
    return chosen, ids.to(torch.int32), vals

