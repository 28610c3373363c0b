"""A compiler pass that runs a gated MLP's tail, ``down(silu(gate) * up)`` and the residual add after it, as one op.

transformers' Llama-family MLP is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` and its decoder layer adds the
residual stream to the result. Compiled, that is three kernels a layer after the gate/up product: inductor's
silu-mul (which writes the ``[tokens, intermediate]`` activation), the down product (cuBLAS, which reads it back) and
the residual add. On W1's decode step (512 rows, 30 layers) they cost about 4.6 + 5.8 + 2.3 us a layer, most of it a
kernel's fixed time; on a 65k-token prefill step the silu-mul alone took 7.1 ms (H200, ``step_probe``).

``FusedMlpPass`` is an inductor post-grad pass (``post_grad_custom_post_pass``, set by ``compiled_layers`` when
``FUSE_MLP_TAIL`` is on): in each compiled graph it finds ``mm(silu(G) * U, B)``, optionally followed by ``R + that``,
where nothing else reads the activation or the product, and replaces them with ``async_batching::silu_mul_mm(G, U,
B, R)``: on CUDA the Triton kernel of ``triton_fused_mlp``, elsewhere the same arithmetic in torch. The model's code is
unchanged: the pass rewrites what the compiler made of it, and a graph that does not have the pattern (another
activation, a bias, MoE experts) is left as it was. ``silu`` is matched as inductor leaves it (``aten.silu``) or as its
decomposition (``x / (1 + exp(-x))`` or ``x * sigmoid(x)``, in fp32 between two dtype conversions).
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
import torch.nn.functional as F

# Off: a benchmark variant (``ours_async_fused_mlp``) turns it on to measure it; read when an engine is built.
FUSE_MLP_TAIL = False

aten = torch.ops.aten
prims = torch.ops.prims


@torch.library.custom_op("async_batching::silu_mul_mm", mutates_args=())
def silu_mul_mm(g: torch.Tensor, u: torch.Tensor, b: torch.Tensor, r: Optional[torch.Tensor]) -> torch.Tensor:
    """``(silu(g) * u) @ b``, plus ``r`` when given: ``g``, ``u`` ``[M, K]``, ``b`` ``[K, N]``, ``r`` ``[M, N]``."""
    if g.is_cuda:
        from . import triton_fused_mlp

        return triton_fused_mlp.silu_mul_mm(g, u, b, r)
    act = (F.silu(g.float()) * u.float()).to(g.dtype)
    out = act @ b
    return out if r is None else (out.float() + r.float()).to(out.dtype)


@silu_mul_mm.register_fake
def _(g, u, b, r):
    return g.new_empty((g.shape[0], b.shape[1]))


def _is(node, *targets) -> bool:
    return getattr(node, "op", None) == "call_function" and node.target in targets


def _strip_convert(node):
    """The node under a ``convert_element_type`` (or ``_to_copy``), else the node."""
    if _is(node, prims.convert_element_type.default, aten._to_copy.default):
        return node.args[0]
    return node


def _silu_input(node):
    """``G`` if ``node`` computes ``silu(G)`` (one of the forms in the module docstring), else None."""
    node = _strip_convert(node)
    if _is(node, aten.silu.default):
        return node.args[0]
    if _is(node, aten.div.Tensor) and len(node.args) == 2:
        x, den = node.args
        # den = 1 + exp(-x) (either operand order of the add)
        if _is(den, aten.add.Tensor) and 1 in den.args:
            e = den.args[0] if den.args[1] == 1 else den.args[1]
            if _is(e, aten.exp.default) and _is(e.args[0], aten.neg.default) and e.args[0].args[0] is x:
                return _strip_convert(x)
    if _is(node, aten.mul.Tensor) and len(node.args) == 2:
        for x, s in (node.args, node.args[::-1]):
            if _is(s, aten.sigmoid.default) and s.args[0] is x:
                return _strip_convert(x)
    return None


def _only_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _val(node):
    return node.meta.get("val") if hasattr(node, "meta") else None


def rewrite(graph: torch.fx.Graph) -> int:
    """Replace every ``[R +] mm(silu(G) * U, B)`` of ``graph`` with ``silu_mul_mm``; returns how many."""
    count = 0
    for mm in list(graph.nodes):
        if not _is(mm, aten.mm.default):
            continue
        a, b = mm.args
        views = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
        mul = a.args[0] if _is(a, *views) else a
        if not _is(mul, aten.mul.Tensor) or len(mul.args) != 2 or _only_user(mul) is not (a if a is not mul else mm):
            continue
        if a is not mul and _only_user(a) is not mm:
            continue
        found = None
        for s, u in (mul.args, mul.args[::-1]):
            g = _silu_input(s) if hasattr(s, "op") else None
            if g is not None and hasattr(u, "op"):
                found = g, u
                break
        if found is None:
            continue
        g, u = found
        gv, uv, av, bv, mv = _val(g), _val(u), _val(a), _val(b), _val(mm)
        if any(v is None for v in (gv, uv, av, bv, mv)) or gv.shape != uv.shape or av.dim() != 2:
            continue
        if not (gv.dtype == uv.dtype == bv.dtype == mv.dtype) or gv.device != bv.device:
            continue
        shape_a = a.args[1] if a is not mul else None  # the activation's 2-D shape, as the graph spells it
        # the residual add after it: mm -> [reshape ->] add(R, .) with R of the sum's shape and the product's dtype
        out_view = _only_user(mm)
        if _is(out_view, aten.add.Tensor):
            prod, add = mm, out_view
        elif _is(out_view, *views):
            prod, add = out_view, _only_user(out_view)
        else:
            prod = add = None
        resid = None
        if _is(add, aten.add.Tensor) and len(add.args) == 2 and not add.kwargs:
            other = add.args[1] if add.args[0] is prod else add.args[0] if add.args[1] is prod else None
            ov, addv = (_val(other) if hasattr(other, "op") else None), _val(add)
            n_static = isinstance(bv.shape[1], int)
            if ov is not None and addv is not None and ov.shape == addv.shape and ov.dtype == mv.dtype == addv.dtype \
                    and n_static and (prod is mm or ov.shape == _val(prod).shape):
                resid = other
        if shape_a is not None:
            with graph.inserting_before(mm):
                g = graph.call_function(aten.reshape.default, (g, shape_a))
                u = graph.call_function(aten.reshape.default, (u, shape_a))
        if resid is not None:
            with graph.inserting_before(add):
                if prod is not mm:
                    m_dim = shape_a[0] if shape_a is not None else -1
                    resid = graph.call_function(aten.reshape.default, (resid, [m_dim, int(bv.shape[1])]))
                fused = graph.call_function(torch.ops.async_batching.silu_mul_mm.default, (g, u, b, resid))
                out = fused if prod is mm else graph.call_function(aten.reshape.default, (fused, prod.args[1]))
            add.replace_all_uses_with(out)
            graph.erase_node(add)
            if prod is not mm:
                graph.erase_node(prod)
        else:
            with graph.inserting_before(mm):
                fused = graph.call_function(torch.ops.async_batching.silu_mul_mm.default, (g, u, b, None))
            mm.replace_all_uses_with(fused)
        graph.erase_node(mm)
        if a is not mul:
            graph.erase_node(a)
        graph.erase_node(mul)
        count += 1
    if count:
        graph.eliminate_dead_code()
        for node in graph.nodes:  # the new reshapes' and op's metadata, which inductor's lowering reads
            if node.op == "call_function" and "val" not in node.meta:
                _propagate_val(node)
    return count


def _propagate_val(node) -> None:
    """A new node's ``meta["val"]``: its target run on its inputs' fake tensors, in their fake mode."""
    args = torch.fx.node.map_arg(node.args, lambda n: n.meta["val"])
    val = next(v for v in (args if isinstance(args, tuple) else ()) if isinstance(v, torch.Tensor))
    with val.fake_mode:
        node.meta["val"] = node.target(*args)


try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # pragma: no cover -- older torch: a plain callable (inductor then skips its FX-graph cache)
    CustomGraphPass = object


class FusedMlpPass(CustomGraphPass):
    """The pass as inductor takes it (``post_grad_custom_post_pass``); ``uuid`` keys inductor's FX-graph cache on this
    file's source, so a changed pass compiles anew. ``rewrites`` counts the patterns replaced, over every graph."""

    rewrites = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        FusedMlpPass.rewrites += rewrite(graph)

    def uuid(self) -> Optional[str]:
        with open(__file__, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()


PASS = FusedMlpPass()


def compile_options() -> dict:
    """The inductor options that put the pass into the engine's compiles (empty while ``FUSE_MLP_TAIL`` is off)."""
    return {"post_grad_custom_post_pass": PASS} if FUSE_MLP_TAIL else {}
