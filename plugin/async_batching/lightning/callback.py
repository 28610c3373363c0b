"""ContinuousBatching: the Lightning callback that sends ``trainer.predict`` through a continuous batcher.

It installs ``ContinuousPredictionLoop`` as ``trainer.predict_loop`` in ``setup`` and puts Lightning's own loop
back at teardown. Lightning's ``plugins=`` takes only precision/IO/environment plugins, so a callback is the way in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..config import BatcherConfig
from ..job_config import ON_ERROR
from ..request import SamplingParams
from .loop import ContinuousPredictionLoop
from .progress import GenerationStats, count_requests, format_summary

_TEXT_KEYS = ("prompt", "text")
_BATCH_KEYS = frozenset(("input_ids", "attention_mask") + _TEXT_KEYS)
_SCALARS = (str, int, float, bool, type(None))


class BatchItem(NamedTuple):
    """One request taken from a batch: the prompt for the engine, its sampling, and what the output file shows."""

    prompt: Union[str, list[int]]
    sampling: Optional[SamplingParams] = None
    text: Optional[str] = None  # readable prompt for the output; the prompt itself when it is a string
    meta: Optional[dict] = None  # per-row columns of a dict batch (ids, labels), copied to the output


class ContinuousBatching(Callback):
    """Generate in ``trainer.predict`` with a continuous batcher instead of the module's ``predict_step``.

    ``ContinuousBatching(sampling=SamplingParams(max_new_tokens=64), max_batch_tokens=4096)``: keyword arguments
    other than the ones below are ``BatcherConfig`` fields.
    """

    def __init__(
        self,
        sampling: Optional[SamplingParams] = None,
        *,
        config: Union[BatcherConfig, dict, None] = None,
        tokenizer: Any = None,
        model_attr: Optional[str] = None,
        on_error: str = "skip",
        lookahead: Optional[int] = None,
        ordered: bool = True,
        request_progress: bool = True,
        log_summary: bool = True,
        **batcher_overrides: Any,
    ) -> None:
        self.sampling = SamplingParams() if sampling is None else sampling
        if not isinstance(self.sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(self.sampling).__name__}")
        if problems := self.sampling.problems():
            raise ValueError("ContinuousBatching sampling: " + "; ".join(problems))
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r} is invalid: expected one of {ON_ERROR}")
        if lookahead is not None and (not isinstance(lookahead, int) or lookahead < 1):
            raise ValueError(f"lookahead={lookahead!r} is invalid: expected a positive int or None (max_num_seqs)")
        self.config = BatcherConfig.from_overrides(config, **batcher_overrides)
        self.tokenizer = tokenizer
        self.model_attr = model_attr
        self.on_error = on_error
        self.lookahead = lookahead  # keep feeding while fewer requests than this wait for admission
        self.ordered = ordered  # batch hooks in DataLoader order (True) or as batches finish (False)
        self.request_progress = request_progress  # Lightning's TQDM/Rich bar counts requests and tokens/s
        self.log_summary = log_summary
        self.stats: Optional[GenerationStats] = None  # this rank's, after predict
        self.summary: Optional[dict] = None  # all ranks', after predict
        self._lightning_loop = None
        self._bar_class: Optional[type] = None

    # --- installation ------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict" or isinstance(trainer.predict_loop, ContinuousPredictionLoop):
            return
        self.stats = self.summary = None
        lightning_loop = trainer.predict_loop
        loop = ContinuousPredictionLoop(trainer, self, inference_mode=lightning_loop.inference_mode)
        # trainer.predict() has already attached the dataloaders and return_predictions to Lightning's loop.
        loop._data_source = lightning_loop._data_source
        loop._return_predictions = lightning_loop._return_predictions
        self._lightning_loop = lightning_loop
        trainer.predict_loop = loop
        if self.request_progress and trainer.progress_bar_callback is not None:
            self._bar_class = count_requests(trainer.progress_bar_callback)

    def uninstall(self, trainer: Trainer) -> None:
        """Give Lightning its own predict loop and progress bar back (idempotent)."""
        if self._lightning_loop is not None:
            trainer.predict_loop = self._lightning_loop
            self._lightning_loop = None
        if self._bar_class is not None and trainer.progress_bar_callback is not None:
            trainer.progress_bar_callback.__class__ = self._bar_class
            self._bar_class = None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.uninstall(trainer)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.stats is None:
            return
        parts = [self.stats]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, self.stats)
        self.summary = GenerationStats.combine(parts).summary()
        if self.log_summary:
            rank_zero_info("ContinuousBatching\n" + format_summary(self.summary))

    # --- what the module provides ------------------------------------------------------------------------------
    def find_model(self, module: LightningModule) -> torch.nn.Module:
        """``module.get_generation_model()``, else ``model_attr``, else the module's single PreTrainedModel child."""
        return find_generation_model(module, self.model_attr)

    def find_tokenizer(self, module: LightningModule) -> Any:
        """The callback's tokenizer, else ``module.get_generation_tokenizer()``, else its ``tokenizer`` attribute."""
        return find_generation_tokenizer(module, self.tokenizer)

    def build_batcher(self, module: LightningModule):
        """A fresh engine for one predict run, on the device Lightning put the model on."""
        from ..batcher import ContinuousBatcher

        return ContinuousBatcher(self.find_model(module), self.find_tokenizer(module), config=self.config)

    def batch_items(self, module: LightningModule, batch: Any) -> list[BatchItem]:
        """The requests of one batch: ``module.batch_to_requests(batch)`` if defined, else read from the batch."""
        convert = getattr(module, "batch_to_requests", None)
        if callable(convert):
            return [_as_item(x) for x in convert(batch)]
        return items_from_batch(batch)


