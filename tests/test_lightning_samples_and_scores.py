"""``trainer.predict`` with n samples per prompt and with scoring rows: predictions equal the engine's own
``generate``/``score``, the JSONL writer's lines, and resume."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
from torch.utils.data import DataLoader

from async_batching import ContinuousBatcher, GenerationResult, SamplingParams
from async_batching.lightning import ContinuousBatching, JsonlPredictionWriter
from async_batching.request import Sample, ScoreResult
from engine_helpers import mixed_prompts, word_tokenizer
from lightning_helpers import KillAfter

SMALL = dict(max_num_seqs=4, max_batch_tokens=64, block_size=8, num_blocks=96)  # mixing across batches
SAMPLED = SamplingParams(n=3, temperature=1.0, top_k=50, seed=11, max_new_tokens=6, ignore_eos=True)


class UserModule(L.LightningModule):
    def __init__(self, model, tokenizer=None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    def predict_step(self, batch, batch_idx):
        raise AssertionError("replaced by ContinuousBatching")


def predict(model, loader, *callbacks, sampling=SAMPLED, tokenizer=None, **kw):
    cb = ContinuousBatching(sampling, request_progress=False, log_summary=False, **{**SMALL, **kw})
    trainer = L.Trainer(accelerator="cpu", devices=1, callbacks=[cb, *callbacks], logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    return trainer.predict(UserModule(model, tokenizer), loader), cb


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def prompts():
    return mixed_prompts(7, lo=2, hi=30, seed=4)


@pytest.fixture(scope="module")
def pairs():
    """(context, continuation) pairs of token ids: an empty context (scores every token after the first),
    one-token continuations, longer ones."""
    rng = mixed_prompts(16, lo=6, hi=40, seed=6)
    return [([], rng[8][:5])] + [(rng[i], rng[i + 8][:1 + i % 5]) for i in range(1, 8)]


def ids_loader(prompts, batch_size=3):
    return DataLoader(prompts, batch_size=batch_size, collate_fn=lambda rows: {"input_ids": list(rows)})


def score_loader(pairs, batch_size=3):
    return DataLoader(pairs, batch_size=batch_size, collate_fn=lambda rows: {
        "context": [c for c, _ in rows], "continuation": [x for _, x in rows]})


def choices_loader(rows, batch_size=2):
    return DataLoader(rows, batch_size=batch_size, collate_fn=lambda b: {
        "context": [c for c, _ in b], "choices": [list(ch) for _, ch in b], "id": [f"q{len(c)}" for c, _ in b]})


def assert_scores_equal(got: ScoreResult, want: ScoreResult):
    assert got.error is None and want.error is None
    assert got.is_greedy == want.is_greedy
    assert got.token_logprobs == pytest.approx(want.token_logprobs, abs=1e-5)
    assert got.logprob == pytest.approx(want.logprob, abs=1e-5)


# --- n samples per prompt ----------------------------------------------------------------------------------------
def test_n_samples_through_predict_equal_the_engines_generate(tiny_llama, prompts, tmp_path):
    want = ContinuousBatcher(tiny_llama, **SMALL).generate(prompts, SAMPLED)
    path = tmp_path / "out.jsonl"
    out, cb = predict(tiny_llama, ids_loader(prompts), JsonlPredictionWriter(path))
    got = [r for b in out for r in b]
    assert [len(r.samples) for r in got] == [3] * len(prompts)
    for g, w in zip(got, want):
        assert [s.token_ids for s in g.samples] == [s.token_ids for s in w.samples]
        assert g.token_ids == g.samples[0].token_ids
    assert len({tuple(s.token_ids) for s in got[0].samples}) > 1  # the three samples differ
    assert cb.summary["output_tokens"] == 3 * 6 * len(prompts)

    rows = lines(path)  # one line per prompt, all its samples in it
    assert [r["index"] for r in rows] == list(range(len(prompts)))
    for row, g in zip(rows, got):
        assert row["prompt"] == prompts[row["index"]] and "output" not in row
        assert [s["token_ids"] for s in row["samples"]] == [s.token_ids for s in g.samples]
        assert [s["finish_reason"] for s in row["samples"]] == ["length"] * 3


def test_n_samples_resume_after_kill(tiny_llama, prompts, tmp_path):
    path = tmp_path / "out.jsonl"
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        predict(tiny_llama, ids_loader(prompts), JsonlPredictionWriter(path), KillAfter(3))
    assert len(lines(path)) == 3
    out, cb = predict(tiny_llama, ids_loader(prompts), JsonlPredictionWriter(path))
    assert cb.summary["resumed"] == 3 and cb.stats.engine["requests"] == len(prompts) - 3
    fresh, _ = predict(tiny_llama, ids_loader(prompts))
    got, want = [r for b in out for r in b], [r for b in fresh for r in b]
    assert [[s.token_ids for s in r.samples] for r in got] == [[s.token_ids for s in r.samples] for r in want]
    assert [r["index"] for r in lines(path)] == list(range(len(prompts)))


# --- scoring rows ------------------------------------------------------------------------------------------------
def test_score_rows_equal_the_engines_score(tiny_llama, pairs):
    want = ContinuousBatcher(tiny_llama, **SMALL).score(pairs)
    out, cb = predict(tiny_llama, score_loader(pairs))
    got = [r for b in out for r in b]
    assert all(isinstance(r, ScoreResult) for r in got) and [r.index for r in got] == list(range(len(pairs)))
    for g, w in zip(got, want):
        assert_scores_equal(g, w)
    assert cb.summary["requests"] == len(pairs) and cb.summary["finish_reasons"] == {"scored": len(pairs)}


def test_choices_rows_give_one_score_per_choice_in_order(tiny_llama, pairs):
    rows = [(pairs[i][0], [pairs[j][1] for j in range(i, i + 1 + i % 3)]) for i in range(1, 6)]
    flat = [(ctx, ch) for ctx, choices in rows for ch in choices]
    want = iter(ContinuousBatcher(tiny_llama, **SMALL).score(flat))
    out, _ = predict(tiny_llama, choices_loader(rows))
    got = [r for b in out for r in b]
    assert [len(r) for r in got] == [len(ch) for _, ch in rows]
    for row in got:
        for g in row:
            assert_scores_equal(g, next(want))


def test_string_pairs_are_tokenized_context_and_continuation_apart(tiny_llama):
    tok = word_tokenizer()
    texts = [("w5 w6 w7", "w8 w9"), ("w10", "w11"), ("w12 w13", "w14 w15 w16")]
    want = ContinuousBatcher(tiny_llama, tok, **SMALL).score(texts)
    out, _ = predict(tiny_llama, score_loader(texts), tokenizer=tok)
    for g, w in zip([r for b in out for r in b], want):
        assert_scores_equal(g, w)


def test_bad_score_rows_are_errors_or_stop_the_job(tiny_llama, pairs, tmp_path):
    bad = list(pairs[:5])
    bad[1] = (bad[1][0], [])  # empty continuation
    bad[3] = (bad[3][0], [5, 999])  # outside the vocabulary
    path = tmp_path / "out.jsonl"
    out, cb = predict(tiny_llama, score_loader(bad), JsonlPredictionWriter(path))
    got = [r for b in out for r in b]
    assert [r.error is not None for r in got] == [False, True, False, True, False]
    assert "999" in got[3].error and cb.summary["errors"] == 2
    rows = lines(path)
    assert rows[1]["error"] and rows[1]["logprob"] is None and rows[0]["logprob"] == pytest.approx(got[0].logprob)
    with pytest.raises(ValueError, match="dataset index 1"):
        predict(tiny_llama, score_loader(bad), on_error="raise")


def test_score_and_choices_lines_and_resume(tiny_llama, pairs, tmp_path):
    path = tmp_path / "scores.jsonl"
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        predict(tiny_llama, score_loader(pairs), JsonlPredictionWriter(path), KillAfter(4))
    out, cb = predict(tiny_llama, score_loader(pairs), JsonlPredictionWriter(path))
    assert cb.summary["resumed"] == 4
    rows = lines(path)
    assert [r["index"] for r in rows] == list(range(len(pairs)))
    for row, r, (ctx, cont) in zip(rows, [r for b in out for r in b], pairs):
        assert (row["context"], row["continuation"]) == (ctx, cont)
        assert row["token_logprobs"] == r.token_logprobs and row["is_greedy"] == r.is_greedy
        assert row["logprob"] == r.logprob

    rows_in = [(pairs[i][0], [pairs[j][1] for j in range(i, i + 2)]) for i in range(1, 6)]
    path = tmp_path / "choices.jsonl"
    first, _ = predict(tiny_llama, choices_loader(rows_in), JsonlPredictionWriter(path))
    again, cb = predict(tiny_llama, choices_loader(rows_in), JsonlPredictionWriter(path))
    assert cb.summary["resumed"] == len(rows_in) and cb.stats.engine["requests"] == 0
    written = lines(path)
    for row, want, got in zip(written, [r for b in first for r in b], [r for b in again for r in b]):
        assert [s["token_logprobs"] for s in row["scores"]] == [s.token_logprobs for s in want]
        assert [s.logprob for s in got] == [s.logprob for s in want]  # read back from the file
        assert row["meta"] == {"id": f"q{len(row['context'])}"}
    changed = [(ctx, ch[::-1]) for ctx, ch in rows_in]
    with pytest.raises(ValueError, match="different choices"):
        predict(tiny_llama, choices_loader(changed), JsonlPredictionWriter(path))


# --- the writer's lines, without an engine -----------------------------------------------------------------------
def test_writer_lines_read_back_as_the_results_they_were_written_from():
    from async_batching.lightning.record import RequestRecord
    from async_batching.lightning.writer import result_row, row_result

    samples = [Sample([4, 5], "length", "a b", [-0.5, -1.0], None, -1.5), Sample([6], "stop", "c", [-2.0], None, -2.0)]
    gen = GenerationResult(3, [4, 5], "length", 2, "a b", 0.1, 0.2, [-0.5, -1.0], None, 1, None, samples, -1.5)
    record = RequestRecord(3, 0, 1, [1, 2], SamplingParams(n=2, logprobs=0), result=gen)
    row = json.loads(json.dumps(result_row(record)))
    assert [s["text"] for s in row["samples"]] == ["a b", "c"] and row["samples"][1]["cumulative_logprob"] == -2.0
    assert row_result(row) == gen

    one = GenerationResult(4, [7], "stop", 1, "x", 0.1, 0.2, samples=[Sample([7], "stop", "x")])
    row = result_row(RequestRecord(4, 0, 1, [9], SamplingParams(), result=one))
    assert "samples" not in row and row["output"] == "x" and row["token_ids"] == [7]  # n=1 stays flat

    score = ScoreResult(5, -3.5, True, [-1.5, -2.0], 6, 0.3, 2)
    record = RequestRecord(5, 0, 2, [1, 2, 3, 4], SamplingParams(), continuation=[5, 6], result=score)
    row = json.loads(json.dumps(result_row(record)))
    assert {k: row[k] for k in ("context", "continuation", "logprob", "is_greedy", "token_logprobs")} == {
        "context": [1, 2, 3, 4], "continuation": [5, 6], "logprob": -3.5, "is_greedy": True,
        "token_logprobs": [-1.5, -2.0]}
    assert row_result(row) == score

    failed = ScoreResult(6, math.nan, False, [], 0, error="ValueError: empty continuation")
    choices = [ScoreResult(6, -1.0, False, [-1.0], 3, 0.1), failed]
    record = RequestRecord(6, 0, 2, "ctx", SamplingParams(), text="ctx", choices=["a", ""], result=choices)
    row = json.loads(json.dumps(result_row(record)))
    assert row["choices"] == ["a", ""] and row["error"] == failed.error and row["scores"][1]["logprob"] is None
    back = row_result(row)
    assert back[0] == choices[0] and back[1].error == failed.error and math.isnan(back[1].logprob)
