"""Per-request progress on Lightning's TQDM and Rich bars, and the run statistics behind it and the job summary."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

from ..metrics import percentile
from ..request import GenerationResult
from .record import RowResult, row_error

_COUNTS = ("done", "resumed", "errors", "resumed_errors", "prompt_tokens", "output_tokens", "preemptions")


@dataclass
class GenerationStats:
    """Counters over the finished requests of one predict run on one rank; ``combine`` merges ranks."""

    total: Optional[int] = None  # requests expected on this rank (None: unknown yet)
    done: int = 0
    resumed: int = 0  # found in the output of an earlier run, not generated again
    errors: int = 0  # invalid or failed requests, resumed ones included
    resumed_errors: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    preemptions: int = 0
    finish_reasons: Counter = field(default_factory=Counter)
    ttft_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    start_s: float = field(default_factory=time.perf_counter)
    wall_s: Optional[float] = None  # set by ``finish``; until then, time since start
    startup_s: float = 0.0  # building the engine (cache, warm-up, CUDA graphs), before the clock of ``wall_s``
    live_output_tokens: int = 0  # the engine's count, unfinished requests included (for tokens/s while running)
    ranks: int = 1
    engine: dict[str, Any] = field(default_factory=dict)

    def add(self, result: RowResult, resumed: bool = False) -> None:
        """Count one finished row: a ``GenerationResult``, a ``ScoreResult`` or a row's list of them (choices)."""
        parts = result if isinstance(result, list) else [result]
        failed = row_error(result) is not None
        generated = isinstance(result, GenerationResult)
        self.done += 1
        self.finish_reasons[result.finish_reason if generated else "error" if failed else "scored"] += 1
        self.errors += failed
        if resumed:
            self.resumed += 1
            self.resumed_errors += failed
            return
        self.prompt_tokens += sum(p.prompt_len for p in parts)
        self.preemptions += sum(p.num_preemptions for p in parts)
        if generated:
            self.output_tokens += sum(len(s.token_ids) for s in result.samples) if result.samples else len(
                result.token_ids)
            if result.ttft_s is not None:
                self.ttft_s.append(result.ttft_s)
        latencies = [p.latency_s for p in parts]
        if parts and not failed and None not in latencies:
            self.latency_s.append(max(latencies))

    def started(self) -> None:
        """The engine is built: what came before is start-up, and the generation clock starts now."""
        now = time.perf_counter()
        self.startup_s, self.start_s = now - self.start_s, now

    def finish(self, engine_stats: Optional[dict] = None) -> None:
        self.wall_s = time.perf_counter() - self.start_s
        self.engine = dict(engine_stats or {})

    @property
    def elapsed_s(self) -> float:
        return self.wall_s if self.wall_s is not None else time.perf_counter() - self.start_s

    @property
    def tokens_per_s(self) -> float:
        return max(self.output_tokens, self.live_output_tokens) / max(self.elapsed_s, 1e-9)

    @classmethod
    def combine(cls, parts: list["GenerationStats"]) -> "GenerationStats":
        """One rank's view of the whole job: counts add up, wall time is the slowest rank's."""
        out = cls(total=None if any(p.total is None for p in parts) else sum(p.total for p in parts))
        for p in parts:
            for name in _COUNTS:
                setattr(out, name, getattr(out, name) + getattr(p, name))
            out.finish_reasons.update(p.finish_reasons)
            out.ttft_s += p.ttft_s
            out.latency_s += p.latency_s
            for k, v in p.engine.items():
                if isinstance(v, (int, float)):
                    out.engine[k] = out.engine.get(k, 0) + v
        out.wall_s = max(p.elapsed_s for p in parts)
        out.startup_s = max(p.startup_s for p in parts)
        out.ranks = len(parts)
        return out

    def summary(self) -> dict[str, Any]:
        """The job's numbers as a flat JSON-ready dict (also what ``summary.json`` holds)."""
        return {
            "requests": self.done,
            "generated": self.done - self.resumed - (self.errors - self.resumed_errors),
            "resumed": self.resumed,
            "errors": self.errors,
            "finish_reasons": {str(k): v for k, v in sorted(self.finish_reasons.items(), key=lambda kv: str(kv[0]))},
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "wall_s": self.elapsed_s,
            "startup_s": self.startup_s,
            "output_tokens_per_s": self.tokens_per_s,
            "ttft_p50_s": percentile(self.ttft_s, 50),
            "ttft_p99_s": percentile(self.ttft_s, 99),
            "latency_p50_s": percentile(self.latency_s, 50),
            "latency_p99_s": percentile(self.latency_s, 99),
            "preemptions": self.preemptions,
            "ranks": self.ranks,
            "engine_steps": self.engine.get("steps"),
        }


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def format_summary(s: dict[str, Any]) -> str:
    """A few lines for the terminal from ``GenerationStats.summary()``."""
    reasons = ", ".join(f"{k} {v}" for k, v in s["finish_reasons"].items()) or "-"
    return "\n".join([
        f"requests   {s['requests']} ({s['generated']} generated, {s['resumed']} resumed, {s['errors']} errors;"
        f" {reasons})",
        f"tokens     {s['prompt_tokens']} prompt, {s['output_tokens']} output"
        f" -> {s['output_tokens_per_s']:.1f} output tok/s over {s['ranks']} rank(s)",
        f"TTFT       p50 {_ms(s['ttft_p50_s'])}, p99 {_ms(s['ttft_p99_s'])};"
        f" latency p50 {_ms(s['latency_p50_s'])}, p99 {_ms(s['latency_p99_s'])}",
        f"wall       {s['wall_s']:.2f} s after {s.get('startup_s', 0.0):.2f} s of engine start-up,"
        f" {s['engine_steps'] or 0} engine steps, {s['preemptions']} preemptions",
    ])


