"""Sampling: independent streams per request, draws that follow the model's own (processed) distribution, repetition
penalty equal to transformers'."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from async_batching import ContinuousBatcher, SamplingParams
from async_batching.models import tiny_model
from async_batching.sampling import SamplingState, sample, sampling_inputs, stage_sampling, stream_seed
from engine_helpers import mixed_prompts

P_MIN = 1e-6  # a correct sampler fails a goodness-of-fit check with this probability
PROMPT = [5, 6, 7, 8]
HISTORY = [5, 6, 7, 8, 11, 17, 42, 5]  # tokens a penalised row has seen (prompt and generated)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def sharp_model():
    """The tiny llama with its final norm scaled by 8: logits spread like a trained model's (std ~1.3 instead of 0.16),
    so a wrong temperature or cut-off changes the distribution enough to be detected."""
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.norm.weight.mul_(8)
    return m


@pytest.fixture(scope="module")
def last_logits(sharp_model):
    """The model's next-token logits after PROMPT (a plain forward): the oracle's input."""
    with torch.no_grad():
        return sharp_model(torch.tensor([PROMPT])).logits[0, -1].float()


def processed_probs(logits: torch.Tensor, sp: SamplingParams, history=PROMPT) -> torch.Tensor:
    """transformers' own processors and warpers, in generate's order, applied to one row: the distribution to match.

    One difference by design: transformers' top-p splits tokens of equal logits at the cut in the order its sort left
    them; ours keeps them together (as its top-k and min-p do), so tokens equal to the last one kept are kept."""
    ids = torch.tensor([history])
    scores = logits.float()[None].clone()
    if sp.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(sp.repetition_penalty)(ids, scores)
    scores = TemperatureLogitsWarper(sp.temperature)(ids, scores)
    if sp.top_k:
        scores = TopKLogitsWarper(sp.top_k)(ids, scores)
    if sp.top_p < 1.0:
        cut = TopPLogitsWarper(sp.top_p)(ids, scores)
        scores = torch.where(scores >= cut[cut > -torch.inf].min(), scores, -torch.inf)
    if sp.min_p:
        scores = MinPLogitsWarper(sp.min_p)(ids, scores)
    return torch.softmax(scores[0].double(), -1)


def chi_square_p_value(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's goodness of fit of drawn tokens against ``probs``; bins with expected counts below 5 are merged
    (smallest first). Survival function of chi-square through the regularised upper incomplete gamma."""
    n = len(tokens)
    observed = torch.bincount(tokens.long(), minlength=len(probs)).double()
    expected = probs.double() * n
    keep = expected > 0
    order = torch.argsort(expected[keep])
    exp_sorted, obs_sorted = expected[keep][order], observed[keep][order]
    bins_e, bins_o, acc_e, acc_o = [], [], 0.0, 0.0
    for e, o in zip(exp_sorted.tolist(), obs_sorted.tolist()):
        acc_e, acc_o = acc_e + e, acc_o + o
        if acc_e >= 5:
            bins_e.append(acc_e)
            bins_o.append(acc_o)
            acc_e = acc_o = 0.0
    if acc_e and bins_e:  # the remainder joins the last bin
        bins_e[-1] += acc_e
        bins_o[-1] += acc_o
    e, o = torch.tensor(bins_e), torch.tensor(bins_o)
    dof = len(bins_e) - 1
    if dof < 1:
        return 1.0
    stat = ((o - e) ** 2 / e).sum()
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2.0))


def staged_step(logits: torch.Tensor, params: list[SamplingParams], history=PROMPT, seeds=None):
    """One step whose rows are requests with these params (distinct unseeded streams, first token), staged on the
    logits' device: ``(logits [n, V], plan, seg)``. ``logits`` is one row (repeated) or one per request."""
    n = len(params)
    seeds = [stream_seed(0, i) for i in range(n)] if seeds is None else seeds
    rows = [types.SimpleNamespace(sampling=sp, seed=seeds[i], num_generated=0, row=i + 1, uid=i,
                                  num_preemptions=0, prompt_ids=list(history), output_ids=[], num_known=len(history))
            for i, sp in enumerate(params)]
    plan, arrays = stage_sampling(rows, SamplingState(n + 2, logits.shape[-1]))
    segs = {name: torch.from_numpy(a).to(logits.device) for name, a in arrays}
    segs["input_ids"] = torch.full((n,), history[-1], dtype=torch.int32, device=logits.device)
    segs["logits_idx"] = torch.arange(n, dtype=torch.int32, device=logits.device)
    batch = logits.expand(n, -1).contiguous() if logits.dim() == 1 else logits
    return batch, plan, segs.__getitem__


