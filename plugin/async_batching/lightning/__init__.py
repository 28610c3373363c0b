"""The Lightning plugin: with ``Trainer(callbacks=[ContinuousBatching(...)])``, ``trainer.predict`` generates
through a continuous batcher; ``GenerationEvaluation(...)`` evaluates the model being trained in ``trainer.fit``."""

from .callback import BatchItem, ContinuousBatching, find_generation_model, find_generation_tokenizer, items_from_batch
from .evaluation import GenerationEvaluation
from .loop import ContinuousPredictionLoop, RequestRecord
from .progress import GenerationStats, RequestRichProgressBar, RequestTQDMProgressBar, format_summary
from .writer import JsonlPredictionWriter, merge_jsonl

__all__ = [
    "ContinuousBatching", "ContinuousPredictionLoop", "JsonlPredictionWriter", "RequestRecord", "BatchItem",
    "GenerationStats", "RequestTQDMProgressBar", "RequestRichProgressBar", "format_summary", "items_from_batch",
    "merge_jsonl", "GenerationEvaluation", "find_generation_model", "find_generation_tokenizer",
]
