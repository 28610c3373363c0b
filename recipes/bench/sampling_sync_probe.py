"""Where the host time of sampled engine steps goes: a 4-layer, 128k-vocabulary model generates with W2s' sampling
(and greedily, for comparison) under torch.profiler; prints the host calls that took longest, CUDA runtime calls
included (a synchronisation shows up as cudaStreamSynchronize, cudaEventSynchronize, cudaMemcpy or cudaMalloc).

    PYTHONPATH=plugin python recipes/bench/sampling_sync_probe.py
"""

from __future__ import annotations

import os
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from async_batching import ContinuousBatcher, SamplingParams


def main() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=int(os.environ.get("PROBE_LAYERS", "4")), num_attention_heads=32,
                      num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 128000) for _ in range(rng.randint(64, 512))] for _ in range(256)]
    b = ContinuousBatcher(model)
    new = int(os.environ.get("PROBE_NEW_TOKENS", "64"))
    for name, sp in (("greedy", SamplingParams(max_new_tokens=new, ignore_eos=True)),
                     ("W2s", SamplingParams(max_new_tokens=new, ignore_eos=True, temperature=0.8, top_p=0.95, top_k=50))):
        b.generate(prompts[:64], SamplingParams(**{**sp.__dict__, "max_new_tokens": 8}))  # warm-up, as the benchmark's
        b.reset_prefix_cache()
        t0, before = time.perf_counter(), dict(b.stats)
        b.generate(prompts, sp)
        st, steps = b.stats, b.stats["steps"] - before["steps"]
        print(f"---- {name} unprofiled: {time.perf_counter() - t0:.2f} s, host ms per step",
              {k: round(1e3 * (st[k] - before[k]) / steps, 2) for k in st if k.startswith("cpu_")})
        b.reset_prefix_cache()
        before = dict(b.stats)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            b.generate(prompts, sp)
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        st = b.stats
        steps = st["steps"] - before["steps"]
        phases = {k: round(1e3 * (st[k] - before[k]) / steps, 2) for k in st if k.startswith("cpu_")}
        print(f"==== {name}: {steps} steps, {wall:.2f} s under the profiler; host ms per step {phases}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=45))
        b.reset_prefix_cache()


if __name__ == "__main__":
    main()
