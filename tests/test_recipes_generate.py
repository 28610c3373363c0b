"""The main job (recipes/generate.py) end to end on a tiny random model, its sweep collector, and DDP through Hydra."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from async_batching import ContinuousBatcher, SamplingParams
from async_batching.job_config import DataConfig
from engine_helpers import reference, word_tokenizer

TINY = ["experiment=tiny", "data.random_prompts=10", "sampling.max_new_tokens=6", "progress_bar=none"]


@pytest.fixture(scope="module")
def recipe(repo_root):
    spec = importlib.util.spec_from_file_location("generate_recipe", os.path.join(repo_root, "recipes", "generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_job(recipe, repo_root, run_dir, overrides):
    with initialize_config_dir(config_dir=os.path.join(repo_root, "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    job = OmegaConf.to_object(cfg).validate()
    return recipe.run(job, cfg.trainer, str(run_dir), overrides)


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_main_job_writes_exact_outputs_and_a_summary_then_resumes(recipe, repo_root, tmp_path, tiny_llama, capsys):
    summary = run_job(recipe, repo_root, tmp_path, TINY)
    out = rows(tmp_path / "predictions.jsonl")
    assert [r["index"] for r in out] == list(range(10)) and summary["requests"] == 10 and summary["errors"] == 0
    for r in out:
        assert r["token_ids"] == reference(tiny_llama, r["prompt"], 6, eos=2)
    saved = json.loads((tmp_path / "summary.json").read_text())
    for key in ("requests", "errors", "output_tokens", "output_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "wall_s"):
        assert saved[key] is not None, key
    assert saved["overrides"] == TINY
    assert 0 < saved["startup_s"] and 0 < saved["wall_s"]  # the engine's build is timed apart from generation
    printed = capsys.readouterr().out
    assert "output tok/s" in printed and "TTFT" in printed and "token ids" in printed

    again = run_job(recipe, repo_root, tmp_path, TINY)  # same run dir: everything is already written
    assert again["resumed"] == 10 and again["generated"] == 0
    assert rows(tmp_path / "predictions.jsonl") == out


def test_sampling_n_from_hydra_writes_one_line_per_prompt_with_all_samples(recipe, repo_root, tmp_path, tiny_llama,
                                                                          capsys):
    overrides = TINY + ["data.random_prompts=4", "sampling.n=3", "sampling.temperature=1.0", "sampling.seed=3"]
    summary = run_job(recipe, repo_root, tmp_path, overrides)
    out = rows(tmp_path / "predictions.jsonl")
    assert [r["index"] for r in out] == list(range(4)) and summary["requests"] == 4
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, n=3)
    want = ContinuousBatcher(tiny_llama).generate([r["prompt"] for r in out], sp)  # seeded: any batching agrees
    assert [[s["token_ids"] for s in r["samples"]] for r in out] == [[s.token_ids for s in w.samples] for w in want]
    assert summary["output_tokens"] == sum(len(s["token_ids"]) for r in out for s in r["samples"])
    assert "(+ 2 more samples)" in capsys.readouterr().out


def test_a_saved_workload_checkpoint_without_tokenizer_runs_by_path(recipe, repo_root, tmp_path):
    """The DDP scaling run's path: bench/save_model.py writes a workload's model, the main job loads it by path."""
    from async_batching.models import load_model

    ckpt = tmp_path / "tiny_ckpt"
    script = os.path.join(repo_root, "recipes", "bench", "save_model.py")
    done = subprocess.run([sys.executable, script, "tiny", str(ckpt)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    model, tokenizer = load_model(str(ckpt), dtype="float32")
    assert tokenizer is None and model.config.num_hidden_layers == 2
    with pytest.raises((OSError, ValueError)):
        load_model(str(tmp_path / "missing"))  # not a directory: the hub's error, not a silent None
    overrides = ["model=pretrained", f"model.name={ckpt}", "model.dtype=float32", "data=random",
                 "data.random_prompts=5", "sampling.max_new_tokens=5", "sampling.ignore_eos=true", "progress_bar=none"]
    summary = run_job(recipe, repo_root, tmp_path / "run", overrides)
    out = rows(tmp_path / "run" / "predictions.jsonl")
    assert summary["requests"] == 5 and summary["errors"] == 0 and [r["index"] for r in out] == list(range(5))
    for r in out:  # the saved model has no EOS, so generate's 5 tokens are the job's (ignore_eos) 5
        assert r["token_ids"] == reference(model, r["prompt"], 5)


def test_bad_rows_are_skipped_and_counted_or_stop_the_job_in_strict_mode(recipe, repo_root, tmp_path):
    too_long = TINY + ["data.prompt_len=[480,540]", "data.random_prompts=6"]  # the tiny model has 512 positions
    summary = run_job(recipe, repo_root, tmp_path / "skip", too_long)
    out = rows(tmp_path / "skip" / "predictions.jsonl")
    bad = [r for r in out if r["error"]]
    assert len(out) == 6 and bad and summary["errors"] == len(bad)
    assert all("positions" in r["error"] and r["finish_reason"] == "error" for r in bad)
    with pytest.raises(ValueError, match="positions"):
        run_job(recipe, repo_root, tmp_path / "strict", too_long + ["on_error=raise"])


def test_prompt_files_are_read_as_jsonl_csv_and_text(recipe, tmp_path):
    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "w5 w6"}\n{"id": "b"}\n'
                                      '{"prompt": [{"role": "user", "content": "w7"}]}\n')
    (tmp_path / "p.csv").write_text("question,prompt\nq,w8 w9\n")
    (tmp_path / "p.txt").write_text("w10 w11\n\nw12\n")
    tok = word_tokenizer()
    got = {}
    for name in ("p.jsonl", "p.csv", "p.txt"):
        cfg = DataConfig(path=str(tmp_path / name), chat_template=False)
        data = recipe.PromptDataset(recipe.read_rows(cfg, 384), tok, cfg)
        got[name] = [(ex["id"], ex["prompt"], ex["input_ids"]) for ex in data]
    assert got["p.jsonl"] == [("a", "w5 w6", [5, 6]), ("b", "", []), (2, "w7", [7])]  # "b" has no prompt: invalid
    assert got["p.csv"] == [(0, "w8 w9", [8, 9])]
    assert got["p.txt"] == [(0, "w10 w11", [10, 11]), (2, "w12", [12])]
    with pytest.raises(ValueError, match="data=random"):
        recipe.PromptDataset([{"id": 0, "text": "hi"}], None, DataConfig())


def python(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the recipes find plugin/ themselves
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_sweep_runs_every_combination_and_collects_a_table_and_plot(repo_root, tmp_path):
    sweep = tmp_path / "sweep"
    sweep_args = ["batcher.mode=sync,async", "batcher.max_batch_tokens=32,128", f"hydra.sweep.dir={sweep}"]
    proc = python(os.path.join(repo_root, "recipes", "generate.py"), "-m", *TINY, *sweep_args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = python(os.path.join(repo_root, "recipes", "collect_sweep.py"), str(sweep), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(sweep / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert sorted((r["batcher.mode"], r["batcher.max_batch_tokens"]) for r in table) == [
        ("async", "128"), ("async", "32"), ("sync", "128"), ("sync", "32")]
    assert all(float(r["output_tokens_per_s"]) > 0 and r["requests"] == "10" for r in table)
    assert (sweep / "sweep.md").read_text().startswith("| run | batcher.mode | batcher.max_batch_tokens |")
    assert (sweep / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    outputs = [[r["token_ids"] for r in rows(sweep / str(n) / "predictions.jsonl")] for n in range(4)]
    assert all(o == outputs[0] for o in outputs)  # sync and async, any budget: the same greedy tokens


def test_ddp_through_hydra_merges_the_ranks_into_one_file(repo_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = python(os.path.join(repo_root, "recipes", "generate.py"), *TINY, "trainer=ddp_cpu",
                  f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = rows(run_dir / "predictions.jsonl")
    assert [r["index"] for r in out] == list(range(10)) and {r["rank"] for r in out} == {0, 1}
    assert not [p for p in os.listdir(run_dir) if ".rank" in p]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["requests"] == 10
