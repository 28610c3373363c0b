"""The evaluation job: lm-evaluation-harness tasks scored through our engine (lm-eval's ``async_batching`` backend).

    python recipes/evaluate.py                      # built-in SmolLM2 on the bundled example tasks (CPU, offline)
    python recipes/evaluate.py model=pretrained model.name=Qwen/Qwen2.5-0.5B-Instruct trainer=gpu eval=gsm8k
    python recipes/evaluate.py model=pretrained model.name=/ckpt trainer=ddp trainer.devices=4 eval=mmlu
    python recipes/evaluate.py -m model.name=ckpt1,ckpt2 sampling.temperature=0,0.7 sampling.n=1,8
    python recipes/collect_sweep.py multirun/evaluate/<date>/<time>

``sampling.*`` values that differ from the defaults (or are set on the command line) become lm-eval's ``gen_kwargs``
(``max_new_tokens`` -> ``max_gen_toks``, ``stop`` -> ``until``); ``sampling.n=k`` draws k samples per document of the
generation tasks (lm-eval's ``repeats``), scored one by one for pass@k. Writes into the Hydra run directory:
``results.json`` (lm-eval's), ``samples.jsonl`` (prompt, output, target, score per document) and ``summary.json``
(metrics, pass@k, throughput, engine stats). Several devices: Lightning's launcher, one engine per rank
(``trainer=ddp``), or per group of ranks holding one model (``trainer=tp``, transformers' tensor-parallel plan).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # collect_sweep (pass@k), also when this file is loaded by path
try:
    import async_batching  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "plugin"))

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from async_batching.hydra_conf import register_configs
from async_batching.job_config import EvalConfig, EvaluateConfig, SamplingConfig
from collect_sweep import pass_at_k

EXAMPLE_TASKS = os.path.join(os.path.dirname(HERE), "conf", "tasks")
# SamplingConfig field -> lm-eval gen_kwargs key (fields not listed keep their name; ``n`` becomes ``repeats``).
GEN_KWARG_NAMES = {"max_new_tokens": "max_gen_toks", "stop": "until"}
NOT_GEN_KWARGS = ("n", "logprobs")

register_configs()


def gen_kwargs(sampling: SamplingConfig, overrides: list[str]) -> dict[str, Any]:
    """The sampling values the user chose (different from the defaults, or named in a ``sampling.<key>=`` override)
    as lm-eval ``gen_kwargs``; they update each generation task's own ``generation_kwargs``."""
    defaults = SamplingConfig()
    named = {o.split("=", 1)[0].lstrip("+~").removeprefix("sampling.") for o in overrides if o.startswith(
        ("sampling.", "+sampling.", "~sampling."))}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(SamplingConfig):
        value = getattr(sampling, f.name)
        if f.name in NOT_GEN_KWARGS or (value == getattr(defaults, f.name) and f.name not in named):
            continue
        out[GEN_KWARG_NAMES.get(f.name, f.name)] = list(value) if isinstance(value, (list, tuple)) else value
    if sampling.logprobs is not None:
        raise ValueError("sampling.logprobs has no meaning in an evaluation; leave it null")
    if "temperature" in out:
        out["do_sample"] = sampling.temperature > 0  # else a task's do_sample: false would force greedy
    return out


def load_tasks(cfg: EvalConfig, repeats: int) -> tuple[Any, list, dict]:
    """lm-eval's task manager, the top-level tasks/groups to evaluate, and the leaf tasks by name (generation tasks
    set to ``repeats`` samples per document)."""
    from async_batching.lm_eval import task_manager

    include = cfg.include_path and hydra.utils.to_absolute_path(cfg.include_path)
    manager = task_manager(list(cfg.tasks), [p for p in (EXAMPLE_TASKS, include) if p])
    loaded = manager.load(list(cfg.tasks))
    for task in loaded["tasks"].values():
        if task.OUTPUT_TYPE == "generate_until":
            task.config.repeats = repeats
    children = {c for kids in loaded["group_map"].values() for c in kids}
    top = [g for name, g in loaded["groups"].items() if name not in children]
    top += [t for name, t in loaded["tasks"].items() if name not in children]
    return manager, top, loaded["tasks"]


def per_sample_scores(task: Any, doc: dict, outputs: list[str]) -> dict[str, list[float]]:
    """Each generated sample of a document scored on its own, through each of the task's filter pipelines
    (lm-eval keeps them in ``task._filters``; it otherwise scores only the first sample)."""
    scores: dict[str, list[float]] = {}
    for ensemble in getattr(task, "_filters", []):
        for text in outputs:
            resps = [[text]]
            for make in ensemble.filters:
                resps = list(make().apply(resps, [doc]))
            for metric, value in task.process_results(doc, [resps[0]]).items():
                if isinstance(value, (int, float)):
                    scores.setdefault(metric_key(task.config.task, metric, ensemble.name), []).append(float(value))
    return scores


def metric_key(task: str, metric: str, filter_name: str) -> str:
    return f"{task}/{metric}" if filter_name == "none" else f"{task}/{metric}:{filter_name}"


