"""Fused sibling projections (q/k/v, gate/up as one product each): exact tokens, the model restored afterwards, the
groups the probe rejects, engines sharing one fusion."""

import pytest
import torch
from torch import nn

from async_batching import ContinuousBatcher, SamplingParams
from async_batching import fused_projections as fp
from async_batching.models import TINY_CONFIGS, tiny_model
from engine_helpers import mixed_prompts, reference

# What fuses per architecture: (attention groups, MLP groups) per layer. phi3 and gpt_neox already hold one q/k/v
# weight (and phi3 one gate/up weight); gpt2 has Conv1D projections; MoE models' experts are no Linear pair.
FUSED_GROUPS = {"gpt2": 0, "phi3": 0, "gpt_neox": 0, "starcoder2": 1, "gpt_oss": 1, "mixtral": 1, "qwen3_moe": 1,
                "olmoe": 1}


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_fused_projections_give_generates_greedy_tokens_and_fuse_the_expected_groups(arch):
    model = tiny_model(arch)
    prompts = mixed_prompts(4, hi=40, seed=1)
    want = [reference(model, p, 6) for p in prompts]
    b = ContinuousBatcher(model, fuse_projections=True)
    layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
    assert b.runner.num_fused == FUSED_GROUPS.get(arch, 2) * layers
    out = b.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert [r.token_ids for r in out] == want
    b.close()


def _storages(model) -> set:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def test_closing_the_engine_restores_the_model_parameters_hooks_and_outputs():
    model = tiny_model("llama")
    params = dict(model.named_parameters())
    ids = torch.tensor([[5, 9, 11, 40]])
    with torch.no_grad():
        before = model(ids).logits
    n_storages = len(_storages(model))
    b = ContinuousBatcher(model, fuse_projections=True)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    assert len(_storages(model)) < n_storages  # views of the concatenations: no extra parameter memory
    with torch.no_grad():  # the model used directly while fused: the same logits
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
    b.close()
    assert dict(model.named_parameters()) == params  # the very same Parameter objects
    assert len(_storages(model)) == n_storages  # each a tensor of its own again
    assert "forward" not in attn.q_proj.__dict__ and "forward" not in model.model.layers[0].mlp.up_proj.__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_a_collection_inside_fusing_that_frees_a_dropped_engine_restores_its_model_without_deadlock(monkeypatch):
    """An engine dropped without close() inside a reference cycle is freed by whichever collection comes next, and its
    finalizer releases its model's fusion. That collection may run while another engine is fusing its own model
    (an allocation triggers it), inside the module's lock: the release must not wait on that lock (it deadlocked the
    thread), and the dropped engine's model must be restored."""
    import gc
    import threading
    import weakref

    from async_batching import gc_freeze

    monkeypatch.setattr(gc_freeze, "FREEZE", False)  # the dropped engine's cycle stays collectable
    first, second = tiny_model("llama"), tiny_model("qwen3")
    n_storages = len(_storages(first))
    dropped = ContinuousBatcher(first, fuse_projections=True, num_blocks=16)
    assert dropped.runner.num_fused > 0 and len(_storages(first)) < n_storages
    dropped.cycle = dropped
    runner = weakref.ref(dropped.runner)
    del dropped
    real_init = fp.FusedProjections.__init__

    def init_after_a_collection(self, model):
        gc.collect()  # as an allocation in here may trigger one
        real_init(self, model)

    monkeypatch.setattr(fp.FusedProjections, "__init__", init_after_a_collection)
    built = []
    t = threading.Thread(target=lambda: built.append(ContinuousBatcher(second, fuse_projections=True, num_blocks=16)),
                         daemon=True)
    t.start()
    t.join(120)
    assert built, "building an engine deadlocked in fused_projections"
    assert runner() is None and len(_storages(first)) == n_storages  # freed, and its model restored
    assert built[0].runner.num_fused > 0
    built[0].close()


def test_engines_on_one_model_share_the_fusion_and_the_last_close_restores_it():
    model = tiny_model("qwen3")
    prompts = mixed_prompts(3, hi=30, seed=4)
    want = [reference(model, p, 5) for p in prompts]
    a = ContinuousBatcher(model, fuse_projections=True)
    b = ContinuousBatcher(model, fuse_projections=True)
    assert a.runner.fused is b.runner.fused and b.runner.num_fused == a.runner.num_fused > 0
    q_proj = model.model.layers[0].self_attn.q_proj
    a.close()
    assert "forward" in q_proj.__dict__  # b still uses it
    assert [r.token_ids for r in b.generate(prompts, SamplingParams(max_new_tokens=5, ignore_eos=True))] == want
    b.close()
    assert "forward" not in q_proj.__dict__
    dropped = ContinuousBatcher(model, fuse_projections=True)
    assert "forward" in q_proj.__dict__
    del dropped  # an engine dropped without close() unfuses the model too
    assert "forward" not in q_proj.__dict__


