"""The model with its repeated blocks compiled one at a time: regional compilation.

``BatcherConfig.compile`` compiles the model's decoder layers, not the model: every layer of a kind runs the same
code, so torch.compile traces and compiles one layer (its parameters are the graph's inputs) and every other layer
reuses that code. Attention is one opaque op inside it (``attention.py``), so a layer is one graph: one guard check
and one call of the compiled code per layer, with its norms, rotary embedding, projections and activations fused.
Compiling the whole model instead would unroll every layer into one graph (start-up grows with the depth), and
leaving attention out of the graph (a graph break per layer) made a compiled prefill step cost the host about as
much as an uncompiled one, 40-45 ms for a 28-30-layer model on the H200 machine.

The layers run compiled only inside the engine's own forwards (``CompiledLayers.__call__`` puts the compiled code in
place and takes it away again): the user's model, called anywhere else, runs its own code.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn


def _LOUD():
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        return torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
    return contextlib.nullcontext()


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: the longest ``nn.ModuleList`` whose modules are of one or a few classes (None
    found: an empty list)."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            kinds = {type(m) for m in module}
            if len(module) >= 2 and len(kinds) <= max(1, len(module) // 4):
                best = list(module)
    return best


class CompiledLayers:
    """Calls the model with each of its repeated blocks' calls compiled (``torch.compile(dynamic=True)`` of the
    block's ``_call_impl``, what ``nn.Module.compile`` does), for the duration of the call only. A model without
    repeated blocks is compiled whole."""

    def __init__(self, model: nn.Module, **compile_kwargs):
        self.model = model
        self.blocks = repeated_blocks(model)
        self._whole = None if self.blocks else torch.compile(model, **compile_kwargs)
        self._fns = [torch.compile(block._call_impl, **compile_kwargs) for block in self.blocks]

    def __call__(self, *args, **kwargs):
        if self._whole is not None:
            return self._whole(*args, **kwargs)
        previous: list[Optional[object]] = []
        for block, fn in zip(self.blocks, self._fns):
            previous.append(block.__dict__.get("_compiled_call_impl"))
            object.__setattr__(block, "_compiled_call_impl", fn)
        try:
            with _LOUD():  # a layer that would exceed dynamo's recompile limit raises instead of running uncompiled
                return self.model(*args, **kwargs)
        finally:
            for block, before in zip(self.blocks, previous):
                object.__setattr__(block, "_compiled_call_impl", before)
