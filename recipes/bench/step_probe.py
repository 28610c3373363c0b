"""Where one engine step's time goes, on the GPU: a full prefill step and a decode graph replay of a workload.

1. Prefill: the workload's first prompts that fill one step's token budget, one new token each (so the run is that
   one step), through the engine as it runs them (compiled prefill where the engine compiles it) and uncompiled.
   Wall ms of the call, host ms of the step's forward (``ab.launch.forward``), GPU kernel time (union) and the GPU
   span from its first kernel to its last, kernels launched, and GPU ms by kernel (full names, top N). The matrix
   products' and the attention kernel's rates: the step's FLOPs of each (the roofline's counting, ``prefill_flops``:
   the LM head on one row a prompt) over their GPU ms, against the measured matmul rate.
   Then the host's side of that step by function: one more call under cProfile, the functions with the most own
   time, and the cumulative time of the stack's layers (``HOST_LAYERS``: plan, staging, the forward, dynamo's entry
   to a compiled layer, inductor's code, the attention op and its launch wrappers, Triton's and inductor's kernel
   launches, sampling).
2. Decode: the largest decode graph replayed back to back. GPU ms per replay from CUDA events (kernels plus the gaps
   between them) beside the union of its kernels from the profiler, kernels per replay, GPU ms by kernel.

    python recipes/bench/step_probe.py --workload conf/workload/w1.yaml [--batcher '{"max_batch_tokens": 131072}']
        [--decode-sizes 8,32,128,256] [--no-prefill] [--variant ours_async_decode_2warps]

``--variant``: one of the benchmark's ``ours_async_*`` variants that replace module settings while the engine is built
(``variants._OursAsyncBuiltWith.patches``); the engine's defaults without it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _by_name(trace, top: int) -> list[tuple[str, float, int]]:
    """(kernel name, GPU ms, launches) of a trace's kernels, largest first."""
    ms: dict[str, float] = {}
    count: dict[str, int] = {}
    for (s, e), name in zip(trace.kernels, trace.names):
        ms[name] = ms.get(name, 0.0) + (e - s) / 1e6
        count[name] = count.get(name, 0) + 1
    rows = sorted(((n, ms[n], count[n]) for n in ms), key=lambda r: -r[1])
    return rows[:top]


def _table(rows, per: float, top_note: str) -> str:
    lines = [f"| kernel ({top_note}) | GPU ms | launches |", "|---|---|---|"]
    for name, ms, n in rows:
        lines.append(f"| `{name[:110]}` | {ms / per:.3f} | {n / per:.0f} |")
    return "\n".join(lines)


# The host stack of a step by layer, as (label, path fragment, function names): cumulative time of each (nested layers
# overlap: dynamo's entry includes inductor's code, which includes the attention op, which includes Triton's launch).
HOST_LAYERS = (
    ("plan (Scheduler.schedule)", "async_batching/scheduler.py", ("schedule",)),
    ("staging (ModelRunner.prepare)", "async_batching/model_runner.py", ("prepare",)),
    ("forward (ModelRunner.forward)", "async_batching/model_runner.py", ("forward",)),
    ("dynamo: entry to compiled code", "torch/_dynamo/eval_frame.py", ("compile_wrapper", "_fn")),
    ("inductor: the compiled graphs' code", "torch/_inductor/output_code.py", ("__call__",)),
    ("attention op (our custom op)", "async_batching/attention.py", ("_paged_attention_op",)),
    ("attention launch wrapper (paged_attention)", "async_batching/triton_paged_attention.py", ("paged_attention",)),
    ("KV write launch wrapper (write_kv)", "async_batching/triton_paged_attention.py", ("write_kv",)),
    ("Triton JIT launches (our kernels)", "triton/runtime/jit.py", ("run",)),
    ("inductor kernel launches", "torch/_inductor/runtime/triton_heuristics.py", ("run",)),
    ("sampling", "async_batching/sampling.py", ("sample",)),
)


