"""The contenders: today's static ``generate``, transformers' ``generate_batch``, and this project (direct and Lightning).

Each variant takes a model and runs ``run(prompts, new_tokens)`` (or, for a scoring workload, ``score(contexts,
continuations)``) as often as asked; the runner times and profiles it. ``new_tokens`` is one budget for all requests or
one per request; the workload's ``sampling`` (temperature, top_p, top_k) applies unless the variant is greedy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch.profiler import record_function

from bench.profiling import SETUP_RANGE


Budgets = Union[int, list[int]]  # new tokens: one for all requests, or one per request


@dataclass
class RunOutput:
    """What one call produced: new (or scored) token counts (and ids) per request in input order, TTFT per request,
    request errors."""

    new_tokens: list[int]
    ttft_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)  # new tokens per request, input order (if known)


class Variant:
    """Base: a named way to generate. ``warms_up_itself`` variants skip the runner's separate warm-up call."""

    warms_up_itself = False
    greedy = False  # ignore the workload's sampling (the greedy reference of a sampled workload)
    counts_steps = False  # its stats() count engine steps (else the profiled run counts the model's forward calls)

    @staticmethod
    def attn_implementation() -> Optional[str]:
        """The attention implementation to build the model with (None: transformers' default)."""
        return None

    def __init__(self, model: torch.nn.Module, job: dict[str, Any]) -> None:
        self.model = model
        self.job = job
        self.device = job["device"]
        self.setup_s = 0.0  # time inside ``run`` that is one-off setup, excluded from wall time
        self.setup_end_epoch_s = 0.0  # when the last setup ended (time.time()), so GPU sampling can start there
        self.sampling: dict[str, Any] = {} if self.greedy else dict((job["workload"].get("sampling") or {}))

    def run(self, prompts: list[list[int]], new_tokens: Budgets) -> RunOutput:
        raise NotImplementedError

    def score(self, contexts: list[list[int]], continuations: list[list[int]]) -> RunOutput:
        """Log-likelihood of each continuation given its context; ``new_tokens`` of the output = tokens scored."""
        raise NotImplementedError(f"{type(self).__name__} does not score continuations")

    def forget_cached_prefixes(self) -> None:
        """Drop what a prefix cache kept from earlier calls (engines without one: nothing)."""

    def timed_setup(self, fn, *args, **kwargs):
        """Call ``fn`` (engine construction, CUDA-graph warm-up) as setup: timed apart, marked for the profiler."""
        t = time.perf_counter()
        try:
            with record_function(SETUP_RANGE):
                return fn(*args, **kwargs)
        finally:
            self.setup_s += time.perf_counter() - t
            self.setup_end_epoch_s = time.time()

    def info(self) -> dict[str, Any]:
        """The configuration this variant ran with (recorded in the JSON)."""
        return {}

    def stats(self) -> Optional[dict[str, Any]]:
        return None

    def gpu_busy(self) -> dict[str, Any]:
        """Busy share of the last run measured by the engine's own timing events (ours only; {} elsewhere)."""
        return {}

    def close(self) -> None:
        pass


def _generation_config(new_tokens: int, sampling: dict[str, Any]):
    """``generate``'s config for a fixed number of new tokens: greedy, or sampled with the workload's settings."""
    from transformers import GenerationConfig

    draw = {k: sampling[k] for k in ("temperature", "top_p", "top_k") if k in sampling}
    do_sample = float(sampling.get("temperature", 0.0)) > 0
    if not do_sample:
        draw = {}
    elif "top_k" not in draw:
        draw["top_k"] = 0  # transformers' default top_k=50 would filter when the workload asks for none
    return GenerationConfig(max_new_tokens=new_tokens, do_sample=do_sample, eos_token_id=None, pad_token_id=0, **draw)


def _one_budget(new_tokens: Budgets, who: str) -> int:
    """The single budget a batch-level API needs; a clear error when the workload gives each request its own."""
    if isinstance(new_tokens, int):
        return new_tokens
    if len(set(new_tokens)) > 1:
        raise ValueError(f"{who} takes one max_new_tokens for all requests; this workload gives each request its own "
                         f"({min(new_tokens)}..{max(new_tokens)})")
    return new_tokens[0]


class StaticGenerate(Variant):
    """``trainer.predict`` with a ``predict_step`` that calls ``model.generate`` on left-padded batches."""

    def __init__(self, model, job) -> None:
        super().__init__(model, job)
        from bench.lightning_modules import PaddedGenerate, trainer

        self.batch_size = int(job["static_batch_size"])
        self.module = PaddedGenerate(model)
        self.trainer = trainer(self.device)

    def run(self, prompts, new_tokens):
        from torch.utils.data import DataLoader

        from bench.lightning_modules import left_pad_with_budgets

        budgets = [new_tokens] * len(prompts) if isinstance(new_tokens, int) else list(new_tokens)
        # A padded batch generates as many tokens as its largest budget; each request counts only its own.
        loader = DataLoader(list(zip(prompts, budgets)), batch_size=self.batch_size, shuffle=False,
                            collate_fn=left_pad_with_budgets)
        self.module.generation_config = _generation_config(max(budgets), self.sampling)
        self.module.run_start_s = time.perf_counter()
        batches = self.trainer.predict(self.module, dataloaders=loader, return_predictions=True)
        out = RunOutput(new_tokens=[])
        for b in batches:
            out.new_tokens += b["new_tokens"]
            out.token_ids += b["token_ids"]
            out.ttft_s += [t for t in b["ttft_s"] if t is not None]
        return out

    def score(self, contexts, continuations):
        from torch.utils.data import DataLoader

        from bench.lightning_modules import PaddedScore, left_pad_pairs

        module = PaddedScore(self.model)
        loader = DataLoader(list(zip(contexts, continuations)), batch_size=self.batch_size, shuffle=False,
                            collate_fn=left_pad_pairs)
        batches = self.trainer.predict(module, dataloaders=loader, return_predictions=True)
        return RunOutput(new_tokens=[n for b in batches for n in b["scored_tokens"]])

    def info(self):
        info = {"batch_size": self.batch_size, "padding": "left", "attn_implementation": self.model.config._attn_implementation,
                "sampling": self.sampling or "greedy"}
        if self.job["workload"].get("generator") == "score_pairs":
            info["scoring"] = "one forward per padded batch, logits only for the continuation positions (logits_to_keep)"
        return info


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


