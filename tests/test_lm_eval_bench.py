"""recipes/bench/eval_bench.py end to end on CPU with a tiny model: both workloads through lm-eval with our backend and
with lm-eval's hf backend, each in its own process, into one table and one JSON file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from lm_eval_helpers import word_checkpoint  # noqa: E402


def test_eval_bench_times_both_backends_on_both_workloads_with_the_same_metrics(repo_root, tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, os.path.join(repo_root, "recipes", "bench", "eval_bench.py"), "--out", str(out),
           "--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--docs", "3", "--max-gen-toks", "4",
           "--engine-args", "max_batch_tokens=512,num_blocks=256", "--timeout-s", "300",
           "--tokenizer", word_checkpoint()]  # a word-level tokenizer: loads at once (the default reads the GGUF)
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((out / "eval_bench.json").read_text())["results"]
    assert [(r["workload"], r["backend"]) for r in rows] == [("e1", "ours"), ("e1", "hf"), ("e2", "ours"), ("e2", "hf")]
    assert all("error" not in r and r["wall_s"] > 0 and r["requests_per_s"] > 0 for r in rows), rows
    by = {(r["workload"], r["backend"]): r for r in rows}
    assert by["e1", "ours"]["requests"] == by["e1", "hf"]["requests"] == 3  # three generation documents
    assert by["e2", "ours"]["requests"] == by["e2", "hf"]["requests"] == 12  # three documents x four choices
    for w in ("e1", "e2"):  # fp32 on a CPU: both backends score the same
        ours, hf = by[w, "ours"]["metrics"], by[w, "hf"]["metrics"]
        assert ours.keys() == hf.keys() and all(ours[t] == pytest.approx(hf[t]) for t in ours)
        assert by[w, "ours"]["speedup_vs_hf"] > 0 and by[w, "hf"]["speedup_vs_hf"] == 1.0
    assert 600 < by["e1", "ours"]["mean_prompt_tokens"] < 1000  # 8-shot prompts of about 800 tokens
    for r in rows:  # simple_evaluate split: inside the backend's request calls (ours: the engine's part too) and outside
        assert 0 < r["backend_s"] < r["wall_s"] and r["outside_backend_s"] == pytest.approx(r["wall_s"] - r["backend_s"])
    assert 0 < by["e1", "ours"]["engine_s"] <= by["e1", "ours"]["backend_s"]
    assert 0 < by["e2", "ours"]["engine_s"] <= by["e2", "ours"]["backend_s"]
    assert set(by["e1", "hf"]["backend_calls_s"]) == {"generate_until"}
    assert set(by["e2", "hf"]["backend_calls_s"]) == {"loglikelihood"}
    table = (out / "eval_bench.md").read_text()
    assert "| e1 | ours | 3 | 3 |" in table and "| e2 | hf | 3 | 12 |" in table


def test_cached_templates_render_what_lm_eval_renders(repo_root, monkeypatch):
    """--cache-templates: each template compiled once, the same text out (lm-eval compiles on every call)."""
    import lm_eval.utils

    monkeypatch.syspath_prepend(os.path.join(repo_root, "recipes"))
    from bench.eval_bench import cache_templates

    released = lm_eval.utils.apply_template
    monkeypatch.setattr(lm_eval.utils, "apply_template", released)  # restored after the test
    cache_templates()
    docs = [{"question": "2 + 3?", "answer": "5"}, {"question": "Why {{ not }}?", "answer": ""}]
    for template in ("Question: {{question}}\nAnswer:", "{{answer}}", "{{question | regex_replace('\\d', '#')}}"):
        for doc in docs:
            assert lm_eval.utils.apply_template(template, doc) == released(template, doc)
    assert lm_eval.utils.apply_template is not released
