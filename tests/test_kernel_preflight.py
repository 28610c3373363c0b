"""recipes/bench/kernel_preflight.py: the engine's Triton launches compiled for sm_90 on a machine without a GPU.

Runs where triton (with its bundled ptxas) is installed and no GPU is (on the GPU machine the kernel tests compile
natively); skipped otherwise, as in CI, whose torch has no triton."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU machine compiles the kernels natively")


@pytest.fixture(scope="module")
def preflight(tmp_path_factory):
    out = tmp_path_factory.mktemp("preflight") / "preflight.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    site = str(Path(triton.__file__).resolve().parents[1])  # where this triton is installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "plugin"), site, env.get("PYTHONPATH", "")) if p)
    run = subprocess.run([sys.executable, str(ROOT / "recipes/bench/kernel_preflight.py"), "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    if "ptxas" in run.stderr and run.returncode:
        pytest.skip(f"no usable ptxas: {run.stderr[-300:]}")
    return run, json.loads(out.read_text()) if out.exists() else None


def test_every_launch_of_the_engines_kernels_compiles_for_sm90(preflight):
    run, result = preflight
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    launches = result["launches"]
    assert len(launches) >= 30 and all(r["status"].startswith("ok") for r in launches), launches
    assert "0 failed" in run.stdout


def test_attention_launches_pipeline_their_kv_loads_through_shared_memory(preflight):
    """Each distinct attention binary (decode, prefill, fp32, the tuning options, the fused write) lowers its K/V
    tile loads to async copies: offline compiles without the launcher's specialisation (a stride of 1 left a runtime
    value) had none, so this is what a compile with the real specialisation must keep."""
    _, result = preflight
    attention = [r for r in result["launches"] if r["kernel"] == "_paged_attention_kernel" and "same_as" not in r]
    assert len(attention) >= 8
    assert all(r["async_copies"] > 0 for r in attention), [(r["launch"], r["async_copies"]) for r in attention]


def test_head_major_blocks_reuse_the_attention_binary_and_compile_their_own_write(preflight):
    """The attention kernel addresses the cache through its strides, so head-major blocks need no attention variant
    of their own (the same specialisation: every stride a multiple of 16); the K/V write takes its (block, slot)
    strides path (BLOCK_STRIDES), a binary of its own."""
    _, result = preflight
    rows = {(r["launch"], r["kernel"]): r for r in result["launches"]}
    assert rows[("W7 decode, head-major blocks", "_paged_attention_kernel")].get("same_as") == "W7 decode, 256 rows"
    write = rows[("W7 decode, head-major blocks", "_write_kv_kernel")]
    assert "same_as" not in write and write["constexprs"].get("BLOCK_STRIDES") is True


def test_no_launch_spills_registers_and_the_register_cap_holds_on_w7_prefill(preflight):
    """No compiled launch spills registers to local memory, the tuning sweep's ``maxnreg=128`` on W7's prefill
    included; the capped launch takes at most 128 registers a thread and an SM holds at least as many of its programs
    (with triton 3.6: 178 registers and 2 programs uncapped, 4 capped)."""
    _, result = preflight
    compiled = [r for r in result["launches"] if "same_as" not in r]
    assert all(r.get("spill_bytes") == 0 for r in compiled), [(r["launch"], r.get("spill_bytes")) for r in compiled]
    rows = {(r["launch"], r["kernel"]): r for r in compiled}
    capped, default = rows[("W7 prefill, maxnreg=128", "_paged_attention_kernel")], rows[("W7 prefill, 31 x 500",
                                                                                          "_paged_attention_kernel")]
    assert capped["regs"] <= 128 and capped["programs_per_sm"] >= default["programs_per_sm"]


def test_pairs_decode_launch_holds_eight_programs_an_sm_without_spills(preflight):
    """``attention.DECODE_PAIRS``'s launch (2 warps over 64-key tiles, capped at ``PAIRS_MAXNREG``), as the engine
    makes it for W1's and W2's decode shapes: the pairs kernel, its K/V loads pipelined, no spills under the cap, and
    8 programs an SM (what the H200 sweep measured, session 25)."""
    _, result = preflight
    rows = [r for r in result["launches"] if r["launch"].endswith("pairs of sequences as the engine launches them")]
    assert len(rows) == 2 and all(r["kernel"] == "_paged_decode_pairs_kernel" for r in rows), rows
    for r in rows:
        assert r["spill_bytes"] == 0 and r["programs_per_sm"] >= 8 and r["async_copies"] > 0, r
