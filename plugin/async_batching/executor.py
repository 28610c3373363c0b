"""SyncExecutor and AsyncExecutor: launch steps on the device (streams, events, GPU carry-over) and collect tokens.

The two loops differ in a few lines: the sync loop waits for step N's tokens before planning step N+1; the async loop
plans and launches step N+1 first, and only then waits for step N. Step N+1's decode inputs that are step N's outputs
are filled on the GPU from step N's token buffer (``carry_src`` rows), so no host round trip sits between the steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import numpy as np
import torch
from torch.profiler import record_function

from .buffers import BufferSlot, PinnedBufferPool
from .model_runner import ModelRunner, StepLayout
from . import sampling
from .sampling import sample, token_logprobs
from .scheduler import Scheduler, StepPlan
from .tensor_parallel import PlanDisagreement

log = logging.getLogger(__name__)
MIN_BATCH_TOKENS = 16  # below this an out-of-memory step is not retried with a smaller budget


@dataclass
class StepHandle:
    """A launched step: its plan, its buffer slot and where its sampled tokens will appear."""

    plan: StepPlan
    layout: StepLayout
    slot: BufferSlot
    tokens: torch.Tensor  # device int32 [num_samples]: read by the next step's carry-over gather


@dataclass
class StepOutput:
    tokens: list[int]
    logprobs: Optional[np.ndarray]  # [num_samples, 1 + 2k] or None
    scores: Optional[np.ndarray]  # [num_score_rows, 2]: log-probability of the target, target was the argmax (1/0)


class StepObserver(Protocol):
    """Sees each step's compute on the compute stream (e.g. timing events); attached with ``Executor.observe``."""

    def compute_began(self, stream: torch.cuda.Stream, layout: StepLayout) -> None: ...

    def compute_ended(self, stream: torch.cuda.Stream, layout: StepLayout) -> None: ...


Process = Callable[[StepHandle, StepOutput], list]


