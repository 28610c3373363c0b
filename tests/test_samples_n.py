"""SamplingParams(n=k): k samples of one prompt, one result per prompt; the prompt is prefilled once."""

import pytest

from async_batching import ContinuousBatcher, SamplingParams
from async_batching.models import tiny_model
from engine_helpers import mixed_prompts, reference


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def prompts():
    return mixed_prompts(4, lo=20, hi=70, seed=11)


def sampled(n, seed=None, **params):
    return SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, n=n, seed=seed, ignore_eos=True, **params)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_greedy_samples_all_equal_generate(model, prompts, mode):
    out = ContinuousBatcher(model, mode=mode).generate(prompts, SamplingParams(max_new_tokens=8, n=3, ignore_eos=True))
    for p, r in zip(prompts, out):
        ref = reference(model, p, 8)
        assert len(r.samples) == 3 and all(s.token_ids == ref for s in r.samples)
        assert r.token_ids == ref and r.finish_reason == "length"


def test_seeded_samples_are_reproducible_and_sample_zero_is_the_plain_seeded_request(model, prompts):
    a = ContinuousBatcher(model, mode="sync").generate(prompts, sampled(4, seed=9))
    b = ContinuousBatcher(model, mode="async", max_num_seqs=3).generate(prompts, sampled(4, seed=9))
    assert [[s.token_ids for s in r.samples] for r in a] == [[s.token_ids for s in r.samples] for r in b]
    single = ContinuousBatcher(model).generate(prompts, sampled(1, seed=9))
    assert [r.samples[0].token_ids for r in a] == [r.token_ids for r in single]
    for r in a:
        assert len({tuple(s.token_ids) for s in r.samples}) > 1, "samples of one prompt must differ"
    other = ContinuousBatcher(model).generate(prompts, sampled(4, seed=10))
    assert [[s.token_ids for s in r.samples] for r in other] != [[s.token_ids for s in r.samples] for r in a]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_prompt_is_prefilled_once_for_all_samples(model, prefix_caching):
    prompt = mixed_prompts(1, lo=100, hi=100, seed=5)[0]
    b = ContinuousBatcher(model, block_size=16, prefix_caching=prefix_caching)
    r = b.generate([prompt], sampled(64))[0]
    assert len(r.samples) == 64
    # Sample 0 computes the 100 prompt tokens; each other sample shares its 6 full blocks and computes the last 4.
    assert b.stats["prefill_tokens"] == 100 + 63 * 4
    assert len({tuple(s.token_ids) for s in r.samples}) > 32, "unseeded samples must be independent"
    assert b.all_blocks_free()


def test_samples_survive_preemption_unchanged(model, prompts):
    want = ContinuousBatcher(model).generate(prompts, sampled(3, seed=4))
    tight = ContinuousBatcher(model, block_size=8, num_blocks=20, max_batch_tokens=32)
    got = tight.generate(prompts, sampled(3, seed=4))
    assert tight.stats["preemptions"] > 0
    assert [[s.token_ids for s in r.samples] for r in got] == [[s.token_ids for s in r.samples] for r in want]
    assert tight.all_blocks_free()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_cancel_ends_every_sample_and_frees_blocks(model, prompts, mode):
    b = ContinuousBatcher(model, mode=mode)
    rid = b.add_request(prompts[0], SamplingParams(max_new_tokens=30, n=4, ignore_eos=True))
    other = b.add_request(prompts[1], SamplingParams(max_new_tokens=5, ignore_eos=True))
    results = {}
    for _ in range(4):
        results.update({r.index: r for r in b.step()})
    b.cancel(rid)
    while b.has_unfinished():
        results.update({r.index: r for r in b.step()})
    r = results[rid]
    assert len(r.samples) == 4 and all(s.finish_reason == "cancelled" and len(s.token_ids) < 30 for s in r.samples)
    assert results[other].token_ids == reference(model, prompts[1], 5)
    assert b.all_blocks_free()


def test_stream_yields_one_result_per_prompt_with_all_samples(model, prompts):
    got = list(ContinuousBatcher(model).stream(prompts, sampled(2)))
    assert sorted(r.index for r in got) == list(range(len(prompts)))
    assert all(len(r.samples) == 2 for r in got)


def test_cumulative_logprob_is_the_sum_of_sampled_logprobs(model, prompts):
    r = ContinuousBatcher(model).generate(prompts[:1], sampled(3, logprobs=0))[0]
    for s in r.samples:
        assert len(s.logprobs) == 10 and s.cumulative_logprob == pytest.approx(sum(s.logprobs))
