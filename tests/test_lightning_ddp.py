"""DDP on two CPU processes (gloo): the predict sampler shards requests, each rank writes its own file, merged in order."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from engine_helpers import mixed_prompts, reference
from lightning_helpers import write_predict_script

NEW = 8


def test_ddp_two_cpu_ranks_shard_write_and_merge_in_dataset_order(tmp_path, repo_root, tiny_llama):
    prompts = mixed_prompts(13, lo=2, hi=30, seed=5)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    script = tmp_path / "predict_ddp.py"
    write_predict_script(script, repo_root, 'DDPStrategy(process_group_backend="gloo")', NEW)
    out = tmp_path / "out.jsonl"
    # A part left by an earlier, killed run on three ranks: its requests must be kept, not generated again.
    earlier = [{"index": i, "dataloader_idx": 0, "prompt": prompts[i], "output": None, "finish_reason": "length",
                "error": None, "prompt_len": len(prompts[i]), "token_ids": [1, 1, 1], "rank": 2} for i in (4, 9)]
    (tmp_path / "out.rank2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in earlier))

    args = [str(tmp_path / "prompts.json"), str(out), str(tmp_path / "s.json")]
    proc = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(prompts)))
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "predict_ddp.py", "prompts.json", "s.json"]  # parts merged
    assert {r["rank"] for r in rows} == {0, 1, 2}
    for r in rows:
        expected = [1, 1, 1] if r["index"] in (4, 9) else reference(tiny_llama, prompts[r["index"]], NEW, eos=2)
        assert r["token_ids"] == expected, r["index"]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["ranks"] == 2 and summary["requests"] == len(prompts) and summary["resumed"] == 2
