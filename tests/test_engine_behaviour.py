"""Stop conditions, seeded sampling, logprobs, streaming, incremental submission and cancellation."""

import functools

import pytest
import torch

from async_batching import ContinuousBatcher, SamplingParams
from async_batching.attention import STEP_KWARG
from async_batching.models import tiny_model
from engine_helpers import mixed_prompts, reference, word_tokenizer


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def prompts():
    return mixed_prompts(6, hi=80, seed=3)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_stop_token_ends_request_at_that_token(model, prompts, mode):
    ref = reference(model, prompts[0], 20)
    stop = ref[5]
    cut = ref.index(stop) + 1
    b = ContinuousBatcher(model, mode=mode)
    r = b.generate([prompts[0]], SamplingParams(max_new_tokens=20, stop_token_ids=[stop]))[0]
    assert r.token_ids == ref[:cut] and r.finish_reason == "stop"
    # The same through the model's EOS, which generate() honours too.
    eos_ref = reference(model, prompts[0], 20, eos=stop)
    model.generation_config.eos_token_id = stop
    try:
        r2 = ContinuousBatcher(model, mode=mode).generate([prompts[0]], SamplingParams(max_new_tokens=20))[0]
        ign = ContinuousBatcher(model, mode=mode).generate([prompts[0]], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    finally:
        model.generation_config.eos_token_id = 2
    assert r2.token_ids == eos_ref == ref[:cut] and r2.finish_reason == "stop"
    assert ign.token_ids == ref and ign.finish_reason == "length"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_stop_string_cuts_text_and_tokens(model, prompts, mode):
    tok = word_tokenizer()
    ref = reference(model, prompts[1], 16)
    target = ref[6]
    word = f"w{target}"
    b = ContinuousBatcher(model, tokenizer=tok, mode=mode)
    r = b.generate([prompts[1]], SamplingParams(max_new_tokens=16, stop=[word], ignore_eos=True))[0]
    first = next(i for i, t in enumerate(ref) if word in tok.decode(ref[: i + 1]))
    assert r.token_ids == ref[: first + 1]
    assert r.finish_reason == "stop" and word not in r.text
    assert r.text == tok.decode(ref[: first + 1]).split(word)[0]
    full = b.generate([prompts[1]], SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    assert full.text == tok.decode(ref) and full.token_ids == ref


def test_max_new_tokens_is_respected_per_request(model, prompts):
    lens = [1, 3, 7, 2, 9, 4]
    b = ContinuousBatcher(model, max_num_seqs=3)
    res = b.generate(prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lens])
    assert [len(r.token_ids) for r in res] == lens
    assert all(r.finish_reason == "length" for r in res)


def _sampled(model, prompts, mode, order, seed=100, **kw):
    b = ContinuousBatcher(model, mode=mode, **kw)
    sp = [SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=seed + i, ignore_eos=True)
          for i in range(len(prompts))]
    res = b.generate([prompts[i] for i in order], [sp[i] for i in order])
    assert b.all_blocks_free()
    return {i: r.token_ids for i, r in zip(order, res)}


def test_seeded_sampling_is_reproducible_across_runs_modes_and_batches(model, prompts):
    n = len(prompts)
    base = _sampled(model, prompts, "sync", list(range(n)))
    assert _sampled(model, prompts, "sync", list(range(n))) == base
    assert _sampled(model, prompts, "async", list(reversed(range(n))), max_num_seqs=2) == base
    assert _sampled(model, prompts, "async", [3], max_batch_tokens=16)[3] == base[3]
    # Preemption and recompute do not change what a seeded request draws.
    assert _sampled(model, prompts, "async", list(range(n)), num_blocks=14, block_size=8) == base
    # The seed is not ignored: other seeds draw other tokens for every prompt; and sampling is not greedy.
    other = _sampled(model, prompts, "async", list(range(n)), seed=200)
    assert all(other[i] != base[i] for i in range(n))
    assert all(base[i] != reference(model, prompts[i], 10) for i in range(n))


def test_top_k_one_is_greedy(model, prompts):
    res = ContinuousBatcher(model).generate(prompts[:3], SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1, ignore_eos=True))
    assert [r.token_ids for r in res] == [reference(model, p, 8) for p in prompts[:3]]


@torch.no_grad()
def test_logprobs_match_the_models_distribution(model, prompts):
    p = prompts[2]
    r = ContinuousBatcher(model, mode="async").generate([p], SamplingParams(max_new_tokens=5, logprobs=3, ignore_eos=True))[0]
    out = model.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    for step, logits in enumerate(out.logits):
        logp = torch.log_softmax(logits[0].float(), -1)
        tok = r.token_ids[step]
        assert abs(r.logprobs[step] - logp[tok].item()) < 1e-4
        top = torch.topk(logp, 3)
        assert list(r.top_logprobs[step]) == top.indices.tolist()
        assert all(abs(r.top_logprobs[step][i] - v) < 1e-4 for i, v in zip(top.indices.tolist(), top.values.tolist()))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_stream_and_incremental_submission(model, prompts, mode):
    refs = [reference(model, p, 6) for p in prompts]
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
    b = ContinuousBatcher(model, mode=mode, max_num_seqs=2)
    streamed = {r.index: r.token_ids for r in b.stream(prompts, sp)}
    assert streamed == dict(enumerate(refs))
    # add_request while the engine runs: requests join a running batch.
    got = {}
    ids = [b.add_request(prompts[0], sp), b.add_request(prompts[1], sp)]
    for _ in range(3):
        got.update({r.index: r.token_ids for r in b.step()})
    ids += [b.add_request(p, sp) for p in prompts[2:]]
    while b.has_unfinished():
        got.update({r.index: r.token_ids for r in b.step()})
    assert [got[i] for i in ids] == refs
    assert b.all_blocks_free() and b.num_unfinished == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_cancel_frees_blocks_and_leaves_others_untouched(model, prompts, mode):
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    b = ContinuousBatcher(model, mode=mode)
    ids = [b.add_request(p, sp) for p in prompts[:4]]
    results = {}
    for _ in range(4):
        results.update({r.index: r for r in b.step()})
    b.cancel(ids[1])
    while b.has_unfinished():
        results.update({r.index: r for r in b.step()})
    assert results[ids[1]].finish_reason == "cancelled" and len(results[ids[1]].token_ids) < 12
    for i in (0, 2, 3):
        assert results[ids[i]].token_ids == reference(model, prompts[i], 12)
    assert b.all_blocks_free()


