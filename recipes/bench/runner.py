"""One variant in its own process: build the model, warm up, time a full run, profile a short one, write JSON.

With ``first_call.enabled`` (and the variant in ``first_call.variants``), the first call after start-up is timed
before the warm-up, then the same call again: what start-up leaves to compile or tune during a run.

    python -m bench.runner JOB.json RESULT.json      (what recipes/benchmark.py spawns, with recipes/ and plugin/
    python -m bench.runner --probe RESULT.json        on PYTHONPATH; --probe measures the roofline's device rates)
"""

from __future__ import annotations

import gc
import hashlib
import json
import platform
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Iterator, Optional

import torch

from async_batching.metrics import percentile
from bench.nvml_util import open_sampler
from bench.profiling import profiled_run
from bench.roofline import measure_rates
from bench.variants import VARIANTS, RunOutput, Variant
from bench.workloads import Requests, Workload


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _warm_process(model: torch.nn.Module, device: str) -> None:
    """First-use costs of the process (cuBLAS handles, allocator, lazy modules) are no variant's cost."""
    x = torch.randn(256, 256, device=device, dtype=model.dtype)
    (x @ x).sum().item()
    try:
        with torch.inference_mode():
            model(input_ids=torch.full((1, 16), 5, dtype=torch.long, device=device))
    except Exception:  # e.g. a paged attention implementation that needs a cache; the matmul did the essential part
        pass
    _sync(device)


def _digest(token_ids: list[list[int]]) -> Optional[str]:
    """A fingerprint of every request's new token ids in input order, so variants' outputs can be compared."""
    return hashlib.sha256(json.dumps(token_ids).encode()).hexdigest() if token_ids else None


def _compile_counts() -> dict[str, int]:
    """Triton variants of our attention kernels and torch.compile graphs compiled so far in this process."""
    from torch._dynamo.utils import counters

    try:
        from async_batching.triton_paged_attention import compiled_variants

        triton_variants = compiled_variants()
    except ImportError:  # no Triton (CPU)
        triton_variants = 0
    return {"triton_attention": triton_variants, "dynamo_graphs": int(counters["stats"]["unique_graphs"])}


def _allocator_counts(device: str) -> dict[str, int]:
    """The caching allocator's device-level events so far: cudaMalloc and cudaFree calls, and allocations that failed,
    freed every cached block (a device-wide synchronisation) and retried. A timed call that grows or trims the pool
    blocks its host where the step's launch should run ahead of the GPU."""
    if not device.startswith("cuda"):
        return {}
    s = torch.cuda.memory_stats()
    keys = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")
    return {k: int(s.get(k, 0)) for k in keys}


def _call_facts(stats: Optional[dict], out: RunOutput, alloc0: dict[str, int], device: str,
                busy: Optional[dict] = None) -> dict[str, Any]:
    """What tells one timed call from another of the same engine: its TTFT, the host time launching each step that is
    not a decode graph replay (prefill, mixed) beside its GPU time, the compute stream's busy share, and the
    allocator's device events inside it."""
    facts: dict[str, Any] = {"ttft_p50_s": percentile(out.ttft_s, 50)}
    for key in ("busy_pct", "other_gpu_ms", "before_decode_ms"):
        if (busy or {}).get(key) is not None:
            facts[key] = busy[key]
    if stats and "cpu_launch_graph_s" in stats:
        facts["other_launch_ms"] = _launch_ms(stats)["per_other_step"]
    if alloc0:
        facts["allocator"] = {k: v - alloc0[k] for k, v in _allocator_counts(device).items()}
    return facts


def _launch_ms(stats: dict) -> dict[str, Any]:
    """Host ms launching a decode step replayed from graphs vs any other step (prefill, mixed, eager), and their
    counts, from the engine's stats of one call."""
    graph, other = stats["graph_steps"], stats["steps"] - stats["graph_steps"]
    return {"graph_steps": graph, "per_graph_step": 1e3 * stats["cpu_launch_graph_s"] / graph if graph else None,
            "other_steps": other,
            "per_other_step": 1e3 * (stats["cpu_launch_s"] - stats["cpu_launch_graph_s"]) / other if other else None}