class HfContinuousBatching(Variant):
    """transformers' ``model.generate_batch`` with its defaults, sync or async (``use_async_batching``)."""

    warms_up_itself = True  # a separate small call would size the (persistent) manager for the wrong workload

    @staticmethod
    def attn_implementation() -> str:
        """transformers < 5.23 wants the ``paged|`` prefix for continuous batching with SDPA; 5.23+ removed it."""
        import transformers
        from packaging.version import Version

        return "paged|sdpa" if Version(transformers.__version__).release < (5, 23) else "sdpa"

    def __init__(self, model, job, use_async: bool) -> None:
        super().__init__(model, job)
        try:
            from transformers.generation import ContinuousBatchingConfig
        except ImportError:
            from transformers import ContinuousBatchingConfig
        self.use_async = use_async
        overrides = {k: v for k, v in (job.get("hf_cb") or {}).items() if v is not None}
        self.cb_config = ContinuousBatchingConfig(use_async_batching=use_async, **overrides)
        self.resolved: dict[str, Any] = {}
        self.manager = None
        self._time_setup()

    def _time_setup(self) -> None:
        """Count the manager's creation and CUDA-graph warm-up as setup, not generation (ours warms up untimed too)."""
        variant = self
        init = getattr(self.model, "init_continuous_batching", None)
        if init is None:  # another transformers layout: run untimed rather than fail
            return

        def timed_init(*args, **kwargs):
            manager = variant.timed_setup(init, *args, **kwargs)
            if getattr(manager, "_bench_timed", False):  # the persistent manager, already instrumented
                return manager
            manager._bench_timed = True
            variant.manager = manager
            variant.resolved["attn_implementation_in_use"] = variant.model.config._attn_implementation
            warmup = getattr(manager, "warmup", None)
            if callable(warmup):
                manager.warmup = lambda *a, **k: variant.timed_setup(warmup, *a, **k)
            return manager

        self.model.init_continuous_batching = timed_init

    def run(self, prompts, new_tokens):
        kwargs = dict(
            inputs=prompts,
            generation_config=_generation_config(_one_budget(new_tokens, "generate_batch"), self.sampling),
            continuous_batching_config=self.cb_config,
            warmup=True,
            persistent_manager=True,  # keeps the warmed-up manager for the profiled run
            record_timestamps=True,
            progress_bar=False,
        )
        accepted = inspect.signature(self.model.generate_batch).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in accepted or k in ("inputs", "generation_config")}
        results = self.model.generate_batch(**kwargs)
        out = RunOutput(new_tokens=[])
        for r in results.values():
            out.new_tokens.append(len(r.generated_tokens))
            if getattr(r, "error", None):
                out.errors.append(str(r.error))
            stamps = getattr(r, "timestamps", None)
            if stamps:
                out.ttft_s.append(stamps[0] - r.created_time)
        missing = len(prompts) - len(results)
        if missing:
            out.errors.append(f"{missing} request(s) missing from generate_batch's results")
            out.new_tokens += [0] * missing
        return out

    def info(self):
        import transformers

        cfg = getattr(self.manager, "continuous_batching_config", None) or getattr(self.manager, "cb_config", None)
        if cfg is not None and dataclasses.is_dataclass(cfg):  # resolved values (some are filled in at cache creation)
            self.resolved["continuous_batching_config"] = {f.name: _jsonable(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
        return {
            "transformers": transformers.__version__,
            "sampling": self.sampling or "greedy",
            "use_async_batching": self.use_async,
            "attn_implementation_requested": self.model.config._attn_implementation,
            **self.resolved,
        }

    def close(self):
        destroy = getattr(self.model, "destroy_cached_continuous_batching_manager", None)
        if callable(destroy):
            destroy()


class HfContinuousBatchingSync(HfContinuousBatching):
    def __init__(self, model, job):
        super().__init__(model, job, use_async=False)


class HfContinuousBatchingAsync(HfContinuousBatching):
    def __init__(self, model, job):
        super().__init__(model, job, use_async=True)


def _batcher_overrides(
    job: dict[str, Any], mode: str, cuda_graphs: Optional[bool], compile: Optional[bool] = None,
    prefix_caching: Optional[bool] = None,
) -> dict[str, Any]:
    kw = {k: v for k, v in (job.get("batcher") or {}).items() if v is not None}
    kw["mode"] = mode
    if cuda_graphs is not None:
        kw["cuda_graphs"] = cuda_graphs
    if compile is not None:  # None: the engine's default (on with CUDA graphs)
        kw["compile"] = compile
    if prefix_caching is not None:  # None: the engine's default (on, once BatcherConfig has the key)
        kw["prefix_caching"] = prefix_caching
    return kw


def _sampling_params(new_tokens: Budgets, sampling: dict[str, Any]):
    """One SamplingParams for a shared budget, else one per request (EOS ignored: fixed output lengths)."""
    from async_batching import SamplingParams

    if isinstance(new_tokens, int):
        return SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, **sampling)
    return [SamplingParams(max_new_tokens=m, ignore_eos=True, **sampling) for m in new_tokens]


class StartupClock:
    """Times the engine's start-up phases (warm-up/compile, CUDA-graph capture) while a ContinuousBatcher is built.

    Wraps the model runner's public ``warmup`` and ``capture_graphs`` for the duration of the build only (this
    benchmark process alone); phases the engine does not have are simply absent.
    """

    PHASES = {"warmup": "warmup_compile_s", "capture_graphs": "graph_capture_s"}

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}

    def __enter__(self) -> "StartupClock":
        from async_batching.model_runner import ModelRunner

        self._saved = {}
        for method, key in self.PHASES.items():
            original = getattr(ModelRunner, method, None)
            if original is None:
                continue
            self._saved[method] = original
            setattr(ModelRunner, method, self._timed(original, key))
        return self

    def _timed(self, fn, key: str):
        parts = self.parts

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                parts[key] = parts.get(key, 0.0) + time.perf_counter() - t

        return timed

    def __exit__(self, *exc) -> None:
        from async_batching.model_runner import ModelRunner

        for method, original in self._saved.items():
            setattr(ModelRunner, method, original)


