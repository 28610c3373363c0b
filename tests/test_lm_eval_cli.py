"""``python -m async_batching.lm_eval``: lm-eval's own command line with our model registered, run data-parallel over
two CPU processes by torchrun; rank 0's results equal one process's."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from lm_eval_helpers import evaluate, metrics, responses, word_checkpoint, word_tasks  # noqa: E402

TASKS = ["words_gen", "words_mc", "words_ppl"]


def _torchrun_cli(repo_root, tmp_path, ranks: int, model_args: str, tasks: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), os.path.join(repo_root, "plugin")) if p)
    env = dict(os.environ, PYTHONPATH=path, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "-m",
           "async_batching.lm_eval", "--model", "async_batching", "--model_args", model_args, "--tasks", *TASKS,
           "--include_path", tasks, "--device", "cpu", "--log_samples", "--output_path", str(tmp_path / "out")]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_the_command_line_on_two_ranks_gives_the_single_process_results(repo_root, tmp_path):
    tasks = word_tasks(str(tmp_path / "tasks"), docs=5)  # odd: lm-eval pads rank 1's share
    model_args = f"pretrained={word_checkpoint()},dtype=float32,max_batch_tokens=128,num_blocks=128"
    proc = _torchrun_cli(repo_root, tmp_path, 2, model_args, tasks)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    [path] = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
    two = json.loads(open(path).read())
    one = evaluate("async_batching", model_args, TASKS, tasks, None)
    for task in TASKS:
        assert two["n-samples"][task]["effective"] == 5
        assert metrics(two, task) == pytest.approx(metrics(one, task), rel=1e-6)
    samples = {}
    for task in TASKS:
        [file] = glob.glob(str(tmp_path / "out" / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        rows = sorted((json.loads(line) for line in open(file)), key=lambda s: s["doc_id"])
        # The first response of each request: lm-eval pads the shorter rank with a copy of its last request, whose
        # response lands on that same document a second time.
        samples[task] = [[resps[0] for resps in s["resps"]] for s in rows]
    first = {task: [[resps[0] for resps in doc] for doc in responses(one, task)] for task in TASKS}
    assert samples["words_gen"] == first["words_gen"]
    saved = [float(ll) for ll in sum(samples["words_ppl"], [])]  # the samples file holds them as text
    assert saved == pytest.approx(sum(first["words_ppl"], []), abs=1e-5)


@pytest.mark.parametrize("ranks", [2, 4])
def test_tensor_parallel_groups_of_two_give_the_single_process_results_once(repo_root, tmp_path, ranks):
    """``tensor_parallel_size=2`` over 2 processes (one group) and over 4 (two groups, TP x DP): lm-eval sees one
    data-parallel rank per group, every document is evaluated once, one results file is written, and the metrics
    and responses equal one unsharded process's."""
    tasks = word_tasks(str(tmp_path / "tasks"), docs=5)
    base = f"pretrained={word_checkpoint()},dtype=float32,max_batch_tokens=128,num_blocks=128"
    proc = _torchrun_cli(repo_root, tmp_path, ranks, base + ",tensor_parallel_size=2", tasks)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    [path] = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
    got = json.loads(open(path).read())
    heads = json.load(open(os.path.join(base.split(",")[0].split("=")[1], "config.json")))["num_key_value_heads"]
    assert got["config"]["parallelism"] == {"tensor_parallel_size": 2, "data_parallel_size": ranks // 2,
                                            "kv_heads_per_rank": heads // 2}, "the model was split over each group"
    one = evaluate("async_batching", base, TASKS, tasks, None)
    for task in TASKS:
        assert got["n-samples"][task]["effective"] == 5
        assert metrics(got, task) == pytest.approx(metrics(one, task), rel=1e-5)
        [file] = glob.glob(str(tmp_path / "out" / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        rows = [json.loads(line) for line in open(file)]
        doc_ids = sorted(s["doc_id"] for s in rows)
        if ranks == 2:  # one data-parallel rank: no padding, each document once
            assert doc_ids == list(range(5))
        else:  # two: lm-eval pads the shorter shard with a copy of its last document, as with plain DP
            assert sorted(set(doc_ids)) == list(range(5))
    gen = {s["doc_id"]: s["resps"][0][0] for s in map(json.loads, open(glob.glob(
        str(tmp_path / "out" / "**" / "samples_words_gen_*.jsonl"), recursive=True)[0]))}
    assert [gen[i] for i in range(5)] == [doc[0][0] for doc in responses(one, "words_gen")]


def test_cache_templates_compiles_each_template_once_and_renders_lm_eval_s_text(monkeypatch):
    import lm_eval.utils

    from async_batching import lm_eval as ours

    released = lm_eval.utils.apply_template
    monkeypatch.setattr(lm_eval.utils, "apply_template", released)  # restored after the test
    docs = [{"question": "2 + 3?", "answer": "5"}, {"question": "Why {{ not }}?", "answer": ""}]
    templates = ("Question: {{question}}\nAnswer:", "{{answer}}", "{{question | regex_replace('\\d', '#')}}")
    want = {(t, i): released(t, doc) for t in templates for i, doc in enumerate(docs)}
    compiles = []
    real_from_string = lm_eval.utils.env.from_string
    monkeypatch.setattr(lm_eval.utils.env, "from_string", lambda t: compiles.append(t) or real_from_string(t))
    monkeypatch.delenv(ours.TEMPLATE_CACHE_ENV, raising=False)
    assert ours.cache_templates() and ours.cache_templates()  # idempotent: wrapped once
    for _ in range(3):
        for template in templates:
            for i, doc in enumerate(docs):
                assert lm_eval.utils.apply_template(template, doc) == want[template, i]
    assert compiles == list(templates)  # each compiled once, at its first render


def test_cache_templates_is_off_with_the_environment_switch_and_on_in_the_command_line(monkeypatch):
    import lm_eval.utils

    from async_batching import lm_eval as ours

    released = lm_eval.utils.apply_template
    monkeypatch.setattr(lm_eval.utils, "apply_template", released)
    monkeypatch.setenv(ours.TEMPLATE_CACHE_ENV, "0")
    assert ours.cache_templates() is False and lm_eval.utils.apply_template is released
    monkeypatch.delenv(ours.TEMPLATE_CACHE_ENV)
    with pytest.raises(SystemExit):
        ours.main(["--help"])
    assert lm_eval.utils.apply_template is not released


def test_building_the_backend_compiles_lm_eval_templates_once_unless_switched_off(monkeypatch, tiny_llama):
    """``lm_eval.simple_evaluate(model="async_batching")`` users get the template cache too: building the backend puts
    it in place (same text), and the environment switch keeps lm-eval's own function."""
    import lm_eval.utils

    from async_batching import lm_eval as ours
    from lm_eval_helpers import word_tokenizer

    released = lm_eval.utils.apply_template
    monkeypatch.setattr(lm_eval.utils, "apply_template", released)
    monkeypatch.setenv(ours.TEMPLATE_CACHE_ENV, "0")
    ours.AsyncBatchingLM(pretrained=tiny_llama, tokenizer=word_tokenizer(), num_blocks=16).close()
    assert lm_eval.utils.apply_template is released
    monkeypatch.delenv(ours.TEMPLATE_CACHE_ENV)
    ours.AsyncBatchingLM(pretrained=tiny_llama, tokenizer=word_tokenizer(), num_blocks=16).close()
    assert lm_eval.utils.apply_template is not released
    assert lm_eval.utils.apply_template.__wrapped__ is released
    assert lm_eval.utils.apply_template("Q: {{q}}", {"q": "x"}) == released("Q: {{q}}", {"q": "x"})
