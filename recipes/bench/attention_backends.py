"""Time paged-attention backends on the GPU: the Triton kernel, the engine's torch path (decode rows together, each
prefill chunk alone) and dense attention over every sequence's blocks padded to the longest (the naive alternative).

    python recipes/bench/attention_backends.py      # prints one markdown table (W2's attention shape, bf16)
"""

from __future__ import annotations

import os
import random
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "plugin"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from async_batching.attention import AttentionMetadata, dense_attention, torch_paged_attention  # noqa: E402

_PADDED: dict = {}


def padded_dense_attention(q, k_cache, v_cache, meta, scale):
    """Gather every sequence's blocks, pad queries and keys to the longest, attend densely (no window/softcap)."""
    pad_index, pad_pos, unpad = _PADDED[id(meta)]
    T, H, D = q.shape
    B = meta.block_tables.shape[0]
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    nb = -(-int(meta.seq_lens.max()) // bs)
    tables = meta.block_tables[:, :nb].long()
    k = k_cache[tables].reshape(B, nb * bs, kvh, -1).repeat_interleave(H // kvh, dim=2)
    v = v_cache[tables].reshape(B, nb * bs, kvh, -1).repeat_interleave(H // kvh, dim=2)
    qp = torch.cat([q, q.new_zeros(1, H, D)])[pad_index]
    kpos = torch.arange(nb * bs, device=q.device)
    out = dense_attention(qp, k, v, pad_pos, kpos, meta.seq_lens.long(), scale, 0, 0.0)
    return out.reshape(-1, H, out.shape[-1])[unpad].to(q.dtype)
from async_batching.triton_paged_attention import paged_attention  # noqa: E402
from bench.roofline import time_ms  # noqa: E402


def case(q_lens, ctx_lens, heads=32, kv_heads=8, dim=64, bs=16, dtype=torch.bfloat16, dev="cuda"):
    """Packed queries and a shuffled paged cache for sequences with the given query and context lengths."""
    B = len(q_lens)
    blocks_per = [-(-c // bs) for c in ctx_lens]
    nb = sum(blocks_per) + 1
    perm = list(range(1, nb))
    random.Random(0).shuffle(perm)
    width = max(blocks_per)
    table = torch.zeros(B, width, dtype=torch.int32)
    i = 0
    for b, n in enumerate(blocks_per):
        table[b, :n] = torch.tensor(perm[i:i + n])
        i += n
    k = torch.randn(nb, bs, kv_heads, dim, dtype=dtype, device=dev)
    v = torch.randn_like(k)
    T = sum(q_lens)
    q = torch.randn(T, heads, dim, dtype=dtype, device=dev)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    seq = torch.tensor(ctx_lens, dtype=torch.int32)
    qmax = max(q_lens)
    pad_index = torch.full((B, qmax), T, dtype=torch.long)
    pad_pos = torch.zeros(B, qmax, dtype=torch.long)
    unpad = torch.empty(T, dtype=torch.long)
    for b in range(B):
        n = q_lens[b]
        pad_index[b, :n] = torch.arange(qsl[b], qsl[b] + n)
        pad_pos[b, :n] = torch.arange(ctx_lens[b] - n, ctx_lens[b])
        unpad[qsl[b]:qsl[b] + n] = b * qmax + torch.arange(n)
    meta = AttentionMetadata(None, qsl.to(dev), seq.to(dev), table.to(dev), qmax)
    _PADDED[id(meta)] = (pad_index.to(dev), pad_pos.to(dev), unpad.to(dev))
    return q, k, v, meta


def main() -> None:
    rng = random.Random(1)
    cases = {
        "decode 256 seqs, ctx 64..640": ([1] * 256, [rng.randint(64, 640) for _ in range(256)]),
        "decode 32 seqs, ctx 2304": ([1] * 32, [2304] * 32),
        "prefill 16 x 512": ([512] * 16, [512] * 16),
        "mixed: 2048-token chunk + 255 decodes": ([2048] + [1] * 255, [2048] + [rng.randint(64, 640) for _ in range(255)]),
    }
    print("| case (W2 attention shape: 32 heads, 8 kv heads, dim 64, bf16) | triton ms | torch path ms | padded dense ms "
          "| padded / triton | max abs diff |")
    print("|---|---|---|---|---|---|")
    for name, (ql, cl) in cases.items():
        q, k, v, m = case(ql, cl)
        scale = 0.125
        tri = lambda: paged_attention(q, k, v, m.block_tables, m.seq_lens, m.query_start_loc, m.max_query_len, scale)  # noqa: E731
        grouped = lambda: torch_paged_attention(q, k, v, m, scale, 0, 0.0)  # noqa: E731
        ref = lambda: padded_dense_attention(q, k, v, m, scale)  # noqa: E731
        t_tri = time_ms(tri, iters=20, warmup=3)
        t_grouped = time_ms(grouped, iters=3, warmup=3)
        try:  # the torch path pads every sequence to the longest query and context: it can run out of memory
            diff = f"{(tri().float() - grouped().float()).abs().max().item():.3g}"
            t_ref = f"{time_ms(ref, iters=20, warmup=3):.3f}"
            gain = f"{float(t_ref) / t_tri:.1f}x"
        except torch.OutOfMemoryError as e:
            diff, t_ref, gain = "-", f"out of memory ({str(e).split('.')[0]})", "-"
            torch.cuda.empty_cache()
        print(f"| {name} | {t_tri:.3f} | {t_grouped:.3f} | {t_ref} | {gain} | {diff} |", flush=True)


if __name__ == "__main__":
    main()
