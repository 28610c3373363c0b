"""TensorParallelStrategy: Lightning's DDP launcher and process group, with one data shard per tensor-parallel group."""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.strategies import DDPStrategy

from ..all_reduce import multicast_off
from ..tensor_parallel import data_parallel_view


class TensorParallelStrategy(DDPStrategy):
    """Processes as DDP starts them; groups of ``tensor_parallel_size`` consecutive ranks each hold one model (the
    ``ContinuousBatching`` engine shards it with transformers' TP plan) and read one data shard.

    ``tensor_parallel_size=None``: every process of the job is one group (TP only). For predict, DDP wraps nothing.
    """

    def __init__(self, tensor_parallel_size: Optional[int] = None, **kwargs: Any) -> None:
        if tensor_parallel_size is not None and (not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1):
            raise ValueError(f"TensorParallelStrategy(tensor_parallel_size={tensor_parallel_size!r}) is invalid: "
                             "expected a positive int, or None for all processes")
        # NVLink multicast stays off (device README). Set before the launcher starts processes, which inherit it, and
        # again before each process creates its process group (torchrun and SLURM start processes themselves).
        multicast_off()
        super().__init__(**kwargs)
        self._tensor_parallel_size = tensor_parallel_size

    @property
    def tensor_parallel_size(self) -> int:
        """Ranks per group (resolved once the world size is known)."""
        return self._tensor_parallel_size or self.world_size

    def setup_environment(self) -> None:
        multicast_off()
        super().setup_environment()
        data_parallel_view(self.global_rank, self.world_size, self.tensor_parallel_size)  # raises if it does not divide

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        dp_rank, dp_size, _ = data_parallel_view(self.global_rank, self.world_size, self.tensor_parallel_size)
        return {"num_replicas": dp_size, "rank": dp_rank}


__all__ = ["TensorParallelStrategy"]