def test_compile_that_fails_logs_one_line_and_the_engine_runs_uncompiled(model, monkeypatch, caplog):
    """A model torch.compile cannot compile: the engine is still built, says why in one warning, and its greedy
    tokens equal generate's (decode steps uncompiled)."""
    import async_batching.model_runner as mr

    def uncompilable(fn, **_):
        def call(*a, **kw):
            raise RuntimeError("inductor: unsupported operator in this model")
        return call

    monkeypatch.setattr(mr.torch, "compile", uncompilable)
    prompts = mixed_prompts(3, lo=5, hi=40, seed=8)
    with caplog.at_level("WARNING", logger=mr.__name__):
        b = ContinuousBatcher(model, compile=True)
    assert b.runner._compiled is None
    assert [r.message for r in caplog.records] == [
        "LlamaForCausalLM: compile off, decode steps run uncompiled: RuntimeError: inductor: unsupported operator in "
        "this model (at tests/test_engine_behaviour.py:"
        f"{uncompilable.__code__.co_firstlineno + 2} in call)"]
    out = b.generate(prompts, SamplingParams(max_new_tokens=8))
    assert [r.token_ids for r in out] == [reference(model, p, 8) for p in prompts]


def test_prefill_that_fails_to_compile_logs_one_line_and_decode_stays_compiled(model, monkeypatch, caplog):
    """torch.compile cannot compile the prefill shape (here: the compiled layers raise whenever the step has a query
    longer than one token): the engine says so in one warning, prefill steps run uncompiled, decode steps still run
    compiled, and the greedy tokens equal generate's."""
    import async_batching.attention as attn
    import async_batching.model_runner as mr

    real_compile = torch.compile

    def decode_only(fn, **kw):
        compiled = real_compile(fn, **kw)

        def call(*a, **k):
            if attn._active.ctx.meta.max_query_len > 1:
                raise RuntimeError("inductor: unsupported shape")
            return compiled(*a, **k)
        return call

    monkeypatch.setattr(mr, "PREFILL_COMPILE_MIN_WORK", 1.0)
    monkeypatch.setattr(mr.torch, "compile", decode_only)
    with caplog.at_level("WARNING", logger=mr.__name__):
        b = ContinuousBatcher(model, compile=True)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("LlamaForCausalLM: prefill steps run uncompiled: RuntimeError: "
                                                   "inductor: unsupported shape"), lines
    assert b.runner._compiled is not None and not b.runner._compiled_prefill
    calls = _count_compiled_calls(b, monkeypatch)
    prompts = mixed_prompts(3, lo=5, hi=40, seed=8)
    out = b.generate(prompts, SamplingParams(max_new_tokens=6))
    assert [r.token_ids for r in out] == [reference(model, p, 6) for p in prompts]
    assert calls["prefill"] == 0 and calls["decode"] > 0 and calls["eager"] > 0, calls


def _run_with_a_layer_changed_after_start_up(model, caplog):
    """A compiled engine, then layer 0 switched to training mode (a flag the compiled code's guards check; it changes
    no output here: the attention dropout is 0), then a run of 4 prompts: asserts the tokens equal generate's;
    returns the engine, the prompts and the warnings logged."""
    import async_batching.model_runner as mr

    prompts = mixed_prompts(4, lo=5, hi=40, seed=12)
    want = [reference(model, p, 6) for p in prompts]
    b = ContinuousBatcher(model, compile=True)
    model.model.layers[0].train()
    try:
        with caplog.at_level("WARNING", logger=mr.__name__):
            out = b.generate(prompts, SamplingParams(max_new_tokens=6))
    finally:
        model.model.layers[0].eval()
    assert [r.token_ids for r in out] == want
    return b, prompts, [r.getMessage() for r in caplog.records]


def test_a_decode_step_that_would_compile_mid_run_runs_uncompiled_with_one_warning(model, caplog, monkeypatch):
    """A module's state changed after start-up fails the compiled code's guards: instead of compiling in the middle of the run,
    the engine drops its compiled code, logs why once, and its tokens still equal generate's. (Prefill steps run
    uncompiled here, below a work threshold: the next test has both kinds.)"""
    import async_batching.model_runner as mr

    monkeypatch.setattr(mr, "PREFILL_COMPILE_MIN_WORK", 4e12)
    b, _, lines = _run_with_a_layer_changed_after_start_up(model, caplog)
    assert len(lines) == 1 and lines[0].startswith("LlamaForCausalLM: a decode step of 4 sequences would compile "
                                                   "again during the run; decode steps run uncompiled from now on"), lines
    assert b.runner._compiled is None


def _count_compiled_calls(b, monkeypatch) -> dict:
    """Counts of the runner's forward calls through the compiled model, by step kind."""
    calls = {"prefill": 0, "decode": 0, "eager": 0}
    runner, logits = b.runner, b.runner._logits

    def spy(call, ids, pos, keep, kw):
        kind = ("eager" if call not in (runner._compiled, runner._compiled_pf)
                else "decode" if kw[STEP_KWARG].meta.max_query_len == 1 else "prefill")
        calls[kind] += 1
        return logits(call, ids, pos, keep, kw)

    monkeypatch.setattr(runner, "_logits", spy)
    return calls


def test_a_prefill_step_that_would_compile_mid_run_runs_uncompiled_with_one_warning(model, monkeypatch, caplog):
    """Compiled prefill steps meet a guard they no longer pass (a layer switched to training mode after start-up): the
    first prefill step drops compiled prefill with one warning, the first decode step drops the rest with another, and
    the tokens still equal generate's."""
    import async_batching.model_runner as mr

    monkeypatch.setattr(mr, "PREFILL_COMPILE_MIN_WORK", 1.0)
    b, prompts, lines = _run_with_a_layer_changed_after_start_up(model, caplog)
    assert len(lines) == 2, lines
    prompt_tokens = sum(len(p) for p in prompts)  # all four prompts fit the first step
    assert lines[0].startswith(f"LlamaForCausalLM: a prefill step of {prompt_tokens} tokens would compile again during "
                               "the run; prefill steps run uncompiled from now on"), lines
    assert lines[1].startswith("LlamaForCausalLM: a decode step of 4 sequences would compile again during the run; "
                               "decode steps run uncompiled from now on"), lines
    assert b.runner._compiled_prefill is False and b.runner._compiled is None


