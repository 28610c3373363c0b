"""ContinuousPredictionLoop: Lightning's prediction loop with ``predict_step`` replaced by a continuous batcher.

DataLoader batches are turned into requests and fed to the engine as they arrive, so the running batch stays full
across batch boundaries; a batch goes to ``on_predict_batch_end`` (and prediction writers) once all its requests
are done. Everything else (data setup, samplers, DDP sharding, the other hooks) is Lightning's own loop.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loops.fetchers import _DataLoaderIterDataFetcher
from lightning.pytorch.loops.prediction_loop import _PredictionLoop
from lightning.pytorch.loops.utilities import _no_grad_context
from lightning.pytorch.overrides.distributed import _IndexBatchSamplerWrapper
from lightning.pytorch.trainer import call
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ..request import GenerationResult, SamplingParams
from .progress import GenerationStats
from .writer import JsonlPredictionWriter

if TYPE_CHECKING:
    from .callback import ContinuousBatching

PROGRESS_INTERVAL_S = 0.2


@dataclass(eq=False)
class RequestRecord:
    """One request of a DataLoader batch: where it came from and, once finished, its result."""

    index: int  # the sample's dataset index (Lightning's predict sampler), the resume key with dataloader_idx
    dataloader_idx: int
    batch_idx: int
    prompt: Union[str, list[int]]
    sampling: SamplingParams
    text: Optional[str] = None
    meta: Optional[dict] = None
    result: Optional[GenerationResult] = None
    resumed: bool = False  # read back from the output of an earlier run instead of generated

    @property
    def key(self) -> tuple[int, int]:
        return (self.dataloader_idx, self.index)

    @property
    def shown_prompt(self) -> Union[str, list[int]]:
        """What the output file records as the prompt (and compares on resume)."""
        return self.text if self.text is not None else self.prompt


@dataclass(eq=False)
class _PendingBatch:
    batch: Any
    batch_idx: int
    dataloader_idx: int
    hook_args: tuple
    sample_indices: list[int]
    records: list[RequestRecord] = field(default_factory=list)
    remaining: int = 0
    slot: int = -1  # position in the stored predictions, -1 when not stored

    @property
    def done(self) -> bool:
        return self.remaining == 0


class ContinuousPredictionLoop(_PredictionLoop):
    """Runs ``trainer.predict`` through one ``ContinuousBatcher`` per run (installed by ``ContinuousBatching``)."""

    def __init__(self, trainer: Any, callback: "ContinuousBatching", inference_mode: bool = True) -> None:
        super().__init__(trainer, inference_mode=inference_mode)
        self.callback = callback
        self.stats = GenerationStats()
        self._batcher = None
        self._inflight: dict[int, RequestRecord] = {}
        self._pending: dict[tuple[int, int], _PendingBatch] = {}  # (dataloader_idx, batch_idx) -> not yet emitted
        self._queue: deque[_PendingBatch] = deque()  # the same batches in DataLoader order (ordered mode)
        self._writers: list[JsonlPredictionWriter] = []
        self._result_hooks: list = []  # callbacks with on_generation_result(trainer, module, record)
        self._progress_hooks: list = []  # callbacks with on_generation_progress(trainer, module, stats)
        self._next_request_id = 0
        self._fallback_index: dict[int, int] = {}
        self._store_predictions = False
        self._last_progress = 0.0

    @_no_grad_context
    def run(self) -> Any:
        self.setup_data()
        if self.skip:
            return None
        self.reset()
        if isinstance(self._data_fetcher, _DataLoaderIterDataFetcher):
            raise MisconfigurationException(
                "ContinuousBatching does not support a predict_step that takes `dataloader_iter`"
            )
        self.on_run_start()
        trainer = self.trainer
        self._writers = [cb for cb in trainer.callbacks if isinstance(cb, JsonlPredictionWriter)]
        self._result_hooks = [cb for cb in trainer.callbacks if hasattr(cb, "on_generation_result")]
        self._progress_hooks = [cb for cb in trainer.callbacks if hasattr(cb, "on_generation_progress")]
        writers = [cb for cb in trainer.callbacks if isinstance(cb, BasePredictionWriter)]
        self._store_predictions = self.return_predictions or any(w.interval.on_epoch for w in writers)
        self.stats = GenerationStats(total=self._expected_requests())
        self._batcher = self.callback.build_batcher(trainer.lightning_module)
        self.stats.started()
        try:
            self._generate()
            self.stats.finish(self._batcher.stats)
        finally:
            self._batcher.close()
            self._batcher = None
            self._inflight.clear()
            self._pending.clear()
            self._queue.clear()
        self.callback.stats = self.stats
        return self.on_run_end()

    def teardown(self) -> None:
        super().teardown()
        self.callback.uninstall(self.trainer)

    # --- the feed / step cycle ---------------------------------------------------------------------------------
    def _generate(self) -> None:
        batcher = self._batcher
        lookahead = self.callback.lookahead or batcher.config.max_num_seqs
        fetcher = self._data_fetcher
        exhausted = False
        while True:
            while not exhausted and batcher.num_waiting < lookahead:
                try:
                    batch, batch_idx, dataloader_idx = next(fetcher)
                except StopIteration:
                    exhausted = True
                    self.stats.total = self.stats.done + len(self._inflight)
                    break
                self.batch_progress.is_last_batch = fetcher.done
                self._submit(batch, batch_idx, dataloader_idx)
            if not batcher.has_unfinished():
                if exhausted:
                    break
                continue
            with self.trainer.profiler.profile(f"[{type(self).__name__}].engine_step"):
                finished = batcher.step()
            for result in finished:
                record = self._inflight.pop(result.index)
                result.index = record.index
                self._complete(record, result)
            self._report_progress()
        self._report_progress(force=True)

    def _submit(self, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        trainer = self.trainer
        module = trainer.lightning_module
        batch = trainer.precision_plugin.convert_input(batch)
        batch = module._on_before_batch_transfer(batch, dataloader_idx=dataloader_idx)
        # The batch stays on the host: the engine stages token ids itself, and Lightning's device transfer walks
        # every Python int of a list-of-lists batch (~20 ms per 64 prompts of 300 tokens, CPU time the GPU waits on).
        batch = module._call_batch_hook("on_after_batch_transfer", batch, dataloader_idx)
        self.batch_progress.increment_ready()
        self._store_data_for_prediction_writer(batch_idx, dataloader_idx)
        hook_args = tuple(self._build_kwargs(batch, batch_idx, dataloader_idx if self.num_dataloaders > 1 else None)
                          .values())
        call._call_callback_hooks(trainer, "on_predict_batch_start", *hook_args)
        call._call_lightning_module_hook(trainer, "on_predict_batch_start", *hook_args)
        self.batch_progress.increment_started()

        indices = self._sample_indices(batch_idx, dataloader_idx)
        pending = _PendingBatch(batch, batch_idx, dataloader_idx, hook_args, indices)
        if self._store_predictions:
            pending.slot = len(self._predictions[dataloader_idx])
            self._predictions[dataloader_idx].append(None)
        self._pending[(dataloader_idx, batch_idx)] = pending
        if self.callback.ordered:
            self._queue.append(pending)
        items = self.callback.batch_items(module, batch)
        if len(indices) != len(items):
            indices = self._fallback_indices(dataloader_idx, len(items))
        pending.records = [
            RequestRecord(i, dataloader_idx, batch_idx, item.prompt, item.sampling or self.callback.sampling,
                          item.text, item.meta)
            for i, item in zip(indices, items)
        ]
        pending.remaining = len(pending.records)
        if not pending.records:
            self._batch_done(pending)
        for record in pending.records:
            self._add(record)

    def _add(self, record: RequestRecord) -> None:
        """Submit one request, unless an earlier run already wrote it or it is invalid (then it finishes now)."""
        previous = [w.lookup(record) for w in self._writers]
        if previous and all(r is not None for r in previous):
            record.resumed = True
            self._complete(record, previous[0])
            return
        rid = self._next_request_id
        self._next_request_id += 1
        try:
            self._batcher.add_request(record.prompt, record.sampling, request_id=rid)
        except (ValueError, TypeError) as err:
            if self.callback.on_error == "raise":
                raise type(err)(f"dataset index {record.index} (batch {record.batch_idx}): {err}") from err
            prompt_len = len(record.prompt) if isinstance(record.prompt, (list, tuple)) else 0
            error = f"{type(err).__name__}: {err}"
            self._complete(record, GenerationResult(record.index, [], "error", prompt_len, error=error))
            return
        self._inflight[rid] = record

    def _complete(self, record: RequestRecord, result: GenerationResult) -> None:
        record.result = result
        self.stats.add(result, resumed=record.resumed)
        trainer = self.trainer
        for cb in self._result_hooks:
            cb.on_generation_result(trainer, trainer.lightning_module, record)
        if result.finish_reason == "error" and not record.resumed and self.callback.on_error == "raise":
            raise RuntimeError(f"dataset index {record.index} (batch {record.batch_idx}) failed: {result.error}")
        pending = self._pending[(record.dataloader_idx, record.batch_idx)]
        pending.remaining -= 1
        if pending.done:
            self._batch_done(pending)

    def _batch_done(self, pending: _PendingBatch) -> None:
        if not self.callback.ordered:
            self._emit(self._pending.pop((pending.dataloader_idx, pending.batch_idx)))
            return
        while self._queue and self._queue[0].done:
            head = self._queue.popleft()
            self._emit(self._pending.pop((head.dataloader_idx, head.batch_idx)))

    def _emit(self, pending: _PendingBatch) -> None:
        """Lightning's end-of-batch bookkeeping and hooks, once every request of the batch is done."""
        trainer = self.trainer
        module = trainer.lightning_module
        results = [r.result for r in pending.records]
        outputs = results
        post = getattr(module, "on_generation_batch_end", None)
        if callable(post):
            returned = post(results, pending.batch, pending.batch_idx)
            outputs = results if returned is None else returned
        self.batch_progress.increment_processed()
        self.current_batch_indices = pending.sample_indices
        call._call_callback_hooks(trainer, "on_predict_batch_end", outputs, *pending.hook_args)
        call._call_lightning_module_hook(trainer, "on_predict_batch_end", outputs, *pending.hook_args)
        self.batch_progress.increment_completed()
        if pending.slot >= 0:
            self._predictions[pending.dataloader_idx][pending.slot] = outputs

    # --- indices and progress ----------------------------------------------------------------------------------
    def _sample_indices(self, batch_idx: int, dataloader_idx: int) -> list[int]:
        loader = self._combined_loader.flattened[dataloader_idx]
        sampler = getattr(loader, "batch_sampler", None)
        if isinstance(sampler, _IndexBatchSamplerWrapper) and batch_idx < len(sampler.seen_batch_indices):
            return list(sampler.seen_batch_indices[batch_idx])
        return []

    def _fallback_indices(self, dataloader_idx: int, n: int) -> list[int]:
        """Request counters when a batch's requests do not map one to one onto sampler indices."""
        rank_zero_warn(
            "ContinuousBatching: batch requests do not match the sampler's dataset indices one to one; "
            "numbering requests by arrival (resume needs a deterministic DataLoader)"
        )
        start = self._fallback_index.get(dataloader_idx, 0)
        self._fallback_index[dataloader_idx] = start + n
        world, rank = self.trainer.world_size, self.trainer.global_rank
        return [(start + i) * world + rank for i in range(n)]

    def _expected_requests(self) -> Optional[int]:
        """Samples this rank will see (one request each), when the loaders tell; None otherwise."""
        total = 0
        for loader, max_batches in zip(self._combined_loader.flattened, self.max_batches):
            sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
            batch_size = getattr(loader, "batch_size", None)
            if math.isinf(max_batches) or sampler is None or not hasattr(sampler, "__len__"):
                return None
            n = len(sampler)
            total += n if max_batches >= len(loader) or not batch_size else min(n, int(max_batches) * batch_size)
        return total

    def _report_progress(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        stats = self.stats
        if self._batcher is not None:
            stats.live_output_tokens = self._batcher.stats.get("output_tokens", 0)
        if stats.total is not None:
            stats.total = max(stats.total, stats.done + len(self._inflight))
        trainer = self.trainer
        for cb in self._progress_hooks:
            cb.on_generation_progress(trainer, trainer.lightning_module, stats)


__all__ = ["ContinuousPredictionLoop", "RequestRecord"]
