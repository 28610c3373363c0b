"""The benchmark's one table (markdown) and the notes that say how each number was obtained."""

from __future__ import annotations

from typing import Any, Optional

COLUMNS = [
    ("variant", "variant", None),
    ("requests", "requests", "{:d}"),
    ("output_tokens", "out tok", "{:d}"),
    ("output_tok_s", "out tok/s", "{:,.0f}"),
    ("total_tok_s", "total tok/s", "{:,.0f}"),
    ("wall_s", "wall s", "{:.2f}"),
    ("gpu_busy_pct", "GPU busy % (prof)", "{:.1f}"),
    ("gpu_busy_steady_pct", "GPU busy % steady", "{:.1f}"),
    ("gpu_busy_events_pct", "GPU busy % (events)", "{:.1f}"),
    ("gpu_busy_decode_pct", "decode busy % (events)", "{:.1f}"),
    ("nvml_util_pct", "GPU util % (NVML)", "{:.0f}"),
    ("ttft_p50_s", "TTFT p50 s", "{:.3f}"),
    ("ttft_p99_s", "TTFT p99 s", "{:.3f}"),
    ("peak_mem_gib", "peak mem GiB", "{:.1f}"),
    ("roofline_pct", "% roofline", "{:.1f}"),
    ("wall_over_limit", "wall/limit", "{:.1f}x"),
    ("cpu_ms_per_step", "CPU ms/step", "{:.2f}"),
    ("gpu_ms_per_step", "GPU ms/step", "{:.2f}"),
    ("status", "status", None),
]


def _cell(value: Any, fmt: Optional[str]) -> str:
    if value is None:
        return "-"
    if fmt is None:
        return str(value).replace("|", "/").replace("\n", " ")
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def status_text(r: dict[str, Any]) -> str:
    if r.get("status") == "ok":
        return "ok"
    detail = r.get("error") or "; ".join(r.get("problems") or [])
    return f"{r.get('status')}: {detail[:120]}"


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        shown = dict(r, status=status_text(r))
        rows.append("| " + " | ".join(_cell(shown.get(k), f) for k, _, f in COLUMNS) + " |")
    return "\n".join(rows)


def notes(summary: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    """How each number was obtained, and what ran differently from the workload as specified."""
    wl, rates, limit = summary["workload"], summary["rates"], summary["roofline"]
    env = summary.get("env") or {}
    out = [
        f"Workload {wl['name']}: {wl['requests']} requests, prompts uniform {wl['prompt_len'][0]}..{wl['prompt_len'][1]} "
        f"tokens (random ids, seed {wl.get('seed', 0)}), {wl['new_tokens']} new tokens each, EOS ignored, "
        f"{wl['dtype']} random-init {wl['model'].get('model_type')} ({summary['model']['params'] / 1e6:,.1f}M params).",
        f"Device: {env.get('device', '?')}; torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}, "
        f"lightning {env.get('lightning', '?')}.",
        f"Roofline ({rates['source']}: {rates['matmul_tflops']:.0f} TFLOP/s bf16 matmul, {rates['copy_tbps']:.2f} TB/s copy, "
        f"decode in waves of max_num_seqs={summary['roofline_max_num_seqs']}): full workload "
        f"{limit['prefill_s']:.3f} s prefill + {limit['decode_s']:.3f} s decode = {limit['total_s']:.3f} s, "
        f"ceiling {limit['output_tokens_per_s']:,.0f} output tok/s. '% roofline' = limit time / wall time for the "
        "requests that variant ran; 'wall/limit' is its inverse.",
        "wall s: the timed call only, after an untimed warm-up call on the same engine (hf_cb: its own manager "
        "creation and CUDA-graph warm-up are timed separately and subtracted, see setup_s in the JSON). "
        "tok/s = tokens / wall s; total counts prompt + output tokens.",
        "GPU busy % (prof): union of CUDA kernel intervals / wall time of a separate, shorter profiled run on the same "
        "warm engine (first R requests x T new tokens, per variant below; torch.profiler slows the host side, so this "
        "understates busy for host-bound variants). GPU util % (NVML): the driver's own utilisation samples "
        "(share of each ~1/6 s period with a kernel running) averaged over the full timed run, undisturbed. "
        "GPU busy % steady: the profiled run's second half (to 95%). GPU busy % (events), ours only: the timed run's "
        "per-step CUDA timing events on the compute stream, sum of step durations / elapsed time (no profiler); "
        "decode busy % (events): the same over the longest run of consecutive CUDA-graph decode steps (steady state).",
        "TTFT: from the start of the call to each request's first new token on the host (static: the batch's first "
        "decode step, via a streamer; ours_async_lightning: from when the loop submits the request). peak mem: torch.cuda.max_memory_allocated over the timed run (KV caches included).",
        "CPU ms/step (ours): host time working on a step, i.e. the engine's cpu_*_s counters except waiting "
        "(schedule + prepare + launch + process) / steps, timed run; GPU ms/step: union of kernel time per engine step "
        "in the profiled run. Async can only hide the CPU time if CPU ms/step <= GPU ms/step.",
    ]
    for r in results:
        prof = r.get("profile") or {}
        bits = []
        if r.get("from_previous_run"):
            bits.append("kept from an earlier invocation into the same out_dir (keep_previous=true)")
        if r.get("requests") is not None and r.get("requests") != wl["requests"]:
            bits.append(f"ran {r['requests']} of {wl['requests']} requests (capped: slow baseline)")
        if prof.get("requests") is not None:
            bits.append(f"profiled {prof['requests']} requests x {prof['new_tokens']} new tokens")
        elif r.get("status") == "ok" and not prof:
            bits.append("not profiled (profile.skip / profile.enabled)")
        if prof.get("error"):
            bits.append(f"profile failed: {prof['error']}")
        if r.get("attn_fallback"):
            bits.append(r["attn_fallback"])
        if r.get("setup_s"):
            bits.append(f"setup excluded {r['setup_s']:.2f} s")
        if r.get("variant", "").startswith("ours") and r.get("variant_init_s"):
            bits.append(f"engine built (KV cache, CUDA graphs) in {r['variant_init_s']:.1f} s, untimed")
        if r.get("variant", "").startswith("hf_cb") and r.get("config"):
            cfg = r["config"]
            cb = cfg.get("continuous_batching_config") or {}
            keys = ("num_blocks", "page_size", "max_batch_tokens", "max_requests_per_batch", "use_async_batching", "use_cuda_graph")
            bits.append(
                f"attn {cfg.get('attn_implementation_in_use', cfg.get('attn_implementation_requested'))}, "
                + ", ".join(f"{k}={cb[k]}" for k in keys if k in cb)
            )
        if bits:
            out.append(f"{r['variant']}: " + "; ".join(bits) + ".")
    by_name = {r["variant"]: r for r in results if r.get("status") == "ok"}
    if "ours_async" in by_name and "ours_async_lightning" in by_name:
        a, b = by_name["ours_async"]["wall_s"], by_name["ours_async_lightning"]["wall_s"]
        out.append(f"Lightning overhead (ours_async_lightning vs ours_async wall): {100 * (b / a - 1):+.1f}% (target < 3%).")
    return out
