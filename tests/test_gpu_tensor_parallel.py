"""Tensor parallelism on two GPUs (NCCL): fp32 greedy equals `generate`, with the Triton kernel and decode CUDA graphs
whose captured forward holds the TP all-reduces (run by recipes/run_on_h200.sh tp on the nvidia-h200-x2 kind)."""

from __future__ import annotations

import pytest
import torch

from async_batching import ContinuousBatcher, SamplingParams
from async_batching.models import tiny_model
from engine_helpers import mixed_prompts, reference
from tp_helpers import run_ranks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]
NEW_TOKENS = 12


def _generate_on_gpu(rank: int, arch: str, prompts: list, mode: str) -> dict:
    model = tiny_model(arch, device=f"cuda:{rank}")
    b = ContinuousBatcher(model, mode=mode, tensor_parallel_size=2, max_num_seqs=8, max_batch_tokens=64,
                          block_size=16, num_blocks=256)
    results = b.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    out = {"tokens": [r.token_ids for r in results], "graph_steps": b.stats["graph_steps"],
           "kv_heads": b.runner.layers[0].num_kv_heads, "compiled": b.runner._compiled is not None}
    b.close()
    return out


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_moe"])
def test_fp32_tp2_on_two_gpus_matches_generate_with_graphs(arch, mode):
    prompts = mixed_prompts(6, lo=2, hi=90, seed=4)
    model = tiny_model(arch, device="cuda:0")
    refs = [reference(model, p, NEW_TOKENS) for p in prompts]
    del model
    for rank, got in enumerate(run_ranks(2, _generate_on_gpu, arch, prompts, mode, backend="nccl")):
        assert not isinstance(got, tuple), got
        assert got["tokens"] == refs, f"{arch} {mode} rank {rank}"
        assert got["graph_steps"] > 0, "decode steps replayed CUDA graphs holding the NCCL all-reduces"
        assert got["kv_heads"] == 1
        assert got["compiled"], "decode steps compiled (the default with graphs), DTensor shards and all"