def _stats_delta(before: Optional[dict], after: Optional[dict], out: RunOutput) -> Optional[dict]:
    """The engine's stats for one call, whether its counters are cumulative or start afresh (a new engine per call)."""
    if not after:
        return after
    key, added = ("requests", len(out.new_tokens)) if "requests" in after else ("output_tokens", sum(out.new_tokens))
    if not before or after.get(key, 0) < before.get(key, 0) + added:
        return dict(after)
    return {k: (v - before.get(k, 0) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in after.items()}


def _compact(stats: Optional[dict]) -> Optional[dict]:
    """Stats for JSON: long per-step lists become their length and mean."""
    if not stats:
        return stats
    out = {}
    for k, v in stats.items():
        if isinstance(v, (list, tuple)) and len(v) > 16:
            nums = [x for x in v if isinstance(x, (int, float))]
            out[k] = {"len": len(v), "mean": statistics.fmean(nums) if nums else None}
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        else:
            out[k] = repr(v)
    return out


def _call(variant: Variant, reqs: Requests) -> RunOutput:
    """Submit ``reqs`` to the variant: score them, or generate with one shared budget or one budget per request.
    Every call starts with an empty prefix cache: a warm-up or an earlier call over the same prompts would otherwise
    serve the measured call's prompts (the measured sharing is the one inside the call)."""
    variant.forget_cached_prefixes()
    if reqs.scoring:
        return variant.score(reqs.prompts, reqs.continuations)
    budgets = reqs.new_tokens
    return variant.run(reqs.prompts, budgets[0] if len(set(budgets)) == 1 else list(budgets))


def _check(out: RunOutput, reqs: Requests) -> list[str]:
    """Problems with a call's output: errors, a missing result, a request that did not make exactly its tokens."""
    problems = list(out.errors[:3])
    if len(out.new_tokens) != len(reqs):
        problems.append(f"{len(out.new_tokens)} results for {len(reqs)} requests")
    expected = [len(c) for c in reqs.continuations] if reqs.scoring else reqs.new_tokens
    wrong = [i for i, (got, want) in enumerate(zip(out.new_tokens, expected)) if got != want]
    if wrong:
        what = "scored tokens" if reqs.scoring else "new tokens"
        problems.append(f"{len(wrong)} request(s) without exactly their {what} (first: request {wrong[0]}, "
                        f"{out.new_tokens[wrong[0]]} for {expected[wrong[0]]})")
    return problems


@contextmanager
def _forward_calls(model: torch.nn.Module, enabled: bool) -> Iterator[list[int]]:
    """Count the model's forward calls (one per step for ``generate`` and eager loops; graph replays are missed).

    Only for variants whose engine does not count its steps: a hook added to a compiled model would recompile it.
    """
    count = [0]
    handle = model.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1)) if enabled else None
    try:
        yield count
    finally:
        if handle is not None:
            handle.remove()


