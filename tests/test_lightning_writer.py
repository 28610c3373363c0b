"""The JSONL writer's file handling: torn lines, merging per-rank parts, starting afresh."""

from __future__ import annotations

import json
from types import SimpleNamespace

from async_batching.lightning.writer import JsonlPredictionWriter, merge_jsonl, repair_tail


def line(index, error=None, tokens=(1,)):
    return json.dumps({"index": index, "dataloader_idx": 0, "prompt": [index], "error": error,
                       "finish_reason": "error" if error else "length", "token_ids": list(tokens)}) + "\n"


def indices(path):
    return [json.loads(x)["index"] for x in path.read_text().splitlines()]


def test_repair_tail_cuts_only_a_torn_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(line(0) + line(1) + '{"index": 2, "prom')
    repair_tail(str(path))
    assert indices(path) == [0, 1]
    repair_tail(str(path))  # whole lines are left alone
    assert indices(path) == [0, 1]


def test_merge_orders_by_dataset_index_and_prefers_a_success_over_an_error(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(line(3) + line(1, error="ValueError: bad"))
    (tmp_path / "out.rank0.jsonl").write_text(line(2) + line(1, tokens=(7, 7)))
    (tmp_path / "out.rank1.jsonl").write_text(line(0) + line(3, tokens=(9,)) + '{"index": 4')  # torn tail ignored
    assert merge_jsonl(str(out)) == 4
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["token_ids"] == [7, 7] and rows[3]["token_ids"] == [1]  # success wins; else the first line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_resume_false_starts_afresh_without_stale_parts(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(line(0))
    for rank in (0, 1, 2):
        (tmp_path / f"out.rank{rank}.jsonl").write_text(line(10 + rank))
    writer = JsonlPredictionWriter(out, resume=False)
    writer.setup(SimpleNamespace(global_rank=0, world_size=1), None, "predict")
    assert writer.num_previous == 0
    writer.on_predict_end(None, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"] and out.read_text() == ""

    out.write_text(line(5))
    writer = JsonlPredictionWriter(out)  # resume: the earlier line counts
    writer.setup(SimpleNamespace(global_rank=0, world_size=1), None, "predict")
    assert writer.num_previous == 1
    writer.teardown(None, None, "predict")
