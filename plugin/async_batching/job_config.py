"""Config dataclasses of the generate job (model, sampling, data, trainer, writer); ``hydra_conf`` registers them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from .config import DTYPES, BatcherConfig
from .lightning.settings import ON_ERROR
from .request import SamplingParams

PROGRESS_BARS = ("tqdm", "rich", "none")


@dataclass
class ModelConfig:
    """``smollm2`` (built-in GGUF), ``tiny:<arch>`` (random weights, no tokenizer), or a local path or hub name."""

    name: str = "smollm2"
    dtype: Optional[str] = None  # float32 | bfloat16 | float16; None: float32 for built-ins, the checkpoint's otherwise


@dataclass
class SamplingConfig:
    """The fields of ``SamplingParams``, with lists where it takes sequences (what YAML and overrides give)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    n: int = 1  # samples per prompt (one output line each, with all samples)
    seed: Optional[int] = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None

    def params(self) -> SamplingParams:
        """The engine's ``SamplingParams``; raises ValueError naming every bad value."""
        values = dataclasses.asdict(self)
        values["stop_token_ids"] = tuple(values["stop_token_ids"])
        values["stop"] = tuple(values["stop"])
        params = SamplingParams(**values)
        if problems := params.problems():
            raise ValueError("sampling: " + "; ".join(problems))
        return params


@dataclass
class DataConfig:
    """Prompts: the built-in chat prompts, a file (``.jsonl``/``.json``, ``.csv``, ``.txt``), or random token ids."""

    path: Optional[str] = None  # None: built-in prompts (unless random_prompts > 0)
    column: str = "prompt"  # JSONL key or CSV column holding the prompt text (JSONL: or a list of chat messages)
    chat_template: bool = True  # wrap text prompts in the tokenizer's chat template, when it has one
    system_prompt: Optional[str] = None
    random_prompts: int = 0  # > 0: that many prompts of random token ids (tiny models, benchmarks)
    prompt_len: list[int] = field(default_factory=lambda: [8, 64])  # [min, max] length of random prompts
    limit: Optional[int] = None  # keep only the first N prompts
    repeat: int = 1  # repeat the prompt set N times (load tests)
    batch_size: int = 8  # DataLoader batch size; the engine batches continuously across DataLoader batches
    num_workers: int = 0


@dataclass
class TrainerConfig:
    """Keyword arguments of ``lightning.pytorch.Trainer``, built with ``hydra.utils.instantiate``."""

    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = "auto"
    devices: Any = 1
    strategy: Any = "auto"  # a name ("ddp") or a node with a _target_ (DDPStrategy with a timeout, gloo on CPU)
    num_nodes: int = 1
    precision: Any = None
    limit_predict_batches: Any = None
    inference_mode: bool = True
    enable_progress_bar: bool = True
    enable_model_summary: bool = False
    logger: bool = False


@dataclass
class WriterConfig:
    """The JSONL output: one line per request, flushed as it finishes; a rerun in the same directory resumes."""

    enabled: bool = True
    path: str = "predictions.jsonl"  # relative paths are inside the run directory
    resume: bool = True
    token_ids: bool = True
    merge: bool = True  # one file in dataset order at the end (merging the per-rank files under DDP)
    keep_parts: bool = False
    retry_errors: bool = False


@dataclass
class GenerateConfig:
    """The whole generate job (``recipes/generate.py``); the root of ``conf/config.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    writer: WriterConfig = field(default_factory=WriterConfig)
    on_error: str = "skip"  # skip: a bad request is written with its error and the job goes on; raise: stop
    ordered: bool = True  # batch hooks in DataLoader order (True) or as batches finish (False)
    lookahead: Optional[int] = None  # requests waiting for admission before the loop stops reading batches
    progress_bar: str = "tqdm"  # tqdm | rich | none
    show: int = 3  # generated texts printed at the end
    seed: int = 0
    summary_file: str = "summary.json"

    def validate(self) -> "GenerateConfig":
        """Raise a ValueError naming the key for values the types alone do not rule out."""
        self.batcher.validate()
        self.sampling.params()
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error={self.on_error!r} is invalid: expected one of {ON_ERROR}")
        if self.progress_bar not in PROGRESS_BARS:
            raise ValueError(f"progress_bar={self.progress_bar!r} is invalid: expected one of {PROGRESS_BARS}")
        if self.model.dtype is not None and self.model.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.model.dtype!r} is invalid: expected one of {DTYPES} or null")
        if len(self.data.prompt_len) != 2 or not 1 <= self.data.prompt_len[0] <= self.data.prompt_len[1]:
            raise ValueError(f"data.prompt_len={self.data.prompt_len} is invalid: expected [min, max], 1 <= min <= max")
        if self.data.batch_size < 1 or self.data.repeat < 1:
            raise ValueError("data.batch_size and data.repeat must be >= 1")
        return self


@dataclass
class EvalConfig:
    """lm-evaluation-harness tasks and options of the evaluate recipe (``recipes/evaluate.py``)."""

    tasks: list[str] = field(default_factory=lambda: ["toy_examples"])  # task, group or tag names
    include_path: Optional[str] = None  # a folder of task YAMLs; null: the bundled example tasks (conf/tasks)
    num_fewshot: Optional[int] = None  # null: each task's own
    limit: Optional[float] = None  # documents per task (a fraction of them when < 1); null: all
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    log_samples: bool = True  # per-sample JSONL (prompt, output, target, score); forced on when sampling.n > 1
    seed: int = 0  # lm-eval's seeds (few-shot sampling, python, numpy, torch); the engine's is batcher.seed
    bootstrap_iters: int = 1000  # lm-eval's bootstrap for the stderr of non-mean metrics (0: none)


@dataclass
class EvaluateConfig:
    """The whole evaluate job (``recipes/evaluate.py``); the root of ``conf/evaluate.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    show: int = 3  # generated answers printed at the end
    summary_file: str = "summary.json"

    def validate(self) -> "EvaluateConfig":
        """Raise a ValueError naming the key for values the types alone do not rule out."""
        self.batcher.validate()
        self.sampling.params()
        if self.model.dtype is not None and self.model.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.model.dtype!r} is invalid: expected one of {DTYPES} or null")
        if not self.eval.tasks:
            raise ValueError("eval.tasks is empty: name at least one lm-eval task, group or tag")
        if self.eval.limit is not None and self.eval.limit <= 0:
            raise ValueError(f"eval.limit={self.eval.limit} is invalid: expected a count >= 1, a fraction in (0, 1), "
                             "or null")
        if self.eval.num_fewshot is not None and self.eval.num_fewshot < 0:
            raise ValueError(f"eval.num_fewshot={self.eval.num_fewshot} is invalid: expected >= 0 or null")
        return self


__all__ = ["ModelConfig", "SamplingConfig", "DataConfig", "TrainerConfig", "WriterConfig", "GenerateConfig",
           "EvalConfig", "EvaluateConfig"]