class Executor:
    """Shared launch/wait machinery; subclasses define the loop."""

    DEPTH = 3  # buffer slots: steps in flight (1) + the one being prepared + one spare

    def __init__(self, runner: ModelRunner, scheduler: Scheduler):
        self.runner = runner
        self.scheduler = scheduler
        self.device = runner.device
        rows = max(runner.config.max_num_seqs + 1, max(runner.graphs, default=0))
        # Token rows: a decode window's draws one after the other (draw j at rows j * num_samples ..).
        self.pool = PinnedBufferPool(self.DEPTH, runner.staging_ints(), rows * runner.decode_window,
                                     scheduler.max_logit_rows, self.device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.h2d = torch.cuda.Stream(self.device)
            self.compute = runner.compute_stream
            self.d2h = torch.cuda.Stream(self.device)
        self.step_in_flight: Optional[StepHandle] = None
        self.draw_into = sampling.TRITON_ARGMAX  # draws written into the token buffer (greedy: one Triton launch)
        self.observers: list[StepObserver] = []
        # cpu_launch_graph_s: the part of cpu_launch_s spent launching decode steps replayed from CUDA graphs;
        # prefill_graph_steps: prefill and mixed steps replayed from the prefill graphs (model_runner.PREFILL_GRAPHS).
        self.stats = {"steps": 0, "graph_steps": 0, "prefill_graph_steps": 0, "scheduled_tokens": 0,
                      "cpu_schedule_s": 0.0, "cpu_prepare_s": 0.0,
                      "cpu_launch_s": 0.0, "cpu_launch_graph_s": 0.0, "cpu_wait_s": 0.0, "cpu_process_s": 0.0,
                      "oom_recoveries": 0, "windows": 0}

    def observe(self, observer: StepObserver) -> None:
        """Attach an observer of each step's compute on the compute stream (called on CUDA only; the benchmark's
        timing uses it)."""
        self.observers.append(observer)

    # --- one step on the device -----------------------------------------------------------------------------
    def launch(self, plan: StepPlan, prev: Optional[StepHandle]) -> Optional[StepHandle]:
        """Stage, compute and copy out one step; None when it ran out of device memory and was rolled back."""
        try:
            return self._launch(plan, prev)
        except torch.OutOfMemoryError:
            # Under tensor parallelism the other ranks of the group are inside this step's collectives: no roll-back.
            if self.scheduler.step_tokens() // 2 < MIN_BATCH_TOKENS or self.runner.tp is not None:
                raise
            old, new = self.scheduler.roll_back(plan)
            self.stats["oom_recoveries"] += 1
            if self.cuda:
                torch.cuda.empty_cache()
            log.warning("out of device memory in a step of %d tokens: max_batch_tokens lowered from %d to %d, "
                        "%d requests will be recomputed", plan.num_tokens, old, new, len(plan.seqs))
            return None

    def _launch(self, plan: StepPlan, prev: Optional[StepHandle]) -> StepHandle:
        t0 = time.perf_counter()
        slot = self.pool.acquire()
        with record_function("ab.prepare"):
            lay = self.runner.prepare(plan, slot)
        t1 = time.perf_counter()
        n = lay.size
        with record_function("ab.launch"):
            if self.cuda:
                with torch.cuda.stream(self.h2d):
                    self.h2d.wait_event(slot.compute_done)  # the previous step using this slot has read dev_in
                    slot.dev_in[:n].copy_(slot.host_in[:n], non_blocking=True)
                    slot.h2d_done.record(self.h2d)
                self.compute.wait_event(slot.h2d_done)
                self.compute.wait_event(slot.d2h_done)  # this slot's device outputs of its last step were copied out
                with torch.cuda.stream(self.compute):
                    for o in self.observers:
                        o.compute_began(self.compute, lay)
                    tokens, lp, scores = self._compute(slot, lay, prev)
                    slot.compute_done.record(self.compute)
                    for o in self.observers:
                        o.compute_ended(self.compute, lay)
                self.d2h.wait_event(slot.compute_done)
                with torch.cuda.stream(self.d2h):
                    n_out = lay.num_samples * lay.window + lay.checked  # the tokens, then the group's agreement flag
                    slot.host_tokens[:n_out].copy_(slot.dev_tokens[:n_out], non_blocking=True)
                    if lp is not None:
                        lp.record_stream(self.d2h)
                        self._logprob_rows(slot, lay, lp).copy_(lp, non_blocking=True)
                    if scores is not None:
                        slot.host_scores[:lay.num_score_rows].copy_(scores, non_blocking=True)
                    slot.d2h_done.record(self.d2h)
            else:
                tokens, lp, scores = self._compute(slot, lay, prev)
                if lp is not None:
                    self._logprob_rows(slot, lay, lp).copy_(lp)
        self.scheduler.launched(plan, lay.sample_rows)
        self.stats["steps"] += lay.window  # forwards: a decode window counts each of its steps
        self.stats["graph_steps"] += lay.window if lay.graph_batch else 0
        self.stats["prefill_graph_steps"] += 1 if lay.prefill_graph else 0
        self.stats["windows"] += lay.window > 1
        self.stats["scheduled_tokens"] += plan.num_tokens
        self.stats["cpu_prepare_s"] += t1 - t0
        launch_s = time.perf_counter() - t1
        self.stats["cpu_launch_s"] += launch_s
        if lay.graph_batch:
            self.stats["cpu_launch_graph_s"] += launch_s
        return StepHandle(plan, lay, slot, tokens)

    @staticmethod
    def _logprob_rows(slot: BufferSlot, lay: StepLayout, lp: torch.Tensor) -> torch.Tensor:
        """Where a step's logprob rows land on the host."""
        return slot.logprob_buffer(lay.logprobs_k, len(slot.host_tokens))[: lay.num_samples, : lp.shape[1]]

    def _compute(self, slot: BufferSlot, lay: StepLayout, prev: Optional[StepHandle]):
        """The step's forward(s) and draws on the current (compute) stream; returns the tokens the next step's
        carry-over reads (a window's last draw), logprobs and scores."""
        runner = self.runner
        runner.apply_updates(slot.dev_in, lay, prev.tokens if prev is not None else None)
        k = lay.num_samples
        for j in range(lay.window):
            if j:  # a decode window's next forward: inputs from the draw just made, on the device
                runner.advance(slot.dev_in, lay, tokens)
            with record_function("ab.launch.forward"):  # inside ab.launch: the model (a graph replay for decode)
                logits = runner.forward(slot.dev_in, lay)
            tokens = slot.dev_tokens[j * k:(j + 1) * k]
            if k:
                with record_function("ab.launch.sample"):
                    if self.draw_into:
                        sample(logits[:k], runner.sampling_inputs(slot.dev_in, lay, j), out=tokens)
                    else:
                        tokens.copy_(sample(logits[:k], runner.sampling_inputs(slot.dev_in, lay, j)))
        lp = scores = None
        if lay.checked:  # tensor parallel: rank 0's tokens on every rank, before anything reads them
            runner.agree(slot.dev_in, lay, slot.dev_tokens)
        if k and lay.logprobs_k >= 0:
            chosen, ids, vals = token_logprobs(logits[:k], tokens, lay.logprobs_k)
            lp = torch.cat([chosen[:, None], ids.float(), vals], dim=1)
        if lay.num_score_rows:
            scores = slot.dev_scores[:lay.num_score_rows]
            runner.score_rows(logits[k:], slot.dev_in, lay, out=scores)
        return tokens, lp, scores

    def wait(self, handle: StepHandle) -> StepOutput:
        """Block (sleeping) until the step's outputs are on the host."""
        t0 = time.perf_counter()
        with record_function("ab.wait"):
            slot, lay = handle.slot, handle.layout
            if self.cuda:
                slot.d2h_done.synchronize()
            tokens = slot.host_tokens[:lay.num_samples * lay.window + lay.checked].tolist()
            if lay.checked and tokens.pop():
                raise PlanDisagreement(
                    f"tensor-parallel rank {self.runner.tp.rank} staged a step other than its group's rank 0: the "
                    "ranks' engines were given different requests or settings (each rank of a group must get the "
                    "same requests in the same order)")
            lp = scores = None
            if lay.logprobs_k >= 0:
                lp = slot.host_logprobs[:lay.num_samples, : 1 + 2 * lay.logprobs_k].numpy().copy()
            if lay.num_score_rows:
                scores = slot.host_scores[:lay.num_score_rows].numpy().copy()
        self.stats["cpu_wait_s"] += time.perf_counter() - t0
        return StepOutput(tokens, lp, scores)

    def schedule(self) -> StepPlan:
        t0 = time.perf_counter()
        with record_function("ab.schedule"):
            plan = self.scheduler.schedule()
        self.stats["cpu_schedule_s"] += time.perf_counter() - t0
        return plan

    def process(self, process: Process, handle: StepHandle, out: StepOutput) -> list:
        t0 = time.perf_counter()
        with record_function("ab.process"):
            done = process(handle, out)
        self.stats["cpu_process_s"] += time.perf_counter() - t0
        return done

    def drain(self, process: Process) -> list:
        """Collect the step in flight, if any (used before shutting down or on errors)."""
        if self.step_in_flight is None:
            return []
        handle, self.step_in_flight = self.step_in_flight, None
        return self.process(process, handle, self.wait(handle))


class SyncExecutor(Executor):
    """Baseline: plan, launch, wait, process — the GPU idles while the CPU plans the next step."""

    def step(self, process: Process) -> tuple[list, bool]:
        """Results finished in this call, and whether a step was planned."""
        plan = self.schedule()
        handle = self.launch(plan, None) if plan else None
        done = self.process(process, handle, self.wait(handle)) if handle is not None else []
        return done, bool(plan)


class AsyncExecutor(Executor):
    """Overlap: step N+1 is planned and launched before step N's tokens are waited for and processed."""

    def step(self, process: Process) -> tuple[list, bool]:
        """Results finished in this call, and whether a step was planned."""
        plan = self.schedule()  # planned before the tokens of the step in flight are known
        handle = self.launch(plan, self.step_in_flight) if plan else None
        done = []
        if self.step_in_flight is not None:
            done = self.process(process, self.step_in_flight, self.wait(self.step_in_flight))
        self.step_in_flight = handle
        return done, bool(plan)
