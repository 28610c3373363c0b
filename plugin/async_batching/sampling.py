"""Token sampling on the model's device: greedy, temperature, top-k, top-p, with per-request reproducible noise.

The noise of request r at its g-th generated token is a hash of (seed_r, g, vocab index), so a seeded request draws the
same tokens whatever the batch composition, the mode (sync/async) or a preemption and recompute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


def stream_seed(*parts: int) -> int:
    """A 64-bit seed derived from integers (a splitmix64 chain): distinct inputs give independent streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _M64)) & _M64
        h = (h + 0x9E3779B97F4A7C15) & _M64
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


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32) on int64 tensors holding values < 2**32; products stay < 2**63."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, gen_idx: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) floats ``[B, vocab]`` that depend only on (seed, generated-token index, vocab index)."""
    row = _mix32((seeds.long() & _M32) ^ _mix32(gen_idx.long() & _M32))
    col = torch.arange(vocab, device=seeds.device, dtype=torch.long)
    x = _mix32((row[:, None] * 0x9E3779B1 + col[None, :]) & _M32)
    return ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))


@dataclass
class SamplingInputs:
    """Per-row sampling parameters of one step, already on the device."""

    temperature: torch.Tensor  # float32 [B], 0 = greedy
    top_k: torch.Tensor  # int32 [B], 0 = off
    top_p: torch.Tensor  # float32 [B], 1 = off
    seeds: torch.Tensor  # int32 [B]
    gen_idx: torch.Tensor  # int32 [B]: index of the token being sampled among the request's generated tokens
    use_top_k_p: bool


@dataclass
class SamplingPlan:
    """Host-side facts of one step's sampling rows (decided while staging)."""

    greedy: bool = True
    use_top_k_p: bool = False


def stage_sampling(rows: Sequence) -> tuple[SamplingPlan, list[tuple[str, np.ndarray]]]:
    """The int32 arrays one step stages for its sampling rows (requests, in row order); none when all are greedy."""
    sp = [r.sampling for r in rows]
    plan = SamplingPlan(greedy=all(p.temperature == 0 for p in sp))
    if plan.greedy:
        return plan, []
    plan.use_top_k_p = any(p.top_k > 0 or p.top_p < 1.0 for p in sp)
    n = len(rows)
    seeds = np.fromiter(((r.seed ^ (r.seed >> 32)) & _M32 for r in rows), np.int64, n).astype(np.int32)  # bits only
    gen = np.fromiter((r.num_generated for r in rows), np.int32, n)
    top_k = np.fromiter((p.top_k for p in sp), np.int32, n)
    temp = np.fromiter((p.temperature for p in sp), np.float32, n).view(np.int32)
    top_p = np.fromiter((p.top_p for p in sp), np.float32, n).view(np.int32)
    return plan, [("seeds", seeds), ("gen_idx", gen), ("top_k", top_k), ("temperature", temp), ("top_p", top_p)]


def sampling_inputs(plan: SamplingPlan, seg: Callable[[str], torch.Tensor]) -> Optional[SamplingInputs]:
    """The device view of what ``stage_sampling`` staged; ``seg(name)`` is the step's int32 segment of that name."""
    if plan.greedy:
        return None
    return SamplingInputs(
        temperature=seg("temperature").view(torch.float32),
        top_k=seg("top_k"),
        top_p=seg("top_p").view(torch.float32),
        seeds=seg("seeds"),
        gen_idx=seg("gen_idx"),
        use_top_k_p=plan.use_top_k_p,
    )


def sample(logits: torch.Tensor, params: Optional[SamplingInputs]) -> torch.Tensor:
    """Next tokens (int32 ``[B]``) from float logits ``[B, V]``; ``params=None`` means every row is greedy."""
    greedy = logits.argmax(dim=-1)
    if params is None:
        return greedy.to(torch.int32)
    temp = params.temperature
    x = logits.float() / torch.where(temp > 0, temp, torch.ones_like(temp))[:, None]
    if params.use_top_k_p:
        x = _apply_top_k_top_p(x, params.top_k, params.top_p)
    probs = torch.softmax(x, dim=-1)
    noise = uniform_noise(params.seeds, params.gen_idx, logits.shape[-1])
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
    drawn = (probs / (-torch.log(noise))).argmax(dim=-1)
    return torch.where(temp > 0, drawn, greedy).to(torch.int32)


def _apply_top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_x, order = x.sort(dim=-1, descending=True)
    vocab = x.shape[-1]
    ranks = torch.arange(vocab, device=x.device)[None, :]
    k = torch.where(top_k > 0, top_k.long(), torch.full_like(top_k.long(), vocab))
    cut = ranks >= k[:, None]
    probs = torch.softmax(sorted_x.masked_fill(cut, float("-inf")), dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    cut = cut | (mass_before >= top_p[:, None].float())
    sorted_x = sorted_x.masked_fill(cut, float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, sorted_x)


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


SAMPLING_INTS_PER_ROW = 8  # upper bound of the int32 words ``stage_sampling`` stages per row (staging is sized by it)
