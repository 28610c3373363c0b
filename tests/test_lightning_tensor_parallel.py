"""Tensor parallelism under Lightning: TensorParallelStrategy groups ranks, each group reads one data shard, and only a
group's first rank writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from lightning.fabric.plugins.environments import LightningEnvironment

from async_batching.lightning import TensorParallelStrategy
from engine_helpers import mixed_prompts, reference
from lightning_helpers import write_predict_script

NEW = 8


def test_tp_two_cpu_ranks_generate_once_and_write_once(tmp_path, repo_root, tiny_llama):
    prompts = mixed_prompts(7, lo=2, hi=30, seed=6)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    script = tmp_path / "predict_tp.py"
    write_predict_script(script, repo_root, 'TensorParallelStrategy(process_group_backend="gloo")', NEW)
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items()
           if k not in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")}
    args = [str(tmp_path / "prompts.json"), str(out), str(tmp_path / "s.json")]
    proc = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(prompts))), "one group: every request once, in order"
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "predict_tp.py", "prompts.json", "s.json"]  # no parts
    for r in rows:
        assert r["token_ids"] == reference(tiny_llama, prompts[r["index"]], NEW, eos=2), r["index"]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["ranks"] == 1 and summary["requests"] == len(prompts)
    assert (summary["nvls"], summary["symm_multicast_off"], summary["nvshmem_nvls_off"]) == ("0", "1", "1"), \
        "NVLink multicast is turned off (NCCL, symmetric memory, NVSHMEM) in the processes Lightning starts"


def _strategy(rank: int, world: int, size) -> TensorParallelStrategy:
    env = LightningEnvironment()
    env.set_world_size(world)
    env.set_global_rank(rank)
    return TensorParallelStrategy(size, cluster_environment=env)


def test_tp_times_dp_shards_the_data_per_group():
    # devices=4, tensor_parallel_size=2: ranks 0,1 read shard 0 of 2, ranks 2,3 shard 1.
    kwargs = [_strategy(r, 4, 2).distributed_sampler_kwargs for r in range(4)]
    assert kwargs == [{"num_replicas": 2, "rank": 0}, {"num_replicas": 2, "rank": 0},
                      {"num_replicas": 2, "rank": 1}, {"num_replicas": 2, "rank": 1}]
    assert _strategy(3, 4, None).distributed_sampler_kwargs == {"num_replicas": 1, "rank": 0}  # TP only
    assert _strategy(3, 4, None).tensor_parallel_size == 4
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        TensorParallelStrategy(0)


def test_writer_of_a_non_first_rank_writes_nothing(tmp_path):
    from types import SimpleNamespace

    from async_batching.lightning import JsonlPredictionWriter

    for rank in range(4):
        trainer = SimpleNamespace(strategy=_strategy(rank, 4, 2), global_rank=rank, world_size=4)
        w = JsonlPredictionWriter(str(tmp_path / "out.jsonl"))
        w.setup(trainer, None, "predict")
        assert (w.rank, w.world_size, w.writes) == (rank // 2, 2, rank % 2 == 0)
        w.teardown(trainer, None, "predict")
    assert sorted(os.listdir(tmp_path)) == ["out.rank0.jsonl", "out.rank1.jsonl"]
