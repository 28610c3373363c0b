"""The benchmark recipe runs end to end on CPU (tiny workload): one table row and JSON entry per variant, same tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE_VARIANTS = ["static", "ours_sync", "ours_async"]
VARIANTS = ENGINE_VARIANTS + ["hf_cb"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Run ``recipes/benchmark.py`` once (each variant in its own process) and return (summary JSON, table, out dir)."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [
        sys.executable, str(ROOT / "recipes" / "benchmark.py"),
        "workload=tiny", "device=cpu", f"variants=[{','.join(VARIANTS)}]", f"out_dir={out}",
        "static_batch_size=4",  # four padded batches, so batch order shows in TTFT
        "warmup.requests=4", "timeout_s=120",
        "hf_cb.max_batch_tokens=256", "hf_cb.num_blocks=64",  # its defaults size a cache for a GPU: slow on CPU
    ]
    proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "bench_tiny.json").read_text())
    return summary, (out / "bench_tiny.md").read_text(), out


def _by_variant(summary):
    return {r["variant"]: r for r in summary["results"]}


def test_every_engine_variant_reports_positive_throughput_and_the_same_tokens(bench):
    summary, table, _ = bench
    results = _by_variant(summary)
    expected = summary["workload"]["requests"] * summary["workload"]["new_tokens"]
    for name in ENGINE_VARIANTS:
        r = results[name]
        assert r["status"] == "ok", (name, r.get("error"), r.get("problems"))
        assert r["output_tok_s"] > 0 and r["total_tok_s"] > r["output_tok_s"] and r["wall_s"] > 0
        assert r["output_tokens"] == expected, name
        assert r["ttft_p50_s"] is not None and 0 < r["ttft_p50_s"] <= r["ttft_p99_s"]
        assert f"| {name} |" in table
    digests = {name: results[name]["output_sha256"] for name in ENGINE_VARIANTS}
    assert None not in digests.values() and len(set(digests.values())) == 1, digests  # padded generate's tokens too
    assert summary["roofline"]["total_s"] > 0 and results["ours_sync"]["roofline_pct"] > 0


def test_engine_variants_report_cpu_time_per_step_and_host_phases(bench):
    summary, _, out = bench
    results = _by_variant(summary)
    for name in ("ours_sync", "ours_async"):
        r = results[name]
        assert r["steps"] > 0 and r["cpu_ms_per_step"] > 0
        # On the CPU no step replays a graph: every step's launch is an "other" step's, and the parts add up.
        launch = r["launch_ms"]
        assert (launch["graph_steps"], launch["per_graph_step"], launch["other_steps"]) == (0, None, r["steps"])
        assert launch["per_other_step"] == pytest.approx(r["cpu_ms_per_step_parts"]["launch"])
        assert sum(r["cpu_ms_per_step_parts"].values()) == pytest.approx(r["cpu_ms_per_step"])
        assert {"ab.schedule", "ab.prepare"} <= set(r["profile"]["host_ms_per_step"])
        window = json.loads((out / "timelines" / f"tiny_{name}.json").read_text())
        assert window["host"]["ab.launch"], name  # the timeline window saw the engine's host phases
    assert (out / "timeline_tiny.png").stat().st_size > 0
    assert (out / "throughput_tiny.png").stat().st_size > 0


def test_static_batches_later_in_the_queue_wait_longer(bench):
    summary, _, _ = bench
    r = _by_variant(summary)["static"]
    assert r["ttft_p99_s"] > r["ttft_p50_s"]


def test_hf_generate_batch_matches_the_token_count(bench):
    summary, table, _ = bench
    r = _by_variant(summary)["hf_cb"]
    if r["status"] != "ok":
        pytest.skip(f"transformers' generate_batch did not run here: {r.get('error')}")
    assert r["output_tokens"] == _by_variant(summary)["ours_sync"]["output_tokens"]
    assert r["output_tok_s"] > 0 and "| hf_cb |" in table
    assert r["config"]["continuous_batching_config"]["use_async_batching"] is False


def test_roofline_of_w2_matches_the_benchmarks_example():
    """BENCHMARKS.md: W2 on an H100 is about 0.23 s prefill + 0.23 s decode, roughly 70,000 output tokens/s."""
    import yaml

    sys.path.insert(0, str(ROOT / "recipes"))
    from bench.roofline import DeviceRates, roofline
    from bench.workloads import ModelShape, Workload

    workload = Workload.from_dict(yaml.safe_load((ROOT / "conf" / "workload" / "w2.yaml").read_text()))
    shape = ModelShape.of(workload)
    limit = roofline([len(p) for p in workload.prompts()], workload.new_tokens, shape, DeviceRates(790.0, 3.0, "H100"), 256)
    assert 1.2e9 < shape.params < 1.3e9 and shape.matmul_params == shape.params  # tied embeddings: read as the LM head
    assert limit.prefill_s == pytest.approx(0.23, abs=0.02) and limit.decode_s == pytest.approx(0.23, abs=0.02)
    assert 65_000 < limit.output_tokens_per_s < 75_000


def test_gpu_busy_is_the_union_of_kernel_intervals_outside_setup():
    sys.path.insert(0, str(ROOT / "recipes"))
    from bench.profiling import Trace

    trace = Trace(run=(0, 100), kernels=[(10, 30), (20, 40), (90, 120), (0, 5)], setup=[(0, 10)])
    assert trace.wall_ns == 90  # the setup span is not part of the run's wall time
    assert trace.gpu_busy_ns() == 30 + 10  # [10, 40) and [90, 100); the kernel inside setup does not count


def test_steady_breakdown_counts_steps_kernels_and_family_time_inside_the_window_only():
    sys.path.insert(0, str(ROOT / "recipes"))
    from bench.profiling import Trace

    # run [0, 200); the window 50%-100% is [100, 200): two steps start there, three kernels start there.
    trace = Trace(run=(0, 200), kernels=[(10, 20), (100, 110), (120, 150), (160, 170)],
                  families=["attn", "attn", "mm", "attn"], names=["attn_a", "attn_b", "gemm", "attn_b"],
                  host={"ab.launch.forward": [(5, 6), (99, 101), (101, 102), (150, 151)]})
    st = trace.steady(0.5, 1.0)
    assert st["steps"] == 2  # forwards starting at 101 and 150; the one at 99 is before the window
    assert st["wall_ms_per_step"] == pytest.approx(100 / 1e6 / 2)
    assert st["gpu_ms_per_step"] == pytest.approx(50 / 1e6 / 2)
    assert st["kernels_per_step"] == 1.5
    assert list(st["kernel_ms_per_step"]) == ["mm", "attn"]  # costliest first
    assert st["kernel_ms_per_step"]["attn"] == pytest.approx(20 / 1e6 / 2, abs=1e-4)
    assert [(k["name"], k["per_step"], k["mean_us"]) for k in st["top_kernels"]] == [
        ("gemm", 0.5, 30 / 1e3), ("attn_b", 1.0, 10 / 1e3)]  # by time in the window; attn_a lies before it
    assert Trace(run=(0, 10), kernels=[(1, 2)], families=["a"]).steady(0.5, 1.0)["steps"] is None


def test_gc_pauses_counts_a_full_collection_inside_the_block_only():
    import gc

    sys.path.insert(0, str(ROOT / "recipes"))
    from bench.runner import gc_pauses

    with gc_pauses() as pauses:
        gc.collect()
    assert pauses["collections"][2] == 1 and pauses["pause_s"][2] > 0
    gc.collect()  # after the block: not counted
    assert pauses["collections"][2] == 1


def test_host_step_probe_reports_every_phase_of_w1s_decode_steps(tmp_path):
    """recipes/bench/host_step.py: W1's 512 requests through the real engine with the model stubbed; nearly every
    step is a decode step, and each phase of the host's work is measured."""
    out = tmp_path / "host.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "plugin"))
    subprocess.run([sys.executable, str(ROOT / "recipes/bench/host_step.py"), "--repeat", "1", "--out", str(out)],
                   check=True, env=env, capture_output=True, timeout=300)
    run = json.loads(out.read_text())["runs"][0]
    assert run["steps"] >= 256 and run["decode_steps"] >= 240  # 256 new tokens; prefill spans the first steps
    assert all(run["decode_ms"][p] > 0 for p in ("schedule", "prepare", "launch", "process"))


