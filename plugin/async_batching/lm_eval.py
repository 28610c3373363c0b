"""lm-evaluation-harness backend: ``--model async_batching`` sends lm-eval's requests through a ContinuousBatcher.

    python -m async_batching.lm_eval --model async_batching \\
        --model_args pretrained=Qwen/Qwen2.5-0.5B,max_batch_tokens=8192 --tasks gsm8k --num_fewshot 8

In Python: ``import async_batching.lm_eval`` registers the model, then ``lm_eval.simple_evaluate(model="async_batching",
model_args=...)`` or ``simple_evaluate(model=AsyncBatchingLM(pretrained=live_model, tokenizer=tok), ...)``.
The adapter only translates: every request of one lm-eval call goes to the engine at once and the engine batches.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from dataclasses import fields
from typing import Any, Optional

import torch
import lm_eval.models  # noqa: F401  (lm-eval's own models register lazily only while its registry is empty)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .config import BatcherConfig
from .request import SamplingParams
from .tensor_parallel import data_parallel_view

log = logging.getLogger(__name__)

MODEL_ARGS = ("pretrained", "dtype", "device", "max_length", "add_bos_token", "prefix_token_id", "tokenizer",
              "max_gen_toks", "chat_template_args", "tokenizer_threads", "batch_size", "max_batch_size")
# gen_kwargs the engine understands besides until / max_gen_toks / do_sample / temperature (normalised by lm-eval).
SAMPLING_KEYS = ("top_p", "top_k", "min_p", "repetition_penalty", "seed", "ignore_eos")


@register_model("async_batching")
class AsyncBatchingLM(TemplateLM):
    """An lm-eval ``TemplateLM`` over our engine: loglikelihoods through ``score()``, generation through ``generate()``.

    ``pretrained`` is ``smollm2`` (built-in), a local path, a hub name, or a live ``PreTrainedModel`` (then pass its
    ``tokenizer``). Keyword arguments other than ``MODEL_ARGS`` are ``BatcherConfig`` fields.
    """

    def __init__(
        self,
        pretrained: Any = "smollm2",
        dtype: Optional[str] = None,
        device: Optional[str] = None,
        max_length: Optional[int] = None,
        add_bos_token: Optional[bool] = None,
        prefix_token_id: Optional[int] = None,
        tokenizer: Any = None,
        max_gen_toks: int = 256,
        chat_template_args: Optional[dict] = None,
        tokenizer_threads: Optional[int] = None,
        batch_size: Any = None,  # accepted for lm-eval's CLI and ignored: the engine batches continuously
        max_batch_size: Any = None,
        **batcher_args: Any,
    ) -> None:
        super().__init__()
        names = {f.name for f in fields(BatcherConfig)} - {"device", "dtype"}
        unknown = sorted(set(batcher_args) - names)
        if unknown:
            raise TypeError(f"async_batching: unknown model_args {unknown}; accepted: {sorted(MODEL_ARGS)} and the "
                            f"BatcherConfig fields {sorted(names)}")
        # Tensor parallelism: the ranks of a group hold one model and run one engine on the same documents, so
        # lm-eval sees one data-parallel rank per group (its rank and world size are the group's; see all_gather).
        self._tp = int(batcher_args.get("tensor_parallel_size", 1) or 1)
        self._global_rank, self._global_world = _init_distributed()
        try:
            self._rank, self._world_size, _ = data_parallel_view(self._global_rank, self._global_world, self._tp)
        except ValueError as e:
            raise ValueError(f"async_batching: tensor_parallel_size={self._tp} and {self._global_world} ranks: {e}; "
                             "launch a multiple of tensor_parallel_size processes") from None
        model, tok = self._load(pretrained, dtype, device, tokenizer)
        if tok is None:
            raise ValueError("async_batching: lm-eval needs a tokenizer; the model has none, pass "
                             "tokenizer=<name or path>")
        from .batcher import ContinuousBatcher

        self.tokenizer = tok
        self.batcher = ContinuousBatcher(model, tok, config=BatcherConfig.from_overrides(None, **batcher_args))
        self._device = self.batcher.device
        self._max_length = int(max_length) if max_length else _model_max_length(model.config, batcher_args)
        # The engine's positions: a scored pair must fit them whole (its last token included, though never fed).
        self._engine_len = self.batcher.runner.max_model_len
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.chat_template_args = chat_template_args or {}
        # Threads encoding a call's strings (a fast tokenizer's batch call releases the GIL): the CPUs this process
        # may use, shared with the other ranks on this host.
        self.tokenizer_threads = (int(tokenizer_threads) if tokenizer_threads is not None
                                  else _default_tokenizer_threads())
        # Per request type: calls, requests, seconds (whole calls: tokenization, engine, results), engine_seconds (the
        # engine's part), output_tokens.
        self.timings: dict[str, dict[str, float]] = {}
        # Whoever evaluates with this backend gets lm-eval's templates compiled once, the Python API included
        # (``lm_eval.simple_evaluate(model="async_batching", ...)``): same text, 8-9 s less of E1 on an H200's host.
        cache_templates()

    def _load(self, pretrained: Any, dtype: Optional[str], device: Optional[str], tokenizer: Any):
        from transformers import AutoTokenizer, PreTrainedModel

        tok = AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, str) else tokenizer
        if isinstance(pretrained, PreTrainedModel):  # a live model (e.g. GenerationEvaluation): used where it is
            return pretrained, tok
        if not isinstance(pretrained, str):
            raise TypeError(f"async_batching: pretrained must be a name, a path or a PreTrainedModel, "
                            f"got {type(pretrained).__name__}")
        from .models import load_model

        model, own_tok = load_model(pretrained, dtype=None if dtype in (None, "auto") else dtype,
                                    device=_pick_device(device))
        return model, tok if tok is not None else own_tok

    # --- what lm-eval asks of a model ------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """As lm-eval's ``hf`` backend: the tokenizer's special tokens unless told, none when BOS is already there."""
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False
        if add_special_tokens is None and self.add_bos_token is not None:
            add_special_tokens = self.add_bos_token
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **extra)

    def _encode_many(self, texts: list[str], bos_text: Optional[str]) -> dict[str, list[int]]:
        """``tok_encode`` of each distinct text, in batch calls per special-token setting (``bos_text``: the prefix
        meaning "BOS is already there"), spread over ``tokenizer_threads`` threads."""
        groups: dict[Optional[bool], list[str]] = {}
        for text in dict.fromkeys(texts):
            flag = False if has_bos_prefix(text, bos_text) else self.add_bos_token
            groups.setdefault(flag, []).append(text)
        out = {}
        for flag, group in groups.items():
            out.update(zip(group, self._batch_encode(group, flag)))
        return out

    def _batch_encode(self, texts: list[str], add_special_tokens: Optional[bool]) -> list[list[int]]:
        """The tokenizer's batch call over ``texts``; a fast tokenizer's in chunks on several threads (its Rust
        encoding runs without the GIL), each chunk the same call, so the ids are the same."""
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}

        def encode(chunk: list[str]) -> list[list[int]]:
            return self.tokenizer(chunk, return_attention_mask=False, **extra)["input_ids"]

        threads = min(self.tokenizer_threads, len(texts) // _MIN_CHUNK)
        if threads <= 1 or not getattr(self.tokenizer, "is_fast", False):
            return encode(texts)
        # The first call sets the backend's truncation/padding state (a mutation); the chunks then only read it.
        encode(texts[:1])
        size = -(-len(texts) // (threads * 4))  # a few chunks per thread evens out their lengths
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads, thread_name_prefix="async_batching-tok") as pool:
            parts = pool.map(encode, [texts[i:i + size] for i in range(0, len(texts), size)])
            return [ids for part in parts for ids in part]

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        import jinja2

        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                      continue_final_message=not add_generation_prompt, **self.chat_template_args)
        try:
            return self.tokenizer.apply_chat_template(chat_history, **kwargs)
        except jinja2.exceptions.TemplateError:  # templates without a system role (as lm-eval's hf backend)
            log.warning("the chat template failed; retrying without the system message")
            return self.tokenizer.apply_chat_template([m for m in chat_history if m["role"] != "system"], **kwargs)

    def get_model_info(self) -> dict:
        model = self.batcher.model
        return {"model_num_parameters": sum(p.numel() for p in model.parameters()), "model_dtype": str(model.dtype),
                "batcher_config": {f.name: getattr(self.batcher.config, f.name) for f in fields(BatcherConfig)},
                "parallelism": {"tensor_parallel_size": self._tp, "data_parallel_size": self.world_size,
                                "kv_heads_per_rank": self.batcher.runner.layers[0].num_kv_heads}}

    # --- requests --------------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """TemplateLM's tokenization (a context's trailing spaces join the continuation, whose tokens are the whole
        string's after the context's), with each distinct string encoded once: the choices of a question share it."""
        t0 = time.perf_counter()
        pairs = []
        for context, continuation in (req.args for req in requests):
            spaces = len(context) - len(context.rstrip())
            pairs.append((context[:len(context) - spaces], context[len(context) - spaces:] + continuation))
        enc = self._encode_many([t for c, x in pairs if c for t in (c, c + x)],
                                self.tokenizer.decode(self.prefix_token_id))
        new = []
        for req, (context, continuation) in zip(requests, pairs):
            if req.args[0] == "":  # as TemplateLM: the prefix token (BOS or EOS) is the context
                cont = self.tok_encode(continuation, add_special_tokens=False)
                ctx, cont = ([self.prefix_token_id], cont) if self.prefix_token_id != cont[0] else (cont[:1], cont[1:])
            else:
                ctx = enc[context]
                cont = enc[context + continuation][len(ctx):]
            new.append((req.args, ctx, cont))
        out, engine_s = self._score(new, disable_tqdm)
        self._timed("loglikelihood", len(requests), t0, engine_s)
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Score every (context, continuation) of the call in one ``score()`` call; the prefix cache shares contexts."""
        t0 = time.perf_counter()
        out, engine_s = self._score(requests, disable_tqdm)
        self._timed("loglikelihood", len(requests), t0, engine_s)
        return out

    def _score(self, requests, disable_tqdm: bool) -> tuple[list[tuple[float, bool]], float]:
        """(logprob, is_greedy) per (key, context, continuation), and the seconds the engine took."""
        pairs = [self._fit_pair(ctx, cont) for _key, ctx, cont in requests]
        t0 = time.perf_counter()
        results = self.batcher.score(pairs, progress=self._progress(disable_tqdm))
        engine_s = time.perf_counter() - t0
        out = []
        for (key, _ctx, _cont), r in zip(requests, results):
            if not r.ok:
                raise RuntimeError(f"async_batching: scoring {key!r} failed: {r.error}")
            answer = (float(r.logprob), bool(r.is_greedy))
            if key is not None:  # rolling windows have no key: their sum is cached per document
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out, engine_s

    def _fit_pair(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncate the context as the ``hf`` backend does (``max_length`` fed tokens plus the last continuation
        token), within the engine's positions."""
        limit = min(self.max_length + 1, self._engine_len)
        if len(context) + len(continuation) <= limit:  # the usual case: nothing to cut
            return context, continuation
        if len(continuation) >= limit:
            raise ValueError(f"async_batching: a continuation of {len(continuation)} tokens leaves no room for context "
                             f"within {limit} positions (max_length {self.max_length})")
        whole = context + continuation
        log.warning("context + continuation = %d tokens exceeds %d; truncating the context from the left",
                    len(whole), limit)
        whole = whole[-limit:]
        split = len(whole) - len(continuation)
        return whole[:split], whole[split:]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity windows from lm-eval's own utilities; all windows of all documents are scored at once."""
        t0 = time.perf_counter()
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=min(self.max_length, self._engine_len - 1), context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(i)
        totals = [0.0] * len(requests)
        scores, engine_s = self._score(windows, disable_tqdm)
        for i, (logprob, _greedy) in zip(owners, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        self._timed("loglikelihood_rolling", len(requests), t0, engine_s)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate for every request of the call at once; ``repeats: k`` copies become one request with ``n=k``."""
        t0 = time.perf_counter()
        args = [req.args for req in requests]
        runs = _identical_runs(args)
        # As the hf backend's batch encoding of generation contexts: no special tokens when BOS is already there.
        enc = self._encode_many([args[start][0] for start, _ in runs], getattr(self.tokenizer, "bos_token", None))
        prompts, params, stops = [], [], []
        for start, count in runs:
            context, gen_kwargs = args[start]
            sampling, until = self._sampling(gen_kwargs, count, start)
            prompts.append(self._truncated(enc[context], sampling.max_new_tokens, start))
            params.append(sampling)
            stops.append(until)
        t1 = time.perf_counter()
        results = self.batcher.generate(prompts, params, progress=self._progress(disable_tqdm))
        engine_s = time.perf_counter() - t1
        out = []
        for (start, count), until, r in zip(runs, stops, results):
            if not r.ok:
                raise RuntimeError(f"async_batching: generating for request {start} failed: {r.error}")
            if len(r.samples) != count:
                raise RuntimeError(f"async_batching: request {start} asked for {count} samples, got {len(r.samples)}")
            for s in r.samples:
                # Decoded whole and cut at the first stop string, exactly as lm-eval's hf backend does.
                text = postprocess_generated_text(self.tok_decode(s.token_ids), until, None)
                self.cache_hook.add_partial("generate_until", args[start], text)
                out.append(text)
        self._timed("generate_until", len(args), t0, engine_s,
                    tokens=sum(len(s.token_ids) for r in results for s in r.samples))
        return out

    def _sampling(self, gen_kwargs: dict, n: int, index: int) -> tuple[SamplingParams, list[str]]:
        """lm-eval gen_kwargs -> SamplingParams (``until`` also stops the engine early) and the stop strings."""
        if not isinstance(gen_kwargs, dict):
            raise TypeError(f"async_batching: request {index}: gen_kwargs must be a dict, got {gen_kwargs!r}")
        kw = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = handle_stop_sequences(kw.pop("until", None), eos=self.tok_decode([self.eot_token_id], False))
        max_new = int(kw.pop("max_gen_toks"))
        do_sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        if do_sample and temperature == 0.0:
            temperature = 1.0  # transformers' default when sampling without a temperature
        extra = {k: kw.pop(k) for k in SAMPLING_KEYS if k in kw}
        if extra.get("top_k") is None:
            extra.pop("top_k", None)
        stop_ids = list(kw.pop("stop_token_ids", None) or [])
        if kw:
            raise ValueError(f"async_batching: request {index}: unsupported gen_kwargs {sorted(kw)}; accepted: until, "
                             f"max_gen_toks, do_sample, temperature, stop_token_ids, {', '.join(SAMPLING_KEYS)}")
        special = set(self.tokenizer.all_special_tokens)
        # Special tokens never appear in text decoded without them, so they stop as token ids (the hf backend's stop
        # criterion decodes with them).
        stop_ids += [self.tokenizer.convert_tokens_to_ids(s) for s in until if s in special]
        sampling = SamplingParams(max_new_tokens=max_new, temperature=temperature if do_sample else 0.0, n=n,
                                  stop=tuple(s for s in until if s and s not in special),
                                  stop_token_ids=tuple(stop_ids), **extra)
        if problems := sampling.problems():
            raise ValueError(f"async_batching: request {index}: " + "; ".join(problems))
        return sampling, until

    def _truncated(self, ids: list[int], max_new_tokens: int, index: int) -> list[int]:
        """A context left-truncated so that it plus ``max_new_tokens`` fits ``max_length`` (as hf)."""
        room = self.max_length - max_new_tokens
        if room <= 0:
            raise ValueError(f"async_batching: request {index}: max_gen_toks ({max_new_tokens}) must be below "
                             f"max_length ({self.max_length})")
        if len(ids) > room:
            log.warning("request %d: context of %d tokens truncated from the left to %d", index, len(ids), room)
            ids = ids[-room:]
        return list(ids)

    def _progress(self, disable_tqdm: bool) -> bool:
        return not disable_tqdm and self._global_rank == 0

    def _timed(self, kind: str, n: int, t0: float, engine_s: float, tokens: int = 0) -> None:
        t = self.timings.setdefault(kind, {"calls": 0, "requests": 0, "seconds": 0.0, "engine_seconds": 0.0,
                                           "output_tokens": 0})
        t["calls"] += 1
        t["requests"] += n
        t["seconds"] += time.perf_counter() - t0
        t["engine_seconds"] += engine_s
        t["output_tokens"] += tokens

    def close(self) -> None:
        """Release the engine's KV cache and graphs."""
        self.batcher.close()

    # --- data parallel: lm-eval shards documents by rank and gathers metrics through these -------------------
    # Every process calls them. Under tensor parallelism a data-parallel rank is a group of ``_tp`` processes that
    # hold the same results: the collectives run over every process and keep each group's first one (``_leaders``).
    def _leaders(self, parts: list) -> list:
        return parts[::self._tp]

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._global_world <= 1:
            return tensor
        dist = torch.distributed
        part = tensor.reshape(1) if tensor.dim() == 0 else tensor
        parts = [torch.empty_like(part) for _ in range(self._global_world)]
        dist.all_gather(parts, part)
        return torch.cat(self._leaders(parts))

    def gather_object(self, obj: Any, dst: int = 0) -> Optional[list]:
        if self._global_world <= 1:
            return [obj]
        if self._tp > 1:  # every rank of the destination's group gets the list (lm-eval reads it where rank == dst)
            everyone = [None] * self._global_world
            torch.distributed.all_gather_object(everyone, obj)
            return self._leaders(everyone) if self.rank == dst else None
        out = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self._global_world > 1:
            torch.distributed.barrier()


_MIN_CHUNK = 32  # strings per thread below which more tokenizer threads cost more than they save


def _default_tokenizer_threads() -> int:
    """The CPUs this process may use over the ranks started on this host (torchrun's LOCAL_WORLD_SIZE), at most 16."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


def _identical_runs(args: list) -> list[tuple[int, int]]:
    """(start, count) of runs of identical requests: lm-eval hands a ``repeats: k`` document over k times in a row."""
    runs: list[tuple[int, int]] = []
    for i, a in enumerate(args):
        if runs and a == args[runs[-1][0]]:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _init_distributed() -> tuple[int, int]:
    """Rank and world size from torch.distributed, initialising it when launched by torchrun (WORLD_SIZE > 1)."""
    dist = torch.distributed
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _pick_device(device: Optional[str]) -> str:
    """The requested device; one GPU per rank under torch.distributed; the CPU when CUDA is asked for but absent."""
    if torch.cuda.is_available() and torch.distributed.is_available() and torch.distributed.is_initialized():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', torch.distributed.get_rank() % torch.cuda.device_count()))}"
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available; using the CPU", device)
        return "cpu"
    return str(device)


def _model_max_length(config: Any, batcher_args: dict) -> int:
    """lm-eval's own rule (the model config's positions), capped by the engine's ``max_model_len``."""
    from lm_eval.models.utils import resolve_max_length

    length = resolve_max_length(config)
    cap = batcher_args.get("max_model_len")
    return min(length, int(cap)) if cap else length


def task_manager(tasks: list, include_path: Any = None, metadata: Optional[dict] = None):
    """lm-eval's ``TaskManager`` over ``include_path`` alone when that names every task (indexing lm-eval's own ~14,000
    task files takes ~20 s on a CPU), else over lm-eval's tasks as well."""
    from lm_eval.tasks import TaskManager

    if include_path:
        own = TaskManager(include_path=include_path, include_defaults=False, metadata=metadata)
        if all(isinstance(t, str) and t in own.all_tasks for t in tasks):
            return own
    return TaskManager(include_path=include_path, metadata=metadata)


TEMPLATE_CACHE_ENV = "ASYNC_BATCHING_TEMPLATE_CACHE"  # "0": leave lm-eval's template rendering as released


def cache_templates() -> bool:
    """Make lm-eval compile each Jinja prompt template once per process instead of on every render.

    lm-eval's ``utils.apply_template`` compiles its template string each time it renders a document (lm-eval issue
    #1286): with 8 few-shot examples that is 18 compiles per document, about 4 s of 1,000 GSM8K-like documents on a
    CPU (docs/results/eval_overhead_cpu.md). The compiled template is a pure function of its string, so the text is
    the same. Our entry points (the lm-eval command line, ``recipes/evaluate.py``, ``GenerationEvaluation``) and the
    backend itself, when an ``AsyncBatchingLM`` is built, call this unless ``ASYNC_BATCHING_TEMPLATE_CACHE=0``;
    ``import async_batching.lm_eval`` alone changes nothing.
    Returns whether it is in place."""
    import lm_eval.utils

    if os.environ.get(TEMPLATE_CACHE_ENV, "1") == "0":
        return False
    if getattr(lm_eval.utils.apply_template, "_async_batching_cached", False):
        return True
    compiled = functools.lru_cache(maxsize=4096)(lm_eval.utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compiled(template).render(**doc)

    apply_template._async_batching_cached = True
    apply_template.__wrapped__ = lm_eval.utils.apply_template  # lm-eval's own, for whoever needs it back
    lm_eval.utils.apply_template = apply_template
    return True


def main(argv: Optional[list[str]] = None) -> None:
    """lm-eval's own command line, with ``--model async_batching`` registered (and its templates compiled once, see
    ``cache_templates``)."""
    from lm_eval.__main__ import cli_evaluate

    cache_templates()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    finally:
        _close_distributed()


def _close_distributed() -> None:
    """Tear torch.distributed down before the interpreter exits. A gloo process group left to the interpreter's exit
    aborted a rank now and then after the results were out ("terminate called without an active exception", SIGABRT:
    torchrun then reported the whole run failed; seen once in the CPU suite's two-rank tensor-parallel run)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    # Run as `python -m`, this file is __main__: make `import async_batching.lm_eval` find this module, so the model
    # is registered once (a second import would register a second class under the same name).
    sys.modules.setdefault("async_batching.lm_eval", sys.modules[__name__])
    main()


__all__ = ["AsyncBatchingLM", "cache_templates", "task_manager", "main"]