def host_profile(call, top: int = 15) -> dict:
    """One call of ``call`` under cProfile: total host ms, the ``top`` functions by own time and ``HOST_LAYERS``'
    cumulative ms and calls. cProfile slows Python-heavy code more than C calls, so shares are indicative."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    try:
        call()
        _sync()
    finally:
        prof.disable()
    total = 1e3 * (time.perf_counter() - t0)
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)

    def label(key):
        path, line, name = key
        return name if path == "~" else f"{'/'.join(path.split('/')[-2:])}:{line}({name})"

    own = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    layers = []
    for what, fragment, names in HOST_LAYERS:
        hits = [v for (path, _, name), v in stats.items() if fragment in path.replace("\\", "/") and name in names]
        if hits:  # the outermost of a layer's functions: the largest cumulative time
            best = max(hits, key=lambda v: v[3])
            layers.append((what, 1e3 * best[3], best[0]))
    return {"total_ms": total, "own": [(label(k), 1e3 * v[2], 1e3 * v[3], v[1]) for k, v in own],
            "layers": layers}


def _host_tables(rec: dict) -> str:
    lines = [f"Host side of one call under cProfile: {rec['total_ms']:.1f} ms (cProfile inflates Python-heavy parts)",
             "", "| layer of the host stack | cumulative ms | calls |", "|---|---|---|"]
    lines += [f"| {what} | {ms:.2f} | {n} |" for what, ms, n in rec["layers"]]
    lines += ["", "| function (most own time) | own ms | cumulative ms | calls |", "|---|---|---|---|"]
    lines += [f"| `{name[:100]}` | {own:.2f} | {cum:.2f} | {n} |" for name, own, cum, n in rec["own"]]
    return "\n".join(lines)


def _rates(prompts: list[list[int]], by_family: dict, shape, matmul_tflops: float) -> dict:
    """TFLOP/s of the step's matrix products and of its attention kernel, from their FLOPs and GPU ms."""
    from bench.roofline import prefill_flops

    total, attention = prefill_flops(shape, [len(p) for p in prompts], logits_rows=len(prompts))
    out = {}
    for what, flops, family in (("matrix products", total - attention, "matmul (cuBLAS)"),
                                ("attention kernel", attention, "_paged_attention_kernel")):
        ms = by_family.get(family, 0.0)
        if ms > 0:
            tflops = flops / (ms * 1e-3) / 1e12
            out[what] = {"tflop": flops / 1e12, "ms": ms, "tflops": tflops, "share": tflops / matmul_tflops}
    return out


def prefill(b, prompts: list[list[int]], label: str, top: int, out: dict, shape=None,
            matmul_tflops: float = 0.0) -> None:
    from async_batching import SamplingParams

    from bench.profiling import profiled_run

    sp = SamplingParams(max_new_tokens=1, ignore_eos=True)

    def call():  # the prompts computed anew each time: no prefix-cache hits
        b.reset_prefix_cache()
        return b.generate(prompts, sp)

    call()  # warm: allocator, kernels
    _sync()
    walls = []
    for _ in range(3):
        t0 = time.perf_counter()
        call()
        _sync()
        walls.append(1e3 * (time.perf_counter() - t0))
    _, tr = profiled_run(call, str(b.device))
    busy = tr.gpu_busy_ns() / 1e6
    span = (max(e for _, e in tr.kernels) - min(s for s, _ in tr.kernels)) / 1e6 if tr.kernels else 0.0
    fwd = tr.host_ns("ab.launch.forward") / 1e6
    tokens = sum(map(len, prompts))
    rec = {"tokens": tokens, "requests": len(prompts), "wall_ms": min(walls), "walls_ms": walls,
           "profiled_wall_ms": tr.wall_ns / 1e6, "host_forward_ms": fwd, "gpu_busy_ms": busy, "gpu_span_ms": span,
           "kernels": len(tr.kernels), "by_family": {k: v / 1e6 for k, v in sorted(tr.kernel_ns.items(), key=lambda kv: -kv[1])},
           "by_name": _by_name(tr, top)}
    out.setdefault("prefill", {})[label] = rec
    rec["rates"] = _rates(prompts, rec["by_family"], shape, matmul_tflops) if shape is not None else {}
    rec["host_profile"] = host_profile(call)
    rec["compiled_prefill_after"] = b.runner._compiled_prefill  # False: a compiled step fell back (see the log)
    print(f"\n### Prefill step, {label}: {len(prompts)} prompts, {tokens} tokens "
          f"(compiled prefill after the runs: {b.runner._compiled_prefill})\n")
    print(f"wall {rec['wall_ms']:.1f} ms (best of 3: {', '.join(f'{w:.1f}' for w in walls)}); profiled run: "
          f"host forward {fwd:.1f} ms, GPU kernels {busy:.1f} ms busy over a {span:.1f} ms span, {len(tr.kernels)} "
          f"kernels\n")
    print("GPU ms by family: " + ", ".join(f"{k} {v:.2f}" for k, v in list(rec["by_family"].items())[:12]) + "\n")
    if rec["rates"]:
        print("Rates: " + "; ".join(f"{what} {r['tflop']:.2f} TFLOP in {r['ms']:.2f} ms = {r['tflops']:.0f} TFLOP/s, "
                                    f"{100 * r['share']:.0f}% of the matmul rate ({matmul_tflops:.0f})"
                                    for what, r in rec["rates"].items()) + "\n")
    print(_table(rec["by_name"], 1.0, f"top {top}"))
    print("\n" + _host_tables(rec["host_profile"]))