def test_compiled_forward_matches_generate_with_chunking_and_preemption(model, monkeypatch):
    """``compile=True`` (decode and prefill steps through torch.compile, attention one opaque op; prefill steps of any
    size here): greedy tokens equal generate's, in both modes, with prompts split over steps (steps keeping 0, 1 and
    many logits rows) and a cache small enough to preempt; nothing compiles mid-run."""
    import async_batching.model_runner as mr
    from torch._dynamo.utils import counters

    monkeypatch.setattr(mr, "PREFILL_COMPILE_MIN_WORK", 1.0)
    prompts = mixed_prompts(10, lo=1, hi=90, seed=7)
    want = [reference(model, p, 12, eos=2) for p in prompts]
    for mode in ("sync", "async"):
        b = ContinuousBatcher(model, mode=mode, compile=True, max_batch_tokens=48, num_blocks=24, block_size=8)
        assert b.runner.prefill_compile_min_tokens == 1
        compiled = counters["stats"]["unique_graphs"]
        assert compiled > 0  # built and warmed up: the compiled code exists before any request
        calls = _count_compiled_calls(b, monkeypatch)
        out = b.generate(prompts, SamplingParams(max_new_tokens=12))
        assert [r.token_ids for r in out] == want
        assert b.stats["preemptions"] > 0 and b.all_blocks_free()
        assert counters["stats"]["unique_graphs"] == compiled, "a shape compiled during the run, not at start-up"
        assert calls["prefill"] > 0 and calls["decode"] > 0 and calls["eager"] == 0, calls


def test_prefill_steps_below_a_work_threshold_call_the_model_uncompiled_and_are_not_compiled(model, monkeypatch):
    """With a work threshold (sessions 5-10's, 4e12; the default is 0 since the compiled layers cost the host less
    than uncompiled ones): a tiny model's prefill steps are far below it, so they run uncompiled while decode steps
    run compiled, and start-up spends nothing on compiling them."""
    import async_batching.model_runner as mr

    assert mr.PREFILL_COMPILE_MIN_WORK == 0.0
    assert ContinuousBatcher(model, compile=True, max_batch_tokens=48).runner.prefill_compile_min_tokens == 1
    monkeypatch.setattr(mr, "PREFILL_COMPILE_MIN_WORK", 4e12)
    warmed = []
    monkeypatch.setattr(mr.ModelRunner, "_compile_prefill", lambda self: warmed.append(self))
    b = ContinuousBatcher(model, compile=True, max_batch_tokens=48)
    assert b.runner.prefill_compile_min_tokens > 48
    assert warmed == []  # no step can reach the threshold: start-up compiles no prefill shape either
    calls = _count_compiled_calls(b, monkeypatch)
    prompts = mixed_prompts(4, lo=20, hi=60, seed=3)
    out = b.generate(prompts, SamplingParams(max_new_tokens=4))
    assert [r.token_ids for r in out] == [reference(model, p, 4, eos=2) for p in prompts]
    assert calls["decode"] > 0 and calls["prefill"] == 0 and calls["eager"] > 0, calls


def test_engine_freezes_the_garbage_collector_after_start_up_and_its_close_gives_it_back(model):
    """Start-up's objects leave the collector's walks while an engine lives (gc_freeze); the last engine to close, or
    to be dropped, unfreezes them, and a dropped engine is freed by reference counting alone (nothing stays frozen)."""
    import gc
    import weakref

    from async_batching import gc_freeze

    before = gc_freeze.live_engines()
    b = ContinuousBatcher(model)
    assert gc_freeze.live_engines() == before + 1 and gc.get_freeze_count() > 0
    assert b.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3))[0].token_ids == reference(model, [5, 6, 7], 3, eos=2)
    b.close()
    b.close()  # twice: counted once
    assert gc_freeze.live_engines() == before
    if before == 0:
        assert gc.get_freeze_count() == 0
    dropped = ContinuousBatcher(model)
    gone = weakref.ref(dropped)
    gc.disable()
    try:
        del dropped
        assert gone() is None and gc_freeze.live_engines() == before
    finally:
        gc.enable()


def test_an_engine_dropped_inside_a_reference_cycle_stays_frozen_until_collect_all_frees_it(model):
    """An engine kept only by a reference cycle (here: itself), frozen when a later engine started, survives a plain
    gc.collect(); gc_freeze.collect_all, which a new engine calls before sizing its cache from free memory, frees it
    and leaves the live engine frozen and working."""
    import gc
    import weakref

    from async_batching import gc_freeze

    dropped = ContinuousBatcher(model, num_blocks=32)
    dropped.cycle = dropped  # e.g. an exception kept with the traceback of one of its frames
    gone, runner = weakref.ref(dropped), weakref.ref(dropped.runner)
    live = ContinuousBatcher(model, num_blocks=32)  # freezes everything, the dropped engine's cycle included
    del dropped
    gc.collect()
    assert gone() is not None and runner() is not None, "a frozen cycle is not collected by gc.collect()"
    assert gc_freeze.collect_all() > 0
    assert gone() is None and runner() is None
    assert gc.get_freeze_count() > 0  # the live engine's objects are frozen again
    assert live.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3))[0].token_ids == reference(model, [5, 6, 7], 3, eos=2)
    live.close()


def test_graph_capture_runs_with_no_collection_after_a_full_one(model):
    """gc_freeze.no_collection (around the CUDA graph captures): on entry a full collection frees an engine dropped in
    a frozen reference cycle; inside, automatic collection is off (a cycle made there survives a burst of
    allocations that would trigger one); on exit it is on again."""
    import gc
    import weakref

    from async_batching import gc_freeze

    class Cycle:
        pass

    dropped = ContinuousBatcher(model, num_blocks=32)
    dropped.cycle = dropped
    gone = weakref.ref(dropped)
    live = ContinuousBatcher(model, num_blocks=32)  # freezes the dropped engine's cycle
    del dropped
    assert gc.isenabled()
    with gc_freeze.no_collection():
        assert gone() is None and not gc.isenabled()
        c = Cycle()
        c.me = c
        made = weakref.ref(c)
        del c
        junk = [[i] for i in range(200_000)]  # far past the young generation's threshold
        del junk
        assert made() is not None
    assert gc.isenabled()
    gc.collect()
    assert made() is None
    live.close()


