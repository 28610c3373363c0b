"""Benchmark recipe: every variant of BENCHMARKS.md on one workload, each in its own process; one table and one JSON.

    python recipes/benchmark.py workload=w2 variants=[static,hf_cb,ours_sync,ours_async] out_dir=$OUT
    python recipes/benchmark.py -m workload=w1,w2 out_dir=$OUT
    python recipes/benchmark.py workload=tiny device=cpu variants=[static,ours_sync,ours_async]   # smoke test
    python recipes/benchmark.py workload=w4 first_call.enabled=true out_dir=$OUT   # + first call vs repeated call

Workloads (conf/workload/): w1, w2, w3, w2s (sampled), w4 (prefill-heavy), w5 (shared prefixes), w6 (MoE),
w7 (nano-vllm's bench.py), s1 (scoring); recipes/run_on_h200.sh runs each with its variants in one device call.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Optional

RECIPES = Path(__file__).resolve().parent
ROOT = RECIPES.parent
sys.path[:0] = [str(RECIPES), str(ROOT / "plugin")]

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from bench import figures, report  # noqa: E402
from bench.roofline import DeviceRates, Roofline, model_flops, roofline, touched_experts_weight_bytes  # noqa: E402
from bench.variants import VARIANTS  # noqa: E402
from bench.workloads import ModelShape, Requests, Workload  # noqa: E402


def _child_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = dict(os.environ, **(extra or {}))
    paths = [str(RECIPES), str(ROOT / "plugin")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _die_with_parent() -> None:
    """In the child: get SIGKILL if this recipe dies, so no orphan keeps holding the GPU (Linux; else a no-op)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _spawn(args: list[str], log_path: Path, timeout_s: float, env: Optional[dict[str, str]] = None) -> Optional[str]:
    """Run ``python -m bench.runner ARGS`` in a fresh process (``env``: variables added to ours); return None, or why
    it did not finish cleanly."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.runner", *args], cwd=ROOT, env=_child_env(env),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            return f"timeout after {timeout_s:.0f} s"
        except BaseException:  # Ctrl-C or SIGTERM of the recipe: take the runner down with it
            _stop(proc)
            raise
    return None if rc == 0 else f"process exited with status {rc}"


def _stop(proc: subprocess.Popen) -> None:
    """End the runner we started (and what it started, e.g. compile workers): its own process group, by id."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _log_tail(path: Path, lines: int = 6) -> str:
    try:
        return " / ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def device_rates(cfg: dict[str, Any], out_dir: Path) -> tuple[DeviceRates, dict[str, Any]]:
    """The roofline's rates: measured once per out_dir on the device (a separate process), else the H100 figures."""
    fallback = cfg["roofline"]
    assumed = lambda why: DeviceRates(float(fallback["matmul_tflops"]), float(fallback["copy_tbps"]), f"assumed: {why}")  # noqa: E731
    if not fallback.get("measure", True):
        return assumed("roofline.measure=false"), {}
    if not str(cfg["device"]).startswith("cuda"):
        return assumed(f"device={cfg['device']}"), {}
    path = out_dir / "device_rates.json"
    if not path.exists():
        why = _spawn(["--probe", str(path), cfg["device"]], out_dir / "logs" / "device_rates.log", 300)
        if why or not path.exists():
            return assumed(f"probe failed ({why})"), {}
    probe = json.loads(path.read_text())
    rates = probe.get("rates") or {}
    if "error" in rates:
        return assumed(f"probe failed ({rates['error']})"), probe.get("env", {})
    return DeviceRates(**rates), probe.get("env", {})


COMPILE_CACHES = ("per_variant", "shared")


def _checked_compile_cache(mode: str) -> str:
    if mode not in COMPILE_CACHES:
        raise ValueError(f"compile_cache={mode!r}: expected one of {COMPILE_CACHES}")
    return mode


