"""Asynchronous continuous batching for LLM generation in PyTorch Lightning predict loops."""

from .batcher import ContinuousBatcher
from .config import BatcherConfig
from .request import GenerationResult, SamplingParams

__all__ = ["ContinuousBatcher", "BatcherConfig", "GenerationResult", "SamplingParams"]
__version__ = "0.1.0"
