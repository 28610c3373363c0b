"""RequestRecord: one row of a DataLoader batch on its way through the engine, and its result once finished."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from ..request import GenerationResult, SamplingParams, ScoreResult

RowResult = Union[GenerationResult, ScoreResult, list[ScoreResult]]


@dataclass(eq=False)
class RequestRecord:
    """One request of a DataLoader batch: where it came from, what it asks, and, once finished, its result.

    A generation row gives a ``GenerationResult``; a scored row (``continuation``) a ``ScoreResult``; a row with
    ``choices`` one ``ScoreResult`` per choice, in order.
    """

    index: int  # the sample's dataset index (Lightning's predict sampler), the resume key with dataloader_idx
    dataloader_idx: int
    batch_idx: int
    prompt: Union[str, list[int]]  # the generation prompt, or the scoring context
    sampling: SamplingParams
    text: Optional[str] = None
    meta: Optional[dict] = None
    continuation: Union[str, list[int], None] = None
    choices: Optional[list] = None
    result: Optional[RowResult] = None
    resumed: bool = False  # read back from the output of an earlier run instead of computed

    @property
    def key(self) -> tuple[int, int]:
        return (self.dataloader_idx, self.index)

    @property
    def kind(self) -> str:
        """``generate``, ``score`` (one continuation) or ``choices`` (several)."""
        if self.choices is not None:
            return "choices"
        return "generate" if self.continuation is None else "score"

    @property
    def shown_prompt(self) -> Union[str, list[int]]:
        """What the output file records as the prompt or context."""
        return self.text if self.text is not None else self.prompt

    def identity(self) -> dict[str, Any]:
        """The fields of the output line that say which request it is (compared on resume), as JSON gives them."""
        if self.kind == "generate":
            return {"prompt": _plain(self.shown_prompt)}
        if self.kind == "score":
            return {"context": _plain(self.shown_prompt), "continuation": _plain(self.continuation)}
        return {"context": _plain(self.shown_prompt), "choices": [_plain(c) for c in self.choices]}


def _plain(x: Any) -> Any:
    return list(x) if isinstance(x, tuple) else x


def row_error(result: RowResult) -> Optional[str]:
    """The error of a row's result (the first failed choice's), None when it succeeded."""
    for part in result if isinstance(result, list) else [result]:
        if part.error is not None:
            return part.error
        if getattr(part, "finish_reason", None) == "error":
            return "error"
    return None


__all__ = ["RequestRecord", "RowResult", "row_error"]
