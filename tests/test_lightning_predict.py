"""``trainer.predict`` through ContinuousBatching with a user-style module and DataLoader: outputs, order and hooks."""

from __future__ import annotations

import copy
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, RichProgressBar, TQDMProgressBar
from torch.utils.data import DataLoader

from async_batching import GenerationResult, SamplingParams
from async_batching.lightning import ContinuousBatching, JsonlPredictionWriter
from async_batching.lightning.loop import ContinuousPredictionLoop
from async_batching.lightning.progress import RequestRichProgressBar, RequestTQDMProgressBar
from engine_helpers import mixed_prompts, reference, word_tokenizer
from lightning_helpers import KillAfter

NEW = 10
SMALL = dict(max_num_seqs=4, max_batch_tokens=64, block_size=8, num_blocks=96)  # forces mixing across batches


class UserModule(L.LightningModule):
    """What a user has: the HF model as an attribute and a static predict_step the callback replaces."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.batch_starts: list[int] = []
        self.batch_ends: list[int] = []

    def predict_step(self, batch, batch_idx):
        raise AssertionError("the static predict_step must not run under ContinuousBatching")

    def on_predict_batch_start(self, batch, batch_idx, dataloader_idx=0):
        self.batch_starts.append(batch_idx)

    def on_predict_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
        self.batch_ends.append(batch_idx)


def lists(rows):
    return {"input_ids": list(rows)}


def trainer(*callbacks, progress=False, **kw):
    return L.Trainer(accelerator="cpu", devices=1, callbacks=list(callbacks), logger=False,
                     enable_progress_bar=progress, enable_model_summary=False, **kw)


def batching(new=NEW, **kw):
    kw = {**SMALL, **kw}
    return ContinuousBatching(SamplingParams(max_new_tokens=new), request_progress=kw.pop("request_progress", False),
                              log_summary=False, **kw)


@pytest.fixture(scope="module")
def prompts():
    return mixed_prompts(11, lo=1, hi=40, seed=3)


@pytest.fixture(scope="module")
def refs(tiny_llama, prompts):
    return [reference(tiny_llama, p, NEW, eos=2) for p in prompts]


@pytest.mark.parametrize("ordered", [True, False])
def test_predict_returns_one_entry_per_batch_in_order_equal_to_generate(tiny_llama, prompts, refs, ordered):
    module = UserModule(tiny_llama)
    cb = batching(ordered=ordered)
    out = trainer(cb).predict(module, DataLoader(prompts, batch_size=3, collate_fn=lists))
    assert [len(b) for b in out] == [3, 3, 3, 2]
    flat = [r for b in out for r in b]
    assert all(isinstance(r, GenerationResult) for r in flat)
    assert [r.index for r in flat] == list(range(len(prompts)))  # dataset indices
    for r, ref in zip(flat, refs):
        assert r.token_ids == ref
    assert sorted(module.batch_starts) == sorted(module.batch_ends) == [0, 1, 2, 3]
    assert cb.summary["requests"] == len(prompts) and cb.summary["errors"] == 0


def test_lightning_loop_is_put_back_after_predict(tiny_llama, prompts):
    t = trainer(batching())
    loop = t.predict_loop
    t.predict(UserModule(tiny_llama), DataLoader(prompts[:4], batch_size=2, collate_fn=lists))
    assert t.predict_loop is loop and not isinstance(loop, ContinuousPredictionLoop)
    again = t.predict(UserModule(tiny_llama), DataLoader(prompts[:4], batch_size=2, collate_fn=lists))
    assert [len(b) for b in again] == [2, 2]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_tensor_batches_with_attention_mask(tiny_llama, prompts, refs, side):
    def pad(rows):
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, cols], mask[i, cols] = torch.tensor(r), 1
        return {"input_ids": ids, "attention_mask": mask, "id": torch.arange(len(rows))}

    out = trainer(batching()).predict(UserModule(tiny_llama), DataLoader(prompts, batch_size=4, collate_fn=pad))
    assert [r.token_ids for b in out for r in b] == refs


class RecordingWriter(BasePredictionWriter):
    def __init__(self):
        super().__init__("batch_and_epoch")
        self.batches: list[tuple[int, list[int], list[int]]] = []
        self.epoch = None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self.batches.append((batch_idx, list(batch_indices), [r.index for r in prediction]))

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        self.epoch = (predictions, batch_indices)


class LongFirstModule(UserModule):
    """Requests of batch 0 generate 24 tokens, later ones 2: later batches finish first."""

    def batch_to_requests(self, batch):
        long = batch["id"][0] == 0
        return [(p, SamplingParams(max_new_tokens=24 if long else 2, ignore_eos=True)) for p in batch["input_ids"]]


@pytest.mark.parametrize("ordered", [True, False])
def test_prediction_writer_sees_each_batch_once_with_its_indices(tiny_llama, prompts, ordered):
    writer = RecordingWriter()
    module = LongFirstModule(tiny_llama)
    loader = DataLoader(list(enumerate(prompts)), batch_size=3,
                        collate_fn=lambda rows: {"id": [i for i, _ in rows], "input_ids": [p for _, p in rows]})
    out = trainer(batching(ordered=ordered, max_num_seqs=8), writer).predict(module, loader, return_predictions=False)
    assert out is None
    order = [b for b, _, _ in writer.batches]
    assert sorted(order) == [0, 1, 2, 3]
    assert order == sorted(order) if ordered else order != sorted(order)  # unordered: batch 0 finishes last
    for batch_idx, indices, result_indices in writer.batches:
        assert indices == result_indices == list(range(3 * batch_idx, min(3 * batch_idx + 3, len(prompts))))
    predictions, epoch_indices = writer.epoch
    assert [[r.index for r in b] for b in predictions] == epoch_indices[0]
    assert [len(r.token_ids) for r in predictions[0]] == [24, 24, 24]


def test_batch_to_requests_and_post_processing_hook(tiny_llama, prompts):
    class Module(UserModule):
        def batch_to_requests(self, batch):
            return [(torch.tensor(p), SamplingParams(max_new_tokens=1 + i, ignore_eos=True))
                    for i, p in enumerate(batch)]

        def on_generation_batch_end(self, results, batch, batch_idx):
            return [len(r.token_ids) for r in results]

    out = trainer(batching()).predict(Module(tiny_llama), DataLoader(prompts[:5], batch_size=2, collate_fn=list))
    assert out == [[1, 2], [1, 2], [1]]


def test_string_prompts_use_the_tokenizer(tiny_llama, prompts):
    tok = word_tokenizer()
    texts = [" ".join(f"w{t}" for t in p) for p in prompts[:4]]
    module = UserModule(tiny_llama)
    module.tokenizer = tok
    out = trainer(batching()).predict(module, DataLoader(texts, batch_size=2))  # default collate: list of str
    flat = [r for b in out for r in b]
    refs = [reference(tiny_llama, tok.encode(t), NEW, eos=2) for t in texts]
    assert [r.token_ids for r in flat] == refs
    assert flat[1].text == tok.decode(refs[1])


def test_bad_rows_are_reported_and_skipped_or_raised(tiny_llama, prompts, refs, tmp_path):
    rows = list(prompts[:6])
    rows[1] = []  # empty prompt
    rows[4] = [5, 999, 7]  # token id outside the vocabulary
    path = tmp_path / "out.jsonl"
    cb = batching()
    loader = DataLoader(rows, batch_size=2, collate_fn=lists)
    out = trainer(cb, JsonlPredictionWriter(path)).predict(UserModule(tiny_llama), loader)
    flat = [r for b in out for r in b]
    assert [r.finish_reason == "error" for r in flat] == [False, True, False, False, True, False]
    assert "empty" in flat[1].error and "999" in flat[4].error
    assert [flat[i].token_ids for i in (0, 2, 3, 5)] == [refs[i] for i in (0, 2, 3, 5)]
    assert cb.summary["errors"] == 2 and cb.summary["requests"] == 6
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["index"] for x in lines] == list(range(6))
    assert lines[4]["error"] and lines[4]["finish_reason"] == "error"

    with pytest.raises(ValueError, match="dataset index 1"):
        trainer(batching(on_error="raise")).predict(UserModule(tiny_llama), loader)


def test_resume_after_kill_generates_only_the_missing_requests(tiny_llama, prompts, refs, tmp_path):
    path = tmp_path / "out.jsonl"
    loader = DataLoader(prompts, batch_size=3, collate_fn=lists)
    # The writer is listed before the killer, so the 5th result is written before the "kill".
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        trainer(batching(), JsonlPredictionWriter(path), KillAfter(5)).predict(UserModule(tiny_llama), loader)
    written = [json.loads(x)["index"] for x in path.read_text().splitlines()]
    assert len(written) == 5
    with open(path, "a") as f:
        f.write('{"index": 10, "dataloader_idx": 0, "prompt": [1, 2')  # a line torn by the kill

    cb = batching()
    writer = JsonlPredictionWriter(path)
    out = trainer(cb, writer).predict(UserModule(tiny_llama), loader)
    assert cb.summary["resumed"] == 5 and cb.summary["generated"] == len(prompts) - 5
    assert cb.stats.engine["requests"] == len(prompts) - 5  # written requests never reached the engine
    assert [r.token_ids for b in out for r in b] == refs  # resumed ones read back from the file
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["index"] for x in lines] == list(range(len(prompts)))  # no duplicates, dataset order
    assert [x["token_ids"] for x in lines] == refs

    changed = [list(p) for p in prompts]
    changed[0] = changed[0] + [7]
    with pytest.raises(ValueError, match="different prompt"):
        trainer(batching(), JsonlPredictionWriter(path)).predict(
            UserModule(tiny_llama), DataLoader(changed, batch_size=3, collate_fn=lists))


@pytest.mark.parametrize("bar_class, request_class", [
    (TQDMProgressBar, RequestTQDMProgressBar), (RichProgressBar, RequestRichProgressBar)])
def test_progress_bar_counts_requests_and_is_restored(tiny_llama, prompts, bar_class, request_class):
    bar = bar_class(refresh_rate=3)
    seen = []

    class Spy(L.Callback):
        def on_generation_progress(self, trainer, pl_module, stats):
            seen.append((trainer.progress_bar_callback, stats.done, stats.total))

    t = trainer(batching(request_progress=True), bar, Spy(), progress=True)
    t.predict(UserModule(tiny_llama), DataLoader(prompts, batch_size=3, collate_fn=lists))
    counting, done, total = seen[-1]
    assert (type(counting), done, total) == (request_class, len(prompts), len(prompts))
    assert counting.refresh_rate == 3  # Lightning's bar's settings carried over
    assert t.progress_bar_callback is bar and type(bar) is bar_class  # the stock bar is back after predict
    if bar_class is TQDMProgressBar:
        shown = counting.predict_progress_bar
        assert shown.n == len(prompts) and shown.total == len(prompts) and "tok/s" in shown.postfix
    else:
        task = counting.progress.tasks[counting.predict_progress_bar_id]
        assert task.completed == task.total == len(prompts) and "tok/s" in task.description


def test_model_is_found_or_the_error_says_how(tiny_llama, prompts):
    class TwoModels(UserModule):
        def __init__(self, model):
            super().__init__(model)
            self.draft = copy.deepcopy(model)

    loader = DataLoader(prompts[:2], batch_size=2, collate_fn=lists)
    with pytest.raises(ValueError, match="get_generation_model"):
        trainer(batching()).predict(TwoModels(tiny_llama), loader)
    out = trainer(batching(model_attr="draft")).predict(TwoModels(tiny_llama), loader)
    assert len(out[0]) == 2

    class Named(TwoModels):
        def get_generation_model(self):
            return self.draft

    assert len(trainer(batching()).predict(Named(tiny_llama), loader)[0]) == 2


def test_callback_rejects_bad_settings_at_construction():
    with pytest.raises(TypeError, match="max_batch_tokenz"):
        ContinuousBatching(max_batch_tokenz=4)
    with pytest.raises(ValueError, match="on_error"):
        ContinuousBatching(on_error="ignore")
    with pytest.raises(ValueError, match="max_new_tokens"):
        ContinuousBatching(SamplingParams(max_new_tokens=0))


def test_error_in_a_user_hook_keeps_what_was_written_and_resumes(tiny_llama, prompts, refs, tmp_path):
    path = tmp_path / "out.jsonl"
    loader = DataLoader(prompts, batch_size=3, collate_fn=lists)
    built = []

    class Fragile(UserModule):
        def on_generation_batch_end(self, results, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("user post-processing failed")
            return None

    cb = batching()
    real_build = cb.build_batcher
    cb.build_batcher = lambda module: built.append(real_build(module)) or built[-1]
    bar = TQDMProgressBar()
    failing = trainer(cb, JsonlPredictionWriter(path), bar, progress=True)
    with pytest.raises(RuntimeError, match="user post-processing failed"):
        failing.predict(Fragile(tiny_llama), loader)
    assert not isinstance(failing.predict_loop, ContinuousPredictionLoop)  # put back after the exception too
    assert failing.progress_bar_callback is bar
    engine = built[0]
    assert engine._closed and engine.executor.step_in_flight is None and engine.all_blocks_free()
    written = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(written) >= 6  # at least the first two batches (flushed as they finished)
    assert all(x["token_ids"] == refs[x["index"]] for x in written)
    cb2 = batching()
    out = trainer(cb2, JsonlPredictionWriter(path)).predict(UserModule(tiny_llama), loader)
    assert cb2.summary["resumed"] == len(written)
    assert [r.token_ids for b in out for r in b] == refs
    lines = [json.loads(x)["index"] for x in path.read_text().splitlines()]
    assert lines == list(range(len(prompts)))
