"""The all-reduce of a tensor-parallel group's row-parallel layers: symmetric memory for small messages, else NCCL.

A tensor-parallel decode step does two all-reduces per layer, each of rows x hidden values (W3 at batch 32 on
Llama-3.1-8B: 256 KiB). At that size an all-reduce costs its latency: on 2 x H200, 21 us for NCCL against 9 us for the
one-shot below, back to back in a CUDA graph; in W3's TP=2 decode steps the 64 sums of a step cost 0.26 ms more through
NCCL (5.22 against 4.96 ms a step; docs/results/tp_h200x2.md). PyTorch's symmetric memory
(``torch.distributed._symmetric_memory``) maps each rank's buffer into its peers' address space, and its one-shot
all-reduce is one kernel that copies the input into this rank's buffer, waits on a device-side barrier and sums every
rank's buffer: it runs inside CUDA graphs and needs no multicast (``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` stays set, as
the device README requires). ``recipes/bench/allreduce_latency.py`` measures both and checks that they give the same
sums.

``AllReduce`` chooses per call: symmetric memory for a CUDA tensor of the buffer's dtype and at most ``max_bytes`` (8
MiB: decode steps' hidden states up to 512 x 8,192 bf16; big prefill steps go to NCCL), NCCL (or gloo on CPU)
otherwise, and always where symmetric memory could not be set up (the reason is kept in ``symm_error``). Both are out
of place. The model's code reaches it through the custom op ``async_batching::all_reduce`` (opaque to torch.compile,
so compiled decode steps call it as one node).

Invariants: the symmetric buffer is written by the one-shot kernel itself (its input copy) or, for two-shot, by a copy
on the same stream just before the kernel. Both kernels (PyTorch's ``CUDASymmetricMemoryOps.cu``) end with a barrier
across the group after their last access to a peer's buffer, so a rank cannot overwrite its buffer for the next sum, nor
read a two-shot result out of it, before every peer is done with this one. Every rank of a group calls the same
all-reduces in the same order (the group runs one plan) and picks the method from what all ranks share (``method``), so
the barriers pair up; at start-up the group agrees on using symmetric memory at all. The buffer is allocated and
rendezvoused at start-up, before any CUDA graph is captured.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

_ENGINES: dict[str, "AllReduce"] = {}  # group name -> the AllReduce its layers call
# Measured on 2 x H200 (NVLink, docs/results/tp_h200x2.md), microseconds per all-reduce in CUDA graphs, by message
# size: 256 KiB NCCL 22.1, one-shot 9.3, two-shot 10.0; 2 MiB: 38.5, 21.5, 16.5; 8 MiB: 55.8, 62.5, 40.7.
ONE_SHOT_MAX_BYTES = 512 * 1024  # one-shot up to here, two-shot above
MAX_BYTES = 8 * 2**20  # the symmetric buffer: messages above it go to NCCL


MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def multicast_off() -> None:
    """NVLink multicast stays off in NCCL, PyTorch's symmetric memory and NVSHMEM (the device README: a program using
    it can take a shared host's GPUs out of service). Set before process groups and symmetric memory are created;
    processes started afterwards inherit it. A value the user set explicitly is kept."""
    for key, value in MULTICAST_OFF.items():
        os.environ.setdefault(key, value)


class AllReduce:
    """Sum a tensor over ``group`` (out of place)."""

    def __init__(self, group, device: torch.device, dtype: torch.dtype = torch.bfloat16, max_bytes: int = MAX_BYTES):
        import torch.distributed as dist

        self.group = group
        self.group_name = group.group_name
        self.device = device
        self.world = dist.get_world_size(group)
        self.dtype = dtype
        self.max_numel = max(1, max_bytes // torch.empty((), dtype=dtype).element_size())
        self.symm = self.symm_buffer = None
        self.symm_error: Optional[str] = None
        if device.type != "cuda":
            self.symm_error = "not a CUDA device"
        else:
            self._setup_symmetric_memory()

    def _setup_symmetric_memory(self) -> None:
        import torch.distributed as dist

        multicast_off()  # symmetric memory without multicast objects
        try:
            import torch.distributed._symmetric_memory as symm_mem

            buf = symm_mem.empty(self.max_numel, dtype=self.dtype, device=self.device)
            handle = symm_mem.rendezvous(buf, self.group_name)
            if handle is None:
                raise RuntimeError("rendezvous gave no handle")
            self.symm, self.symm_buffer = handle, buf
            # Each method once, checked against NCCL, before anything relies on it (a group whose GPUs cannot map
            # each other's memory fails here, not in the middle of a run). Every rank runs every check before any
            # verdict, so a rank that sees a wrong sum does not leave its peers waiting inside the next one.
            rank = dist.get_rank(self.group)
            wrong = []
            for numel in (16 * self.world, self.max_numel - self.max_numel % (16 * self.world)):
                x = torch.arange(numel, device=self.device).remainder(7).add(rank).to(self.dtype)
                want = x.clone()
                dist.all_reduce(want, group=self.group)
                if not torch.equal(self(x), want):
                    wrong.append(f"{self.method(x)} sum of {numel} values differs from NCCL's")
            if wrong:
                raise RuntimeError("; ".join(wrong))
        except Exception as exc:  # no symmetric memory here: NCCL does every all-reduce
            self.symm = self.symm_buffer = None
            self.symm_error = f"{type(exc).__name__}: {exc}"
        # The group uses it only if every rank can: ranks that chose differently would wait on each other forever.
        ok = torch.tensor([0 if self.symm is None else 1], device=self.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group)
        if not int(ok.item()) and self.symm is not None:
            self.symm = self.symm_buffer = None
            self.symm_error = "another rank of the group could not use symmetric memory"

    def method(self, x: torch.Tensor) -> str:
        """What a call with ``x`` uses: ``"one_shot"`` (small), ``"two_shot"`` (symmetric memory, up to the buffer's
        size) or ``"nccl"`` (gloo on CPU)."""
        # Decided from what every rank of the group has alike (dtype, shape, layout), never from addresses: ranks
        # that chose differently would wait on each other's collectives forever.
        if (self.symm is None or x.dtype != self.dtype or x.numel() > self.max_numel or not x.is_cuda
                or not x.is_contiguous() or (x.numel() * x.element_size()) % 16):
            return "nccl"  # symmetric memory's kernels want the input and the buffer view aligned alike: 16 bytes
        if x.numel() * x.element_size() <= ONE_SHOT_MAX_BYTES or x.numel() % (16 * self.world):
            return "one_shot"
        return "two_shot"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        how = self.method(x)
        if how == "nccl":
            y = x.clone()
            torch.distributed.all_reduce(y, group=self.group)
            return y
        buf = self.symm_buffer[:x.numel()].view(x.shape)  # a view of the registered buffer, at its start
        if x.data_ptr() % 16:  # a view at an odd offset: an aligned copy (the buffer view is 16-byte aligned)
            x = x.clone()
        if how == "one_shot":
            return torch.ops.symm_mem.one_shot_all_reduce_copy(buf, x, "sum", self.group_name)
        buf.copy_(x)
        torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", self.group_name)
        return buf.clone()

    def register(self) -> "AllReduce":
        """Make this the all-reduce of ``all_reduce(x, group_name)`` for its group."""
        _ENGINES[self.group_name] = self
        return self


@torch.library.custom_op("async_batching::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """The sum of ``x`` over the group named ``group_name``, by that group's registered ``AllReduce``."""
    return _ENGINES[group_name](x)


@all_reduce.register_fake
def _(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(x)


__all__ = ["AllReduce", "all_reduce", "multicast_off"]
