"""GenerationEvaluation: evaluate the live model during ``trainer.fit`` (lm-eval tasks, or prompts with a scoring
function) through a continuous batcher, log the metrics, and leave training exactly as it was."""

from __future__ import annotations

import gc
import random
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ..config import BatcherConfig
from ..request import SamplingParams
from .callback import find_generation_model, find_generation_tokenizer

ScoreFn = Callable[[str, Any], Union[float, dict]]


class GenerationEvaluation(Callback):
    """Every ``every_n_epochs`` epochs (or ``every_n_steps`` optimizer steps) of ``trainer.fit``, evaluate the module's
    model on lm-eval ``tasks``, or generate for ``prompts`` and average ``score_fn(output_text, prompt)``; log the
    metrics as ``{prefix}{task}/{metric}``. Other keyword arguments are ``BatcherConfig`` fields (the KV cache takes
    ``memory_fraction`` of the memory free at that moment; it and the graphs are released afterwards; ``compile`` and
    ``fuse_projections`` default to False here).
    """

    def __init__(
        self,
        tasks: Optional[Sequence[str]] = None,
        *,
        prompts: Optional[Sequence[Any]] = None,
        score_fn: Optional[ScoreFn] = None,
        sampling: Optional[SamplingParams] = None,
        every_n_epochs: Optional[int] = 1,
        every_n_steps: Optional[int] = None,
        num_fewshot: Optional[int] = None,
        limit: Optional[float] = None,
        include_path: Optional[str] = None,
        gen_kwargs: Optional[dict] = None,
        apply_chat_template: bool = False,
        fewshot_as_multiturn: bool = False,
        seed: int = 0,
        prefix: str = "eval/",
        tokenizer: Any = None,
        model_attr: Optional[str] = None,
        memory_fraction: float = 0.3,
        **batcher_overrides: Any,
    ) -> None:
        if (tasks is None) == (prompts is None):
            raise ValueError("GenerationEvaluation needs either tasks=[...] (lm-eval) or prompts=[...] with score_fn")
        if prompts is not None and not callable(score_fn):
            raise ValueError("GenerationEvaluation(prompts=...) needs score_fn(output_text, prompt) -> float or dict")
        if (every_n_epochs is None) == (every_n_steps is None):
            raise ValueError("GenerationEvaluation: set exactly one of every_n_epochs and every_n_steps")
        for name, every in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if every is not None and (not isinstance(every, int) or every < 1):
                raise ValueError(f"GenerationEvaluation: {name}={every!r} is invalid: expected a positive int")
        moving = sorted({"device", "dtype"} & set(batcher_overrides))
        if moving:
            raise ValueError(f"GenerationEvaluation: {moving} would move or cast the model being trained; the engine "
                             "runs it where and as it is")
        # Uncompiled unless asked: an evaluation during training is short, and compiling would add its start-up
        # (10-25 s) to every one of them.
        batcher_overrides.setdefault("compile", False)
        # The model being trained keeps its own parameter storage (optimizers, DDP and FSDP hold views of it):
        # projections are not fused here unless asked.
        batcher_overrides.setdefault("fuse_projections", False)
        self.config = BatcherConfig.from_overrides(None, memory_fraction=memory_fraction, **batcher_overrides)
        if self.config.tensor_parallel_size > 1:
            raise ValueError("GenerationEvaluation: tensor_parallel_size > 1 is not supported yet (the model being "
                             "trained is not sharded by transformers' TP plan); use tensor_parallel_size=1")
        self.tasks, self.prompts, self.score_fn = (list(tasks) if tasks else None), prompts, score_fn
        self.sampling = sampling or SamplingParams(max_new_tokens=64)
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.lm_eval_args = dict(num_fewshot=num_fewshot, limit=limit, gen_kwargs=gen_kwargs,
                                 apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn,
                                 random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                 fewshot_random_seed=seed, bootstrap_iters=0)
        self.include_path = include_path
        self.prefix, self.tokenizer, self.model_attr = prefix, tokenizer, model_attr
        self.history: list[dict] = []  # {"epoch", "step", metrics...} per evaluation (every rank holds all of it)
        self._last_step = -1

    # --- when -------------------------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._log(pl_module, self.evaluate(trainer, pl_module), on_step=False)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps: with gradient accumulation several batches share one
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self._log(pl_module, self.evaluate(trainer, pl_module), on_step=True)

    def _log(self, pl_module: LightningModule, metrics: dict[str, float], on_step: bool) -> None:
        # Every rank holds the same (already reduced) values, so no sync is needed.
        for key, value in metrics.items():
            pl_module.log(self.prefix + key, float(value), on_step=on_step, on_epoch=not on_step, sync_dist=False)

    # --- what -------------------------------------------------------------------------------------------------
    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Evaluate now and return the metrics (the same on every rank); training state is restored afterwards."""
        from ..lm_eval import AsyncBatchingLM

        model = find_generation_model(pl_module, self.model_attr)
        tokenizer = find_generation_tokenizer(pl_module, self.tokenizer)
        modes = [(m, m.training) for m in pl_module.modules()]
        rng = _rng_state()
        lm = None
        try:
            pl_module.eval()
            lm = AsyncBatchingLM(pretrained=model, tokenizer=tokenizer, **_fields(self.config))
            metrics = self._tasks(lm) if self.tasks else self._prompts(lm)
        finally:
            if lm is not None:
                lm.close()  # the KV cache and the CUDA graphs go
            del lm
            for module, training in modes:  # exactly as found (a frozen submodule may have been in eval mode)
                module.training = training
            _set_rng_state(rng)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})
        return metrics

    def _tasks(self, lm) -> dict[str, float]:
        import lm_eval

        from ..lm_eval import cache_templates, task_manager

        cache_templates()  # lm-eval compiles each prompt template once, not on every document (same text)
        manager = task_manager(self.tasks, self.include_path)
        results = lm_eval.simple_evaluate(model=lm, tasks=self.tasks, task_manager=manager, log_samples=False,
                                          **self.lm_eval_args)
        metrics = {}
        for task, values in (results or {}).get("results", {}).items():  # rank 0 has them; lm-eval gathered
            for key, value in values.items():
                if "," in key and "_stderr" not in key and isinstance(value, (int, float)):
                    metric, filter_name = key.split(",", 1)
                    metrics[f"{task}/{metric}" if filter_name == "none" else f"{task}/{metric}:{filter_name}"] = value
        return _broadcast(metrics, lm.world_size)

    def _prompts(self, lm) -> dict[str, float]:
        """Each rank generates for its shard of the prompts; the scores are averaged over all prompts."""
        mine = list(self.prompts)[lm.rank::lm.world_size]
        texts = [p.get("prompt") if isinstance(p, dict) else p for p in mine]
        results = lm.batcher.generate(texts, self.sampling) if texts else []
        scores: dict[str, list[float]] = {}
        for prompt, r in zip(mine, results):
            value = self.score_fn(r.text, prompt)
            for key, v in (value.items() if isinstance(value, dict) else [("score", value)]):
                scores.setdefault(key, []).append(float(v))
        parts = [scores]
        if lm.world_size > 1:
            parts = [None] * lm.world_size
            torch.distributed.all_gather_object(parts, scores)
        merged: dict[str, list[float]] = {}
        for part in parts:
            for key, values in part.items():
                merged.setdefault(key, []).extend(values)
        return {key: sum(values) / len(values) for key, values in merged.items()}


def _fields(config: BatcherConfig) -> dict:
    return {k: v for k, v in vars(config).items() if k not in ("device", "dtype")}


def _broadcast(metrics: dict, world_size: int) -> dict:
    """Rank 0's metrics on every rank (lm-eval returns them on rank 0 only)."""
    if world_size > 1:
        box = [metrics]
        torch.distributed.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def _rng_state() -> dict:
    """lm-eval seeds python, numpy and torch; training's random streams are put back afterwards."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = ["GenerationEvaluation"]