def test_default_token_budget_grows_for_small_models_on_cuda_only(model):
    """max_batch_tokens=None: 16,384, doubled on CUDA until a step holds AUTO_BATCH_WORK tokens x parameters, at
    most 65,536 (W1's 135M model: 65,536; W7's 596M: 16,384); generation steps are then capped at 16,384 where
    prefill graphs replay them (``graph_step_tokens``), never for a budget the user set, nor without chunked prefill,
    and ``ModelRunner.start`` drops that cap where it captured no prefill graph. The engine reports the value it
    chose."""
    import async_batching.model_runner as mr
    from torch import nn

    def params(n):  # a module of n parameters, on the meta device: nothing allocated
        return nn.Linear(n // 1000, 1000, bias=False, device="meta")

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert mr.auto_max_batch_tokens(params(134_500_000), cuda) == 65536
    assert mr.auto_max_batch_tokens(params(300_000_000), cuda) == 32768
    assert mr.auto_max_batch_tokens(params(596_000_000), cuda) == 16384
    assert mr.auto_max_batch_tokens(params(8_000_000_000), cuda) == 16384
    assert mr.auto_max_batch_tokens(params(1000), cuda) == 65536
    assert mr.auto_max_batch_tokens(params(1000), cpu) == 16384
    assert mr.graph_step_tokens(True, 65536, True, True) == 16384
    assert mr.graph_step_tokens(True, 16384, True, True) is None  # nothing to cap
    assert mr.graph_step_tokens(False, 65536, True, True) is None  # the user's budget
    assert mr.graph_step_tokens(True, 65536, False, True) is None  # steps launched from the host
    assert mr.graph_step_tokens(True, 65536, True, False) is None  # a prompt must fit one step
    b = ContinuousBatcher(model)
    assert b.config.max_batch_tokens == b.scheduler.max_batch_tokens == 16384  # CPU
    assert ContinuousBatcher(model, max_batch_tokens=96).scheduler.max_batch_tokens == 96
    # a cap the engine set before start-up is dropped where no prefill graph was captured (the CPU captures none)
    b.runner.graph_step_tokens = 24
    b.runner.start()
    assert not b.runner.prefill_graphs and b.runner.graph_step_tokens is None


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_generation_steps_keep_to_the_graph_cap_and_scoring_steps_take_the_whole_budget(model, mode):
    """``Scheduler.graph_step_tokens`` (the auto budget's cap where prefill graphs replay generation steps): while only
    generation requests are queued every step holds at most the cap, and the tokens equal an uncapped engine's;
    while a scoring request waits or runs, steps may take the whole budget (scored steps are launched from the host)
    and the scores equal an uncapped engine's; the cap is back once the scoring requests are done. Running out of
    memory halves both."""
    prompts = mixed_prompts(6, lo=20, hi=60, seed=7)
    pairs = [(p[:-8], p[-8:]) for p in mixed_prompts(6, lo=40, hi=60, seed=8)]
    want = ContinuousBatcher(model, mode=mode, max_batch_tokens=96)
    want_tokens = [r.token_ids for r in want.generate(prompts, SamplingParams(max_new_tokens=4))]
    want_scores = [r.logprob for r in want.score(pairs)]
    b = ContinuousBatcher(model, mode=mode, max_batch_tokens=96)
    assert b.scheduler.graph_step_tokens is None  # a budget the user set: no cap
    b.scheduler.graph_step_tokens = 24
    sizes = []
    real = b.scheduler.schedule

    def recorded():
        plan = real()
        sizes.append((plan.num_tokens, b.scheduler._scoring))
        return plan

    b.scheduler.schedule = recorded
    got = [r.token_ids for r in b.generate(prompts, SamplingParams(max_new_tokens=4))]
    assert got == want_tokens
    assert sizes and max(n for n, _ in sizes) <= 24 and all(k == 0 for _, k in sizes)
    sizes.clear()
    scores = [r.logprob for r in b.score(pairs)]
    assert scores == pytest.approx(want_scores, abs=1e-5)
    assert max(n for n, k in sizes if k) > 24  # the whole budget while scoring
    assert b.scheduler._scoring == 0 and b.scheduler.step_tokens() == 24
    assert b.scheduler.roll_back(type("Plan", (), {"registered": [], "seqs": []})()) == (24, 12)
    assert (b.scheduler.max_batch_tokens, b.scheduler.graph_step_tokens) == (48, 12)


def test_compiled_layers_are_one_graph_each_shared_by_every_layer_and_only_inside_the_engine(monkeypatch):
    """``compile=True`` compiles the decoder layers one at a time (compiled_layers.py) with attention as one opaque
    op: no graph break anywhere, and six layers share their compiled code (with the final norm and the rotary
    embedding, compiled too: the graphs counted are those three for the shapes torch specialises, decode of 1 and 2
    sequences and every larger step), so depth does not add compiles and the run compiles nothing. Outside the
    engine's forwards the model runs its own code; the tokens equal generate's."""
    import async_batching.model_runner as mr
    from torch._dynamo.utils import counters

    deep = tiny_model("llama", num_hidden_layers=6)
    monkeypatch.setattr(mr, "PREFILL_COMPILE_MIN_WORK", 1.0)
    counters.clear()
    b = ContinuousBatcher(deep, compile=True, max_batch_tokens=48)
    assert len(b.runner._compiled.blocks) == 6
    assert b.runner._compiled.once == [deep.model.norm, deep.model.rotary_emb]
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 3 * 3, dict(counters["stats"])  # layer, norm, rotary: each for 1, 2 and more tokens
    prompts = mixed_prompts(4, lo=5, hi=40, seed=5)
    out = b.generate(prompts, SamplingParams(max_new_tokens=5))
    assert [r.token_ids for r in out] == [reference(deep, p, 5) for p in prompts]
    assert counters["stats"]["unique_graphs"] == graphs and dict(counters["graph_break"]) == {}
    assert all(m._compiled_call_impl is None for m in [*deep.model.layers, deep.model.norm, deep.model.rotary_emb])


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_layers_compiled_in_groups_give_generates_tokens_with_one_graph_for_every_group(arch, monkeypatch):
    """``compiled_layers.LAYER_GROUP=2``: consecutive layers compile as one graph a pair (the last layer of an odd
    count alone), every pair running the same graph: seven layers compile no more graphs than five. Greedy tokens equal
    generate's with chunked prompts and preemption (gemma2: the layers' own masks, sliding and global, reach each
    layer of a pair), decode and prefill steps ran compiled, and nothing compiled mid-run."""
    import async_batching.compiled_layers as cl
    import async_batching.model_runner as mr
    from torch._dynamo.utils import counters

    monkeypatch.setattr(cl, "LAYER_GROUP", 2)
    monkeypatch.setattr(mr, "PREFILL_COMPILE_MIN_WORK", 1.0)
    graphs = {}
    for layers in (5, 7):
        torch._dynamo.reset()
        counters.clear()
        m = tiny_model(arch, num_hidden_layers=layers)
        b = ContinuousBatcher(m, compile=True, max_batch_tokens=48, num_blocks=24, block_size=8, max_num_seqs=6)
        assert b.runner._compiled.group == 2 and len(b.runner._compiled.blocks) == layers
        graphs[layers] = _compiled_run_gives_generates_tokens(m, b, monkeypatch)
    assert graphs[7] == graphs[5], graphs
    torch._dynamo.reset()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_the_whole_model_compiled_as_one_graph_gives_generates_tokens(arch, monkeypatch):
    """``compiled_layers.REGIONAL`` off: the whole model compiles as one graph (every layer unrolled in it, attention
    the opaque op), not one layer at a time; greedy tokens equal generate's with chunked prompts and preemption,
    decode and prefill steps ran compiled, and nothing compiled mid-run."""
    import async_batching.compiled_layers as cl
    import async_batching.model_runner as mr

    monkeypatch.setattr(cl, "REGIONAL", False)
    monkeypatch.setattr(mr, "PREFILL_COMPILE_MIN_WORK", 1.0)
    torch._dynamo.reset()
    m = tiny_model(arch, num_hidden_layers=3)
    b = ContinuousBatcher(m, compile=True, max_batch_tokens=48, num_blocks=24, block_size=8, max_num_seqs=6)
    assert b.runner._compiled._whole is not None and not b.runner._compiled.blocks
    _compiled_run_gives_generates_tokens(m, b, monkeypatch)
    torch._dynamo.reset()


def _compiled_run_gives_generates_tokens(m, b, monkeypatch) -> int:
    """A run of chunked prompts with preemption on the compiled engine ``b``: greedy tokens equal generate's, decode and
    prefill steps ran compiled, nothing compiled mid-run and no compiled step fell back. Closes ``b``; returns the
    graphs dynamo had compiled."""
    from torch._dynamo.utils import counters

    compiled = counters["stats"]["unique_graphs"]
    calls = _count_compiled_calls(b, monkeypatch)
    prompts = mixed_prompts(10, lo=1, hi=90, seed=7)
    out = b.generate(prompts, SamplingParams(max_new_tokens=12))
    assert [r.token_ids for r in out] == [reference(m, p, 12, eos=2) for p in prompts]
    assert b.stats["preemptions"] > 0 and calls["eager"] == 0 and calls["decode"] > 0 and calls["prefill"] > 0
    assert counters["stats"]["unique_graphs"] == compiled, "compiled during the run"
    assert b.runner._compiled is not None and b.runner._compiled_prefill
    b.close()
    return compiled


def test_size_oblivious_tracing_compiles_one_graph_per_module_that_serves_every_size(monkeypatch):
    """``compiled_layers.SIZE_OBLIVIOUS``: the decoder layer, the final norm and the rotary embedding compile once each
    (no graph specialised to one row or token; by default each compiles twice), and that one graph runs decode steps
    of one row and more and prefill steps of one token and more: greedy tokens equal generate's with chunked prompts,
    1-token prompts and a cache small enough to preempt, nothing compiles mid-run and no compiled kind is dropped."""
    import async_batching.compiled_layers as cl
    import async_batching.model_runner as mr
    from torch._dynamo.utils import counters

    if not hasattr(torch.fx.experimental._config, "backed_size_oblivious"):
        pytest.skip(f"torch {torch.__version__} has no backed_size_oblivious")
    monkeypatch.setattr(mr, "PREFILL_COMPILE_MIN_WORK", 1.0)
    monkeypatch.setattr(mr, "PREFILL_OWN_COMPILE", False)  # one compiled code for both kinds: counted below
    m = tiny_model("llama", num_hidden_layers=3)
    graphs = {}
    for oblivious in (False, True):
        monkeypatch.setattr(cl, "SIZE_OBLIVIOUS", oblivious)
        torch._dynamo.reset()
        counters.clear()
        b = ContinuousBatcher(m, compile=True, max_batch_tokens=48, num_blocks=24, block_size=8, max_num_seqs=6)
        graphs[oblivious] = counters["stats"]["unique_graphs"]
        calls = _count_compiled_calls(b, monkeypatch)
        sizes, counted = set(), b.runner._logits

        def sized(call, ids, pos, keep, kw):
            sizes.add(ids.shape[1])
            return counted(call, ids, pos, keep, kw)

        monkeypatch.setattr(b.runner, "_logits", sized)
        prompts = mixed_prompts(10, lo=1, hi=90, seed=7)
        out = b.generate(prompts, SamplingParams(max_new_tokens=12))
        assert [r.token_ids for r in out] == [reference(m, p, 12, eos=2) for p in prompts], oblivious
        for alone in ([5], [7, 8, 9]):  # a one-token prefill step, then decode steps of one row
            got = b.generate([alone], SamplingParams(max_new_tokens=4, ignore_eos=True))[0].token_ids
            assert got == reference(m, alone, 4), (oblivious, alone)
        assert 1 in sizes and max(sizes) > 6, sizes  # one-token and one-row steps ran compiled, as did large ones
        assert b.stats["preemptions"] > 0 and calls["eager"] == 0 and calls["decode"] > 0 and calls["prefill"] > 0
        assert counters["stats"]["unique_graphs"] == graphs[oblivious], "compiled during the run"
        assert b.runner._compiled is not None and b.runner._compiled_prefill
        b.close()
    torch._dynamo.reset()
    assert graphs == {False: 6, True: 3}, graphs  # layer, norm, rotary: twice each by default, once size-obliviously


def _generate_checking_metadata(b, model, monkeypatch, check, prompts, new_tokens):
    """Greedy ``generate`` through engine ``b`` with ``check(buf, lay, meta)`` run on every forward's attention
    metadata as the runner makes it; the tokens must equal ``generate``'s."""
    real = b.runner._metadata

    def checked(buf, lay, *a, **k):
        meta = real(buf, lay, *a, **k)
        check(buf, lay, meta)
        return meta

    monkeypatch.setattr(b.runner, "_metadata", checked)
    out = b.generate(prompts, SamplingParams(max_new_tokens=new_tokens))
    assert [r.token_ids for r in out] == [reference(model, p, new_tokens, eos=2) for p in prompts]


@pytest.mark.parametrize("window", [1, 3], ids=["one-forward-a-step", "decode-windows"])
def test_decode_steps_carry_a_longest_first_order_and_the_register_cap_into_attention(model, monkeypatch, window):
    """``attention.DECODE_LONGEST_FIRST``, ``DECODE_MAXNREG``, ``DECODE_WARPS`` with ``DECODE_WARPS_MAXNREG``,
    ``DECODE_HEADS_PER_PROGRAM`` and ``DECODE_PAIRS``, read when the engine is built: each decode forward's attention metadata holds its
    sequences longest context first (a permutation, context lengths non-increasing along it; staged by the host once a
    step, so in decode windows it must still hold for the window's later forwards, whose context lengths the device
    advanced), the caps, the warps and the kv-head groups; prefill steps hold none of them. (The CPU's torch path
    ignores them, so the tokens still equal generate's; the Triton kernel follows them:
    tests/test_triton_attention.py.)"""
    import async_batching.attention as attention

    monkeypatch.setattr(attention, "DECODE_LONGEST_FIRST", True)
    monkeypatch.setattr(attention, "DECODE_MAXNREG", 96)
    b = ContinuousBatcher(model, max_batch_tokens=64, num_blocks=60, max_num_seqs=8, decode_window=window)
    assert not b.runner.longest_first and b.runner.decode_maxnreg == b.runner.decode_warps == 0  # CPU: torch path
    assert b.runner.decode_heads == b.runner.decode_warps_maxnreg == 0 and not b.runner.decode_pairs
    b.runner.longest_first, b.runner.decode_maxnreg, b.runner.decode_warps = True, 96, 2  # as the Triton backend reads
    b.runner.decode_warps_maxnreg, b.runner.decode_heads, b.runner.decode_pairs = 80, 3, True
    monkeypatch.setattr(attention, "DECODE_LONGEST_FIRST", False)  # read once: changing it now changes nothing
    seen = {"decode": 0, "prefill": 0, "windowed": 0}

    def check(buf, lay, meta):
        if lay.max_query_len == 1:
            lens, order = meta.seq_lens.tolist(), meta.order.tolist()
            assert sorted(order) == list(range(len(lens))) and meta.maxnreg == 96 and meta.decode_warps == 2
            assert meta.decode_warps_maxnreg == 80 and meta.heads_per_program == 3 and meta.pairs
            assert all(lens[i] >= lens[j] for i, j in zip(order, order[1:])), (lens, order)
            assert "order" in lay.offsets  # staged by prepare, not sorted on the device
            seen["decode"] += 1
            seen["windowed"] += lay.window > 1
        else:
            assert meta.order is None and meta.maxnreg == meta.decode_warps == meta.heads_per_program == 0
            assert meta.decode_warps_maxnreg == 0 and not meta.pairs
            seen["prefill"] += 1

    _generate_checking_metadata(b, model, monkeypatch, check, mixed_prompts(8, lo=3, hi=50, seed=4), 6)
    assert seen["decode"] > 0 and seen["prefill"] > 0 and (seen["windowed"] > 0) == (window > 1), seen


def test_decode_steps_staged_without_slots_make_them_only_where_needed_and_equal_generate(model, monkeypatch):
    """``attention.DECODE_SLOTS_IN_KERNEL``, read when the engine is built (with the Triton kernel's fused write): a
    decode forward's attention metadata comes without a slot mapping (the fused write reads each row's slot from its
    block-table row), and ``slots()`` makes the mapping the eager path made: each token's block in its row's table at
    its position, times the block size, plus the offset. The CPU's torch path writes the cache with ``slots()``, so
    greedy tokens, in decode windows too, still equal ``generate``'s; prefill steps keep their eager mapping."""
    b = ContinuousBatcher(model, max_batch_tokens=64, num_blocks=60, max_num_seqs=8, decode_window=3)
    assert b.runner.slots_in_kernel is False  # CPU: the torch path has no fused write
    b.runner.slots_in_kernel = True  # as the Triton backend reads it
    seen = {"lazy": 0, "eager": 0}

    def check(buf, lay, meta):
        if lay.max_query_len == 1:
            assert meta.slot_mapping is None and meta.slot_fn is not None
            seg = lambda n: b.runner._seg(buf, lay, n).long()  # noqa: E731
            pos, rows = seg("positions"), seg("token_rows")
            want = b.runner.block_table[rows, pos // b.runner.block_size].long() * b.runner.block_size + pos % b.runner.block_size
            assert torch.equal(meta.slots(), want) and meta.slots() is meta.slot_mapping  # made once
            meta.slot_mapping = None  # as staged: the forward makes it where it needs it
            seen["lazy"] += 1
        else:
            assert meta.slot_mapping is not None and meta.slot_mapping.dtype == torch.int64
            seen["eager"] += 1

    _generate_checking_metadata(b, model, monkeypatch, check, mixed_prompts(6, lo=3, hi=40, seed=5), 8)
    assert seen["lazy"] > 0 and seen["eager"] > 0, seen


def test_a_decode_graphs_forward_keeps_every_row_without_a_gather(model, monkeypatch):
    """``model_runner.GRAPH_KEEP_ALL``: a decode graph's forward (``lay.graph_batch`` set, its kept rows staged as
    0..batch-1) asks the model for every row's logits (``logits_to_keep=0``) instead of gathering the kept rows: the
    same logits, bit for bit, as the gather of every row, and the model saw an int, not an index tensor."""
    import async_batching.model_runner as model_runner

    b = ContinuousBatcher(model, max_batch_tokens=64, num_blocks=60, max_num_seqs=8)
    runner = b.runner
    keeps = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: keeps.append(k.get("logits_to_keep")) or real_forward(*a, **k))
    logits = {}
    for keep_all in (False, True):
        monkeypatch.setattr(model_runner, "GRAPH_KEEP_ALL", keep_all)
        lay, buf = runner._scratch_step(5, 1)
        lay.graph_batch = 5
        with torch.no_grad(), runner.installed():
            logits[keep_all] = runner._forward(buf, lay)
    assert torch.is_tensor(keeps[0]) and keeps[0].tolist() == list(range(5))
    assert keeps[-1] == 0
    assert logits[True].shape == (5, model.config.vocab_size)
    assert torch.equal(logits[True], logits[False])
    b.close()


def test_draws_written_into_the_token_buffer_give_the_tokens_of_copied_draws(model, monkeypatch):
    """``sampling.TRITON_ARGMAX``, read when the engine is built: its executor has ``sample`` write each forward's
    tokens into the step's token buffer (``out=``; on CUDA greedy steps take Triton's argmax) instead of copying them
    there. Greedy and seeded sampled requests, in decode windows, give the same tokens either way, greedy ones
    ``generate``'s."""
    import async_batching.sampling as sampling

    prompts = mixed_prompts(6, lo=3, hi=40, seed=9)
    params = [SamplingParams(max_new_tokens=7) if i % 2 else SamplingParams(max_new_tokens=7, temperature=0.8,
                                                                            top_k=20, seed=i) for i in range(6)]
    runs = {}
    for into in (False, True):
        monkeypatch.setattr(sampling, "TRITON_ARGMAX", into)
        b = ContinuousBatcher(model, max_batch_tokens=64, num_blocks=60, max_num_seqs=8, decode_window=3)
        monkeypatch.setattr(sampling, "TRITON_ARGMAX", not into)  # read once: changing it now changes nothing
        assert b.executor.draw_into is into
        runs[into] = [r.token_ids for r in b.generate(prompts, params)]
        b.close()
    assert runs[True] == runs[False]
    assert [runs[True][i] for i in (1, 3, 5)] == [reference(model, prompts[i], 7, eos=2) for i in (1, 3, 5)]


def _record_traces(monkeypatch) -> list[tuple[str, set]]:
    """torch.compile replaced by one whose backend records each graph it is given: (which compile: "prefill" for
    CompiledLayers' own frame, else "decode"; the token counts T of the graph's [1, T, ...] example inputs, i.e. the
    shapes the graph is first traced on, from which inductor sizes its kernels), then runs it eagerly."""
    import async_batching.compiled_layers as cl

    traced: list[tuple[str, set]] = []
    real_compile = torch.compile

    def recording_compile(fn, **kwargs):
        kind = "prefill" if isinstance(fn, functools.partial) and fn.func is cl._own_frame else "decode"

        def backend(gm, example_inputs):
            tokens = {t.shape[1] for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 3
                      and t.shape[0] == 1}
            traced.append((kind, tokens))
            return gm.forward

        return real_compile(fn, **{k: v for k, v in kwargs.items() if k != "options"}, backend=backend)

    monkeypatch.setattr(torch, "compile", recording_compile)
    torch._dynamo.reset()  # and again at the end of the test: the recording graphs stay out of later tests' caches
    return traced


def _seen_tokens(traced) -> dict:
    return {kind: set().union(*(t for k, t in traced if k == kind)) for kind in ("decode", "prefill")}


def _run_compiled_without_new_graphs(b, m, traced) -> None:
    """A run of prompts of mixed lengths: tokens equal generate's, no graph compiled, no compiled kind dropped."""
    compiled_at_start = len(traced)
    prompts = mixed_prompts(6, lo=5, hi=80, seed=8)
    out = b.generate(prompts, SamplingParams(max_new_tokens=5))
    assert [r.token_ids for r in out] == [reference(m, p, 5) for p in prompts]
    assert len(traced) == compiled_at_start, traced[compiled_at_start:]
    assert b.runner._compiled is not None and b.runner._compiled_prefill
    b.close()
    torch._dynamo.reset()


def test_prefill_steps_compiled_in_graphs_of_their_own_are_first_traced_on_a_full_budget_step(monkeypatch):
    """PREFILL_OWN_COMPILE: prefill steps call layers compiled through a frame of their own, so their graphs are not
    the decode steps' ones; the first prefill graph sees a step of the whole token budget (inductor sizes its kernels'
    launches from the first shapes), the decode graphs a few rows. Nothing compiles during the run, no compiled
    kind is dropped, and the tokens equal generate's."""
    import async_batching.model_runner as mr

    traced = _record_traces(monkeypatch)
    monkeypatch.setattr(mr, "PREFILL_OWN_COMPILE", True)
    monkeypatch.setattr(mr, "DECODE_TUNE_ROWS", 0)  # the decode graphs first traced on 1-3 rows, as asserted below
    m = tiny_model("llama", num_hidden_layers=3)
    b = ContinuousBatcher(m, compile=True, max_batch_tokens=96, max_num_seqs=4)
    assert b.runner._compiled_pf is not None and b.runner._compiled_pf is not b.runner._compiled
    seen = _seen_tokens(traced)
    budget_step = 3 * 96  # the warm-up's prefill step: q_len = min(128, budget) = 96, max(3, budget // q_len) sequences
    assert seen["prefill"] == {budget_step} and max(seen["decode"]) <= 3, traced
    _run_compiled_without_new_graphs(b, m, traced)


def test_prefill_graphs_of_their_own_are_compiled_by_inductor_not_loaded_from_the_decode_graphs_cache_entry(
        monkeypatch, tmp_path):
    """PREFILL_OWN_COMPILE with inductor (an empty cache directory): a decoder layer's graph is the same for decode
    and prefill steps, and inductor's FX-graph cache does not key on the size hints of the first trace, so a cached
    prefill compile would run the decode graph's code. No prefill compile is served from the decode graph's entry
    (without a key of its own the layer graph was: one hit), and the tokens equal generate's. A second engine
    (dynamo reset, same cache) loads both kinds from the cache: the prefill code under its own key (where torch has
    ``cache_key_tag``; without it, prefill compiles with the cache off, at every start-up)."""
    import async_batching.model_runner as mr
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(mr, "PREFILL_OWN_COMPILE", True)
    hits = {}
    for name in ("_compile_decode", "_compile_prefill"):
        def counted(self, _real=getattr(mr.ModelRunner, name), _name=name):
            before = counters["inductor"]["fxgraph_cache_hit"]
            _real(self)
            hits[_name] = counters["inductor"]["fxgraph_cache_hit"] - before
        monkeypatch.setattr(mr.ModelRunner, name, counted)
    m = tiny_model("llama", num_hidden_layers=2)
    tagged = hasattr(torch.compiler.config, "cache_key_tag")
    try:
        for start in ("first", "second"):
            torch._dynamo.reset()
            b = ContinuousBatcher(m, compile=True, max_batch_tokens=96, max_num_seqs=12)
            assert b.runner._compiled_pf is not None and b.runner._compiled_prefill
            if start == "first":
                assert hits == {"_compile_decode": 0, "_compile_prefill": 0}
            else:
                assert hits["_compile_decode"] > 0 and (hits["_compile_prefill"] > 0) == tagged, hits
            assert torch.compiler.config.cache_key_tag == "" if tagged else True  # the tag was for prefill alone
            prompts = mixed_prompts(4, lo=5, hi=60, seed=5)
            out = b.generate(prompts, SamplingParams(max_new_tokens=4))
            assert [r.token_ids for r in out] == [reference(m, p, 4) for p in prompts]
            b.close()
    finally:
        torch._dynamo.reset()


def test_decode_steps_compiled_with_tune_rows_are_first_traced_on_that_many_rows(monkeypatch):
    """DECODE_TUNE_ROWS: the decode steps' dynamic-shape graph is first traced on that many rows (capped by
    max_num_seqs), so its kernels are sized for large decode batches; one-row steps keep their own graph. Nothing
    compiles during the run and the tokens equal generate's."""
    import async_batching.model_runner as mr

    traced = _record_traces(monkeypatch)
    monkeypatch.setattr(mr, "DECODE_TUNE_ROWS", 256)
    m = tiny_model("llama", num_hidden_layers=3)
    b = ContinuousBatcher(m, compile=True, max_batch_tokens=96, max_num_seqs=12)
    order = list(dict.fromkeys(n for k, tokens in traced if k == "decode" for n in sorted(tokens)))
    assert order[:2] == [1, 12], traced  # one row (its own graph), then the dynamic graph traced on 12
    _run_compiled_without_new_graphs(b, m, traced)


def test_a_hook_added_to_a_second_model_of_a_compiled_architecture_runs_in_every_compiled_step(monkeypatch):
    """Dynamo's graphs are shared by every model of an architecture in the process; a forward pre-hook registered on
    a second model, after the first one's engine compiled its layers, still runs in each step of the second engine
    (the compiled layers guard on hooks), and the tokens equal generate's."""
    real_compile = torch.compile  # one backend for both engines: dynamo reuses graphs only across the same backend
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(
        fn, **{k: v for k, v in kw.items() if k != "options"}, backend="eager"))
    torch._dynamo.reset()
    kw = dict(compile=True, max_batch_tokens=64, max_num_seqs=4)
    prompts = mixed_prompts(4, lo=5, hi=40, seed=3)
    sp = SamplingParams(max_new_tokens=4)
    first = ContinuousBatcher(tiny_model("llama", num_hidden_layers=3), **kw)
    first.generate(prompts, sp)
    first.close()
    m = tiny_model("llama", num_hidden_layers=3)
    calls = []
    hook = m.model.layers[1].mlp.register_forward_pre_hook(lambda module, args: calls.append(None))
    b = ContinuousBatcher(m, **kw)
    calls.clear()
    out = b.generate(prompts, sp)
    assert b.runner._compiled is not None and len(calls) == b.stats["steps"] > 0, (len(calls), b.stats["steps"])
    assert [r.token_ids for r in out] == [reference(m, p, 4) for p in prompts]
    hook.remove()
    b.close()
    torch._dynamo.reset()