def _rate(stats: GenerationStats) -> str:
    return f"{stats.tokens_per_s:.0f} tok/s" + (f", {stats.errors} errors" if stats.errors else "")


class RequestTQDMProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, counting finished requests (done/total) with output tokens/s while generating."""

    def on_predict_batch_start(self, *args: Any, **kwargs: Any) -> None:
        pass  # the bar counts requests, fed by ``on_generation_progress``; batches finish out of step with it

    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_generation_progress(self, trainer: Any, pl_module: Any, stats: GenerationStats) -> None:
        bar = self._predict_progress_bar
        if bar is None or bar.disable:
            return
        bar.unit = "req"
        bar.total = stats.total
        bar.n = stats.done
        bar.set_postfix_str(_rate(stats), refresh=False)
        bar.refresh()


class RequestRichProgressBar(RichProgressBar):
    """Lightning's Rich bar, counting finished requests (done/total) with output tokens/s while generating."""

    def on_predict_batch_start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_generation_progress(self, trainer: Any, pl_module: Any, stats: GenerationStats) -> None:
        if self.is_disabled or self.progress is None:
            return
        text = f"{self.predict_description} ({_rate(stats)})"
        if self.theme.description:
            text = f"[{self.theme.description}]{text}"
        total = float("inf") if stats.total is None else stats.total  # what Lightning's columns expect for unknown
        if self.predict_progress_bar_id is None:
            self.predict_progress_bar_id = self.progress.add_task(text, total=total)
        self.progress.update(self.predict_progress_bar_id, completed=stats.done, total=total, description=text)
        self.refresh()


def request_bar_for(bar: Any) -> Optional[ProgressBar]:
    """A request-counting bar to use instead of Lightning's stock TQDM or Rich ``bar``, with its settings.

    None for any other bar (a subclass or a custom bar keeps its own behaviour).
    """
    if type(bar) is TQDMProgressBar:
        return RequestTQDMProgressBar(refresh_rate=bar.refresh_rate, process_position=bar.process_position,
                                      leave=getattr(bar, "_leave", False))
    if type(bar) is RichProgressBar:
        return RequestRichProgressBar(refresh_rate=bar.refresh_rate, leave=getattr(bar, "_leave", False),
                                      theme=bar.theme, console_kwargs=getattr(bar, "_console_kwargs", None))
    return None


__all__ = ["GenerationStats", "RequestTQDMProgressBar", "RequestRichProgressBar", "format_summary", "request_bar_for"]
