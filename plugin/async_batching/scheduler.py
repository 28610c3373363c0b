"""Which requests get how many tokens in the next step, within the token budget, the sequence cap and the KV blocks."""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from .kv_cache import PagedKVCache
from .request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledSeq:
    req: Request
    start: int  # first position computed in this step
    num_tokens: int
    samples: bool  # the chunk reaches the end of the request's tokens: a new token is sampled
    new_blocks: list[int]  # blocks allocated for this step, at logical indices len(block_ids)-len(new_blocks)..


@dataclass
class StepPlan:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    num_tokens: int = 0

    def __bool__(self) -> bool:
        return bool(self.seqs)

    @property
    def is_decode_only(self) -> bool:
        return self.num_tokens == len(self.seqs)


class TableRows:
    """Rows of the device block table; a row is held by one request from admission until its blocks are freed."""

    def __init__(self, n: int, reserved: int = 1):
        self._free = list(range(n - 1, reserved - 1, -1))

    def take(self) -> int:
        return self._free.pop()

    def give(self, row: int) -> None:
        self._free.append(row)

    @property
    def num_free(self) -> int:
        return len(self._free)


class Scheduler:
    """Owns the waiting and running queues and the KV blocks of requests; policies are selected by name."""

    def __init__(self, cache: PagedKVCache, max_batch_tokens: int, max_num_seqs: int, policy: str, chunked_prefill: bool):
        self.cache = cache
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.policy = policy
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the last one is preempted first
        # Finished or preempted requests may still be read by a step in flight, so they keep their row a while.
        self.rows = TableRows(2 * max_num_seqs + 2)
        self.num_preemptions = 0

    # --- queues -------------------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if self.policy == "shortest_first":
            keys = [len(r.prompt_ids) for r in self.waiting]
            self.waiting.insert(bisect.bisect_right(keys, len(req.prompt_ids)), req)
        else:
            self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request) -> None:
        """Take a request out of the queues and release its blocks once no step in flight reads them."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING and req in self.waiting:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        self._release(req)

    def _release(self, req: Request) -> None:
        req.deferred_free.extend(req.block_ids)
        req.block_ids = []
        if req.row >= 0:
            req.deferred_rows.append(req.row)
            req.row = -1
        self.release_deferred(req)

    def launched(self, plan: StepPlan, sample_rows: list[Request]) -> None:
        """A step was launched: its requests are in flight, and each sampling row's token stays on the device (its
        ``carry_row``) until the step lands."""
        for s in plan.seqs:
            s.req.steps_in_flight += 1
        for row, req in enumerate(sample_rows):
            req.tokens_in_flight += 1
            req.carry_row = row

    def landed(self, seq: ScheduledSeq) -> None:
        """The step holding ``seq`` was processed (its sampled token, if any, was appended by the caller)."""
        req = seq.req
        req.steps_in_flight -= 1
        if seq.samples:
            req.tokens_in_flight -= 1
        self.release_deferred(req)

    def release_deferred(self, req: Request) -> None:
        """Blocks and table rows go back only when no launched step can still read them (``steps_in_flight == 0``)."""
        if req.steps_in_flight == 0:
            if req.deferred_free:
                self.cache.allocator.free(req.deferred_free)
                req.deferred_free = []
            for row in req.deferred_rows:
                self.rows.give(row)
            req.deferred_rows = []

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        req.status = RequestStatus.WAITING
        req.num_computed = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._release(req)
        self.waiting.appendleft(req)

    # --- the step -----------------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_batch_tokens
        if self.policy == "prefill_first":
            budget = self._admit(plan, budget)
            self._schedule_running(plan, budget)
        else:
            budget = self._schedule_running(plan, budget)
            self._admit(plan, budget)
        return plan

    def _blocks_needed(self, req: Request, num_tokens: int) -> int:
        return max(0, self.cache.blocks_for(req.num_computed + num_tokens) - len(req.block_ids))

    def _add(self, plan: StepPlan, req: Request, n: int) -> None:
        new = self.cache.allocator.allocate(self._blocks_needed(req, n))
        req.block_ids.extend(new)
        start = req.num_computed
        req.num_computed += n
        samples = req.num_computed == req.total_len
        plan.seqs.append(ScheduledSeq(req, start, n, samples, new))
        plan.num_tokens += n

    def _schedule_running(self, plan: StepPlan, budget: int) -> int:
        # The hot loop of every decode step: locals, and `_blocks_needed`/`_add` written out inline, keep it about a
        # microsecond per request (calling them costs a quarter more host time at 512 sequences).
        scheduled = {id(s.req) for s in plan.seqs}
        bs = self.cache.block_size
        alloc = self.cache.allocator
        seqs = plan.seqs
        running = self.running
        i = 0
        while i < len(running) and budget > 0 and len(seqs) < self.max_num_seqs:
            req = running[i]
            i += 1
            if req.finish_reason is not None or (scheduled and id(req) in scheduled):
                continue
            pending = req.tokens_in_flight
            known = len(req.prompt_ids) + len(req.output_ids)
            if len(req.output_ids) + pending >= req.sampling.max_new_tokens:
                continue
            n = known + pending - req.num_computed
            if n <= 0:
                continue
            if n > budget:
                if not self.chunked_prefill and seqs:
                    continue
                n = budget if self.chunked_prefill else n
            need = -(-(req.num_computed + n) // bs) - len(req.block_ids)
            if need > alloc.num_free:
                # Not enough blocks: recompute-preempt the newest running request (never one already in this plan).
                while need > alloc.num_free:
                    victim = running[-1]
                    if id(victim) in scheduled:
                        victim = req
                    self._preempt(victim)
                    if victim is req:
                        break
                if req.status is not RequestStatus.RUNNING:
                    i -= 1
                    continue
            new = alloc.allocate(need) if need > 0 else []
            if new:
                req.block_ids.extend(new)
            start = req.num_computed
            req.num_computed = start + n
            seqs.append(ScheduledSeq(req, start, n, start + n == known + pending, new))
            plan.num_tokens += n
            if scheduled:
                scheduled.add(id(req))
            budget -= n
        return budget

    def _admit(self, plan: StepPlan, budget: int) -> int:
        while self.waiting and budget > 0 and len(plan.seqs) < self.max_num_seqs:
            req = self.waiting[0]
            if req.finish_reason is not None:  # finished while waiting (its last in-flight token landed)
                self.waiting.popleft()
                continue
            if req.tokens_in_flight or req.steps_in_flight or len(self.running) >= self.max_num_seqs or not self.rows.num_free:
                break
            n = req.total_len
            if n > budget:
                if not self.chunked_prefill:
                    if plan.seqs:
                        break
                else:
                    n = budget
            if self._blocks_needed(req, n) > self.cache.allocator.num_free:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            req.row = self.rows.take()
            self.running.append(req)
            self._add(plan, req, n)
            budget -= n
        return budget