def _results_output(results: list[Any]) -> RunOutput:
    out = RunOutput(new_tokens=[])
    for r in results:
        ids = r["token_ids"] if isinstance(r, dict) else r.token_ids
        out.new_tokens.append(len(ids))
        out.token_ids.append(list(ids))
        ttft = r.get("ttft_s") if isinstance(r, dict) else getattr(r, "ttft_s", None)
        if ttft is not None:
            out.ttft_s.append(ttft)
        err = r.get("error") if isinstance(r, dict) else getattr(r, "error", None)
        if err:
            out.errors.append(str(err))
    return out


class Ours(Variant):
    """``ContinuousBatcher.generate`` of this project; ``cuda_graphs=None`` leaves the engine's default (on for CUDA)."""

    mode = "async"
    cuda_graphs: Optional[bool] = None
    compile: Optional[bool] = None  # None: the engine's default (decode steps compiled where they run in CUDA graphs)
    prefix_caching: Optional[bool] = None
    decode_window: Optional[int] = None  # None: the engine's default (model_runner.DECODE_WINDOW with CUDA graphs)
    block_size: Optional[int] = None  # None: the engine's default (16 slots a KV block), or the run's batcher override
    admit_threshold: Optional[int] = None  # None: the engine's default (1 until measured: scheduler.py)
    counts_steps = True

    def __init__(self, model, job) -> None:
        super().__init__(model, job)
        from async_batching import ContinuousBatcher

        self.overrides = _batcher_overrides(job, self.mode, self.cuda_graphs, self.compile, self.prefix_caching)
        if self.decode_window is not None:
            self.overrides["decode_window"] = self.decode_window
        if self.block_size is not None:
            self.overrides["block_size"] = self.block_size
        if self.admit_threshold is not None:
            self.overrides["admit_threshold"] = self.admit_threshold
        with StartupClock() as clock:
            self.batcher = ContinuousBatcher(model, tokenizer=None, **self.overrides)
        self.startup_parts = clock.parts

    def forget_cached_prefixes(self) -> None:
        self.batcher.reset_prefix_cache()

    def _timed_steps(self, call):
        from bench.step_timer import StepTimer

        executor = self.batcher.executor
        timer = StepTimer()  # a pair of CUDA events per step: no profiler, the host is undisturbed
        executor.observe(timer)
        try:
            out = call()
            self._busy = timer.busy()
        finally:
            executor.observers.remove(timer)
        return out

    def run(self, prompts, new_tokens):
        sampling = _sampling_params(new_tokens, self.sampling)
        return _results_output(self._timed_steps(lambda: self.batcher.generate(prompts, sampling)))

    def score(self, contexts, continuations):
        results = self._timed_steps(lambda: self.batcher.score(list(zip(contexts, continuations))))
        out = RunOutput(new_tokens=[len(r.token_logprobs or []) for r in results])
        out.errors = [f"pair {r.index}: {r.error}" for r in results if r.error]
        return out

    def gpu_busy(self):
        return dict(getattr(self, "_busy", {}) or {})

    def info(self):
        cfg = getattr(self.batcher, "config", None)
        resolved = dataclasses.asdict(cfg) if cfg is not None and dataclasses.is_dataclass(cfg) else None
        return {"overrides": self.overrides, "config": _jsonable(resolved), "sampling": self.sampling or "greedy"}

    def stats(self):
        return dict(getattr(self.batcher, "stats", None) or {})

    def close(self):
        self.batcher.close()


class OursSync(Ours):
    mode = "sync"


class OursSyncNoGraph(Ours):
    mode, cuda_graphs = "sync", False


class OursAsync(Ours):
    mode = "async"


class OursAsyncNoGraph(Ours):
    mode, cuda_graphs = "async", False


class OursAsyncCompile(Ours):
    """Async with graphs, decode steps through torch.compile (BatcherConfig.compile; prefill stays eager): the
    default on CUDA, forced on (e.g. with graphs off)."""

    mode, compile = "async", True


class OursAsyncEager(Ours):
    """``ours_async`` with ``compile=False``: decode graphs replay transformers' layer code kernel by kernel."""

    mode, compile = "async", False


