"""Tensor parallelism: the model sharded with transformers' own TP plan over a group of ranks, and what the engine
needs from that group.

Every rank of a group runs the same engine (scheduler, allocator, sampling) on the same requests, so each plans the
same steps. ``TensorParallelGroup.agree`` makes that checkable and the tokens identical: after sampling, the group
all-gathers each rank's tokens plus a CRC of its staged step; every rank keeps rank 0's tokens, and a CRC that differs
from rank 0's raises an error on the host when the step lands. Both run on the device, in the step's stream order:
no host synchronization is added.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .all_reduce import AllReduce, multicast_off


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def check_shardable(model, size: int) -> None:
    """Raise a ValueError naming the problem if ``model`` cannot be split over ``size`` ranks by transformers' plan."""
    name = f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r})"
    if not getattr(model, "tp_plan", None):
        raise ValueError(
            f"BatcherConfig.tensor_parallel_size={size}: {name} has no tensor-parallel plan (its config defines no "
            "base_model_tp_plan); use tensor_parallel_size=1 and data parallelism (trainer=ddp) for this model"
        )
    cfg = _text_config(model)
    heads = getattr(cfg, "num_attention_heads", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    for key, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if value is not None and value % size:
            raise ValueError(
                f"BatcherConfig.tensor_parallel_size={size} does not divide {name}'s {key}={value}: each rank must "
                f"hold whole heads; choose a tensor_parallel_size that divides {value}"
            )


def _sharded_mesh(model):
    """The TP mesh of a model whose parameters are already DTensors (e.g. ``from_pretrained(..., tp_plan="auto")``)."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            return mesh["tp"] if mesh.ndim > 1 and "tp" in (mesh.mesh_dim_names or ()) else mesh
    return None


def apply_tp_plan(model, mesh) -> None:
    """Shard ``model`` in place with transformers' own TP plan over the 1-D ``mesh`` (transformers 5.17 takes the
    model's plan as it is; 5.24 takes it expanded to one entry per module or parameter)."""
    from transformers.distributed import tensor_parallel as tp

    if "tp_plan" in inspect.signature(tp.apply_tensor_parallelism).parameters:
        tp.apply_tensor_parallelism(model, mesh, model._expand_parallel_plan(dict(model.tp_plan)))
    else:
        tp.apply_tensor_parallelism(model, mesh)
    model._tp_size = mesh.size()  # what transformers' own loader records; the model's code reads it in places
    model._device_mesh = mesh


def is_dtensor(t) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_of(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: the local tensor of a DTensor (the storage itself, not a view), else ``t``."""
    return t._local_tensor if is_dtensor(t) else t


def tp_style(module: nn.Module):
    """The transformers TP style object (``ColwiseParallel``, ``RowwiseParallel``, ...) whose forward ``module`` runs,
    read from the closure that transformers' ``install_forward`` set as the module's ``forward``; None if none."""
    fw = module.__dict__.get("forward")
    code, cells = getattr(fw, "__code__", None), getattr(fw, "__closure__", None)
    if code is None or not cells or code.co_name != "tp_forward":
        return None
    try:
        return dict(zip(code.co_freevars, cells))["self"].cell_contents
    except (KeyError, ValueError):
        return None


def _plain_linear(module, style_name: str, layouts: tuple, weight_dim: int) -> bool:
    """``module`` is an ``nn.Linear`` that transformers split with its plain ``style_name`` (inputs and outputs in
    ``layouts``, local outputs), its weight a DTensor sharded on ``weight_dim``."""
    from torch.distributed.tensor import Shard

    style = tp_style(module)
    if type(module) is not nn.Linear or type(style).__name__ != style_name or not getattr(style, "use_local_output",
                                                                                           False):
        return False
    if (style.input_layouts, style.output_layouts) != layouts or not is_dtensor(module.weight):
        return False
    w = module.weight
    return len(w.placements) == 1 and w.placements[0] in (Shard(weight_dim), Shard(weight_dim - w.ndim))


def is_column_parallel(module) -> bool:
    """A linear layer of transformers' plain ``colwise`` style: replicated input, this rank's output columns."""
    from torch.distributed.tensor import Replicate, Shard

    return _plain_linear(module, "ColwiseParallel", (Replicate(), Shard(-1)), 0)


def is_row_parallel(module) -> bool:
    """A linear layer of transformers' plain ``rowwise`` style: this rank's input columns, replicated (summed)
    output; its bias (if any) replicated."""
    from torch.distributed.tensor import Replicate, Shard

    if not _plain_linear(module, "RowwiseParallel", (Shard(-1), Replicate()), 1):
        return False
    return module.bias is None or (is_dtensor(module.bias) and module.bias.placements == (Replicate(),))


def use_group_all_reduce(model: nn.Module, group_name: str) -> int:
    """Give every plain row-parallel linear layer of ``model`` an inference forward that sums its partial product
    with the custom op ``async_batching::all_reduce`` (the group's registered ``AllReduce``: symmetric memory for
    small messages) instead of transformers' ``dist.all_reduce`` (NCCL). With grad enabled, or for a DTensor input,
    transformers' own forward runs. Returns the number of such layers (a layer given this forward by an earlier
    engine gets it again, for ``group_name``)."""
    n = 0
    for module in model.modules():
        own = getattr(module.__dict__.get("forward"), "tp_forward", None)  # set by an earlier call
        if own is None:
            if not is_row_parallel(module):
                continue
            own = module.__dict__["forward"]
        weight = shard_of(module.weight)
        bias = None if module.bias is None else shard_of(module.bias)

        def forward(x, own=own, weight=weight, bias=bias):
            if torch.is_grad_enabled() or is_dtensor(x):
                return own(x)
            y = torch.ops.async_batching.all_reduce(F.linear(x, weight), group_name)
            return y if bias is None else y + bias

        forward.tp_forward = own
        module.forward = forward
        n += 1
    return n


def use_transformers_all_reduce(model: nn.Module) -> None:
    """Give the layers ``use_group_all_reduce`` changed their transformers forwards back (``tp_all_reduce="nccl"`` on a
    model an earlier engine set up)."""
    for module in model.modules():
        own = getattr(module.__dict__.get("forward"), "tp_forward", None)
        if own is not None:
            module.forward = own


def is_sharded(model) -> bool:
    """The model's parameters are DTensors already (sharded by transformers or by an earlier batcher)."""
    return _sharded_mesh(model) is not None


@dataclass
class TensorParallelGroup:
    """The ranks that hold one model together: consecutive global ranks ``[g * size, (g + 1) * size)``."""

    size: int
    rank: int  # within the group; rank 0's tokens are the group's
    group: object  # torch.distributed ProcessGroup
    device: torch.device
    all_reduce: Optional[AllReduce] = None  # what the row-parallel layers sum with
    row_parallel: int = 0  # row-parallel layers whose sums ``all_reduce`` does

    @classmethod
    def shard(cls, model, size: int, device: torch.device, all_reduce: str = "auto") -> "TensorParallelGroup":
        """Shard ``model`` (in place) over its group of ``size`` ranks, or adopt the mesh of a model sharded already.
        ``all_reduce``: "auto" (symmetric memory for small sums where the GPUs can map each other's memory, else
        NCCL), "nccl" (transformers' own all-reduces, untouched)."""
        import torch.distributed as dist

        mesh = _sharded_mesh(model)
        if mesh is None:
            check_shardable(model, size)
            if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() % size:
                world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
                raise ValueError(
                    f"BatcherConfig.tensor_parallel_size={size} needs torch.distributed initialized with a world size "
                    f"that it divides (world size: {world}); launch with Lightning (trainer=tp) or torchrun"
                )
            multicast_off()
            from torch.distributed.device_mesh import init_device_mesh

            world = dist.get_world_size()
            mesh = init_device_mesh(device.type, (world // size, size), mesh_dim_names=("dp", "tp"))["tp"]
            apply_tp_plan(model, mesh)
        elif mesh.size() != size:
            raise ValueError(f"BatcherConfig.tensor_parallel_size={size}, but the model is already sharded over "
                             f"{mesh.size()} ranks; set tensor_parallel_size={mesh.size()}")
        tp = cls(size=size, rank=mesh.get_local_rank(), group=mesh.get_group(), device=device)
        if all_reduce == "auto":
            dtype = next(model.parameters()).dtype
            tp.all_reduce = AllReduce(tp.group, device, dtype).register()
            tp.row_parallel = use_group_all_reduce(model, tp.group.group_name)
        else:
            use_transformers_all_reduce(model)
        return tp

    def _tensor(self, values) -> torch.Tensor:
        # gloo reduces host tensors, NCCL device tensors
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over the group (e.g. KV blocks: every rank needs the same allocator to plan alike)."""
        import torch.distributed as dist

        t = self._tensor([value])
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def agree(self, tokens: torch.Tensor, crc: torch.Tensor, flag: torch.Tensor) -> None:
        """Every rank takes rank 0's ``tokens`` [k] (int32, in place); ``flag`` [1] becomes 1 where a rank staged a
        step (``crc`` [1]) other than rank 0's. One all-gather of k + 1 words, on the current stream."""
        import torch.distributed as dist

        k = tokens.numel()
        mine = torch.cat([tokens.view(-1), crc.view(-1).to(tokens.dtype)])
        every = mine.new_empty(self.size * (k + 1))
        # torch 2.13 renamed all_gather_into_tensor to all_gather_single; the GPU machine's 2.11 has only the former
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(every, mine, group=self.group)
        every = every.view(self.size, k + 1)
        tokens.copy_(every[0, :k])
        flag.copy_((every[:, k] != every[0, k]).any().to(flag.dtype).view(1))


class PlanDisagreement(RuntimeError):
    """The ranks of a tensor-parallel group staged different steps: their engines saw different inputs."""


def data_parallel_view(global_rank: int, world_size: int, tensor_parallel_size: int) -> tuple[int, int, bool]:
    """``(data-parallel rank, data-parallel size, writes)`` of a rank: a group of ``tensor_parallel_size``
    consecutive ranks serves one data shard, and only its first rank writes outputs."""
    if tensor_parallel_size < 1 or world_size % tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} does not divide the world size {world_size}")
    return global_rank // tensor_parallel_size, world_size // tensor_parallel_size, global_rank % tensor_parallel_size == 0


def trainer_tensor_parallel_size(trainer) -> int:
    """The TP group size of a Lightning trainer's strategy (1 unless it is a ``TensorParallelStrategy``)."""
    return int(getattr(getattr(trainer, "strategy", None), "tensor_parallel_size", None) or 1)


def trainer_data_parallel_view(trainer) -> tuple[int, int, bool]:
    """``data_parallel_view`` of a Lightning trainer's rank."""
    return data_parallel_view(trainer.global_rank, trainer.world_size, trainer_tensor_parallel_size(trainer))


__all__ = ["TensorParallelGroup", "PlanDisagreement", "apply_tp_plan", "check_shardable", "is_sharded", "data_parallel_view",
           "trainer_tensor_parallel_size", "trainer_data_parallel_view"]
