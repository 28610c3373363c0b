"""GPU soak (H100): async mode on W1-like traffic with a small cache for SOAK_SECONDS (default 300).

Checks: every result complete and in order, no leaked block, GPU memory and host memory flat between the first and
the last quarter of the run.
"""

import gc
import os
import random
import time

import pytest
import torch

from async_batching import ContinuousBatcher, SamplingParams
from test_gpu import smol_shape
from test_soak import rss_mb

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_gpu_soak_async_small_cache(capsys):
    seconds = float(os.environ.get("SOAK_SECONDS", "300"))
    model = smol_shape(layers=30)
    b = ContinuousBatcher(model, mode="async", max_num_seqs=256, num_blocks=3000)  # ~48k tokens: forces preemption
    rng = random.Random(0)
    t0 = time.perf_counter()
    rounds, marks, done = 0, [], 0
    while time.perf_counter() - t0 < seconds:
        n = 512
        prompts = [[rng.randrange(3, 49152) for _ in range(rng.randint(64, 512))] for _ in range(n)]
        params = [SamplingParams(max_new_tokens=rng.randint(16, 256), ignore_eos=True) for _ in range(n)]
        out = b.generate(prompts, params)
        assert [r.index for r in out] == list(range(n))
        assert all(len(r.token_ids) == p.max_new_tokens for r, p in zip(out, params))
        assert b.all_blocks_free() and b.num_unfinished == 0
        done += n
        rounds += 1
        gc.collect()
        marks.append((time.perf_counter() - t0, torch.cuda.memory_allocated() / 2**20, rss_mb()))
    q = max(1, len(marks) // 4)
    gpu_growth = marks[-1][1] - marks[q - 1][1]
    host_growth = marks[-1][2] - marks[q - 1][2]
    with capsys.disabled():
        print(f"\n[gpu soak] {seconds:.0f} s, {rounds} rounds, {done} requests, preemptions {b.stats['preemptions']}, "
              f"GPU allocated {marks[0][1]:.0f} -> {marks[-1][1]:.0f} MiB, host RSS {marks[0][2]:.0f} -> {marks[-1][2]:.0f} MiB")
    assert b.stats["preemptions"] > 0
    assert gpu_growth < 1.0, f"GPU memory grew {gpu_growth:.1f} MiB"
    assert host_growth < 64, f"host memory grew {host_growth:.1f} MiB"
