"""ContinuousBatcher: the engine loop tying scheduler, model runner and executor; ``generate``, streaming, incremental."""

from __future__ import annotations

import time
import warnings
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch

from .config import BatcherConfig
from .detokenize import IncrementalDetokenizer
from .executor import AsyncExecutor, StepHandle, StepOutput, SyncExecutor
from .model_runner import ModelRunner
from .request import GenerationResult, Request, RequestStatus, SamplingParams, generation_result
from .sampling import request_seed
from .scheduler import Scheduler

Prompt = Union[Sequence[int], str]


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
        is_cuda = self.device.type == "cuda"
        if cfg.cuda_graphs and not is_cuda:
            raise ValueError(f"BatcherConfig.cuda_graphs=True needs a CUDA device, the model is on {self.device}; "
                             "use cuda_graphs=null (auto) or false")
        self.runner = ModelRunner(model, cfg, self.device, self.dtype)
        use_graphs = bool(is_cuda and cfg.cuda_graphs is not False and self.runner.backend == "triton")
        if cfg.cuda_graphs and not use_graphs:
            raise ValueError("BatcherConfig.cuda_graphs=True needs attention_backend 'triton' (Triton not available?)")
        self.runner.compute_stream = torch.cuda.Stream(self.device) if is_cuda else None
        if is_cuda or cfg.compile:
            self.runner.warmup()
        if use_graphs:
            self.runner.capture_graphs(min(cfg.max_num_seqs, cfg.cuda_graph_max_batch), self.runner.compute_stream)
        self.scheduler = Scheduler(self.runner.cache, cfg.max_batch_tokens, cfg.max_num_seqs, cfg.scheduler,
                                   cfg.chunked_prefill)
        executor_cls = AsyncExecutor if cfg.mode == "async" else SyncExecutor
        self.executor = executor_cls(self.runner, self.scheduler, use_graphs)
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.requests: dict[int, Request] = {}
        self._next_id = 0
        self._next_uid = 0  # never reused: unseeded sampling streams derive from it
        self._closed = False
        self._counters = {"prompt_tokens": 0, "output_tokens": 0, "requests": 0}
        self._cancelled: list[Request] = []

    # --- submission -----------------------------------------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.requests) or self.executor.step_in_flight is not None

    def _problems(self, prompt, sampling) -> tuple[list[int], list[str]]:
        if not isinstance(sampling, SamplingParams):
            return [], [f"sampling must be a SamplingParams, got {type(sampling).__name__}"]
        problems = sampling.problems()
        if sampling.stop and self.tokenizer is None:
            problems.append("stop strings need a tokenizer")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                return [], problems + ["prompt is a string but the batcher has no tokenizer"]
            ids = list(self.tokenizer.encode(prompt))
        elif isinstance(prompt, torch.Tensor):
            ids = prompt.reshape(-1).tolist() if prompt.dim() <= 1 else None
            if ids is None:
                return [], problems + [f"prompt tensor must be 1-D, got shape {tuple(prompt.shape)}"]
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
        else:
            return [], problems + [f"prompt must be a list of token ids or a string, got {type(prompt).__name__}"]
        if not ids:
            return ids, problems + ["prompt is empty"]
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool)]
        if bad:
            return ids, problems + [f"prompt holds non-integer token ids, e.g. {bad[0]!r}"]
        vocab = self.runner.vocab_size
        out = [t for t in ids if t < 0 or t >= vocab]
        if out:
            problems.append(f"token id {out[0]} is outside the vocabulary [0, {vocab})")
        if isinstance(sampling.max_new_tokens, int):
            total = len(ids) + sampling.max_new_tokens
            limit = self.runner.max_model_len
            if len(ids) >= limit:
                problems.append(f"prompt has {len(ids)} tokens, the model allows {limit} positions")
            elif total > limit:
                problems.append(f"prompt ({len(ids)}) + max_new_tokens ({sampling.max_new_tokens}) = {total} "
                                f"exceeds the model's {limit} positions")
            need = self.runner.cache.blocks_for(total)
            usable = self.runner.cache.allocator.num_usable
            if need > usable:
                problems.append(f"needs {need} KV blocks for {total} tokens, the whole cache has {usable} "
                                "(raise num_blocks or memory_fraction, or lower max_new_tokens)")
            if not self.config.chunked_prefill and total > self.config.max_batch_tokens:
                problems.append(f"prompt + max_new_tokens = {total} exceeds max_batch_tokens "
                                f"({self.config.max_batch_tokens}) and chunked_prefill is off")
        return ids, problems

    def check_request(self, prompt: Prompt, sampling: Optional[SamplingParams] = None, name: object = 0) -> list[int]:
        """Validate one request; return its token ids or raise ValueError/TypeError naming it and the problem."""
        sampling = SamplingParams() if sampling is None else sampling
        ids, problems = self._problems(prompt, sampling)
        if problems:
            kind = TypeError if any(p.startswith(("prompt must", "sampling must", "prompt tensor", "prompt is a string")) for p in problems) else ValueError
            raise kind(f"request {name}: " + "; ".join(problems))
        return ids

    def add_request(self, prompt: Prompt, sampling: Optional[SamplingParams] = None, request_id: Optional[int] = None) -> int:
        """Validate and enqueue one request; returns its id (``GenerationResult.index``)."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        rid = self._next_id if request_id is None else request_id
        if rid in self.requests:
            raise ValueError(f"request {rid}: id already in use by an unfinished request")
        sampling = SamplingParams() if sampling is None else sampling
        ids = self.check_request(prompt, sampling, rid)
        self._enqueue(rid, ids, sampling)
        return rid

    def _enqueue(self, rid: int, ids: list[int], sampling: SamplingParams) -> None:
        self._next_id = max(self._next_id, rid + 1) if isinstance(rid, int) else self._next_id
        detok = None
        if self.tokenizer is not None and sampling.stop:
            # Only stop strings need text while generating; other requests are decoded once when they finish.
            detok = IncrementalDetokenizer(self.tokenizer, sampling.stop)
        uid = self._next_uid
        self._next_uid += 1
        req = Request(
            uid=uid, index=rid, prompt_ids=ids, sampling=sampling,
            eos_ids=frozenset() if sampling.ignore_eos else self.eos_ids,
            seed=request_seed(self.config.seed, uid, sampling.seed, 0),
            detokenizer=detok,
        )
        if sampling.logprobs is not None:
            req.logprobs, req.top_logprobs = [], ([] if sampling.logprobs > 0 else None)
        self.requests[rid] = req
        self.scheduler.add(req)
        self._counters["requests"] += 1

    def cancel(self, request_id: int) -> None:
        """Finish a request now with reason "cancelled"; its blocks return once no step in flight reads them."""
        req = self.requests.get(request_id)
        if req is not None and req.finish_reason is None:
            req.finish_reason = "cancelled"
            self._cancelled.append(req)

    # --- the loop -------------------------------------------------------------------------------------------
    @torch.inference_mode()  # cheaper than no_grad on the host; Lightning predict runs us in it too
    def step(self) -> list[GenerationResult]:
        """One engine iteration; returns the results of requests that finished in it."""
        done = [self._finish(r) for r in self._cancelled if not r.finished]
        self._cancelled = []
        idle = self.executor.step_in_flight is None
        launched, ooms = self.executor.stats["steps"], self.executor.stats["oom_recoveries"]
        done += self.executor.step(self._process)
        stuck = launched == self.executor.stats["steps"] and ooms == self.executor.stats["oom_recoveries"]
        if idle and stuck and not done and self.scheduler.has_unfinished():
            # Nothing was in flight, so every deferred block was back, and still nothing could be scheduled.
            head = (self.scheduler.waiting or self.scheduler.running)[0]
            raise RuntimeError(f"request {head.index} cannot be scheduled ({self.runner.cache.allocator.num_free} "
                               "KV blocks free); this is a bug, please report it")
        return done

    def _process(self, handle: StepHandle, out: StepOutput) -> list[GenerationResult]:
        now = time.perf_counter()
        done = []
        row = 0
        for s in handle.plan.seqs:
            req = s.req
            if s.samples:
                tok = out.tokens[row]
                if req.finish_reason is None:  # else: finished or cancelled already, the extra token is dropped
                    if req.logprobs is not None:
                        self._add_logprobs(req, out.logprobs[row])
                    req.append_token(tok, now)
                    self._counters["output_tokens"] += 1
                    if req.finish_reason is not None:
                        done.append(self._finish(req, now))
                row += 1
            self.scheduler.landed(s)
        self._counters["prompt_tokens"] += handle.plan.num_tokens - row
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

    def _finish(self, req: Request, now: Optional[float] = None) -> GenerationResult:
        req.finish_s = now if now is not None else time.perf_counter()
        if req.detokenizer is None and self.tokenizer is not None:
            req.text = self.tokenizer.decode(req.output_ids, skip_special_tokens=True)
        self.scheduler.finish(req)
        self.requests.pop(req.index, None)
        return generation_result([req])

    def drain(self) -> Iterator[GenerationResult]:
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

    def stream(self, prompts, sampling=None) -> Iterator[GenerationResult]:
        """Yield results as requests finish (completion order); ``result.index`` is the prompt's position."""
        checked = self._normalise(prompts, sampling)
        base = self._next_id
        for i, (ids, sp) in enumerate(checked):
            self._enqueue(base + i, ids, sp)
        mine = range(base, base + len(checked))
        try:
            for r in self.drain():
                if r.index in mine:
                    r.index -= base
                    yield r
        except BaseException:  # KeyboardInterrupt, an error in the consumer, or the consumer stopped early
            self.abort([i for i in mine if i in self.requests])
            raise

    def abort(self, request_ids: Optional[Iterable[int]] = None) -> list[GenerationResult]:
        """Stop requests now (all by default): the step in flight lands first, then their blocks are freed.

        Returns the results of every request that ended here: those aborted (``finish_reason="cancelled"``, with the
        tokens generated so far) and any that finished normally in the step that was in flight.
        """
        done = self.executor.drain(self._process)
        ids = list(self.requests) if request_ids is None else list(request_ids)
        for rid in ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            if req.finish_reason is None:
                req.finish_reason = "cancelled"
            done.append(self._finish(req))
        return done

    def generate(self, prompts, sampling=None, progress: bool = False) -> list[GenerationResult]:
        """One result per prompt, in input order."""
        checked_len = len(prompts) if hasattr(prompts, "__len__") else None
        results: list[Optional[GenerationResult]] = [None] * (checked_len or 0)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=checked_len, desc="generate", unit="req")
        t0 = time.perf_counter()
        tokens = 0
        for r in self.stream(prompts, sampling):
            if r.index >= len(results):
                results.extend([None] * (r.index + 1 - len(results)))
            results[r.index] = r
            tokens += len(r.token_ids)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
        if bar is not None:
            bar.close()
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Finish the step in flight and release the cache and graphs."""
        if self._closed:
            return
        try:
            self.abort()
        finally:
            self._closed = True
            self.runner.graphs.clear()
            self.runner.cache.k.clear()
            self.runner.cache.v.clear()

    def all_blocks_free(self) -> bool:
        return self.runner.cache.allocator.all_free()

    @property
    def stats(self) -> dict:
        """Counters: requests, prompt/output tokens, steps, graph steps, preemptions, host seconds per phase."""
        return {**self._counters, **self.executor.stats, "preemptions": self.scheduler.num_preemptions}

    def __repr__(self) -> str:
        return f"ContinuousBatcher({type(self.model).__name__}, {self.config})"


__all__ = ["ContinuousBatcher", "RequestStatus"]
