"""Shared set-up of the lm-eval tests: local checkpoints (built once per session), task YAMLs over local JSONL, and
lm-eval runs through our backend and through lm-eval's own ``hf`` backend."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile

import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_TASKS = os.path.join(REPO, "conf", "tasks")


def _session_dir(name: str) -> str:
    path = tempfile.mkdtemp(prefix=f"lmeval_{name}_")
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.cache
def smollm2_checkpoint() -> str:
    """The built-in SmolLM2 saved as a local checkpoint: a GGUF-loaded model refuses ``save_pretrained``, so it is
    rebuilt from its config and state dict."""
    from transformers import AutoModelForCausalLM

    from async_batching.models import load_model

    gguf_model, tokenizer = load_model("smollm2", dtype="float32")
    plain = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}  # weights are fp32
    model = AutoModelForCausalLM.from_config(type(gguf_model.config).from_dict(plain), dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    path = _session_dir("smollm2")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@functools.cache
def tiny_checkpoint(arch: str = "llama") -> str:
    """A tiny random model whose vocabulary is SmolLM2's tokenizer's, saved with that tokenizer."""
    from transformers import AutoTokenizer

    from async_batching.models import tiny_model

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    model = tiny_model(arch, seed=0, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    path = _session_dir(f"tiny_{arch}")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def word_tokenizer(vocab: int = 384):
    """Id i <-> the word "w{i}", except EOS (id 2, the tiny models' EOS) which is "<eos>": lm-eval cuts generations at
    the EOS text, and "w2" would be a prefix of "w20"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab) if i != 2}
    words["<eos>"] = 2
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0", eos_token="<eos>")


@functools.cache
def word_checkpoint(arch: str = "llama") -> str:
    """A tiny random model (vocab 384) saved with the word tokenizer: loads in a second, no download."""
    from async_batching.models import tiny_model

    path = _session_dir(f"words_{arch}")
    tiny_model(arch, seed=0).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def word_tasks(folder: str, docs: int = 6, gen_targets: list[str] | None = None, **overrides: dict) -> str:
    """Tasks over word-token JSONL for the tiny models: ``words_gen`` (generate_until, exact_match), ``words_mc``
    (multiple_choice, acc/acc_norm), ``words_ppl`` (loglikelihood_rolling, word_perplexity)."""
    import random

    import yaml

    rng = random.Random(0)

    def text(n: int) -> str:
        return " ".join(f"w{rng.randrange(3, 384)}" for _ in range(n))

    os.makedirs(folder, exist_ok=True)
    gen = [{"question": text(5), "answer": text(1)} for _ in range(docs)]
    for row, target in zip(gen, gen_targets or []):
        row["answer"] = target
    mc = [{"question": text(6), "choices": [text(1) for _ in range(4)], "label": i % 4} for i in range(docs)]
    ppl = [{"text": text(20 + 7 * i)} for i in range(docs)]
    data = {"words_gen": gen, "words_mc": mc, "words_ppl": ppl}
    for name, rows in data.items():
        write_jsonl(os.path.join(folder, f"{name}.jsonl"), rows)
    common = lambda name: {"dataset_path": "json", "test_split": "test",  # noqa: E731
                           "dataset_kwargs": {"data_files": {"test": os.path.join(folder, f"{name}.jsonl")}}}
    tasks = {
        "words_gen": {"output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
                      "generation_kwargs": {"until": ["<eos>"], "max_gen_toks": 4, "do_sample": False},
                      "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
                      "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                                   {"function": "take_first"}]}]},
        "words_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                     "doc_to_target": "label",
                     "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                     {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]},
        "words_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                      "metric_list": [{"metric": "word_perplexity", "aggregation": "weighted_perplexity",
                                       "higher_is_better": False}]},
    }
    for name, cfg in tasks.items():
        cfg = {"task": name, **common(name), **cfg, **overrides.get(name, {}), "metadata": {"version": 1.0}}
        with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
    return folder


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def local_task_yamls(folder: str, **overrides: dict) -> str:
    """Three tasks over the bundled JSONL, read through ``dataset_path: json`` + ``dataset_kwargs.data_files``:
    ``local_gen`` (generate_until, exact_match), ``local_mc`` (multiple_choice, acc/acc_norm), ``local_ppl``
    (loglikelihood_rolling, word_perplexity). ``overrides[task]`` replaces top-level YAML keys."""
    def data(name: str) -> str:
        return os.path.join(EXAMPLE_TASKS, name)

    tasks = {
        "local_gen": {
            "task": "local_gen", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"train": data("arithmetic_train.jsonl"),
                                              "test": data("arithmetic_test.jsonl")}},
            "output_type": "generate_until", "training_split": "train", "test_split": "test",
            "fewshot_split": "train", "num_fewshot": 2,
            "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                         {"function": "take_first"}]}],
        },
        "local_mc": {
            "task": "local_mc", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"train": data("capitals_train.jsonl"),
                                              "test": data("capitals_test.jsonl")}},
            "output_type": "multiple_choice", "training_split": "train", "test_split": "test",
            "fewshot_split": "train", "num_fewshot": 1,
            "doc_to_text": "Question: What is the capital of {{country}}?\nAnswer:", "doc_to_choice": "{{choices}}",
            "doc_to_target": "label",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        },
        "local_ppl": {
            "task": "local_ppl", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": data("paragraphs_test.jsonl")}},
            "output_type": "loglikelihood_rolling", "test_split": "test",
            "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": "word_perplexity", "aggregation": "weighted_perplexity",
                             "higher_is_better": False}],
        },
    }
    import yaml

    os.makedirs(folder, exist_ok=True)
    for name, cfg in tasks.items():
        cfg.update(overrides.get(name, {}))
        cfg["metadata"] = {"version": 1.0}
        with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
    return folder


def evaluate(model, model_args, tasks, include_path, limit, **kwargs) -> dict:
    """``lm_eval.simple_evaluate`` with samples logged and no bootstrap (exact, fast, deterministic)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import async_batching.lm_eval  # noqa: F401  (registers "async_batching")

    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=tasks,
        task_manager=TaskManager(include_path=include_path, include_defaults=False),
        limit=limit, log_samples=True, bootstrap_iters=0, device="cpu", **kwargs)


def metrics(results: dict, task: str) -> dict:
    """A task's metric values, without stderr and alias entries."""
    return {k: v for k, v in results["results"][task].items() if "stderr" not in k and k != "alias"}


def responses(results: dict, task: str) -> list:
    """Per document (by doc_id), the raw responses of each request."""
    return [[r for r in s["resps"]] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]