def mid_decode(b, prompts: list[list[int]], forwards: int = 2, new_tokens: int = 64) -> list[int]:
    """Submit ``prompts`` and step the engine until each has drawn ``forwards`` tokens after its first (decode
    forwards of all of them), leaving them running: their KV blocks and block-table rows stay live, as in a run, so a
    replay of the last decode graph reads their contexts. The caller measures, then aborts them; returns their ids."""
    from async_batching import SamplingParams

    sp = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    ids = [b.add_request(p, sp) for p in prompts]
    while min(len(b.requests[i][0].output_ids) for i in ids) < 1 + forwards:
        if b.step():
            raise RuntimeError("a request finished before the probe's decode forwards ran")
    _sync()  # nothing of the engine in flight while the caller replays
    return ids


def decode(b, prompts: list[list[int]], top: int, out: dict, reps: int = 50, sequence: tuple = ()) -> None:
    """Replay the decode graph that the latest decode step of ``prompts`` used, while they are still running (see
    ``mid_decode``): its inputs hold their block tables and contexts (their prompts' lengths plus a few tokens).
    Replaying after they finished read freed rows of the block table, so the K/V reads came from one cached block
    (session 11: W1's 512 rows read "6 TB/s")."""
    from bench.profiling import profiled_run
    from bench.roofline import time_ms

    runner = b.runner
    batch = runner._graph_batch(len(prompts))
    if not batch:
        print(f"\n(no decode graph for {len(prompts)} sequences)")
        return
    ids = mid_decode(b, prompts)
    graph = runner.graphs[batch][0]
    event_ms = time_ms(graph.replay, reps, warmup=5)

    def replays():
        for _ in range(reps):
            graph.replay()

    _, tr = profiled_run(replays, "cuda")
    busy = tr.gpu_busy_ns() / 1e6 / reps
    n = len(tr.kernels) / reps
    gaps = max(event_ms - busy, 0.0)
    rec = {"sequences": len(prompts), "batch": batch, "event_ms": event_ms, "busy_ms": busy, "kernels": n,
           "gap_us_per_kernel": 1e3 * gaps / max(n, 1),
           "by_family": {k: v / 1e6 / reps for k, v in sorted(tr.kernel_ns.items(), key=lambda kv: -kv[1])},
           "by_name": _by_name(tr, top)}
    out.setdefault("decode", []).append(rec)
    b.abort(ids)
    b.reset_prefix_cache()
    print(f"\n### Decode graph of {batch} rows: {len(prompts)} running sequences, contexts of their prompts' lengths "
          "plus a few tokens\n")
    print(f"{event_ms:.3f} ms a replay by CUDA events; kernels busy {busy:.3f} ms; {n:.0f} kernels; "
          f"{rec['gap_us_per_kernel']:.2f} us between kernels on average\n")
    print("GPU ms by family: " + ", ".join(f"{k} {v:.3f}" for k, v in list(rec["by_family"].items())[:12]) + "\n")
    print(_table(rec["by_name"], reps, f"top {top}, per replay"))
    if sequence:  # (head, tail): one replay's first and last kernels in order
        print("\nOne replay's kernels in order (its first and last ones):\n")
        print(_sequence(tr, reps, *sequence))


