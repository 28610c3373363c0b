"""The Lightning plugin: with ``Trainer(callbacks=[ContinuousBatching(...)])``, ``trainer.predict`` generates
through a continuous batcher; ``GenerationEvaluation(...)`` evaluates the model being trained in ``trainer.fit``."""

from .batch import BatchItem, items_from_batch
from .callback import ContinuousBatching, find_generation_model, find_generation_tokenizer
from .evaluation import GenerationEvaluation
from .loop import ContinuousPredictionLoop
from .progress import GenerationStats, RequestRichProgressBar, RequestTQDMProgressBar, format_summary
from .record import RequestRecord
from .settings import ON_ERROR, PredictSettings
from .strategy import TensorParallelStrategy
from .writer import JsonlPredictionWriter, merge_jsonl

__all__ = [
    "ContinuousBatching", "ContinuousPredictionLoop", "JsonlPredictionWriter", "RequestRecord", "BatchItem",
    "GenerationStats", "RequestTQDMProgressBar", "RequestRichProgressBar", "format_summary", "items_from_batch",
    "merge_jsonl", "PredictSettings", "ON_ERROR", "GenerationEvaluation", "find_generation_model",
    "find_generation_tokenizer", "TensorParallelStrategy",
]
