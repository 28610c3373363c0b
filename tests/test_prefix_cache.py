"""Automatic prefix caching: greedy outputs stay equal to `model.generate` with shared prefixes, under chunked prefill,
eviction and preemption, in both modes; the cache's block counts always add up and nothing leaks."""

import random

import pytest

from async_batching import ContinuousBatcher, SamplingParams
from async_batching.kv_cache import BlockAllocator
from async_batching.models import TINY_CONFIGS, tiny_model
from engine_helpers import reference

NEW_TOKENS = 8
_refs: dict = {}


def shared_prefix_prompts(seed: int, block_size: int = 8) -> list[list[int]]:
    """Prompts sharing prefixes that end on a block boundary and mid-block, identical prompts, and a prompt that is a
    prefix of another."""
    rng = random.Random(seed)
    words = lambda n: [rng.randrange(3, 384) for _ in range(n)]  # noqa: E731
    boundary, mid = words(4 * block_size), words(3 * block_size + 5)
    prompts = [boundary + words(rng.randint(1, 20)) for _ in range(3)]
    prompts += [mid + words(rng.randint(1, 20)) for _ in range(3)]
    prompts += [list(prompts[0]), list(prompts[0])]  # identical prompts
    prompts += [mid, mid + words(2 * block_size)]  # a prompt that is a prefix of another
    prompts += [boundary[:block_size]]  # one full block only
    return prompts


def _model_and_refs(arch):
    if arch not in _refs:
        model = tiny_model(arch)
        prompts = shared_prefix_prompts(sorted(TINY_CONFIGS).index(arch))
        _refs[arch] = (model, prompts, [reference(model, p, NEW_TOKENS) for p in prompts])
    return _refs[arch]


def counts_add_up(b: ContinuousBatcher) -> bool:
    a = b.scheduler.allocator
    return a.num_free_uncached + a.num_cached + a.num_used == a.num_usable


def run_checked(b: ContinuousBatcher, prompts, sampling) -> list:
    """Submit, then step until done, checking the allocator's counts after every step."""
    ids = [b.add_request(p, sampling) for p in prompts]
    results = {}
    while b.has_unfinished():
        results.update({r.index: r for r in b.step()})
        assert counts_add_up(b)
    return [results[i] for i in ids]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_greedy_with_shared_prefixes_matches_generate(arch, mode):
    model, prompts, refs = _model_and_refs(arch)
    # A 40-token budget splits the long shared prompts over steps; 12 blocks of 8 force eviction and preemption.
    b = ContinuousBatcher(model, mode=mode, max_num_seqs=4, max_batch_tokens=40, block_size=8, num_blocks=12)
    results = run_checked(b, prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    for i, (r, ref) in enumerate(zip(results, refs)):
        assert r.token_ids == ref, f"{arch} {mode} prompt {i} ({len(prompts[i])} tokens)"
    stats = b.stats
    assert stats["cached_tokens"] > 0, "shared prefixes were meant to hit the cache"
    assert stats["preemptions"] > 0, "the cache was meant to force preemption"
    assert b.all_blocks_free()


def test_cached_prefix_is_not_computed_again():
    model, prompts, refs = _model_and_refs("llama")
    prefix = prompts[0][:32]
    group = [prefix + [5 + i, 6 + i, 7 + i] for i in range(4)]
    for mode in ("sync", "async"):
        b = ContinuousBatcher(model, mode=mode, block_size=8)
        out = b.generate(group, SamplingParams(max_new_tokens=4, ignore_eos=True))
        assert [r.token_ids for r in out] == [reference(model, p, 4) for p in group]
        # The first prompt computes all 35 tokens; the other three reuse its 4 full blocks and compute 3 tokens each.
        assert b.stats["prefill_tokens"] == 35 + 3 * 3
        assert b.stats["cached_tokens"] == 3 * 32
        # Caching off computes every prompt token.
        off = ContinuousBatcher(model, mode=mode, block_size=8, prefix_caching=False)
        assert [r.token_ids for r in off.generate(group, SamplingParams(max_new_tokens=4, ignore_eos=True))] == \
            [r.token_ids for r in out]
        assert off.stats["prefill_tokens"] == 4 * 35 and off.stats["cached_tokens"] == 0


def test_later_call_reuses_blocks_cached_by_an_earlier_one():
    model, prompts, refs = _model_and_refs("qwen2")
    b = ContinuousBatcher(model, block_size=8)
    sp = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert b.generate([prompts[0]], sp)[0].token_ids == refs[0]
    assert b.all_blocks_free() and b.scheduler.allocator.num_cached > 0  # kept, not held
    before = b.stats["cached_tokens"]
    assert b.generate([prompts[0]], sp)[0].token_ids == refs[0]
    assert b.stats["cached_tokens"] - before == (len(prompts[0]) - 1) // 8 * 8


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_seeded_sampling_is_the_same_with_caching_on_and_off(mode):
    model, prompts, _ = _model_and_refs("llama")
    sp = [SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=50 + i, ignore_eos=True)
          for i in range(len(prompts))]
    on = ContinuousBatcher(model, mode=mode, block_size=8, num_blocks=40, max_num_seqs=4).generate(prompts, sp)
    off = ContinuousBatcher(model, mode=mode, block_size=8, prefix_caching=False).generate(prompts, sp)
    assert [r.token_ids for r in on] == [r.token_ids for r in off]