def direct_draws(logits: torch.Tensor, params: list[SamplingParams], history=PROMPT, seeds=None) -> torch.Tensor:
    """``sample`` on one staged step (see ``staged_step``)."""
    batch, plan, seg = staged_step(logits, params, history, seeds)
    return sample(batch, sampling_inputs(plan, seg))


SWEEP = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=40),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=0.8, top_k=100, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.6, top_k=80, top_p=0.9, min_p=0.1),
    SamplingParams(temperature=0.9, repetition_penalty=1.8),
    SamplingParams(temperature=1.2, top_k=50, repetition_penalty=0.6),
]


def test_draws_follow_the_models_processed_distribution_in_a_mixed_step(last_logits):
    """One step whose rows interleave greedy rows and eight sampling configurations: each configuration's draws fit
    transformers' processed distribution, never leave its support, and greedy rows are the argmax."""
    per_config = 3000
    configs = SWEEP + [SamplingParams(temperature=0.0)]
    params = [configs[i % len(configs)] for i in range(per_config * len(configs))]
    tokens = direct_draws(last_logits, params, HISTORY)
    for c, sp in enumerate(configs):
        got = tokens[c::len(configs)]
        if sp.temperature == 0:
            assert (got == int(last_logits.argmax())).all()
            continue
        probs = processed_probs(last_logits, sp, HISTORY)
        assert (probs[got.long()] > 0).all(), f"{sp}: a token outside the top-k set / nucleus / min-p set was drawn"
        assert chi_square_p_value(got, probs) > P_MIN, sp


def test_top_k_keeps_every_token_tied_with_the_kth_value(last_logits):
    """bfloat16 logits tie often; transformers keeps all tokens equal to the k-th value, and so do the draws."""
    coarse = last_logits.to(torch.bfloat16)  # coarse enough that values repeat
    values = coarse.float()
    crossing = [k for k in range(8, 100) if int((values >= values.topk(k).values[-1]).sum()) > k]
    assert len(crossing) >= 2  # the case is real: ties cross the k-th place
    for sp in (SamplingParams(temperature=1.0, top_k=crossing[0]),
               SamplingParams(temperature=0.7, top_k=crossing[1], top_p=0.8)):
        probs = processed_probs(values, sp)
        assert int((probs > 0).sum()) > sp.top_k or sp.top_p < 1
        got = direct_draws(coarse, [sp] * 20000)
        assert (probs[got.long()] > 0).all()
        assert chi_square_p_value(got, probs) > P_MIN, sp


def test_draws_fit_across_vocabulary_chunks():
    """A vocabulary of several inverse-CDF chunks plus a partial one (2600 = 2 x 1024 + 552): random bf16 logits."""
    logits = (torch.randn(2600, generator=torch.Generator().manual_seed(3)) * 2).to(torch.bfloat16)
    for sp in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=700),
               SamplingParams(temperature=1.2, top_p=0.5, min_p=0.02)):
        probs = processed_probs(logits.float(), sp)
        got = direct_draws(logits, [sp] * 8000)
        assert (probs[got.long()] > 0).all()
        assert chi_square_p_value(got, probs) > P_MIN, sp


def test_goodness_of_fit_check_rejects_a_wrong_temperature(last_logits):
    """The check has power: draws at temperature 0.7 fail against the distribution at 1.0 (a sampler ignoring its
    temperature), and draws with top-p 0.8 fail against top-p 0.8 applied without top-k's renormalisation."""
    got = direct_draws(last_logits, [SamplingParams(temperature=0.7, top_k=100)] * 3000)
    assert chi_square_p_value(got, processed_probs(last_logits, SamplingParams(temperature=1.0, top_k=100))) < P_MIN
    got = direct_draws(last_logits, [SamplingParams(temperature=1.0, top_k=40, top_p=0.8)] * 3000)
    unnormalised = processed_probs(last_logits, SamplingParams(temperature=1.0, top_p=0.8))
    unnormalised = torch.where(processed_probs(last_logits, SamplingParams(temperature=1.0, top_k=40)) > 0, unnormalised, 0)
    assert chi_square_p_value(got, unnormalised / unnormalised.sum()) < P_MIN


