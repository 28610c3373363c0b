"""Greedy outputs equal `model.generate` token for token, with chunked prefill, preemption and both modes at once."""

import pytest
import torch

from async_batching import ContinuousBatcher, SamplingParams
from async_batching.models import TINY_CONFIGS, tiny_model
from engine_helpers import mixed_prompts, reference

NEW_TOKENS = 12
_refs: dict = {}


def _model_and_refs(arch):
    if arch not in _refs:
        model = tiny_model(arch)
        prompts = mixed_prompts(9, seed=sorted(TINY_CONFIGS).index(arch))
        _refs[arch] = (model, prompts, [reference(model, p, NEW_TOKENS) for p in prompts])
    return _refs[arch]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_greedy_matches_generate_under_chunking_and_preemption(arch, mode):
    model, prompts, refs = _model_and_refs(arch)
    # 9 prompts > 4 seqs; 48-token budget forces chunked prefill; 40 blocks of 8 cannot hold 4 long requests.
    b = ContinuousBatcher(model, mode=mode, max_num_seqs=4, max_batch_tokens=48, block_size=8, num_blocks=40)
    results = b.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert [r.index for r in results] == list(range(len(prompts)))
    for i, (r, ref) in enumerate(zip(results, refs)):
        assert r.token_ids == ref, f"{arch} {mode} request {i} (prompt {len(prompts[i])} tokens)"
        assert r.finish_reason == "length" and r.prompt_len == len(prompts[i])
    stats = b.stats
    assert stats["preemptions"] > 0, "the cache was meant to force preemption"
    assert stats["steps"] > len(prompts)
    assert b.all_blocks_free()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_head_major_kv_cache_gives_generates_tokens_under_chunking_preemption_and_prefix_hits(arch, monkeypatch):
    """``kv_cache.KV_LAYOUT = "head"``: every block stored head-major and handed out as a strided view. Greedy tokens
    equal ``generate``'s with chunked prefill and preemption, and again with the prompts' prefixes served from the
    cache; the caches really are head-major views."""
    import async_batching.kv_cache as kv_cache

    monkeypatch.setattr(kv_cache, "KV_LAYOUT", "head")
    model, prompts, refs = _model_and_refs(arch)
    b = ContinuousBatcher(model, mode="async", max_num_seqs=4, max_batch_tokens=48, block_size=8, num_blocks=40)
    cache = next(iter(b.runner.cache.k.values()))
    assert not cache.is_contiguous() and cache.stride(1) == cache.shape[-1]  # slots of one head adjacent
    sp = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert [r.token_ids for r in b.generate(prompts, sp)] == refs
    assert b.stats["preemptions"] > 0
    again = b.generate(prompts[:3], sp)
    assert [r.token_ids for r in again] == refs[:3] and b.stats["cached_tokens"] > 0
    b.close()


