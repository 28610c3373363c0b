"""Logprobs against a plain forward's ``log_softmax``: k=0, mixed k in one step, both modes, sampled tokens,
and requests that were preempted and recomputed."""

from __future__ import annotations

import pytest
import torch

from async_batching import ContinuousBatcher, SamplingParams
from async_batching.models import tiny_model
from engine_helpers import mixed_prompts

TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@torch.no_grad()
def forward_logprobs(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """Row j: the model's log-distribution over the token at output position j (one forward of prompt + output)."""
    logits = model(torch.tensor([prompt + output])).logits[0].float()
    return torch.log_softmax(logits, -1)[len(prompt) - 1: len(prompt) - 1 + len(output)]


def assert_logprobs_match(model, prompt, result, k):
    if k is None:
        assert result.logprobs is None and result.top_logprobs is None
        return
    rows = forward_logprobs(model, prompt, result.token_ids)
    assert len(result.logprobs) == len(result.token_ids)
    for j, token in enumerate(result.token_ids):
        assert abs(result.logprobs[j] - rows[j, token].item()) < TOL, (j, token)
    if k == 0:
        assert result.top_logprobs is None
        return
    assert len(result.top_logprobs) == len(result.token_ids)
    for j, top in enumerate(result.top_logprobs):
        values, ids = rows[j].topk(k)
        assert list(top) == ids.tolist(), j  # in descending order, exactly k of them
        assert all(abs(top[i] - v) < TOL for i, v in zip(ids.tolist(), values.tolist())), j
    assert result.samples[0].cumulative_logprob == pytest.approx(sum(result.logprobs), abs=1e-6)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_mixed_k_in_one_step_each_get_their_own_width(model, mode):
    """Requests with logprobs None, 0, 1, 3 and 7 run in the same steps; each gets exactly what it asked for."""
    prompts = mixed_prompts(5, lo=3, hi=30, seed=1)
    ks = [None, 0, 1, 3, 7]
    b = ContinuousBatcher(model, mode=mode, max_num_seqs=8)
    params = [SamplingParams(max_new_tokens=6, logprobs=k, ignore_eos=True) for k in ks]
    results = b.generate(prompts, params)
    assert b.stats["steps"] == 6  # one prefill step, then the five requests decode together
    for prompt, result, k in zip(prompts, results, ks):
        assert_logprobs_match(model, prompt, result, k)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_k0_gives_the_chosen_tokens_logprob_only_also_for_sampled_tokens(model, mode):
    prompts = mixed_prompts(3, lo=4, hi=20, seed=2)
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, logprobs=0, ignore_eos=True)
    results = ContinuousBatcher(model, mode=mode).generate(prompts, sp)
    greedy = [forward_logprobs(model, p, r.token_ids).argmax(-1).tolist() for p, r in zip(prompts, results)]
    assert any(g != r.token_ids for g, r in zip(greedy, results))  # some drawn tokens are not the argmax
    for prompt, result in zip(prompts, results):
        assert_logprobs_match(model, prompt, result, 0)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_logprobs_of_preempted_requests_match_and_are_not_duplicated(model, mode):
    prompts = mixed_prompts(12, hi=120, seed=9)
    ks = [0, 2, None, 5, 1, 3] * 2
    params = [SamplingParams(max_new_tokens=16, logprobs=k, ignore_eos=True) for k in ks]
    b = ContinuousBatcher(model, mode=mode, max_num_seqs=12, block_size=4, num_blocks=40)  # one long request fits
    results = b.generate(prompts, params)
    assert b.stats["preemptions"] >= 3 and sum(r.num_preemptions for r in results) == b.stats["preemptions"]
    for prompt, result, k in zip(prompts, results, ks):
        assert len(result.token_ids) == 16
        assert_logprobs_match(model, prompt, result, k)
