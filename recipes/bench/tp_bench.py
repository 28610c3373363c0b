"""A workload's requests on one model split over a tensor-parallel group: out tok/s, decode tok/s, % of roofline.

    torchrun --nproc-per-node=2 recipes/bench/tp_bench.py --workload conf/workload/w3.yaml --out out/tp2.json
    python recipes/bench/tp_bench.py --workload conf/workload/w3.yaml --out out/tp1.json          # one GPU
    torchrun --nproc-per-node=2 recipes/bench/tp_bench.py --workload conf/workload/w3.yaml --shape llama70b ...

The model is random-init in the workload's dtype and built directly sharded: created on the meta device, split by
transformers' TP plan, then each rank allocates and fills only its own shards (a 70B model never sits whole on one
GPU). The same builder serves one GPU (no split), so both sides of a comparison are built alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(os.path.dirname(HERE)), "plugin")]
from async_batching.all_reduce import multicast_off  # noqa: E402

multicast_off()  # NVLink multicast off (device README), before any process group

# Llama-3.1-70B's shape (config.json of meta-llama/Llama-3.1-70B, rope scaling left out: random weights either way).
SHAPES = {
    "llama70b": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                     num_key_value_heads=8, head_dim=128, intermediate_size=28672, vocab_size=128256,
                     tie_word_embeddings=False, max_position_embeddings=16384),
}


def build_sharded(workload, tp: int, device: torch.device):
    """Random-init model of the workload's shape, sharded over ``tp`` ranks of the default group (1: whole)."""
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from async_batching.tensor_parallel import apply_tp_plan, check_shardable

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(workload.hf_config(), dtype=workload.torch_dtype)
    if tp > 1:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        check_shardable(model, tp)
        world = dist.get_world_size()
        apply_tp_plan(model, init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))["tp"])
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(int(workload.seed))
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            if "norm" in name:
                local.fill_(1.0)
            else:
                local.normal_(0.0, 0.02, generator=gen)
    for m in model.modules():  # buffers computed at construction (rope frequencies) were left empty on the meta device
        if type(m).__name__.endswith("RotaryEmbedding"):
            m.__init__(m.config)
            m.to(device)
    model.generation_config.eos_token_id = None
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", required=True, help="a conf/workload/*.yaml file")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="replace the workload's model shape")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batcher", default="{}", help="BatcherConfig overrides as JSON")
    ap.add_argument("--warmup-new-tokens", type=int, default=16)
    ap.add_argument("--profile", type=int, default=0,
                    help="after the timed run, profile this many new tokens of the first max_num_seqs requests on "
                         "every rank; rank 0 reports its steady decode steps by kernel family")
    args = ap.parse_args()

    import yaml

    from async_batching import ContinuousBatcher, SamplingParams
    from bench.roofline import measure_rates, roofline
    from bench.workloads import ModelShape, Workload

    spec = yaml.safe_load(open(args.workload))
    if args.shape:
        spec["model"], spec["name"] = dict(SHAPES[args.shape]), f"{spec['name']}_{args.shape}"
    workload = Workload.from_dict(spec)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device(args.device)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    t0 = time.perf_counter()
    model = build_sharded(workload, world, device)
    build_s = time.perf_counter() - t0
    overrides = json.loads(args.batcher)
    t0 = time.perf_counter()
    batcher = ContinuousBatcher(model, tensor_parallel_size=world, **overrides)
    start_s = time.perf_counter() - t0
    requests = workload.build()
    sampling = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in requests.new_tokens]
    warm = requests.head(min(len(requests), batcher.config.max_num_seqs)).with_new_tokens(args.warmup_new_tokens)
    batcher.generate(warm.prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in warm.new_tokens])
    batcher.reset_prefix_cache()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    results = batcher.generate(requests.prompts, sampling)
    wall = time.perf_counter() - t0
    out_tokens = sum(len(r.token_ids) for r in results)
    first = max(r.ttft_s for r in results)  # every request has its first token: decode only from here on
    row = {
        "workload": workload.name, "tensor_parallel_size": world, "requests": len(results), "out_tokens": out_tokens,
        "wall_s": wall, "out_tok_s": out_tokens / wall, "decode_tok_s": (out_tokens - len(results)) / (wall - first),
        "kv_blocks": batcher.runner.num_blocks, "graph_steps": batcher.stats["graph_steps"],
        "steps": batcher.stats["steps"], "build_s": build_s, "start_s": start_s, "batcher": overrides, "fused": batcher.runner.num_fused,
        "row_parallel": batcher.tp.row_parallel if batcher.tp else 0,
        "all_reduce": (None if batcher.tp is None or batcher.tp.all_reduce is None else
                       {"symm_error": batcher.tp.all_reduce.symm_error,
                        "decode": batcher.tp.all_reduce.method(torch.empty(batcher.config.max_num_seqs,
                                                                           model.config.hidden_size,
                                                                           dtype=batcher.dtype, device=device))}),
        "gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    if device.type == "cuda" and rank == 0:
        # The ceiling of one GPU's rates, divided by the group size: each GPU reads 1/tp of the weights and of the
        # K/V per step, and the all-reduces are taken as free.
        shape = ModelShape.of(workload)
        limit = roofline(requests.total_lens(), requests.new_tokens, shape, measure_rates(),
                         batcher.config.max_num_seqs)
        row["roofline_s"] = limit.total_s / world
        row["roofline_pct"] = 100.0 * row["roofline_s"] / wall
    if args.profile and device.type == "cuda":
        from bench.profiling import profiled_run

        part = requests.head(min(len(requests), batcher.config.max_num_seqs)).with_new_tokens(args.profile)
        _, trace = profiled_run(lambda: batcher.generate(
            part.prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in part.new_tokens]), "cuda")
        row["profile"] = trace.steady(0.5, 0.95)
    batcher.close()
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        json.dump(row, open(args.out, "w"), indent=1)
        print(f"[tp] {json.dumps(row)}", flush=True)


if __name__ == "__main__":
    main()
