"""Requests from DataLoader batches: prompts to generate from, or contexts whose continuations are scored."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Optional, Union

import torch

from ..request import SamplingParams

Tokens = Union[str, list[int]]

_TEXT_KEYS = ("prompt", "text")
_SCORE_KEYS = ("context", "continuation", "choices")
_BATCH_KEYS = frozenset(("input_ids", "attention_mask") + _TEXT_KEYS + _SCORE_KEYS)
_SCALARS = (str, int, float, bool, type(None))


class BatchItem(NamedTuple):
    """One request taken from a batch: the prompt for the engine, its sampling, and what the output file shows.

    With ``continuation`` (or ``choices``) the row is scored instead: ``prompt`` is the context.
    """

    prompt: Tokens  # the generation prompt, or the scoring context
    sampling: Optional[SamplingParams] = None
    text: Optional[str] = None  # readable prompt for the output; the prompt itself when it is a string
    meta: Optional[dict] = None  # per-row columns of a dict batch (ids, labels), copied to the output
    continuation: Optional[Tokens] = None  # score this continuation of ``prompt`` (a ScoreResult)
    choices: Optional[list[Tokens]] = None  # score each of these (a list of ScoreResults, in order)


def batch_items(module: Any, batch: Any) -> list[BatchItem]:
    """The requests of one batch: ``module.batch_to_requests(batch)`` if defined, else read from the batch."""
    convert = getattr(module, "batch_to_requests", None)
    if callable(convert):
        return [_as_item(x) for x in convert(batch)]
    return items_from_batch(batch)


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


def _sequences(column: Any) -> list[Any]:
    """A column of strings or token-id rows as a list, one entry per row (tensors become lists of ints)."""
    if isinstance(column, str):
        return [column]
    if isinstance(column, torch.Tensor) or (column and all(isinstance(t, int) for t in column)):
        return _token_rows(column, None)  # a flat list of ids is one row
    return [x.tolist() if isinstance(x, torch.Tensor) else (list(x) if isinstance(x, tuple) else x) for x in column]


def _score_items(batch: Mapping) -> list[BatchItem]:
    """Rows with ``context`` and ``continuation`` (one score each) or ``choices`` (a list of continuations each)."""
    contexts = _sequences(batch["context"])
    n = len(contexts)
    if "choices" in batch:
        choices = [_sequences(c) for c in batch["choices"]]
        if len(choices) != n:
            raise ValueError(f"a scoring batch has {n} contexts but {len(choices)} rows of choices")
        continuations: list[Any] = [None] * n
    elif "continuation" in batch:
        continuations = _sequences(batch["continuation"])
        if len(continuations) != n:
            raise ValueError(f"a scoring batch has {n} contexts but {len(continuations)} continuations")
        choices = [None] * n
    else:
        raise TypeError(f"a batch dict with 'context' needs 'continuation' or 'choices' (got keys {sorted(map(str, batch))})")
    metas = _row_columns(batch, n)
    return [BatchItem(ctx, None, ctx if isinstance(ctx, str) else None, meta, cont, ch)
            for ctx, cont, ch, meta in zip(contexts, continuations, choices, metas)]


def items_from_batch(batch: Any) -> list[BatchItem]:
    """Requests from a dict batch (``input_ids`` [+ ``attention_mask``], ``prompt``/``text``, or ``context`` with
    ``continuation``/``choices`` to score) or a list of strings."""
    if isinstance(batch, Mapping):
        if "context" in batch:
            return _score_items(batch)
        texts = next((batch[k] for k in _TEXT_KEYS if k in batch), None)
        texts = [texts] if isinstance(texts, str) else texts
        if "input_ids" in batch:
            prompts: list = _token_rows(batch["input_ids"], batch.get("attention_mask"))
        elif texts is not None:
            prompts = list(texts)
        else:
            raise TypeError(
                f"a batch dict needs 'input_ids', 'prompt', 'text' or 'context' (got keys {sorted(map(str, batch))}); "
                "or define batch_to_requests(batch) on the LightningModule"
            )
        n = len(prompts)
        if texts is None or len(texts) != n:
            texts = [p if isinstance(p, str) else None for p in prompts]
        return [BatchItem(p, None, t, m) for p, t, m in zip(prompts, texts, _row_columns(batch, n))]
    if isinstance(batch, (list, tuple)) and all(isinstance(x, str) for x in batch):
        return [BatchItem(x, None, x) for x in batch]
    raise TypeError(
        f"cannot read requests from a batch of type {type(batch).__name__}: yield dicts with 'input_ids', 'prompt' "
        "or 'context', or define batch_to_requests(batch) on the LightningModule"
    )


__all__ = ["BatchItem", "batch_items", "items_from_batch"]
