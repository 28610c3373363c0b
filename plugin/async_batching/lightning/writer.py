"""JsonlPredictionWriter: one JSON line per finished request, flushed as it arrives, resumable, per-rank under DDP.

The resume key is ``(dataloader_idx, index)``, the sample's dataset index from Lightning's predict sampler, so
a restarted job skips what any earlier run wrote whatever the number of ranks. With several ranks each writes
``<stem>.rank<r>.jsonl``; at the end rank 0 merges them (and any earlier output) into ``path`` in dataset order.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any, Optional

from lightning.pytorch import Callback

from ..request import GenerationResult, Sample, ScoreResult
from ..tensor_parallel import trainer_data_parallel_view
from .record import RequestRecord, RowResult, row_error

Key = tuple[int, int]  # (dataloader_idx, dataset index)
Location = tuple[int, int]  # (file number, byte offset of the line)


def result_row(record: RequestRecord, rank: int = 0, token_ids: bool = True) -> dict[str, Any]:
    """The JSON line of one finished row: a generation (``samples`` when n > 1), a score, or scored choices."""
    r = record.result
    row: dict[str, Any] = {"index": record.index, "dataloader_idx": record.dataloader_idx, **record.identity()}
    if record.kind == "generate":
        row.update(_generation_fields(r, record.sampling.n > 1, token_ids))
    elif record.kind == "score":
        row.update(_score_fields(r), error=r.error)
    else:
        row.update(scores=[_score_fields(s, with_error=True) for s in r], error=row_error(r))
    row["rank"] = rank
    if record.meta:
        row["meta"] = record.meta
    return row


def _generation_fields(r: GenerationResult, several: bool, token_ids: bool) -> dict[str, Any]:
    if several:  # n > 1: the prompt's fields once, then each sample
        samples = [{"text": s.text, "finish_reason": s.finish_reason, "output_len": len(s.token_ids),
                    "cumulative_logprob": s.cumulative_logprob, **_token_fields(s, token_ids)} for s in r.samples]
        return {"samples": samples, "error": r.error, "prompt_len": r.prompt_len, "ttft_s": r.ttft_s,
                "latency_s": r.latency_s, "num_preemptions": r.num_preemptions}
    return {"output": r.text, "finish_reason": r.finish_reason, "error": r.error, "prompt_len": r.prompt_len,
            "output_len": len(r.token_ids), "ttft_s": r.ttft_s, "latency_s": r.latency_s,
            "num_preemptions": r.num_preemptions, **_token_fields(r, token_ids)}


def _token_fields(r: Any, token_ids: bool) -> dict[str, Any]:
    """The token ids (optional) and, when requested, logprobs of a ``GenerationResult`` or ``Sample``."""
    out: dict[str, Any] = {"token_ids": list(r.token_ids)} if token_ids else {}
    if r.logprobs is not None:
        out["logprobs"] = r.logprobs
    if r.top_logprobs is not None:
        out["top_logprobs"] = [{str(k): v for k, v in d.items()} for d in r.top_logprobs]
    return out


def _score_fields(s: ScoreResult, with_error: bool = False) -> dict[str, Any]:
    out = {"logprob": None if s.error is not None else float(s.logprob), "is_greedy": bool(s.is_greedy),
           "token_logprobs": [float(x) for x in s.token_logprobs], "prompt_len": s.prompt_len, "latency_s": s.latency_s,
           "num_preemptions": s.num_preemptions}
    if with_error and s.error is not None:
        out["error"] = s.error
    return out


def _top_in(top: Optional[list[dict[str, float]]]) -> Optional[list[dict[int, float]]]:
    return None if top is None else [{int(k): v for k, v in d.items()} for d in top]


def row_result(row: dict[str, Any]) -> RowResult:
    """The result read back from a line (resumed rows): a ``GenerationResult``, ``ScoreResult`` or list of them."""
    if "scores" in row:
        return [_score_result(row["index"], s) for s in row["scores"]]
    if "logprob" in row:
        return _score_result(row["index"], row)
    if "samples" in row:
        samples = [Sample(list(s.get("token_ids") or []), s.get("finish_reason"), s.get("text"), s.get("logprobs"),
                          _top_in(s.get("top_logprobs")), s.get("cumulative_logprob")) for s in row["samples"]]
        first = samples[0] if samples else Sample([], "error")
        return GenerationResult(
            index=row["index"], token_ids=first.token_ids, finish_reason=first.finish_reason,
            prompt_len=row.get("prompt_len", 0), text=first.text, ttft_s=row.get("ttft_s"),
            latency_s=row.get("latency_s"), logprobs=first.logprobs, top_logprobs=first.top_logprobs,
            num_preemptions=row.get("num_preemptions", 0), error=row.get("error"), samples=samples,
            cumulative_logprob=first.cumulative_logprob,
        )
    return GenerationResult(
        index=row["index"],
        token_ids=list(row.get("token_ids") or []),
        finish_reason=row.get("finish_reason"),
        prompt_len=row.get("prompt_len", 0),
        text=row.get("output"),
        ttft_s=row.get("ttft_s"),
        latency_s=row.get("latency_s"),
        logprobs=row.get("logprobs"),
        top_logprobs=_top_in(row.get("top_logprobs")),
        num_preemptions=row.get("num_preemptions", 0),
        error=row.get("error"),
    )


def _score_result(index: int, fields: dict[str, Any]) -> ScoreResult:
    logprob = fields.get("logprob")
    return ScoreResult(index, math.nan if logprob is None else logprob, bool(fields.get("is_greedy")),
                       list(fields.get("token_logprobs") or []), fields.get("prompt_len", 0), fields.get("latency_s"),
                       fields.get("num_preemptions", 0), fields.get("error"))


def _is_error(row: dict[str, Any]) -> bool:
    return row.get("error") is not None or row.get("finish_reason") == "error"


def repair_tail(path: str) -> None:
    """Cut a line torn by a kill (no final newline) so appended lines stay whole."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        size = f.seek(0, os.SEEK_END)
        chunk = 1 << 16
        end = size
        while end > 0:
            start = max(0, end - chunk)
            f.seek(start)
            cut = f.read(end - start).rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            end = start
        f.truncate(0)


