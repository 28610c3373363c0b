"""Model coverage on CPU: sliding windows crossed mid-generation, and decode-graph capture that falls back to eager
decode (the capture's CUDA calls replaced by stand-ins, a forward hook playing the model's host sync)."""

import contextlib
import logging
import random

import pytest
import torch

from async_batching import ContinuousBatcher, SamplingParams
from async_batching.model_runner import _experts_candidates
from async_batching.models import tiny_model
from engine_helpers import mixed_prompts, reference

MOE = ["gpt_oss", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]
RUNNER_LOG = "async_batching.model_runner"


@pytest.mark.parametrize("arch", ["mistral", "gemma3", "gpt_oss"])
def test_prompts_around_the_sliding_window_match_generate(arch):
    """Prompts just below, at and past the window, and decodes that cross it, with chunked prefill and preemption."""
    model = tiny_model(arch)
    window = model.config.sliding_window
    rng = random.Random(0)
    lengths = [window - 4, window - 1, window, window + 1, 2 * window + 1]
    prompts = [[rng.randrange(3, 384) for _ in range(n)] for n in lengths]
    refs = [reference(model, p, 16) for p in prompts]
    b = ContinuousBatcher(model, max_num_seqs=4, max_batch_tokens=32, block_size=8, num_blocks=14)
    results = b.generate(prompts, SamplingParams(max_new_tokens=16, ignore_eos=True))
    assert [r.token_ids for r in results] == refs
    assert b.stats["preemptions"] > 0 and b.all_blocks_free()


@pytest.mark.parametrize("arch", MOE)
def test_moe_models_can_switch_to_transformers_batched_experts(arch):
    """Capture tries the model's experts first, then transformers' device-only ones; dense models only their own."""
    model = tiny_model(arch)
    assert model.config._experts_implementation == "grouped_mm"
    assert _experts_candidates(model) == [None, "batched_mm"]
    assert _experts_candidates(tiny_model("llama")) == [None]


class _Stream:
    """Stands in for the capture stream."""

    def synchronize(self):
        pass


@pytest.fixture
def cpu_capture(monkeypatch):
    """CPU stand-ins for the CUDA calls of capture_graphs: streams, torch's sync-debug mode (its state is returned),
    and a graph capture that fails."""
    state = {"mode": 0}
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: state["mode"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: state.update(mode=mode))

    def graph_pool_handle():
        raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture unless the CPU tensor "
                           "is pinned\nsecond line of the error")

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", graph_pool_handle)
    return state


def host_sync(state, when=lambda module: True):
    """A forward pre-hook that raises as torch does for a host sync while sync-debug mode is 'error'."""
    def hook(module, args):
        if state["mode"] == "error" and when(module):
            raise RuntimeError("called a synchronizing CUDA operation")
    return hook


def _capture_then_generate(model, caplog):
    """capture_graphs on a CPU batcher, then generate (exact, no graph step); returns the batcher and runner logs."""
    prompts = mixed_prompts(6, hi=60, seed=5)
    refs = [reference(model, p, 10) for p in prompts]
    b = ContinuousBatcher(model, max_num_seqs=4, max_batch_tokens=32, block_size=8, num_blocks=14)
    with caplog.at_level(logging.INFO, logger=RUNNER_LOG):
        b.runner.capture_graphs(4, _Stream())
    results = b.generate(prompts, SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert [r.token_ids for r in results] == refs
    assert b.stats["graph_steps"] == 0 and b.stats["preemptions"] > 0
    return b, [r for r in caplog.records if r.name == RUNNER_LOG]


def test_a_decode_step_that_syncs_with_the_host_falls_back_to_eager_decode(cpu_capture, caplog):
    model = tiny_model("llama")
    model.model.layers[1].mlp.register_forward_pre_hook(host_sync(cpu_capture))
    b, records = _capture_then_generate(model, caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert message.startswith("LlamaForCausalLM: CUDA graphs off, decode steps run eagerly: ")
    assert "RuntimeError: called a synchronizing CUDA operation (at tests/test_model_coverage.py:" in message
    assert "in hook)" in message
    # Nothing of the attempt is left: no graphs, no pool, sync-debug mode and attention implementation restored.
    assert b.runner.graphs == {} and b.runner.graph_pool is None
    assert cpu_capture["mode"] == 0 and model.config._attn_implementation != "async_batching_paged"


def test_moe_capture_runs_batched_experts_and_a_failed_capture_restores_the_models_own(cpu_capture, caplog):
    """grouped_mm syncs (torch's grouped GEMM outside bf16 on sm90/sm100): batched_mm is chosen for the graphs; the
    capture then fails, which logs one warning with the error's first line, and the model keeps grouped_mm."""
    model = tiny_model("qwen2_moe")
    experts = [m for m in model.modules() if type(m).__name__ == "Qwen2MoeExperts"]
    assert experts
    for m in experts:
        m.register_forward_pre_hook(host_sync(cpu_capture, lambda m: m.config._experts_implementation == "grouped_mm"))
    b, records = _capture_then_generate(model, caplog)
    assert [r.levelno for r in records] == [logging.INFO, logging.WARNING]
    assert records[0].getMessage().startswith(
        "Qwen2MoeForCausalLM: decode graphs run the experts with transformers' 'batched_mm' (RuntimeError: called a "
        "synchronizing CUDA operation (at tests/test_model_coverage.py:")
    warning = records[1].getMessage()
    assert warning.startswith(
        "Qwen2MoeForCausalLM: CUDA graphs off, decode steps run eagerly: RuntimeError: Cannot copy between CPU and "
        "CUDA tensors during CUDA graph capture unless the CPU tensor is pinned (at tests/test_model_coverage.py:")
    assert warning.endswith(" in graph_pool_handle)")
    assert model.config._experts_implementation == "grouped_mm"
    assert b.runner.graphs == {} and b.runner.graph_pool is None and cpu_capture["mode"] == 0
