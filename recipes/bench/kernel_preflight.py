"""Compile the engine's Triton kernels for an H200 (sm_90) on a machine without a GPU, as the engine launches them.

Device time is scarce and the CPU interpreter runs a kernel's Python semantics, not Triton's compiler: a launch
configuration that the interpreter accepts can still fail to lower for the GPU, or lower without its loads pipelined
through shared memory. This script calls the real launch wrappers (``paged_attention``, ``write_kv``) on CPU tensors
shaped like the workloads' steps, catches each kernel launch, and compiles exactly what Triton's launcher would for
that call: the same binder (specialisation on 16-byte alignment and on integers equal to 1 or divisible by 16), the
same options, an sm_90 target. The H200's SM count and shared memory per block stand in for the device queries.

For each launch it prints the shared memory, registers per thread and spills (from the cubin), the programs an SM
can hold at once, whether the K/V loads are pipelined (async copies in the TTGIR), and the compile time. Launches that Triton's launcher would serve from one compiled kernel (equal specialisation
keys) are compiled once. It compiles into an empty Triton cache of its own, so the times are cold. It exits
non-zero if any launch fails to compile.

    python recipes/bench/kernel_preflight.py [--json out.json] [--only "W1 decode|W7 prefill"]

Needs triton (with its bundled ptxas) and TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_preflight.py compiles for the GPU: run it with TRITON_INTERPRET unset")
import shutil  # noqa: E402
import tempfile  # noqa: E402

# Run as a script: an empty Triton cache of its own, set before triton is imported (cold compiles, nothing left
# behind). Imported for its helpers: the process's usual cache.
_CACHE = tempfile.mkdtemp(prefix="kernel_preflight_") if __name__ == "__main__" else None
if _CACHE:
    os.environ["TRITON_CACHE_DIR"] = _CACHE

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile as triton_compile, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from async_batching import triton_paged_attention as tpa  # noqa: E402
from async_batching import attention  # noqa: E402
from async_batching.attention import AttentionMetadata, decode_order  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
H200_SMS = 132
H200_SMEM_PER_BLOCK = 232448  # bytes a block may opt into on sm_90
SM90_SMEM_PER_SM = 233472  # shared memory of one SM (228 KiB), of which each resident block also takes 1 KiB
SM90_REGS_PER_SM, SM90_THREADS_PER_SM, SM90_BLOCKS_PER_SM = 65536, 2048, 32


def resources(kernel) -> dict:
    """Registers per thread and local memory (spills) from the cubin (cuobjdump, bundled with triton), and the
    programs an SM can hold at once by registers, shared memory and threads."""
    import re
    import subprocess

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        dump = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+).*?LOCAL:(\d+)", dump)
    if not found:
        return {}
    regs, local = int(found.group(1)), int(found.group(2))
    threads = 32 * kernel.metadata.num_warps
    by_regs = SM90_REGS_PER_SM // (-(-regs // 8) * 8 * threads)
    by_smem = SM90_SMEM_PER_SM // (kernel.metadata.shared + 1024)
    return {"regs": regs, "spill_bytes": local,
            "programs_per_sm": min(by_regs, by_smem, SM90_THREADS_PER_SM // threads, SM90_BLOCKS_PER_SM)}


def specialise(fn, args: tuple, kwargs: dict):
    """What ``fn[grid](*args, **kwargs)`` would compile (triton.runtime.jit.JITFunction.run), for TARGET: the
    source and options, and the key Triton's launcher caches the compiled kernel under (equal keys: one binary)."""
    kwargs = dict(kwargs, debug=kwargs.get("debug", False))
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    key = (fn.__name__, str(specialization), str(options))
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return key, ASTSource(fn, signature, constexprs, attrs), options


