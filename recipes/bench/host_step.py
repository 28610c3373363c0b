"""The engine's host work per step, by phase, with the model's forward stubbed out: what the async step has to hide.

A workload's requests (W1 by default: 512 requests, 256 new tokens) run through the real scheduler, packing, executor
and result processing on the CPU; the model's forward and the sampler are stubs that return at once (token 0 for
every row), so every step's time is the engine's own Python (launch: staging, carry-over and block-table updates,
in-flight bookkeeping; on CUDA add the stream and event calls and a graph replay, about 5 us). Decode steps (one token for each running request) are reported apart from the steps that
prefill. Runs on any machine, no GPU needed.

    python recipes/bench/host_step.py [--workload conf/workload/w1.yaml] [--repeat 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PHASES = ("schedule", "prepare", "launch", "wait", "process")


def main() -> None:
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    from async_batching import ContinuousBatcher, SamplingParams
    from async_batching.model_runner import ModelRunner
    from bench.workloads import Workload

    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default=os.path.join(os.path.dirname(__file__), "..", "..", "conf", "workload", "w1.yaml"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mode", default="async")
    ap.add_argument("--window", type=int, default=None, help="BatcherConfig.decode_window (default: the engine's)")
    ap.add_argument("--max-batch-tokens", type=int, default=None,
                    help="BatcherConfig.max_batch_tokens (default: the engine's; on CUDA a 135M model gets 65,536)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    wl = Workload.from_dict(yaml.safe_load(open(args.workload)))
    reqs = wl.build()
    vocab = int(wl.model.get("vocab_size", 32000))
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab,
                                         max_position_embeddings=8192)).eval()

    from async_batching import executor as executor_module

    logits = torch.zeros(8192, 1)

    def stub_forward(self, buf, lay):  # the model's logits, free: every step's time is the engine's own work
        return logits[: lay.num_samples + lay.num_score_rows]

    def stub_sample(rows, params, out=None):  # token 0 for every row (EOS is ignored)
        tokens = torch.zeros(rows.shape[0], dtype=torch.int32)
        return tokens if out is None else out.copy_(tokens)

    executor_module.sample = stub_sample

    blocks = sum(-(-(len(p) + n) // 16) for p, n in zip(reqs.prompts, reqs.new_tokens)) + 64
    runs = []
    for _ in range(args.repeat):
        b = ContinuousBatcher(model, num_blocks=blocks, mode=args.mode, max_num_seqs=max(512, len(reqs)),
                              decode_window=args.window, max_batch_tokens=args.max_batch_tokens)
        b.runner.forward = stub_forward.__get__(b.runner, ModelRunner)
        per_step = {p: [] for p in PHASES}
        kinds = []
        widths = []  # forwards of each step (a decode window: several)
        ex = b.executor
        plans = []
        schedule = ex.schedule

        def recording_schedule():
            plan = schedule()
            plans.append(plan)
            return plan

        ex.schedule = recording_schedule
        last = {p: 0.0 for p in PHASES}
        for prompt, n in zip(reqs.prompts, reqs.new_tokens):
            b.add_request(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))
        t0 = time.perf_counter()
        while b.has_unfinished():
            b.step()  # async: plans and launches step N+1, then waits for and processes step N
            if not plans or not plans[-1]:
                continue
            for p in PHASES:
                v = ex.stats[f"cpu_{p}_s"]
                per_step[p].append(v - last[p])
                last[p] = v
            kinds.append("decode" if plans[-1].is_decode_only else "other")
            widths.append(plans[-1].window)
        wall = time.perf_counter() - t0
        decode = [i for i, k in enumerate(kinds) if k == "decode"]
        forwards = sum(widths[i] for i in decode)  # per decode forward: a window's host work over its forwards
        runs.append({
            "wall_s": wall, "steps": sum(widths), "decode_steps": forwards,
            "decode_ms": {p: 1e3 * sum(per_step[p][i] for i in decode) / forwards for p in PHASES} if decode else {},
            "all_ms": {p: 1e3 * sum(per_step[p]) / max(sum(widths), 1) for p in PHASES},
        })
        b.close()
    best = min(runs, key=lambda r: r["wall_s"])
    print(f"{wl.name}: {len(reqs)} requests, mode {args.mode}, decode window {b.runner.decode_window}, "
          f"torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs; best of {args.repeat}: {best['steps']} steps ({best['decode_steps']} decode) "
          f"in {best['wall_s']:.2f} s")
    print("| phase | ms per decode step | ms per step (all) |")
    print("|---|---|---|")
    for p in PHASES:
        print(f"| {p} | {best['decode_ms'].get(p, 0):.3f} | {best['all_ms'][p]:.3f} |")
    total = sum(best["decode_ms"].get(p, 0) for p in PHASES if p != "wait")
    print(f"| host work (all but wait) | {total:.3f} | {sum(v for k, v in best['all_ms'].items() if k != 'wait'):.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"workload": wl.name, "mode": args.mode, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