def _eager_prefill_graphs(monkeypatch) -> list:
    """Prefill graphs on the CPU, where nothing is captured: each bucket's "graph" is the eager forward of the padded
    step (``PREFILL_GRAPH_ROUND`` and ``PREFILL_GRAPH_MIN_TOKENS`` of 8, so small budgets get several buckets). Checks
    each padded step's layout; returns the list of (bucket, real tokens) of the steps that ran padded."""
    from async_batching import model_runner as mr

    monkeypatch.setattr(mr, "PREFILL_GRAPH_ROUND", 8)
    monkeypatch.setattr(mr, "PREFILL_GRAPH_MIN_TOKENS", 8)
    padded = []
    real_start, real_forward = mr.ModelRunner.start, mr.ModelRunner.forward

    def start(self):
        real_start(self)
        self._flat_block_q = 4
        for tb, bb, slots in sorted(self._prefill_graph_sizes()):
            self.prefill_graphs[tb] = mr.PrefillGraph(None, None, None, 0, bb, slots)

    def forward(self, buf, lay):
        if not lay.prefill_graph:
            return real_forward(self, buf, lay)
        seg = lambda name: self._seg(buf, lay, name).cpu().numpy()  # noqa: E731
        real = int(seg("query_start_loc")[-1])
        padded.append((lay.prefill_graph, real))
        assert lay.num_tokens == lay.prefill_graph == len(seg("input_ids"))
        assert (seg("token_rows")[real:] == mr.SCRATCH_ROW).all()
        blocks = -(-(seg("query_start_loc")[1:] - seg("query_start_loc")[:-1]) // 4)
        assert (seg("qb_seq") >= 0).sum() == blocks.sum()  # every query block of every sequence has its slot
        with self.installed():
            return self._forward(buf, lay)[: lay.num_samples]

    monkeypatch.setattr(mr.ModelRunner, "start", start)
    monkeypatch.setattr(mr.ModelRunner, "forward", forward)
    return padded


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_prefill_steps_padded_to_graph_buckets_give_generates_tokens(arch, monkeypatch):
    """``model_runner.PREFILL_GRAPHS`` pads a prefill or mixed step to its token bucket: padding tokens on the scratch
    row, empty sequences, kept rows beyond the sampled ones, and the flat attention launch's table. The CPU captures no
    graph, so here each bucket's "graph" is the eager forward of the padded step (the capture itself runs on the GPU:
    test_gpu.py). Greedy tokens equal ``generate``'s through chunked prefill, preemption and mixed steps, and steps of
    several buckets did run padded."""
    padded = _eager_prefill_graphs(monkeypatch)
    model, prompts, refs = _model_and_refs(arch)
    b = ContinuousBatcher(model, mode="async", max_num_seqs=4, max_batch_tokens=48, block_size=8, num_blocks=40)
    assert sorted(b.runner.prefill_graphs) == [8, 16, 24, 32, 48]
    results = b.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert [r.token_ids for r in results] == refs
    assert b.stats["preemptions"] > 0
    assert len({tb for tb, _ in padded}) >= 2 and 48 in {tb for tb, _ in padded}, padded
    assert any(real < tb for tb, real in padded)  # padding tokens were there
    assert all(tb < 2 * real + 1 for tb, real in padded)  # at most twice the step's tokens
    b.close()


def test_padded_prefill_steps_keep_samples_logprobs_penalties_and_prefix_hits_as_unpadded_ones(monkeypatch):
    """The sampling paths through padded prefill steps: n=3 samples of each prompt (seeded, temperature, top-p,
    repetition penalty), logprobs with 2 alternatives, and prompts sharing a prefix (served from the cache on the second
    call). The same engine settings without the padding give the same tokens, and logprobs equal to 1e-5."""
    from async_batching.models import tiny_model as tm

    model = tm("llama")
    base = mixed_prompts(1, lo=40, hi=41, seed=3)[0]
    prompts = [base + p for p in mixed_prompts(6, lo=2, hi=30, seed=4)]
    sp = SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9, repetition_penalty=1.2, n=3, seed=5,
                        logprobs=2, ignore_eos=True)
    kw = dict(mode="async", max_num_seqs=8, max_batch_tokens=64, block_size=8, num_blocks=120)

    def run():
        b = ContinuousBatcher(model, **kw)
        out = [b.generate(prompts, sp), b.generate(prompts, sp)]
        hits = b.stats["cached_tokens"]
        b.close()
        return out, hits

    plain, plain_hits = run()
    padded = _eager_prefill_graphs(monkeypatch)
    graphs, hits = run()
    assert padded and hits == plain_hits > 0
    for call_p, call_g in zip(plain, graphs):
        for rp, rg in zip(call_p, call_g):
            assert [s.token_ids for s in rp.samples] == [s.token_ids for s in rg.samples]
            for sp_, sg in zip(rp.samples, rg.samples):
                assert sg.logprobs == pytest.approx(sp_.logprobs, abs=1e-5)


def test_a_step_is_padded_to_a_bucket_only_within_twice_its_tokens_and_the_padding_work_limit(monkeypatch):
    """``_prefill_bucket``: the smallest bucket that holds the step's tokens and sequences, unless padding would more
    than double its tokens or exceed ``PREFILL_GRAPH_MAX_PAD_WORK`` tokens x parameters (a large model's partial step
    then runs outside the graphs)."""
    from async_batching import model_runner as mr

    b = ContinuousBatcher(tiny_model("llama"), max_num_seqs=4, max_batch_tokens=48)
    r = b.runner
    r._flat_block_q = 4
    r.prefill_graphs = {tb: mr.PrefillGraph(None, None, None, 0, min(4, tb), r._prefill_slots(tb))
                        for tb in (16, 32, 48)}
    assert r._prefill_bucket(30, 4) == (32, 4, r._prefill_slots(32))
    assert r._prefill_bucket(17, 2)[0] == 32 and r._prefill_bucket(16, 2)[0] == 16
    assert r._prefill_bucket(7, 1) is None  # 16 tokens would more than double 7
    assert r._prefill_bucket(49, 1) is None  # past the largest bucket
    monkeypatch.setattr(mr, "PREFILL_GRAPH_MAX_PAD_WORK", 2 * r._params)
    assert r._prefill_bucket(30, 4)[0] == 32 and r._prefill_bucket(29, 4) is None  # 3 padding tokens: too much work
    b.close()


