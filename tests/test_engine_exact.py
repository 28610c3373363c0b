"""Greedy outputs equal `model.generate` token for token, with chunked prefill, preemption and both modes at once."""

import pytest
import torch

from async_batching import ContinuousBatcher, SamplingParams
from async_batching.models import TINY_CONFIGS, tiny_model
from engine_helpers import mixed_prompts, reference

NEW_TOKENS = 12
_refs: dict = {}


def _model_and_refs(arch):
    if arch not in _refs:
        model = tiny_model(arch)
        prompts = mixed_prompts(9, seed=sorted(TINY_CONFIGS).index(arch))
        _refs[arch] = (model, prompts, [reference(model, p, NEW_TOKENS) for p in prompts])
    return _refs[arch]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_greedy_matches_generate_under_chunking_and_preemption(arch, mode):
    model, prompts, refs = _model_and_refs(arch)
    # 9 prompts > 4 seqs; 48-token budget forces chunked prefill; 40 blocks of 8 cannot hold 4 long requests.
    b = ContinuousBatcher(model, mode=mode, max_num_seqs=4, max_batch_tokens=48, block_size=8, num_blocks=40)
    results = b.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert [r.index for r in results] == list(range(len(prompts)))
    for i, (r, ref) in enumerate(zip(results, refs)):
        assert r.token_ids == ref, f"{arch} {mode} request {i} (prompt {len(prompts[i])} tokens)"
        assert r.finish_reason == "length" and r.prompt_len == len(prompts[i])
    stats = b.stats
    assert stats["preemptions"] > 0, "the cache was meant to force preemption"
    assert stats["steps"] > len(prompts)
    assert b.all_blocks_free()


@pytest.mark.parametrize("policy", ["prefill_first", "shortest_first"])
def test_other_scheduler_policies_are_exact(policy):
    model, prompts, refs = _model_and_refs("llama")
    b = ContinuousBatcher(model, scheduler=policy, max_num_seqs=3, max_batch_tokens=40, block_size=8, num_blocks=60)
    results = b.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert [r.token_ids for r in results] == refs
    assert b.all_blocks_free()


def test_without_chunked_prefill_whole_prompts_are_scheduled():
    model, prompts, refs = _model_and_refs("qwen2")
    b = ContinuousBatcher(model, chunked_prefill=False, max_num_seqs=4, max_batch_tokens=256, block_size=16)
    results = b.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert [r.token_ids for r in results] == refs


def test_bf16_on_cpu_runs_and_mostly_agrees():
    model = tiny_model("llama", dtype=torch.bfloat16)
    prompts = mixed_prompts(4, hi=50)
    b = ContinuousBatcher(model, max_num_seqs=4, max_batch_tokens=64)
    results = b.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert all(len(r.token_ids) == 6 for r in results)
    first = [reference(model, p, 1)[0] for p in prompts]
    assert sum(r.token_ids[0] == f for r, f in zip(results, first)) >= 3