def test_engine_first_tokens_follow_the_models_distribution(sharp_model):
    """Thousands of unseeded requests of one prompt through the engine, two configurations mixed in each step: their
    first tokens fit the model's distribution. (A one-token prompt keeps the CPU reference attention fast.)"""
    prompt, n = [7], 1500
    with torch.no_grad():
        logits = sharp_model(torch.tensor([prompt])).logits[0, -1].float()
    configs = [SamplingParams(temperature=0.8, top_k=60, top_p=0.9, max_new_tokens=1),
               SamplingParams(temperature=1.0, min_p=0.1, max_new_tokens=1)]
    out = ContinuousBatcher(sharp_model).generate([prompt] * (n * len(configs)), configs * n)
    tokens = torch.tensor([r.token_ids[0] for r in out])
    for c, sp in enumerate(configs):
        got, probs = tokens[c::len(configs)], processed_probs(logits, sp, prompt)
        assert (probs[got] > 0).all()
        assert chi_square_p_value(got, probs) > P_MIN, sp


def test_unseeded_requests_each_get_their_own_stream(model):
    """Issue 9's defect: six unseeded samples of one prompt differ, and a second call draws fresh ones."""
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, ignore_eos=True)
    b = ContinuousBatcher(model)
    first = [r.token_ids for r in b.generate([PROMPT] * 6, sp)]
    second = [r.token_ids for r in b.generate([PROMPT] * 6, sp)]
    assert len({tuple(t) for t in first}) == 6
    assert all(a != c for a in first for c in second)


def test_unseeded_sampling_is_reproducible_from_the_batcher_seed(model):
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, ignore_eos=True)
    prompts = [PROMPT] * 4 + mixed_prompts(3, lo=2, hi=20, seed=5)

    def run(seed, mode="async", **kw):
        return [r.token_ids for r in ContinuousBatcher(model, seed=seed, mode=mode, **kw).generate(prompts, sp)]

    base = run(0)
    assert run(0, mode="sync", max_num_seqs=3) == base
    other = run(1)
    assert all(a != b for a, b in zip(base, other))


def test_seeds_differing_only_in_their_high_word_draw_differently(model):
    """The 64-bit seed enters the noise whole: seeds equal in their low 32 bits are different streams."""
    b = ContinuousBatcher(model)
    seeds = [5, 5 + (1 << 32), 5 + (1 << 63)]
    out = b.generate([PROMPT] * 3, [SamplingParams(temperature=1.0, max_new_tokens=8, ignore_eos=True, seed=s)
                                    for s in seeds])
    assert len({tuple(r.token_ids) for r in out}) == 3


@pytest.mark.parametrize("mode, penalty", [("sync", 1.5), ("async", 0.7)])
def test_greedy_with_repetition_penalty_equals_generate(model, mode, penalty):
    """Penalised greedy decoding equals ``model.generate(repetition_penalty=...)`` token for token, with prompts split
    over steps, a cache small enough to preempt (a preempted request's table row is cleared and restaged) and prompts
    whose shared prefix comes from the prefix cache (tokens never fed through the request's own row)."""
    prompts = mixed_prompts(5, lo=3, hi=40, seed=1)
    prompts += [prompts[1][:16] + [9, 10, 11], prompts[1][:24] + [12]]

    def generate(p):
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
                             repetition_penalty=penalty)
        return out[0, len(p):].tolist()

    b = ContinuousBatcher(model, mode=mode, max_batch_tokens=16, num_blocks=12, block_size=8)
    got = b.generate(prompts, SamplingParams(max_new_tokens=12, repetition_penalty=penalty, ignore_eos=True))
    assert [r.token_ids for r in got] == [generate(p) for p in prompts]
    assert b.stats["preemptions"] > 0 and b.stats["cached_tokens"] > 0 and b.all_blocks_free()