def task_metrics(results: dict) -> dict[str, float]:
    """``task/metric[:filter]`` -> value, for every task and group lm-eval reports (stderr left out)."""
    out = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            out[metric_key(task, metric, filter_name)] = float(value)
    return out


def sample_rows(results: dict, tasks: dict, n: int) -> tuple[list[dict], dict[str, float]]:
    """One row per document (prompt, output, target, score) and, with n > 1 samples, pass@k per binary metric."""
    rows, counts = [], {}
    for name, samples in results.get("samples", {}).items():
        task = tasks.get(name)
        kind = task.OUTPUT_TYPE if task is not None else None
        by_doc: dict[int, list[dict]] = {}
        for s in samples:  # lm-eval logs a document once per filter pipeline
            by_doc.setdefault(s["doc_id"], []).append(s)
        for doc_id in sorted(by_doc):
            s = by_doc[doc_id][0]
            outputs = [r for resps in s["resps"] for r in resps]
            row = {"task": name, "output_type": kind, "doc_id": doc_id, "prompt": s["arguments"][0][0],
                   "target": s["target"], "output": outputs[0] if len(outputs) == 1 else outputs,
                   "score": {(m if f["filter"] == "none" else f"{m}:{f['filter']}"): float(f[m])
                             for f in by_doc[doc_id] for m in f["metrics"] if isinstance(f.get(m), (int, float))}}
            if n > 1 and kind == "generate_until":
                scores = per_sample_scores(task, s["doc"], outputs)
                row["sample_scores"] = scores
                for key, values in scores.items():
                    if set(values) <= {0.0, 1.0}:
                        counts.setdefault(key, []).append((len(values), int(sum(values))))
            rows.append(row)
    ks = sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})
    passes = {f"{key}/pass@{k}": sum(pass_at_k(m, c, k) for m, c in per_doc) / len(per_doc)
              for key, per_doc in counts.items() for k in ks}
    return rows, passes


def fabric_for(trainer_cfg: DictConfig):
    """A Lightning Fabric with the trainer group's accelerator, devices, nodes and strategy (its launcher starts one
    process per device; a ``lightning.pytorch.strategies`` node is built as its ``lightning.fabric`` twin)."""
    from hydra.utils import instantiate
    from lightning.fabric import Fabric

    strategy = trainer_cfg.get("strategy", "auto")
    if isinstance(strategy, DictConfig):
        node = OmegaConf.to_container(strategy, resolve=True)
        if node["_target_"].endswith("TensorParallelStrategy"):  # Fabric's DDP starts the processes; the engine
            node.pop("tensor_parallel_size", None)  # groups them (``tensor_parallel_size_of``)
            node["_target_"] = "lightning.fabric.strategies.DDPStrategy"
        node["_target_"] = node["_target_"].replace("lightning.pytorch.strategies", "lightning.fabric.strategies")
        strategy = instantiate(node)
    return Fabric(accelerator=trainer_cfg.get("accelerator", "auto"), devices=trainer_cfg.get("devices", 1),
                  num_nodes=trainer_cfg.get("num_nodes", 1), strategy=strategy)


def tensor_parallel_size_of(trainer_cfg: DictConfig) -> int:
    """The group size of ``trainer=tp`` (its ``strategy.tensor_parallel_size``; null: every process of the job), else 1."""
    strategy = trainer_cfg.get("strategy", "auto")
    if not (isinstance(strategy, DictConfig) and str(strategy.get("_target_", "")).endswith("TensorParallelStrategy")):
        return 1
    return int(strategy.get("tensor_parallel_size") or trainer_cfg.get("devices", 1) * trainer_cfg.get("num_nodes", 1))


def run(job: EvaluateConfig, trainer_cfg: DictConfig, run_dir: str, overrides: Optional[list[str]] = None) -> dict:
    """Evaluate on every device of the trainer group (one engine per rank, lm-eval's data-parallel shards; under
    ``trainer=tp`` one engine per group of ranks); returns the summary (rank 0's)."""
    tp = tensor_parallel_size_of(trainer_cfg)
    if tp > 1:
        job = dataclasses.replace(job, batcher=dataclasses.replace(job.batcher, tensor_parallel_size=tp))
    fabric = fabric_for(trainer_cfg)
    return fabric.launch(evaluate_rank, job, run_dir, list(overrides or []))