class _Caught:
    """Stands in for a Triton kernel in its module: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


@contextlib.contextmanager
def caught_launches():
    """Every kernel of the module (``tpa.KERNELS``) caught, a ``_Caught`` each in that order (the list it yields), and
    the device queries answered as an H200 would."""
    names = [kernel.__name__ for kernel in tpa.KERNELS]
    saved = {n: getattr(tpa, n) for n in names + ["_sm_count", "_smem_per_block", "_split_target"]}
    caught = [_Caught(saved[n]) for n in names]
    for name, catcher in zip(names, caught):
        setattr(tpa, name, catcher)
    tpa._sm_count = lambda _index: H200_SMS
    tpa._smem_per_block = lambda _device: H200_SMEM_PER_BLOCK
    tpa._split_target = lambda _device: tpa.SPLIT_PROGRAMS_PER_SM * H200_SMS
    try:
        yield caught
    finally:
        for name, value in saved.items():
            setattr(tpa, name, value)


def _step(contexts, q_lens, heads, kv_heads, head_dim, dtype, block_size=16, layout="token"):
    """A step's attention inputs as the engine hands them over: q a view of a fused q/k/v buffer, a paged cache in
    the engine's layout (``head``: head-major blocks behind the same [block, slot, kv head, dim] view), its new K/V."""
    T = sum(q_lens)
    fused = torch.zeros(T, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q = fused[:, :heads * head_dim].view(T, heads, head_dim)
    k = fused[:, heads * head_dim:(heads + kv_heads) * head_dim].view(T, kv_heads, head_dim)
    v = fused[:, (heads + kv_heads) * head_dim:].view(T, kv_heads, head_dim)
    width = max(-(-c // block_size) for c in contexts) + 1
    blocks = len(contexts) * width + 1
    if layout == "head":
        k_cache = torch.zeros(blocks, kv_heads, block_size, head_dim, dtype=dtype).transpose(1, 2)
        v_cache = torch.zeros(blocks, kv_heads, block_size, head_dim, dtype=dtype).transpose(1, 2)
    else:
        k_cache = torch.zeros(blocks, block_size, kv_heads, head_dim, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(T, dtype=torch.int64),
        query_start_loc=torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32),
        seq_lens=torch.tensor(contexts, dtype=torch.int32),
        block_tables=torch.zeros(len(contexts), width, dtype=torch.int32),
        max_query_len=max(q_lens),
        split_counters=torch.zeros(4096, dtype=torch.int32),
    )
    return q, k, v, k_cache, v_cache, meta


def _flat(step, slots_extra=512):
    """The step as a prefill graph launches it: a flat launch over its query blocks' table (``q_blocks``)."""
    from async_batching.attention import q_block_table

    q, k, v, kc, vc, meta = step
    bq = tpa.flat_block_q(q.shape[1], kc.shape[2], q.shape[2], q.dtype)
    q_lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).tolist()
    seq, blk = q_block_table(q_lens, bq, sum(-(-n // bq) for n in q_lens) + slots_extra)
    meta.q_blocks, meta.max_query_len = (torch.from_numpy(seq), torch.from_numpy(blk), bq), 1
    return step


def _attend(step, fused_write=False, sinks=False, window=0, softcap=0.0, longest_first=False, maxnreg=0,
            decode_warps=0, decode_warps_maxnreg=0, pairs=False):
    q, k, v, kc, vc, meta = step
    tpa.write_kv(k, v, kc, vc, meta.slot_mapping) if not fused_write else None
    tpa.paged_attention(q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.max_query_len, 0.125,
                        sliding_window=window, softcap=softcap, split_counters=meta.split_counters,
                        sinks=torch.zeros(q.shape[1], dtype=torch.float32) if sinks else None,
                        # the engine's decode steps leave the slots to the kernel (attention.DECODE_SLOTS_IN_KERNEL)
                        new_kv=(k, v, None if attention.DECODE_SLOTS_IN_KERNEL else meta.slot_mapping)
                        if fused_write else None,
                        order=decode_order(meta.seq_lens) if longest_first else None, maxnreg=maxnreg,
                        decode_warps=decode_warps, decode_warps_maxnreg=decode_warps_maxnreg,
                        q_blocks=meta.q_blocks, pairs=pairs)


def cases():
    """(name, TUNING overrides, a call of the launch wrappers): the workloads' decode and prefill launches, the cache
    layouts, the fused decode write, the tuning options, fp32, and the attention features of the tested models."""
    bf16, f32 = torch.bfloat16, torch.float32
    w1 = dict(heads=9, kv_heads=3, head_dim=64)
    w7 = dict(heads=16, kv_heads=8, head_dim=128)
    dec = lambda n, ctx: ([ctx] * n, [1] * n)  # noqa: E731
    pre = lambda n, p: ([p] * n, [p] * n)  # noqa: E731
    yield "W1 decode, 512 rows", {}, lambda: _attend(_step(*dec(512, 400), **w1, dtype=bf16))
    yield "W1 decode, head-major blocks", {}, lambda: _attend(_step(*dec(512, 400), **w1, dtype=bf16, layout="head"))
    yield "W1 decode, fused write", {}, lambda: _attend(_step(*dec(512, 400), **w1, dtype=bf16), fused_write=True)
    yield "W1 decode, fused write, head-major", {}, lambda: _attend(
        _step(*dec(512, 400), **w1, dtype=bf16, layout="head"), fused_write=True)
    yield "W1 decode, fused write, capped at 96", {}, lambda: _attend(
        _step(*dec(512, 400), **w1, dtype=bf16), fused_write=True, maxnreg=96)
    yield "W1 decode, longest first", {}, lambda: _attend(_step(*dec(512, 400), **w1, dtype=bf16), longest_first=True)
    yield "W1 decode, blocks of 64", {}, lambda: _attend(_step(*dec(512, 400), **w1, dtype=bf16, block_size=64))
    yield "W1 decode, one_loop", {"one_loop": True}, lambda: _attend(_step(*dec(512, 400), **w1, dtype=bf16))
    yield "W1 decode as the engine launches it", {}, lambda: _attend(
        _step(*dec(512, 400), **w1, dtype=bf16, layout="head"), fused_write=True, longest_first=True, maxnreg=96)
    yield "W1 decode, 2 warps capped at 96 (attention.DECODE_WARPS=2)", {}, lambda: _attend(
        _step(*dec(512, 400), **w1, dtype=bf16, layout="head"), fused_write=True, longest_first=True, maxnreg=96,
        decode_warps=2, decode_warps_maxnreg=96)
    two_warps = {"tile_n": 64, "num_warps": 2, "maxnreg": 0}  # attention.DECODE_WARPS=2 uncapped (session 19)
    for cap in (0, 128):  # attention.DECODE_WARPS_MAXNREG is 96 (the row above)
        name = f"capped at {cap}" if cap else "uncapped"
        yield f"W1 decode, 2 warps {name}", {**two_warps, "maxnreg": cap}, lambda: _attend(
            _step(*dec(512, 400), **w1, dtype=bf16, layout="head"), fused_write=True, longest_first=True)
    for splits in (1, 4):  # 1-warp programs over 32-key tiles, KV ranges split (session 25's sweep)
        for cap in (0, 64):
            yield (f"W1 decode, 1 warp, 32-key tiles, {splits} splits" + (f", capped at {cap}" if cap else ""),
                   {"tile_n": 32, "num_warps": 1, "maxnreg": cap, "num_kv_splits": splits}, lambda: _attend(
                       _step(*dec(512, 400), **w1, dtype=bf16, layout="head"), fused_write=True, longest_first=True))
    yield "W1 decode, pairs of sequences, 1 warp", {"tile_n": 32, "num_warps": 1, "maxnreg": 0, "pairs": True}, \
        lambda: _attend(_step(*dec(512, 400), **w1, dtype=bf16, layout="head"), fused_write=True, longest_first=True)
    for what, kw in (("W1", w1), ("W2", dict(heads=32, kv_heads=8, head_dim=64))):  # attention.DECODE_PAIRS
        yield f"{what} decode, pairs of sequences as the engine launches them", {}, lambda kw=kw: _attend(
            _step(*dec(512, 400), **kw, dtype=bf16, layout="head"), fused_write=True, longest_first=True, maxnreg=96,
            pairs=True)
    yield "fp32 decode, pairs of sequences", {}, lambda: _attend(
        _step(*dec(64, 100), **w1, dtype=f32, layout="head"), fused_write=True, longest_first=True, pairs=True)
    yield "gpt-oss-like decode, pairs: sinks and window", {}, lambda: _attend(
        _step(*dec(256, 900), heads=64, kv_heads=8, head_dim=64, dtype=bf16, layout="head"), sinks=True, window=128,
        fused_write=True, longest_first=True, pairs=True)
    yield "W7 decode, 1 warp, 32-key tiles, 4 splits", {"tile_n": 32, "num_warps": 1, "num_kv_splits": 4}, lambda: _attend(
        _step(*dec(256, 1100), **w7, dtype=bf16, layout="head"), fused_write=True, longest_first=True)
    yield "W7 decode as the engine launches it", {}, lambda: _attend(
        _step(*dec(256, 1100), **w7, dtype=bf16, layout="head"), fused_write=True, longest_first=True)
    yield "W1 decode, all kv heads a program, as the engine", {"heads_per_program": 64}, lambda: _attend(
        _step(*dec(512, 400), **w1, dtype=bf16, layout="head"), fused_write=True, longest_first=True, maxnreg=96)
    yield "W1 decode, all kv heads a program, 3 stages", {"heads_per_program": 64, "num_stages": 3}, lambda: _attend(
        _step(*dec(512, 400), **w1, dtype=bf16, layout="head"), fused_write=True, longest_first=True, maxnreg=96)
    yield "W7 decode, all kv heads a program", {"heads_per_program": 64}, lambda: _attend(
        _step(*dec(256, 1100), **w7, dtype=bf16, layout="head"), fused_write=True, longest_first=True)
    yield "W7 decode, pairs of kv heads a program", {"heads_per_program": 2}, lambda: _attend(
        _step(*dec(256, 1100), **w7, dtype=bf16, layout="head"), fused_write=True, longest_first=True)
    yield "W1 prefill, 224 x 290", {}, lambda: _attend(_step(*pre(224, 290), **w1, dtype=bf16))
    yield "W1 prefill, heavy_first", {"heavy_first": True}, lambda: _attend(_step(*pre(224, 290), **w1, dtype=bf16))
    yield "W1 prefill graph (flat launch), 224 x 290", {}, lambda: _attend(
        _flat(_step(*pre(224, 290), **w1, dtype=bf16)))
    yield "W7 decode, 256 rows", {}, lambda: _attend(_step(*dec(256, 1100), **w7, dtype=bf16))
    yield "W7 decode, head-major blocks", {}, lambda: _attend(_step(*dec(256, 1100), **w7, dtype=bf16, layout="head"))
    yield "W7 decode tail, 8 rows (KV splits)", {}, lambda: _attend(_step(*dec(8, 1900), **w7, dtype=bf16))
    yield "W7 prefill, 31 x 500", {}, lambda: _attend(_step(*pre(31, 500), **w7, dtype=bf16))
    yield "W7 prefill, heavy_first", {"heavy_first": True}, lambda: _attend(_step(*pre(31, 500), **w7, dtype=bf16))
    yield "W7 prefill, maxnreg=128", {"maxnreg": 128}, lambda: _attend(_step(*pre(31, 500), **w7, dtype=bf16))
    yield "W7 prefill graph (flat launch), 31 x 500", {}, lambda: _attend(
        _flat(_step(*pre(31, 500), **w7, dtype=bf16)))
    yield "mixed step: 448 decode rows + 4 prompts", {}, lambda: _attend(
        _step([400] * 448 + [300] * 4, [1] * 448 + [300] * 4, **w1, dtype=bf16))
    yield "fp32 decode and prefill", {}, lambda: (_attend(_step(*dec(8, 100), **w1, dtype=f32)),
                                                  _attend(_step(*pre(4, 60), **w1, dtype=f32)))
    yield "gemma2-like: window and soft-cap", {}, lambda: _attend(
        _step(*pre(4, 300), heads=8, kv_heads=4, head_dim=256, dtype=bf16), window=128, softcap=50.0)
    yield "gpt-oss-like: sinks and window", {}, lambda: _attend(
        _step(*dec(64, 900), heads=64, kv_heads=8, head_dim=64, dtype=bf16), sinks=True, window=128)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None, help="launches whose name contains any of these '|'-separated strings")
    args = ap.parse_args()
    rows, failed = [], 0
    print(f"Triton {triton.__version__}, target {TARGET.backend} sm_{TARGET.arch}\n")
    print("| launch | kernel | constexprs | warps / stages | shared memory | registers (spilled B) | programs per SM "
          "| K/V loads pipelined | compile s | status |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    seen: dict = {}  # specialisation key -> the first launch that compiled it
    for name, tuning, call in cases():
        if args.only and not any(part in name for part in args.only.split("|")):
            continue
        saved_tuning = tpa.TUNING
        tpa.TUNING = dict(tuning)
        try:
            with caught_launches() as caught:
                call()
            launches = [(catcher.real, c) for catcher in caught for c in catcher.calls]
        finally:
            tpa.TUNING = saved_tuning
        for fn, (_grid, largs, lkw) in launches:
            key, src, options = specialise(fn, largs, lkw)
            short = {k: v for k, v in lkw.items() if k in ("BLOCK_Q", "BLOCK_M", "TILE_N", "BLOCK_SIZE", "ONE_LOOP",
                                                            "HEAVY_FIRST", "WRITE_NEW", "BLOCK_STRIDES", "G", "HEAD_DIM",
                                                            "USE_ORDER", "maxnreg")
                     and v not in (False,)}
            row = {"launch": name, "kernel": fn.__name__, "constexprs": short,
                   "warps": lkw.get("num_warps"), "stages": lkw.get("num_stages")}
            if key in seen:
                row.update(status=f"ok (the binary of: {seen[key]})", compile_s=0.0, same_as=seen[key])
                rows.append(row)
                print(f"| {name} | `{row['kernel']}` | {short} | {row['warps']} / {row['stages']} | - | - | - | - | 0 | "
                      f"{row['status']} |")
                continue
            seen[key] = name
            t0 = time.perf_counter()
            try:
                k = triton_compile(src, target=TARGET, options=options.__dict__)
                ttgir = k.asm["ttgir"]
                row.update(status="ok", compile_s=time.perf_counter() - t0, shared=k.metadata.shared,
                           async_copies=ttgir.count("async_copy_global_to_local"), **resources(k))
            except Exception as e:  # noqa: BLE001 -- any lowering failure is this script's finding
                failed += 1
                row.update(status=f"FAILED: {type(e).__name__}: {' '.join(str(e).split())[:300]}",
                           compile_s=time.perf_counter() - t0)
            rows.append(row)
            pipelined = "-" if row["kernel"] == "_write_kv_kernel" or "async_copies" not in row else (
                f"yes ({row['async_copies']} async copies)" if row["async_copies"] else "no")
            regs = f"{row['regs']} ({row['spill_bytes']})" if "regs" in row else "-"
            print(f"| {name} | `{row['kernel']}` | {short} | {row['warps']} / {row['stages']} | "
                  f"{row.get('shared', '-')} | {regs} | {row.get('programs_per_sm', '-')} | {pipelined} | "
                  f"{row['compile_s']:.2f} | {row['status']} |")
    print(f"\n{len(rows)} launches, {len(seen)} distinct binaries compiled, {failed} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "target": f"sm_{TARGET.arch}", "launches": rows}, f, indent=1)
    if _CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
