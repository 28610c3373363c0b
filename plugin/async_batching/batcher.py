"""ContinuousBatcher: the engine loop tying scheduler, model runner and executor; ``generate``, ``score``, streaming,
incremental submission."""

from __future__ import annotations

import time
import warnings
import weakref
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch

from . import gc_freeze
from .config import BatcherConfig
from .detokenize import IncrementalDetokenizer
from .executor import AsyncExecutor, StepHandle, StepOutput, SyncExecutor
from .model_runner import ModelRunner, auto_max_batch_tokens, graph_step_tokens
from .request import GenerationResult, Request, RequestStatus, SamplingParams, ScoreResult, generation_result
from .sampling import request_seed
from .scheduler import Scheduler, admit_threshold
from .tensor_parallel import TensorParallelGroup, is_sharded
from .validation import RequestValidator, raise_problems

Prompt = Union[Sequence[int], str]
Result = Union[GenerationResult, ScoreResult]
_SCORING = SamplingParams(max_new_tokens=1)  # scoring requests sample nothing; this only satisfies the type


class ContinuousBatcher:
    """Continuous batching over a Hugging Face causal LM: requests join and leave the running batch every step."""

    def __init__(self, model, tokenizer=None, config: Optional[BatcherConfig | dict] = None, **overrides):
        self.config = cfg = BatcherConfig.from_overrides(config, **overrides)
        self.tokenizer = tokenizer
        if cfg.device is not None or cfg.dtype is not None:
            model = model.to(device=cfg.device, dtype=getattr(torch, cfg.dtype) if cfg.dtype else None)
        if model.training:
            warnings.warn("ContinuousBatcher: the model was in training mode (dropout on); switching it to eval()")
            model.eval()
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # Tensor parallelism: the model is sharded in place (or already was); every rank of the group runs this engine.
        self.tp = (TensorParallelGroup.shard(model, cfg.tensor_parallel_size, self.device, cfg.tp_all_reduce)
                   if cfg.tensor_parallel_size > 1 or is_sharded(model) else None)
        auto_budget = cfg.max_batch_tokens is None
        if auto_budget:
            cfg.max_batch_tokens = auto_max_batch_tokens(model, self.device)
        self.runner = ModelRunner(model, cfg, self.device, self.dtype, self.tp)
        self.runner.graph_step_tokens = graph_step_tokens(auto_budget, cfg.max_batch_tokens,
                                                          self.runner.want_prefill_graphs, cfg.chunked_prefill)
        self.runner.start()  # keeps the cap only where prefill graphs were captured
        self.scheduler = Scheduler(self.runner.cache, cfg.max_batch_tokens, cfg.max_num_seqs, cfg.scheduler,
                                   cfg.chunked_prefill, self.runner.max_logit_rows, cfg.prefix_caching,
                                   self.runner.decode_window, self.runner.max_model_len,
                                   admit_threshold(cfg, self.runner.want_graphs), self.runner.graph_step_tokens)
        executor_cls = AsyncExecutor if cfg.mode == "async" else SyncExecutor
        self.executor = executor_cls(self.runner, self.scheduler)
        self.validator = RequestValidator(tokenizer, self.runner.vocab_size, self.runner.max_model_len, cfg.block_size,
                                          self.runner.cache.allocator.num_usable, cfg.max_batch_tokens,
                                          cfg.chunked_prefill)
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.requests: dict[int, list[Request]] = {}  # caller's id -> its sequences (n samples, or one scoring)
        self._next_id = 0
        self._next_uid = 0  # never reused: unseeded sampling streams derive from it
        self._closed = False
        self._counters = {"requests": 0, "prompt_tokens": 0, "output_tokens": 0}
        self._cancelled: list[Request] = []
        # After start-up (compiled code, graphs): the collector stops walking those objects (see gc_freeze). An engine
        # dropped without close() gives its share back when it is collected.
        self._unfreeze = weakref.finalize(self, gc_freeze.engine_closed) if gc_freeze.engine_started() else None

    # --- submission -----------------------------------------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.requests) or self.executor.step_in_flight is not None

    def check_request(self, prompt: Prompt, sampling: Optional[SamplingParams] = None, name: object = 0) -> list[int]:
        """Validate one request; return its token ids or raise ValueError/TypeError naming it and the problem."""
        ids, problems = self.validator.generation(prompt, SamplingParams() if sampling is None else sampling)
        raise_problems(name, problems)
        return ids

    def check_score(self, context: Prompt, continuation: Prompt, name: object = 0,
                    _contexts: Optional[dict] = None) -> tuple[list[int], int]:
        """Validate one (context, continuation) pair; return its token ids and first scored position, or raise."""
        ids, score_start, problems = self.validator.scoring(context, continuation, _contexts)
        raise_problems(name, problems)
        return ids, score_start

    def _new_id(self, request_id: Optional[int]) -> int:
        if self._closed:
            raise RuntimeError("the batcher is closed")
        rid = self._next_id if request_id is None else request_id
        if rid in self.requests:
            raise ValueError(f"request {rid}: id already in use by an unfinished request")
        return rid

    def add_request(self, prompt: Prompt, sampling: Optional[SamplingParams] = None, request_id: Optional[int] = None) -> int:
        """Validate and enqueue one generation request; returns its id (``GenerationResult.index``)."""
        rid = self._new_id(request_id)
        sampling = SamplingParams() if sampling is None else sampling
        self._enqueue(rid, self.check_request(prompt, sampling, rid), sampling)
        return rid

    def add_score(self, context: Prompt, continuation: Prompt, request_id: Optional[int] = None) -> int:
        """Validate and enqueue one scoring request; returns its id (``ScoreResult.index``)."""
        rid = self._new_id(request_id)
        self._enqueue(rid, *self.check_score(context, continuation, rid))
        return rid

    def _sequence(self, rid: int, ids: list[int], sampling: SamplingParams, sample_idx: int = 0,
                  parent: Optional[Request] = None, score_start: int = -1) -> Request:
        uid = self._next_uid
        self._next_uid += 1
        detok = None
        if self.tokenizer is not None and sampling.stop:
            # Only stop strings need text while generating; other requests are decoded once when they finish.
            detok = IncrementalDetokenizer(self.tokenizer, sampling.stop)
        req = Request(uid=uid, index=rid, prompt_ids=ids, sampling=sampling,
                      eos_ids=frozenset() if sampling.ignore_eos else self.eos_ids,
                      seed=request_seed(self.config.seed, uid, sampling.seed, sample_idx), sample_idx=sample_idx,
                      parent=parent, score_start=score_start, detokenizer=detok)
        if sampling.logprobs is not None:
            req.logprobs, req.top_logprobs = [], ([] if sampling.logprobs > 0 else None)
        self.scheduler.add(req)
        return req

    def _enqueue(self, rid: int, ids: list[int], sampling_or_score_start: Union[SamplingParams, int]) -> None:
        self._next_id = max(self._next_id, rid + 1) if isinstance(rid, int) else self._next_id
        if isinstance(sampling_or_score_start, int):
            seqs = [self._sequence(rid, ids, _SCORING, score_start=sampling_or_score_start)]
        else:
            sp = sampling_or_score_start
            first = self._sequence(rid, ids, sp)
            seqs = [first] + [self._sequence(rid, ids, sp, i, first) for i in range(1, sp.n)]
        self.requests[rid] = seqs
        self._counters["requests"] += 1
        self._counters["prompt_tokens"] += len(ids)

    def cancel(self, request_id: int) -> None:
        """Finish a request (all its samples) now with reason "cancelled"; its blocks return once no step in flight
        reads them."""
        for req in self.requests.get(request_id, ()):
            if req.finish_reason is None:
                req.finish_reason = "cancelled"
                self._cancelled.append(req)

    # --- the loop -------------------------------------------------------------------------------------------
    @torch.inference_mode()  # cheaper than no_grad on the host; Lightning predict runs us in it too
    def step(self) -> list[Result]:
        """One engine iteration; returns the results of requests that finished in it."""
        done = [r for r in map(self._finish, self._cancelled) if r is not None]
        self._cancelled = []
        idle = self.executor.step_in_flight is None
        finished, planned = self.executor.step(self._process)
        done += finished
        if idle and not planned and not done and self.scheduler.has_unfinished():
            # Nothing was in flight, so every deferred block was back, and still nothing could be scheduled.
            head = (self.scheduler.waiting or self.scheduler.running)[0]
            raise RuntimeError(f"request {head.index} cannot be scheduled ({self.scheduler.allocator.num_free} "
                               "KV blocks free); this is a bug, please report it")
        return done

    def _process(self, handle: StepHandle, out: StepOutput) -> list[Result]:
        now = time.perf_counter()
        done = []
        row = score_row = 0
        window, tokens = handle.plan.window, out.tokens
        rows = handle.layout.num_samples  # a window's draw j holds rows j * rows ..
        for s in handle.plan.seqs:
            req = s.req
            if s.samples:
                if window == 1:
                    if req.finish_reason is None:  # else: finished or cancelled already, the extra token is dropped
                        if req.logprobs is not None:
                            self._add_logprobs(req, out.logprobs[row])
                        req.append_token(tokens[row], now)
                        self._counters["output_tokens"] += 1
                else:  # a decode window: the tokens after a stop are dropped (one branch each: the single step's
                    # is the hot path of every CPU step, where a loop over one token cost 0.07 ms a step for W1)
                    for j in range(row, row + window * rows, rows):
                        if req.finish_reason is not None:
                            break
                        req.append_token(tokens[j], now)
                        self._counters["output_tokens"] += 1
                row += 1
            elif s.score_rows:
                self._add_scores(req, s.score_from, out.scores[score_row:score_row + s.score_rows])
                score_row += s.score_rows
            self.scheduler.landed(s, window)
            if req.finish_reason is not None and not req.finished:
                if (r := self._finish(req, now)) is not None:
                    done.append(r)
        return done

    @staticmethod
    def _add_logprobs(req: Request, lp) -> None:
        """``lp`` is one row ``[chosen, k ids, k values]`` with k the widest request of the step."""
        req.logprobs.append(float(lp[0]))
        k = req.sampling.logprobs
        if k:
            width = (len(lp) - 1) // 2
            ids, vals = lp[1:1 + k].astype(int), lp[1 + width:1 + width + k]
            req.top_logprobs.append({int(i): float(v) for i, v in zip(ids, vals)})

    @staticmethod
    def _add_scores(req: Request, first_pos: int, rows) -> None:
        """Record scored positions not recorded yet (a preempted request recomputes positions it already scored)."""
        skip = len(req.score_logprobs) - (first_pos - req.score_start)
        for lp, greedy in rows[max(skip, 0):]:
            req.score_logprobs.append(float(lp))
            req.score_greedy = req.score_greedy and bool(greedy > 0.5)
        if len(req.score_logprobs) == len(req.prompt_ids) - 1 - req.score_start and req.finish_reason is None:
            req.finish_reason = "scored"

    def _finish(self, req: Request, now: Optional[float] = None) -> Optional[Result]:
        """Finish one sequence; the request's result once all its sequences are finished."""
        if req.finished:
            return None
        req.finish_s = now if now is not None else time.perf_counter()
        if req.detokenizer is None and self.tokenizer is not None and not req.is_score:
            req.text = self.tokenizer.decode(req.output_ids, skip_special_tokens=True)
        self.scheduler.finish(req)
        seqs = self.requests.get(req.index)
        if seqs is None or not all(r.finished for r in seqs):
            return None
        del self.requests[req.index]
        if req.is_score:
            result = req.score_result()
            if req.finish_reason != "scored":
                result.error = req.finish_reason
            return result
        return generation_result(seqs)

    def drain(self) -> Iterator[Result]:
        """Run steps until every submitted request has finished, yielding results as they finish."""
        while self.has_unfinished():
            yield from self.step()

    # --- convenience ----------------------------------------------------------------------------------------
    def _normalise(self, prompts, sampling) -> list[tuple[list[int], SamplingParams]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
            raise TypeError("prompts must be a list of prompts (lists of token ids, or strings with a tokenizer)")
        prompts = list(prompts)
        if isinstance(sampling, (list, tuple)):
            if len(sampling) != len(prompts):
                raise ValueError(f"got {len(sampling)} SamplingParams for {len(prompts)} prompts")
            params = list(sampling)
        else:
            params = [SamplingParams() if sampling is None else sampling] * len(prompts)
        # Everything is checked before any work starts.
        return [(self.check_request(p, s, i), s) for i, (p, s) in enumerate(zip(prompts, params))]

    def _run(self, checked: list[tuple], desc: Optional[str] = None) -> Iterator[Result]:
        """Enqueue checked requests under fresh ids and yield their results as they finish (``index`` = position in
        ``checked``); on any exception or early stop their remaining work is aborted. ``desc``: show a progress bar."""
        base = self._next_id
        for i, item in enumerate(checked):
            self._enqueue(base + i, *item)
        mine = range(base, base + len(checked))
        bar = None
        if desc is not None:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(checked), desc=desc, unit="req")
        t0, tokens = time.perf_counter(), 0
        try:
            for r in self.drain():
                if r.index in mine:
                    r.index -= base
                    if bar is not None:
                        tokens += sum(len(s.token_ids) for s in r.samples) if isinstance(r, GenerationResult) else 0
                        bar.update(1)
                        if tokens:
                            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
                    yield r
        except BaseException:  # KeyboardInterrupt, an error in the consumer, or the consumer stopped early
            self.abort([i for i in mine if i in self.requests])
            raise
        finally:
            if bar is not None:
                bar.close()

    def stream(self, prompts, sampling=None) -> Iterator[GenerationResult]:
        """Yield results as requests finish (completion order); ``result.index`` is the prompt's position."""
        return self._run(self._normalise(prompts, sampling))

    def _run_in_order(self, checked: list[tuple], desc: Optional[str]) -> list[Result]:
        """``_run`` to the end, results in the order of ``checked``."""
        results: list = [None] * len(checked)
        for r in self._run(checked, desc):
            results[r.index] = r
        return results

    def generate(self, prompts, sampling=None, progress: bool = False) -> list[GenerationResult]:
        """One result per prompt, in input order."""
        return self._run_in_order(self._normalise(prompts, sampling), "generate" if progress else None)

    def score(self, pairs, progress: bool = False) -> list[ScoreResult]:
        """Log-likelihood of each ``(context, continuation)`` pair's continuation given its context, in input order.
        Token ids or strings (strings need a tokenizer); every pair is checked before any work starts."""
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
            raise TypeError("pairs must be a list of (context, continuation) pairs")
        checked = []
        # Contexts shared by several pairs (the same list object) are checked once; only over a list or tuple of
        # pairs, which cannot change while they are checked.
        contexts = {} if isinstance(pairs, (list, tuple)) else None
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"request {i}: a pair must be (context, continuation), got {type(pair).__name__}")
            checked.append(self.check_score(pair[0], pair[1], i, contexts))
        return self._run_in_order(checked, "score" if progress else None)

    def abort(self, request_ids: Optional[Iterable[int]] = None) -> list[Result]:
        """Stop requests now (all by default): the step in flight lands first, then their blocks are freed.

        Returns the results of every request that ended here: those aborted (``finish_reason="cancelled"``, with the
        tokens generated so far) and any that finished normally in the step that was in flight.
        """
        done = self.executor.drain(self._process)
        ids = list(self.requests) if request_ids is None else list(request_ids)
        for rid in ids:
            for req in list(self.requests.get(rid, ())):
                if req.finish_reason is None:
                    req.finish_reason = "cancelled"
                if (r := self._finish(req)) is not None:
                    done.append(r)
        return done

    def close(self) -> None:
        """Finish the step in flight and release the cache and graphs."""
        if self._closed:
            return
        try:
            self.abort()
        finally:
            self._closed = True
            self.runner.release()
            if self._unfreeze is not None:
                self._unfreeze()

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (e.g. between benchmark runs, or after changing the model's weights in place);
        returns the number of cached blocks freed. Requests already running keep their blocks."""
        return self.scheduler.allocator.reset_cache()

    def all_blocks_free(self) -> bool:
        """No KV block is held by a request (blocks kept by the prefix cache count as free)."""
        return self.scheduler.allocator.all_free()

    @property
    def stats(self) -> dict:
        """Counters: requests, prompt tokens (submitted), prefill tokens (computed), cached tokens (prefix-cache hits),
        output tokens, steps, graph steps, preemptions, plans that deferred admission (``admit_threshold``), host
        seconds per phase."""
        s = self.scheduler
        return {**self._counters, "prefill_tokens": s.prefill_tokens, "cached_tokens": s.cached_tokens,
                **self.executor.stats, "preemptions": s.num_preemptions, "deferred_admissions": s.deferred_admissions}

    def __repr__(self) -> str:
        return f"ContinuousBatcher({type(self.model).__name__}, {self.config})"


__all__ = ["ContinuousBatcher", "RequestStatus"]
