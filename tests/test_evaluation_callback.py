"""GenerationEvaluation in a tiny ``trainer.fit`` loop on CPU: metrics logged on schedule, scores equal to a direct
``model.generate`` oracle, training left exactly as it was (weights of a fit with evaluations equal those of a fit
without), and the DDP reduction over two CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from async_batching import SamplingParams
from async_batching.lightning import GenerationEvaluation
from async_batching.models import tiny_model
from engine_helpers import reference, word_tokenizer

PROMPTS = [{"prompt": f"w{5 + i} w{40 + 3 * i} w{90 + i}", "id": i} for i in range(6)]
SAMPLING = SamplingParams(max_new_tokens=4)


class TinyCausalLM(L.LightningModule):
    """A user's training module: a tiny llama with its embedding frozen (and that submodule kept in eval mode)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.model = tiny_model("llama", seed=seed).train()
        self.tokenizer = word_tokenizer()
        self.model.model.embed_tokens.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


def loader():
    data = torch.randint(3, 384, (8, 12), generator=torch.Generator().manual_seed(0))
    return DataLoader(data, batch_size=2, shuffle=True)  # shuffling draws from torch's RNG: evaluation must not move it


def fit(callbacks, epochs=2, seed=0):
    L.seed_everything(seed, verbose=False)
    module = TinyCausalLM()
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, callbacks=callbacks, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader())
    return module, trainer


def matches_generate(module):
    """score_fn: 1 when the engine's text equals greedy ``model.generate`` on the live weights, else 0."""
    def score(text, prompt):
        ids = module.tokenizer.encode(prompt["prompt"])
        expected = module.tokenizer.decode(reference(module.model, ids, 4, eos=2), skip_special_tokens=True)
        return {"match": float(text == expected), "id": float(prompt["id"])}
    return score


def test_fit_with_evaluations_ends_with_the_same_weights_as_fit_without():
    plain, _ = fit([])
    holder = {}
    cb = GenerationEvaluation(prompts=PROMPTS, score_fn=lambda t, p: holder["score"](t, p), sampling=SAMPLING,
                              every_n_epochs=1, num_blocks=64)
    L.seed_everything(0, verbose=False)
    evaluated = TinyCausalLM()
    holder["score"] = matches_generate(evaluated)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(evaluated, loader())
    assert len(cb.history) == 2 and [h["epoch"] for h in cb.history] == [0, 1]
    assert all(h["match"] == 1.0 and h["id"] == 2.5 for h in cb.history)  # every prompt scored, means over all six
    assert trainer.callback_metrics["eval/match"].item() == 1.0
    for (name, a), (_, b) in zip(plain.state_dict().items(), evaluated.state_dict().items()):
        assert torch.equal(a, b), name
    assert plain.model.model.embed_tokens.weight.requires_grad is False


def test_lm_eval_tasks_are_logged_equal_to_lm_eval_on_the_final_weights_and_training_is_unchanged(tmp_path):
    """lm-eval reseeds python/numpy/torch: without the state put back, the next epoch's shuffle would differ."""
    import lm_eval

    from async_batching.lm_eval import AsyncBatchingLM, task_manager
    from lm_eval_helpers import word_tasks

    tasks = word_tasks(str(tmp_path / "tasks"), docs=4)
    plain, _ = fit([], epochs=2)
    cb = GenerationEvaluation(["words_mc", "words_ppl"], include_path=tasks, every_n_epochs=1, num_blocks=64)
    evaluated, trainer = fit([cb], epochs=2)
    for (name, a), (_, b) in zip(plain.state_dict().items(), evaluated.state_dict().items()):
        assert torch.equal(a, b), name
    assert len(cb.history) == 2 and cb.history[0]["words_ppl/word_perplexity"] != cb.history[1][
        "words_ppl/word_perplexity"]  # the weights moved between the two evaluations
    lm = AsyncBatchingLM(pretrained=evaluated.model, tokenizer=evaluated.tokenizer, num_blocks=64)
    direct = lm_eval.simple_evaluate(model=lm, tasks=["words_mc", "words_ppl"], bootstrap_iters=0,
                                     task_manager=task_manager(["words_mc", "words_ppl"], tasks))
    lm.close()
    last = cb.history[-1]
    assert last["words_ppl/word_perplexity"] == pytest.approx(direct["results"]["words_ppl"]["word_perplexity,none"])
    assert last["words_mc/acc"] == direct["results"]["words_mc"]["acc,none"]
    assert trainer.callback_metrics["eval/words_ppl/word_perplexity"].item() == pytest.approx(
        last["words_ppl/word_perplexity"], rel=1e-6)