def test_prefill_graph_buckets_shrink_by_powers_of_the_square_root_of_two_down_to_the_minimum():
    from async_batching import model_runner as mr

    assert mr.prefill_graph_buckets(65536, 512, 2048) == [65536, 46336, 32768, 23040, 16384, 11520, 8192, 5632, 4096,
                                                          2816, 2048, 1280, 1024, 512]
    assert mr.prefill_graph_buckets(16384, 512, 4096) == [16384, 11520, 8192, 5632, 4096, 2816, 2048, 1280, 1024, 512]
    assert mr.prefill_graph_buckets(2048, 512, 4096) == [2048, 1280, 1024, 512]
    assert mr.prefill_graph_buckets(4096, 4, 1024) == [4096, 2816, 2048, 1280, 1024, 512]  # 4 sequences fill 4,096
    assert mr.prefill_graph_buckets(65536, 4, 1024) == [4096, 2816, 2048, 1280, 1024, 512]


def test_an_unknown_kv_layout_is_refused_by_name(monkeypatch):
    import async_batching.kv_cache as kv_cache

    monkeypatch.setattr(kv_cache, "KV_LAYOUT", "blocked")
    with pytest.raises(ValueError, match="KV_LAYOUT='blocked': expected one of"):
        ContinuousBatcher(tiny_model("llama"), max_num_seqs=2, num_blocks=8)


def _admissions(monkeypatch) -> list[tuple[int, int, bool, int]]:
    """Each plan that admitted requests: (requests admitted, waiting before, whether the plan was decode-only
    before, requests running before), recorded around Scheduler._admit."""
    from async_batching.scheduler import Scheduler

    seen: list[tuple[int, int, bool, int]] = []
    real = Scheduler._admit

    def recording(self, plan, budget):
        running, waiting, decode_only = len(self.running), len(self.waiting), plan.is_decode_only
        real(self, plan, budget)
        if len(self.running) > running:
            seen.append((len(self.running) - running, waiting, decode_only, running))

    monkeypatch.setattr(Scheduler, "_admit", recording)
    return seen


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_admission_in_batches_admits_at_least_the_threshold_and_keeps_generates_tokens(mode, monkeypatch):
    """``admit_threshold=4`` with 8 sequence slots and 24 requests of 2-14 new tokens (they finish at different
    steps): once requests run, a decode-only plan admits only when 4 requests (or all that wait) fit, so it admits at
    least one, and a plan that already prefills may admit any; fewer steps admit than with ``admit_threshold=1``;
    greedy tokens equal generate's in both."""
    model = tiny_model("llama")
    prompts = mixed_prompts(24, lo=3, hi=40, seed=4)
    budgets = [2 + (7 * i) % 13 for i in range(len(prompts))]
    refs = [reference(model, p, n) for p, n in zip(prompts, budgets)]
    sampling = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in budgets]
    steps_admitting = {}
    for threshold in (1, 4):
        seen = _admissions(monkeypatch)
        b = ContinuousBatcher(model, mode=mode, max_num_seqs=8, max_batch_tokens=64, admit_threshold=threshold)
        assert b.scheduler.admit_threshold == threshold
        assert [r.token_ids for r in b.generate(prompts, sampling)] == refs
        assert sum(n for n, *_ in seen) == len(prompts) and b.all_blocks_free()
        if threshold == 4:
            assert b.stats["deferred_admissions"] > 0
            # from a decode-only plan with requests running: 4 (or all waiting) had free slots; the token budget
            # (64) may take fewer of them into this step, and the following steps, prefilling, admit the rest
            assert all(8 - running >= min(4, waiting) for _, waiting, decode_only, running in seen
                       if decode_only and running), seen
        steps_admitting[threshold] = len(seen)
        b.close()
        monkeypatch.undo()
    assert steps_admitting[4] < steps_admitting[1], steps_admitting