class _PrefillThreshold(Ours):
    """``ours_async`` built with ``model_runner.PREFILL_COMPILE_MIN_WORK`` set to ``min_work`` (restored after)."""

    mode = "async"
    min_work = 0.0

    def __init__(self, model, job) -> None:
        from async_batching import model_runner

        saved, model_runner.PREFILL_COMPILE_MIN_WORK = model_runner.PREFILL_COMPILE_MIN_WORK, self.min_work
        try:
            super().__init__(model, job)
        finally:
            model_runner.PREFILL_COMPILE_MIN_WORK = saved


class OursAsyncPrefillEager(_PrefillThreshold):
    """``ours_async`` with decode steps compiled but every prefill and mixed step uncompiled (the engine before
    session 5: the threshold past any step), to show what compiling the large prefill steps gives alone."""

    min_work = float("inf")


class OursAsyncPrefillCompiled(_PrefillThreshold):
    """``ours_async`` with every prefill and mixed step through the compiled model, however small (the threshold at
    0): the default since session 11, kept so that runs compare with earlier ones."""

    min_work = 0.0


class OursAsyncPrefillThreshold(_PrefillThreshold):
    """``ours_async`` with sessions 5-10's work threshold for compiled prefill steps (4e12 tokens x parameters: about
    3,200 tokens of a 1B model), to show what compiling every prefill step gives."""

    min_work = 4e12


class OursAsyncUnfused(Ours):
    """``ours_async`` with ``fuse_projections=False``: q/k/v and gate/up as separate products (the engine before
    session 6), to show what fusing them gives alone."""

    mode = "async"

    def __init__(self, model, job) -> None:
        job = dict(job, batcher={**(job.get("batcher") or {}), "fuse_projections": False})
        super().__init__(model, job)


class _OursAsyncBuiltWith(Ours):
    """``ours_async`` with module settings of the engine replaced while it is built (``patches``: (module of
    async_batching, name) -> value; each read when an engine is built), then restored."""

    mode = "async"
    patches: dict = {}

    @classmethod
    @contextlib.contextmanager
    def settings(cls):
        """``patches`` in place for the duration of the block (an engine built inside it reads them), then restored."""
        import importlib

        saved = []
        try:
            for (module, name), value in cls.patches.items():
                mod = importlib.import_module(f"async_batching.{module}")
                saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, value)
            yield
        finally:
            for mod, name, value in reversed(saved):
                setattr(mod, name, value)

    def __init__(self, model, job) -> None:
        with self.settings():
            super().__init__(model, job)


class _OursAsyncRunWith(_OursAsyncBuiltWith):
    """``_OursAsyncBuiltWith`` for module settings read at every call instead of when the engine is built (a kernel
    form chosen at each draw, outside the captured graphs): ``patches`` stay in place while the engine runs and
    scores too, not only while it is built."""

    def run(self, prompts, new_tokens):
        with self.settings():
            return super().run(prompts, new_tokens)

    def score(self, contexts, continuations):
        with self.settings():
            return super().score(contexts, continuations)


class OursAsyncGc(_OursAsyncBuiltWith):
    """``ours_async`` without the garbage-collector freeze after start-up (``gc_freeze.FREEZE`` off while this engine
    is built), to show what the freeze gives alone."""

    patches = {("gc_freeze", "FREEZE"): False}


# ``ours_async_stacked``'s levers, the default since session 18 (W7 on the H200, session 16: 25,060 out tok/s against
# 24,572 without them; session 14: +3.1%): each one's value when it is off, then all of them off.
_COMBO = {"combo_kernels": True}  # compiled_layers.COMPILE_OPTIONS in use
STACKED_OFF = {("model_runner", "PREFILL_OWN_COMPILE"): False, ("kv_cache", "KV_LAYOUT"): "token",
               ("attention", "FUSED_DECODE_WRITE"): False, ("attention", "DECODE_MAXNREG"): 0,
               ("compiled_layers", "COMPILE_OPTIONS"): {}}


class OursAsyncNoFusedWrite(_OursAsyncBuiltWith):
    """``ours_async`` with decode steps' K/V written by a launch of its own, before attention
    (``attention.FUSED_DECODE_WRITE`` off, no register cap): the default until session 17."""

    patches = {("attention", "FUSED_DECODE_WRITE"): False, ("attention", "DECODE_MAXNREG"): 0}


class OursAsyncDecode2Warps(_OursAsyncBuiltWith):
    """``ours_async`` with the Triton kernel's decode programs at 16-bit head dims up to 64 of 2 warps over 64-key
    tiles, uncapped (``attention.DECODE_WARPS`` 2, ``DECODE_WARPS_MAXNREG`` 0: session 19's launch), instead of 4
    warps over 128 keys capped at ``DECODE_MAXNREG``."""

    patches = {("attention", "DECODE_WARPS"): 2, ("attention", "DECODE_WARPS_MAXNREG"): 0}


class OursAsyncDecode4Warps(_OursAsyncBuiltWith):
    """``ours_async`` with 4-warp decode programs over 128-key tiles capped at ``DECODE_MAXNREG``
    (``attention.DECODE_WARPS`` 0: the default; session 22 timed it as the baseline while 2 warps were on)."""

    patches = {("attention", "DECODE_WARPS"): 0}


class OursAsyncDecode2WarpsCapped(_OursAsyncBuiltWith):
    """``ours_async`` with 2-warp decode programs over 64-key tiles (``attention.DECODE_WARPS``) capped at 96 registers
    (``attention.DECODE_WARPS_MAXNREG``): 10 programs an SM on sm_90 against the 4-warp launch's 5."""

    patches = {("attention", "DECODE_WARPS"): 2, ("attention", "DECODE_WARPS_MAXNREG"): 96}


