"""AsyncBatchingLM on a tiny random llama with a word-level tokenizer (id i <-> "w{i}"), against plain oracles:
greedy ``model.generate`` cut at the first stop string, a plain forward's ``log_softmax``, lm-eval's own window
utilities; plus model_args handling, gen_kwargs translation, repeats -> n, chat templates and clear errors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from async_batching.lm_eval import AsyncBatchingLM  # noqa: E402
from engine_helpers import reference  # noqa: E402
from lm_eval_helpers import word_tokenizer  # noqa: E402

CONTEXT = "w5 w17 w33 w101 w7"


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def lm(tiny_llama, tok):
    model = AsyncBatchingLM(pretrained=tiny_llama, tokenizer=tok, max_batch_tokens=64, num_blocks=128)
    yield model
    model.close()


def gen(context, **gen_kwargs):
    return Instance(request_type="generate_until", doc={}, arguments=(context, gen_kwargs), idx=0)


def words(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


def spy_generate(lm, monkeypatch):
    calls = []
    real = lm.batcher.generate

    def generate(prompts, sampling, progress=False):
        calls.append((list(prompts), list(sampling)))
        return real(prompts, sampling, progress=progress)

    monkeypatch.setattr(lm.batcher, "generate", generate)
    return calls


def test_unknown_model_args_are_refused_naming_the_key_and_what_is_accepted(tiny_llama, tok):
    with pytest.raises(TypeError, match=r"unknown model_args \['max_batch_tokenz'\].*max_batch_tokens"):
        AsyncBatchingLM(pretrained=tiny_llama, tokenizer=tok, max_batch_tokenz=64)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        AsyncBatchingLM(pretrained="tiny:llama")


def test_a_tensor_parallel_size_that_does_not_divide_the_ranks_is_a_clear_error(tiny_llama, tok):
    # One process: a group of two cannot form (tensor_parallel_size=2 over torchrun's ranks is tested in test_lm_eval_cli)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 and 1 ranks: .*does not divide the world size 1; "
                                         r"launch a multiple of tensor_parallel_size processes"):
        AsyncBatchingLM(pretrained=tiny_llama, tokenizer=tok, tensor_parallel_size=2)


def test_batcher_config_keys_reach_the_engine_and_batch_size_is_ignored(tiny_llama, tok):
    lm = AsyncBatchingLM(pretrained=tiny_llama, tokenizer=tok, batch_size=64, max_batch_tokens=48, block_size=8,
                         num_blocks=40, mode="sync")
    try:
        cfg = lm.batcher.config
        assert (cfg.max_batch_tokens, cfg.block_size, cfg.num_blocks, cfg.mode) == (48, 8, 40, "sync")
        assert lm.max_length == tiny_llama.config.max_position_embeddings and lm.max_gen_toks == 256
    finally:
        lm.close()


def test_greedy_generation_equals_generate_cut_at_the_first_stop_string(lm, tiny_llama, tok):
    ids = tok.encode(CONTEXT)
    ref = reference(tiny_llama, ids, 10, eos=2)
    text = words(tok, ref).split(" ")
    assert len(text) >= 6, "the oracle needs a few words to cut"
    stop_a, stop_b = " " + text[4], " " + text[2]  # listed out of order: the earliest occurrence wins
    got = lm.generate_until([gen(CONTEXT, until=[stop_a, stop_b], max_gen_toks=10),
                             gen(CONTEXT, until=[], max_gen_toks=10),
                             gen(CONTEXT, until=[], max_gen_toks=3)])
    full = words(tok, ref)
    assert got[0] == full[: full.index(stop_b)]
    assert got[1] == full
    assert got[2] == words(tok, ref[:3])


def test_generation_stops_at_the_models_eos_as_generate_does(tiny_llama, tok):
    ids = tok.encode(CONTEXT)
    free = reference(tiny_llama, ids, 8)
    eos = free[3]
    old = tiny_llama.generation_config.eos_token_id
    tiny_llama.generation_config.eos_token_id = eos
    try:
        lm = AsyncBatchingLM(pretrained=tiny_llama, tokenizer=tok, num_blocks=64)
        got = lm.generate_until([gen(CONTEXT, until=[], max_gen_toks=8)])
        lm.close()
    finally:
        tiny_llama.generation_config.eos_token_id = old
    assert got == [words(tok, reference(tiny_llama, ids, 8, eos=eos))]
    assert got[0] == words(tok, free[: free.index(eos) + 1])


def test_gen_kwargs_become_sampling_params(lm, monkeypatch):
    calls = spy_generate(lm, monkeypatch)
    lm.generate_until([gen(CONTEXT, until=[" w9"], max_gen_toks=5, do_sample=False, temperature=0.7,
                           stop_token_ids=[7]),
                       gen(CONTEXT, until="<eos>", max_gen_toks=4, do_sample=True, top_p=0.9, top_k=20, seed=3),
                       gen(CONTEXT, max_new_tokens=6, temperature=0.5)])
    [(prompts, params)] = calls
    greedy, sampled, tempered = params
    assert greedy.temperature == 0.0 and greedy.max_new_tokens == 5 and greedy.stop == (" w9",)
    assert greedy.stop_token_ids == (7, 2)  # the tokenizer's EOS text is a special token: it stops as an id
    assert (sampled.temperature, sampled.top_p, sampled.top_k, sampled.seed) == (1.0, 0.9, 20, 3)
    assert sampled.stop == () and sampled.max_new_tokens == 4
    assert (tempered.temperature, tempered.max_new_tokens) == (0.5, 6)
    assert all(p.n == 1 for p in params) and prompts[0] == [5, 17, 33, 101, 7]


def test_unsupported_gen_kwargs_are_refused_naming_the_request_and_key(lm):
    with pytest.raises(ValueError, match=r"request 1: unsupported gen_kwargs \['num_beams'\]"):
        lm.generate_until([gen(CONTEXT, until=[]), gen("w9", until=[], num_beams=4)])


def test_contexts_are_left_truncated_to_leave_room_for_max_gen_toks(tiny_llama, tok, monkeypatch):
    lm = AsyncBatchingLM(pretrained=tiny_llama, tokenizer=tok, max_length=16, num_blocks=64)
    calls = spy_generate(lm, monkeypatch)
    long = " ".join(f"w{10 + i}" for i in range(30))
    lm.generate_until([gen(long, until=[], max_gen_toks=6)])
    lm.close()
    assert calls[0][0] == [list(range(30, 40))]  # the last 16 - 6 = 10 context tokens
    with pytest.raises(ValueError, match="max_gen_toks .16. must be below max_length .16."):
        lm.generate_until([gen(long, until=[], max_gen_toks=16)])


def test_repeats_become_one_request_with_n_samples_handed_back_in_order(lm, tiny_llama, tok, monkeypatch):
    calls = spy_generate(lm, monkeypatch)
    sampled = gen(CONTEXT, until=[], max_gen_toks=6, do_sample=True, temperature=1.0)
    greedy = gen("w8 w9", until=[], max_gen_toks=6)
    got = lm.generate_until([sampled] * 4 + [greedy] * 2)  # what lm-eval hands over for repeats: 4 and 2 copies
    [(prompts, params)] = calls
    assert len(prompts) == 2 and [p.n for p in params] == [4, 2]
    assert len(got) == 6 and len(set(got[:4])) > 1  # four independent samples
    assert got[4] == got[5] == words(tok, reference(tiny_llama, tok.encode("w8 w9"), 6, eos=2))


def oracle_loglikelihood(model, context, continuation):
    """Sum of log_softmax at the continuation tokens, and whether each was the argmax: one plain forward."""
    ids = torch.tensor([context + continuation[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)[len(context) - 1:]
    target = torch.tensor(continuation)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_loglikelihoods_equal_a_plain_forward_within_1e5(lm, tiny_llama, tok):
    pairs = [(CONTEXT, " w9"), (CONTEXT, " w9 w44 w12"), ("w3", " w250"), ("", "w5 w6 w7"), (CONTEXT, " w9 w44"),
             (CONTEXT + " ", "w9")]  # a trailing space moves into the continuation
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(reqs)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        c = tok.encode(cont.strip())
        x = tok.encode(ctx) if ctx else [lm.prefix_token_id]  # an empty context conditions on the prefix token
        want, want_greedy = oracle_loglikelihood(tiny_llama, x, c)
        assert abs(ll - want) < 1e-5 and greedy == want_greedy


def test_overlong_pairs_keep_the_last_positions_as_the_hf_backend_does(tiny_llama, tok):
    lm = AsyncBatchingLM(pretrained=tiny_llama, tokenizer=tok, max_length=12, num_blocks=64)
    ctx = list(range(10, 30))
    [(ll, _)] = lm._loglikelihood_tokens([(None, ctx, [40, 41, 42])])
    lm.close()
    kept = (ctx + [40, 41, 42])[-13:]  # max_length fed tokens + the last continuation token
    assert abs(ll - oracle_loglikelihood(tiny_llama, kept[:-3], kept[-3:])[0]) < 1e-5


def test_rolling_loglikelihood_sums_lm_evals_own_windows(tiny_llama, tok):
    lm = AsyncBatchingLM(pretrained=tiny_llama, tokenizer=tok, max_length=16, num_blocks=64)
    text = " ".join(f"w{(7 * i) % 380 + 3}" for i in range(45))
    [got] = lm.loglikelihood_rolling([Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)])
    lm.close()
    windows = list(map(make_disjoint_window, get_rolling_token_windows(
        tok.encode(text), prefix_token=lm.prefix_token_id, max_seq_len=16, context_len=1)))
    assert len(windows) >= 3
    want = sum(oracle_loglikelihood(tiny_llama, c, p)[0] for c, p in windows)
    assert abs(got - want) < 1e-4


def test_chat_template_is_the_tokenizers_and_falls_back_without_a_system_role(tiny_llama):
    tok = word_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                         "{% endif %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant{% endif %}")
    lm = AsyncBatchingLM(pretrained=tiny_llama, tokenizer=tok, num_blocks=16)
    chat = [{"role": "system", "content": "w3"}, {"role": "user", "content": "w5 w6"}]
    assert lm.apply_chat_template(chat) == "user w5 w6 assistant"
    assert lm.apply_chat_template(chat[1:], add_generation_prompt=False) == tok.apply_chat_template(
        chat[1:], tokenize=False, add_generation_prompt=False, continue_final_message=True)  # a prefilled answer
    assert lm.chat_template(True) == tok.chat_template and lm.tokenizer_name == tok.name_or_path.replace("/", "__")
    lm.close()
