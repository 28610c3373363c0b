"""The fused MLP tail pass (``fused_mlp``): in a compiled decoder layer, ``down(silu(gate) * up)`` and the residual add
after it become one ``silu_mul_mm`` op; layers without that pattern are left alone; an engine built with the pass
gives generate's greedy tokens. On CPU the op runs its torch arithmetic (the Triton kernel: test_triton_fused_mlp.py)."""

import pytest
import torch

from async_batching import ContinuousBatcher, SamplingParams, fused_mlp
from async_batching.models import tiny_model
from engine_helpers import mixed_prompts, reference

OP = torch.ops.async_batching.silu_mul_mm.default


def _compile_layer(layer, seen):
    def spy(graph):
        fused_mlp.rewrite(graph)
        seen.append([(n.target, n.args) for n in graph.nodes if n.op == "call_function"])

    return torch.compile(layer._call_impl, dynamic=True, options={"post_grad_custom_post_pass": spy,
                                                                   "fx_graph_cache": False})


def _layer_io(model, tokens):
    x = torch.randn(1, tokens, model.config.hidden_size)
    return x, model.model.rotary_emb(x, torch.arange(tokens)[None])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_pass_makes_silu_mul_down_product_and_residual_add_one_op(arch):
    torch._dynamo.reset()
    model = tiny_model(arch)
    layer, seen = model.model.layers[0], []
    fn = _compile_layer(layer, seen)
    for tokens in (5, 9):  # two sizes through the one dynamic-shape graph
        x, pos = _layer_io(model, tokens)
        with torch.inference_mode():
            got, want = fn(x, position_embeddings=pos, attention_mask=None), layer(x, position_embeddings=pos,
                                                                                    attention_mask=None)
        got, want = (t[0] if isinstance(t, tuple) else t for t in (got, want))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (nodes,) = seen
    fused = [args for target, args in nodes if target == OP]
    assert len(fused) == 1 and fused[0][3] is not None  # one op a layer, the residual add taken in
    silu_like = {torch.ops.aten.silu.default, torch.ops.aten.exp.default, torch.ops.aten.sigmoid.default}
    assert not [t for t, _ in nodes if t in silu_like], "the activation is still computed outside the op"
    # the layer's other products (q/k/v, o, gate, up) stay plain products
    assert sum(t == torch.ops.aten.mm.default for t, _ in nodes) == 6


def test_pass_leaves_a_gelu_mlp_alone():
    torch._dynamo.reset()
    model = tiny_model("llama", hidden_act="gelu")
    layer, seen = model.model.layers[0], []
    x, pos = _layer_io(model, 6)
    with torch.inference_mode():
        got = _compile_layer(layer, seen)(x, position_embeddings=pos, attention_mask=None)
        want = layer(x, position_embeddings=pos, attention_mask=None)
    torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, want[0] if isinstance(want, tuple) else want,
                               rtol=1e-5, atol=1e-5)
    assert not [t for t, _ in seen[0] if t == OP]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_engine_with_the_fused_tail_gives_generates_tokens(arch, monkeypatch):
    """``FUSE_MLP_TAIL`` on: every compiled graph of the engine (decode and prefill steps) has its MLP tail fused, and
    greedy tokens equal generate's in both modes."""
    monkeypatch.setattr(fused_mlp, "FUSE_MLP_TAIL", True)
    torch._dynamo.reset()
    model = tiny_model(arch)
    prompts = mixed_prompts(6, lo=1, hi=40, seed=3)
    want = [reference(model, p, 8) for p in prompts]
    before = fused_mlp.FusedMlpPass.rewrites
    for mode in ("sync", "async"):
        b = ContinuousBatcher(model, mode=mode, compile=True, max_batch_tokens=48)
        out = b.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
        assert [r.token_ids for r in out] == want, mode
        b.close()
    assert fused_mlp.FusedMlpPass.rewrites > before  # the compiles did rewrite their layers


def test_the_pass_is_only_in_the_engines_compiles_when_turned_on(monkeypatch):
    from async_batching import compiled_layers

    model = tiny_model("llama")
    assert fused_mlp.FUSE_MLP_TAIL is False and fused_mlp.compile_options() == {}
    monkeypatch.setattr(fused_mlp, "FUSE_MLP_TAIL", True)
    assert fused_mlp.compile_options() == {"post_grad_custom_post_pass": fused_mlp.PASS}
    assert fused_mlp.PASS.uuid() == fused_mlp.FusedMlpPass().uuid() and len(fused_mlp.PASS.uuid()) == 64
    assert compiled_layers.CompiledLayers(model, dynamic=True)._fns  # builds with the option
