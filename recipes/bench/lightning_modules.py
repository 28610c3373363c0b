"""The LightningModules the benchmark predicts with: today's padded ``generate`` loop, and a module for the plugin."""

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
        ttft = None if clock.first_token_s is None else clock.first_token_s - self.run_start_s
        return {"new_tokens": [new] * rows, "token_ids": out[:, prompt_width:].tolist(), "ttft_s": [ttft] * rows}


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
