"""Decode windows (BatcherConfig.decode_window): several decode forwards planned at once give exactly the tokens of
the step-by-step engine (greedy: ``model.generate``; sampled: the same seeded draws), whatever stops them."""

import pytest

from async_batching import ContinuousBatcher, SamplingParams
from async_batching.models import tiny_model
from engine_helpers import mixed_prompts, reference, word_tokenizer

_model = None


def model():
    global _model
    if _model is None:
        _model = tiny_model("llama")
    return _model


def _run(window, prompts, sampling, **kw):
    b = ContinuousBatcher(model(), decode_window=window, **kw)
    results = b.generate(prompts, sampling)
    stats = b.stats
    assert b.all_blocks_free()
    b.close()
    return results, stats


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_greedy_windows_match_generate_with_varied_lengths_chunking_and_preemption(mode):
    prompts = mixed_prompts(7, hi=90, seed=5)
    new = [3, 17, 1, 9, 12, 5, 20]
    refs = [reference(model(), p, n) for p, n in zip(prompts, new)]
    sampling = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in new]
    # 20 blocks of 8 cannot hold 4 requests: windows fall back to single steps, and steps preempt, as usual.
    results, stats = _run(4, prompts, sampling, mode=mode, max_num_seqs=4, max_batch_tokens=48, block_size=8,
                          num_blocks=20)
    assert [r.token_ids for r in results] == refs
    assert all(r.finish_reason == "length" for r in results)
    assert stats["windows"] > 0 and stats["preemptions"] > 0


@pytest.mark.parametrize("window", [2, 5])
def test_sampled_windows_draw_the_tokens_of_single_steps(window):
    """Seeded and unseeded rows, top-k/top-p/min-p and n>1 samples: every draw uses the noise key of its
    generated-token index, so a window draws what one step at a time draws."""
    prompts = mixed_prompts(6, hi=60, seed=2)
    sampling = [SamplingParams(max_new_tokens=11, temperature=0.9, top_k=20, seed=7, ignore_eos=True),
                SamplingParams(max_new_tokens=14, temperature=1.0, top_p=0.8, ignore_eos=True),
                SamplingParams(max_new_tokens=9, temperature=0.7, min_p=0.05, n=3, ignore_eos=True),
                SamplingParams(max_new_tokens=13, temperature=1.2, ignore_eos=True),
                SamplingParams(max_new_tokens=8, ignore_eos=True),
                SamplingParams(max_new_tokens=10, temperature=0.5, top_k=5, top_p=0.9, seed=3, ignore_eos=True)]
    one, _ = _run(1, prompts, sampling, seed=11)
    many, stats = _run(window, prompts, sampling, seed=11)
    assert stats["windows"] > 0
    assert [[s.token_ids for s in r.samples] for r in many] == [[s.token_ids for s in r.samples] for r in one]


def test_a_stop_inside_a_window_drops_the_later_tokens():
    """EOS, stop token ids and stop strings found in the middle of a window end the request there, as one step at a
    time would; the tokens the window computed after them are not returned."""
    prompts = mixed_prompts(3, hi=40, seed=8)
    refs = [reference(model(), p, 24) for p in prompts]
    stops = [refs[0][6], refs[1][9], refs[2][2]]
    sampling = [SamplingParams(max_new_tokens=24, stop_token_ids=[t], ignore_eos=True) for t in stops]
    one, _ = _run(1, prompts, sampling)
    many, stats = _run(8, prompts, sampling)
    assert stats["windows"] > 0
    assert [r.token_ids for r in many] == [r.token_ids for r in one]
    assert [r.token_ids for r in many] == [ref[:ref.index(t) + 1] for ref, t in zip(refs, stops)]
    assert all(r.finish_reason == "stop" for r in many)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stop_string_inside_a_window_cuts_text_and_tokens_as_single_steps_do(mode):
    tok = word_tokenizer()
    prompt = mixed_prompts(1, hi=30, seed=6)[0]
    ref = reference(model(), prompt, 16)
    word = f"w{ref[6]}"
    first = next(i for i in range(len(ref)) if word in tok.decode(ref[: i + 1]))
    sp = SamplingParams(max_new_tokens=16, stop=[word], ignore_eos=True)
    out = {}
    for window in (1, 4):
        b = ContinuousBatcher(model(), tokenizer=tok, mode=mode, decode_window=window)
        out[window] = b.generate([prompt], sp)[0]
        assert (b.stats["windows"] > 0) == (window > 1) and b.all_blocks_free()
    for r in out.values():
        assert r.token_ids == ref[: first + 1] and r.finish_reason == "stop"
        assert r.text == tok.decode(ref[: first + 1]).split(word)[0]


def test_rows_with_logprobs_or_penalties_run_one_step_at_a_time():
    prompts = mixed_prompts(2, hi=30, seed=4)
    for sp in (SamplingParams(max_new_tokens=6, logprobs=2, ignore_eos=True),
               SamplingParams(max_new_tokens=6, temperature=0.8, repetition_penalty=1.3, ignore_eos=True)):
        one, _ = _run(1, prompts, sp)
        many, stats = _run(4, prompts, sp)
        assert stats["windows"] == 0
        assert [r.token_ids for r in many] == [r.token_ids for r in one]
        assert [r.logprobs for r in many] == [r.logprobs for r in one]


def test_a_window_stops_at_max_model_len():
    """Positions past max_model_len are never computed: the window narrows near it."""
    m = model()
    limit = m.config.max_position_embeddings
    prompt = mixed_prompts(1, lo=limit - 12, hi=limit - 12, seed=1)[0]
    ref = reference(m, prompt, 10)
    results, stats = _run(8, [prompt], SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert results[0].token_ids == ref
    assert stats["windows"] > 0


def test_decode_window_must_be_a_small_positive_int():
    with pytest.raises(ValueError, match=r"BatcherConfig\.decode_window=0 is invalid: expected an int in \[1, 64\]"):
        ContinuousBatcher(model(), decode_window=0)


def test_a_window_is_planned_only_when_free_blocks_cover_its_positions():
    """A 13-token prompt with 3 new tokens fits one 16-token block; a window of 4 from position 13 would need a
    second block. With one usable block the decode steps run one at a time (no preemption of the only request);
    with two, they run as a window (computing past the request's length into its own block). Same tokens."""
    prompt = mixed_prompts(1, lo=13, hi=13, seed=3)[0]
    ref = reference(model(), prompt, 3)
    for blocks, windows, forwards in ((2, 0, 3), (3, 1, 5)):  # usable blocks: one less (the scratch block)
        results, stats = _run(4, [prompt], SamplingParams(max_new_tokens=3, ignore_eos=True), mode="sync",
                              block_size=16, num_blocks=blocks)
        assert results[0].token_ids == ref
        assert (stats["windows"], stats["steps"], stats["preemptions"]) == (windows, forwards, 0)
