"""The latency of one all-reduce of a decode step's hidden states, NCCL against symmetric memory, in CUDA graphs.

    torchrun --nproc-per-node=2 recipes/bench/allreduce_latency.py --out out/allreduce.json

A tensor-parallel decode step does two all-reduces per layer of rows x hidden bf16 values (W3 at batch 32: 32 x 4,096
= 256 KiB). At that size an all-reduce costs its latency, not its bytes. Each method runs ``--per-graph`` all-reduces
in one CUDA graph (as a captured decode step does), replayed ``--replays`` times; the table gives microseconds per
all-reduce, and each result is checked against NCCL's. ``AllReduce`` (the engine's) is timed too: it is what the
engine's row-parallel layers call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(os.path.dirname(HERE)), "plugin")]
from async_batching.all_reduce import multicast_off  # noqa: E402

multicast_off()  # NVLink multicast off (device README), before any process group


def graph_us(fn, per_graph: int, replays: int) -> float:
    """Microseconds per call of ``fn``, ``per_graph`` calls captured in one CUDA graph (``roofline.graph_ms``), the
    ranks starting the timed replays together."""
    from bench.roofline import graph_ms

    return 1000.0 * graph_ms(fn, per_graph, replays, before_timing=torch.distributed.barrier)


def chain(engine, x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` dependent all-reduces (``engine``'s, or NCCL's for None) captured in one CUDA graph, replayed once."""
    import torch.distributed as dist

    def reduce(t):
        if engine is not None:
            return engine(t)
        t = t.clone()
        dist.all_reduce(t)
        return t

    def run():
        z = x.clone()
        for _ in range(n):
            z = reduce(z) * 0.5 - x * 0.25
        return z

    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = run()
    g.replay()
    torch.cuda.synchronize()
    return out.clone()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="1,32,128,256,512")
    ap.add_argument("--hidden", default="4096,8192")
    ap.add_argument("--per-graph", type=int, default=64)
    ap.add_argument("--replays", type=int, default=50)
    args = ap.parse_args()

    import torch.distributed as dist

    from async_batching.all_reduce import AllReduce

    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    sizes = [(r, h) for h in map(int, args.hidden.split(",")) for r in map(int, args.rows.split(","))]
    engine = AllReduce(group, torch.device("cuda", local), max_bytes=max(r * h for r, h in sizes) * 2)
    rows = []
    for r, h in sizes:
        x = torch.randn(r, h, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(rank))
        ref = x.clone()
        dist.all_reduce(ref, group=group)
        y = x.clone()
        row = {"rows": r, "hidden": h, "kib": r * h * 2 / 1024}
        row["nccl_us"] = graph_us(lambda: dist.all_reduce(y, group=group), args.per_graph, args.replays)
        out = {}

        def ours():
            out["y"] = engine(x)
        row["ours_us"] = graph_us(ours, args.per_graph, args.replays)
        row["ours_method"] = engine.method(x)
        row["ours_exact"] = bool(torch.equal(out["y"], ref))
        if engine.symm is not None:
            buf, name = engine.symm_buffer, engine.group_name

            def one_shot():
                out["y1"] = torch.ops.symm_mem.one_shot_all_reduce_copy(buf[:x.numel()].view(x.shape), x, "sum", name)
            row["one_shot_us"] = graph_us(one_shot, args.per_graph, args.replays)
            row["one_shot_exact"] = bool(torch.equal(out["y1"], ref))

            def two_shot():
                b = buf[:x.numel()]
                b.copy_(x.view(-1))
                torch.ops.symm_mem.two_shot_all_reduce_(b, "sum", name)
                out["y2"] = b.view_as(x).clone()
            row["two_shot_us"] = graph_us(two_shot, args.per_graph, args.replays)
            row["two_shot_exact"] = bool(torch.equal(out["y2"], ref))
        # Back-to-back calls whose inputs differ per rank and per call, in one graph: a rank that overwrote its
        # buffer before a peer read it would change the sums.
        row["chain_exact"] = bool(torch.equal(chain(engine, x, args.per_graph), chain(None, x, args.per_graph)))
        rows.append(row)
        if rank == 0:
            print("[allreduce]", json.dumps(row), flush=True)
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        meta = {"world": world, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "symm_error": engine.symm_error}
        json.dump({"meta": meta, "rows": rows}, open(args.out, "w"), indent=1)
        print("| rows x hidden | KiB | NCCL us | ours us (method) | one-shot us | two-shot us | exact |")
        print("|---|---|---|---|---|---|---|")
        for w in rows:
            exact = all(w.get(k, True) for k in ("ours_exact", "one_shot_exact", "two_shot_exact", "chain_exact"))
            print(f"| {w['rows']} x {w['hidden']} | {w['kib']:.0f} | {w['nccl_us']:.1f} | {w['ours_us']:.1f} "
                  f"({w['ours_method']}) | {w.get('one_shot_us', float('nan')):.1f} | "
                  f"{w.get('two_shot_us', float('nan')):.1f} | {exact} |")
        print("meta:", json.dumps(meta))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