class OursAsyncDecodeAllHeads(_OursAsyncBuiltWith):
    """``ours_async`` with decode launches of one program per sequence over all its kv heads
    (``attention.DECODE_HEADS_PER_PROGRAM``), where the launch does not split its KV range."""

    patches = {("attention", "DECODE_HEADS_PER_PROGRAM"): 1 << 16}  # more than any model's kv heads: all of them


class OursAsyncDecodeHeads2(_OursAsyncBuiltWith):
    """``ours_async`` with decode launches of one program per sequence and pair of kv heads (all of them where 2 does
    not divide them: W1's 3)."""

    patches = {("attention", "DECODE_HEADS_PER_PROGRAM"): 2}


class OursAsyncLayerPairs(_OursAsyncBuiltWith):
    """``ours_async`` with each pair of consecutive decoder layers compiled as one graph (``compiled_layers.LAYER_GROUP``
    2: fused across the pair's boundary)."""

    patches = {("compiled_layers", "LAYER_GROUP"): 2}


class OursAsyncLayerGroups5(_OursAsyncBuiltWith):
    """``ours_async`` with groups of five consecutive decoder layers compiled as one graph."""

    patches = {("compiled_layers", "LAYER_GROUP"): 5}


class OursAsyncLayerGroups15(_OursAsyncBuiltWith):
    """``ours_async`` with groups of fifteen consecutive decoder layers compiled as one graph (W1's 30 layers: two
    calls of one graph)."""

    patches = {("compiled_layers", "LAYER_GROUP"): 15}


class OursAsyncTokens64k(_OursAsyncBuiltWith):
    """``ours_async`` without the generation steps' cap (``model_runner.GRAPH_STEP_TOKENS`` None): every step may take
    the auto budget, 65,536 tokens for W1's 135M model (the default until session 21: three prefill steps)."""

    patches = {("model_runner", "GRAPH_STEP_TOKENS"): None}


class OursAsyncTokens8k(_OursAsyncBuiltWith):
    """``ours_async`` with generation steps capped at 8,192 tokens (``model_runner.GRAPH_STEP_TOKENS``)."""

    patches = {("model_runner", "GRAPH_STEP_TOKENS"): 8192}


class OursAsyncDeviceOrder(_OursAsyncBuiltWith):
    """``ours_async`` with the decode launches' longest-first order sorted inside each decode graph, as until session
    19, not staged by the host (``model_runner.HOST_DECODE_ORDER``)."""

    patches = {("model_runner", "HOST_DECODE_ORDER"): False}


class OursAsyncTritonArgmax(_OursAsyncBuiltWith):
    """``ours_async`` with greedy tokens from the chunked Triton argmax, written into the token buffer
    (``sampling.TRITON_ARGMAX``), instead of torch's argmax, a cast and a copy."""

    patches = {("sampling", "TRITON_ARGMAX"): True}


class OursAsyncGraphSlots(_OursAsyncBuiltWith):
    """``ours_async`` with a decode graph's inputs as until session 24: the slot mapping made in the graph before the
    first layer (``attention.DECODE_SLOTS_IN_KERNEL`` off: seven small kernels) and the kept rows gathered before the
    LM head (``model_runner.GRAPH_KEEP_ALL`` off: two kernels)."""

    patches = {("attention", "DECODE_SLOTS_IN_KERNEL"): False, ("model_runner", "GRAPH_KEEP_ALL"): False}


class OursAsyncDecodeUnpaired(_OursAsyncBuiltWith):
    """``ours_async`` with decode launches of a program per (sequence, kv head) at every head dim, 4 warps over
    128-key tiles (``attention.DECODE_PAIRS`` off: the default until session 25)."""

    patches = {("attention", "DECODE_PAIRS"): False}


class OursAsyncTwoPassMass(_OursAsyncRunWith):
    """``ours_async`` with the full draw's mass kernel in its two-pass form (``triton_sampling.ONE_PASS_MASS`` off,
    the default until session 24): each chunk read once for its largest logit and again for its weights. The draws
    run outside the decode graphs and read the flag at every draw, so it stays off while this engine runs (until
    session 24's fix it was off only while the engine was built: its W7 run drew with the one-pass default)."""

    patches = {("triton_sampling", "ONE_PASS_MASS"): False}


class OursAsyncNoComboKernels(_OursAsyncBuiltWith):
    """``ours_async`` without inductor's ``combo_kernels`` (``compiled_layers.COMPILE_OPTIONS`` empty, as until
    session 17): the q and k norms and rotary embeddings of a layer as separate launches."""

    patches = {("compiled_layers", "COMPILE_OPTIONS"): {}}


class OursAsyncTokenMajor(_OursAsyncBuiltWith):
    """``ours_async`` with each KV block token-major (``kv_cache.KV_LAYOUT = "token"``, the default until session 17):
    a kv head's keys of a block kv_heads x 128 B apart (W1: 3 kv heads of 64 dims) instead of next to each other."""

    patches = {("kv_cache", "KV_LAYOUT"): "token"}


class OursAsyncNoPrefillOwnCompile(_OursAsyncBuiltWith):
    """``ours_async`` with prefill steps running the decode steps' compiled code (``model_runner.PREFILL_OWN_COMPILE``
    off, the default until session 17): its fused kernels' launches sized for 256 decode rows, one compile fewer at
    start-up. Until session 13 inductor's FX-graph cache handed the prefill compiles the decode graphs' code anyway
    (the cache does not key on size hints)."""

    patches = {("model_runner", "PREFILL_OWN_COMPILE"): False}


