"""ContinuousBatching: the Lightning callback that sends ``trainer.predict`` through a continuous batcher.

It installs ``ContinuousPredictionLoop`` as ``trainer.predict_loop`` in ``setup`` and puts Lightning's own loop
back at teardown. Lightning's ``plugins=`` takes only precision/IO/environment plugins, so a callback is the way in.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..config import BatcherConfig
from ..request import SamplingParams
from ..tensor_parallel import trainer_tensor_parallel_size
from .loop import ContinuousPredictionLoop
from .progress import GenerationStats, format_summary, request_bar_for
from .settings import PredictSettings


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
        self.settings = PredictSettings(SamplingParams() if sampling is None else sampling, on_error, lookahead, ordered)
        self.config = BatcherConfig.from_overrides(config, **batcher_overrides)
        self.tokenizer = tokenizer
        self.model_attr = model_attr
        self.request_progress = request_progress  # Lightning's TQDM/Rich bar counts requests and tokens/s
        self.log_summary = log_summary
        self.stats: Optional[GenerationStats] = None  # this rank's, after predict
        self.summary: Optional[dict] = None  # all ranks', after predict
        self._loop: Optional[ContinuousPredictionLoop] = None
        self._lightning_loop = None
        self._stock_bar: Optional[tuple[Callback, Callback]] = None  # (Lightning's bar, the request bar in its place)

    # --- installation ------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict" or isinstance(trainer.predict_loop, ContinuousPredictionLoop):
            return
        self.stats = self.summary = None
        # Looked up now, so that a build_batcher set on this instance (e.g. by a benchmark) is the one used.
        self._loop = ContinuousPredictionLoop.replacing(trainer.predict_loop, self.settings, self.build_batcher)
        self._lightning_loop = trainer.predict_loop
        trainer.predict_loop = self._loop
        bar = trainer.progress_bar_callback
        if self.request_progress and bar is not None and (counting := request_bar_for(bar)) is not None:
            trainer.callbacks[trainer.callbacks.index(bar)] = counting
            counting.setup(trainer, pl_module, stage)
            self._stock_bar = (bar, counting)

    def uninstall(self, trainer: Trainer) -> None:
        """Give Lightning its own predict loop and progress bar back (idempotent)."""
        if self._loop is not None:
            self._loop.teardown()  # on an exception Lightning tears down the loop it finds, which is then its own
            trainer.predict_loop = self._lightning_loop
            self._loop = self._lightning_loop = None
        if self._stock_bar is not None:
            stock, counting = self._stock_bar
            if counting in trainer.callbacks:
                trainer.callbacks[trainer.callbacks.index(counting)] = stock
            self._stock_bar = None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.uninstall(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.uninstall(trainer)  # Lightning calls no teardown hooks after an exception

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._loop is None:
            return
        self.stats = self._loop.stats
        parts = [self.stats]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, self.stats)
            parts = parts[::trainer_tensor_parallel_size(trainer)]  # a tensor-parallel group counts once
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

        return ContinuousBatcher(self.find_model(module), self.find_tokenizer(module),
                                 config=self.config_for(module.trainer))

    def config_for(self, trainer: Trainer) -> BatcherConfig:
        """The batcher's config on this trainer: the tensor-parallel size is the strategy's (``TensorParallelStrategy``
        groups the ranks and shards the data); setting another one is an error."""
        size, asked = trainer_tensor_parallel_size(trainer), self.config.tensor_parallel_size
        if asked not in (1, size):
            why = ("it is not a TensorParallelStrategy (trainer=tp), so every rank reads its own data"
                   if size == 1 else f"it groups {size} ranks")
            raise ValueError(f"BatcherConfig.tensor_parallel_size={asked} does not fit the trainer's strategy "
                             f"{type(trainer.strategy).__name__}: {why}; use TensorParallelStrategy(tensor_parallel_"
                             f"size={asked}) (trainer=tp trainer.strategy.tensor_parallel_size={asked})")
        return BatcherConfig.from_overrides(self.config, tensor_parallel_size=size)


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


__all__ = ["ContinuousBatching", "find_generation_model", "find_generation_tokenizer"]
