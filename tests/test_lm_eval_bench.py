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
    table = (out / "eval_bench.md").read_text()
    assert "| e1 | ours | 3 | 3 |" in table and "| e2 | hf | 3 | 12 |" in table