def test_presence_rows_hold_exactly_the_current_requests_history():
    """The repetition penalty's device table, step by step, against the set of tokens each request has seen: a request
    that comes back to a row after running elsewhere, a row taken over by another request, tokens still in flight."""
    V = 64
    state = SamplingState(6, V)
    sp = SamplingParams(temperature=0.0, repetition_penalty=1.3)

    def req(uid, prompt, outputs, row, preemptions=0):
        return types.SimpleNamespace(sampling=sp, seed=0, num_generated=len(outputs), row=row, uid=uid,
                                     num_preemptions=preemptions, prompt_ids=prompt, output_ids=outputs,
                                     num_known=len(prompt) + len(outputs))

    def step(reqs, in_flight):
        """One step; ``in_flight[i]``: the row's last input token, on the device only (None: its last known token)."""
        plan, arrays = stage_sampling(reqs, state)
        last = [t if t is not None else (r.prompt_ids + r.output_ids)[-1] for r, t in zip(reqs, in_flight)]
        segs = {name: torch.from_numpy(a) for name, a in arrays}
        segs["input_ids"] = torch.tensor(last, dtype=torch.int32)
        segs["logits_idx"] = torch.arange(len(reqs), dtype=torch.int32)
        sampling_inputs(plan, segs.__getitem__)
        for r, t in zip(reqs, last):
            seen = set(r.prompt_ids + r.output_ids + [t])
            assert set(state.presence[r.row].nonzero().flatten().tolist()) == seen

    a_prompt = [1, 2, 3]
    step([req(0, a_prompt, [], row=1), req(1, [4, 5], [6], row=2)], [None, 7])  # row 2: token 7 in flight
    step([req(0, a_prompt, [10], row=1), req(1, [4, 5], [6, 7], row=2)], [11, 12])
    # Request 0 is preempted, runs on row 3 and is preempted again; request 1 finishes and request 2 takes row 2.
    step([req(0, a_prompt, [10, 11, 20], row=3, preemptions=1), req(2, [30], [], row=2)], [21, None])
    step([req(0, a_prompt, [10, 11, 20, 21, 22], row=1, preemptions=2)], [None])
    assert not state.presence[4:].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampling_fits_is_batch_invariant_and_never_synchronizes():
    """On the GPU, with bf16 logits: no host synchronization inside ``sampling_inputs``/``sample`` (CUDA's sync debug
    mode raises on one), draws fit the processed distribution, and a row draws the same token alone or in a step."""
    V, n = 32000, 8000
    logits = (torch.randn(V, generator=torch.Generator().manual_seed(5)) * 2.5).to(torch.bfloat16)
    configs = [SamplingParams(temperature=0.8, top_k=50, top_p=0.95), SamplingParams(temperature=0.8),
               SamplingParams(temperature=0.8, top_p=0.95), SamplingParams(temperature=0.8, min_p=0.05),
               SamplingParams(temperature=0.8, top_k=50, repetition_penalty=1.3)]
    for sp in configs:
        batch, plan, seg = staged_step(logits.cuda(), [sp] * n)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = sample(batch, sampling_inputs(plan, seg))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        got = got.cpu()
        probs = processed_probs(logits.float(), sp)
        assert (probs[got.long()] > 0).all(), sp
        assert chi_square_p_value(got, probs) > P_MIN, sp
    assert_batch_invariant("cuda", V, 256)


def assert_batch_invariant(device: str, V: int, n: int) -> None:
    """Each row of a step mixing logits and parameters draws the token it draws alone (same stream, same index)."""
    configs = [SamplingParams(temperature=0.8, top_k=50, top_p=0.95), SamplingParams(temperature=0.8),
               SamplingParams(temperature=0.8, top_p=0.95), SamplingParams(temperature=0.8, min_p=0.05),
               SamplingParams(temperature=0.8, top_k=50, repetition_penalty=1.3), SamplingParams(temperature=0.0)]
    mixed = [configs[i % len(configs)] for i in range(n)]
    batch = (torch.randn(n, V, generator=torch.Generator().manual_seed(6)) * 2.5).to(torch.bfloat16).to(device)
    seeds = [stream_seed(9, i) for i in range(n)]
    together = direct_draws(batch, mixed, seeds=seeds).cpu()
    for i in range(0, n, 7):
        alone = direct_draws(batch[i:i + 1], [mixed[i]], seeds=[seeds[i]]).cpu()
        assert int(alone[0]) == int(together[i]), (i, mixed[i])


def test_a_row_draws_the_same_token_alone_or_in_a_mixed_step():
    assert_batch_invariant("cpu", 3000, 64)
