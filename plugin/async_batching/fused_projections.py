"""Sibling projections that read the same input (q/k/v, gate/up) run as one matrix product, in the model's own code.

A decode step multiplies a few hundred rows by each weight, and a product that small costs a kernel's fixed time
whatever its size: on an H200, Llama-3.2-1B's q, k and v at 256 rows take 17 us as three products and 7 us as one;
Llama-3.1-8B's q/k/v and gate/up at 32 rows save 0.49 ms a decode step fused (``recipes/bench/gemm_shapes.py``).
transformers' Llama-family code calls ``q_proj``, ``k_proj`` and ``v_proj`` (``gate_proj`` and ``up_proj``) one after
the other on the same hidden states. ``FusedProjections`` concatenates each such group's weights once (every Linear's
weight becomes a view of the concatenation: no extra memory) and gives each projection a forward that computes the
whole group's product on the first call and returns its slice of it (see ``_Group``). The model's code is unchanged
and its parameters keep their identity.

A group is fused only where it is safe and pays: plain ``nn.Linear`` modules without hooks, plain tensors (not
quantised weights), one dtype, device and input size, all with or all without bias; and in an eager probe forward
(the runner's layer probe, between ``__init__`` and ``verify``) one product must have served every projection of the
group, else the group is restored. Under tensor parallelism, projections that transformers split column-wise (its
plain ``colwise`` style: replicated input, local output columns) fuse their local shards: the DTensor parameters'
local tensors become views of the concatenation, and with grad enabled transformers' own forward runs.

With grad enabled (training the model while an engine lives, as RL rollouts do) each projection computes its own
product, so gradients reach every Parameter; in-place updates of the Parameters (optimizer steps) are seen by the
fused product, which shares their storage. Replacing a Parameter's tensor (``param.data = ...``, ``model.to``) while
an engine lives is not supported, as for the engine's CUDA graphs.

Several engines on one model share one fusion; the last to ``release`` it restores the separate weights (copies of
their slices) and the Linear forwards, so the model is as it was: ``save_pretrained`` sees no shared storage.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .tensor_parallel import is_column_parallel, is_dtensor, shard_of

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
INPUT_KWARGS = ("hidden_states", "x")  # where an owner called with keywords gets the projections' input


class _Group:
    """One owner module's sibling projections and their concatenated weight.

    The first projection of the group called with a tensor computes the whole group's product from it; the others,
    called with that same tensor object, return their slices, and the last one drops the product. A projection
    called with any other tensor computes the group's product from that tensor instead, so every projection's output
    is always its own input times its own weight: correct whatever the order or the inputs. Under torch.compile the
    product and its slices stay inside the traced code of the owner's forward (the projections come before its
    attention call, where the graph breaks), so nothing crosses compiled frames."""

    def __init__(self, owner: nn.Module, linears: list[nn.Linear]):
        self.owner = owner
        self.linears = linears
        # transformers' TP forwards of column-parallel projections (None: nn.Linear's own)
        self.own = [lin.__dict__.get("forward") for lin in linears]
        with torch.no_grad():
            weights = [shard_of(lin.weight) for lin in linears]  # this rank's rows under TP
            biases = None if linears[0].bias is None else [shard_of(lin.bias) for lin in linears]
            self.splits = [w.shape[0] for w in weights]
            self.weight = torch.cat([w.detach() for w in weights])
            self.bias = None if biases is None else torch.cat([b.detach() for b in biases])
            start = 0
            for i, n in enumerate(self.splits):  # the same Parameter objects, now views of the concatenation
                weights[i].data = self.weight[start:start + n]
                if biases is not None:
                    biases[i].data = self.bias[start:start + n]
                start += n
        self.out: Optional[tuple[torch.Tensor, ...]] = None  # the group's product, while some slices are unread
        self.x: Optional[torch.Tensor] = None  # ... and the tensor it was computed from
        self.left = 0  # slices not yet read
        self.products = self.calls = 0  # while verifying: group products computed, projection calls
        self.checking = True
        for i, lin in enumerate(linears):
            lin.forward = self._projection(i)

    def _projection(self, i: int):
        lin, own = self.linears[i], self.own[i]

        def forward(x: torch.Tensor) -> torch.Tensor:
            if own is not None and (torch.is_grad_enabled() or is_dtensor(x)):
                return own(x)  # transformers' TP forward: its DTensor path
            if torch.is_grad_enabled() and (lin.weight.requires_grad or x.requires_grad):
                # Training through the model while an engine lives (RL rollouts): the Linear's own product, so that
                # gradients reach its Parameters (the concatenation is not one of them).
                return F.linear(x, lin.weight, lin.bias)
            if self.out is None or self.x is not x:
                self.out = F.linear(x, self.weight, self.bias).split(self.splits, dim=-1)
                self.x, self.left = x, len(self.splits)
                if self.checking:
                    self.products += 1
            y = self.out[i]
            self.left -= 1
            if self.left == 0:
                self.out = self.x = None
            if self.checking:
                self.calls += 1
            return y

        return forward

    def restore(self) -> None:
        """Own forwards back, each weight (and bias) a tensor of its own again."""
        with torch.no_grad():
            for lin, own in zip(self.linears, self.own):
                if own is None:
                    lin.__dict__.pop("forward", None)
                else:
                    lin.forward = own
                for p in (lin.weight, lin.bias):
                    if p is not None:
                        shard_of(p).data = shard_of(p).data.clone()
        self.weight = self.bias = self.out = self.x = None


def _fusable(linears: list) -> bool:
    if not all(type(lin) is nn.Linear for lin in linears):
        return False
    if any(lin._forward_hooks or lin._forward_pre_hooks for lin in linears):
        return False
    if all(is_column_parallel(lin) for lin in linears):  # TP: their local shards, if on one mesh
        if len({id(lin.weight.device_mesh) for lin in linears}) != 1:
            return False
        if any(lin.bias is not None and lin.bias.placements != lin.weight.placements for lin in linears):
            return False
    elif any("forward" in lin.__dict__ for lin in linears):
        return False
    weights = [shard_of(lin.weight) for lin in linears]
    if any(type(w.data) is not torch.Tensor for w in weights):  # quantised tensor subclasses
        return False
    if len({(w.shape[1], w.dtype, w.device) for w in weights}) != 1 or not weights[0].is_floating_point():
        return False
    biases = [None if lin.bias is None else shard_of(lin.bias) for lin in linears]
    if any(b is None for b in biases) != all(b is None for b in biases):
        return False
    return all(b is None or type(b.data) is torch.Tensor for b in biases)


class FusedProjections:
    """The fused groups of one model (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.groups: list[_Group] = []
        for owner in model.modules():
            for names in SIBLINGS:
                linears = [getattr(owner, n, None) for n in names]
                if all(isinstance(lin, nn.Module) for lin in linears) and _fusable(linears):
                    self.groups.append(_Group(owner, linears))

    def verify(self) -> int:
        """After the eager probe forward: restore the groups the probe never called, or where one product did not
        serve every projection (they read different tensors); the rest are kept. Returns the number kept."""
        kept = []
        for g in self.groups:
            if not g.checking:  # verified by an earlier engine on this model
                kept.append(g)
                continue
            g.checking = False
            # Fusing pays only where one product serves the whole group: every projection read the same tensor.
            if g.calls == 0 or g.calls != g.products * len(g.linears) or g.out is not None:
                g.restore()
            else:
                kept.append(g)
        self.groups = kept
        return len(kept)

    def restore(self) -> None:
        for g in self.groups:
            g.restore()
        self.groups = []


# re-entrant: a collection made while it is held (an allocation while fusing or restoring) may free an engine dropped
# without close(), whose finalizer calls release in the same thread (with a plain lock that thread waited forever)
_lock = threading.RLock()
_shared: dict[int, list] = {}  # id(model) -> [FusedProjections, engines using it]


def acquire(model: nn.Module) -> FusedProjections:
    """The model's fusion, made by the first engine and shared with later ones (until ``release``)."""
    with _lock:
        entry = _shared.get(id(model))
        if entry is None:
            entry = _shared[id(model)] = [FusedProjections(model), 0]
        entry[1] += 1
        return entry[0]


def release(model: nn.Module) -> None:
    """One engine no longer uses the model's fusion; the last one restores the model."""
    with _lock:
        entry = _shared.get(id(model))
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _shared[id(model)]
            entry[0].restore()
