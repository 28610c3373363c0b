"""Which requests get how many tokens in the next step, within the token budget, the logits budget, the sequence cap
and the KV blocks; and the in-flight bookkeeping that decides when a request's blocks may be freed.

In-flight invariants (the scheduler is the only writer of these ``Request`` fields):
- ``steps_in_flight``: raised for every request of a step when it is launched (``launched``), lowered when that step
  is processed (``landed``). Blocks and the table row of a finished or preempted request wait in ``deferred_free`` /
  ``deferred_rows`` until it is 0: no launched step can then read or write them.
- ``tokens_in_flight`` / ``carry_row``: a sampling row's token stays on the device until its step lands; the next
  step's input for that position is gathered on the device from row ``carry_row`` of the launched step's tokens.
- A waiting request is admitted only with nothing in flight, and a request whose in-flight tokens already reach
  ``max_new_tokens`` is not scheduled again.

Admission in batches (``admit_threshold``): while requests run, a decode-only plan admits waiting requests only
once that many of them fit, or all of them do (see ``_admission_due``); a plan with prefill work admits as before.
The steps between stay decode-only, so they run as graph windows, and one prefill/mixed step takes in many requests
instead of one per finish.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from .kv_cache import HIT_TABLE_ENTRIES, PagedKVCache, TableRows, block_table_rows
from .prefix_cache import PrefixCache
from .request import Request, RequestStatus

# Admission in batches by default where decode steps replay CUDA graphs: BatcherConfig.admit_threshold's auto value
# there is max_num_seqs // ADMIT_DIVISOR, and admission waits for that many (or an ADMIT_DIVISOR-th of the cache).
# Off (auto is 1 everywhere) until workload W8 measures it on a GPU: built and tested on the CPU in session 13, the
# device was not lent in session 14. Variant ours_async_admit_auto turns it on.
ADMIT_IN_BATCHES_WITH_GRAPHS = False
ADMIT_DIVISOR = 8


def admit_threshold(config, graphs: bool) -> int:
    """``BatcherConfig.admit_threshold``, or its default: 1 (admit at once), or max_num_seqs // ADMIT_DIVISOR with
    decode graphs where ``ADMIT_IN_BATCHES_WITH_GRAPHS`` is on."""
    if config.admit_threshold is not None:
        return config.admit_threshold
    return max(1, config.max_num_seqs // ADMIT_DIVISOR) if graphs and ADMIT_IN_BATCHES_WITH_GRAPHS else 1


@dataclass(slots=True)
class ScheduledSeq:
    req: Request
    start: int  # first position computed in this step
    num_tokens: int
    samples: bool  # the chunk reaches the end of the request's tokens: a new token is sampled
    new_blocks: list[int]  # blocks new to the request's table row (prefix hits at admission, then blocks allocated
    # for this step), at logical indices len(block_ids)-len(new_blocks)..
    score_from: int = 0  # scoring: first position of this chunk whose next-token log-probability is kept
    score_rows: int = 0  # ... and how many


@dataclass
class StepPlan:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    num_tokens: int = 0
    num_samples: int = 0
    num_score_rows: int = 0
    registered: list[int] = field(default_factory=list)  # blocks this plan added to the prefix index
    window: int = 1  # a decode window: this many forwards, each sequence one token further (see ``_widen``)

    def __bool__(self) -> bool:
        return bool(self.seqs)

    @property
    def is_decode_only(self) -> bool:
        """One token per sequence, each sampling (the shape CUDA graphs replay)."""
        return self.num_tokens == len(self.seqs) == self.num_samples and not self.num_score_rows


class Scheduler:
    """Owns the waiting and running queues, the KV blocks and table rows of requests, and their in-flight counts."""

    def __init__(self, cache: PagedKVCache, max_batch_tokens: int, max_num_seqs: int, policy: str,
                 chunked_prefill: bool, max_logit_rows: int, prefix_caching: bool, decode_window: int = 1,
                 max_model_len: int = 2 ** 62, admit_threshold: int = 1, graph_step_tokens: Optional[int] = None):
        self.allocator = cache.allocator
        self.block_size = cache.block_size
        self.max_batch_tokens = max_batch_tokens
        # Generation steps hold at most this many tokens (model_runner.graph_step_tokens: they replay prefill graphs,
        # whose host cost does not need the larger budget); while any scoring request waits or runs, every step may
        # take max_batch_tokens (scored steps are launched from the host). None: no cap.
        self.graph_step_tokens = graph_step_tokens
        self._scoring = 0  # unfinished scoring requests in the queues
        self.max_num_seqs = max_num_seqs
        self.max_logit_rows = max(max_logit_rows, max_num_seqs)  # every sampling row of a step always fits
        self.policy = policy
        self.chunked_prefill = chunked_prefill
        self.prefix = PrefixCache(self.allocator, self.block_size, prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the last one is preempted first
        self.rows = TableRows(block_table_rows(max_num_seqs))
        self.num_preemptions = 0
        self.prefill_tokens = 0  # prompt positions computed
        self.cached_tokens = 0  # prompt positions served by prefix-cache hits
        self.decode_window = decode_window
        self.max_model_len = max_model_len
        self.admit_threshold = max(1, min(admit_threshold, max_num_seqs))
        self.deferred_admissions = 0  # plans that left waiting requests out to admit them in a batch later
        self._plan_id = 0

    # --- queues -------------------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self._scoring += req.is_score
        if self.policy == "shortest_first":
            keys = [len(r.prompt_ids) for r in self.waiting]
            self.waiting.insert(bisect.bisect_right(keys, len(req.prompt_ids)), req)
        else:
            self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request) -> None:
        """Take a request out of the queues and release its blocks once no step in flight reads them."""
        if req.status is not RequestStatus.FINISHED:
            self._scoring -= req.is_score
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING and req in self.waiting:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        self._release(req)

    def _release(self, req: Request) -> None:
        req.deferred_free.extend(reversed(req.block_ids))  # tail first: the allocator evicts prompt tails first
        req.block_ids = []
        req.num_indexed_blocks = 0
        if req.row >= 0:
            req.deferred_rows.append(req.row)
            req.row = -1
        self._release_deferred(req)

    def _release_deferred(self, req: Request) -> None:
        if req.steps_in_flight == 0:
            if req.deferred_free:
                self.allocator.free(req.deferred_free)
                req.deferred_free = []
            for row in req.deferred_rows:
                self.rows.give(row)
            req.deferred_rows = []

    def _preempt(self, req: Request, keep_computed: bool = True) -> None:
        """Recompute ``req`` later. ``keep_computed``: its full blocks written by launched steps stay in the prefix
        cache (generated tokens included), so the recompute mostly hits them."""
        if keep_computed:
            self.prefix.register(req, [], prompt_only=False)
        self.running.remove(req)
        req.status = RequestStatus.WAITING
        req.num_computed = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._release(req)
        self.waiting.appendleft(req)

    # --- in flight ----------------------------------------------------------------------------------------
    def launched(self, plan: StepPlan, sample_rows: list[Request]) -> None:
        """A step was launched: its requests are in flight, and each sampling row's token stays on the device (its
        ``carry_row``) until the step lands."""
        for s in plan.seqs:
            s.req.steps_in_flight += 1
        w = plan.window
        for row, req in enumerate(sample_rows):
            req.tokens_in_flight += w
            req.carry_row = row  # of the window's last draw

    def landed(self, seq: ScheduledSeq, window: int = 1) -> None:
        """The step holding ``seq`` was processed (its sampled tokens, if any, were appended by the caller)."""
        req = seq.req
        req.steps_in_flight -= 1
        if seq.samples:
            req.tokens_in_flight -= window
        self._release_deferred(req)

    def roll_back(self, plan: StepPlan) -> tuple[int, int]:
        """A step ran out of device memory before it was launched: forget the blocks it indexed (their K/V was not
        written), recompute its requests later, and halve the token budget. Returns (old, new) budget.

        Kernels of the failed step already queued on the compute stream run before any later step, so its blocks may
        be handed out again at once (those of requests in the step in flight still wait for it, as always)."""
        for b in plan.registered:
            self.allocator.unregister(b)
        for s in plan.seqs:
            if s.req.status is RequestStatus.RUNNING:
                self._preempt(s.req, keep_computed=False)  # its num_computed counts positions never written
        old = self.step_tokens()
        self.max_batch_tokens //= 2
        if self.graph_step_tokens:
            self.graph_step_tokens //= 2
        return old, self.step_tokens()

    def step_tokens(self) -> int:
        """The token budget of the next step: ``max_batch_tokens``, or the generation steps' cap while no scoring
        request waits or runs."""
        if self.graph_step_tokens and not self._scoring:
            return min(self.max_batch_tokens, self.graph_step_tokens)
        return self.max_batch_tokens

    # --- the step -----------------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        self._plan_id += 1
        plan = StepPlan()
        budget = [self.step_tokens(), self.max_logit_rows, HIT_TABLE_ENTRIES]  # tokens, logits rows, hit entries
        if self.policy == "prefill_first":
            self._admit(plan, budget)
            self._schedule_running(plan, budget)
        else:
            self._schedule_running(plan, budget)
            self._admit(plan, budget)
        if self.decode_window > 1 and plan.is_decode_only:
            self._widen(plan)
        return plan

    def _widen(self, plan: StepPlan) -> None:
        """Make a decode-only plan a window of up to ``decode_window`` forwards: each sequence computes its next
        positions start..start+w-1 in one launch, the tokens sampled by one forward feeding the next on the device.
        Not for rows that stage per-step state (logprobs, repetition penalties), nor past max_model_len; only with
        free blocks for every sequence's window (a window never preempts: the plan stays one step instead).
        Invariants kept: ``num_computed`` counts the window's positions, ``tokens_in_flight`` its draws (raised by
        ``launched``), so ``_wanted`` sees one next position per request as after any step. A request that stops
        inside the window keeps its blocks until the window lands (``steps_in_flight``); its later tokens are
        dropped by the caller."""
        w, bs = self.decode_window, self.block_size
        seqs = plan.seqs
        need = 0
        for s in seqs:
            req = s.req
            if req.logprobs is not None or req.sampling.repetition_penalty != 1.0:
                return
            w = min(w, self.max_model_len - s.start)
        if w <= 1:
            return
        for s in seqs:
            need += (s.start + w + bs - 1) // bs - len(s.req.block_ids)
        if need > self.allocator.num_free:
            return
        for s in seqs:
            req = s.req
            n = (s.start + w + bs - 1) // bs - len(req.block_ids)
            if n > 0:
                new = self.allocator.allocate(n)
                req.block_ids.extend(new)
                s.new_blocks = s.new_blocks + new
            req.num_computed = s.start + w
        plan.window = w

    def _wanted(self, req: Request) -> int:
        """Tokens the request could compute now (0: nothing to do until the step in flight lands, or done)."""
        if req.score_start >= 0:  # the last token's logits score nothing: positions up to the one before it
            return len(req.prompt_ids) - 1 - req.num_computed
        out = len(req.output_ids) + req.tokens_in_flight
        if out >= req.sampling.max_new_tokens:
            return 0
        return len(req.prompt_ids) + out - req.num_computed

    def _fit(self, req: Request, n: int, budget: list[int], plan: StepPlan) -> int:
        """The chunk of the ``n`` wanted tokens that fits the budget now (0: none)."""
        if n > budget[0]:
            if not self.chunked_prefill:
                return 0 if plan.seqs else n
            n = budget[0]
        if req.score_start >= 0:  # scored positions need a logits row each, within the step's logits budget
            rows = budget[1]
            start = max(req.num_computed, req.score_start)
            if min(req.num_computed + n, len(req.prompt_ids) - 1) - start > rows:
                if not self.chunked_prefill:
                    return 0 if plan.seqs else n
                n = start + rows - req.num_computed
            return max(n, 0)
        if budget[1] < 1 and req.num_computed + n == req.total_len:  # a sampling row needs a logits row
            return 0
        return n

    def _add(self, plan: StepPlan, req: Request, n: int, budget: list[int], hits: list[int] = ()) -> None:
        """Put ``n`` tokens of ``req`` into the plan (its blocks are known to fit; ``hits``: its prefix-cache hits,
        when it is admitted now). The hot path of every decode step: plain attribute arithmetic, no properties."""
        bs = self.block_size
        start = req.num_computed
        end = start + n
        need = (end + bs - 1) // bs - len(req.block_ids)
        if need > 0:
            new = self.allocator.allocate(need)
            req.block_ids.extend(new)
        else:
            new = []
        if hits:
            new = hits + new
        req.num_computed = end
        req.planned = self._plan_id
        p = len(req.prompt_ids)
        if start < p:
            self.prefill_tokens += min(end, p) - start
        if req.score_start >= 0:
            first = max(start, req.score_start)
            rows = max(0, min(end, p - 1) - first)
            seq = ScheduledSeq(req, start, n, False, new, first, rows)
            plan.num_score_rows += rows
            budget[1] -= rows
        else:
            samples = end == p + len(req.output_ids) + req.tokens_in_flight
            seq = ScheduledSeq(req, start, n, samples, new)
            if samples:
                plan.num_samples += 1
                budget[1] -= 1
        plan.seqs.append(seq)
        plan.num_tokens += n
        budget[0] -= n
        full_to = (req.num_indexed_blocks + 1) * bs
        if full_to <= end and full_to <= p:  # a prompt block became full
            self.prefix.register(req, plan.registered)

    def _schedule_running(self, plan: StepPlan, budget: list[int]) -> None:
        running, alloc, bs = self.running, self.allocator, self.block_size
        plan_id, seqs, max_seqs, wanted, fit = self._plan_id, plan.seqs, self.max_num_seqs, self._wanted, self._fit
        i = 0
        while i < len(running) and budget[0] > 0 and len(seqs) < max_seqs:
            req = running[i]
            i += 1
            if req.finish_reason is not None or req.planned == plan_id:
                continue
            n = fit(req, wanted(req), budget, plan)
            if n <= 0:
                continue
            need = (req.num_computed + n + bs - 1) // bs - len(req.block_ids)
            while need > 0 and need > alloc.num_free:
                # Not enough blocks: recompute-preempt the newest running request (never one already in this plan).
                victim = running[-1]
                if victim.planned == plan_id:
                    victim = req
                self._preempt(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                i -= 1  # req itself was preempted: the next request moved into its place
                continue
            self._add(plan, req, n, budget)

    def _ready(self, req: Request) -> bool:
        """Samples of a prompt wait while sample 0 is computing the prompt, then share its blocks."""
        parent = req.parent
        return (parent is None or parent.status is not RequestStatus.RUNNING
                or parent.num_computed >= len(parent.prompt_ids))

    def _admission_due(self) -> bool:
        """With requests running and a threshold above 1: do ``admit_threshold`` waiting requests (or all of them, if
        fewer) fit now, by free sequence slots and, from their prompt lengths (prefix hits not counted), free KV
        blocks, or is an eighth of the cache free (a cache too small for that many prompts does not wait for most
        running requests to finish)? Nothing running: always (the GPU would idle); the running requests free slots
        and blocks as they finish, so a deferred request is admitted at the latest when they all have."""
        if not self.running or self.admit_threshold <= 1:
            return True
        want = min(self.admit_threshold, len(self.waiting))
        if self.max_num_seqs - len(self.running) < want:
            return False
        alloc, bs, blocks = self.allocator, self.block_size, 0
        if alloc.num_free * ADMIT_DIVISOR >= alloc.num_usable:
            return True
        for i in range(want):
            blocks += -(-self.waiting[i].total_len // bs)
        return blocks <= alloc.num_free

    def _admit(self, plan: StepPlan, budget: list[int]) -> None:
        # A plan with prefill work is a mixed step anyway: admitting into it costs no extra step.
        if self.waiting and plan.is_decode_only and not self._admission_due():
            self.deferred_admissions += 1
            return
        alloc, bs = self.allocator, self.block_size
        while self.waiting and budget[0] > 0 and len(plan.seqs) < self.max_num_seqs:
            req = self.waiting[0]
            if req.finish_reason is not None:  # finished while waiting (its last in-flight token landed)
                self.waiting.popleft()
                continue
            if (req.tokens_in_flight or req.steps_in_flight or len(self.running) >= self.max_num_seqs
                    or not self.rows.num_free or not self._ready(req)):
                break
            # Reuse cached full blocks, but compute at least the first position whose logits are needed.
            first_logit = req.score_start if req.score_start >= 0 else req.total_len - 1
            hits = self.prefix.match(req, first_logit)
            if len(hits) > budget[2]:  # the step's staging has room for this many hit entries: recompute the rest
                alloc.free(list(reversed(hits[budget[2]:])))
                hits = hits[:budget[2]]
            req.block_ids = list(hits)
            req.num_computed = len(hits) * bs
            req.num_indexed_blocks = len(hits)
            n = self._fit(req, self._wanted(req), budget, plan)
            if n <= 0 or -(-(req.num_computed + n) // bs) - len(hits) > alloc.num_free:
                alloc.free(list(reversed(hits)))
                req.block_ids = []
                req.num_computed = req.num_indexed_blocks = 0
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            req.row = self.rows.take()
            self.running.append(req)
            self.cached_tokens += min(req.num_computed, len(req.prompt_ids))
            budget[2] -= len(hits)
            self._add(plan, req, n, budget, hits)
