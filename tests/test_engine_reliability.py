"""Memory pressure, interruption, abort and a property test: every run returns one result per request or a clear error."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from async_batching import ContinuousBatcher, SamplingParams
from async_batching.models import tiny_model
from engine_helpers import mixed_prompts, reference

MODEL = tiny_model("qwen2", num_hidden_layers=1)
_REFS: dict = {}


def ref(prompt, n):
    key = (tuple(prompt), n)
    if key not in _REFS:
        _REFS[key] = reference(MODEL, prompt, n)
    return _REFS[key]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_cache_far_too_small_completes_through_preemption_identically(mode):
    prompts = mixed_prompts(12, hi=120, seed=9)
    sp = SamplingParams(max_new_tokens=20, ignore_eos=True)
    big = ContinuousBatcher(MODEL, mode=mode, max_num_seqs=12).generate(prompts, sp)
    small = ContinuousBatcher(MODEL, mode=mode, max_num_seqs=12, block_size=4, num_blocks=40)  # one long request fits
    out = small.generate(prompts, sp)
    assert [r.token_ids for r in out] == [r.token_ids for r in big]
    assert small.stats["preemptions"] >= 5 and small.all_blocks_free()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_interrupted_stream_frees_everything_and_batcher_still_works(mode):
    prompts = mixed_prompts(8, hi=60, seed=4)
    sp = SamplingParams(max_new_tokens=15, ignore_eos=True)
    b = ContinuousBatcher(MODEL, mode=mode, max_num_seqs=3)
    got = []
    with pytest.raises(KeyboardInterrupt):
        for r in b.stream(prompts, sp):
            got.append(r)
            if len(got) == 2:
                raise KeyboardInterrupt
    assert b.num_unfinished == 0 and b.executor.step_in_flight is None and b.all_blocks_free()
    assert all(r.token_ids == ref(prompts[r.index], 15) for r in got)
    again = b.generate(prompts[:3], sp)
    assert [r.token_ids for r in again] == [ref(p, 15) for p in prompts[:3]]


def test_abort_returns_partial_results_and_close_is_clean():
    b = ContinuousBatcher(MODEL, mode="async")
    ids = [b.add_request(p, SamplingParams(max_new_tokens=30, ignore_eos=True)) for p in mixed_prompts(4, hi=40)]
    for _ in range(5):
        b.step()
    res = {r.index: r for r in b.abort()}
    assert sorted(res) == ids and all(r.finish_reason == "cancelled" for r in res.values())
    assert all(0 < len(r.token_ids) < 30 for r in res.values())
    assert b.all_blocks_free()
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.add_request([5, 6])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=90), min_size=1, max_size=7),
    shared=st.integers(min_value=0, max_value=40),
    samples=st.integers(min_value=1, max_value=3),
    new=st.integers(min_value=0, max_value=12),
    block_size=st.sampled_from([2, 8, 16]),
    num_blocks=st.integers(min_value=2, max_value=80),
    max_batch_tokens=st.integers(min_value=1, max_value=128),
    max_num_seqs=st.integers(min_value=1, max_value=6),
    mode=st.sampled_from(["sync", "async"]),
    policy=st.sampled_from(["decode_first", "prefill_first", "shortest_first"]),
    temperature=st.sampled_from([0.0, 0.7]),
    prefix_caching=st.booleans(),
    decode_window=st.sampled_from([1, 1, 3, 8]),
)
def test_property_every_run_returns_all_results_or_a_clear_error(
    lengths, shared, samples, new, block_size, num_blocks, max_batch_tokens, max_num_seqs, mode, policy, temperature,
    prefix_caching, decode_window,
):
    """Random prompts sharing a prefix of random length (prefix-cache hits ending mid-block and on boundaries), n
    samples each, random cache, budgets, policies, modes and decode windows: all results in order, greedy ones exact,
    or a clear error."""
    prefix = [(11 * j) % 380 + 3 for j in range(shared)]
    prompts = [prefix + [(7 * i + 3 * j) % 380 + 3 for j in range(n)] for i, n in enumerate(lengths)]
    sp = SamplingParams(max_new_tokens=new, temperature=temperature, seed=1, ignore_eos=True, n=samples)
    b = ContinuousBatcher(MODEL, mode=mode, scheduler=policy, block_size=block_size, num_blocks=num_blocks,
                          max_batch_tokens=max_batch_tokens, max_num_seqs=max_num_seqs, prefix_caching=prefix_caching,
                          decode_window=decode_window)
    usable = num_blocks - 1
    bad = [i for i, p in enumerate(prompts) if not p or new == 0 or -(-(len(p) + new) // block_size) > usable]
    if bad:
        with pytest.raises(ValueError, match=rf"request {bad[0]}: "):
            b.generate(prompts, sp)
        return
    out = b.generate(prompts, sp)
    assert [r.index for r in out] == list(range(len(prompts)))
    assert all(len(r.samples) == samples and all(len(s.token_ids) == new for s in r.samples) for r in out)
    if temperature == 0:
        assert [[s.token_ids for s in r.samples] for r in out] == [[ref(p, new)] * samples for p in prompts]
    assert b.all_blocks_free()
    a = b.scheduler.allocator
    assert a.num_free_uncached + a.num_cached + a.num_used == a.num_usable


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_out_of_memory_in_a_step_lowers_the_budget_and_recomputes(mode, monkeypatch):
    prompts = mixed_prompts(8, hi=100, seed=12)
    sp = SamplingParams(max_new_tokens=10, ignore_eos=True)
    b = ContinuousBatcher(MODEL, mode=mode, max_batch_tokens=256)
    real = b.runner.forward
    failures = []

    def flaky(buf, lay):
        if lay.num_tokens > 128:  # a step this large "does not fit": fail it, as CUDA's allocator would
            failures.append(lay.num_tokens)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(buf, lay)

    monkeypatch.setattr(b.runner, "forward", flaky)
    out = b.generate(prompts, sp)
    assert [r.token_ids for r in out] == [ref(p, 10) for p in prompts]
    assert failures and b.stats["oom_recoveries"] == 1 and b.scheduler.max_batch_tokens == 128
    assert b.all_blocks_free()


def test_out_of_memory_below_the_smallest_budget_is_raised(monkeypatch):
    b = ContinuousBatcher(MODEL, max_batch_tokens=16)

    def broken(buf, lay):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(b.runner, "forward", broken)
    with pytest.raises(torch.OutOfMemoryError):
        b.generate([[5, 6, 7]], SamplingParams(max_new_tokens=2))