def test_admission_is_due_when_the_threshold_fits_by_slots_and_blocks_or_an_eighth_of_the_cache_is_free():
    """The rule itself, on a scheduler over 65 blocks of 8 slots (64 usable), 8 sequence slots, threshold 3:
    nothing running -> due; 3 waiting prompts of 30 tokens (4 blocks each) need 3 free slots and 12 free blocks, or
    8 free blocks (an eighth of the cache); fewer waiting than the threshold -> all of them must fit."""
    from collections import deque

    from async_batching.kv_cache import LayerSpec, PagedKVCache
    from async_batching.request import Request
    from async_batching.scheduler import Scheduler

    cache = PagedKVCache({0: LayerSpec(1, 4, 4)}, num_blocks=65, block_size=8, dtype=torch.float32, device="cpu")
    s = Scheduler(cache, 64, 8, "decode_first", True, 8, False, admit_threshold=3)
    req = lambda n: Request(uid=n, index=n, prompt_ids=[5] * 30, sampling=SamplingParams(), eos_ids=frozenset(),  # noqa: E731
                            seed=n)
    s.waiting = deque(req(i) for i in range(5))
    assert s._admission_due()  # nothing running
    s.running = [req(10 + i) for i in range(6)]  # 2 free slots < 3
    assert not s._admission_due()
    s.running = s.running[:5]  # 3 free slots
    held = cache.allocator.allocate(57)  # 7 free blocks: under 12 and under an eighth (8)
    assert not s._admission_due()
    cache.allocator.free(held[:1])  # 8 free: an eighth of the cache
    assert s._admission_due()
    s.waiting = deque([req(20)])  # one waiting: it alone must fit (4 blocks <= 8 free, 3 slots)
    assert s._admission_due()
    s.admit_threshold = 1
    s.running = [req(10 + i) for i in range(7)]
    assert s._admission_due()  # threshold 1: admission as before


def test_admit_threshold_defaults_to_one_and_to_an_eighth_of_the_slots_with_graphs_only_when_batching_is_on(monkeypatch):
    from async_batching import scheduler
    from async_batching.config import BatcherConfig
    from async_batching.scheduler import admit_threshold

    cfg = BatcherConfig(max_num_seqs=256)
    assert admit_threshold(cfg, graphs=True) == 1 and admit_threshold(cfg, graphs=False) == 1  # until measured
    monkeypatch.setattr(scheduler, "ADMIT_IN_BATCHES_WITH_GRAPHS", True)
    assert admit_threshold(cfg, graphs=True) == 32 and admit_threshold(cfg, graphs=False) == 1
    assert admit_threshold(BatcherConfig(max_num_seqs=5), graphs=True) == 1
    assert admit_threshold(BatcherConfig(max_num_seqs=256, admit_threshold=3), graphs=True) == 3
    assert ContinuousBatcher(tiny_model("llama"), max_num_seqs=64).scheduler.admit_threshold == 1  # CPU: no graphs


@pytest.mark.parametrize("policy", ["prefill_first", "shortest_first"])
def test_other_scheduler_policies_are_exact(policy):
    model, prompts, refs = _model_and_refs("llama")
    b = ContinuousBatcher(model, scheduler=policy, max_num_seqs=3, max_batch_tokens=40, block_size=8, num_blocks=60)
    results = b.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert [r.token_ids for r in results] == refs
    assert b.all_blocks_free()


def test_without_chunked_prefill_whole_prompts_are_scheduled():
    model, prompts, refs = _model_and_refs("qwen2")
    b = ContinuousBatcher(model, chunked_prefill=False, max_num_seqs=4, max_batch_tokens=256, block_size=16)
    results = b.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert [r.token_ids for r in results] == refs


def test_bf16_on_cpu_runs_and_mostly_agrees():
    model = tiny_model("llama", dtype=torch.bfloat16)
    prompts = mixed_prompts(4, hi=50)
    b = ContinuousBatcher(model, max_num_seqs=4, max_batch_tokens=64)
    results = b.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert all(len(r.token_ids) == 6 for r in results)
    first = [reference(model, p, 1)[0] for p in prompts]
    assert sum(r.token_ids[0] == f for r, f in zip(results, first)) >= 3