@contextlib.contextmanager
def compile_cache(mode: str, stem: str) -> Iterator[dict[str, str]]:
    """The compile caches a variant's process sees. ``per_variant``: inductor's and Triton's on-disk caches in an
    empty directory of its own, removed after it, so each variant compiles as on a fresh machine. Inductor's FX-graph
    cache does not key on the size hints a dynamic-shape graph was first traced with; with one cache for all, a
    variant that only changes those hints (``ours_async_no_decode_tune``) ran the kernels the variant before it had
    compiled, and the order of the variants decided the result (H200, session 13). ``shared``: the caches of this
    machine, as earlier runs had them (faster start-up after the first variant)."""
    if _checked_compile_cache(mode) == "shared":
        yield {}
        return
    root = tempfile.mkdtemp(prefix=f"bench_compile_{stem}_")
    try:
        yield {"TORCHINDUCTOR_CACHE_DIR": os.path.join(root, "inductor"), "TRITON_CACHE_DIR": os.path.join(root, "triton")}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_variant(name: str, cfg: dict[str, Any], out_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Spawn one variant's runner and read back its result (or record why there is none)."""
    wl = cfg["workload"]["name"]
    if name not in VARIANTS:
        return {"variant": name, "status": "error", "error": f"unknown variant; known: {sorted(VARIANTS)}"}
    stem = f"{wl}_{name}"
    job = {
        "variant": name,
        "device": cfg["device"],
        "workload": cfg["workload"],
        "static_batch_size": cfg["static_batch_size"],
        "warmup": cfg["warmup"],
        "profile": cfg["profile"],
        "batcher": cfg["batcher"],
        "hf_cb": cfg["hf_cb"],
        "figures": cfg["figures"],
        "first_call": cfg.get("first_call") or {},
        "repeats": int(cfg.get("repeats") or 1),
        "timeline_path": str(out_dir / "timelines" / f"{stem}.json"),
    }
    job_path, result_path, log_path = out_dir / "jobs" / f"{stem}.json", out_dir / "jobs" / f"{stem}.result.json", out_dir / "logs" / f"{stem}.log"
    job_path.write_text(json.dumps(job, indent=1))
    result_path.unlink(missing_ok=True)
    with compile_cache(cfg.get("compile_cache", "per_variant"), stem) as env:
        why = _spawn([str(job_path), str(result_path)], log_path, timeout_s, env)
    if result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        result = {"variant": name, "status": "timeout" if why and why.startswith("timeout") else "error"}
        result["error"] = f"{why or 'no result written'}; log: {_log_tail(log_path)}"
    result["log"] = str(log_path)
    return result


def _roofline_seqs(cfg: dict[str, Any]) -> int:
    if cfg["roofline"].get("max_num_seqs"):
        return int(cfg["roofline"]["max_num_seqs"])
    if (cfg["batcher"] or {}).get("max_num_seqs"):
        return int(cfg["batcher"]["max_num_seqs"])
    try:
        from async_batching.config import BatcherConfig

        return BatcherConfig().max_num_seqs
    except ImportError:
        return 256


def workload_limit(workload: Workload, reqs: Requests, shape: ModelShape, rates: DeviceRates, seqs: int) -> Roofline:
    """The roofline of ``reqs``: a shared prefix computed once, the LM head per the workload's convention."""
    rows = reqs.logits_kept() if workload.roofline_lm_head == "kept_logits" else None
    return roofline(reqs.total_lens(), reqs.new_tokens, shape, rates, seqs, cached_lens=reqs.cached, logits_rows=rows)


def add_limits(r: dict[str, Any], workload: Workload, reqs: Requests, shape: ModelShape, rates: DeviceRates, seqs: int) -> None:
    """A variant's % of roofline and % of the matrix rate, over the requests it ran."""
    if not r.get("wall_s"):
        return
    own = reqs.head(r["requests"])
    limit = workload_limit(workload, own, shape, rates, seqs)
    r["roofline_s"] = limit.total_s
    r["roofline_pct"] = 100.0 * limit.total_s / r["wall_s"]
    r["wall_over_limit"] = r["wall_s"] / limit.total_s
    flops = model_flops(shape, own.total_lens(), own.new_tokens, own.cached, own.logits_kept())
    r["model_tflops"] = flops / 1e12
    r["matmul_pct"] = 100.0 * flops / r["wall_s"] / (rates.matmul_tflops * 1e12)


def _previous_results(cfg: dict[str, Any], out_dir: Path, variants: list[str]) -> list[dict[str, Any]]:
    """With ``keep_previous``, rows of other variants from an earlier run of the same workload in ``out_dir``."""
    path = out_dir / f"bench_{cfg['workload']['name']}.json"
    if not cfg.get("keep_previous") or not path.exists():
        return []
    old = json.loads(path.read_text())
    if old.get("workload") != cfg["workload"]:
        print(f"keep_previous: {path} is for a different workload config; not kept", flush=True)
        return []
    return [dict(r, from_previous_run=True) for r in old.get("results", []) if r["variant"] not in variants]


def _in_order(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {name: i for i, name in enumerate(VARIANTS)}
    return sorted(results, key=lambda r: order.get(r["variant"], len(order)))


def _write(out_dir: Path, summary: dict[str, Any], results: list[dict[str, Any]], final: bool) -> str:
    """Table + JSON after every variant (a run cut short still leaves its numbers); figures at the end."""
    name = summary["workload"]["name"]
    md = report.table(results)
    notes = report.notes(summary, results)
    summary.update(results=results, notes=notes, table=md, complete=final)
    if final and summary["config"]["figures"].get("enabled", True):
        try:
            summary["figures"] = figures.draw_all(out_dir, summary)
        except Exception as e:  # figures are a by-product (matplotlib may be missing); never lose the table
            summary["figures_error"] = f"{type(e).__name__}: {e}; redraw with: python recipes/bench/figures.py {out_dir}"
            print(summary["figures_error"], flush=True)
    (out_dir / f"bench_{name}.json").write_text(json.dumps(summary, indent=1, default=repr))
    text = f"## {name}: {summary['workload'].get('description', '')}\n\n{md}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    (out_dir / f"bench_{name}.md").write_text(text)
    return text


def run(cfg: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Run every variant of ``cfg['variants']``; write ``bench_<workload>.{json,md}`` and figures into ``out_dir``."""
    start = time.perf_counter()
    _checked_compile_cache(cfg.get("compile_cache", "per_variant"))  # before any GPU time is spent
    for sub in ("jobs", "logs", "timelines"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    workload = Workload.from_dict(cfg["workload"])
    shape = ModelShape.of(workload)
    reqs = workload.build()  # W7: asserts nano-vllm's 133,966 output tokens before any GPU time is spent
    rates, env = device_rates(cfg, out_dir)
    seqs = _roofline_seqs(cfg)
    limit = workload_limit(workload, reqs, shape, rates, seqs)
    print(f"[{workload.name}] roofline {limit.total_s:.3f} s = {limit.prefill_s:.3f} prefill + {limit.decode_s:.3f} decode "
          f"({limit.output_tokens_per_s:,.0f} out tok/s), rates: {rates}", flush=True)
    summary = {
        "workload": cfg["workload"],
        "model": asdict(shape),
        "rates": asdict(rates),
        "roofline": limit.as_dict(),
        "roofline_max_num_seqs": seqs,
        "requests_drawn": {
            "prompt_tokens": sum(reqs.total_lens()),
            "output_tokens": sum(reqs.new_tokens),
            "cached_prefix_tokens": sum(reqs.cached),
            "continuation_tokens": reqs.logits_kept() if reqs.scoring else None,
            "first_prompt_lens": reqs.total_lens()[:8],
            "first_new_tokens": reqs.new_tokens[:8],
        },
        "env": env,
        "config": {k: v for k, v in cfg.items() if k != "workload"},
        "argv": sys.argv,
    }

    if shape.experts:  # the spec's MoE bound reads the active experts per token; a full batch touches nearly all
        rows = min(len(reqs), seqs)
        extra_s = (limit.decode_steps * touched_experts_weight_bytes(shape, rows) - limit.decode_weight_bytes) / (rates.copy_tbps * 1e12)
        summary["roofline_touched_experts"] = {"rows": rows, "total_s": limit.total_s + extra_s}

    variants = list(cfg["variants"]) + [v for v in workload.extra_variants if v not in cfg["variants"]]
    previous = _previous_results(cfg, out_dir, variants)
    results: list[dict[str, Any]] = []
    budget = cfg.get("budget_s")
    for name in variants:
        t = time.perf_counter()
        left = None if budget is None else float(budget) - (t - start)
        if left is not None and left < 10:
            r = {"variant": name, "status": "skipped", "error": f"under 10 s of budget_s={budget} left"}
        else:
            r = run_variant(name, cfg, out_dir, timeout_s=min(float(cfg["timeout_s"]), left or float("inf")))
        add_limits(r, workload, reqs, shape, rates, seqs)
        results.append(r)
        summary["env"] = summary["env"] or r.get("env") or {}
        tok = f"{r['output_tok_s']:,.0f} out tok/s" if r.get("output_tok_s") else ""
        tok += f"{r['scored_tok_s']:,.0f} scored tok/s" if r.get("scored_tok_s") else ""
        print(f"[{workload.name}] {name}: {report.status_text(r)} {tok} ({time.perf_counter() - t:.0f} s)", flush=True)
        _write(out_dir, summary, _in_order(previous + results), final=False)

    print(_write(out_dir, summary, _in_order(previous + results), final=True), flush=True)
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through _spawn, which stops the runner

    out_dir = Path(cfg.out_dir or HydraConfig.get().runtime.output_dir).resolve()
    run(OmegaConf.to_container(cfg, resolve=True), out_dir)


if __name__ == "__main__":
    main()
