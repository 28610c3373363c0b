"""One profiled run: GPU kernel intervals and the engine's ``ab.*`` host phases, both on the profiler's clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

RUN_RANGE = "bench.run"  # brackets the profiled call, so busy % has the same wall time as the run itself
SETUP_RANGE = "bench.setup"  # engine construction inside a run (variants that build per call): left out of busy %
HOST_PREFIX = "ab."
Interval = tuple[int, int]  # (start_ns, end_ns)


@dataclass
class Trace:
    """What a profiled run leaves: the run's extent, GPU kernels, GPU copies and the host phases (ns)."""

    run: Interval
    kernels: list[Interval] = field(default_factory=list)
    copies: list[Interval] = field(default_factory=list)
    host: dict[str, list[Interval]] = field(default_factory=dict)
    setup: list[Interval] = field(default_factory=list)
    kernel_ns: dict[str, int] = field(default_factory=dict)  # GPU time per kernel family (``kernel_family``)
    families: list[str] = field(default_factory=list)  # the family of each entry of ``kernels``
    names: list[str] = field(default_factory=list)  # the full name of each entry of ``kernels`` (when recorded)

    @property
    def wall_ns(self) -> int:
        """The run's wall time less its setup spans."""
        return max(self.run[1] - self.run[0] - union_length(self.setup, self.run), 1)

    def gpu_busy_ns(self) -> int:
        """Length of the union of kernel intervals in the run, outside setup spans."""
        return union_length(self.kernels, self.run) - sum(union_length(self.kernels, s) for s in merge(self.setup))

    def host_ns(self, phase: str) -> int:
        return sum(e - s for s, e in self.host.get(phase, []))

    def steady_window(self, window_ms: float, at: float) -> Interval:
        """A window of ``window_ms`` centred at fraction ``at`` of the run (late enough to be in steady decode)."""
        width = int(window_ms * 1e6)
        begin = max([self.run[0]] + [e for _, e in self.setup])
        centre = begin + int(at * (self.run[1] - begin))
        start = max(begin, min(centre - width // 2, self.run[1] - width))
        return start, start + width

    def busy_between(self, f0: float, f1: float) -> float:
        """GPU busy % over the part of the run between fractions ``f0`` and ``f1`` of it (after setup spans)."""
        begin = max([self.run[0]] + [e for _, e in self.setup])
        span = self.run[1] - begin
        w = (begin + int(f0 * span), begin + int(f1 * span))
        return 100.0 * union_length(self.kernels, w) / max(w[1] - w[0], 1)

    def steady(self, f0: float, f1: float, step_range: str = "ab.launch.forward", top_names: int = 25) -> dict[str, Any]:
        """Per engine step between fractions ``f0`` and ``f1`` of the run (steady decode, for a long enough run):
        wall ms, GPU busy ms, kernels launched and GPU ms by kernel family. Steps are the host ``step_range`` spans
        that start in the window (None where the run has none, e.g. the baselines): the model's forwards, so that a
        decode window of several forwards counts each."""
        begin = max([self.run[0]] + [e for _, e in self.setup])
        span = self.run[1] - begin
        w0, w1 = begin + int(f0 * span), begin + int(f1 * span)
        steps = sum(1 for s, _ in self.host.get(step_range, []) if w0 <= s < w1)
        inside = [(s, e, f) for (s, e), f in zip(self.kernels, self.families) if w0 <= s < w1]
        by_family: dict[str, int] = {}
        for s, e, f in inside:
            by_family[f] = by_family.get(f, 0) + e - s
        out: dict[str, Any] = {"window": [f0, f1], "steps": steps or None}
        if steps:
            out.update(
                wall_ms_per_step=(w1 - w0) / 1e6 / steps,
                gpu_ms_per_step=union_length(self.kernels, (w0, w1)) / 1e6 / steps,
                kernels_per_step=len(inside) / steps,
                kernel_ms_per_step={f: round(ns / 1e6 / steps, 4) for f, ns in sorted(by_family.items(), key=lambda kv: -kv[1])},
            )
            if self.names:  # the costliest kernels by full name: launches per step and mean microseconds
                per: dict[str, list[int]] = {}
                for (s, e), name in zip(self.kernels, self.names):
                    if w0 <= s < w1:
                        acc = per.setdefault(name, [0, 0])
                        acc[0] += 1
                        acc[1] += e - s
                top = sorted(per.items(), key=lambda kv: -kv[1][1])[:top_names]
                out["top_kernels"] = [{"name": n[:160], "per_step": c / steps, "mean_us": t / c / 1e3,
                                       "ms_per_step": t / 1e6 / steps} for n, (c, t) in top]
        return out

    def window(self, window: Interval) -> dict[str, Any]:
        """The slice of the trace inside ``window``, in ms from its start (what the timeline figure draws)."""
        w0, w1 = window

        def cut(intervals: Iterable[Interval]) -> list[list[float]]:
            return [[(max(s, w0) - w0) / 1e6, (min(e, w1) - w0) / 1e6] for s, e in intervals if e > w0 and s < w1]

        return {
            "window_ms": (w1 - w0) / 1e6,
            "gpu_kernels": cut(merge(self.kernels)),
            "gpu_copies": cut(merge(self.copies)),
            "host": {name: cut(spans) for name, spans in sorted(self.host.items())},
            "gpu_busy_pct": 100.0 * union_length(self.kernels, window) / max(w1 - w0, 1),
        }


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, non-overlapping union of intervals."""
    out: list[list[int]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def union_length(intervals: Iterable[Interval], window: Interval) -> int:
    w0, w1 = window
    clipped = [(max(s, w0), min(e, w1)) for s, e in intervals if e > w0 and s < w1]
    return sum(e - s for s, e in merge(clipped))


def _profiler(device: str) -> profile:
    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    kw: dict[str, Any] = {}
    try:  # engines and hf_cb may run their loop in a thread; older torch lacks the switch
        from torch._C._profiler import _ExperimentalConfig

        kw["experimental_config"] = _ExperimentalConfig(profile_all_threads=True)
    except (ImportError, TypeError):
        pass
    return profile(activities=activities, record_shapes=False, with_stack=False, **kw)


_GPU_KINDS = {"kernel": "kernel", "gpu_memcpy": "copy", "gpu_memset": "copy"}


def _kind(activity: str, name: str, on_gpu: bool) -> str:
    """kernel, copy, host (CPU-side ranges and ops) or other (e.g. GPU-side mirrors of record_function ranges)."""
    if activity:
        if activity in _GPU_KINDS:
            return _GPU_KINDS[activity]
        return "host" if activity in ("user_annotation", "cpu_op") and not on_gpu else "other"
    if not on_gpu:
        return "host"
    if name.startswith(("Memcpy", "Memset")):
        return "copy"
    return "other" if name.startswith((HOST_PREFIX, "bench.", "ProfilerStep")) else "kernel"


def _raw_events(prof: profile) -> list[tuple[str, str, int, int]]:
    """(name, kind, start_ns, end_ns) for every event; the raw Kineto list is much faster than ``prof.events()``."""
    out = []
    kineto = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if kineto is not None:
        for e in kineto.events():
            start, name = e.start_ns(), e.name()
            activity = e.activity_type() if hasattr(e, "activity_type") else ""
            kind = _kind(activity, name, e.device_type() != torch.autograd.DeviceType.CPU)
            out.append((name, kind, start, start + e.duration_ns()))
        return out
    for e in prof.events():  # pragma: no cover - fallback for profilers without kineto results
        kind = _kind("", e.name, e.device_type != torch.autograd.DeviceType.CPU)
        out.append((e.name, kind, int(e.time_range.start * 1000), int(e.time_range.end * 1000)))
    return out


def kernel_family(name: str) -> str:
    """A kernel's name without its template arguments, launch bounds and inductor's fusion suffixes, so that the
    GPU time of one kind of work adds up: matrix products, our attention, inductor's fused kernels, torch's ops."""
    low = name.lower()
    if any(tag in low for tag in ("gemm", "nvjet", "cutlass", "xmma", "gemv", "cublas")):
        return "matmul (cuBLAS)"
    if name.startswith("triton_"):  # inductor: triton_poi_fused_add_mul_0 -> inductor poi
        return "inductor " + name.split("_")[1]
    if name.startswith("void "):
        name = name[5:]
    name = name.replace("(anonymous namespace)::", "")
    name = name.split("<")[0].split("(")[0]
    return name.rsplit("::", 1)[-1][:60] or "?"


def profiled_run(fn: Callable[[], Any], device: str) -> tuple[Any, Trace]:
    """Call ``fn`` under torch.profiler and return its result with the extracted trace."""
    prof = _profiler(device)
    with prof:
        with record_function(RUN_RANGE):
            result = fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
    run: Optional[Interval] = None
    kernels, copies, host, setup, families, kernel_family_of, kernel_names = [], [], {}, [], {}, [], []
    for name, kind, s, e in _raw_events(prof):
        if kind == "kernel":
            kernels.append((s, e))
            family = kernel_family(name)
            kernel_family_of.append(family)
            kernel_names.append(name)
            families[family] = families.get(family, 0) + e - s
        elif kind == "copy":
            copies.append((s, e))
        elif kind != "host":
            continue
        elif name == RUN_RANGE:
            run = (s, e)
        elif name == SETUP_RANGE:
            setup.append((s, e))
        elif name.startswith(HOST_PREFIX):
            host.setdefault(name, []).append((s, e))
    if run is None:
        raise RuntimeError(f"profiler trace has no {RUN_RANGE!r} range")
    return result, Trace(run=run, kernels=kernels, copies=copies, host=host, setup=setup, kernel_ns=families,
                         families=kernel_family_of, names=kernel_names)
