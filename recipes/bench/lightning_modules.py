"""The LightningModules the benchmark predicts with: today's padded ``generate`` and scoring loops, and a module for
the plugin."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from transformers.generation.streamers import BaseStreamer


class FirstTokenClock(BaseStreamer):
    """Notes when ``generate`` hands over its first new token (its second ``put``: the first one is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_s: float | None = None

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_s = time.perf_counter()

    def end(self) -> None:
        pass


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Collate prompts into a left-padded batch, as decoder-only ``generate`` needs."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def left_pad_with_budgets(items: list[tuple[list[int], int]]) -> dict[str, Any]:
    """Collate (prompt, new-token budget) pairs: the padded batch plus each request's budget."""
    batch = left_pad([p for p, _ in items])
    batch["budgets"] = [b for _, b in items]
    return batch


def left_pad_pairs(items: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
    """Collate (context, continuation) pairs into one left-padded batch of context + continuation."""
    batch = left_pad([c + x for c, x in items])
    batch["continuation_lens"] = [len(x) for _, x in items]
    return batch


class PaddedGenerate(L.LightningModule):
    """What Lightning users write today: ``predict_step`` calls ``model.generate`` on a padded batch."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.generation_config = None
        self.run_start_s = 0.0  # set by the caller right before trainer.predict, the origin of TTFT

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        clock = FirstTokenClock()
        out = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            generation_config=self.generation_config,
            streamer=clock,
        )
        rows, prompt_width = batch["input_ids"].shape
        new = out.shape[1] - prompt_width
        budgets = batch.get("budgets") or [new] * rows  # the batch ran to its largest budget; each counts its own
        ttft = None if clock.first_token_s is None else clock.first_token_s - self.run_start_s
        token_ids = [ids[:b] for ids, b in zip(out[:, prompt_width:].tolist(), budgets)]
        return {"new_tokens": [min(new, b) for b in budgets], "token_ids": token_ids, "ttft_s": [ttft] * rows}


class PaddedScore(L.LightningModule):
    """Scoring as a Lightning user writes it: one forward per padded batch, log-softmax over the continuation slice.

    Left padding puts every continuation at the end, so ``logits_to_keep`` limits the LM head to the last positions.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        ids, mask, lens = batch["input_ids"], batch["attention_mask"], batch["continuation_lens"]
        keep = max(lens) + 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # row j predicts token -keep + 1 + j
        targets = ids[:, -keep + 1 :]
        picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        cols = torch.arange(picked.shape[1], device=picked.device)
        first = picked.shape[1] - torch.tensor(lens, device=picked.device)  # each row's continuation starts here
        sums = (picked * (cols.unsqueeze(0) >= first.unsqueeze(1))).sum(-1).tolist()
        return {"scored_tokens": list(lens), "logprob": sums}


class PromptsModule(L.LightningModule):
    """A user's module for the plugin: it holds the HF model as ``self.model``; the plugin drives generation."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        return batch


def trainer(device: str, callbacks: list | None = None) -> L.Trainer:
    """A quiet single-device Trainer for predict."""
    return L.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        callbacks=callbacks or [],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
