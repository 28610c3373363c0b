"""The fused MLP tail (``triton_fused_mlp``: ``(silu(g) * u) @ b + r`` in one launch) against what a compiled layer
runs without it (inductor's silu-mul kernel, the cuBLAS product, inductor's residual add), over a sweep of launches,
at the row counts of decode steps and of prefill steps, on the down projections of W1, W7 and W2.

Each timing is the mean of 20 calls captured in one CUDA graph (``roofline.graph_ms``), cycling over enough copies of
the weight to read ~256 MB, so the weight comes from memory as in a step (the gate/up product and the residual were
just written by the step, so they stay the same tensors).

    python recipes/bench/fused_mlp_tuning.py [--out FILE.json] [--only W1] [--rows 16,512,49152]

Prints a table per workload: for each row count, the unfused time, the engine's launch (``CONFIGS``) and the best of
the sweep.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "plugin"))
from bench.roofline import graph_ms  # noqa: E402
from async_batching import triton_fused_mlp  # noqa: E402

# (name, intermediate K, hidden N) of each workload's down projection
SHAPES = [("W1", 1536, 576), ("W7", 3072, 1024), ("W2", 8192, 2048)]
ROWS = [16, 64, 256, 512, 8192, 49152]


def candidates(m: int):
    bms = (16, 32) if m <= 64 else (32, 64, 128) if m <= 1024 else (64, 128)
    for bm, bn, bk, warps, stages in itertools.product(bms, (64, 128), (64, 128), (4, 8), (3, 4)):
        if bm * bk * 2 * 2 * stages + bk * bn * 2 * stages > 200_000:  # g and u tiles plus b tiles in shared memory
            continue
        yield (bm, bn, bk, 8, warps, stages)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None, help="comma-separated workload names")
    ap.add_argument("--rows", default=None, help="comma-separated row counts")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop sweeping past this many seconds")
    args = ap.parse_args()
    shapes = [s for s in SHAPES if not args.only or s[0] in args.only.split(",")]
    rows = [int(r) for r in args.rows.split(",")] if args.rows else ROWS
    dtype, dev = torch.bfloat16, "cuda"
    for name in ("recompile_limit", "cache_size_limit"):  # one compile per shape: 18 of them, all compiled
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    unfused = torch.compile(lambda g, u, b, r: r + (F.silu(g) * u) @ b, dynamic=False)
    t0, results = time.time(), []
    print(f"# Fused MLP tail vs unfused, {torch.cuda.get_device_name()} (torch {torch.__version__}), bf16, "
          "graph-timed, weights from memory\n")
    for name, K, N in shapes:
        copies = max(1, (256 << 20) // (K * N * 2))
        weights = [torch.randn(N, K, device=dev, dtype=dtype) / K ** 0.5 for _ in range(copies)]
        print(f"## {name}: K={K}, N={N} ({copies} weight copies)\n")
        print("| rows | unfused us | engine's launch | us | best launch | us | best vs unfused |")
        print("|---|---|---|---|---|---|---|")
        for m in rows:
            gu = torch.randn(m, 2 * K, device=dev, dtype=dtype)
            g, u = gu[:, :K], gu[:, K:]
            r = torch.randn(m, N, device=dev, dtype=dtype)
            it = itertools.cycle(weights)
            base = graph_ms(lambda: unfused(g, u, next(it).t(), r)) * 1e3
            want = unfused(g, u, weights[0].t(), r).float()
            it = itertools.cycle(weights)
            mine_cfg = triton_fused_mlp.config_for(m)
            mine = graph_ms(lambda: triton_fused_mlp.silu_mul_mm(g, u, next(it).t(), r, config=mine_cfg)) * 1e3
            best, best_cfg = mine, mine_cfg
            for cfg in candidates(m):
                if time.time() - t0 > args.budget_s:
                    break
                try:
                    got = triton_fused_mlp.silu_mul_mm(g, u, weights[0].t(), r, config=cfg).float()
                    if not torch.allclose(got, want, rtol=2e-2, atol=5e-2):
                        continue
                    it = itertools.cycle(weights)
                    us = graph_ms(lambda: triton_fused_mlp.silu_mul_mm(g, u, next(it).t(), r, config=cfg)) * 1e3
                except Exception as e:  # noqa: BLE001 -- a launch that does not fit is skipped
                    print(f"<!-- {cfg}: {type(e).__name__} -->")
                    continue
                if us < best:
                    best, best_cfg = us, cfg
            fmt = lambda c: "x".join(map(str, c[:3])) + f" g{c[3]} w{c[4]} s{c[5]}"  # noqa: E731
            print(f"| {m} | {base:.1f} | {fmt(mine_cfg)} | {mine:.1f} | {fmt(best_cfg)} | {best:.1f} | "
                  f"{base / best:.2f}x |", flush=True)
            results.append({"workload": name, "K": K, "N": N, "rows": m, "unfused_us": base, "engine_cfg": mine_cfg,
                            "engine_us": mine, "best_cfg": best_cfg, "best_us": best})
        print(f"\n[{time.time() - t0:.0f} s]\n")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
