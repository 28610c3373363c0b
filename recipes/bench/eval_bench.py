"""Evaluation throughput through lm-eval itself: our backend (``async_batching``) against lm-eval's ``hf`` backend on
the same model, on the two local-data workloads of BENCHMARKS.md:

- E1, GSM8K-like generation: 8-shot prompts of about 800 tokens, up to 256 new tokens, stop at a blank line, 1,000 docs.
- E2, MMLU-like multiple choice: 5-shot contexts of 400-900 tokens (the 5 shots shared per subject, as MMLU's
  ``first_n`` sampler does), 4 one-token choices, 2,000 docs.

The model is W2's Llama-3.2-1B shape with random weights (fine for timing: a random model never writes the blank
line, so every E1 answer is 256 tokens long for both backends), its vocabulary sized to the tokenizer saved next to
it (SmolLM2's, 49,152 tokens). Each (workload, backend) runs in its own process; only ``simple_evaluate`` is timed,
split into the time inside the backend's request calls (``loglikelihood``, ``generate_until``: for ours, its
tokenization, the engine and the result assembly, the engine's part shown apart) and the time lm-eval spends outside
them (building requests and few-shot prompts, filters, metrics, environment info), the same work for both backends.

``--cache-templates`` memoises lm-eval's compiled Jinja prompt templates (``lm_eval.utils.apply_template`` compiles
its template on every call, lm-eval issue #1286) for both backends alike: the prompts and results are unchanged. Our
entry points (``python -m async_batching.lm_eval``, ``recipes/evaluate.py``, ``GenerationEvaluation``) do it by default
(``async_batching.lm_eval.cache_templates``), and so does building our backend; without the flag this script turns
that off (``ASYNC_BATCHING_TEMPLATE_CACHE=0``), so that it measures lm-eval as released for both.

    python recipes/bench/eval_bench.py --out bench_eval                      # GPU: both workloads, both backends
    python recipes/bench/eval_bench.py --out /tmp/t --shape tiny --device cpu --dtype float32 --docs 4 --max-gen-toks 8
    python recipes/bench/eval_bench.py --save-tokenizer .bench_tokenizer     # on a machine with the built-in model

Writes ``eval_bench.md`` (table) and ``eval_bench.json`` into ``--out`` (and the tasks, data and model it used).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
try:
    import async_batching  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(ROOT, "plugin"))

SHAPES = {  # "llama1b" is W2's model (conf/workload/w2.yaml) with the tokenizer's vocabulary
    "llama1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, intermediate_size=8192, tie_word_embeddings=True,
                    max_position_embeddings=4096),
    "tiny": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, tie_word_embeddings=True, max_position_embeddings=2048),
}
WORDS = ("the of and to in is that for it as with was on be by at this from are or an which one all were we when "
         "there can more if out so what up about into them some time would other how then these two like first each "
         "make way could people than water been call who number sold find long down day did get come made may part "
         "apples boxes train miles hours price store money tickets farmer baker students books cookies marbles").split()
SUBJECTS = ["algebra", "anatomy", "astronomy", "biology", "chemistry", "economics", "geography", "history"]


def words(rng: random.Random, tokenizer: Any, tokens: int) -> str:
    """English-looking text of about ``tokens`` tokens (numbers included, as word problems have)."""
    out: list[str] = []
    while len(tokenizer.encode(" ".join(out), add_special_tokens=False)) < tokens:
        out += [rng.choice(WORDS) for _ in range(6)] + [str(rng.randint(2, 999))]
    return " ".join(out)


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_tasks(out: str, tokenizer: Any, gen_docs: int, mc_docs: int, max_gen_toks: int) -> None:
    """E1 (task ``bench_gen``) and E2 (tag ``bench_mc``: one task per subject), YAML + JSONL under ``out/tasks``."""
    import yaml

    folder = os.path.join(out, "tasks")
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(0)

    def qa(n: int) -> list[dict]:  # 9 segments (8 shots + the question) of ~89 tokens: ~800-token prompts
        return [{"question": words(rng, tokenizer, 60), "answer": words(rng, tokenizer, 20)} for _ in range(n)]

    write_jsonl(os.path.join(folder, "gen_train.jsonl"), qa(64))
    write_jsonl(os.path.join(folder, "gen_test.jsonl"), qa(gen_docs))
    tasks = {"bench_gen": {
        "dataset_kwargs": {"data_files": {"train": os.path.join(folder, "gen_train.jsonl"),
                                          "test": os.path.join(folder, "gen_test.jsonl")}},
        "output_type": "generate_until", "training_split": "train", "fewshot_split": "train", "num_fewshot": 8,
        "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": max_gen_toks, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}}
    letters = ["A", "B", "C", "D"]
    subjects = SUBJECTS[:max(1, min(len(SUBJECTS), mc_docs))]  # no subject without documents (small smoke runs)
    for i, subject in enumerate(subjects):
        def mc(question_tokens: int) -> dict:
            options = "".join(f"\n{x}. {words(rng, tokenizer, 4)}" for x in letters)
            return {"question": words(rng, tokenizer, question_tokens) + options, "label": rng.randrange(4)}

        n = mc_docs // len(subjects) + (1 if i < mc_docs % len(subjects) else 0)
        write_jsonl(os.path.join(folder, f"mc_{subject}_dev.jsonl"), [mc(rng.randint(25, 60)) for _ in range(5)])
        write_jsonl(os.path.join(folder, f"mc_{subject}_test.jsonl"), [mc(rng.randint(30, 500)) for _ in range(n)])
        tasks[f"bench_mc_{subject}"] = {
            "tag": "bench_mc",
            "dataset_kwargs": {"data_files": {"dev": os.path.join(folder, f"mc_{subject}_dev.jsonl"),
                                              "test": os.path.join(folder, f"mc_{subject}_test.jsonl")}},
            "output_type": "multiple_choice", "fewshot_split": "dev", "num_fewshot": 5,
            "fewshot_config": {"sampler": "first_n"},
            "description": f"The following are multiple choice questions (with answers) about {subject}.\n\n",
            "doc_to_text": "{{question}}\nAnswer:", "doc_to_choice": letters, "doc_to_target": "label",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    for name, cfg in tasks.items():
        cfg = {"task": name, "dataset_path": "json", "test_split": "test", **cfg, "metadata": {"version": 1.0}}
        with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
    for letter in letters:
        if len(tokenizer.encode(" " + letter, add_special_tokens=False)) != 1:
            raise SystemExit(f"the tokenizer splits ' {letter}' into several tokens: E2 needs one-token choices")


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    if spec == "smollm2":
        from async_batching.models import smollm2_gguf_path

        folder, file = os.path.split(smollm2_gguf_path())
        return AutoTokenizer.from_pretrained(folder, gguf_file=file)
    return AutoTokenizer.from_pretrained(spec)


def save_model(path: str, shape: str, tokenizer: Any, dtype: str, device: str) -> None:
    """A random-init model of ``shape`` with the tokenizer's vocabulary, saved with that tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(SHAPES[shape])
    config = AutoConfig.for_model(kw.pop("model_type"), vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kw)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def time_request_calls(lm: Any) -> dict[str, float]:
    """Seconds spent inside ``lm``'s request methods, per request type, filled in as lm-eval calls them."""
    spent: dict[str, float] = {}

    def timed(kind: str, method: Any) -> Any:
        def call(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return method(*a, **kw)
            finally:
                spent[kind] = spent.get(kind, 0.0) + time.perf_counter() - t0
        return call

    for kind in REQUEST_TYPES:  # lm-eval calls getattr(lm, request_type)(requests): the instance attribute wins
        setattr(lm, kind, timed(kind, getattr(lm, kind)))
    return spent


def gc_pauses() -> dict[str, float]:
    """Seconds the garbage collector pauses the process, per generation, filled in as collections happen."""
    import gc

    spent: dict[str, float] = {}
    started: list[float] = []

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            key = f"gen{info['generation']}"
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - started.pop()

    gc.callbacks.append(callback)
    return spent


def cache_templates() -> None:
    """Compile each of lm-eval's Jinja prompt templates once instead of on every render (same text out): the
    package's own ``async_batching.lm_eval.cache_templates``, which our entry points apply."""
    os.environ.pop("ASYNC_BATCHING_TEMPLATE_CACHE", None)
    from async_batching.lm_eval import cache_templates as cache

    cache()


def child(args: argparse.Namespace) -> None:
    """One backend on one workload in this process; prints one JSON line."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import async_batching.lm_eval  # noqa: F401  (registers "async_batching")

    if args.cache_templates:
        cache_templates()
    else:  # lm-eval as released in both processes (building our backend would otherwise cache them in ours only)
        os.environ["ASYNC_BATCHING_TEMPLATE_CACHE"] = "0"

    tasks = {"e1": ["bench_gen"], "e2": ["bench_mc"]}[args.child_workload]
    if args.child_backend == "ours":
        model_args = dict(pretrained=args.model, dtype=args.dtype, device=args.device, **parse_kv(args.engine_args))
        name = "async_batching"
    else:
        bs = args.hf_batch_size if args.hf_batch_size == "auto" else int(args.hf_batch_size)
        model_args = dict(pretrained=args.model, dtype=args.dtype, device=args.device, batch_size=bs)
        name = "hf"
    t0 = time.perf_counter()
    lm = lm_eval.api.registry.get_model(name).create_from_arg_obj(model_args)
    startup_s = time.perf_counter() - t0
    in_backend = time_request_calls(lm)
    manager = TaskManager(include_path=os.path.join(args.out, "tasks"), include_defaults=False)
    gc_s = gc_pauses()
    t1 = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, bootstrap_iters=0,
                                      log_samples=False)
    wall = time.perf_counter() - t1
    n_requests = sum(results["n-samples"][t]["effective"] * (4 if t.startswith("bench_mc") else 1)
                     for t in results["n-samples"])
    backend_s = sum(in_backend.values())
    row = {"workload": args.child_workload, "backend": args.child_backend, "wall_s": wall, "startup_s": startup_s,
           "backend_s": backend_s, "outside_backend_s": wall - backend_s, "backend_calls_s": in_backend,
           "requests": n_requests, "requests_per_s": n_requests / wall,
           "docs": sum(results["n-samples"][t]["effective"] for t in results["n-samples"]),
           "metrics": {t: {k: v for k, v in m.items() if "," in k and "stderr" not in k}
                       for t, m in results["results"].items()},
           "model_args": {k: str(v) for k, v in model_args.items()}, "gc_s": dict(gc_s)}
    if args.child_backend == "ours":
        row["engine"] = engine = {k: v for k, v in lm.batcher.stats.items() if isinstance(v, (int, float))}
        row["timings"] = lm.timings
        row["engine_s"] = sum(t.get("engine_seconds", 0.0) for t in lm.timings.values())
        row["mean_prompt_tokens"] = engine.get("prompt_tokens", 0) / max(engine.get("requests", 1), 1)
        row["output_tokens"] = engine.get("output_tokens")
    print("EVAL_BENCH_ROW " + json.dumps(row))


def parse_kv(text: str) -> dict:
    from lm_eval.utils import simple_parse_args_string

    return simple_parse_args_string(text) if text else {}


def run_child(args: argparse.Namespace, workload: str, backend: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *args.argv, "--child-workload", workload,
           "--child-backend", backend, "--model", args.model]
    log_path = os.path.join(args.out, f"{workload}_{backend}.log")
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, timeout=args.timeout_s)
        log.write(proc.stdout)
    rows = [line[len("EVAL_BENCH_ROW "):] for line in proc.stdout.splitlines() if line.startswith("EVAL_BENCH_ROW ")]
    if proc.returncode != 0 or not rows:
        return {"workload": workload, "backend": backend, "error": f"exit {proc.returncode}, see {log_path}"}
    return json.loads(rows[-1])


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"Model: {args.shape} shape, random weights, {args.dtype}, on {args.device}; hf batch_size "
             f"{args.hf_batch_size}; engine args: {args.engine_args or 'defaults'}; lm-eval templates "
             f"{'cached (--cache-templates)' if args.cache_templates else 'as released'}", "",
             "wall s: lm-eval's simple_evaluate; in backend s: inside the backend's request calls (ours: tokenization, "
             "engine, results), of which engine s: our engine's calls; outside backend s: lm-eval's own work.", "",
             "| workload | backend | docs | lm-eval requests | mean prompt tokens | output tokens | wall s "
             "| in backend s | of which engine s | outside backend s | requests/s | speed-up vs hf | metrics |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['backend']} | - | - | - | - | - | - | - | - | - | - | {r['error']} |")
            continue
        hf = next((h for h in rows if h["workload"] == r["workload"] and h["backend"] == "hf" and "error" not in h),
                  None)
        r["speedup_vs_hf"] = hf["wall_s"] / r["wall_s"] if hf else None
        shown = "; ".join(f"{t} {k}={v:.3f}" for t, m in sorted(r["metrics"].items()) for k, v in m.items()
                          if not t.startswith("bench_mc_"))
        speed = f"{r['speedup_vs_hf']:.2f}x" if r["speedup_vs_hf"] else "-"
        prompt = f"{r['mean_prompt_tokens']:.0f}" if r.get("mean_prompt_tokens") else "-"
        engine = f"{r['engine_s']:.2f}" if "engine_s" in r else "-"
        lines.append(f"| {r['workload']} | {r['backend']} | {r['docs']} | {r['requests']} | {prompt} | "
                     f"{r.get('output_tokens') or '-'} | {r['wall_s']:.2f} | {r['backend_s']:.2f} | {engine} | "
                     f"{r['outside_backend_s']:.2f} | {r['requests_per_s']:.1f} | {speed} | {shown} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_eval", help="folder for tasks, data, model, logs and the report")
    parser.add_argument("--workloads", default="e1,e2")
    parser.add_argument("--backends", default="ours,hf")
    parser.add_argument("--docs", type=int, default=None, help="documents per workload (default: 1000 E1, 2000 E2)")
    parser.add_argument("--max-gen-toks", type=int, default=256)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama1b")
    parser.add_argument("--model", default=None, help="a saved checkpoint with its tokenizer (default: build one)")
    parser.add_argument("--tokenizer", default="smollm2", help="'smollm2' (built-in GGUF) or a saved tokenizer dir")
    parser.add_argument("--save-tokenizer", default=None, help="only save the tokenizer to this folder and exit")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--hf-batch-size", default="64", help="lm-eval hf backend batch_size: an int or 'auto'")
    parser.add_argument("--engine-args", default="", help="BatcherConfig overrides for ours, 'k=v,k=v'")
    parser.add_argument("--cache-templates", action="store_true",
                        help="compile lm-eval's prompt templates once (both backends; lm-eval issue #1286)")
    parser.add_argument("--timeout-s", type=int, default=3600)
    parser.add_argument("--child-workload", help=argparse.SUPPRESS)
    parser.add_argument("--child-backend", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child_workload:
        return child(args)
    if args.save_tokenizer:
        load_tokenizer(args.tokenizer).save_pretrained(args.save_tokenizer)
        return print(f"saved the tokenizer to {args.save_tokenizer}")
    args.argv = [a for a in sys.argv[1:]]
    os.makedirs(args.out, exist_ok=True)
    args.out = os.path.abspath(args.out)
    workloads = [w for w in args.workloads.split(",") if w]
    gen_docs = args.docs or 1000
    mc_docs = args.docs or 2000
    t0 = time.perf_counter()
    if args.model is None:
        args.model = os.path.join(args.out, f"model_{args.shape}")
        tokenizer = load_tokenizer(args.tokenizer)
        if not os.path.exists(os.path.join(args.model, "config.json")):
            save_model(args.model, args.shape, tokenizer, args.dtype, args.device)
    else:
        tokenizer = load_tokenizer(args.model)
    write_tasks(args.out, tokenizer, gen_docs, mc_docs, args.max_gen_toks)
    print(f"model and tasks ready in {time.perf_counter() - t0:.1f} s: {args.model}, {args.out}/tasks")
    rows = []
    for workload in workloads:
        for backend in [b for b in args.backends.split(",") if b]:
            rows.append(run_child(args, workload, backend))
            print(json.dumps({k: v for k, v in rows[-1].items()
                              if k not in ("engine", "timings", "model_args", "backend_calls_s")}))
    table = report(rows, args)
    with open(os.path.join(args.out, "eval_bench.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "eval_bench.json"), "w") as f:
        json.dump({"shape": args.shape, "dtype": args.dtype, "device": args.device,
                   "cache_templates": args.cache_templates, "results": rows}, f, indent=2)
    print(table)


if __name__ == "__main__":
    main()