def test_the_report_says_each_variant_compiled_into_caches_of_its_own(bench):
    summary, table_md, _ = bench
    assert summary["config"]["compile_cache"] == "per_variant"
    assert "Each variant compiled into empty inductor and Triton caches of its own" in table_md


def test_each_variant_compiles_into_empty_caches_of_its_own_that_inductor_uses_and_that_are_removed_after():
    """``compile_cache=per_variant`` (the default): the variant's process resolves inductor's and Triton's caches to a
    fresh directory of its own (inductor's own lookup, in a child process), a second variant gets another one, and
    both are gone afterwards; ``shared`` adds nothing; an unknown mode is refused by name."""
    sys.path[:0] = [str(ROOT / "recipes")]
    try:
        import benchmark
    finally:
        del sys.path[0]
    probe = ("from torch._inductor.runtime.cache_dir_utils import cache_dir; import os; "
             "print(cache_dir()); print(os.environ['TRITON_CACHE_DIR']); print(len(os.listdir(cache_dir())) if "
             "os.path.isdir(cache_dir()) else 0)")
    seen = []
    with benchmark.compile_cache("per_variant", "w1_ours_async") as a, benchmark.compile_cache("per_variant", "w1_other") as b:
        for env in (a, b):
            out = subprocess.run([sys.executable, "-c", probe], env=benchmark._child_env(env), capture_output=True,
                                 text=True, timeout=120, check=True).stdout.split()
            assert out[0] == env["TORCHINDUCTOR_CACHE_DIR"] and out[1] == env["TRITON_CACHE_DIR"] and out[2] == "0"
            seen.append(Path(env["TORCHINDUCTOR_CACHE_DIR"]).parent)
        assert seen[0] != seen[1] and all(d.is_dir() for d in seen)
    assert not any(d.exists() for d in seen)
    with benchmark.compile_cache("shared", "w1_ours_async") as env:
        assert env == {}
    with pytest.raises(ValueError, match="compile_cache='fresh': expected one of"):
        with benchmark.compile_cache("fresh", "w1_ours_async"):
            pass