def find_generation_model(module: LightningModule, model_attr: Optional[str] = None) -> torch.nn.Module:
    """``module.get_generation_model()``, else ``model_attr``, else the module's single PreTrainedModel child."""
    if callable(getattr(module, "get_generation_model", None)):
        return module.get_generation_model()
    if model_attr is not None:
        return getattr(module, model_attr)
    from transformers import PreTrainedModel

    found = [name for name, child in module.named_children() if isinstance(child, PreTrainedModel)]
    if len(found) == 1:
        return getattr(module, found[0])
    what = f"several ({found})" if found else "no"
    raise ValueError(
        f"{type(module).__name__} has {what} transformers PreTrainedModel attributes: define "
        "get_generation_model() on it or pass model_attr='...' to the callback"
    )


def find_generation_tokenizer(module: LightningModule, tokenizer: Any = None) -> Any:
    """``tokenizer`` if given, else ``module.get_generation_tokenizer()``, else the module's ``tokenizer`` attribute."""
    if tokenizer is not None:
        return tokenizer
    if callable(getattr(module, "get_generation_tokenizer", None)):
        return module.get_generation_tokenizer()
    return getattr(module, "tokenizer", None)


def _as_item(x: Any) -> BatchItem:
    if isinstance(x, BatchItem):
        return x
    sampling = None
    if isinstance(x, tuple) and len(x) == 2 and (x[1] is None or isinstance(x[1], SamplingParams)):
        x, sampling = x
    if isinstance(x, torch.Tensor) and x.dim() == 1:
        x = x.tolist()
    return BatchItem(x, sampling, x if isinstance(x, str) else None)


def _token_rows(ids: Any, mask: Any) -> list[list[int]]:
    """Rows of token ids without padding: the positions where ``attention_mask`` is 1 (left or right padding)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu()
        ids = ids[None] if ids.dim() == 1 else ids
        if mask is None:
            return ids.tolist()
        mask = torch.as_tensor(mask).detach().cpu().reshape(ids.shape).bool()
        return [row[keep].tolist() for row, keep in zip(ids, mask)]
    ids = list(ids)
    if ids and all(isinstance(t, int) for t in ids):
        ids = [ids]
    if mask is None:
        return [list(row) for row in ids]
    mask = mask.tolist() if isinstance(mask, torch.Tensor) else mask
    return [[t for t, m in zip(row, keep) if m] for row, keep in zip(ids, mask)]


def _row_columns(batch: Mapping, n: int) -> list[Optional[dict]]:
    """Per-row scalar columns of a dict batch (e.g. ``id``), so the output file can carry them."""
    columns = {}
    for key, value in batch.items():
        if key in _BATCH_KEYS:
            continue
        if isinstance(value, torch.Tensor) and value.dim() == 1 and len(value) == n:
            columns[key] = value.tolist()
        elif isinstance(value, (list, tuple)) and len(value) == n and all(isinstance(v, _SCALARS) for v in value):
            columns[key] = list(value)
    if not columns:
        return [None] * n
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def items_from_batch(batch: Any) -> list[BatchItem]:
    """Requests from a dict batch (``input_ids`` [+ ``attention_mask``] or ``prompt``/``text``) or a list of strings."""
    if isinstance(batch, Mapping):
        texts = next((batch[k] for k in _TEXT_KEYS if k in batch), None)
        texts = [texts] if isinstance(texts, str) else texts
        if "input_ids" in batch:
            prompts: list = _token_rows(batch["input_ids"], batch.get("attention_mask"))
        elif texts is not None:
            prompts = list(texts)
        else:
            raise TypeError(
                f"a batch dict needs 'input_ids', 'prompt' or 'text' (got keys {sorted(map(str, batch))}); "
                "or define batch_to_requests(batch) on the LightningModule"
            )
        n = len(prompts)
        if texts is None or len(texts) != n:
            texts = [p if isinstance(p, str) else None for p in prompts]
        return [BatchItem(p, None, t, m) for p, t, m in zip(prompts, texts, _row_columns(batch, n))]
    if isinstance(batch, (list, tuple)) and all(isinstance(x, str) for x in batch):
        return [BatchItem(x, None, x) for x in batch]
    raise TypeError(
        f"cannot read requests from a batch of type {type(batch).__name__}: yield dicts with 'input_ids' or "
        "'prompt', or define batch_to_requests(batch) on the LightningModule"
    )


__all__ = ["ContinuousBatching", "BatchItem", "items_from_batch", "find_generation_model", "find_generation_tokenizer"]