class OursAsyncSession17Defaults(_OursAsyncBuiltWith):
    """``ours_async`` as it was until session 17: none of ``ours_async_stacked``'s levers (prefill code of its own,
    head-major KV blocks, the decode write in the attention kernel under a register cap, combo kernels)."""

    patches = dict(STACKED_OFF)


class OursAsyncPdl(_OursAsyncBuiltWith):
    """``ours_async`` with inductor's programmatic dependent launch (``triton.enable_pdl``) in the engine's compiles:
    on Hopper, each generated kernel is launched to start while the kernel before it drains and waits
    (``griddepcontrol.wait``) only before reading what that kernel wrote; captured in the decode graphs as
    programmatic edges. A decode step is ~380 kernels of 2-6 us (step_probe_h200_s12.md). Measured on the H200
    (session 13, 3 calls each): W1 135,055 vs 146,985 out tok/s (medians 138,699 vs 146,985), W7 23,529 vs 23,500:
    not turned on."""

    patches = {("compiled_layers", "COMPILE_OPTIONS"): {**_COMBO, "triton.enable_pdl": True}}

    def __init__(self, model, job) -> None:
        import torch._inductor.config as inductor_config

        if not hasattr(inductor_config.triton, "enable_pdl"):
            raise RuntimeError(f"torch {torch.__version__} has no inductor option triton.enable_pdl")
        super().__init__(model, job)


class OursAsyncSizeOblivious(_OursAsyncBuiltWith):
    """``ours_async`` with size-oblivious tracing (``compiled_layers.SIZE_OBLIVIOUS``): one compiled graph per module
    instead of two (none specialised to one row or token); one-row steps run the dynamic graph's kernels. On the H200
    (session 14) W1's start-up was no shorter: 37.3 s against 32.1 s."""

    patches = {("compiled_layers", "SIZE_OBLIVIOUS"): True}


class OursAsyncMaxAutotune(_OursAsyncBuiltWith):
    """``ours_async`` with inductor's ``max_autotune`` in the engine's compiles: each matrix product of a layer timed
    at start-up against inductor's Triton templates (decode code on 256 rows, prefill code on a full-budget step),
    the winner kept for its steps; a Triton product can take the pointwise work before or after it as its prologue or
    epilogue (the MLP's silu-mul, the residual add). On the H200 (session 17, W1, ours_async then without prefill code
    of its own): 123,407 out tok/s against 146,230 (-16%; the templates tuned on decode rows doubled the prefill
    phase); with prefill code of its own 135,077 (-8%; decode about 0.27 ms a step slower), with all of
    ``ours_async_stacked``'s levers 135,544; start-up 95-119 s against 36."""

    patches = {("compiled_layers", "COMPILE_OPTIONS"): {**_COMBO, "max_autotune": True}}


class OursAsyncCoordinateDescent(_OursAsyncBuiltWith):
    """``ours_async`` with inductor's ``coordinate_descent_tuning`` in the engine's compiles: each generated pointwise
    and reduction kernel's launch (block sizes, warps) tuned at start-up on its first shapes."""

    patches = {("compiled_layers", "COMPILE_OPTIONS"): {**_COMBO, "coordinate_descent_tuning": True}}


class OursAsyncWholeModel(_OursAsyncBuiltWith):
    """``ours_async`` with the whole model compiled as one graph (``compiled_layers.REGIONAL`` off), not one layer at a
    time: inductor fuses across layer boundaries (the residual add that ends a layer with the next layer's input
    norm: on W1's decode step about 2 us a layer of 30, and a pass over the hidden states in prefill). Start-up grows
    with the depth (every layer unrolled into the graph)."""

    patches = {("compiled_layers", "REGIONAL"): False}


class OursAsyncAggressiveFusion(_OursAsyncBuiltWith):
    """``ours_async`` with inductor's ``aggressive_fusion`` in the engine's compiles: nodes fused even where they
    share no input (inductor's default fuses only kernels that read a common buffer), fewer launches a layer where
    the scheduler finds them compatible."""

    patches = {("compiled_layers", "COMPILE_OPTIONS"): {**_COMBO, "aggressive_fusion": True}}


class OursAsyncNoPrefillGraphs(_OursAsyncBuiltWith):
    """``ours_async`` with prefill and mixed steps launched eagerly (``model_runner.PREFILL_GRAPHS`` off, the default
    until session 15): what the prefill graphs give, alone, against today's default."""

    patches = {("model_runner", "PREFILL_GRAPHS"): False}


class OursAsyncNoLongestFirst(_OursAsyncBuiltWith):
    """``ours_async`` with decode launches in the step's own sequence order (``attention.DECODE_LONGEST_FIRST`` off,
    the default until session 15): what longest-first decode launches give, alone, against today's default."""

    patches = {("attention", "DECODE_LONGEST_FIRST"): False}


class OursAsyncPreviousDefaults(_OursAsyncBuiltWith):
    """``ours_async`` as it was until session 15: no prefill graphs, decode launches in sequence order, and none of
    the levers of session 18 (``ours_async_session17_defaults``)."""

    patches = {**STACKED_OFF, ("model_runner", "PREFILL_GRAPHS"): False, ("attention", "DECODE_LONGEST_FIRST"): False}


class OursAsyncNoDecodeTune(_OursAsyncBuiltWith):
    """``ours_async`` with the decode steps' compiled code traced first on 1-3 rows (``model_runner.DECODE_TUNE_ROWS``
    = 0; sessions 5-11): the fused kernels' launches sized for a few rows, not for large decode batches (256, the
    default since session 12)."""

    patches = {("model_runner", "DECODE_TUNE_ROWS"): 0}


