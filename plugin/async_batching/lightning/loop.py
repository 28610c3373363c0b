"""ContinuousPredictionLoop: Lightning's prediction loop with ``predict_step`` replaced by a continuous batcher.

DataLoader batches are turned into requests and fed to the engine as they arrive, so the running batch stays full
across batch boundaries; a batch goes to ``on_predict_batch_end`` (and prediction writers) once all its requests
are done. Everything else (data setup, samplers, DDP sharding, the other hooks) is Lightning's own loop.

Besides Lightning's hooks, the loop calls these on every callback that defines them (``JsonlPredictionWriter``
is one such callback, the request-counting progress bars another):

- ``on_generation_result(trainer, pl_module, record)``: a request finished; ``record.result`` holds its result.
- ``on_generation_progress(trainer, pl_module, stats)``: the run's ``GenerationStats``, a few times a second.
- ``previous_result(trainer, pl_module, record)``: the result an earlier run recorded for this request, or None.
  A request for which every callback defining it returns a result is not computed again (resume).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loops.fetchers import _DataLoaderIterDataFetcher
from lightning.pytorch.loops.prediction_loop import _PredictionLoop
from lightning.pytorch.loops.utilities import _no_grad_context
from lightning.pytorch.overrides.distributed import _IndexBatchSamplerWrapper
from lightning.pytorch.trainer import call
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ..tensor_parallel import trainer_data_parallel_view

from ..request import GenerationResult, ScoreResult
from .batch import batch_items
from .progress import GenerationStats
from .record import RequestRecord, RowResult, row_error
from .settings import PredictSettings

PROGRESS_INTERVAL_S = 0.2
RESULT_HOOK, PROGRESS_HOOK, RESUME_HOOK = "on_generation_result", "on_generation_progress", "previous_result"


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
    """Runs ``trainer.predict`` through one engine per run, built by ``build_engine(pl_module)``."""

    def __init__(
        self,
        trainer: Any,
        settings: PredictSettings,
        build_engine: Callable[[Any], Any],
        inference_mode: bool = True,
    ) -> None:
        super().__init__(trainer, inference_mode=inference_mode)
        self.settings = settings
        self.build_engine = build_engine
        self.stats = GenerationStats()  # this run's, live while it runs
        self._batcher = None
        self._inflight: dict[int, tuple[RequestRecord, Optional[int]]] = {}  # engine id -> (record, choice or None)
        self._open_records = 0  # submitted, not yet complete (a row with choices is one record, several requests)
        self._pending: dict[tuple[int, int], _PendingBatch] = {}  # (dataloader_idx, batch_idx) -> not yet emitted
        self._queue: deque[_PendingBatch] = deque()  # the same batches in DataLoader order (ordered mode)
        self._hooks: dict[str, list[Callable]] = {}
        self._next_request_id = 0
        self._fallback_index: dict[int, int] = {}
        self._store_predictions = False
        self._last_progress = 0.0

    @classmethod
    def replacing(
        cls, loop: _PredictionLoop, settings: PredictSettings, build_engine: Callable[[Any], Any]
    ) -> "ContinuousPredictionLoop":
        """A loop to install in place of Lightning's ``loop``, taking over what ``trainer.predict`` gave it."""
        new = cls(loop.trainer, settings, build_engine, inference_mode=loop.inference_mode)
        # trainer.predict() has already attached the dataloaders and return_predictions to Lightning's loop.
        new._data_source = loop._data_source
        new._return_predictions = loop._return_predictions
        return new

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
        self._hooks = {
            name: [getattr(cb, name) for cb in trainer.callbacks if callable(getattr(cb, name, None))]
            for name in (RESULT_HOOK, PROGRESS_HOOK, RESUME_HOOK)
        }
        writers = [cb for cb in trainer.callbacks if isinstance(cb, BasePredictionWriter)]
        self._store_predictions = self.return_predictions or any(w.interval.on_epoch for w in writers)
        self.stats = GenerationStats(total=self._expected_requests())
        self._batcher = self.build_engine(trainer.lightning_module)
        self.stats.started()
        try:
            self._generate()
            self.stats.finish(self._batcher.stats)
        finally:
            self._batcher.close()
            self._batcher = None
            self._inflight.clear()
            self._open_records = 0
            self._pending.clear()
            self._queue.clear()
        return self.on_run_end()

    # --- the feed / step cycle ---------------------------------------------------------------------------------
    def _generate(self) -> None:
        batcher = self._batcher
        lookahead = self.settings.lookahead or batcher.config.max_num_seqs
        fetcher = self._data_fetcher
        exhausted = False
        while True:
            while not exhausted and batcher.num_waiting < lookahead:
                try:
                    batch, batch_idx, dataloader_idx = next(fetcher)
                except StopIteration:
                    exhausted = True
                    self.stats.total = self.stats.done + self._open_records
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
                record, choice = self._inflight.pop(result.index)
                result.index = record.index
                self._part_done(record, choice, result)
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
        if self.settings.ordered:
            self._queue.append(pending)
        items = batch_items(module, batch)
        if len(indices) != len(items):
            indices = self._fallback_indices(dataloader_idx, len(items))
        pending.records = [
            RequestRecord(i, dataloader_idx, batch_idx, item.prompt, item.sampling or self.settings.sampling,
                          item.text, item.meta, item.continuation, item.choices)
            for i, item in zip(indices, items)
        ]
        pending.remaining = len(pending.records)
        self._open_records += len(pending.records)
        if not pending.records:
            self._batch_done(pending)
        for record in pending.records:
            self._add(record)

    def _add(self, record: RequestRecord) -> None:
        """Submit one row, unless an earlier run already recorded it; invalid requests finish now as errors."""
        trainer = self.trainer
        previous = [hook(trainer, trainer.lightning_module, record) for hook in self._hooks[RESUME_HOOK]]
        if previous and all(r is not None for r in previous):
            record.resumed = True
            self._complete(record, previous[0])
            return
        if record.kind != "choices":
            self._send(record, None, record.continuation)
        elif not record.choices:
            self._reject(record, None, ValueError("choices is empty"))
        else:
            record.result = [None] * len(record.choices)
            for choice, continuation in enumerate(record.choices):
                self._send(record, choice, continuation)

    def _send(self, record: RequestRecord, choice: Optional[int], continuation: Any) -> None:
        rid = self._next_request_id
        self._next_request_id += 1
        try:
            if record.kind == "generate":
                self._batcher.add_request(record.prompt, record.sampling, request_id=rid)
            else:
                self._batcher.add_score(record.prompt, continuation, request_id=rid)
        except (ValueError, TypeError) as err:
            self._reject(record, choice, err)
            return
        self._inflight[rid] = (record, choice)

    def _reject(self, record: RequestRecord, choice: Optional[int], err: Exception) -> None:
        """A request the engine refused: stop (``on_error="raise"``) or finish it as an error result."""
        where = f"dataset index {record.index} (batch {record.batch_idx}" + (
            f", choice {choice})" if choice is not None else ")")
        if self.settings.on_error == "raise":
            raise type(err)(f"{where}: {err}") from err
        error = f"{type(err).__name__}: {err}"
        prompt_len = len(record.prompt) if isinstance(record.prompt, (list, tuple)) else 0
        if record.kind == "generate":
            result: Union[GenerationResult, ScoreResult] = GenerationResult(
                record.index, [], "error", prompt_len, error=error)
        else:
            result = ScoreResult(record.index, math.nan, False, [], prompt_len, error=error)
        if record.kind == "choices" and choice is None:  # the row itself is bad (no choices): one error entry
            self._complete(record, [result])
            return
        self._part_done(record, choice, result)

    def _part_done(self, record: RequestRecord, choice: Optional[int], result: Any) -> None:
        """One engine request of ``record`` finished; the record completes once all of them have."""
        if choice is None:
            self._complete(record, result)
            return
        record.result[choice] = result
        if all(r is not None for r in record.result):
            self._complete(record, record.result)

    def _complete(self, record: RequestRecord, result: RowResult) -> None:
        record.result = result
        self._open_records -= 1
        self.stats.add(result, resumed=record.resumed)
        trainer = self.trainer
        for hook in self._hooks[RESULT_HOOK]:
            hook(trainer, trainer.lightning_module, record)
        error = row_error(result)
        if error is not None and not record.resumed and self.settings.on_error == "raise":
            raise RuntimeError(f"dataset index {record.index} (batch {record.batch_idx}) failed: {error}")
        pending = self._pending[(record.dataloader_idx, record.batch_idx)]
        pending.remaining -= 1
        if pending.done:
            self._batch_done(pending)

    def _batch_done(self, pending: _PendingBatch) -> None:
        if not self.settings.ordered:
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
        rank, world, _ = trainer_data_parallel_view(self.trainer)  # a tensor-parallel group reads one shard
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
            stats.total = max(stats.total, stats.done + self._open_records)
        trainer = self.trainer
        for hook in self._hooks[PROGRESS_HOOK]:
            hook(trainer, trainer.lightning_module, stats)


__all__ = ["ContinuousPredictionLoop", "RequestRecord", "PROGRESS_INTERVAL_S"]