def test_step_probe_splits_a_compiled_prefill_steps_host_time_by_layer_of_the_stack(tmp_path):
    """recipes/bench/step_probe.py on a tiny 4-layer llama, compiled, on the CPU: each prefill section carries a host
    profile whose layers nest as the stack does (forward > dynamo's entry > inductor's code > the attention op, one
    entry per layer call), within the profiled call's total."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(json.dumps({
        "name": "tinyprobe", "description": "tiny", "dtype": "float32", "seed": 0, "requests": 16,
        "prompt_len": [8, 40], "new_tokens": 4,
        "model": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 256,
                  "max_position_embeddings": 512}}))
    out = tmp_path / "probe.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "plugin"))
    subprocess.run([sys.executable, str(ROOT / "recipes/bench/step_probe.py"), "--workload", str(spec), "--batcher",
                    json.dumps({"max_batch_tokens": 256, "max_num_seqs": 16, "compile": True}), "--top", "5",
                    "--out", str(out)], check=True, env=env, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    assert report["variant"] is None  # the engine's own settings
    sections = report["prefill"]
    rec = sections["256 budget, compiled"]["host_profile"]
    layers = {what: (ms, calls) for what, ms, calls in rec["layers"]}
    fwd, dyn, ind, att = (layers[k] for k in ("forward (ModelRunner.forward)", "dynamo: entry to compiled code",
                                              "inductor: the compiled graphs' code", "attention op (our custom op)"))
    assert rec["total_ms"] >= fwd[0] >= dyn[0] >= ind[0] >= att[0] > 0
    assert att[1] == 4 and fwd[1] == 1  # one attention call per layer of the one step
    assert len(rec["own"]) == 15 and "attention op (our custom op)" not in dict(
        (w, 0) for w, _, _ in sections["256 budget, uncompiled"]["host_profile"]["layers"])


def test_a_variant_of_settings_read_at_every_call_keeps_them_while_it_runs_and_scores(monkeypatch):
    """``_OursAsyncRunWith``: a setting read at each draw (``ours_async_two_pass_mass``'s flag) must hold while the
    engine runs and scores, not only while it is built (``_OursAsyncBuiltWith``), and be restored after each call."""
    import async_batching.gc_freeze as gc_freeze

    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    from bench import variants

    class Probe(variants._OursAsyncRunWith):
        patches = {("gc_freeze", "FREEZE"): not gc_freeze.FREEZE}

    seen = []
    monkeypatch.setattr(variants.Ours, "run", lambda self, p, n: seen.append(("run", gc_freeze.FREEZE)) or "ran")
    monkeypatch.setattr(variants.Ours, "score", lambda self, c, t: seen.append(("score", gc_freeze.FREEZE)) or "scored")
    before = gc_freeze.FREEZE
    probe = object.__new__(Probe)  # no engine: only the calls' settings matter here
    assert probe.run([[1]], 1) == "ran" and probe.score([[1]], [[2]]) == "scored"
    assert seen == [("run", not before), ("score", not before)] and gc_freeze.FREEZE is before
    assert issubclass(variants.VARIANTS["ours_async_two_pass_mass"], variants._OursAsyncRunWith)


def test_step_probe_refuses_a_variant_that_is_not_module_settings_and_names_those_that_are(tmp_path):
    """step_probe.py --variant takes the benchmark's variants of module settings (``_OursAsyncBuiltWith``); any other
    name stops it before a model is built, with the names it takes."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "plugin"))
    for bad in ("ours_async_no_such_lever", "static"):
        r = subprocess.run([sys.executable, str(ROOT / "recipes/bench/step_probe.py"), "--workload", "unused.yaml",
                            "--variant", bad], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and f"--variant {bad!r}: not a variant of module settings" in r.stderr
        assert "ours_async_decode_2warps" in r.stderr and "'static'" not in r.stderr.split("one of")[1]


def test_step_probe_sequence_lists_the_middle_replays_first_and_last_kernels_with_the_idle_before_each():
    """``--sequence HEAD,TAIL``: of ``reps`` replays' kernels (in any recorded order), the middle replay's, sorted by
    start: its first HEAD and last TAIL rows with each kernel's us and the idle us since the previous one ended."""
    sys.path[:0] = [str(ROOT / "recipes")]
    try:
        from bench.profiling import Trace
        from bench.step_probe import _sequence
    finally:
        del sys.path[0]
    t = Trace(run=(0, 10_000))
    for r in (2, 0, 1):  # three replays of kernels k0..k3, recorded out of order
        for k in range(4):
            start = r * 1000 + k * 100 + (50 if k == 3 else 0)  # k3 starts 50 ns late
            t.kernels.append((start, start + 40 + r))
            t.names.append(f"k{k}")
    rows = _sequence(t, 3, 2, 1).splitlines()[2:]
    assert rows == ["| 0 | `k0` | 0.04 |  |", "| 1 | `k1` | 0.04 | 0.06 |", "| ... | | | |", "| 3 | `k3` | 0.04 | 0.11 |"]


def test_step_probe_rates_are_the_steps_product_and_attention_flops_over_their_gpu_time():
    """Products: 2 x (matmul params - LM head) per prompt token + 2 x LM head per prompt (one kept row each);
    attention: 4 x layers x q heads x head dim per causal pair (3 + 5-token prompts: 6 + 15 pairs); a family that did
    not run (no GPU time) has no rate."""
    sys.path[:0] = [str(ROOT / "recipes")]
    try:
        from bench.step_probe import _rates
        from bench.workloads import ModelShape
    finally:
        del sys.path[0]
    shape = ModelShape(params=1000, matmul_params=1000, kv_bytes_per_token=64, dtype_bytes=2, lm_head_params=100,
                       layers=2, q_heads=4, head_dim=8)
    products, attention = 2 * 900 * 8 + 2 * 100 * 2, 4 * 2 * 4 * 8 * (6 + 15)
    rates = _rates([[1] * 3, [1] * 5], {"matmul (cuBLAS)": products * 1e-9, "_paged_attention_kernel": attention * 0.5e-9},
                   shape, matmul_tflops=4.0)
    assert rates["matrix products"]["tflops"] == pytest.approx(1.0) and rates["matrix products"]["share"] == pytest.approx(0.25)
    assert rates["attention kernel"]["tflops"] == pytest.approx(2.0) and rates["attention kernel"]["share"] == pytest.approx(0.5)
    assert _rates([[1] * 3], {}, shape, 4.0) == {}
