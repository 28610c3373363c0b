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
    seed: Optional[int] = None  # None: the batcher's seed; sampling is reproducible per (seed, token index)
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
class GenerationResult:
    """The outcome of one request: generated ids (prompt excluded), text when a tokenizer is known, and timings."""

    index: int
    token_ids: list[int]
    finish_reason: Optional[str]  # "stop", "length", "error" or "cancelled"
    prompt_len: int
    text: Optional[str] = None
    ttft_s: Optional[float] = None  # submit -> first generated token on the host
    latency_s: Optional[float] = None  # submit -> finished
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[dict[int, float]]] = None
    num_preemptions: int = 0
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(eq=False)
class Request:
    """Engine-side state of one request. The scheduler moves it between queues; nobody else changes its status.

    ``num_computed`` counts positions whose K/V is written or scheduled by a launched step; ``num_pending``
    counts sampled tokens still on the GPU (async mode: at most one, from the step in flight).
    """

    index: int
    prompt_ids: list[int]
    sampling: SamplingParams
    eos_ids: frozenset[int]
    seed: int
    detokenizer: Any = None
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_pending: int = 0
    pending_row: int = -1  # row of the pending token in the last launched step's sampled tokens
    block_ids: list[int] = field(default_factory=list)
    deferred_free: list[int] = field(default_factory=list)  # blocks freed once no step in flight reads them
    row: int = -1  # row of the device block table while admitted
    deferred_rows: list[int] = field(default_factory=list)
    inflight: int = 0  # launched steps not yet processed that include this request
    finish_reason: Optional[str] = None
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[dict[int, float]]] = None
    num_preemptions: int = 0
    arrival_s: float = field(default_factory=time.perf_counter)
    first_token_s: Optional[float] = None
    finish_s: Optional[float] = None
    text: Optional[str] = None

    @property
    def num_known(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def total_len(self) -> int:
        """Tokens the request will hold once the step in flight lands."""
        return self.num_known + self.num_pending

    @property
    def num_generated(self) -> int:
        return len(self.output_ids) + self.num_pending

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_at(self, pos: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[pos] if pos < n else self.output_ids[pos - n]

    def wants_more(self) -> bool:
        """False once the generated tokens in flight already reach max_new_tokens (no need to schedule more)."""
        return self.num_generated < self.sampling.max_new_tokens

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

    def result(self) -> GenerationResult:
        text = self.detokenizer.finish() if self.detokenizer is not None else self.text
        end = self.finish_s if self.finish_s is not None else time.perf_counter()
        return GenerationResult(
            index=self.index,
            token_ids=list(self.output_ids),
            finish_reason=self.finish_reason,
            prompt_len=len(self.prompt_ids),
            text=text,
            ttft_s=None if self.first_token_s is None else self.first_token_s - self.arrival_s,
            latency_s=end - self.arrival_s,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs,
            num_preemptions=self.num_preemptions,
        )
