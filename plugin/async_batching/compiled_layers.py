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
import functools
from typing import Optional

import torch
from torch import nn


# Extra inductor options of the engine's compiles (torch.compile's ``options``). In use since session 18: inductor's
# ``combo_kernels`` (independent small kernels of a layer launched as one, e.g. the q and k norms with their rotary
# embeddings), one of ``ours_async_stacked``'s levers. Benchmark variants set others to measure them:
# ``ours_async_coordinate_descent``, ``ours_async_pdl``, ``ours_async_max_autotune``.
COMPILE_OPTIONS: dict = {"combo_kernels": True}
# Trace sizes size-obliviously (torch.fx.experimental._config.backed_size_oblivious): a dimension first traced at 1
# is not specialised, so the dynamic-shape graph traced on a large decode batch also serves one-row decode steps and
# one-token prefill steps, and start-up compiles one graph per compiled module instead of two (the second, for size
# 1, with kernels of its own). All 17 tested architectures compile that way and their greedy tokens equal generate's
# (CPU; llama, qwen3, gemma2, gpt_oss on the H200). Off: on the H200 (session 14) W1's start-up was no shorter, 37.3
# s against 32.1 (warm-up compile 30.1 against 26.9 s; variant ours_async_size_oblivious).
SIZE_OBLIVIOUS = False
# Compile the layers one at a time (regional compilation, see the module docstring). Off: the whole model as one graph,
# every layer unrolled into it, so inductor can fuse across layer boundaries (the residual add that ends a layer with
# the next layer's input norm: one kernel a layer fewer, and one pass over the hidden states fewer in prefill). Since
# session 16 decode and prefill steps replay CUDA graphs, so the whole graph's guards cost the host only outside them;
# start-up grows with the depth. Benchmark variant ``ours_async_whole_model``; read when an engine is built.
REGIONAL = True


# Regional compilation in groups of this many consecutive layers, each group one graph (the last group may be shorter:
# a second graph); 1: a graph a layer. Within a group inductor can fuse across the layers' boundaries (the residual
# add that ends a layer with the next layer's input norm: on W1's decode forward two kernels of 1.4 and 1.7 us a
# boundary, session 20), which ``REGIONAL`` off does for every boundary at a start-up that grows with the depth.
# Every group runs the same code (the layers and their calls are the graph's inputs), so a model compiles one or two
# graphs. Off: on the H200 (session 21, W1 profiled) groups cut a steady decode forward's kernels from 331-335 to
# 314 (pairs), 304 (5) and 297 (15) and its GPU busy time by 0.04-0.08 ms (2.51 -> 2.43 ms with 15), but end to end
# W1 stayed inside its spread (medians of 2 in one call: 150,397 default, 149,158 pairs, 150,163 groups of 5,
# 149,822 groups of 15, whose start-up took 106 s against 55); variants ``ours_async_layer_pairs``,
# ``_layer_groups5``, ``_layer_groups15``. Read when an engine is built.
LAYER_GROUP = 1


