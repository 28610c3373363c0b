"""Paged KV cache: the block allocator (free list, reference counts, cached blocks) and the per-layer K/V tensors.

Every usable block is in exactly one of three states, and ``num_free_uncached + num_cached + num_used`` always equals
``num_usable``:
- free: no content anyone may reuse; handed out first;
- cached: reference count 0 but holding the K/V of a full block whose hash is in the prefix index; a new request may
  take it back (a prefix-cache hit), or ``allocate`` evicts it, least recently used first, when no free block is left;
- used: reference count > 0 (held by requests; several when shared by prefix hits or by the samples of one prompt).
A block reaches reference count 0 only through ``free``, which the scheduler calls once no step in flight can still
read the block (deferred frees), so neither eviction nor rewriting ever touches a block a launched step reads.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

# Block 0 is never handed out: the padded rows of a CUDA-graph decode batch write their K/V there. Those rows use
# block-table row SCRATCH_ROW, which is never given to a request and whose entries all stay 0.
RESERVED_BLOCKS = 1
SCRATCH_ROW = 0


# Block-table entries a step may write for prefix-cache hits (the scheduler stops taking hits past it); entries for
# newly allocated blocks are bounded by the step itself (at most max_batch_tokens / block_size + max_num_seqs).
HIT_TABLE_ENTRIES = 16384


def block_table_rows(max_num_seqs: int) -> int:
    """Rows of the device block table. A finished or preempted request keeps its row until the step in flight that
    reads it lands, so up to twice ``max_num_seqs`` rows can be held at once; plus the scratch row and one spare."""
    return 2 * max_num_seqs + 2


class TableRows:
    """Rows of the device block table; a row is held by one request from admission until its blocks are freed."""

    def __init__(self, n: int):
        self._free = [r for r in range(n - 1, -1, -1) if r != SCRATCH_ROW]

    def take(self) -> int:
        return self._free.pop()

    def give(self, row: int) -> None:
        self._free.append(row)

    @property
    def num_free(self) -> int:
        return len(self._free)


class BlockAllocator:
    """Hands out fixed-size KV blocks; with ``retain_cached``, freed full blocks stay reusable until evicted (LRU)."""

    def __init__(self, num_blocks: int, retain_cached: bool = True):
        if num_blocks <= RESERVED_BLOCKS:
            raise ValueError(f"num_blocks={num_blocks} leaves no usable block (need > {RESERVED_BLOCKS})")
        self.num_blocks = num_blocks
        self.retain_cached = retain_cached
        self._free = list(range(num_blocks - 1, RESERVED_BLOCKS - 1, -1))  # a stack: low ids come out first
        self._refs = [0] * num_blocks
        self._hash_of: list[Optional[bytes]] = [None] * num_blocks
        self._index: dict[bytes, int] = {}  # block hash -> block holding that content
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks (refcount 0), least recently used first

    # --- counts -------------------------------------------------------------------------------------------
    @property
    def num_usable(self) -> int:
        return self.num_blocks - RESERVED_BLOCKS

    @property
    def num_free(self) -> int:
        """Blocks ``allocate`` can hand out now: free ones plus cached ones it may evict."""
        return len(self._free) + len(self._lru)

    @property
    def num_free_uncached(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._lru)

    @property
    def num_used(self) -> int:
        return self.num_usable - len(self._free) - len(self._lru)

    def all_free(self) -> bool:
        """No block is held by a request (cached blocks count as free)."""
        return self.num_used == 0

    # --- allocation ---------------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._lru.popitem(last=False)  # evict the least recently used cached block
                del self._index[self._hash_of[b]]
                self._hash_of[b] = None
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Callers free a request's blocks last-first, so the tail of a prompt is
        evicted before its head (heads are the more widely shared prefixes)."""
        for b in blocks:
            refs = self._refs[b]
            if refs <= 0:
                raise RuntimeError(f"double free of KV block {b}")
            self._refs[b] = refs - 1
            if refs == 1:
                if self._hash_of[b] is not None and self.retain_cached:
                    self._lru[b] = None
                else:
                    self._unindex(b)
                    self._free.append(b)

    # --- the prefix index ---------------------------------------------------------------------------------
    def lookup(self, hashes: list[bytes]) -> list[int]:
        """Take a reference to the blocks holding the longest indexed prefix of ``hashes`` (a chain)."""
        out = []
        for h in hashes:
            b = self._index.get(h)
            if b is None:
                break
            if self._refs[b] == 0:
                del self._lru[b]
            self._refs[b] += 1
            out.append(b)
        return out

    def register(self, block: int, block_hash: bytes) -> bool:
        """Index a full block under its hash (its K/V is written by a launched step, or by the step being planned:
        each layer writes all of a step's K/V before any of its attention reads). False when the content is already
        indexed under another block; this one then stays private and is freed normally."""
        if block_hash in self._index or self._hash_of[block] is not None:
            return False
        self._index[block_hash] = block
        self._hash_of[block] = block_hash
        return True

    def reset_cache(self) -> int:
        """Forget every cached block (blocks held by requests keep their content but leave the index); returns how
        many cached blocks became free."""
        n = len(self._lru)
        self._free.extend(self._lru)
        self._lru.clear()
        self._index.clear()
        self._hash_of = [None] * self.num_blocks
        return n

    def unregister(self, block: int) -> None:
        """Drop a block from the index (its content did not get written: the step was rolled back)."""
        if self._refs[block] == 0 and block in self._lru:
            del self._lru[block]
            self._free.append(block)
        self._unindex(block)

    def _unindex(self, b: int) -> None:
        h = self._hash_of[b]
        if h is not None:
            if self._index.get(h) == b:
                del self._index[h]
            self._hash_of[b] = None


