"""Tensor parallelism with transformers' TP plans: two CPU ranks over gloo equal single-process `generate`."""

from __future__ import annotations

import pytest
import torch

from async_batching import ContinuousBatcher, SamplingParams
from async_batching.models import tiny_model
from async_batching.tensor_parallel import data_parallel_view
from engine_helpers import mixed_prompts, reference
from tp_helpers import run_ranks

NEW_TOKENS = 10
ARCHS = ["llama", "qwen3", "qwen3_moe"]


def _generate_on_rank(rank: int, arch: str, prompts: list, modes: tuple) -> dict:
    """Every rank builds the same random model and the same engine; the engine shards the model over the group."""
    model = tiny_model(arch)
    out = {}
    for mode in modes:
        # A 32-token budget chunks the longer prompts; 24 blocks of 8 cannot hold four long requests: preemption.
        b = ContinuousBatcher(model, mode=mode, tensor_parallel_size=2, max_num_seqs=4, max_batch_tokens=32,
                              block_size=8, num_blocks=24)
        results = b.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
        out[mode] = {"tokens": [r.token_ids for r in results], "kv_heads": b.runner.layers[0].num_kv_heads,
                     "preemptions": b.stats["preemptions"], "free": b.all_blocks_free()}
        b.close()
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tp2_matches_single_process_generate(arch):
    prompts = mixed_prompts(7, lo=2, hi=70, seed=3)
    model = tiny_model(arch)
    refs = [reference(model, p, NEW_TOKENS) for p in prompts]
    heads = model.config.num_key_value_heads
    ranks = run_ranks(2, _generate_on_rank, arch, prompts, ("sync", "async"))
    for rank, got in enumerate(ranks):
        assert not isinstance(got, tuple), got
        for mode, r in got.items():
            assert r["tokens"] == refs, f"{arch} rank {rank} {mode}"
            assert r["kv_heads"] == heads // 2, "each rank caches its local kv heads"
            assert r["free"]
    assert ranks[0]["async"]["preemptions"] > 0, "the cache was meant to force preemption"


def _disagreeing_rank(rank: int) -> str:
    model = tiny_model("llama")
    b = ContinuousBatcher(model, tensor_parallel_size=2, max_num_seqs=4, max_batch_tokens=32, num_blocks=32)
    prompt = [5, 6, 7] if rank == 0 else [5, 6, 8]  # a different request on rank 1: the group must notice
    b.generate([prompt], SamplingParams(max_new_tokens=3))
    return "no error"


def test_ranks_that_plan_different_steps_fail_loudly():
    for got in run_ranks(2, _disagreeing_rank):
        assert isinstance(got, tuple) and got[1] == "PlanDisagreement", got


def test_model_without_tp_plan_is_a_clear_error():
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*no tensor-parallel plan"):
        ContinuousBatcher(tiny_model("gpt2"), tensor_parallel_size=2)


def test_tp_size_not_dividing_the_heads_is_a_clear_error(tiny_llama):
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide .*num_attention_heads=4"):
        ContinuousBatcher(tiny_llama, tensor_parallel_size=3)
    kv = tiny_model("llama", num_attention_heads=4, num_key_value_heads=1)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 does not divide .*num_key_value_heads=1"):
        ContinuousBatcher(kv, tensor_parallel_size=2)


