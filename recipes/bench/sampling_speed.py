"""Micro-benchmark of ``sample()`` on bf16 logits ``[B, V]``: the new sampler against the previous one (full-vocabulary
sort and a hash over every vocabulary entry, copied below), per sampling configuration.

    PYTHONPATH=plugin python recipes/bench/sampling_speed.py --out sampling_speed.json

Per configuration and shape, over ``--reps`` steps (median):
- ``gpu_ms``: device time of the sampling kernels, measured by CUDA events with the stream kept busy by a sleep kernel
  while the host enqueues them (as in the engine, where sampling is enqueued during the forward).
- ``host_ms``: host time to enqueue them (``sampling_inputs`` + ``sample``); ``stage_ms``: host time of
  ``stage_sampling`` (building the step's staged arrays).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # recipes/, for bench.*

from async_batching.request import SamplingParams  # noqa: E402
from async_batching.sampling import SamplingState, sample, sampling_inputs, stage_sampling, stream_seed  # noqa: E402
from bench.roofline import time_ms  # noqa: E402

CONFIGS = {
    "greedy": SamplingParams(temperature=0.0),
    "temperature": SamplingParams(temperature=0.8),
    "top_k=50": SamplingParams(temperature=0.8, top_k=50),
    "top_p=0.95": SamplingParams(temperature=0.8, top_p=0.95),
    "top_k=50,top_p=0.95 (W2s)": SamplingParams(temperature=0.8, top_k=50, top_p=0.95),
    "min_p=0.05": SamplingParams(temperature=0.8, min_p=0.05),
    "repetition_penalty=1.2": SamplingParams(temperature=0.8, repetition_penalty=1.2),
    "greedy+repetition_penalty=1.2": SamplingParams(temperature=0.0, repetition_penalty=1.2),
}
HISTORY = 512  # tokens each penalised row has seen


# --- the previous implementation (before issue 9), kept here for comparison -----------------------------------
_M32 = 0xFFFFFFFF


def _old_mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _old_uniform_noise(seeds: torch.Tensor, gen_idx: torch.Tensor, vocab: int) -> torch.Tensor:
    row = _old_mix32((seeds.long() & _M32) ^ _old_mix32(gen_idx.long() & _M32))
    col = torch.arange(vocab, device=seeds.device, dtype=torch.long)
    x = _old_mix32((row[:, None] * 0x9E3779B1 + col[None, :]) & _M32)
    return ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))


@dataclass
class OldInputs:
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seeds: torch.Tensor
    gen_idx: torch.Tensor
    use_top_k_p: bool


def _old_apply_top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_x, order = x.sort(dim=-1, descending=True)
    vocab = x.shape[-1]
    ranks = torch.arange(vocab, device=x.device)[None, :]
    k = torch.where(top_k > 0, top_k.long(), torch.full_like(top_k.long(), vocab))
    cut = ranks >= k[:, None]
    probs = torch.softmax(sorted_x.masked_fill(cut, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    cut = cut | (mass_before >= top_p[:, None].float())
    sorted_x = sorted_x.masked_fill(cut, float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, sorted_x)


def old_sample(logits: torch.Tensor, params) -> torch.Tensor:
    greedy = logits.argmax(dim=-1)
    if params is None:
        return greedy.to(torch.int32)
    temp = params.temperature
    x = logits.float() / torch.where(temp > 0, temp, torch.ones_like(temp))[:, None]
    if params.use_top_k_p:
        x = _old_apply_top_k_top_p(x, params.top_k, params.top_p)
    probs = torch.softmax(x, dim=-1)
    noise = _old_uniform_noise(params.seeds, params.gen_idx, logits.shape[-1])
    drawn = (probs / (-torch.log(noise))).argmax(dim=-1)
    return torch.where(temp > 0, drawn, greedy).to(torch.int32)


def old_inputs(sp: SamplingParams, B: int, device) -> OldInputs | None:
    if sp.temperature == 0:
        return None
    full = lambda v, dt: torch.full((B,), v, dtype=dt, device=device)  # noqa: E731
    return OldInputs(full(sp.temperature, torch.float32), full(sp.top_k, torch.int32), full(sp.top_p, torch.float32),
                     torch.arange(B, dtype=torch.int32, device=device), full(0, torch.int32),
                     sp.top_k > 0 or sp.top_p < 1.0)


# --- the new implementation driven as the engine drives it ------------------------------------------------------
def fake_rows(sp: SamplingParams, B: int, V: int, rng: np.random.Generator) -> list:
    """Requests as ``stage_sampling`` sees them: distinct streams, each on its own block-table row."""
    history = rng.integers(0, V, size=(B, HISTORY)).tolist()
    return [types.SimpleNamespace(sampling=sp, seed=stream_seed(0, i), num_generated=7, row=i + 1, uid=i,
                                  num_preemptions=0, prompt_ids=history[i], output_ids=[], num_known=HISTORY)
            for i in range(B)]


def staged_step(rows, state: SamplingState, device):
    """One step's plan and ``seg`` over a device copy of the staged arrays (plus the head segments sampling reads)."""
    t0 = time.perf_counter()
    plan, arrays = stage_sampling(rows, state)
    stage_s = time.perf_counter() - t0
    B = len(rows)
    arrays = arrays + [("input_ids", np.zeros(B, np.int32)), ("logits_idx", np.arange(B, dtype=np.int32))]
    flat = torch.from_numpy(np.concatenate([a for _, a in arrays])).to(device)
    offsets, at = {}, 0
    for name, a in arrays:
        offsets[name] = (at, len(a))
        at += len(a)
    return plan, (lambda name: flat[offsets[name][0]:offsets[name][0] + offsets[name][1]]), stage_s


