"""SamplingParams (what the user asks for), Request (engine-side state machine), GenerationResult (what comes back)."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence


@dataclass(frozen=True)
class SamplingParams:
    """How to generate for one request. ``temperature=0`` is greedy; EOS comes from the model's generation config."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off; keep tokens whose probability is at least min_p times the top token's
    repetition_penalty: float = 1.0  # 1.0: off; as transformers' (prompt and generated tokens are penalised)
    n: int = 1  # samples of the prompt; the prompt is prefilled once and its KV blocks are shared
    seed: Optional[int] = None  # None: a fresh stream per request, derived from the batcher's seed (reproducible job)
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()  # stop strings, need a tokenizer; the text is cut before the stop string
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # None: off; 0: the sampled token's logprob; k: plus the top-k alternatives

    def problems(self) -> list[str]:
        """Everything wrong with these values, as readable phrases (empty when valid)."""
        out = []
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            out.append(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            out.append(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            out.append(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            out.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            out.append(f"min_p must be in [0, 1], got {self.min_p!r}")
        if (not isinstance(self.repetition_penalty, (int, float)) or not math.isfinite(self.repetition_penalty)
                or self.repetition_penalty <= 0):
            out.append(f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty!r}")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            out.append(f"n must be an int >= 1, got {self.n!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            out.append(f"seed must be an int or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            out.append("stop must be a list of strings, not a single string")
        elif any(not isinstance(s, str) or not s for s in self.stop):
            out.append(f"stop must hold non-empty strings, got {list(self.stop)!r}")
        if isinstance(self.stop_token_ids, (str, bytes)) or any(
            not isinstance(t, int) or isinstance(t, bool) for t in self.stop_token_ids
        ):
            out.append(f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool) or not 0 <= self.logprobs <= 64
        ):
            out.append(f"logprobs must be None or an int in [0, 64], got {self.logprobs!r}")
        return out


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sample:
    """One generated continuation of a prompt (``SamplingParams.n`` of them per ``GenerationResult``)."""

    token_ids: list[int]
    finish_reason: Optional[str]  # "stop", "length", "error" or "cancelled"
    text: Optional[str] = None
    logprobs: Optional[list[float]] = None  # per generated token, when SamplingParams.logprobs is set
    top_logprobs: Optional[list[dict[int, float]]] = None
    cumulative_logprob: Optional[float] = None  # sum of ``logprobs`` (when they are requested)


@dataclass
class GenerationResult:
    """The outcome of one prompt: its samples, and (for convenience) the first sample's fields at the top level."""

    index: int
    token_ids: list[int]
    finish_reason: Optional[str]  # "stop", "length", "error" or "cancelled"
    prompt_len: int
    text: Optional[str] = None
    ttft_s: Optional[float] = None  # submit -> first generated token on the host
    latency_s: Optional[float] = None  # submit -> finished (the last sample)
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[dict[int, float]]] = None
    num_preemptions: int = 0  # over all samples
    error: Optional[str] = None
    samples: list[Sample] = field(default_factory=list)  # n entries; samples[0] mirrors the top-level fields
    cumulative_logprob: Optional[float] = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class ScoreResult:
    """Log-likelihood of a continuation given its context (``ContinuousBatcher.score``)."""

    index: int
    logprob: float  # sum of token_logprobs
    is_greedy: bool  # every continuation token was the argmax of its position
    token_logprobs: list[float]
    prompt_len: int = 0  # context + continuation tokens
    latency_s: Optional[float] = None
    num_preemptions: int = 0
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(eq=False, slots=True)
class Request:
    """Engine-side state of one sequence: a sample of a generation prompt, or a continuation to score.

    The scheduler moves it between queues and is the only writer of its scheduling state (``num_computed``, blocks,
    row, and the in-flight counters below); the batcher appends what lands.
    """

    uid: int  # unique over the batcher's life (internal id; unseeded sampling streams derive from it)
    index: int  # the caller's id: GenerationResult.index / ScoreResult.index (shared by the n samples of a prompt)
    prompt_ids: list[int]
    sampling: SamplingParams
    eos_ids: frozenset[int]
    seed: int  # 64-bit sampling stream
    sample_idx: int = 0  # which of the prompt's n samples
    parent: Optional["Request"] = None  # sample 0 of the prompt, whose prompt blocks the other samples share
    score_start: int = -1  # scoring: first position whose next-token log-probability is kept; -1: generation
    detokenizer: Any = None
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # positions whose K/V is written or scheduled by a launched step
    planned: int = 0  # the last plan (Scheduler's count) that scheduled this request
    # In-flight bookkeeping (Scheduler.launched / Scheduler.landed), see docs/ARCHITECTURE.md:
    steps_in_flight: int = 0  # launched steps, not yet processed, that include this request
    tokens_in_flight: int = 0  # sampled tokens still on the device (async: at most one)
    carry_row: int = -1  # row of that token in the last launched step's sampled tokens (the carry-over source)
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of the full blocks known so far
    num_indexed_blocks: int = 0  # leading blocks already looked up in or offered to the prefix index
    deferred_free: list[int] = field(default_factory=list)  # blocks freed once no step in flight reads them
    row: int = -1  # row of the device block table while admitted
    deferred_rows: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[dict[int, float]]] = None
    score_logprobs: list[float] = field(default_factory=list)
    score_greedy: bool = True
    num_preemptions: int = 0
    arrival_s: float = field(default_factory=time.perf_counter)
    first_token_s: Optional[float] = None
    finish_s: Optional[float] = None
    text: Optional[str] = None

    @property
    def is_score(self) -> bool:
        return self.score_start >= 0

    @property
    def num_known(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def total_len(self) -> int:
        """Tokens the request will hold once the step in flight lands."""
        return self.num_known + self.tokens_in_flight

    @property
    def num_generated(self) -> int:
        return len(self.output_ids) + self.tokens_in_flight

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token: int, now: float) -> None:
        """Append a sampled token and set ``finish_reason`` if a stop condition holds."""
        self.output_ids.append(token)
        if self.first_token_s is None:
            self.first_token_s = now
        sp = self.sampling
        if token in self.eos_ids or token in sp.stop_token_ids:
            self.finish_reason = "stop"
        elif self.detokenizer is not None and self.detokenizer.push(token):
            self.finish_reason = "stop"
        elif len(self.output_ids) >= sp.max_new_tokens:
            self.finish_reason = "length"

    def sample(self) -> Sample:
        text = self.detokenizer.finish() if self.detokenizer is not None else self.text
        cumulative = math.fsum(self.logprobs) if self.logprobs is not None else None
        return Sample(list(self.output_ids), self.finish_reason, text, self.logprobs, self.top_logprobs, cumulative)

    def score_result(self) -> ScoreResult:
        end = self.finish_s if self.finish_s is not None else time.perf_counter()
        return ScoreResult(self.index, math.fsum(self.score_logprobs), self.score_greedy, list(self.score_logprobs),
                           len(self.prompt_ids), end - self.arrival_s, self.num_preemptions)


def generation_result(seqs: Sequence[Request]) -> GenerationResult:
    """The result of one prompt from its finished samples (in sample order)."""
    samples = [r.sample() for r in seqs]
    first, head = samples[0], seqs[0]
    ends = [r.finish_s if r.finish_s is not None else time.perf_counter() for r in seqs]
    firsts = [r.first_token_s for r in seqs if r.first_token_s is not None]
    return GenerationResult(
        index=head.index,
        token_ids=first.token_ids,
        finish_reason=first.finish_reason,
        prompt_len=len(head.prompt_ids),
        text=first.text,
        ttft_s=min(firsts) - head.arrival_s if firsts else None,
        latency_s=max(ends) - head.arrival_s,
        logprobs=first.logprobs,
        top_logprobs=first.top_logprobs,
        num_preemptions=sum(r.num_preemptions for r in seqs),
        samples=samples,
        cumulative_logprob=first.cumulative_logprob,
    )
