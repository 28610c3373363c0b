"""The main job: generate over a prompt set through ``trainer.predict`` with the ``ContinuousBatching`` callback.

    python recipes/generate.py                      # built-in SmolLM2 on CPU over 16 chat prompts
    python recipes/generate.py model=pretrained model.name=Qwen/Qwen2.5-0.5B-Instruct trainer=gpu \
        batcher.max_batch_tokens=8192 data.path=prompts.jsonl
    python recipes/generate.py -m batcher.mode=sync,async batcher.max_batch_tokens=512,2048
    python recipes/collect_sweep.py multirun/generate/<date>/<time>

Writes ``predictions.jsonl`` (one line per request, resumable) and ``summary.json`` in the Hydra run directory.
Rerunning with the same ``hydra.run.dir`` skips the requests already written.
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys
import time
from typing import Any, Optional

try:
    import async_batching  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugin"))

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from async_batching.hydra_conf import register_configs
from async_batching.job_config import DataConfig, GenerateConfig
from async_batching.lightning import ContinuousBatching, JsonlPredictionWriter, format_summary
from async_batching.models import load_model

BUILTIN_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts.txt")

register_configs()


class PromptModule(L.LightningModule):
    """A user's module: it holds the model and its tokenizer; ``ContinuousBatching`` does the generating."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        raise RuntimeError("this module generates through the ContinuousBatching callback")


def read_rows(cfg: DataConfig, vocab_size: int) -> list[dict[str, Any]]:
    """Prompt rows ``{"id", "text" | "messages" | "input_ids"}`` from random ids, a file or the built-in prompts."""
    if cfg.random_prompts > 0:
        rng = random.Random(0)
        lo, hi = cfg.prompt_len
        rows = [{"id": i, "input_ids": [rng.randrange(3, vocab_size) for _ in range(rng.randint(lo, hi))]}
                for i in range(cfg.random_prompts)]
    else:
        path = hydra.utils.to_absolute_path(cfg.path) if cfg.path else BUILTIN_PROMPTS
        ext = os.path.splitext(path)[1].lower()
        if ext in (".jsonl", ".json"):
            rows = [_record_row(i, obj, cfg.column) for i, obj in enumerate(_json_objects(path))]
        elif ext == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                rows = [_record_row(i, obj, cfg.column) for i, obj in enumerate(csv.DictReader(f))]
        else:
            with open(path, encoding="utf-8") as f:
                rows = [{"id": i, "text": line.strip()} for i, line in enumerate(f) if line.strip()]
    rows = rows[: cfg.limit] if cfg.limit else rows
    return rows * cfg.repeat


def _json_objects(path: str) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _record_row(i: int, obj: Any, column: str) -> dict[str, Any]:
    value = obj.get(column) if isinstance(obj, dict) else None
    key = "messages" if isinstance(value, list) else "text"
    row_id = obj.get("id", i) if isinstance(obj, dict) else i
    return {"id": row_id, key: value if isinstance(value, (list, str)) else ""}  # missing: an invalid, empty prompt


class PromptDataset(Dataset):
    """Rows tokenized on access (in DataLoader workers when there are any), chat template applied."""

    def __init__(self, rows: list[dict[str, Any]], tokenizer: Any, cfg: DataConfig) -> None:
        if tokenizer is None and any("input_ids" not in r for r in rows):
            raise ValueError("the model has no tokenizer, so text prompts cannot be encoded: use data=random "
                             "(token-id prompts) or a model with a tokenizer")
        self.rows, self.tokenizer, self.cfg = rows, tokenizer, cfg

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        if "input_ids" in row:
            return {"id": row["id"], "prompt": None, "input_ids": row["input_ids"]}
        messages = row.get("messages") or ([{"role": "user", "content": row["text"]}] if row.get("text") else [])
        shown = row.get("text") or (messages[-1].get("content", "") if messages else "")
        if not messages:
            return {"id": row["id"], "prompt": shown, "input_ids": []}  # the engine reports it as an empty prompt
        tok = self.tokenizer
        if self.cfg.chat_template and getattr(tok, "chat_template", None):
            if self.cfg.system_prompt:
                messages = [{"role": "system", "content": self.cfg.system_prompt}] + messages
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok("\n".join(m.get("content", "") for m in messages))["input_ids"]
        return {"id": row["id"], "prompt": shown, "input_ids": list(ids)}


