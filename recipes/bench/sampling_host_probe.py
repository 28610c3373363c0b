"""Where a sampled engine step's time goes, without the profiler: a W2-shaped model (Llama-3.2-1B shape, 128k
vocabulary, ``PROBE_LAYERS`` layers) generates W2's requests greedily and with several sampling settings; host time
of each call inside the step's launch is timed by wrappers (a call that waits for the device shows up as a long host
time), and the device time of ``sample()`` by CUDA events around it.

    PYTHONPATH=plugin python recipes/bench/sampling_host_probe.py      # on a GPU machine; prints one table
"""

from __future__ import annotations

import collections
import os
import random
import time

import torch

from async_batching import ContinuousBatcher, SamplingParams
from async_batching import executor as executor_mod
from async_batching import model_runner as runner_mod
from async_batching import triton_sampling

HOST = collections.defaultdict(float)
CALLS = collections.Counter()
EVENTS: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []


def timed(name, fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            HOST[name] += time.perf_counter() - t0
            CALLS[name] += 1
    return wrapper


class TimedKernel:
    """``kernel[grid](...)`` with the launch's host time recorded."""

    def __init__(self, name, kernel):
        self.name, self.kernel = name, kernel

    def __getitem__(self, grid):
        return timed(self.name, self.kernel[grid])


class TorchProxy:
    """``triton_sampling``'s ``torch`` with ``topk`` timed."""

    topk = staticmethod(timed("torch.topk", torch.topk))

    def __getattr__(self, name):
        return getattr(torch, name)


def install() -> None:
    R = runner_mod.ModelRunner
    for name in ("apply_updates", "forward", "sampling_inputs", "prepare"):
        setattr(R, name, timed(f"runner.{name}", getattr(R, name)))
    real_sample = executor_mod.sample

    def sample_with_events(logits, params, out=None):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = real_sample(logits, params, out=out)
        end.record()
        EVENTS.append((start, end))
        return out

    executor_mod.sample = timed("sample()", sample_with_events)
    triton_sampling._topk_draw_kernel = TimedKernel("triton topk_draw launch", triton_sampling._topk_draw_kernel)
    triton_sampling._chunk_mass_kernel = TimedKernel("triton chunk_mass launch", triton_sampling._chunk_mass_kernel)
    triton_sampling._chunk_draw_kernel = TimedKernel("triton chunk_draw launch", triton_sampling._chunk_draw_kernel)
    triton_sampling._argmax_chunk_kernel = TimedKernel("triton argmax_chunk launch",
                                                       triton_sampling._argmax_chunk_kernel)
    triton_sampling._argmax_merge_kernel = TimedKernel("triton argmax_merge launch",
                                                       triton_sampling._argmax_merge_kernel)
    triton_sampling.torch = TorchProxy()
    E = executor_mod.Executor
    E.wait = timed("executor.wait", E.wait)
    E.schedule = timed("executor.schedule", E.schedule)


def main() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    layers = int(os.environ.get("PROBE_LAYERS", "16"))
    new = int(os.environ.get("PROBE_NEW_TOKENS", "128"))
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 128000) for _ in range(rng.randint(64, 512))] for _ in range(256)]
    install()
    b = ContinuousBatcher(model)
    settings = {
        "greedy": {},
        "W2s top_k+top_p": dict(temperature=0.8, top_p=0.95, top_k=50),
        "top_k": dict(temperature=0.8, top_k=50),
        "temperature": dict(temperature=0.8),
        "top_p (sort)": dict(temperature=0.8, top_p=0.95),
    }
    print(f"PROBE_LAYERS={layers} PROBE_NEW_TOKENS={new}, 256 W2 prompts, torch {torch.__version__}")
    for name, kw in settings.items():
        sp = SamplingParams(max_new_tokens=new, ignore_eos=True, **kw)
        b.generate(prompts[:64], SamplingParams(max_new_tokens=8, ignore_eos=True, **kw))  # warm-up
        b.reset_prefix_cache()
        torch.cuda.synchronize()
        HOST.clear(), CALLS.clear(), EVENTS.clear()
        before = dict(b.stats)
        t0 = time.perf_counter()
        b.generate(prompts, sp)
        wall = time.perf_counter() - t0
        torch.cuda.synchronize()
        steps = b.stats["steps"] - before["steps"]
        phases = {k[4:-2]: round(1e3 * (b.stats[k] - before[k]) / steps, 2) for k in b.stats if k.startswith("cpu_")}
        gpu = sorted(s.elapsed_time(e) for s, e in EVENTS)
        gpu_txt = f"sample() GPU ms median {gpu[len(gpu) // 2]:.3f}, max {gpu[-1]:.3f}" if gpu else "no sample() events"
        print(f"\n==== {name}: {wall:.3f} s, {steps} steps, {new * 256 / wall:,.0f} out tok/s; host ms/step {phases}; "
              f"{gpu_txt}")
        for k, v in sorted(HOST.items(), key=lambda kv: -kv[1]):
            print(f"  {k:28s} {1e3 * v / steps:8.3f} ms/step  {1e3 * v / max(CALLS[k], 1):8.3f} ms/call  "
                  f"{CALLS[k]:6d} calls")
        b.reset_prefix_cache()


if __name__ == "__main__":
    main()
