"""Shared fixtures. Makes ``plugin/`` importable when the package is not installed (a bare checkout)."""

from __future__ import annotations

import os
import sys

import torch

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


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO


@pytest.fixture(scope="session")
def tiny_llama():
    """One tiny random llama (vocab 384, eos 2) shared by the tests that only read it."""
    from async_batching.models import tiny_model

    return tiny_model("llama")
