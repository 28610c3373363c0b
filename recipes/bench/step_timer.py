"""Per-step CUDA timing events on the engine's compute stream: how busy the stream is, without a profiler slowing
the host. Attached to an executor with ``executor.observe(StepTimer())`` (an ``executor.StepObserver``)."""

from __future__ import annotations

import torch


class StepTimer:
    """Records a timing event when each step's compute begins (after its stream waits) and when it ends."""

    def __init__(self) -> None:
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event, bool]] = []
        self._began = None

    def compute_began(self, stream, layout) -> None:
        self._began = torch.cuda.Event(enable_timing=True)
        self._began.record(stream)

    def compute_ended(self, stream, layout) -> None:
        ended = torch.cuda.Event(enable_timing=True)
        ended.record(stream)
        self.events.append((self._began, ended, bool(layout.graph_batch)))

    def busy(self) -> dict:
        """Busy share of the compute stream between the first and last step, overall and over the longest run of
        consecutive decode (graph) steps: sum of step durations / elapsed time. Synchronizes the device.

        An upper bound: once a step's first operation has begun, a wait for the host to enqueue the rest counts."""
        events = self.events
        if len(events) < 2:
            return {}
        torch.cuda.synchronize()

        def busy(run: list) -> float:
            work = sum(a.elapsed_time(b) for a, b, _ in run)
            return 100.0 * work / max(run[0][0].elapsed_time(run[-1][1]), 1e-9)

        longest, current = [], []
        for e in events:
            current = current + [e] if e[2] else []
            if len(current) > len(longest):
                longest = current
        out = {"steps": len(events), "busy_pct": busy(events)}
        if len(longest) >= 2:
            out.update(decode_steps=len(longest), decode_busy_pct=busy(longest))
        other = [(a, b) for a, b, graph in events if not graph]
        if other:  # prefill and mixed steps: GPU ms each (an upper bound, as above), and the span before decode began
            out["other_gpu_ms"] = sum(a.elapsed_time(b) for a, b in other) / len(other)
            first_graph = next((a for a, _, graph in events if graph), None)
            if first_graph is not None:
                out["before_decode_ms"] = events[0][0].elapsed_time(first_graph)
        return out