class OutputIndex:
    """Where each finished request's line is in a set of JSONL files; later files never override earlier keys."""

    def __init__(self, files: list[str], skip_errors: bool = False) -> None:
        self.files = files
        self.locations: dict[Key, Location] = {}
        self._readers: dict[int, Any] = {}
        for n, path in enumerate(files):
            for offset, row in _rows(path):
                key = (row.get("dataloader_idx", 0), row["index"])
                if skip_errors and _is_error(row):
                    continue
                old = self.locations.get(key)
                if old is None or (self._is_error_at(old) and not _is_error(row)):
                    self.locations[key] = (n, offset)

    def __contains__(self, key: Key) -> bool:
        return key in self.locations

    def __len__(self) -> int:
        return len(self.locations)

    def _is_error_at(self, loc: Location) -> bool:
        return _is_error(self.read(loc))

    def line(self, loc: Location) -> bytes:
        n, offset = loc
        f = self._readers.get(n)
        if f is None:
            f = self._readers[n] = open(self.files[n], "rb")
        f.seek(offset)
        return f.readline()

    def read(self, loc: Location) -> dict[str, Any]:
        return json.loads(self.line(loc))

    def get(self, key: Key) -> Optional[dict[str, Any]]:
        loc = self.locations.get(key)
        return None if loc is None else self.read(loc)

    def close(self) -> None:
        for f in self._readers.values():
            f.close()
        self._readers.clear()