def test_allocator_evicts_least_recently_used_cached_blocks_and_counts_add_up():
    a = BlockAllocator(6)  # 5 usable
    blocks = a.allocate(3)
    for b, h in zip(blocks, (b"a", b"b", b"c")):
        assert a.register(b, h)
    a.free(list(reversed(blocks)))  # tail first: "c" is the least recently used
    assert (a.num_free_uncached, a.num_cached, a.num_used) == (2, 3, 0)
    assert a.lookup([b"a", b"b", b"x"]) == blocks[:2]  # a hit takes the blocks back
    assert (a.num_free_uncached, a.num_cached, a.num_used) == (2, 1, 2)
    fresh = a.allocate(3)  # two free ones, then the cached "c" is evicted
    assert blocks[2] in fresh and a.lookup([b"a", b"b", b"c"]) == blocks[:2]
    assert a.num_free_uncached + a.num_cached + a.num_used == a.num_usable
    a.free(blocks[:2] + blocks[:2] + fresh)
    assert a.all_free() and a.num_cached == 2


def test_rolled_back_blocks_leave_the_index():
    a = BlockAllocator(4)
    b = a.allocate(1)[0]
    a.register(b, b"h")
    a.unregister(b)
    a.free([b])
    assert a.lookup([b"h"]) == [] and a.num_cached == 0 and a.num_free_uncached == 3


def test_prefix_hits_past_the_steps_table_budget_are_recomputed(monkeypatch):
    """A step writes at most HIT_TABLE_ENTRIES block-table entries for prefix hits (its staging is sized for that):
    hits past it are recomputed, and outputs stay exact."""
    from async_batching import scheduler

    monkeypatch.setattr(scheduler, "HIT_TABLE_ENTRIES", 3)
    model, prompts, _ = _model_and_refs("llama")
    prefix = prompts[0][:32]  # 4 full blocks of 8
    group = [prefix + [5 + i, 6 + i] for i in range(4)]
    b = ContinuousBatcher(model, block_size=8)
    out = b.generate(group, SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert [r.token_ids for r in out] == [reference(model, p, 4) for p in group]
    # All four are admitted in one step: the second takes 3 of its 4 cached blocks, the others none.
    assert b.stats["cached_tokens"] == 3 * 8


def test_reset_prefix_cache_forgets_every_cached_block():
    model, prompts, refs = _model_and_refs("llama")
    b = ContinuousBatcher(model, block_size=8)
    sp = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    b.generate(prompts[:1], sp)
    cached = b.scheduler.allocator.num_cached
    assert cached > 0 and b.reset_prefix_cache() == cached
    assert b.scheduler.allocator.num_cached == 0 and counts_add_up(b)
    before = b.stats["cached_tokens"]
    assert b.generate(prompts[:1], sp)[0].token_ids == refs[0]
    assert b.stats["cached_tokens"] == before, "nothing may be served from a reset cache"
