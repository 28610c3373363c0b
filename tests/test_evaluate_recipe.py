"""recipes/evaluate.py: config composition, sampling overrides -> gen_kwargs, a job's three outputs against lm-eval run
directly, pass@k from n samples, a sweep collected into metric columns and plots, two ranks through Lightning's
launcher, and the default job (built-in SmolLM2 on the bundled tasks)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

pytest.importorskip("lm_eval")

import async_batching.hydra_conf  # noqa: E402,F401  (registers the config schemas)
from async_batching.job_config import SamplingConfig  # noqa: E402
from lm_eval_helpers import evaluate, metrics, word_checkpoint, word_tasks  # noqa: E402

TASKS = "eval.tasks=[words_gen,words_mc,words_ppl]"


@pytest.fixture(scope="module")
def recipe(repo_root):
    spec = importlib.util.spec_from_file_location("evaluate_recipe", os.path.join(repo_root, "recipes", "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return word_tasks(str(tmp_path_factory.mktemp("word_tasks")))


def tiny_overrides(tasks_dir):
    return ["model=pretrained", f"model.name={word_checkpoint()}", "model.dtype=float32", "batcher=small",
            f"eval.include_path={tasks_dir}", TASKS, "eval.bootstrap_iters=0"]


def compose_job(repo_root, overrides):
    with initialize_config_dir(config_dir=os.path.join(repo_root, "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    return OmegaConf.to_object(cfg).validate(), cfg


def run_job(recipe, repo_root, run_dir, overrides):
    job, cfg = compose_job(repo_root, overrides)
    return recipe.run(job, cfg.trainer, str(run_dir), overrides)


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_default_config_is_the_builtin_model_on_the_bundled_examples_on_cpu(repo_root):
    job, cfg = compose_job(repo_root, [])
    assert job.model.name == "smollm2" and job.eval.tasks == ["toy_examples"] and job.eval.include_path is None
    assert cfg.trainer.accelerator == "cpu" and job.sampling.temperature == 0.0
    with pytest.raises(ValueError, match="eval.limit"):
        compose_job(repo_root, ["eval.limit=0"])


def test_every_eval_option_composes_into_the_typed_evaluate_job(repo_root):
    from async_batching.job_config import EvalConfig, EvaluateConfig

    names = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(repo_root, "conf", "eval")))
    assert {"examples", "gsm8k", "mmlu"} <= set(names)
    for name in names:
        job, cfg = compose_job(repo_root, [f"eval={name}"])
        assert isinstance(job, EvaluateConfig) and OmegaConf.get_type(cfg.eval) is EvalConfig and job.eval.tasks
    with pytest.raises(Exception, match="taskz"):
        compose_job(repo_root, ["eval.taskz=[x]"])  # a misspelt key fails at start-up, naming it


def test_sampling_values_set_by_the_user_become_gen_kwargs(recipe):
    assert recipe.gen_kwargs(SamplingConfig(), []) == {}  # the tasks' own generation settings rule
    assert recipe.gen_kwargs(SamplingConfig(temperature=0.7, top_p=0.9), ["sampling.temperature=0.7"]) == {
        "temperature": 0.7, "top_p": 0.9, "do_sample": True}
    # Named on the command line, a value equal to the default still overrides the tasks' value.
    assert recipe.gen_kwargs(SamplingConfig(), ["sampling.max_new_tokens=64", "sampling.temperature=0"]) == {
        "max_gen_toks": 64, "temperature": 0.0, "do_sample": False}
    assert recipe.gen_kwargs(SamplingConfig(stop=["\n\n"], n=8), []) == {"until": ["\n\n"]}  # n is repeats
    with pytest.raises(ValueError, match="logprobs"):
        recipe.gen_kwargs(SamplingConfig(logprobs=0), [])


def test_a_job_writes_lm_evals_results_samples_and_a_summary_equal_to_lm_eval_run_directly(recipe, repo_root,
                                                                                         tmp_path, tasks_dir, capsys):
    summary = run_job(recipe, repo_root, tmp_path, tiny_overrides(tasks_dir))
    results = json.loads((tmp_path / "results.json").read_text())
    direct = evaluate("async_batching", f"pretrained={word_checkpoint()},dtype=float32", ["words_gen", "words_mc",
                      "words_ppl"], tasks_dir, None)
    for task in ("words_gen", "words_mc", "words_ppl"):
        assert metrics(results, task) == pytest.approx(metrics(direct, task), rel=1e-6)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["metrics"]["words_gen/exact_match:strip"] == results["results"]["words_gen"]["exact_match,strip"]
    assert saved["metrics"]["words_ppl/word_perplexity"] == results["results"]["words_ppl"]["word_perplexity,none"]
    assert saved["metrics"]["words_mc/acc"] == results["results"]["words_mc"]["acc,none"]
    # 6 generation requests + 6 x 4 choices + 6 rolling documents, timed; the engine's counters come along.
    assert saved["requests"] == 6 + 24 + 6 and saved["requests_per_s"] > 0 and summary["ranks"] == 1
    assert saved["timings"]["generate_until"]["requests"] == 6 and saved["engine"]["prompt_tokens"] > 0
    assert saved["overrides"] == tiny_overrides(tasks_dir)
    out = rows(tmp_path / "samples.jsonl")
    assert [(r["task"], r["doc_id"]) for r in out] == [(t, i) for t in ("words_gen", "words_mc", "words_ppl")
                                                        for i in range(6)]
    gen = [r for r in out if r["task"] == "words_gen"]
    assert [r["output"] for r in gen] == [s["resps"][0][0] for s in sorted(
        direct["samples"]["words_gen"], key=lambda s: s["doc_id"])]
    assert all(set(r) >= {"prompt", "output", "target", "score"} and "exact_match:strip" in r["score"] for r in gen)
    assert "words_gen" in capsys.readouterr().out  # lm-eval's table is printed


def test_n_samples_per_document_give_pass_at_k_from_each_sample_scored_alone(recipe, repo_root, tmp_path,
                                                                            tiny_llama):
    """top_k=2 sampling: each sample is the greedy word or the runner-up, so some documents pass and some fail."""
    from engine_helpers import reference
    from lm_eval_helpers import word_tokenizer

    tok = word_tokenizer()
    folder = word_tasks(str(tmp_path / "tasks"), docs=8)
    questions = [json.loads(line)["question"] for line in open(os.path.join(folder, "words_gen.jsonl"))]
    targets = [tok.decode(reference(tiny_llama, tok.encode(q), 1, eos=2)) for q in questions]
    two_filters = [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]},
                   {"name": "digits", "filter": [{"function": "regex", "regex_pattern": "w(\\d+)"},
                                                 {"function": "take_first"}]}]  # "5" never equals "w5"
    folder = word_tasks(str(tmp_path / "tasks"), docs=8, gen_targets=targets,
                        words_gen={"generation_kwargs": {"until": ["<eos>"], "max_gen_toks": 1, "do_sample": False},
                                   "filter_list": two_filters})
    overrides = tiny_overrides(folder)[:-2] + ["eval.tasks=[words_gen]", "sampling.n=4", "sampling.temperature=1.0",
                                               "sampling.top_k=2"]
    summary = run_job(recipe, repo_root, tmp_path / "run", overrides)
    out = rows(tmp_path / "run" / "samples.jsonl")
    assert len(out) == 8 and all(len(r["output"]) == 4 for r in out)  # one row per document, both filters in it
    assert all(set(r["score"]) == {"exact_match:strip", "exact_match:digits"} for r in out)
    correct = []
    for r, target in zip(out, targets):
        mine = [float(o.strip() == target) for o in r["output"]]  # each sample scored on its own, by hand
        assert r["sample_scores"]["words_gen/exact_match:strip"] == mine
        correct.append(int(sum(mine)))
    assert 0 < sum(correct) < 32  # some samples right, some wrong
    for k in (1, 2, 4):
        want = sum(1 - math.comb(4 - c, k) / math.comb(4, k) for c in correct) / 8
        assert summary["metrics"][f"words_gen/exact_match:strip/pass@{k}"] == pytest.approx(want)
        assert summary["metrics"][f"words_gen/exact_match:digits/pass@{k}"] == 0.0


def python(*args, cwd):
    # The parent's PYTHONPATH goes along (the package this test imports); without one the recipes find plugin/.
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_a_sweep_over_sampling_collects_a_column_per_metric_and_metric_plots(repo_root, tmp_path, tasks_dir):
    sweep = tmp_path / "sweep"
    args = [*tiny_overrides(tasks_dir)[:-2], "eval.tasks=[words_gen,words_ppl]", "eval.limit=3",
            "sampling.temperature=0,0.9", f"hydra.sweep.dir={sweep}"]
    proc = python(os.path.join(repo_root, "recipes", "evaluate.py"), "-m", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = python(os.path.join(repo_root, "recipes", "collect_sweep.py"), str(sweep), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(sweep / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert sorted(r["sampling.temperature"] for r in table) == ["0", "0.9"]
    for r in table:
        summary = json.loads((sweep / r["run"] / "summary.json").read_text())
        assert float(r["words_ppl/word_perplexity"]) == pytest.approx(summary["metrics"]["words_ppl/word_perplexity"])
        assert r["words_gen/exact_match:strip"] != ""
    ppl = {r["sampling.temperature"]: float(r["words_ppl/word_perplexity"]) for r in table}
    assert ppl["0"] == pytest.approx(ppl["0.9"], rel=1e-6)  # scoring does not depend on the sampling knobs
    assert (sweep / "sweep_metrics.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("trainer,ranks,tp,rel", [("ddp_cpu", 2, 1, 1e-6), ("tp_cpu", 1, 2, 1e-5)])
def test_two_cpu_processes_through_lightnings_launcher_give_the_single_process_metrics(recipe, repo_root, tmp_path,
                                                                                      tasks_dir, trainer, ranks, tp,
                                                                                      rel):
    """``trainer=ddp_cpu``: two engines, lm-eval shards the documents over two ranks. ``trainer=tp_cpu``: the engine
    splits the model over the two processes (one group) and lm-eval sees one data-parallel rank. Either way every
    document once and the single process's metrics."""
    one = run_job(recipe, repo_root, tmp_path / "one", tiny_overrides(tasks_dir))
    run_dir = tmp_path / trainer
    proc = python(os.path.join(repo_root, "recipes", "evaluate.py"), *tiny_overrides(tasks_dir), f"trainer={trainer}",
                  f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((run_dir / "summary.json").read_text())
    assert got["ranks"] == ranks and got["batcher"]["tensor_parallel_size"] == tp
    assert got["requests"] == one["requests"]
    assert json.loads((run_dir / "results.json").read_text())["config"]["parallelism"]["tensor_parallel_size"] == tp
    assert got["metrics"] == pytest.approx(one["metrics"], rel=rel)
    assert len(rows(run_dir / "samples.jsonl")) == 18


def test_the_default_job_runs_the_builtin_model_on_the_bundled_example_tasks(recipe, repo_root, tmp_path):
    summary = run_job(recipe, repo_root, tmp_path, ["eval.limit=2"])
    names = set(summary["metrics"])
    assert {"toy_arithmetic/exact_match:strip", "toy_capitals/acc", "toy_capitals/acc_norm",
            "toy_paragraphs/word_perplexity"} <= names
    assert summary["requests"] == 2 + 2 * 4 + 2 and summary["model"] == "smollm2"
    assert 1 < summary["metrics"]["toy_paragraphs/word_perplexity"] < 1000  # a trained model, unlike the tiny ones
