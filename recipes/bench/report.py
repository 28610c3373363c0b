"""The benchmark's one table (markdown) and the notes that say how each number was obtained."""

from __future__ import annotations

import statistics
from typing import Any, Optional

COLUMNS = [
    ("variant", "variant", None),
    ("requests", "requests", "{:d}"),
    ("output_tokens", "out tok", "{:d}"),
    ("output_tok_s", "out tok/s", "{:,.0f}"),
    ("scored_tok_s", "scored tok/s", "{:,.0f}"),
    ("total_tok_s", "total tok/s", "{:,.0f}"),
    ("wall_s", "wall s", "{:.2f}"),
    ("startup_s", "start-up s", "{:.1f}"),
    ("first_over_repeat", "first/repeat call", "{:.3f}"),
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
    ("matmul_pct", "% matrix rate", "{:.1f}"),
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


def _shown(r: dict[str, Any]) -> dict[str, Any]:
    first = r.get("first_call") or {}
    return dict(r, status=status_text(r), first_over_repeat=first.get("first_over_repeat"))


def table(results: list[dict[str, Any]]) -> str:
    """One row per variant; a column no variant has a value for (e.g. scored tok/s on a generation workload) is left out."""
    shown = [_shown(r) for r in results]
    columns = [c for c in COLUMNS if c[0] in ("variant", "status") or any(r.get(c[0]) is not None for r in shown)]
    rows = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in shown:
        rows.append("| " + " | ".join(_cell(r.get(k), f) for k, _, f in columns) + " |")
    return "\n".join(rows)


def _fmt_range(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"uniform {value[0]}..{value[1]}"
    return str(value)


def workload_text(wl: dict[str, Any], model: dict[str, Any], drawn: dict[str, Any]) -> str:
    """What the requests are, in BENCHMARKS.md's terms, with the totals actually drawn."""
    gen = wl.get("generator", "uniform")
    n, seed = wl["requests"], wl.get("seed", 0)
    if gen == "score_pairs":
        what = (f"{n} (context, continuation) pairs: contexts {_fmt_range(wl['prompt_len'])} tokens, continuations "
                f"{_fmt_range(wl['continuation_len'])} tokens, scored through ContinuousBatcher.score")
    elif gen == "shared_prefix":
        pre = wl["prefix"]
        what = (f"{n} requests in {pre['groups']} groups of consecutive requests; each group shares a {pre['len']}-token "
                f"prefix, then {_fmt_range(wl['prompt_len'])} unique tokens; {_fmt_range(wl['new_tokens'])} new tokens")
    elif gen == "nano_vllm":
        what = (f"{n} requests drawn as nano-vllm's bench.py (random.seed({seed}); prompts of randint"
                f"({wl['prompt_len'][0]}, {wl['prompt_len'][1]}) ids randint({wl['token_ids'][0]}, {wl['token_ids'][1]}), "
                f"then max_tokens randint({wl['new_tokens'][0]}, {wl['new_tokens'][1]}))")
    else:
        what = f"{n} requests, prompts {_fmt_range(wl['prompt_len'])} tokens, {_fmt_range(wl['new_tokens'])} new tokens each"
    sampling = wl.get("sampling") or {}
    how = ("sampled with " + ", ".join(f"{k}={v}" for k, v in sampling.items())) if sampling else "greedy"
    totals = f"{drawn.get('prompt_tokens', 0):,} prompt tokens, {drawn.get('output_tokens', 0):,} output tokens"
    if drawn.get("cached_prefix_tokens"):
        totals += f", {drawn['cached_prefix_tokens']:,} of the prompt tokens a prefix cache can serve"
    if drawn.get("continuation_tokens"):
        totals += f", {drawn['continuation_tokens']:,} continuation tokens scored"
    return (f"Workload {wl['name']}: {what}; random ids (seed {seed}), EOS ignored, {how}; {totals}; "
            f"{wl['dtype']} random-init {wl['model'].get('model_type')} ({model['params'] / 1e6:,.1f}M params"
            + (f", {model['active_matmul_params'] / 1e6:,.1f}M active per token" if model.get("experts") else "") + ").")


def repeats_text(rates: list[float]) -> str:
    """The out tok/s of each timed call (``repeats``), in order, their median and spread (max - min over median)."""
    mid = statistics.median(rates)
    return (f"{len(rates)} timed calls: " + ", ".join(f"{x:,.0f}" for x in rates)
            + f" out tok/s (median {mid:,.0f}, spread {(max(rates) - min(rates)) / mid:.1%}); the table shows the first")


def calls_text(facts: list[dict[str, Any]]) -> str:
    """Each timed call's TTFT p50, host ms launching a non-graph step (and its GPU ms), when decode began, the compute
    stream's busy share and the allocator's device events, in order."""
    def one(f: dict[str, Any]) -> str:
        bits = [f"TTFT {f['ttft_p50_s']:.3f} s" if f.get("ttft_p50_s") is not None else "TTFT -"]
        if f.get("other_launch_ms") is not None:
            gpu = f" (GPU {f['other_gpu_ms']:.1f} ms)" if f.get("other_gpu_ms") is not None else ""
            bits.append(f"{f['other_launch_ms']:.1f} ms a prefill/mixed launch{gpu}")
        if f.get("before_decode_ms") is not None:
            bits.append(f"decode began after {f['before_decode_ms']:.0f} ms")
        if f.get("busy_pct") is not None:
            bits.append(f"busy {f['busy_pct']:.1f}%")
        a = f.get("allocator")
        if a:
            bits.append(f"cudaMalloc {a['num_device_alloc']}, cudaFree {a['num_device_free']}, "
                        f"retries {a['num_alloc_retries']}")
        return ", ".join(bits)
    return "per timed call: " + "; ".join(f"({i + 1}) {one(f)}" for i, f in enumerate(facts))


def notes(summary: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    """How each number was obtained, and what ran differently from the workload as specified."""
    wl, rates, limit = summary["workload"], summary["rates"], summary["roofline"]
    env = summary.get("env") or {}
    model = summary["model"]
    kept = wl.get("roofline_lm_head", "every_prompt_token") == "kept_logits"
    out = [
        workload_text(wl, model, summary.get("requests_drawn") or {}),
        f"Device: {env.get('device', '?')}; torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}, "
        f"lightning {env.get('lightning', '?')}.",
        f"Roofline ({rates['source']}: {rates['matmul_tflops']:.0f} TFLOP/s bf16 matmul, {rates['copy_tbps']:.2f} TB/s copy, "
        f"decode in waves of max_num_seqs={summary['roofline_max_num_seqs']}): full workload "
        f"{limit['prefill_s']:.3f} s prefill + {limit['decode_s']:.3f} s decode = {limit['total_s']:.3f} s, "
        f"ceiling {limit['output_tokens_per_s']:,.0f} output tok/s. '% roofline' = limit time / wall time for the "
        "requests that variant ran; 'wall/limit' is its inverse. Prefill: 2 x (active matmul params - LM head) x "
        "prompt tokens computed + 2 x LM head x "
        + ("rows whose logits are kept (one per request; scoring: every continuation token)" if kept else
           "every prompt token computed (the convention of the published W1-W3 rooflines)")
        + " + attention, at the matmul rate; a shared prefix counts once. Decode: the fewest steps (every request's "
        "new tokens - 1 rows, at most max_num_seqs a step, one token a step per request), each reading the weights a "
        "token uses once (MoE: the active experts) plus the K/V of every context, at the copy bandwidth.",
        "% matrix rate = model FLOPs / wall time / the matmul rate above. Model FLOPs = 2 x (P - H) x T + 2 x H x K + "
        "4 x layers x q_heads x head_dim x C + over the decode rows (2 x P x D + 4 x layers x q_heads x head_dim x Cd): "
        f"P = active matmul params ({model.get('active_matmul_params', model['matmul_params']) / 1e6:,.1f}M, LM head "
        f"included), H = LM head params ({model.get('lm_head_params', 0) / 1e6:,.1f}M), T = prompt tokens computed "
        "(a shared prefix once), K = rows whose logits are kept (one per request; scoring: every continuation token), "
        "C = causal (query, key) pairs of the prompts, p(p+1)/2 - c(c+1)/2 for a prompt of p tokens whose first c are "
        "a prefix computed earlier, D = decode rows (new tokens - 1 per request), Cd = context tokens they read. "
        "The work a prefix cache could skip is not counted, so a variant without one scores lower.",
        "start-up s: building the engine (KV cache, warm-up/compile, CUDA-graph capture; the JSON's startup_parts "
        "splits it for ours) plus setup inside the timed call (hf_cb's manager and warm-up; ours_async_lightning's "
        "per-call engine and Lightning set-up); the model's random init is excluded. "
        + ("Each variant compiled into empty inductor and Triton caches of its own (compile_cache=per_variant), as on "
           "a fresh machine. " if summary["config"].get("compile_cache", "per_variant") == "per_variant" else
           "Compile caches shared by the variants (compile_cache=shared): a variant after the first may reuse "
           "kernels an earlier one compiled, and start faster. ")
        + "first/repeat call (with "
        "first_call.enabled): the first call after start-up, before any warm-up, over the same call repeated "
        "(issue 14: at most 1.05).",
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
        "(schedule + prepare + launch + process) / steps, timed run (steps: model forwards, a decode window counting "
        "each of its forwards); GPU ms/step: union of kernel time per engine step "
        "in the profiled run (static, hf_cb: per forward call of the model; graph replays are not counted). Async can "
        "only hide the CPU time if CPU ms/step <= GPU ms/step.",
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
            if prof.get("kernel_ms_per_step"):
                bits.append("GPU ms/step by kernel: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in prof["kernel_ms_per_step"].items()))
            st = prof.get("steady") or {}
            if st.get("steps"):
                top = list((st.get("kernel_ms_per_step") or {}).items())
                rest = sum(v for _, v in top[8:])
                bits.append(
                    f"steady part of the profiled run ({st['window'][0]:.0%}-{st['window'][1]:.0%}): {st['steps']} steps, "
                    f"{st['wall_ms_per_step']:.2f} ms/step wall, GPU busy {st['gpu_ms_per_step']:.2f} ms/step, "
                    f"{st['kernels_per_step']:.0f} kernels/step; GPU ms/step by kernel: "
                    + ", ".join(f"{k} {v:.3f}" for k, v in top[:8]) + (f", other {rest:.3f}" if rest else ""))
        elif r.get("status") == "ok" and not prof:
            bits.append("not profiled (profile.skip / profile.enabled)")
        if prof.get("error"):
            bits.append(f"profile failed: {prof['error']}")
        if r.get("attn_fallback"):
            bits.append(r["attn_fallback"])
        if r.get("setup_s"):
            bits.append(f"setup excluded {r['setup_s']:.2f} s")
        if r.get("variant", "").startswith("ours") and r.get("variant_init_s"):
            parts = ", ".join(f"{k} {v:.1f} s" for k, v in (r.get("startup_parts") or {}).items())
            bits.append(f"engine built (KV cache, CUDA graphs) in {r['variant_init_s']:.1f} s, untimed"
                        + (f" ({parts})" if parts else ""))
        first = r.get("first_call")
        if first:
            bits.append(f"first call {first['first_s']:.2f} s vs repeated {first['repeat_s']:.2f} s "
                        f"({first['requests']} requests)" + (f"; {'; '.join(first['problems'])}" if first.get("problems") else ""))
        if r.get("repeat_out_tok_s"):
            bits.append(repeats_text(r["repeat_out_tok_s"]))
        facts = r.get("call_facts") or []
        if facts:
            bits.append(calls_text(facts))
        launch = r.get("launch_ms")
        if launch:
            per = [f"{launch[f'per_{k}_step']:.2f} ms for each of {launch[f'{k}_steps']} {what}"
                   for k, what in (("graph", "decode steps replayed from graphs"), ("other", "other steps"))
                   if launch[f"{k}_steps"]]
            bits.append("host time launching a step (timed run): " + ", ".join(per))
        stats = r.get("stats") or {}
        if stats.get("deferred_admissions"):
            bits.append(f"admission deferred by {stats['deferred_admissions']} plans (admit_threshold)")
        gcp = r.get("gc")
        if gcp and sum(gcp["collections"]):
            bits.append("garbage collections in the timed run (generations 0/1/2): "
                        + "/".join(str(n) for n in gcp["collections"]) + ", pausing "
                        + "/".join(f"{1e3 * t:.0f}" for t in gcp["pause_s"]) + " ms")
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
    return out + comparisons(summary, by_name)


def _same_requests(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("requests") == b.get("requests")


def comparisons(summary: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> list[str]:
    """The ratios the issues set targets on, when both sides ran the same requests in this run."""
    out = []
    pair = lambda a, b: a in by_name and b in by_name and _same_requests(by_name[a], by_name[b])  # noqa: E731
    if pair("ours_async", "ours_async_lightning"):
        a, b = by_name["ours_async"]["wall_s"], by_name["ours_async_lightning"]["wall_s"]
        out.append(f"Lightning overhead (ours_async_lightning vs ours_async wall): {100 * (b / a - 1):+.1f}% (target < 3%).")
    if pair("ours_async", "ours_sync"):
        a, b = by_name["ours_async"]["wall_s"], by_name["ours_sync"]["wall_s"]
        out.append(f"Async over sync: {b / a:.2f}x (wall ours_sync / ours_async; issue 14: never below 1).")
    sampling = summary["workload"].get("sampling") or {}
    if sampling and pair("ours_async", "ours_async_greedy"):
        a, g = by_name["ours_async"], by_name["ours_async_greedy"]
        key = "output_tok_s" if a.get("output_tok_s") else "total_tok_s"
        how = ", ".join(f"{k}={v}" for k, v in sampling.items())
        out.append(f"Sampled over greedy ({how}): ours_async {a[key]:,.0f} vs ours_async_greedy {g[key]:,.0f} tok/s "
                   f"= {a[key] / g[key]:.3f} (issue 9: at least 0.90).")
    if pair("ours_async", "ours_async_no_prefix_cache"):
        on, off = by_name["ours_async"], by_name["ours_async_no_prefix_cache"]
        line = f"Prefix caching: wall {off['wall_s']:.2f} s off / {on['wall_s']:.2f} s on = {off['wall_s'] / on['wall_s']:.2f}x"
        if summary["workload"].get("generator") == "shared_prefix":
            line += " (issue 11: at least 4x on W5)"
        else:
            line += " (issue 11: no sharing here, caching on within 2% of off)"
        stats = on.get("stats") or {}
        if stats.get("cached_tokens") is not None:
            line += (f"; with caching {stats.get('prefill_tokens', 0):,} prompt tokens computed and "
                     f"{stats['cached_tokens']:,} served from the cache")
        out.append(line + ".")
    if pair("ours_async_admit_auto", "ours_async_admit_each"):
        batched, each = by_name["ours_async_admit_auto"], by_name["ours_async_admit_each"]
        out.append(f"Admission in batches (ours_async_admit_auto: max_num_seqs // 8) over one at a time "
                   f"(ours_async_admit_each): wall {each['wall_s']:.2f} s / "
                   f"{batched['wall_s']:.2f} s = {each['wall_s'] / batched['wall_s']:.2f}x"
                   + (f"; {batched['stats']['deferred_admissions']:,} plans deferred admission"
                      if (batched.get("stats") or {}).get("deferred_admissions") else "") + ".")
    touched = summary.get("roofline_touched_experts")
    if touched:
        out.append(f"MoE: the roofline reads the active experts' weights per decode step (BENCHMARKS.md). A step of "
                   f"{touched['rows']} rows under uniform routing touches nearly every expert of a layer; with every "
                   f"touched expert read once per step the limit is {touched['total_s']:.3f} s instead of "
                   f"{summary['roofline']['total_s']:.3f} s.")
    if summary["workload"].get("generator") == "score_pairs":
        out.append("Scoring: scored tok/s = continuation tokens / wall s; total tok/s = context + continuation tokens "
                   "(prompt tokens) / wall s; the roofline is prefill only, with logits for the continuation rows.")
    expected = summary["workload"].get("expected_output_tokens")
    if expected:
        out.append(f"Output tokens drawn: {summary['requests_drawn']['output_tokens']:,} (asserted equal to the "
                   f"workload's {expected:,}); each variant's status checks every request made exactly its budget.")
    return out