def _profile(variant: Variant, reqs: Requests, device: str, job: dict) -> dict[str, Any]:
    """A separate, shorter run under torch.profiler: GPU busy, GPU and host time per engine step, timeline window."""
    before = variant.stats()
    with _forward_calls(variant.model, enabled=not variant.counts_steps) as calls:
        out, trace = profiled_run(lambda: _call(variant, reqs), device)
    stats = _stats_delta(before, variant.stats(), out)
    engine_steps = (stats or {}).get("steps") or len(trace.host.get("ab.schedule", [])) or None
    steps = engine_steps or calls[0] or None
    wall_s = trace.wall_ns / 1e9
    has_gpu = bool(trace.kernels)
    result: dict[str, Any] = {
        "requests": len(reqs),
        "new_tokens": max(reqs.new_tokens, default=0),
        "wall_s": wall_s,
        "output_tokens": sum(out.new_tokens),
        "gpu_busy_pct": 100.0 * trace.gpu_busy_ns() / trace.wall_ns if has_gpu else None,
        # Steady state: the second half of the run (ramp-up, eager prefill steps and launch of the first
        # graphs excluded; the last 5% excluded too, where the batch drains).
        "gpu_busy_steady_pct": trace.busy_between(0.5, 0.95) if has_gpu else None,
        "kernels": len(trace.kernels),
        "steps": steps,
        "steps_from": "engine steps" if engine_steps else "model forward calls",
    }
    if steps:
        result["gpu_ms_per_step"] = trace.gpu_busy_ns() / 1e6 / steps if has_gpu else None
        result["host_ms_per_step"] = {name: trace.host_ns(name) / 1e6 / steps for name in sorted(trace.host)}
        # Where the GPU time of a step goes: the 10 costliest kernel families (summed durations; overlapping
        # kernels count twice), the rest as "other".
        ranked = sorted(trace.kernel_ns.items(), key=lambda kv: -kv[1])
        top = dict(ranked[:10])
        if len(ranked) > 10:
            top["other"] = sum(ns for _, ns in ranked[10:])
        result["kernel_ms_per_step"] = {name: round(ns / 1e6 / steps, 4) for name, ns in top.items()}
    if has_gpu:  # the same, over the steady second half only (decode steps, for ours: CUDA-graph replays)
        result["steady"] = trace.steady(0.5, 0.95)
        result["early"] = trace.steady(0.0, 0.25)  # the first quarter: prefill and mixed steps, for most workloads
    fig = job.get("figures") or {}
    window = trace.steady_window(float(fig.get("window_ms", 30)), float(fig.get("window_at", 0.7)))
    _write_json(job["timeline_path"], {"variant": job["variant"], **trace.window(window)})
    return result


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=repr)


@contextmanager
def gc_pauses() -> Iterator[dict[str, Any]]:
    """Python's cyclic garbage collections inside the block: how many per generation and the seconds they paused
    the engine's host thread (a full collection walks every tracked object: compiled code holds millions)."""
    out: dict[str, Any] = {"collections": [0, 0, 0], "pause_s": [0.0, 0.0, 0.0]}
    began: dict[str, float] = {}

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            began["t"] = time.perf_counter()
        elif "t" in began:
            gen = int(info.get("generation", 0))
            out["collections"][gen] += 1
            out["pause_s"][gen] += time.perf_counter() - began.pop("t")

    gc.callbacks.append(callback)
    try:
        yield out
    finally:
        gc.callbacks.remove(callback)


def _timed_call(variant: Variant, reqs: Requests, device: str) -> tuple[float, RunOutput]:
    """Wall seconds of one call, its setup spans (a per-call engine build, hf_cb's warm-up) excluded."""
    setup0 = variant.setup_s
    _sync(device)
    t0 = time.perf_counter()
    out = _call(variant, reqs)
    _sync(device)
    return time.perf_counter() - t0 - (variant.setup_s - setup0), out