def test_tp_without_a_process_group_is_a_clear_error(tiny_llama):
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="needs torch.distributed initialized"):
        ContinuousBatcher(tiny_llama, tensor_parallel_size=2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_bad_tensor_parallel_size_names_the_key(bad):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        ContinuousBatcher(tiny_model("llama"), tensor_parallel_size=bad)


def test_data_parallel_view_gives_one_shard_and_one_writer_per_group():
    # devices=4, tensor_parallel_size=2: ranks 0,1 serve shard 0 and ranks 2,3 shard 1; ranks 0 and 2 write.
    assert [data_parallel_view(r, 4, 2) for r in range(4)] == [(0, 2, True), (0, 2, False), (1, 2, True),
                                                                (1, 2, False)]
    assert [data_parallel_view(r, 2, 1) for r in range(2)] == [(0, 2, True), (1, 2, True)]
    with pytest.raises(ValueError, match="does not divide"):
        data_parallel_view(0, 3, 2)


class _Counting:
    """Stands in for a group's registered AllReduce and counts the sums asked of it."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, x):
        self.calls += 1
        return self.inner(x)


def _row_parallel_sums_on_rank(rank: int, tp_all_reduce: str) -> dict:
    from async_batching import all_reduce

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model = tiny_model("llama")
    with torch.no_grad():
        want = model(ids).logits
    b = ContinuousBatcher(model, tensor_parallel_size=2, max_num_seqs=4, max_batch_tokens=32, num_blocks=32,
                          fuse_projections=True, tp_all_reduce=tp_all_reduce)
    name = b.tp.group.group_name
    counting = all_reduce._ENGINES[name] = _Counting(all_reduce._ENGINES.get(name, lambda x: x))
    with torch.no_grad():  # the engine's path: fused local shards, the group's all-reduce
        fast = model(ids).logits
    inference_calls = counting.calls
    with torch.enable_grad():  # transformers' own TP forwards (DTensors, its all-reduces)
        slow = model(ids).logits.detach()
    out = {"row_parallel": b.tp.row_parallel, "fused": b.runner.num_fused, "inference_calls": inference_calls,
           "grad_calls": counting.calls - inference_calls, "layers": model.config.num_hidden_layers,
           "fast_err": (fast - want).abs().max().item(), "slow_err": (slow - want).abs().max().item(),
           "method": b.tp.all_reduce.method(want) if b.tp.all_reduce is not None else None}
    b.close()  # the last engine on the model: the fused shards become tensors of their own, transformers' forwards back
    from async_batching.tensor_parallel import is_column_parallel, shard_of

    attn = model.model.layers[0].self_attn
    q, k = shard_of(attn.q_proj.weight), shard_of(attn.k_proj.weight)
    out["restored"] = (is_column_parallel(attn.q_proj) and is_column_parallel(model.model.layers[0].mlp.up_proj)
                       and q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr())
    with torch.no_grad():
        out["after_close_err"] = (model(ids).logits - want).abs().max().item()
    return out


def _auto_then_nccl_on_rank(rank: int) -> list:
    model = tiny_model("llama")
    counts = []
    for how in ("auto", "nccl", "auto"):
        b = ContinuousBatcher(model, tensor_parallel_size=2, max_num_seqs=4, max_batch_tokens=32, num_blocks=32,
                              tp_all_reduce=how)
        layers = [m for m in model.modules() if type(m).__name__ == "Linear"]
        counts.append((b.tp.row_parallel, sum("tp_forward" in getattr(m.__dict__.get("forward"), "__dict__", {})
                                              for m in layers)))
        b.close()
    return counts


def test_an_nccl_engine_gives_transformers_forwards_back_to_a_model_an_auto_engine_set_up():
    layers = tiny_model("llama").config.num_hidden_layers
    for got in run_ranks(2, _auto_then_nccl_on_rank):
        assert got == [(2 * layers, 2 * layers), (0, 0), (2 * layers, 2 * layers)], got


@pytest.mark.parametrize("tp_all_reduce", ["auto", "nccl"])
def test_row_parallel_layers_sum_through_the_group_all_reduce_only_without_grad(tp_all_reduce):
    """'auto': o_proj and down_proj of every layer sum through the group's AllReduce (the custom op) at inference,
    and with grad enabled transformers' own forward runs instead; 'nccl' leaves transformers' forwards alone. Either
    way, with q/k/v and gate/up fused on each rank's shards, the logits equal the unsharded model's."""
    for got in run_ranks(2, _row_parallel_sums_on_rank, tp_all_reduce):
        assert not isinstance(got, tuple), got
        layers = got["layers"]
        assert got["fused"] == 2 * layers, "q/k/v and gate/up of every layer fused on the local shards"
        if tp_all_reduce == "auto":
            assert got["row_parallel"] == 2 * layers
            assert got["inference_calls"] == 2 * layers, "one sum per row-parallel layer per forward"
            assert got["method"] == "nccl", "gloo on CPU: no symmetric memory"
        else:
            assert got["row_parallel"] == 0 and got["inference_calls"] == 0
        assert got["grad_calls"] == 0
        assert got["fast_err"] < 1e-4 and got["slow_err"] < 1e-4, got
        assert got["restored"], "closing the engine unfused the shards and gave transformers' forwards back"
        assert got["after_close_err"] < 1e-4, got


def test_bad_tp_all_reduce_names_the_key():
    with pytest.raises(ValueError, match="tp_all_reduce='fast' is invalid: expected 'auto' or 'nccl'"):
        ContinuousBatcher(tiny_model("llama"), tp_all_reduce="fast")
