"""Tensor parallelism on two GPUs: fp32 greedy equals `generate`, with the Triton kernel, fused q/k/v and gate/up
shards, and decode CUDA graphs whose captured forward holds the TP all-reduces: symmetric-memory ones (the default)
or NCCL's (run by recipes/run_on_h200.sh tp on the nvidia-h200-x2 kind)."""

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


def _generate_on_gpu(rank: int, arch: str, prompts: list, mode: str, tp_all_reduce: str = "auto") -> dict:
    model = tiny_model(arch, device=f"cuda:{rank}")
    b = ContinuousBatcher(model, mode=mode, tensor_parallel_size=2, max_num_seqs=8, max_batch_tokens=64,
                          block_size=16, num_blocks=256, tp_all_reduce=tp_all_reduce)
    results = b.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    ar = b.tp.all_reduce
    out = {"tokens": [r.token_ids for r in results], "graph_steps": b.stats["graph_steps"],
           "kv_heads": b.runner.layers[0].num_kv_heads, "compiled": b.runner._compiled is not None,
           "symm_error": ar.symm_error if ar is not None else "none", "row_parallel": b.tp.row_parallel,
           "fused": b.runner.num_fused, "layers": model.config.num_hidden_layers}
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
        assert got["symm_error"] is None, "symmetric memory set up on two H200s"
        assert got["row_parallel"] >= got["layers"], "o_proj (and dense down_proj) sum through symmetric memory"
        assert got["fused"] >= got["layers"], "q/k/v fused on each rank's shards"


def test_fp32_tp2_with_nccl_all_reduces_matches_generate():
    prompts = mixed_prompts(6, lo=2, hi=90, seed=5)
    model = tiny_model("llama", device="cuda:0")
    refs = [reference(model, p, NEW_TOKENS) for p in prompts]
    del model
    for rank, got in enumerate(run_ranks(2, _generate_on_gpu, "llama", prompts, "async", "nccl", backend="nccl")):
        assert not isinstance(got, tuple), got
        assert got["tokens"] == refs, f"rank {rank}"
        assert got["row_parallel"] == 0 and got["symm_error"] == "none"
