"""PredictSettings: what ``ContinuousBatching`` tells its prediction loop, checked once when the callback is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..request import SamplingParams

ON_ERROR = ("skip", "raise")  # skip: a bad request becomes an error result and the job goes on; raise: stop


@dataclass(frozen=True)
class PredictSettings:
    """How the loop turns batches into requests: default sampling, bad-request policy, read-ahead and hook order."""

    sampling: SamplingParams = field(default_factory=SamplingParams)  # for requests that bring none
    on_error: str = "skip"
    lookahead: Optional[int] = None  # keep reading batches while fewer requests wait for admission (None: max_num_seqs)
    ordered: bool = True  # batch hooks in DataLoader order (True) or as batches finish (False)

    def __post_init__(self) -> None:
        if not isinstance(self.sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(self.sampling).__name__}")
        if problems := self.sampling.problems():
            raise ValueError("ContinuousBatching sampling: " + "; ".join(problems))
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error={self.on_error!r} is invalid: expected one of {ON_ERROR}")
        if self.lookahead is not None and (
            not isinstance(self.lookahead, int) or isinstance(self.lookahead, bool) or self.lookahead < 1
        ):
            raise ValueError(f"lookahead={self.lookahead!r} is invalid: expected a positive int or None (max_num_seqs)")


__all__ = ["ON_ERROR", "PredictSettings"]
