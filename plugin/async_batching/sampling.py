"""Token sampling on the model's device: greedy, temperature, top-k, top-p, with per-request reproducible noise.

The noise of request r at its g-th generated token is a hash of (seed_r, g, vocab index), so a seeded request draws the
same tokens whatever the batch composition, the mode (sync/async) or a preemption and recompute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

_M32 = 0xFFFFFFFF


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