def _first_call(variant: Variant, reqs: Requests, device: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Time the first call after start-up, then the very same call again (issue 14: within 5%)."""
    n = min(int(cfg.get("requests") or len(reqs)), len(reqs))
    sub = reqs.head(n)
    first_s, out = _timed_call(variant, sub, device)
    repeat_s, again = _timed_call(variant, sub, device)
    return {
        "requests": n,
        "first_s": first_s,
        "repeat_s": repeat_s,
        "first_over_repeat": first_s / repeat_s if repeat_s > 0 else None,
        "problems": _check(out, sub) + _check(again, sub),
    }


def run_job(job: dict[str, Any], checkpoint=lambda partial: None) -> dict[str, Any]:
    """Build, warm up, time, then profile one variant; ``checkpoint`` saves the timed result before profiling."""
    name, device = job["variant"], job["device"]
    workload = Workload.from_dict(job["workload"])
    cls = VARIANTS[name]
    reqs = workload.build().head(workload.cap_for(name))

    t = time.perf_counter()
    attn, attn_error = cls.attn_implementation(), None
    try:
        model = workload.build_model(device, attn)
    except Exception as e:  # e.g. an attention name this transformers version does not know: use its default
        if attn is None:
            raise
        attn_error = f"attn_implementation={attn!r} failed ({type(e).__name__}: {e}); built with the default"
        model = workload.build_model(device, None)
    _warm_process(model, device)
    model_build_s = time.perf_counter() - t
    t = time.perf_counter()
    variant = cls(model, job)  # ours: KV cache allocation, warm-up (compile) and CUDA-graph capture happen here
    variant_init_s = time.perf_counter() - t

    first = job.get("first_call") or {}
    first_call = None
    if first.get("enabled") and name in (first.get("variants") or []):
        first_call = _first_call(variant, reqs, device, first)

    warm = job.get("warmup") or {}
    if warm.get("requests") and not cls.warms_up_itself:
        _call(variant, reqs.head(int(warm["requests"])).with_new_tokens(int(warm.get("new_tokens", 8))))
        _sync(device)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sampler = open_sampler(device)
    before, setup0 = variant.stats(), variant.setup_s
    if sampler:
        sampler.start()
    compiles0, alloc0 = _compile_counts(), _allocator_counts(device)
    t0 = time.perf_counter()
    with gc_pauses() as pauses:
        out = _call(variant, reqs)
        _sync(device)
    elapsed = time.perf_counter() - t0
    compiles = {k: v - compiles0[k] for k, v in _compile_counts().items()}
    util = None
    if sampler:  # the driver's samples after the variant's own setup (hf_cb's warm-up, a per-call engine build)
        util = sampler.stop(not_before_epoch_s=variant.setup_end_epoch_s)
        sampler.close()
    setup_s = variant.setup_s - setup0
    wall = elapsed - setup_s
    prompt_tokens = sum(reqs.total_lens())
    stats = _stats_delta(before, variant.stats(), out)
    done_tokens = sum(out.new_tokens)
    output_tokens = 0 if reqs.scoring else done_tokens

    result: dict[str, Any] = {
        "requests": len(reqs),
        "requests_total": workload.requests,
        "new_tokens": workload.new_tokens,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "wall_s": wall,
        "setup_s": setup_s,
        "model_build_s": model_build_s,
        "variant_init_s": variant_init_s,
        # engine build, compile, capture: the variant's construction plus setup inside the timed call (hf_cb's
        # manager and warm-up, the Lightning callback's per-call engine); the model's random init is not part of it
        "startup_s": variant_init_s + setup_s,
        "startup_parts": getattr(variant, "startup_parts", None),
        "output_tok_s": None if reqs.scoring else output_tokens / wall,
        "total_tok_s": (output_tokens + prompt_tokens) / wall,
        "ttft_p50_s": percentile(out.ttft_s, 50),
        "ttft_p99_s": percentile(out.ttft_s, 99),
        "output_sha256": _digest(out.token_ids),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
        "nvml_util_pct": util,
        "problems": _check(out, reqs),
        # kernels compiled inside the timed call (should be 0: everything is compiled at start-up)
        "compiled_during_run": compiles,
        "gc": pauses,  # the interpreter's cyclic garbage collections inside the timed call
        "attn_fallback": attn_error,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "stats": _compact(stats),
        "config": variant.info(),
    }
    if reqs.scoring:  # S1: continuation tokens scored, and the prompt tokens (context + continuation) read
        result.update(scored_tokens=done_tokens, scored_tok_s=done_tokens / wall, prompt_tok_s=prompt_tokens / wall)
    if first_call is not None:
        result["first_call"] = first_call
    repeats = int(job.get("repeats") or 1)
    events = variant.gpu_busy()  # the first call's (each call times its own steps)
    facts = [_call_facts(stats, out, alloc0, device, events)]
    if repeats > 1:  # the same call again, to tell a lever from run-to-run noise; the headline stays the first call
        walls, cached = [wall], [(stats or {}).get("cached_tokens", 0)]
        for _ in range(repeats - 1):
            s0, a0 = variant.stats(), _allocator_counts(device)
            again_s, again = _timed_call(variant, reqs, device)
            walls.append(again_s)
            delta = _stats_delta(s0, variant.stats(), again)
            cached.append((delta or {}).get("cached_tokens", 0))
            facts.append(_call_facts(delta, again, a0, device, variant.gpu_busy()))
            result["problems"] += _check(again, reqs)
        result["repeat_wall_s"], result["repeat_cached_tokens"] = walls, cached
        if not reqs.scoring:
            result["repeat_out_tok_s"] = [output_tokens / w for w in walls]
    result["call_facts"] = facts  # one per timed call, in order
    if events:  # the compute stream's occupancy in the timed run, from the engine's CUDA timing events
        result["gpu_busy_events_pct"] = events.get("busy_pct")
        result["gpu_busy_decode_pct"] = events.get("decode_busy_pct")
    if stats and stats.get("steps"):
        result["steps"] = stats["steps"]
        busy = {k: v for k, v in stats.items()
                if k.startswith("cpu_") and k.endswith("_s") and k not in ("cpu_wait_s", "cpu_launch_graph_s")}
        if busy:  # host time working on steps (schedule, prepare, launch, process), not waiting for the GPU
            result["cpu_ms_per_step"] = 1e3 * sum(busy.values()) / stats["steps"]
            result["cpu_ms_per_step_parts"] = {k[4:-2]: 1e3 * v / stats["steps"] for k, v in busy.items()}
        if "cpu_launch_graph_s" in stats:  # launching a decode graph step vs any other step (prefill, mixed, eager)
            result["launch_ms"] = _launch_ms(stats)

    prof = job.get("profile") or {}
    if prof.get("enabled", True) and name not in (prof.get("skip") or []):
        checkpoint({**result, "profile": {"error": "the process died or timed out while profiling"}})
        n = min(int(workload.profile.get("requests", len(reqs))), len(reqs))
        m = int(workload.profile.get("new_tokens", workload.max_new_tokens))
        try:
            result["profile"] = _profile(variant, reqs.head(n).with_new_tokens(m), device, job)
            result["gpu_busy_pct"] = result["profile"]["gpu_busy_pct"]
            result["gpu_busy_steady_pct"] = result["profile"].get("gpu_busy_steady_pct")
            result["gpu_ms_per_step"] = result["profile"].get("gpu_ms_per_step")
        except Exception as e:  # a failed profile must not lose the timed run
            result["profile"] = {"error": f"{type(e).__name__}: {e}"}
    variant.close()
    return result


def environment(device: str) -> dict[str, Any]:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import lightning

        env["lightning"] = lightning.__version__
    except ImportError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["gpu_mem_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        env["device"] = platform.processor() or "cpu"
    return env


def main(argv: list[str]) -> int:
    if argv[0] == "--probe":
        device = argv[2] if len(argv) > 2 else "cuda"
        try:
            rates = asdict(measure_rates(device))
        except Exception as e:
            rates = {"error": f"{type(e).__name__}: {e}"}
        _write_json(argv[1], {"rates": rates, "env": environment(device)})
        return 0
    with open(argv[0]) as f:
        job = json.load(f)
    head: dict[str, Any] = {"variant": job["variant"], "status": "ok", "env": environment(job["device"])}

    def finish(result: dict[str, Any]) -> None:
        if result.get("problems") and result["status"] == "ok":
            result["status"] = "wrong output"
        _write_json(argv[1], result)

    try:
        result = {**head, **run_job(job, checkpoint=lambda partial: finish({**head, **partial}))}
    except Exception as e:
        result = {**head, "status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        print(result["traceback"], file=sys.stderr)
    finish(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
