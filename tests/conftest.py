"""Shared fixtures. Makes ``plugin/`` importable when the package is not installed (a bare checkout)."""

from __future__ import annotations

import os
import sys

# One GPU per pytest-xdist worker when AB_TEST_GPUS=k is set (run_on_h200.sh tests with GPU_TESTS_WORKERS=k on a
# machine of k GPUs): worker gwN sees GPU N % k only. Set before anything asks CUDA for its devices.
if os.environ.get("AB_TEST_GPUS") and os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):
    os.environ["CUDA_VISIBLE_DEVICES"] = str(int(os.environ["PYTEST_XDIST_WORKER"][2:]) % int(os.environ["AB_TEST_GPUS"]))

import torch  # noqa: E402

# Without CUDA, Triton kernels run in its CPU interpreter, which must be chosen before anything imports triton
# (lightning does); tests/test_triton_attention.py relies on it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import async_batching  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(REPO, "plugin"))


def pytest_collection_modifyitems(config, items):
    """AB_TEST_SHARD=i/n (run_on_h200.sh tests, GPU_TESTS_SHARD): keep every n-th selected test from the i-th, so a
    suite longer than one device call runs as n calls."""
    shard = os.environ.get("AB_TEST_SHARD")
    if not shard:
        return
    i, n = (int(x) for x in shard.split("/"))
    if not 1 <= i <= n:
        raise pytest.UsageError(f"AB_TEST_SHARD={shard}: want i/n with 1 <= i <= n")
    kept = [item for k, item in enumerate(items) if k % n == i - 1]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


class _Resume:
    """AB_TEST_RESUME=k (run_on_h200.sh tests, GPU_TESTS_RESUME): drop the first k tests left after every other
    selection (the shard, -m, -k), to finish a shard that a time limit cut after its k-th test."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        k = int(os.environ.get("AB_TEST_RESUME") or 0)
        if k:
            config.hook.pytest_deselected(items=items[:k])
            items[:] = items[k:]


def pytest_configure(config):
    config.pluginmanager.register(_Resume(), "ab_test_resume")


def pytest_runtest_logreport(report):
    """AB_INSTAFAIL=1: a failure's traceback is printed as soon as it happens, not in the summary at the end, which a
    device call's time limit may never reach."""
    if report.failed and os.environ.get("AB_INSTAFAIL") == "1":
        sys.stdout.write(f"\n===== FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n=====\n")
        sys.stdout.flush()


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO


@pytest.fixture(scope="session")
def tiny_llama():
    """One tiny random llama (vocab 384, eos 2) shared by the tests that only read it."""
    from async_batching.models import tiny_model

    return tiny_model("llama")


@pytest.fixture(autouse=True)
def lm_eval_templates_as_released():
    """Our entry points make lm-eval compile its templates once for the whole process (``cache_templates``): each
    test starts and ends with lm-eval's own ``apply_template``, whichever entry point an earlier test ran."""
    utils = sys.modules.get("lm_eval.utils")
    original = getattr(utils, "apply_template", None) if utils is not None else None
    original = getattr(original, "__wrapped__", original)
    if original is not None:
        utils.apply_template = original
    yield
    utils = sys.modules.get("lm_eval.utils")
    if utils is not None:
        utils.apply_template = getattr(utils.apply_template, "__wrapped__", utils.apply_template)


@pytest.fixture(autouse=True)
def prefill_graphs_at_test_sizes(request, monkeypatch):
    """GPU tests: prefill graphs (on by default on CUDA) get buckets down to 8 tokens, in steps of 8, so the test
    engines' budgets of 32-256 tokens replay their prefill and mixed steps from graphs as a real job's do (the default
    smallest bucket, 512 tokens, is larger than most of them)."""
    if request.node.get_closest_marker("gpu") is not None:
        import async_batching.model_runner as mr

        monkeypatch.setattr(mr, "PREFILL_GRAPH_ROUND", 8)
        monkeypatch.setattr(mr, "PREFILL_GRAPH_MIN_TOKENS", 8)
    yield