class OursAsyncSplitDecode(_OursAsyncBuiltWith):
    """``ours_async`` with decode graphs of 64 rows or more captured as two row halves on two streams
    (``model_runner.DECODE_SPLIT_MIN_ROWS``): the halves' small kernels run side by side."""

    patches = {("model_runner", "DECODE_SPLIT_MIN_ROWS"): 64}


class OursAsyncSplitDecode256(_OursAsyncBuiltWith):
    """``ours_async_split_decode`` from 256 rows only: the largest decode graphs split, smaller ones whole."""

    patches = {("model_runner", "DECODE_SPLIT_MIN_ROWS"): 256}


class OursAsyncCublasLt(OursAsync):
    """``ours_async`` with cuBLASLt as torch's preferred BLAS library (``torch.backends.cuda.preferred_blas_library``)
    while the engine is built (the products captured in its decode graphs) and runs, restored at close."""

    def __init__(self, model, job) -> None:
        self._blas = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            super().__init__(model, job)
        except BaseException:
            torch.backends.cuda.preferred_blas_library(self._blas)
            raise

    def close(self):
        try:
            super().close()
        finally:
            torch.backends.cuda.preferred_blas_library(self._blas)


class OursAsyncGreedy(Ours):
    """``ours_async`` with greedy decoding whatever the workload samples: the reference of a sampled workload (W2s)."""

    mode, greedy = "async", True


class OursAsyncNoWindow(Ours):
    """``ours_async`` with ``decode_window=1``: every decode step planned, staged and processed on its own (the
    engine before session 9), to show what decode windows give alone."""

    mode, decode_window = "async", 1


class OursAsyncBlock64(Ours):
    """``ours_async`` with KV blocks of 64 slots (the default is 16): a 128-key decode tile spans 2 blocks, not 8, so
    fewer block-table lookups and longer runs of one sequence's keys; prefix sharing in whole 64-token blocks."""

    mode, block_size = "async", 64


class OursAsyncBlock32(Ours):
    """``ours_async`` with KV blocks of 32 slots: a 128-key decode tile spans 4 blocks, not 8 (each kv head's run of a
    block 4 KB at head dim 64); prefix sharing in whole 32-token blocks."""

    mode, block_size = "async", 32


class OursAsyncAdmitEach(Ours):
    """``ours_async`` admitting each waiting request as soon as it fits (``admit_threshold=1``, the default until
    admission in batches is measured): with requests finishing at different steps, most steps become prefill/mixed
    steps outside the decode graphs."""

    mode, admit_threshold = "async", 1


class OursAsyncAdmitAuto(_OursAsyncBuiltWith):
    """``ours_async`` with admission in batches as its auto default (``scheduler.ADMIT_IN_BATCHES_WITH_GRAPHS``):
    ``max_num_seqs // 8`` waiting requests (64 at 512 slots) or an eighth of the cache, with decode graphs."""

    patches = {("scheduler", "ADMIT_IN_BATCHES_WITH_GRAPHS"): True}


class OursAsyncAdmit16(Ours):
    """``ours_async`` admitting in batches of 16 (``admit_threshold=16``; ``ours_async_admit_auto`` at 512 slots:
    64): more admitting steps, fuller batches between them."""

    mode, admit_threshold = "async", 16


class OursAsyncAdmit128(Ours):
    """``ours_async`` admitting in batches of 128 (``admit_threshold=128``): fewer admitting steps, emptier batches
    between them."""

    mode, admit_threshold = "async", 128


class OursAsyncWindow8(Ours):
    """``ours_async`` with decode windows of 8 forwards (the default is 4)."""

    mode, decode_window = "async", 8


class OursAsyncNoPrefixCache(Ours):
    """``ours_async`` with ``prefix_caching=False``: every prompt prefilled in full (the W5 baseline of issue 11)."""

    mode, prefix_caching = "async", False


def _flatten(predictions: Any) -> list[Any]:
    if predictions is None:
        return []
    if isinstance(predictions, (list, tuple)):
        return [r for p in predictions for r in _flatten(p)]
    return [predictions]


class OursLightning(Variant):
    """The same engine, async, behind ``trainer.predict`` with the ``ContinuousBatching`` callback.

    The callback builds a fresh engine per predict run; that construction (cache, CUDA graphs) and the Trainer's
    count as setup, as the engine's does for ``ours_async``: the two walls differ by ``trainer.predict`` only.
    """

    counts_steps = True

    def __init__(self, model, job) -> None:
        super().__init__(model, job)
        from bench.lightning_modules import PromptsModule

        self.module = PromptsModule(model)
        self.overrides = _batcher_overrides(job, "async", None)
        self.batch_size = int(job["static_batch_size"])
        self._stats: Optional[dict[str, Any]] = None
        self.batcher = None

    def _callback(self, new_tokens: int):
        from async_batching import SamplingParams
        from async_batching.lightning import ContinuousBatching

        callback = ContinuousBatching(
            sampling=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, **self.sampling), request_progress=False,
            **self.overrides,
        )
        build = callback.build_batcher
        variant = self

        def build_fresh(module):
            gc.collect()  # the previous run's engine must be gone before this one sizes its cache from free memory
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            return build(module)

        def timed_build(module):
            variant.batcher = variant.timed_setup(build_fresh, module)
            return variant.batcher

        callback.build_batcher = timed_build
        return callback

    def run(self, prompts, new_tokens):
        from torch.utils.data import DataLoader

        from bench.lightning_modules import trainer

        loader = DataLoader(prompts, batch_size=self.batch_size, shuffle=False, collate_fn=lambda b: {"input_ids": list(b)})
        self.batcher = None
        callback = self._callback(_one_budget(new_tokens, "the ContinuousBatching callback's one SamplingParams"))
        predictor = self.timed_setup(lambda: trainer(self.device, callbacks=[callback]))
        t0 = time.perf_counter()
        predictions = predictor.predict(self.module, dataloaders=loader, return_predictions=True)
        # Lightning's own work around the loop is fixed per predict call, whatever the workload: its strategy moves
        # the module to the device at setup and back to the CPU at teardown. Count it as setup and report it apart.
        # The engine's build (timed above by timed_setup) is the loop's startup_s, outside its wall_s.
        loop_s = callback.stats.wall_s if callback.stats is not None and callback.stats.wall_s else None
        if loop_s is not None:
            self.lightning_fixed_s = max(0.0, time.perf_counter() - t0 - loop_s - callback.stats.startup_s)
            self.setup_s += self.lightning_fixed_s
        self._stats = dict(self.batcher.stats) if self.batcher is not None else None
        self.batcher = None  # closed by the loop; dropped so that the next run's engine can reuse its memory
        return _results_output(_flatten(predictions))

    def info(self):
        return {"overrides": self.overrides, "loader_batch_size": self.batch_size,
                "lightning_setup_teardown_s": round(getattr(self, "lightning_fixed_s", 0.0), 3)}

    def stats(self):
        return self._stats


