"""CPU soak: thousands of requests through a small cache in both modes; nothing leaks, nothing is lost."""

import gc
import os
import random

import pytest

from async_batching import ContinuousBatcher, SamplingParams
from async_batching.models import tiny_model


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_soak_thousands_of_requests_small_cache(mode):
    model = tiny_model("llama", num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    rng = random.Random(mode == "async")
    n = int(os.environ.get("SOAK_REQUESTS", "10000"))  # 20000 took 105-118 s a mode on a 2-core CI-like host
    prompts = [[rng.randrange(3, 384) for _ in range(rng.randint(1, 48))] for _ in range(n)]
    params = [SamplingParams(max_new_tokens=rng.randint(1, 24), temperature=rng.choice([0.0, 0.8]), seed=i,
                             ignore_eos=True) for i in range(n)]
    b = ContinuousBatcher(model, mode=mode, max_num_seqs=48, max_batch_tokens=256, block_size=4, num_blocks=160)
    seen, marks = [], {}
    for chunk in range(4):  # four quarters through the same batcher
        lo, hi = chunk * n // 4, (chunk + 1) * n // 4
        out = b.generate(prompts[lo:hi], params[lo:hi])
        assert [r.index for r in out] == list(range(hi - lo))
        assert all(len(r.token_ids) == params[lo + r.index].max_new_tokens for r in out)
        seen += [lo + r.index for r in out]
        assert b.all_blocks_free() and b.num_unfinished == 0
        gc.collect()
        marks[chunk] = rss_mb()
    assert seen == list(range(n))
    assert b.stats["preemptions"] > 0
    assert marks[3] - marks[0] < 25, f"host memory grew {marks[3] - marks[0]:.1f} MiB between the first and last quarter"
