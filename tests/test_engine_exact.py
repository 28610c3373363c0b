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


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_head_major_kv_cache_gives_generates_tokens_under_chunking_preemption_and_prefix_hits(arch, monkeypatch):
    """``kv_cache.KV_LAYOUT = "head"``: every block stored head-major and handed out as a strided view. Greedy tokens
    equal ``generate``'s with chunked prefill and preemption, and again with the prompts' prefixes served from the
    cache; the caches really are head-major views."""
    import async_batching.kv_cache as kv_cache

    monkeypatch.setattr(kv_cache, "KV_LAYOUT", "head")
    model, prompts, refs = _model_and_refs(arch)
    b = ContinuousBatcher(model, mode="async", max_num_seqs=4, max_batch_tokens=48, block_size=8, num_blocks=40)
    cache = next(iter(b.runner.cache.k.values()))
    assert not cache.is_contiguous() and cache.stride(1) == cache.shape[-1]  # slots of one head adjacent
    sp = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert [r.token_ids for r in b.generate(prompts, sp)] == refs
    assert b.stats["preemptions"] > 0
    again = b.generate(prompts[:3], sp)
    assert [r.token_ids for r in again] == refs[:3] and b.stats["cached_tokens"] > 0
    b.close()


def test_an_unknown_kv_layout_is_refused_by_name(monkeypatch):
    import async_batching.kv_cache as kv_cache

    monkeypatch.setattr(kv_cache, "KV_LAYOUT", "blocked")
    with pytest.raises(ValueError, match="KV_LAYOUT='blocked': expected one of"):
        ContinuousBatcher(tiny_model("llama"), max_num_seqs=2, num_blocks=8)


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
