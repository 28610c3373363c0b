"""The decode steps' matrix products alone, each timed inside a CUDA graph (as the decode graphs replay them), against
what the H200 could do: the weight bytes at the copy rate and the FLOPs at the matmul rate. Also the products that
share an input (q/k/v, gate/up) as one product of their concatenated weights, to see what fusing them would give.

    python recipes/bench/gemm_shapes.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.roofline import graph_ms  # noqa: E402

# (workload, rows M, [(name, K, N, count per step)]); count: layers that run it.
SHAPES = {
    "W1 (135M, 512 rows)": (512, 30, [("q", 576, 576), ("k", 576, 192), ("v", 576, 192), ("o", 576, 576),
                                      ("gate", 576, 1536), ("up", 576, 1536), ("down", 1536, 576)],
                            [("qkv", 576, 960), ("gate_up", 576, 3072)], ("lm_head", 576, 49152)),
    "W2 (1B, 256 rows)": (256, 16, [("q", 2048, 2048), ("k", 2048, 512), ("v", 2048, 512), ("o", 2048, 2048),
                                    ("gate", 2048, 8192), ("up", 2048, 8192), ("down", 8192, 2048)],
                          [("qkv", 2048, 3072), ("gate_up", 2048, 16384)], ("lm_head", 2048, 128256)),
    "W7 (0.6B, 256 rows)": (256, 28, [("q", 1024, 2048), ("k", 1024, 1024), ("v", 1024, 1024), ("o", 2048, 1024),
                                      ("gate", 1024, 3072), ("up", 1024, 3072), ("down", 3072, 1024)],
                            [("qkv", 1024, 4096), ("gate_up", 1024, 6144)], ("lm_head", 1024, 151936)),
    "W3 (8B, 32 rows)": (32, 32, [("q", 4096, 4096), ("k", 4096, 1024), ("v", 4096, 1024), ("o", 4096, 4096),
                                  ("gate", 4096, 14336), ("up", 4096, 14336), ("down", 14336, 4096)],
                         [("qkv", 4096, 6144), ("gate_up", 4096, 28672)], ("lm_head", 4096, 128256)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--copy-tbps", type=float, default=4.2)
    ap.add_argument("--matmul-tflops", type=float, default=785.0)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    rows = []
    for wl, (m, layers, per_layer, fused, head) in SHAPES.items():
        print(f"\n## {wl}: {layers} layers\n")
        print("| product | K x N | us | weight-read bound us | FLOP bound us | % of bound |")
        print("|---|---|---|---|---|---|")
        total = {"separate": 0.0, "fused": 0.0}
        for group, shapes in (("separate", per_layer + [head]), ("fused", fused)):
            for name, k, n in shapes:
                x = torch.randn(m, k, device=dev, dtype=dt)
                w = torch.randn(n, k, device=dev, dtype=dt)
                ms = graph_ms(lambda: torch.nn.functional.linear(x, w))
                bw_us = (n * k * 2 + m * (k + n) * 2) / (args.copy_tbps * 1e12) * 1e6
                fl_us = 2 * m * n * k / (args.matmul_tflops * 1e12) * 1e6
                us = ms * 1e3
                times = 1 if name == "lm_head" else layers
                if group == "separate":
                    total["separate"] += us * times
                print(f"| {name}{' (fused)' if group == 'fused' else ''} | {k} x {n} | {us:.1f} | {bw_us:.1f} | "
                      f"{fl_us:.1f} | {100 * max(bw_us, fl_us) / us:.0f}% |")
                rows.append({"workload": wl, "name": name, "group": group, "m": m, "k": k, "n": n, "us": us,
                             "bw_bound_us": bw_us, "flop_bound_us": fl_us})
        by = {r["name"]: r["us"] for r in rows if r["workload"] == wl}
        sep_qkv_gu = by["q"] + by["k"] + by["v"] + by["gate"] + by["up"]
        fused_qkv_gu = by["qkv"] + by["gate_up"]
        print(f"\nAll products of a step: {total['separate'] / 1e3:.3f} ms. q+k+v and gate+up as five products: "
              f"{sep_qkv_gu:.1f} us a layer; as two fused ones: {fused_qkv_gu:.1f} us "
              f"(a step would save {(sep_qkv_gu - fused_qkv_gu) * layers / 1e3:.3f} ms).")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
