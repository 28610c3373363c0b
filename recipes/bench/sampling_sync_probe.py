"""Which host call of a sampled step waits for the device: the step's sampling is enqueued behind a 10 ms sleep
kernel under torch.profiler, and the CPU ops and CUDA runtime calls that took longest on the host are printed.

    PYTHONPATH=plugin python recipes/bench/sampling_sync_probe.py
"""

from __future__ import annotations

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from async_batching.request import SamplingParams
from async_batching.sampling import SamplingState, sample, sampling_inputs, stage_sampling, stream_seed
from bench.sampling_speed import fake_rows, staged_step


def main() -> None:
    device = torch.device("cuda")
    B, V = 256, 128256
    logits = (torch.randn(B, V, device=device) * 2.5).to(torch.bfloat16)
    rng = np.random.default_rng(0)
    for name, sp in (("temperature", SamplingParams(temperature=0.8)),
                     ("W2s", SamplingParams(temperature=0.8, top_k=50, top_p=0.95))):
        rows = fake_rows(sp, B, V, rng)
        state = SamplingState(B + 2, V)
        steps = [staged_step(rows, state, device) for _ in range(6)]
        for plan, seg, _ in steps[:3]:
            sample(logits, sampling_inputs(plan, seg))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for plan, seg, _ in steps[3:]:
                torch.cuda._sleep(20_000_000)
                sample(logits, sampling_inputs(plan, seg))
            torch.cuda.synchronize()
        print(f"==== {name}: host calls by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