def _sequence(trace, reps: int, head: int, tail: int) -> str:
    """One replay's kernels in launch order (the middle replay): its first ``head`` and last ``tail`` kernels, each
    with its GPU us and the idle us since the previous kernel ended: which small kernels a layer runs, and the gaps."""
    order = sorted(range(len(trace.kernels)), key=lambda i: trace.kernels[i][0])
    n = len(order) // max(reps, 1)
    if n == 0:
        return "(no kernels)"
    mid = order[(reps // 2) * n:(reps // 2 + 1) * n]
    lines = ["| # | kernel | us | idle us before |", "|---|---|---|---|"]
    prev_end = None
    for k, i in enumerate(mid):
        s, e = trace.kernels[i]
        if k < head or k >= len(mid) - tail:
            idle = "" if prev_end is None else f"{(s - prev_end) / 1e3:.2f}"
            lines.append(f"| {k} | `{trace.names[i][:90]}` | {(e - s) / 1e3:.2f} | {idle} |")
        elif k == head:
            lines.append("| ... | | | |")
        prev_end = e
    return "\n".join(lines)


def runner_batch(b) -> int:
    return max(b.runner.graphs, default=b.config.max_num_seqs)


def main() -> None:
    import yaml

    from async_batching import ContinuousBatcher
    from bench.roofline import measure_rates
    from bench.workloads import ModelShape, Workload

    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", required=True)
    ap.add_argument("--batcher", default="{}", help="BatcherConfig overrides as JSON")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--decode-sizes", default="", help="comma-separated sequence counts of the decode replays "
                    "(default: the workload's requests, up to the largest graph)")
    ap.add_argument("--no-prefill", action="store_true", help="decode replays only")
    ap.add_argument("--variant", default=None,
                    help="a benchmark variant whose module settings the engine is built with (variants.py's "
                         "_OursAsyncBuiltWith patches, e.g. ours_async_decode_2warps); default: the engine's own")
    ap.add_argument("--sequence", default="", help="HEAD,TAIL: list one decode replay's first HEAD and last TAIL "
                    "kernels in launch order, with their times and the idle time between them")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import contextlib

    import async_batching.compiled_layers as compiled_layers
    from bench.variants import VARIANTS, _OursAsyncBuiltWith

    settings = contextlib.nullcontext()
    if args.variant is not None:  # in place while the engine is built, which reads them, as in a benchmark run
        cls = VARIANTS.get(args.variant)
        if cls is None or not issubclass(cls, _OursAsyncBuiltWith):
            names = sorted(n for n, c in VARIANTS.items() if issubclass(c, _OursAsyncBuiltWith))
            raise SystemExit(f"--variant {args.variant!r}: not a variant of module settings; one of {names}")
        settings = cls.settings()
    wl = Workload.from_dict(yaml.safe_load(open(args.workload)))
    model = wl.build_model("cuda" if torch.cuda.is_available() else "cpu")
    rates = measure_rates("cuda" if torch.cuda.is_available() else "cpu")  # before the KV cache takes the memory
    t0 = time.perf_counter()
    with settings:
        b = ContinuousBatcher(model, **json.loads(args.batcher))
        compile_options = dict(compiled_layers.COMPILE_OPTIONS)  # what this engine compiled with
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    out: dict = {"workload": wl.name, "device": device, "torch": torch.__version__,
                 "build_s": time.perf_counter() - t0, "config": {k: v for k, v in vars(b.config).items()}}
    budget = b.config.max_batch_tokens
    runner = b.runner
    shape = ModelShape.of(wl)
    out["rates"] = {"matmul_tflops": rates.matmul_tflops, "copy_tbps": rates.copy_tbps}
    out["variant"] = args.variant
    print(f"## {wl.name}{f' ({args.variant})' if args.variant else ''} on {out['device']} (torch {out['torch']}): "
          f"max_batch_tokens {budget}, "
          f"prefill compiled from {runner.prefill_compile_min_tokens} tokens "
          f"({'on' if runner._compiled_prefill else 'off'}"
          f"{', in graphs of their own' if runner._compiled_pf is not None else ''}), "
          f"compile options {compile_options or 'none'}")
    threshold, compiled = runner.prefill_compile_min_tokens, runner._compiled_prefill
    for size in () if args.no_prefill else (budget, budget // 8):  # a full step and a small one
        prompts, total = [], 0
        for p in wl.prompts():
            if total + len(p) > size:
                break
            prompts.append(p)
            total += len(p)
        prefill(b, prompts, f"{size} budget, as the engine runs it", args.top, out, shape, rates.matmul_tflops)
        if runner._compiled is not None:  # both ways: compiled (whatever the threshold) and uncompiled
            for on in (True, False):
                runner._compiled_prefill, runner.prefill_compile_min_tokens = on, 1
                prefill(b, prompts, f"{size} budget, {'compiled' if on else 'uncompiled'}", args.top, out, shape,
                        rates.matmul_tflops)
            runner._compiled_prefill, runner.prefill_compile_min_tokens = compiled, threshold
    sizes = [int(x) for x in args.decode_sizes.split(",")] if args.decode_sizes else [wl.requests]
    for n in sizes:  # the decode step's fixed cost and its share of attention, by batch size
        decode(b, wl.prompts()[:min(n, runner_batch(b))], args.top, out,
               sequence=tuple(int(x) for x in args.sequence.split(",")) if args.sequence else ())
    b.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
