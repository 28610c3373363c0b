"""Sweep the Triton paged-attention kernel's launch configuration (key tile, warps, pipeline stages) on the attention
shapes of the benchmark workloads, and print, per shape, the default's time beside the best configurations.

    python recipes/bench/attention_tuning.py          # on a GPU machine; one markdown table per shape

Decode shapes report the bandwidth of the K/V they read; prefill shapes the attention FLOP rate (4 x heads x head_dim
per causal (query, key) pair). Compilation runs first in one process per shape (filling Triton's disk cache), then one
process times every configuration on an otherwise idle GPU. Times are GPU times: 20 calls captured in one CUDA graph
and replayed, as the engine's decode graphs run the kernel. Calls launched one by one from Python ("host-launched",
shown for the default) cost about 0.1 ms each on the host, more than the GPU needs for the small decode shapes: the
first sweep (docs/results/attention_tuning_h200.md) timed that way, and its W1/W2 decode rows measured the host.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "plugin"))
sys.path.insert(0, os.path.join(HERE, ".."))
from async_batching import triton_paged_attention as tpa  # noqa: E402
from async_batching.attention import (  # noqa: E402
    DECODE_MAXNREG, DECODE_WARPS, DECODE_WARPS_MAXNREG, FUSED_DECODE_WRITE, decode_order)
from bench.attention_backends import case  # noqa: E402
from bench.roofline import graph_ms, time_ms  # noqa: E402

_R = random.Random(7)
SHAPES = {  # name: (query lengths, context lengths, heads, kv heads, head_dim)
    "W7 decode: 256 seqs, ctx 200..2000, 16/8 heads, dim 128": ([1] * 256, [_R.randint(200, 2000) for _ in range(256)], 16, 8, 128),
    "W2 decode: 256 seqs, ctx 64..640, 32/8 heads, dim 64": ([1] * 256, [_R.randint(64, 640) for _ in range(256)], 32, 8, 64),
    "W1 decode: 512 seqs, ctx 64..768, 9/3 heads, dim 64": ([1] * 512, [_R.randint(64, 768) for _ in range(512)], 9, 3, 64),
    "W3 decode: 32 seqs, ctx 256..2304, 32/8 heads, dim 128": ([1] * 32, [_R.randint(256, 2304) for _ in range(32)], 32, 8, 128),
    "W3 decode at step 256: 32 seqs, ctx 512, 32/8 heads, dim 128": ([1] * 32, [512] * 32, 32, 8, 128),
    "W3 decode at step 1024: 32 seqs, ctx 1280, 32/8 heads, dim 128": ([1] * 32, [1280] * 32, 32, 8, 128),
    "W3 decode at step 2048: 32 seqs, ctx 2304, 32/8 heads, dim 128": ([1] * 32, [2304] * 32, 32, 8, 128),
    "W7 tail decode: 48 seqs, ctx 1000..2000, 16/8 heads, dim 128": ([1] * 48, [_R.randint(1000, 2000) for _ in range(48)], 16, 8, 128),
    "E1 decode: 512 seqs, ctx 800..1060, 32/8 heads, dim 64": ([1] * 512, [_R.randint(800, 1060) for _ in range(512)], 32, 8, 64),
    # W1's decode shape at one context length each (TUNING_SHAPES="W1 decode at"): a launch's time against its K/V
    # bytes, for the fixed cost a program pays whatever its context (session 20)
    **{f"W1 decode at ctx {c}: 512 seqs, 9/3 heads, dim 64": ([1] * 512, [c] * 512, 9, 3, 64)
       for c in (128, 256, 512, 1000, 1024, 2048)},
    # W1's mixed contexts rounded up to whole 32-key tiles: no sequence's last tile masked (session 25)
    "W1 decode in whole tiles: 512 seqs, ctx 64..768 rounded to 32s, 9/3 heads, dim 64": (
        [1] * 512, [-(-random.Random(25 + i).randint(64, 768) // 32) * 32 for i in range(512)], 9, 3, 64),
    "W2 prefill: 16 x 512": ([512] * 16, [512] * 16, 32, 8, 64),
    "W4 prefill: 2 chunks of 4096, ctx 4096 and 6144": ([4096, 4096], [4096, 6144], 32, 8, 64),
    "W7 prefill: 8 x 1024, dim 128": ([1024] * 8, [1024] * 8, 16, 8, 128),
    "W4 prefill: 2 x 4096 prompts": ([4096] * 2, [4096] * 2, 32, 8, 64),
    "E1 prefill: 10 x 800 prompts": ([800] * 10, [800] * 10, 32, 8, 64),
    # the engine's own prefill steps of W1 and W7 (a full budget of their prompts): in the session-11 probe their
    # attention ran at 14% (W1) and 20% (W7) of the matmul rate, against 29% on 8 x 1024 above
    "W1 prefill step: 224 x 64..512, 9/3 heads, dim 64": (_W1 := [_R.randint(64, 512) for _ in range(224)], _W1, 9, 3, 64),
    "W7 prefill step: 31 x 100..1024, 16/8 heads, dim 128": (_W7 := [_R.randint(100, 1024) for _ in range(31)], _W7, 16, 8, 128),
}
# Decode: key tile, warps, stages. Prefill and mixed steps: also the query tile (``target_m`` rows of queries x GQA
# heads, 64 by default for 16-bit inputs).
DECODE_CONFIGS = [dict(tile_n=t, num_warps=w, num_stages=s) for t, w, s in itertools.product((64, 128), (4, 8), (2, 3))]
PREFILL_CONFIGS = [dict(target_m=m, tile_n=t, num_warps=w, num_stages=s)
                   for m, t, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))]
# Decode: also the KV split count (automatic by default: see SPLIT_PROGRAMS_PER_SM), with 64- and 128-key tiles.
DECODE_CONFIGS += [dict(num_kv_splits=n, tile_n=t) for n in (1, 2, 4, 8) for t in (64, 128)]
# Decode: the grid's order (default launch otherwise): a sequence's kv heads side by side (their K/V interleave in the
# cache's [block, slot, head, dim] layout), and the longest contexts first (less tail of long programs at the end).
GRID_ORDERS = [dict(heads_first=True), dict(longest_first=True), dict(heads_first=True, longest_first=True)]
DECODE_CONFIGS += GRID_ORDERS
# Prefill and mixed steps: the query blocks last first (a causal step's heaviest programs start first, not last).
PREFILL_CONFIGS += [dict(heavy_first=True), dict(heavy_first=True, target_m=128), dict(heavy_first=True, tile_n=64)]
# Prefill and mixed steps: a register cap (ptxas, no spills; kernel_preflight.py): W7's launch at head_dim 128 takes
# 178 registers a thread by default, 2 programs an SM; capped at 128 or 96, 4 programs. W1's (8 warps) stays at 2.
PREFILL_CONFIGS += [dict(maxnreg=128), dict(maxnreg=96), dict(maxnreg=128, heavy_first=True), dict(maxnreg=128, num_stages=3)]
# Decode: every key tile through one (masked) loop, one software pipeline over a short context's 3-4 tiles.
ONE_LOOP = [dict(one_loop=True), dict(one_loop=True, num_stages=3), dict(one_loop=True, tile_n=64, num_stages=3),
            dict(one_loop=True, tile_n=64, num_stages=4)]
DECODE_CONFIGS += ONE_LOOP
# Decode: 2 warps a program (half the threads of the 4-warp default, so up to twice the programs an SM holds), with
# no register cap (2 warps hold a tile in half the threads: 96 registers would spill).
WARPS2 = [dict(tile_n=t, num_warps=2, num_stages=s, maxnreg=0) for t in (64, 128) for s in (2, 3, 4)]
# ... 1 warp a program over 32- and 64-key tiles, and the 4-warp launch of 128-key tiles capped at DECODE_MAXNREG
# registers (the engine's decode launch at head dims up to 64 while attention.DECODE_WARPS is 0, the default).
WARPS2 += [dict(tile_n=t, num_warps=1, num_stages=s, maxnreg=0) for t in (32, 64) for s in (2, 3)]
WARPS2 += [dict(tile_n=128, num_warps=4, num_stages=2, maxnreg=DECODE_MAXNREG)]
DECODE_CONFIGS += WARPS2
# Decode: one program per sequence over a group of its kv heads (``paged_attention(heads_per_program=)``, session 20;
# 64: all of them), against a program per (sequence, kv head) through the same masked loop (``one_loop``): a short
# context's program pays its start once for the group. All heads with 3 pipeline stages, and with 2-warp programs over
# 64-key tiles.
HEADS = [dict(one_loop=True), dict(heads_per_program=2), dict(heads_per_program=4), dict(heads_per_program=64),
         dict(heads_per_program=64, num_stages=3), dict(heads_per_program=64, tile_n=64, num_warps=2, maxnreg=0)]
DECODE_CONFIGS += HEADS[1:]
# Decode: 1-warp programs over 32-key tiles (session 25: the shortest fixed cost a launch pays, 5 us against the
# default's 12, and the best marginal rate on W1's shape at one context each, but on mixed contexts the longest
# programs are the launch's tail), with each sequence's key range split in 2 or 4 (merged by the last split), capped
# at 64 registers (20 programs an SM) or not (146: 13); 2-warp programs over 64-key tiles split the same way.
WARPS1 = [dict(tile_n=32, num_warps=1, num_stages=2, maxnreg=cap, num_kv_splits=n) for cap in (0, 64) for n in (1, 2, 4)]
WARPS1 += [dict(tile_n=64, num_warps=2, num_stages=2, maxnreg=0, num_kv_splits=n) for n in (2, 4)]
WARPS1 += [dict(tile_n=32, num_warps=1, num_stages=3, maxnreg=0, num_kv_splits=2)]
# TUNING_ENGINE_BASE=1: every decode launch, the "default" row too, as the engine launches it: head-major blocks of 16
# slots, longest context first, DECODE_MAXNREG, DECODE_WARPS and DECODE_WARPS_MAXNREG passed as the engine passes
# them (the kernel applies them at head dims up to 64; a row's own keys override these), and with FUSED_DECODE_WRITE
# the step's K/V written by the launch (since session 19: until then the sweep timed a launch that writes nothing,
# unlike the engine's). Without it, the rows start from the kernel's plain launch on a token-major cache. The base is a
# program per (sequence, kv head): since session 25 the engine's decode launches at head dims up to 64 take pairs of
# sequences (attention.DECODE_PAIRS), the ``pairs`` rows (TUNING_PAIRS_ONLY, TUNING_PAIRS2_ONLY).
ENGINE_BASE = os.environ.get("TUNING_ENGINE_BASE") == "1"
# Decode: the cache's block size and layout under the default launch, e.g. TUNING_CACHE_LAYOUTS=16,64,head16,head64:
# N is the engine's [block, slot, kv head, dim] with N slots a block; headN stores each block head-major ([block, kv
# head, slot, dim]: a kv head's keys of a block contiguous, 128 B rows apart at head_dim 64 instead of kv_heads x 128 B)
# and hands the kernel a strided view in the engine's index order. With it, only these rows are timed, unless a
# TUNING_*_ONLY below picks configurations too.
CACHE_LAYOUTS = [x for x in os.environ.get("TUNING_CACHE_LAYOUTS", "").split(",") if x]
if CACHE_LAYOUTS:
    DECODE_CONFIGS = PREFILL_CONFIGS = []
if os.environ.get("TUNING_DEFAULT_ONLY") == "1":  # time the launch configuration in use, no sweep (about a minute)
    DECODE_CONFIGS = PREFILL_CONFIGS = []
if os.environ.get("TUNING_GRID_ONLY") == "1":  # the default launch against the grid orders alone (decode shapes)
    DECODE_CONFIGS, PREFILL_CONFIGS = list(GRID_ORDERS), []
if os.environ.get("TUNING_HEAVY_FIRST_ONLY") == "1":  # the default launch against heavy_first and maxnreg (prefill)
    DECODE_CONFIGS, PREFILL_CONFIGS = [], [c for c in PREFILL_CONFIGS if c.get("heavy_first") or c.get("maxnreg")]
if os.environ.get("TUNING_ONE_LOOP_ONLY") == "1":  # the default launch against one_loop alone (decode shapes)
    DECODE_CONFIGS, PREFILL_CONFIGS = list(ONE_LOOP), []
if os.environ.get("TUNING_WARPS2_ONLY") == "1":  # the default launch against 2-warp decode programs alone
    DECODE_CONFIGS, PREFILL_CONFIGS = list(WARPS2), []
W1 = dict(tile_n=32, num_warps=1, num_stages=2, maxnreg=0)  # 1-warp programs over 32-key tiles, uncapped
# Decode, 1-warp programs: one loop over every tile (the masked last tile's own pipeline start gone), and the grid in
# sequence order rather than longest first. (Session 25 also timed, and dropped from the kernel, a boustrophedon order
# of the programs over the SMs and splits of long key ranges only: no gain; attention_tuning_h200.md.)
LOOPS = [dict(W1), dict(W1, one_loop=True), dict(W1, one_loop=True, num_stages=3), dict(W1, longest_first=False),
         dict(longest_first=False), dict(one_loop=True)]
# Decode: a program per pair of sequences (the i-th and the (B-1)-th-i under the longest-first order) and kv head, so
# 1-warp programs of one wave carry about equal work.
PAIRS = [dict(W1), dict(W1, pairs=True), dict(W1, pairs=True, num_stages=3), dict(pairs=True),
         dict(tile_n=64, num_warps=2, num_stages=2, maxnreg=0, pairs=True), dict(W1, pairs=True, tile_n=64)]
P2 = dict(tile_n=64, num_warps=2, num_stages=2, maxnreg=0, pairs=True)  # the best pairs launch of the first sweep
PAIRS2 = [dict(P2), dict(P2, num_stages=3), dict(P2, maxnreg=128), dict(P2, maxnreg=96), dict(P2, tile_n=32),
          dict(P2, tile_n=128), dict(P2, num_warps=4), dict(P2, num_warps=4, tile_n=128, maxnreg=96)]
if os.environ.get("TUNING_PAIRS2_ONLY") == "1":
    DECODE_CONFIGS, PREFILL_CONFIGS = list(PAIRS2), []
if os.environ.get("TUNING_PAIRS_ONLY") == "1":
    DECODE_CONFIGS, PREFILL_CONFIGS = list(PAIRS), []
if os.environ.get("TUNING_LOOPS_ONLY") == "1":
    DECODE_CONFIGS, PREFILL_CONFIGS = list(LOOPS), []
if os.environ.get("TUNING_WARPS1_ONLY") == "1":  # the default launch against split 1- and 2-warp programs alone
    DECODE_CONFIGS, PREFILL_CONFIGS = list(WARPS1), []
if os.environ.get("TUNING_HEADS_ONLY") == "1":  # the default launch against decode programs over kv-head groups alone
    DECODE_CONFIGS, PREFILL_CONFIGS = list(HEADS), []
if os.environ.get("TUNING_SHAPES"):  # a substring per shape to keep, comma-separated (e.g. "decode")
    SHAPES = {n: v for n, v in SHAPES.items() if any(k in n for k in os.environ["TUNING_SHAPES"].split(","))}


def configs(name):
    return DECODE_CONFIGS if max(SHAPES[name][0]) == 1 else PREFILL_CONFIGS


def _label(cfg) -> str:
    if cfg in GRID_ORDERS:
        return "grid: " + " + ".join(k.replace("_", " ") for k in cfg)
    if cfg.get("heads_per_program"):
        n = cfg["heads_per_program"]
        rest = {k: v for k, v in cfg.items() if k != "heads_per_program"}
        return (f"{'all' if n >= 64 else n} kv heads a program"
                + (", " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in rest.items()) if rest else ""))
    if cfg.get("pairs"):
        rest = {k: v for k, v in cfg.items() if k != "pairs"}
        return "pairs" + (", " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in rest.items()) if rest else "")
    if cfg.get("one_loop") or cfg.get("longest_first") is False:
        rest = {k: v for k, v in cfg.items() if k not in ("one_loop", "longest_first")}
        if not cfg.get("one_loop"):
            return "sequence order" + (", " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in rest.items()) if rest else "")
        return "one loop" + (", " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in rest.items()) if rest else "")
    if "num_kv_splits" in cfg:
        extra = "".join(f", {cfg[k]} {k.replace('num_', '')}" for k in ("num_warps", "num_stages") if k in cfg)
        cap = f", {cfg['maxnreg']} registers" if cfg.get("maxnreg") else ""
        return f"{cfg['num_kv_splits']} KV splits, tile {cfg.get('tile_n', 'default')}" + extra + cap
    rows = f"{cfg['target_m']} rows, " if "target_m" in cfg else ""
    cap = f", {cfg['maxnreg']} registers" if cfg.get("maxnreg") else ""
    if "tile_n" not in cfg:
        return cap.lstrip(", ") or str(cfg)
    return rows + f"tile {cfg['tile_n']}, {cfg['num_warps']} warps, {cfg['num_stages']} stages" + cap


def dense_flash_ms(name) -> float:
    """Reference for prefill shapes: torch's SDPA (flash backend) on the same prompts stored densely (no paging, full
    prompts from position 0 only, so shapes whose queries continue a context are skipped): what a dense FlashAttention
    kernel does with the same FLOPs."""
    ql, cl, h, kvh, d = SHAPES[name]
    if ql != cl or len(set(ql)) != 1:
        return float("nan")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(len(ql), h, ql[0], d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(len(ql), kvh, ql[0], d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)

    def fn():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    try:
        return graph_ms(fn)
    except Exception as e:  # noqa: BLE001 - a backend torch cannot run on this card/shape
        print(f"SDPA flash reference failed on {name}: {e}", flush=True)
        return float("nan")


def build(name, layout=None):
    """The shape's call of the kernel (and whether it is decode, and its work), its cache as ``layout`` says (see
    CACHE_LAYOUTS; None: the engine's, head16, for decode shapes under ENGINE_BASE, else 16). ``fn.base``: the TUNING
    keys every launch of it starts from (ENGINE_BASE's order, for decode shapes)."""
    ql, cl, h, kvh, d = SHAPES[name]
    decode = max(ql) == 1
    engine = ENGINE_BASE and decode
    layout = layout or ("head16" if engine else "16")
    torch.manual_seed(0)
    q, k, v, m = case(ql, cl, heads=h, kv_heads=kvh, dim=d, bs=int(layout.removeprefix("head")))
    if layout.startswith("head"):
        k, v = (c.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3) for c in (k, v))
    scale = d ** -0.5
    new_kv = None
    if engine and FUSED_DECODE_WRITE:  # the engine's decode launch writes the step's K/V into the cache first
        bs = k.shape[1]
        pos = m.seq_lens.long() - 1
        slots = m.block_tables[torch.arange(len(ql), device=q.device), pos // bs].long() * bs + pos % bs
        new_kv = (torch.randn(len(ql), kvh, d, device=q.device, dtype=q.dtype),
                  torch.randn(len(ql), kvh, d, device=q.device, dtype=q.dtype), slots)

    def fn():
        return tpa.paged_attention(q, k, v, m.block_tables, m.seq_lens, m.query_start_loc, m.max_query_len, scale,
                                   maxnreg=DECODE_MAXNREG if engine else 0, decode_warps=DECODE_WARPS if engine else 0,
                                   decode_warps_maxnreg=DECODE_WARPS_MAXNREG if engine else 0,
                                   new_kv=new_kv)

    fn.seq_lens = m.seq_lens
    fn.base = dict(longest_first=True) if engine else {}
    if decode:
        work = sum(cl) * kvh * d * 2 * q.element_size()  # bytes of K and V read
    else:
        work = sum(4 * h * d * (c * (c + 1) // 2 - (c - n) * (c - n + 1) // 2) for n, c in zip(ql, cl))
    return fn, decode, work


def run(fn, cfg):
    tpa.TUNING.clear()
    tpa.TUNING.update(getattr(fn, "base", {}))
    tpa.TUNING.update(cfg or {})
    if tpa.TUNING.get("longest_first"):
        # the order as the engine would stage it from the host, not an argsort timed with every launch (sessions
        # 10-13 timed the argsort and its cast in the graph: two small kernels more than the launch they ordered)
        tpa.TUNING["order"] = decode_order(fn.seq_lens)  # the engine's own order (attention.DECODE_LONGEST_FIRST)
    try:
        return fn()
    except Exception as e:  # e.g. out of shared memory for a large tile
        return e


def compile_only(name):
    fn, _, _ = build(name)
    for cfg in configs(name):
        run(fn, cfg)
    for layout in CACHE_LAYOUTS if max(SHAPES[name][0]) == 1 else ():
        run(build(name, layout)[0], None)
    torch.cuda.synchronize()


def layout_rows(name) -> list[dict]:
    """The default launch on each of CACHE_LAYOUTS (decode shapes): GPU ms, K/V read rate, against the engine's
    layout of 16-slot blocks; the max abs diff is against the token-major cache of the same block size (the same
    values: 0 expected)."""
    print(f"\n## {name}: cache layouts\n\n| cache layout | GPU ms (graph) | GB/s K/V read | vs 16-slot blocks | "
          "max abs diff vs token-major |\n|---|---|---|---|---|")
    base_ms, rows = None, []
    for layout in ["16"] + [x for x in CACHE_LAYOUTS if x != "16"]:
        fn, _, work = build(name, layout)
        out = run(fn, None)
        if isinstance(out, Exception):
            print(f"| {layout} | failed: {out} | | | |", flush=True)
            continue
        same = run(build(name, layout.removeprefix("head"))[0], None) if layout.startswith("head") else out
        diff = (out.float() - same.float()).abs().max().item()
        ms = graph_ms(lambda: run(fn, None))
        base_ms = base_ms or ms
        label = f"head-major, {layout[4:]} slots a block" if layout.startswith("head") else f"{layout} slots a block"
        print(f"| {label} | {ms:.4f} | {work / ms / 1e6:,.0f} | {base_ms / ms:.2f}x | {diff:.3g} |", flush=True)
        rows.append(dict(layout=layout, ms=ms, rate=work / ms / 1e6, diff=diff))
    return rows


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--compile":
        compile_only(sys.argv[2])
        return
    procs = [subprocess.Popen([sys.executable, __file__, "--compile", n]) for n in SHAPES]
    for p in procs:
        p.wait()
    results = {}
    for name in SHAPES:
        if CACHE_LAYOUTS and max(SHAPES[name][0]) == 1:
            results[name] = dict(layouts=layout_rows(name))
        if CACHE_LAYOUTS and not configs(name):
            continue
        fn, decode, work = build(name)
        ref = run(fn, None).float().clone()
        rows = []
        for cfg in [None] + configs(name):
            out = run(fn, cfg)
            if isinstance(out, Exception):
                continue
            diff = (out.float() - ref).abs().max().item()
            ms = graph_ms(fn)  # TUNING as run() left it (a precomputed order, if any): the launch alone in the graph
            if cfg is None:
                host_ms = time_ms(lambda: run(fn, cfg), iters=10, warmup=2)
            rate = work / ms / 1e6 if decode else work / ms / 1e9  # GB/s (decode) or TFLOP/s (prefill)
            rows.append((ms, cfg, rate, diff))
        tpa.TUNING.clear()
        default = rows[0]
        unit = "GB/s K/V read" if decode else "TFLOP/s"
        ref_ms = float("nan") if decode else dense_flash_ms(name)
        ref = "" if ref_ms != ref_ms else (f" torch SDPA (flash, dense, same FLOPs): {ref_ms:.4f} ms, "
                                           f"{work / ref_ms / 1e9:,.0f} TFLOP/s.")
        print(f"\n## {name}\n\nDefault launched one call at a time from Python: {host_ms:.4f} ms a call.{ref}\n\n"
              f"| config | GPU ms (graph) | {unit} | vs default | max abs diff |\n|---|---|---|---|---|")
        best = sorted(rows[1:], key=lambda r: r[0])[:6 if len(rows) > 13 else None]  # a short sweep: every row
        splits = [r for r in rows[1:] if r[1] and ("num_kv_splits" in r[1] or r[1] in GRID_ORDERS) and r not in best]
        for ms, cfg, rate, diff in [default] + best + splits:
            label = "default" if cfg is None else _label(cfg)
            print(f"| {label} | {ms:.4f} | {rate:,.0f} | {default[0] / ms:.2f}x | {diff:.3g} |", flush=True)
        results.setdefault(name, {}).update(sdpa_flash_ms=ref_ms, rows=[dict(ms=ms, cfg=cfg, rate=rate, diff=diff)
                                                         for ms, cfg, rate, diff in rows])
    print(context_fit(results))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "attention_tuning.json"), "w") as f:
            json.dump(results, f, indent=1)


def context_fit(results: dict, prefix: str = "W1 decode at ctx ") -> str:
    """A line through each configuration's GPU ms against the K/V bytes of the shapes at one context each (``prefix``):
    the intercept is what a launch costs whatever its contexts (programs' starts, the launch's ramp and tail), the slope
    the marginal read rate. Empty without two such shapes."""
    shapes = [n for n in results if n.startswith(prefix) and results[n].get("rows")]
    if len(shapes) < 2:
        return ""
    by_cfg: dict = {}
    for name in shapes:
        ql, cl, h, kvh, d = SHAPES[name]
        work = sum(cl) * kvh * d * 2 * 2  # bytes of K and V at 16 bits
        for row in results[name]["rows"]:
            by_cfg.setdefault(json.dumps(row["cfg"], sort_keys=True, default=str), []).append((work, row["ms"]))
    lines = [f"\n## {prefix.strip()}: GPU ms = intercept + K/V bytes / rate\n",
             "| config | intercept us | marginal TB/s | shapes |", "|---|---|---|---|"]
    for key, pts in by_cfg.items():
        if len(pts) < 2:
            continue
        n = len(pts)
        mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
        slope = sum((x - mx) * (y - my) for x, y in pts) / max(sum((x - mx) ** 2 for x, _ in pts), 1e-30)
        cfg = json.loads(key)
        label = "default" if cfg is None else _label(cfg)
        rate = f"{1e-9 / slope:.2f}" if slope > 0 else "-"  # ms per byte -> TB/s
        lines.append(f"| {label} | {1e3 * (my - slope * mx):.1f} | {rate} | {n} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