# Since session 16 ``ours_async`` replays prefill and mixed steps from graphs and launches decode attention longest
# context first (both defaults now). The variants that turned either on (``ours_async_prefill_graphs``,
# ``_longest_first`` and their combinations with the other levers, sessions 14-15) are gone, being ``ours_async`` or
# another variant now; ``_no_prefill_graphs``, ``_no_longest_first`` and ``_previous_defaults`` show what each gives.
VARIANTS: dict[str, type[Variant]] = {
    "static": StaticGenerate,
    "hf_cb": HfContinuousBatchingSync,
    "hf_cb_async": HfContinuousBatchingAsync,
    "ours_sync": OursSync,
    "ours_sync_nograph": OursSyncNoGraph,
    "ours_async": OursAsync,
    "ours_async_nograph": OursAsyncNoGraph,
    "ours_async_compile": OursAsyncCompile,
    "ours_async_eager": OursAsyncEager,
    "ours_async_prefill_eager": OursAsyncPrefillEager,
    "ours_async_gc": OursAsyncGc,
    "ours_async_unfused": OursAsyncUnfused,
    "ours_async_prefill_compiled": OursAsyncPrefillCompiled,
    "ours_async_prefill_threshold": OursAsyncPrefillThreshold,
    "ours_async_greedy": OursAsyncGreedy,
    "ours_async_no_prefix_cache": OursAsyncNoPrefixCache,
    "ours_async_no_window": OursAsyncNoWindow,
    "ours_async_window8": OursAsyncWindow8,
    "ours_async_block64": OursAsyncBlock64,
    "ours_async_block32": OursAsyncBlock32,
    "ours_async_device_order": OursAsyncDeviceOrder,
    "ours_async_layer_pairs": OursAsyncLayerPairs,
    "ours_async_layer_groups5": OursAsyncLayerGroups5,
    "ours_async_layer_groups15": OursAsyncLayerGroups15,
    "ours_async_tokens64k": OursAsyncTokens64k,
    "ours_async_tokens8k": OursAsyncTokens8k,
    "ours_async_decode_all_heads": OursAsyncDecodeAllHeads,
    "ours_async_decode_heads2": OursAsyncDecodeHeads2,
    "ours_async_triton_argmax": OursAsyncTritonArgmax,
    "ours_async_two_pass_mass": OursAsyncTwoPassMass,
    "ours_async_graph_slots": OursAsyncGraphSlots,
    "ours_async_decode_unpaired": OursAsyncDecodeUnpaired,
    "ours_async_admit_each": OursAsyncAdmitEach,
    "ours_async_admit_auto": OursAsyncAdmitAuto,
    "ours_async_admit_16": OursAsyncAdmit16,
    "ours_async_admit_128": OursAsyncAdmit128,
    "ours_async_coordinate_descent": OursAsyncCoordinateDescent,
    "ours_async_pdl": OursAsyncPdl,
    "ours_async_max_autotune": OursAsyncMaxAutotune,
    "ours_async_no_fused_write": OursAsyncNoFusedWrite,
    "ours_async_decode_2warps": OursAsyncDecode2Warps,
    "ours_async_decode_2warps_capped": OursAsyncDecode2WarpsCapped,
    "ours_async_decode_4warps": OursAsyncDecode4Warps,
    "ours_async_no_combo_kernels": OursAsyncNoComboKernels,
    "ours_async_token_major": OursAsyncTokenMajor,
    "ours_async_no_prefill_own_compile": OursAsyncNoPrefillOwnCompile,
    "ours_async_session17_defaults": OursAsyncSession17Defaults,
    "ours_async_whole_model": OursAsyncWholeModel,
    "ours_async_aggressive_fusion": OursAsyncAggressiveFusion,
    "ours_async_cublaslt": OursAsyncCublasLt,
    "ours_async_no_prefill_graphs": OursAsyncNoPrefillGraphs,
    "ours_async_no_longest_first": OursAsyncNoLongestFirst,
    "ours_async_previous_defaults": OursAsyncPreviousDefaults,
    "ours_async_size_oblivious": OursAsyncSizeOblivious,
    "ours_async_no_decode_tune": OursAsyncNoDecodeTune,
    "ours_async_split_decode": OursAsyncSplitDecode,
    "ours_async_split_decode_256": OursAsyncSplitDecode256,
    "ours_async_lightning": OursLightning,
}