def measure(fn, reps: int, device, sleep_cycles: int) -> tuple[float, float]:
    """Median device ms (sampling kernels only) and median host ms to enqueue them."""
    cuda = device.type == "cuda"
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    pairs, host = [], []
    for _ in range(reps):
        if cuda:
            torch.cuda._sleep(sleep_cycles)  # the stream stays busy while the host enqueues, as during a forward
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        if cuda:
            end.record()
            pairs.append((start, end))
    if cuda:
        torch.cuda.synchronize()
        gpu = [a.elapsed_time(b) for a, b in pairs]
    else:
        gpu = host
    return statistics.median(gpu), statistics.median(host)


def _graph_us(fn, reps: int) -> float:
    """Microseconds of ``fn``'s kernels: called once (Triton compiles), captured in a CUDA graph, replayed ``reps``
    times after 3 untimed replays (``bench.roofline.time_ms``)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return 1e3 * time_ms(g.replay, reps, warmup=3)


def draw_full_forms(batches, V: int, reps: int = 50) -> None:
    """The full draw (rows without top-k) with the mass kernel's forms: ``triton_sampling.ONE_PASS_MASS`` off and on,
    and on with chunks of 8,192 ids (``_CHUNK``), timed as CUDA-graph replays of the draw alone: us a draw, the
    logits' read rate and whether each form drew the two-pass form's tokens."""
    from async_batching import triton_sampling as ts

    forms = {"two-pass, 4096": (False, 4096), "one-pass, 4096": (True, 4096), "one-pass, 8192": (True, 8192)}
    chunk0, one0 = ts._CHUNK, ts.ONE_PASS_MASS
    print("\n| rows | V | " + " | ".join(f"{f} us (TB/s, same tokens)" for f in forms) + " |")
    print("|---|---|" + "---|" * len(forms))
    for B in batches:
        x = (torch.randn(B, V, device="cuda") * 2.5).to(torch.bfloat16)
        temp = torch.full((B,), 0.6, device="cuda")
        lo = torch.arange(B, device="cuda", dtype=torch.int64) * 7919
        hi = lo + 104729
        cells, first = [], None
        for one_pass, chunk in forms.values():
            ts.ONE_PASS_MASS, ts._CHUNK = one_pass, chunk
            out = torch.empty(B, dtype=torch.int64, device="cuda")
            us = _graph_us(lambda: out.copy_(ts.draw_full(x, None, temp, None, lo, hi)), reps)
            first = out.clone() if first is None else first
            cells.append(f"{us:.1f} ({B * V * 2 / (us * 1e-6) / 1e12:.2f}, {bool(torch.equal(out, first))})")
        ts._CHUNK, ts.ONE_PASS_MASS = chunk0, one0
        print(f"| {B} | {V} | " + " | ".join(cells) + " |")


def argmax_forms(shapes, reps: int = 50) -> None:
    """Greedy tokens from bf16 logits: torch's argmax with its int32 cast and copy into the token buffer, against
    ``triton_sampling.argmax_into`` (packed keys) at a few chunk sizes and warp counts, each timed as CUDA-graph replays:
    us a draw, the logits' read rate, and whether the tokens equal torch's."""
    from async_batching import triton_sampling as ts

    forms = [(4096, 4), (4096, 8), (8192, 8), (2048, 4)]
    chunk0, warps0 = ts._ARGMAX_CHUNK, ts.ARGMAX_WARPS
    print("\n| rows | V | torch argmax + cast + copy us | " + " | ".join(f"packed, {c} ids, {w} warps us" for c, w in forms)
          + " | same tokens |")
    print("|---|---|---|" + "---|" * len(forms) + "---|")
    for B, V in shapes:
        x = (torch.randn(B, V, device="cuda") * 2.5).to(torch.bfloat16)
        out = torch.empty(B, dtype=torch.int32, device="cuda")
        want = x.argmax(-1)
        cells, same = [f"{_graph_us(lambda: out.copy_(x.argmax(-1).to(torch.int32)), reps):.1f}"], True
        for chunk, warps in forms:
            ts._ARGMAX_CHUNK, ts.ARGMAX_WARPS = chunk, warps
            us = _graph_us(lambda: ts.argmax_into(x, out), reps)
            same &= out.long().tolist() == want.tolist()
            cells.append(f"{us:.1f} ({B * V * 2 / (us * 1e-6) / 1e12:.2f} TB/s)")
        ts._ARGMAX_CHUNK, ts.ARGMAX_WARPS = chunk0, warps0
        print(f"| {B} | {V} | " + " | ".join(cells) + f" | {same} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--vocabs", type=int, nargs="+", default=[128256, 151936])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), help=f"any of {list(CONFIGS)}")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sleep-cycles", type=int, default=20_000_000, help="GPU sleep before each timed step")
    ap.add_argument("--no-old", action="store_true", help="skip the previous implementation")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--draw-full-forms", action="store_true",
                    help="only time the full draw's two mass-kernel forms (CUDA graphs, --batches, the last vocab)")
    ap.add_argument("--argmax-forms", action="store_true",
                    help="only time greedy tokens: torch's argmax against the packed-key Triton argmax's forms")
    args = ap.parse_args()
    if args.draw_full_forms:
        draw_full_forms(args.batches, args.vocabs[-1])
        return
    if args.argmax_forms:
        argmax_forms([(512, 49152), (256, 128256), (64, 128256), (32, 128256)])
        return
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    results = []
    header = f"{'B':>4} {'V':>7}  {'config':<30} {'old gpu ms':>10} {'new gpu ms':>10} {'speed-up':>8} {'new host ms':>11} {'stage ms':>8}"
    print(header)
    print("-" * len(header))
    for V in args.vocabs:
        for B in args.batches:
            gen = torch.Generator(device="cpu").manual_seed(B * 7 + V)
            # Spread like a trained model's logits; bf16 as the model returns them (values repeat: ties are real).
            logits = (torch.randn(B, V, generator=gen) * 2.5).to(device=device, dtype=torch.bfloat16)
            for name in args.configs:
                sp = CONFIGS[name]
                rows = fake_rows(sp, B, V, rng)
                state = SamplingState(B + 2, V)
                # The first step stages the rows' histories (a request's first step); later ones only new tokens.
                plan, seg, _ = staged_step(rows, state, device)
                tokens = sample(logits, sampling_inputs(plan, seg))
                assert tokens.shape == (B,) and int(tokens.min()) >= 0 and int(tokens.max()) < V
                # Staged before the timed region: the engine stages on the host while the previous step computes.
                steps = [staged_step(rows, state, device) for _ in range(args.reps + 3)]
                stage_ms = statistics.median(s * 1e3 for _, _, s in steps)

                def run_new():
                    plan, seg, _ = steps.pop()
                    return sample(logits, sampling_inputs(plan, seg))

                new_gpu, new_host = measure(run_new, args.reps, device, args.sleep_cycles)
                row = {"B": B, "V": V, "config": name, "new_gpu_ms": new_gpu, "new_host_ms": new_host,
                       "stage_ms": stage_ms}
                old_gpu = None
                if not args.no_old and sp.repetition_penalty == 1.0 and sp.min_p == 0.0:
                    params = old_inputs(sp, B, device)
                    old_gpu, old_host = measure(lambda: old_sample(logits, params), args.reps, device, args.sleep_cycles)
                    row.update(old_gpu_ms=old_gpu, old_host_ms=old_host)
                results.append(row)
                old_s = f"{old_gpu:10.3f}" if old_gpu is not None else f"{'-':>10}"
                speed = f"{old_gpu / new_gpu:7.1f}x" if old_gpu is not None else f"{'-':>8}"
                print(f"{B:>4} {V:>7}  {name:<30} {old_s} {new_gpu:10.3f} {speed} {new_host:11.3f} {row['stage_ms']:8.3f}",
                      flush=True)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "reps": args.reps, "history_tokens": HISTORY}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
