"""The Lightning plugin: with ``Trainer(callbacks=[ContinuousBatching(...)])``, ``trainer.predict`` generates
through a continuous batcher."""

from .callback import BatchItem, ContinuousBatching, items_from_batch
from .loop import ContinuousPredictionLoop, RequestRecord
from .progress import GenerationStats, RequestRichProgressBar, RequestTQDMProgressBar, format_summary
from .writer import JsonlPredictionWriter, merge_jsonl

__all__ = [
    "ContinuousBatching", "ContinuousPredictionLoop", "JsonlPredictionWriter", "RequestRecord", "BatchItem",
    "GenerationStats", "RequestTQDMProgressBar", "RequestRichProgressBar", "format_summary", "items_from_batch",
    "merge_jsonl",
]