def test_decode_steps_run_as_two_row_halves_give_the_whole_steps_logits_and_generates_tokens(model, monkeypatch):
    """``_forward_split`` (DECODE_SPLIT_MIN_ROWS; on a GPU the halves are two branches of a decode graph): each decode
    step of two or more rows runs as two forwards over its row halves, whose concatenated logits equal the whole
    step's, and the tokens equal generate's."""
    import async_batching.model_runner as mr

    monkeypatch.setattr(mr, "DECODE_SPLIT_MIN_ROWS", 2)
    b = ContinuousBatcher(model, max_num_seqs=5, max_batch_tokens=64)
    runner, whole = b.runner, b.runner._forward
    split_sizes = []

    def forward(buf, lay, lo=0, hi=None, counters=None):
        half = runner._split_rows(lay.num_seqs) if lay.max_query_len == 1 and (lo, hi) == (0, None) else 0
        if not half:
            return whole(buf, lay, lo, hi, counters)
        out = runner._forward_split(buf, lay, half)
        torch.testing.assert_close(out, whole(buf, lay))
        split_sizes.append(lay.num_seqs)
        return out

    monkeypatch.setattr(runner, "_forward", forward)
    prompts = mixed_prompts(5, lo=3, hi=30, seed=4)
    out = b.generate(prompts, SamplingParams(max_new_tokens=6))
    assert [r.token_ids for r in out] == [reference(model, p, 6) for p in prompts]
    assert set(split_sizes) >= {5}, split_sizes  # all five sequences decoding together
    b.close()


def test_no_step_context_stays_active_after_a_forward(model):
    """The compiled attention op's context (``attention.activate``) is set for each forward and cleared after it, so a
    closed engine's step state is not kept alive by the thread that ran it."""
    import async_batching.attention as attn

    b = ContinuousBatcher(model, compile=True)
    assert getattr(attn._active, "ctx", None) is None  # start-up's warm-up forwards left nothing behind
    b.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3))
    assert getattr(attn._active, "ctx", None) is None
    b.close()