def _rows(path: str):
    """(byte offset, row) for each whole, parseable line of a JSONL file."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        offset = 0
        for line in f:
            if line.endswith(b"\n"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if isinstance(row, dict) and "index" in row:
                    yield offset, row
            offset += len(line)


def part_paths(path: str) -> list[str]:
    """The per-rank files next to ``path`` (``out.jsonl`` -> ``out.rank0.jsonl``, ...)."""
    stem, ext = os.path.splitext(path)
    return sorted(glob.glob(glob.escape(stem) + ".rank*" + ext))


def part_path(path: str, rank: int) -> str:
    stem, ext = os.path.splitext(path)
    return f"{stem}.rank{rank}{ext}"


def merge_jsonl(path: str, parts: Optional[list[str]] = None, keep_parts: bool = False) -> int:
    """Merge ``path`` (if it exists) and the per-rank parts into ``path`` in dataset order, one line per request.

    A request written twice keeps its first successful line. Returns the number of lines written.
    """
    parts = part_paths(path) if parts is None else parts
    sources = [p for p in [path] + [p for p in parts if p != path] if os.path.exists(p)]
    index = OutputIndex(sources)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as out:
            for key in sorted(index.locations):
                out.write(index.line(index.locations[key]))
            out.flush()
            os.fsync(out.fileno())
    finally:
        index.close()
    os.replace(tmp, path)
    if not keep_parts:
        for p in parts:
            if p != path and os.path.exists(p):
                os.remove(p)
    return len(index)


class JsonlPredictionWriter(Callback):
    """Writes each row ``ContinuousBatching`` finishes as one JSON line; a rerun skips rows already written.

    It is an ordinary callback of the loop's result and resume hooks (``on_generation_result``, ``previous_result``).

    ``resume=False`` starts the output afresh; ``retry_errors=True`` regenerates requests whose line is an error.
    """

    def __init__(
        self,
        path: str,
        *,
        resume: bool = True,
        token_ids: bool = True,
        merge: bool = True,
        keep_parts: bool = False,
        retry_errors: bool = False,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.resume = resume
        self.token_ids = token_ids
        self.merge = merge  # at the end: one file in dataset order (sorted in place for a single process)
        self.keep_parts = keep_parts
        self.retry_errors = retry_errors
        self.rank = 0  # data-parallel rank and size: a tensor-parallel group counts as one
        self.world_size = 1
        self.writes = True
        self._barriers = False
        self.file_path = self.path
        self.written = 0
        self._index: Optional[OutputIndex] = None
        self._file = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "predict":
            return
        # Under tensor parallelism a group of ranks serves one data shard: its first rank writes, the others read
        # what earlier runs wrote (so that they skip the same requests) and write nothing.
        self.rank, self.world_size, self.writes = trainer_data_parallel_view(trainer)
        self._barriers = trainer.world_size > 1
        self.file_path = self.path if self.world_size == 1 else part_path(self.path, self.rank)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if not self.writes:
            self._index = OutputIndex(self._files(), skip_errors=self.retry_errors) if self.resume else OutputIndex([])
            self.written = 0
            return
        if not self.resume:
            if self.rank == 0:
                # Only files no live rank writes (each rank empties its own part below), so no rank loses lines.
                live = self.world_size if self.world_size > 1 else 0
                stale = [self.path] + [p for p in part_paths(self.path) if _rank_of(p) >= live]
                for p in stale:
                    if p != self.file_path and os.path.exists(p):
                        os.remove(p)
            open(self.file_path, "w").close()
        repair_tail(self.file_path)
        self._index = OutputIndex(self._files(), skip_errors=self.retry_errors) if self.resume else OutputIndex([])
        self._file = open(self.file_path, "a", encoding="utf-8")
        self.written = 0

    def _files(self) -> list[str]:
        return [self.path] + [p for p in part_paths(self.path) if p != self.path]

    @property
    def num_previous(self) -> int:
        """Requests found in the output of earlier runs at setup."""
        return 0 if self._index is None else len(self._index)

    def previous_result(self, trainer: Any, pl_module: Any, record: RequestRecord) -> Optional[RowResult]:
        """Resume hook of ``ContinuousBatching``'s loop: what an earlier run wrote for this row, or None.

        A different prompt (or context, continuation, choices) under the row's key is an error.
        """
        if self._index is None or record.key not in self._index:
            return None
        row = self._index.get(record.key)
        differs = [k for k, v in record.identity().items() if row.get(k) != v]
        if differs:
            what = "prompt" if differs == ["prompt"] else " and ".join(differs)
            raise ValueError(
                f"{self.path} already holds dataset index {record.index} with a different {what}: it is the "
                "output of another job; write elsewhere or pass resume=False to start it afresh"
            )
        return row_result(row)

    def on_generation_result(self, trainer: Any, pl_module: Any, record: RequestRecord) -> None:
        """Result hook of ``ContinuousBatching``'s loop: append the row's line, unless an earlier run wrote it."""
        if self._file is None or (self._index is not None and record.key in self._index):
            return
        self._file.write(json.dumps(result_row(record, self.rank, self.token_ids), ensure_ascii=False) + "\n")
        self._file.flush()  # a killed job keeps every line written so far
        self.written += 1

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()
        if not self.merge:
            return
        if self._barriers:
            trainer.strategy.barrier("JsonlPredictionWriter.merge")
        if self.rank == 0 and self.writes:
            merge_jsonl(self.path, part_paths(self.path), keep_parts=self.keep_parts)
        if self._barriers:
            trainer.strategy.barrier("JsonlPredictionWriter.merged")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._index is not None:
            self._index.close()


def _rank_of(path: str) -> int:
    stem = os.path.splitext(path)[0]
    try:
        return int(stem.rsplit(".rank", 1)[1])
    except (IndexError, ValueError):
        return -1


__all__ = ["JsonlPredictionWriter", "merge_jsonl", "part_path", "part_paths", "repair_tail", "result_row", "row_result"]