def collate(examples: list[dict[str, Any]]) -> dict[str, list]:
    """Columns as plain lists, no padding: the engine packs the prompts itself."""
    return {key: [ex[key] for ex in examples] for key in examples[0]}


def show_samples(path: str, n: int) -> None:
    if n <= 0 or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("error") is not None:
                continue
            prompt = row["prompt"] if isinstance(row["prompt"], str) else f"<{len(row['prompt'])} token ids>"
            samples = row.get("samples") or [row]  # n > 1: one line per prompt holds all its samples
            first = samples[0]
            output = first.get("output", first.get("text"))
            output = output if output is not None else f"token ids {first.get('token_ids', [])[:16]}"
            more = f"\n(+ {len(samples) - 1} more samples)" if len(samples) > 1 else ""
            print(f"--- [{row['index']}] {prompt.strip()[:200]}\n{output.strip()[:400]}{more}\n")
            n -= 1
            if n == 0:
                return


def run(job: GenerateConfig, trainer_cfg: DictConfig, run_dir: str, overrides: Optional[list[str]] = None) -> dict:
    """Load the model and prompts, predict through ContinuousBatching, write the outputs; returns the summary."""
    L.seed_everything(job.seed, verbose=False)
    t0 = time.perf_counter()
    model, tokenizer = load_model(job.model.name, dtype=job.model.dtype)
    load_s = time.perf_counter() - t0
    dataset = PromptDataset(read_rows(job.data, model.config.vocab_size), tokenizer, job.data)
    loader = DataLoader(dataset, batch_size=job.data.batch_size, shuffle=False, num_workers=job.data.num_workers,
                        collate_fn=collate)
    batching = ContinuousBatching(
        job.sampling.params(), config=job.batcher, tokenizer=tokenizer, on_error=job.on_error, ordered=job.ordered,
        lookahead=job.lookahead, log_summary=False,
    )
    callbacks: list = [batching]
    writer = None
    if job.writer.enabled:
        w = job.writer
        writer = JsonlPredictionWriter(os.path.join(run_dir, w.path), resume=w.resume, token_ids=w.token_ids,
                                       merge=w.merge, keep_parts=w.keep_parts, retry_errors=w.retry_errors)
        callbacks.append(writer)
    extra: dict[str, Any] = {}
    if job.progress_bar == "none":
        extra["enable_progress_bar"] = False
    elif trainer_cfg.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar() if job.progress_bar == "rich" else TQDMProgressBar())
    trainer: L.Trainer = instantiate(trainer_cfg, callbacks=callbacks, **extra)
    trainer.predict(PromptModule(model, tokenizer), dataloaders=loader, return_predictions=False)

    summary = dict(batching.summary or {}, model=job.model.name, load_s=load_s, overrides=list(overrides or []))
    if trainer.is_global_zero:
        summary["output"] = writer.path if writer is not None else None
        with open(os.path.join(run_dir, job.summary_file), "w") as f:
            json.dump(summary, f, indent=2)
        if writer is not None:
            show_samples(writer.path, job.show)
        print(format_summary(summary))
        print(f"model      {job.model.name} loaded in {load_s:.1f} s")
        print(f"output     {summary['output']}\nsummary    {os.path.join(run_dir, job.summary_file)}")
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns output tokens/s so sweepers (e.g. Optuna) can optimise it."""
    job: GenerateConfig = OmegaConf.to_object(cfg)
    job.validate()
    hc = HydraConfig.get()
    summary = run(job, cfg.trainer, hc.runtime.output_dir, list(hc.overrides.task))
    return float(summary.get("output_tokens_per_s") or 0.0)


if __name__ == "__main__":
    main()
