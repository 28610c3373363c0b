"""Our lm-eval backend against lm-eval's own ``hf`` backend on the same local checkpoint (CPU, fp32, offline): the same
generated strings, log-likelihoods within 1e-4, the same metrics, for generate_until, multiple_choice and
loglikelihood_rolling tasks read from local JSONL through task YAMLs."""

from __future__ import annotations

import math

import pytest

from lm_eval_helpers import evaluate, local_task_yamls, metrics, responses, smollm2_checkpoint, tiny_checkpoint

pytest.importorskip("lm_eval")

TASKS = ["local_gen", "local_mc", "local_ppl"]
LIMITS = {"smollm2": 3, "tiny": 4}  # the hf backend decodes SmolLM2 one document at a time, ~1 step/s on a CPU
CHECKPOINTS = {"smollm2": smollm2_checkpoint, "tiny": tiny_checkpoint}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return local_task_yamls(str(tmp_path_factory.mktemp("tasks")))


@pytest.fixture(scope="module")
def runs(task_dir):
    """Both backends on every task, per checkpoint, computed once: ``runs(name) -> (ours, hf)``."""
    done = {}

    def get(name):
        if name not in done:
            path = CHECKPOINTS[name]()
            ours = evaluate("async_batching", f"pretrained={path},dtype=float32,max_batch_tokens=256", TASKS,
                            task_dir, LIMITS[name])
            hf = evaluate("hf", f"pretrained={path},dtype=float32", TASKS, task_dir, LIMITS[name])
            done[name] = ours, hf
        return done[name]

    return get


@pytest.mark.parametrize("name", ["smollm2", "tiny"])
def test_generate_until_gives_the_hf_backends_strings_and_exact_match(runs, name):
    ours, hf = runs(name)
    assert responses(ours, "local_gen") == responses(hf, "local_gen")
    assert len(responses(ours, "local_gen")) == LIMITS[name]
    assert metrics(ours, "local_gen") == metrics(hf, "local_gen")


@pytest.mark.parametrize("name", ["smollm2", "tiny"])
def test_multiple_choice_loglikelihoods_match_the_hf_backend_within_1e4(runs, name):
    ours, hf = runs(name)
    got, want = responses(ours, "local_mc"), responses(hf, "local_mc")
    assert len(got) == LIMITS[name] and all(len(doc) == 4 for doc in got)  # 4 choices per document
    for doc_got, doc_want in zip(got, want):
        for [(ll, greedy)], [(ll_hf, greedy_hf)] in zip(doc_got, doc_want):
            assert abs(ll - ll_hf) < 1e-4 and greedy == greedy_hf
    assert metrics(ours, "local_mc") == metrics(hf, "local_mc")


@pytest.mark.parametrize("name", ["smollm2", "tiny"])
def test_rolling_loglikelihood_and_word_perplexity_match_the_hf_backend(runs, name):
    ours, hf = runs(name)
    got, want = responses(ours, "local_ppl"), responses(hf, "local_ppl")
    assert len(got) == LIMITS[name]
    for [[ll]], [[ll_hf]] in zip(got, want):
        assert abs(ll - ll_hf) < 1e-4
    ppl, ppl_hf = metrics(ours, "local_ppl")["word_perplexity,none"], metrics(hf, "local_ppl")["word_perplexity,none"]
    assert math.isclose(ppl, ppl_hf, rel_tol=1e-5)


def test_chat_template_and_multiturn_fewshot_prompts_and_outputs_match_the_hf_backend(task_dir):
    path = tiny_checkpoint()  # SmolLM2's tokenizer and chat template on a tiny random model
    kw = dict(apply_chat_template=True, fewshot_as_multiturn=True)
    ours = evaluate("async_batching", f"pretrained={path},dtype=float32", ["local_gen"], task_dir, 3, **kw)
    hf = evaluate("hf", f"pretrained={path},dtype=float32", ["local_gen"], task_dir, 3, **kw)
    prompts = [s["arguments"][0][0] for s in sorted(ours["samples"]["local_gen"], key=lambda s: s["doc_id"])]
    assert all(p.startswith("<|im_start|>") and p.count("<|im_start|>user") == 3 for p in prompts)  # 2 shots + doc
    assert prompts == [s["arguments"][0][0] for s in sorted(hf["samples"]["local_gen"], key=lambda s: s["doc_id"])]
    assert responses(ours, "local_gen") == responses(hf, "local_gen")