def test_evaluation_restores_modes_requires_grad_and_parameters_and_creates_no_grads():
    L.seed_everything(0, verbose=False)
    module = TinyCausalLM()
    module.train()
    module.model.model.embed_tokens.eval()  # a frozen part the user keeps in eval mode
    modes = {name: m.training for name, m in module.named_modules()}
    flags = {name: p.requires_grad for name, p in module.named_parameters()}
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    cb = GenerationEvaluation(prompts=PROMPTS, score_fn=matches_generate(module), sampling=SAMPLING, num_blocks=64)
    metrics = cb.evaluate(trainer, module)
    assert metrics == {"match": 1.0, "id": 2.5}
    assert {name: m.training for name, m in module.named_modules()} == modes
    assert {name: p.requires_grad for name, p in module.named_parameters()} == flags
    assert all(torch.equal(p, before[name]) and p.grad is None for name, p in module.named_parameters())


def test_every_n_steps_evaluates_at_each_multiple_of_the_optimizer_step():
    cb = GenerationEvaluation(prompts=PROMPTS[:2], score_fn=lambda t, p: len(t) >= 0, sampling=SAMPLING,
                              every_n_epochs=None, every_n_steps=3, num_blocks=64)
    fit([cb], epochs=2)  # 4 batches per epoch: steps 1..8
    assert [h["step"] for h in cb.history] == [3, 6]


def test_evaluation_engines_are_uncompiled_and_unfused_unless_asked():
    """The parameters being trained keep their storage (no fused views) and evaluations pay no compile."""
    cb = GenerationEvaluation(prompts=PROMPTS[:1], score_fn=lambda t, p: 1.0)
    assert cb.config.compile is False and cb.config.fuse_projections is False
    asked = GenerationEvaluation(prompts=PROMPTS[:1], score_fn=lambda t, p: 1.0, fuse_projections=True, compile=True)
    assert asked.config.compile is True and asked.config.fuse_projections is True


def test_bad_arguments_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="either tasks"):
        GenerationEvaluation()
    with pytest.raises(ValueError, match="score_fn"):
        GenerationEvaluation(prompts=["w5"])
    with pytest.raises(ValueError, match="exactly one of every_n_epochs and every_n_steps"):
        GenerationEvaluation(tasks=["x"], every_n_epochs=1, every_n_steps=5)
    with pytest.raises(ValueError, match="move or cast the model being trained"):
        GenerationEvaluation(tasks=["x"], dtype="bfloat16")
    with pytest.raises(TypeError, match="unknown BatcherConfig field"):
        GenerationEvaluation(tasks=["x"], max_batch_tokenz=5)
    with pytest.raises(ValueError, match="tensor_parallel_size > 1 is not supported yet"):
        GenerationEvaluation(tasks=["x"], tensor_parallel_size=2)


DDP_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, sys.argv[2])
import lightning as L
from lightning.pytorch.strategies import DDPStrategy
from test_evaluation_callback import PROMPTS, SAMPLING, TinyCausalLM, loader
from async_batching.lightning import GenerationEvaluation

L.seed_everything(0, verbose=False)
module = TinyCausalLM()
cb = GenerationEvaluation(prompts=PROMPTS, score_fn=lambda text, p: {"id": p["id"], "n": 1.0}, sampling=SAMPLING,
                          num_blocks=64)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"), max_epochs=1,
                    callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
trainer.fit(module, loader())
with open(os.path.join(sys.argv[1], f"rank{trainer.global_rank}.json"), "w") as f:
    json.dump({"history": cb.history, "logged": {k: float(v) for k, v in trainer.callback_metrics.items()}}, f)
"""


def test_ddp_ranks_evaluate_their_shards_and_log_the_mean_over_all_prompts(tmp_path, repo_root):
    script = tmp_path / "ddp_eval.py"
    script.write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(repo_root, "plugin"), os.path.join(repo_root, "tests")])
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), os.path.join(repo_root, "tests")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for got in ranks:  # ids 0..5 split 3/3 over the ranks; each rank logs the mean over all six
        assert [(h["id"], h["n"]) for h in got["history"]] == [(2.5, 1.0)]
        assert got["logged"]["eval/id"] == 2.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_memory_after_an_evaluation_is_back_within_a_few_mib_of_before():
    pytest.importorskip("lm_eval")  # GenerationEvaluation runs through the lm-eval backend (carry its wheels there)
    L.seed_everything(0, verbose=False)
    module = TinyCausalLM().cuda()
    trainer = L.Trainer(accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)
    cb = GenerationEvaluation(prompts=PROMPTS, score_fn=matches_generate(module), sampling=SAMPLING)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    metrics = cb.evaluate(trainer, module)  # the cache takes 30% of the free memory, and graphs are captured
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    assert metrics["match"] == 1.0
    assert abs(after - before) < 4 * 2**20, (before, after)
