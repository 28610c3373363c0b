"""batcher.score(pairs): log-likelihoods of continuations equal a plain forward's log_softmax, through the same
scheduler, cache and executor as generation."""

import random

import pytest
import torch

from async_batching import ContinuousBatcher, SamplingParams
from async_batching import model_runner
from async_batching.models import tiny_model
from engine_helpers import reference, word_tokenizer


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def pairs_of(seed: int, n: int = 10) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, 384) for _ in range(rng.randint(1, 90))],
             [rng.randrange(3, 384) for _ in range(rng.randint(1, 12))]) for _ in range(n)]


@torch.no_grad()
def oracle(model, context: list[int], continuation: list[int]) -> tuple[list[float], bool]:
    """Per-token log-probabilities of the continuation from one plain forward, and whether all were the argmax."""
    if not context:
        context, continuation = continuation[:1], continuation[1:]
    ids = torch.tensor([context + continuation])
    logits = model(ids).logits[0, len(context) - 1:-1].float()
    logp = torch.log_softmax(logits, -1)
    target = torch.tensor(continuation)
    return logp.gather(1, target[:, None])[:, 0].tolist(), bool((logits.argmax(-1) == target).all())


def assert_matches(model, pairs, results):
    for i, ((ctx, cont), r) in enumerate(zip(pairs, results)):
        want, greedy = oracle(model, ctx, cont)
        assert r.ok
        assert len(r.token_logprobs) == len(want)
        assert max(abs(a - b) for a, b in zip(r.token_logprobs, want)) < 1e-5, f"pair {i}"
        assert r.logprob == pytest.approx(sum(want), abs=1e-4)
        assert r.is_greedy == greedy


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_scores_equal_a_plain_forward_under_chunking_and_preemption(model, mode):
    pairs = pairs_of(1, 12)
    # 24-token steps split contexts and continuations; three long generations growing in 16 blocks of 8 preempt
    # the newest requests, the scoring ones, which then recompute positions they had already scored.
    b = ContinuousBatcher(model, mode=mode, max_batch_tokens=24, max_num_seqs=4, block_size=8, num_blocks=16)
    for i in range(3):
        b.add_request([7 + i] * 20, SamplingParams(max_new_tokens=70, ignore_eos=True))
    ids = [b.add_score(c, t) for c, t in pairs]
    done = {r.index: r for r in b.drain()}
    results = [done[i] for i in ids]
    assert_matches(model, pairs, results)
    assert sum(r.num_preemptions for r in results) > 0, "scoring requests were meant to be preempted"
    assert b.all_blocks_free()
    in_order = ContinuousBatcher(model, mode=mode).score(pairs)
    assert [r.index for r in in_order] == list(range(len(pairs)))
    for a, b in zip(in_order, results):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-5)


def test_greedy_continuation_is_reported_greedy(model):
    ctx = [7, 8, 9, 10, 11]
    cont = reference(model, ctx, 5)
    r = ContinuousBatcher(model).score([(ctx, cont), (ctx, cont[:-1] + [(cont[-1] + 1) % 384])])
    assert r[0].is_greedy and not r[1].is_greedy
    assert_matches(model, [(ctx, cont), (ctx, cont[:-1] + [(cont[-1] + 1) % 384])], r)


def test_empty_or_one_token_context_scores_every_token_after_the_first(model):
    seq = [5, 17, 99, 3, 250, 41, 8]
    b = ContinuousBatcher(model)
    empty, one = b.score([([], seq), (seq[:1], seq[1:])])
    assert empty.token_logprobs == pytest.approx(one.token_logprobs, abs=1e-6) and len(one.token_logprobs) == 6
    assert_matches(model, [([], seq)], [empty])


def test_logits_are_kept_in_bounded_chunks(model, monkeypatch):
    # Room for 5 float32 rows of this vocabulary per step: a 60-token continuation is scored over many steps.
    monkeypatch.setattr(model_runner, "LOGITS_BYTES", 5 * 4 * 384)
    b = ContinuousBatcher(model, max_num_seqs=2, max_batch_tokens=64)
    rows = []
    prepare = b.runner.prepare

    def spy(plan, slot):
        lay = prepare(plan, slot)
        rows.append(lay.num_score_rows + lay.num_samples)
        return lay

    b.runner.prepare = spy
    pairs = [([3, 4, 5], list(range(10, 70))), ([6], list(range(100, 130)))]
    assert_matches(model, pairs, b.score(pairs))
    assert max(rows) <= 5 and sum(rows) == 60 + 30


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_scoring_and_generation_share_steps(model, mode):
    pairs = pairs_of(2, 6)
    prompts = [ctx for ctx, _ in pairs_of(3, 6)]
    b = ContinuousBatcher(model, mode=mode, max_batch_tokens=64)
    mixed = []
    prepare = b.runner.prepare

    def spy(plan, slot):
        lay = prepare(plan, slot)
        mixed.append(lay.num_samples > 0 and lay.num_score_rows > 0)
        return lay

    b.runner.prepare = spy
    gen_ids = [b.add_request(p, SamplingParams(max_new_tokens=6, ignore_eos=True)) for p in prompts]
    score_ids = [b.add_score(c, t) for c, t in pairs]
    results = {r.index: r for r in b.drain()}
    assert any(mixed), "a step was meant to hold sampling and scoring rows together"
    assert_matches(model, pairs, [results[i] for i in score_ids])
    assert [results[i].token_ids for i in gen_ids] == [reference(model, p, 6) for p in prompts]
    assert b.all_blocks_free()


def test_choices_sharing_a_context_compute_it_once(model):
    ctx = list(range(40, 104))  # 64 tokens = 4 blocks of 16
    pairs = [(ctx, [200 + i, 201 + i]) for i in range(4)]
    b = ContinuousBatcher(model, block_size=16)
    assert_matches(model, pairs, b.score(pairs))
    # The first pair computes context + 1 continuation token (the last token's logits score nothing);
    # the others reuse the context's first 3 blocks (48 tokens) and compute from position 48.
    assert b.stats["cached_tokens"] == 3 * 48
    assert b.stats["prefill_tokens"] == 65 + 3 * 17


def test_strings_are_tokenized_context_with_special_tokens_and_continuation_without(model):
    tok = word_tokenizer()
    b = ContinuousBatcher(model, tokenizer=tok)
    r = b.score([("w5 w6 w7", " w8 w9")])[0]
    assert_matches(model, [([5, 6, 7], [8, 9])], [r])


@pytest.mark.parametrize("pair,message", [
    (([1, 2], []), "continuation is empty"),
    (([], [7]), "continuation is empty"),
    (([1, 2], [5, 384]), "token id 384 is outside the vocabulary"),
    (([1] * 500, [3] * 20), "exceeds the model's 512 positions"),
    (("text", [3]), "no tokenizer"),
    ((None, [3]), "context must be a list"),
])
def test_bad_pair_is_named_before_any_work(model, pair, message):
    b = ContinuousBatcher(model)
    with pytest.raises((ValueError, TypeError), match=r"request 1: .*" + message):
        b.score([([1, 2], [3]), pair])
    assert b.stats["steps"] == 0 and b.num_unfinished == 0