@dataclass(frozen=True)
class LayerSpec:
    """K/V geometry of one attention layer, as probed from the model's own forward."""

    num_kv_heads: int
    head_dim: int
    v_head_dim: int


# How each layer's K/V is stored. "token": [block, slot, kv head, dim], contiguous (every kernel's index order).
# "head": each block head-major in memory ([block, kv head, slot, dim]) and handed out as a [block, slot, kv head,
# dim] view, so a kv head's keys of a block are contiguous: at head_dim 64 a decode program reads one key of its head
# every 128 B instead of every kv_heads x 128 B. The kernels read and write through strides, the torch path through
# (block, slot) indices. "head" by default since session 18, one of ``ours_async_stacked``'s levers (the decode
# attention 1.02-1.04x on the H200's W1, W2 and W7 shapes, attention_tuning_h200.md session 15; with the others, W7
# 25,060 out tok/s against 24,572, session 16).
KV_LAYOUT = "head"
KV_LAYOUTS = ("token", "head")


def kv_storage(num_blocks: int, block_size: int, kv_heads: int, dim: int, dtype, device) -> torch.Tensor:
    """One layer's zeroed K or V cache, ``[num_blocks, block_size, kv_heads, dim]``, laid out as ``KV_LAYOUT`` says."""
    if KV_LAYOUT not in KV_LAYOUTS:
        raise ValueError(f"kv_cache.KV_LAYOUT={KV_LAYOUT!r}: expected one of {KV_LAYOUTS}")
    if KV_LAYOUT == "head":
        return torch.zeros(num_blocks, kv_heads, block_size, dim, dtype=dtype, device=device).transpose(1, 2)
    return torch.zeros(num_blocks, block_size, kv_heads, dim, dtype=dtype, device=device)


class PagedKVCache:
    """Per-layer K/V storage ``[num_blocks, block_size, kv_heads, head_dim]`` (``KV_LAYOUT``: in that order in memory,
    or each block head-major) plus the allocator over its blocks."""

    def __init__(self, layers: dict[int, LayerSpec], num_blocks: int, block_size: int, dtype, device,
                 prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.allocator = BlockAllocator(num_blocks, retain_cached=prefix_caching)
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for idx, spec in layers.items():
            self.k[idx] = kv_storage(num_blocks, block_size, spec.num_kv_heads, spec.head_dim, dtype, device)
            self.v[idx] = kv_storage(num_blocks, block_size, spec.num_kv_heads, spec.v_head_dim, dtype, device)

    @staticmethod
    def bytes_per_block(layers: dict[int, LayerSpec], block_size: int, dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return sum(block_size * s.num_kv_heads * (s.head_dim + s.v_head_dim) * elem for s in layers.values())

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def release(self) -> None:
        """Drop the K/V tensors (the batcher is closed)."""
        self.k.clear()
        self.v.clear()
