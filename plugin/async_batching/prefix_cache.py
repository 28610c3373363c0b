"""Automatic prefix caching: full KV blocks are named by a chained hash of their token ids, so a request can reuse
the longest chain of blocks another request already computed, and compute only the rest.

The allocator (kv_cache.py) owns the index and the LRU of cached blocks; this module decides which blocks of a
request to look up and to register. K/V of a block depends only on the token ids up to its end (causal models, no
adapters), so the chain hash of those ids is its name; sliding-window layers keep every block, so they are correct too.
"""

from __future__ import annotations

import hashlib
from array import array

from .kv_cache import BlockAllocator
from .request import Request


def block_hash(parent: bytes, tokens) -> bytes:
    """Hash of one full block, chained to the hash of the blocks before it (16 bytes)."""
    return hashlib.blake2b(array("q", tokens).tobytes(), digest_size=16, key=parent).digest()


class PrefixCache:
    """Looks up and registers the full blocks of requests in the allocator's prefix index."""

    def __init__(self, allocator: BlockAllocator, block_size: int, enabled: bool):
        self.allocator = allocator
        self.block_size = block_size
        self.enabled = enabled

    def applies_to(self, req: Request) -> bool:
        """Caching on, or a prompt with several samples: they share its blocks even with caching off."""
        return self.enabled or req.parent is not None or req.sampling.n > 1

    def _hashes(self, req: Request, num_blocks: int) -> list[bytes]:
        """The request's chain hashes of its first ``num_blocks`` full blocks (computed once, then kept)."""
        hashes, bs = req.block_hashes, self.block_size
        if len(hashes) < num_blocks:
            prompt, out, p = req.prompt_ids, req.output_ids, len(req.prompt_ids)
            a, b = len(hashes) * bs, num_blocks * bs
            if b <= p:
                tokens = prompt[a:b]
            elif a >= p:
                tokens = out[a - p:b - p]
            else:
                tokens = prompt[a:] + out[:b - p]
            # The blocks' bytes in one conversion; each block hashes its slice, as block_hash() would.
            data, step = array("q", tokens).tobytes(), bs * 8
            parent = hashes[-1] if hashes else b""
            for start in range(0, len(data), step):
                parent = hashlib.blake2b(data[start:start + step], digest_size=16, key=parent).digest()
                hashes.append(parent)
        return hashes[:num_blocks]

    def match(self, req: Request, max_tokens: int) -> list[int]:
        """Blocks (references taken) holding the longest cached prefix of the request's first ``max_tokens`` tokens."""
        n = min(max_tokens, req.num_known) // self.block_size
        if n <= 0 or not self.applies_to(req):
            return []
        return self.allocator.lookup(self._hashes(req, n))

    def register(self, req: Request, registered: list[int], prompt_only: bool = True) -> None:
        """Index the request's full blocks whose tokens are known and scheduled (appending them to ``registered``).

        While a request runs only its prompt blocks are indexed (what other prompts share); the blocks of its generated
        tokens are indexed when it is preempted, so that its recompute finds them, at no cost to decode steps."""
        limit = len(req.prompt_ids) if prompt_only else req.num_known
        full = min(req.num_computed, req.num_known, limit) // self.block_size
        start = req.num_indexed_blocks
        if full <= start:
            return
        req.num_indexed_blocks = full
        if not self.applies_to(req):
            return
        hashes = self._hashes(req, full)
        for j in range(start, full):
            if self.allocator.register(req.block_ids[j], hashes[j]):
                registered.append(req.block_ids[j])