def evaluate_rank(fabric: Any, job: EvaluateConfig, run_dir: str, overrides: list[str]) -> Optional[dict]:
    """One rank: load the model on its device, run lm-eval through our backend, rank 0 writes the outputs."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    from async_batching.lm_eval import AsyncBatchingLM, cache_templates
    from async_batching.models import load_model

    cache_templates()  # lm-eval compiles each prompt template once, not on every document (same text)
    t0 = time.perf_counter()
    # The launcher picked this rank's device; batcher.dtype is honoured as the model's dtype when model.dtype is unset.
    model, tokenizer = load_model(job.model.name, dtype=job.model.dtype or job.batcher.dtype, device=str(fabric.device))
    load_s = time.perf_counter() - t0
    kwargs = gen_kwargs(job.sampling, overrides)
    n = job.sampling.n
    t1 = time.perf_counter()
    engine = {k: v for k, v in dataclasses.asdict(job.batcher).items() if k not in ("device", "dtype")}
    lm = AsyncBatchingLM(pretrained=model, tokenizer=tokenizer, **engine)
    startup_s = time.perf_counter() - t1
    manager, tasks, leaves = load_tasks(job.eval, n)
    seed = job.eval.seed
    t2 = time.perf_counter()
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, num_fewshot=job.eval.num_fewshot, limit=job.eval.limit,
            gen_kwargs=kwargs or None, apply_chat_template=job.eval.apply_chat_template,
            fewshot_as_multiturn=job.eval.fewshot_as_multiturn, log_samples=job.eval.log_samples or n > 1,
            bootstrap_iters=job.eval.bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed)
        eval_s = time.perf_counter() - t2
        parts = lm.gather_object({"timings": lm.timings, "engine": lm.batcher.stats})
    finally:
        lm.close()
    if results is None:  # ranks other than 0: lm-eval gathered their documents to rank 0
        return None
    rows, passes = sample_rows(results, leaves, n)
    summary = summarise(job, results, parts, passes, kwargs, load_s, startup_s, eval_s, overrides)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
    if rows:
        with open(os.path.join(run_dir, "samples.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n")
    with open(os.path.join(run_dir, job.summary_file), "w") as f:
        json.dump(summary, f, indent=2, default=handle_non_serializable)
    print(make_table(results))
    show_answers(rows, job.show)
    print(format_throughput(summary))
    print(f"outputs    {run_dir}")
    return summary


def summarise(job: EvaluateConfig, results: dict, parts: list, passes: dict, kwargs: dict, load_s: float,
              startup_s: float, eval_s: float, overrides: list[str]) -> dict:
    """Metrics (lm-eval's and pass@k) with throughput and the engine's counters summed over ranks."""
    timings: dict[str, dict[str, float]] = {}
    engine: dict[str, float] = {}
    for part in parts:
        for kind, t in part["timings"].items():
            into = timings.setdefault(kind, dict.fromkeys(t, 0))
            for key, value in t.items():
                into[key] = max(into[key], value) if key.endswith("seconds") else into[key] + value
        for key, value in part["engine"].items():
            if isinstance(value, (int, float)):
                engine[key] = engine.get(key, 0) + value
    requests = sum(t["requests"] for t in timings.values())
    output_tokens = sum(t["output_tokens"] for t in timings.values())
    return {
        "model": job.model.name, "tasks": list(job.eval.tasks), "n": job.sampling.n, "gen_kwargs": kwargs,
        "metrics": {**task_metrics(results), **passes},
        "requests": requests, "errors": 0, "output_tokens": output_tokens,
        "requests_per_s": requests / eval_s if eval_s else None,
        "output_tokens_per_s": output_tokens / eval_s if eval_s else None,
        "wall_s": eval_s, "load_s": load_s, "startup_s": startup_s, "ranks": len(parts),
        "timings": timings, "engine": engine, "overrides": overrides,
        "eval": dataclasses.asdict(job.eval), "batcher": dataclasses.asdict(job.batcher),
    }


def show_answers(rows: list[dict], n: int) -> None:
    for row in [r for r in rows if r["output_type"] == "generate_until"][:n]:
        print(f"--- [{row['task']} {row['doc_id']}] target {row['target']!r}, score {row['score']}\n"
              f"{row['prompt'][-200:]}{row['output']!r}\n")


def format_throughput(summary: dict) -> str:
    lines = [f"evaluated  {summary['requests']} lm-eval requests in {summary['wall_s']:.1f} s "
             f"({summary['requests_per_s']:.1f} req/s) on {summary['ranks']} rank(s); model loaded in "
             f"{summary['load_s']:.1f} s, engine built in {summary['startup_s']:.1f} s"]
    for kind, t in summary["timings"].items():
        extra = f", {t['output_tokens'] / t['seconds']:.0f} output tok/s" if t["output_tokens"] else ""
        engine = f" (engine {t['engine_seconds']:.1f} s)" if "engine_seconds" in t else ""
        lines.append(f"  {kind:22s} {t['requests']:6d} requests in {t['seconds']:.1f} s{engine}{extra}")
    e = summary["engine"]
    if e.get("prompt_tokens"):
        lines.append(f"  prompt tokens {e['prompt_tokens']}, computed {e.get('prefill_tokens', '?')}, "
                     f"from the prefix cache {e.get('cached_tokens', '?')}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the first metric so sweepers (e.g. Optuna) can optimise it."""
    job: EvaluateConfig = OmegaConf.to_object(cfg)
    job.validate()
    hc = HydraConfig.get()
    summary = run(job, cfg.trainer, hc.runtime.output_dir, list(hc.overrides.task))
    return float(next(iter((summary or {}).get("metrics", {}).values()), 0.0))


if __name__ == "__main__":
    main()