def _group_call(layers: tuple, calls: tuple):
    """Consecutive decoder layers as one function: layer i's call with its own ``(args, kwargs)`` (recorded as the
    model called it), its hidden states (the first positional argument, or ``hidden_states``) the previous layer's
    output; returns the last layer's output."""
    out = None
    for layer, (args, kwargs) in zip(layers, calls):
        if out is not None:
            if args:
                args = (out,) + tuple(args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": out}
        out = layer._call_impl(*args, **kwargs)
    return out


def _group_call_own(layers: tuple, calls: tuple):
    """``_group_call`` through a code object of its own (``CompiledLayers``' ``own_frame``)."""
    return _group_call(layers, calls)


def size_oblivious() -> bool:
    """Whether the engine's compiles trace size-obliviously (``SIZE_OBLIVIOUS``, where torch has the option)."""
    return SIZE_OBLIVIOUS and hasattr(_fx_config(), "backed_size_oblivious")


def _fx_config():
    import torch.fx.experimental._config as fx_config

    return fx_config


@contextlib.contextmanager
def _dynamo_settings():
    """Dynamo's settings for the engine's compiled calls. Every module's compiled call shares the code object of
    ``nn.Module._call_impl``, so its cache holds an entry per module kind and shape, for every engine's model in the
    process: the default limit (8) would soon leave a layer uncompiled. Past a higher limit, a call raises instead
    (the engine then says so and runs uncompiled) rather than silently running that module uncompiled.

    The graphs guard on the modules' hooks (``skip_nnmodule_hook_guards`` off): by default dynamo does not, so a
    graph traced for one model ran for a second model of the same architecture without the hooks added to it (a
    forward pre-hook on an MLP never ran, found on the GPU machine). Decode steps replay CUDA graphs, so the extra
    guards cost only the few uncompiled-graph steps. With ``SIZE_OBLIVIOUS`` the calls trace size-obliviously."""
    cfg = torch._dynamo.config
    patch = {name: max(getattr(cfg, name), value) for name, value in
             (("recompile_limit", 1024), ("accumulated_recompile_limit", 8192)) if hasattr(cfg, name)}
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        patch["fail_on_recompile_limit_hit"] = True
    if hasattr(cfg, "skip_nnmodule_hook_guards"):
        patch["skip_nnmodule_hook_guards"] = False
    oblivious = _fx_config().patch(backed_size_oblivious=True) if size_oblivious() else contextlib.nullcontext()
    with cfg.patch(**patch), oblivious:
        yield


def repeated_blocks(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The model's decoder layers: the longest ``nn.ModuleList`` whose modules are of one or a few classes, and its
    siblings called once a forward (the final norm, the rotary embedding; not the token embedding, a lookup that
    compiling would not change). Nothing found: two empty lists."""
    best: list[nn.Module] = []
    siblings: list[nn.Module] = []
    for parent in model.modules():
        for child in parent.children():
            if isinstance(child, nn.ModuleList) and len(child) > len(best):
                kinds = {type(m) for m in child}
                if len(child) >= 2 and len(kinds) <= max(1, len(child) // 4):
                    best = list(child)
                    siblings = [m for m in parent.children()
                                if m is not child and not isinstance(m, (nn.ModuleList, nn.Embedding))]
    return best, siblings


def _own_frame(module: nn.Module, *args, **kwargs):
    """A module's call through a code object of its own (see ``CompiledLayers``' ``own_frame``)."""
    return module._call_impl(*args, **kwargs)


class CompiledLayers:
    """Calls the model with each of its repeated blocks' calls compiled (``torch.compile(dynamic=True)`` of the
    block's ``_call_impl``, what ``nn.Module.compile`` does), and those of the blocks' siblings, for the duration of
    the call only. A model without repeated blocks, or any model with ``REGIONAL`` off, is compiled whole (under the
    same ``_dynamo_settings``).

    ``own_frame``: compile through ``_own_frame`` instead. Dynamo keeps its graphs per code object, and every module's
    ``_call_impl`` shares one, so without it all compiles of a layer kind share their graphs; the graph compiled first
    fixes its kernels' launch configurations (inductor takes its size hints from the first shapes, and autotunes at the
    first call). Inductor's FX-graph cache does not key on size hints either: an own-frame compile of the same graph
    gets the first compile's code from it unless it compiles under a cache key of its own. With
    ``model_runner.PREFILL_OWN_COMPILE`` (on since session 18, see there) the model runner's prefill steps use their
    own frame and key (``PREFILL_CACHE_TAG``), so that their kernels are tuned on a prefill step's shapes, not the
    decode rows'.

    ``LAYER_GROUP`` above 1: the layers' calls go, a group of consecutive layers at a time, through one compiled
    function (``_group_call``); a group's earlier layers only record how the model called them and hand their input on,
    and its last layer runs the group over the recorded calls. The model's loop sees each layer called once, in order;
    between the layers of a group it passes the group's input along, which nothing but the next layer reads (the engine
    asks for no per-layer hidden states)."""

    def __init__(self, model: nn.Module, own_frame: bool = False, **compile_kwargs):
        if COMPILE_OPTIONS:
            compile_kwargs = {**compile_kwargs, "options": {**compile_kwargs.get("options", {}), **COMPILE_OPTIONS}}
        self.model = model
        self.blocks, self.once = repeated_blocks(model) if REGIONAL else ([], [])
        if self.blocks:
            self._whole = None
        else:
            self._whole = torch.compile(functools.partial(_own_frame, model) if own_frame else model, **compile_kwargs)
        # the layers, then the modules called once a forward: in decode graphs their uncompiled kernels (a norm of
        # five, the rotary embedding's) cost a 135M model's decode step 0.14 ms on an H200
        self._targets = self.blocks + self.once
        self._fns = [torch.compile(functools.partial(_own_frame, m) if own_frame else m._call_impl, **compile_kwargs)
                     for m in self._targets]
        # LAYER_GROUP: each group's layers but its last only record their call (and hand their input on unchanged);
        # the last runs the group's compiled function over the recorded calls and its own
        self.group = max(1, int(LAYER_GROUP)) if self.blocks else 1
        if self.group > 1:
            group_fn = torch.compile(_group_call_own if own_frame else _group_call, **compile_kwargs)
            pending: list = []

            def deferred(block):
                def call(*args, **kwargs):
                    pending.append((block, args, kwargs))
                    return args[0] if args else kwargs["hidden_states"]
                return call

            def last(block):
                def call(*args, **kwargs):
                    calls = pending + [(block, args, kwargs)]
                    pending.clear()
                    return group_fn(tuple(c[0] for c in calls), tuple((c[1], c[2]) for c in calls))
                return call

            n = len(self.blocks)
            self._fns[:n] = [last(b) if i % self.group == self.group - 1 or i == n - 1 else deferred(b)
                             for i, b in enumerate(self.blocks)]

    @property
    def whole(self) -> bool:
        """The model compiled as one graph: its inputs (token ids, kept rows) are the graph's inputs too."""
        return self._whole is not None

    def __call__(self, *args, **kwargs):
        if self._whole is not None:
            with _dynamo_settings():
                return self._whole(*args, **kwargs)
        previous: list[Optional[object]] = []
        for block, fn in zip(self._targets, self._fns):
            previous.append(block.__dict__.get("_compiled_call_impl"))
            object.__setattr__(block, "_compiled_call_impl", fn)
        try:
            with _dynamo_settings():  # a layer that would exceed dynamo's recompile limit raises instead of running uncompiled
                return self.model(*args, **kwargs)
        finally:
            for block, before in zip(self._targets, previous):
                object.__setattr__(block, "_compiled_call_impl", before)