class _Owner(nn.Module):
    """q/k/v projections; ``k_input`` decides what k_proj reads (the owner's input, or another tensor)."""

    def __init__(self, k_input):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
        self.k_input = k_input

    def forward(self, hidden_states):
        q, k, v = self.q_proj(hidden_states), self.k_proj(self.k_input(hidden_states)), self.v_proj(hidden_states)
        return torch.cat([q, k, v], dim=-1)


@pytest.mark.parametrize("k_input, fused", [(lambda x: x, 1), (lambda x: x * 1.0, 0), (lambda x: x[..., :], 0)])
def test_the_probe_keeps_a_group_only_if_every_projection_reads_the_owners_input(k_input, fused):
    """k_proj fed the owner's input fuses; fed another tensor (equal values, or a view) each call would compute the
    group's product anew, so the group is restored. Fused or not, every output equals the unfused module's."""
    torch.manual_seed(0)
    owner = _Owner(k_input)
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = owner(x)
        fusion = fp.FusedProjections(owner)
        assert len(fusion.groups) == 1
        owner(x)  # the probe
        assert fusion.verify() == fused
        torch.testing.assert_close(owner(x), want)
        torch.testing.assert_close(owner(torch.ones(2, 8)), _Owner.forward(owner, torch.ones(2, 8)))
        fusion.restore()
        assert "forward" not in owner.k_proj.__dict__
        torch.testing.assert_close(owner(x), want, rtol=0, atol=0)


def test_a_group_the_probe_never_reached_is_left_unfused():
    owner = _Owner(lambda x: x)
    fusion = fp.FusedProjections(owner)
    assert fusion.verify() == 0 and "forward" not in owner.q_proj.__dict__


def test_fuse_projections_is_off_on_cpu_by_default_and_rejects_bad_values():
    b = ContinuousBatcher(tiny_model("llama"))
    assert b.runner.num_fused == 0 and b.runner.fused is None
    with pytest.raises(ValueError, match="fuse_projections"):
        ContinuousBatcher(tiny_model("llama"), fuse_projections="yes")


def test_fused_projections_through_the_compiled_model_match_generate_and_compile_nothing_mid_run(monkeypatch):
    """compile=True (decode and, with the threshold at 1, prefill steps compiled): the hooks and the projections'
    slices trace into the compiled code; tokens equal generate's and no shape compiles during the run."""
    import async_batching.model_runner as mr
    from torch._dynamo.utils import counters

    monkeypatch.setattr(mr, "PREFILL_COMPILE_MIN_WORK", 1.0)
    model = tiny_model("qwen3")
    prompts = mixed_prompts(6, lo=1, hi=60, seed=8)
    want = [reference(model, p, 8) for p in prompts]
    b = ContinuousBatcher(model, compile=True, fuse_projections=True, max_batch_tokens=48)
    assert b.runner.num_fused == 2 * model.config.num_hidden_layers
    compiled = counters["stats"]["unique_graphs"]
    out = b.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert [r.token_ids for r in out] == want
    assert counters["stats"]["unique_graphs"] == compiled, "a shape compiled during the run"
    assert b.runner._compiled is not None and b.runner._compiled_prefill
    b.close()


def test_training_through_a_fused_model_gives_the_unfused_gradients_and_sees_in_place_updates():
    """RL rollouts train the model while an engine lives: with grad enabled each projection is its own product, so
    every Parameter gets its gradient; an optimizer's in-place update reaches the fused product (shared storage)."""
    torch.manual_seed(0)
    ref_model, model = tiny_model("llama"), tiny_model("llama")
    ids = torch.tensor([[5, 9, 11, 40, 7]])
    b = ContinuousBatcher(model, fuse_projections=True)
    for m in (ref_model, model):
        m.train()
        m(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for n, p in ref_model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * p.grad)  # an optimizer step, in place
        for p in ref_model.parameters():
            p.add_(0.01 * p.grad)
    prompt = [5, 9, 11, 40]
    want = reference(ref_model.eval(), prompt, 6)
    assert b.generate([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids == want
    b.close()
