"""Paged KV cache: a block allocator (free list + reference counts) and the per-layer K/V tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCRATCH_BLOCK = 0  # never handed out: padded rows of a CUDA-graph batch write their K/V here


class BlockAllocator:
    """Hands out fixed-size KV blocks. Reference counts allow sharing (prefix caching) later."""

    def __init__(self, num_blocks: int, reserved: int = 1):
        if num_blocks <= reserved:
            raise ValueError(f"num_blocks={num_blocks} leaves no usable block (need > {reserved})")
        self.num_blocks = num_blocks
        self.reserved = reserved
        self._free = list(range(num_blocks - 1, reserved - 1, -1))  # a stack: low ids come out first
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - self.reserved

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def incref(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} is not allocated"
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            refs = self._refs[b]
            if refs <= 0:
                raise RuntimeError(f"double free of KV block {b}")
            self._refs[b] = refs - 1
            if refs == 1:
                self._free.append(b)

    def all_free(self) -> bool:
        return len(self._free) == self.num_usable


@dataclass(frozen=True)
class LayerSpec:
    """K/V geometry of one attention layer, as probed from the model's own forward."""

    num_kv_heads: int
    head_dim: int
    v_head_dim: int


class PagedKVCache:
    """Per-layer K/V storage ``[num_blocks, block_size, kv_heads, head_dim]`` plus the allocator over its blocks."""

    def __init__(self, layers: dict[int, LayerSpec], num_blocks: int, block_size: int, dtype, device):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.allocator = BlockAllocator(num_blocks)
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for idx, spec in layers.items():
            self.k[idx] = torch.zeros(num_blocks, block_size, spec.num_kv_heads, spec.head_dim, dtype=dtype, device=device)
            self.v[idx] = torch.zeros(num_blocks, block_size, spec.num_kv_heads, spec.v_head_dim, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(layers: dict[int, LayerSpec], block_size: int, dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return sum(block_size * s.num_kv_heads * (s.head_dim + s.v_head_dim) * elem for s in layers.values())

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
