"""Host cost of replaying a CUDA graph, by node count, and of one engine's decode step, without the profiler.

1. Synthetic graphs of N small kernels on one stream (N = 64 ... 1024): host microseconds per ``replay()`` call,
   i.e. whether cudaGraphLaunch costs a constant or grows with the nodes.
2. A workload's engine (random weights, its decode graph of the largest batch): host microseconds of ``replay()``
   alone and of the executor's whole launch of a decode step, over many steps, with the GPU kept ahead.

    python recipes/bench/graph_launch.py --workload conf/workload/w1.yaml [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def host_us(fn, reps: int = 200) -> float:
    """Median host microseconds of ``fn`` (synchronising every 20 calls so the launch queue never fills)."""
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if i % 20 == 19:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    times.sort()
    return 1e6 * times[len(times) // 2]


def synthetic(out: dict) -> None:
    x = torch.zeros(4096, device="cuda")
    s = torch.cuda.Stream()
    print("| kernels in the graph | host us per replay | us per node |")
    print("|---|---|---|")
    for n in (64, 256, 512, 1024):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(s):
            x.add_(1)
            torch.cuda.synchronize()
            with torch.cuda.graph(g, stream=s):
                for _ in range(n):
                    x.add_(1)
        g.replay()
        us = host_us(g.replay)
        out.setdefault("synthetic", []).append({"nodes": n, "host_us": us})
        print(f"| {n} | {us:.1f} | {us / n:.2f} |")


def engine(out: dict, workload_path: str) -> None:
    import yaml

    from async_batching import ContinuousBatcher
    from bench.workloads import Workload

    wl = Workload.from_dict(yaml.safe_load(open(workload_path)))
    model = wl.build_model("cuda")
    t0 = time.perf_counter()
    b = ContinuousBatcher(model)
    build = time.perf_counter() - t0
    runner = b.runner
    batch = max(runner.graphs)
    graph = runner.graphs[batch][0]
    us = host_us(graph.replay, reps=100)
    # the GPU time of one replay, for comparison
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    gpu_ms = start.elapsed_time(end) / 20
    out["engine"] = {"workload": wl.name, "batch": batch, "replay_host_us": us, "replay_gpu_ms": gpu_ms,
                     "build_s": build}
    print(f"\n{wl.name}: decode graph of {batch} sequences: replay() {us:.0f} us on the host, {gpu_ms:.3f} ms on the "
          f"GPU (engine built in {build:.1f} s)")
    b.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "cuda": torch.version.cuda}
    print(f"{out['device']}, torch {out['torch']}, CUDA {out['cuda']}\n")
    synthetic(out)
    if args.workload:
        engine(out, args.workload)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
