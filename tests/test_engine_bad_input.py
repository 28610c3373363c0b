"""Invalid requests and configs are named in a clear error before any work starts; the batcher keeps working."""

import pytest

from async_batching import BatcherConfig, ContinuousBatcher, SamplingParams
from async_batching.models import tiny_model
from engine_helpers import reference


@pytest.fixture(scope="module")
def batcher():
    return ContinuousBatcher(tiny_model("llama"), num_blocks=20, block_size=16)  # 512 positions, 19 usable blocks


GOOD = [5, 6, 7]
CASES = [
    ([], SamplingParams(), ValueError, "prompt is empty"),
    ([5, 384], SamplingParams(), ValueError, "token id 384 is outside the vocabulary"),
    ([5, -1], SamplingParams(), ValueError, "token id -1 is outside the vocabulary"),
    ([5, 2.5], SamplingParams(), ValueError, "non-integer token ids"),
    ([1] * 512, SamplingParams(), ValueError, "the model allows 512 positions"),
    ([1] * 300, SamplingParams(max_new_tokens=300), ValueError, "exceeds the model's 512 positions"),
    ([1] * 200, SamplingParams(max_new_tokens=200), ValueError, "KV blocks"),
    (GOOD, SamplingParams(max_new_tokens=0), ValueError, "max_new_tokens must be an int >= 1"),
    (GOOD, SamplingParams(temperature=-1.0), ValueError, "temperature"),
    (GOOD, SamplingParams(top_p=0.0), ValueError, "top_p"),
    (GOOD, SamplingParams(top_k=-3), ValueError, "top_k"),
    (GOOD, SamplingParams(stop="x"), ValueError, "stop must be a list"),
    (GOOD, SamplingParams(logprobs=-1), ValueError, "logprobs"),
    ("hello", SamplingParams(), TypeError, "no tokenizer"),
    (42, SamplingParams(), TypeError, "prompt must be a list"),
    (GOOD, {"max_new_tokens": 3}, TypeError, "sampling must be a SamplingParams"),
]


@pytest.mark.parametrize("prompt,sampling,exc,message", CASES, ids=[c[3][:30] for c in CASES])
def test_bad_request_is_named_before_any_work(batcher, prompt, sampling, exc, message):
    steps = batcher.stats["steps"]
    prompts = [GOOD, GOOD, prompt]
    params = [SamplingParams(max_new_tokens=2)] * 2 + [sampling]
    with pytest.raises(exc, match=r"request 2: .*" + message.replace("(", r"\(").replace("[", r"\[")):
        batcher.generate(prompts, params)
    assert batcher.stats["steps"] == steps, "no step may run before validation passed"
    assert batcher.num_unfinished == 0
    # The same batcher still works afterwards.
    r = batcher.generate([GOOD], SamplingParams(max_new_tokens=3, ignore_eos=True))[0]
    assert r.token_ids == reference(batcher.model, GOOD, 3)


def test_pairs_sharing_one_context_list_are_each_checked(batcher):
    """score() checks a context list shared by several pairs once; each pair's own continuation is still checked."""
    ctx = [5, 6, 7, 8]
    good = batcher.score([(ctx, [9]), (ctx, [10]), (list(ctx), [11])])
    assert [round(r.logprob, 5) for r in good] == [round(r.logprob, 5) for r in
                                                   batcher.score([(list(ctx), [t]) for t in (9, 10, 11)])]
    with pytest.raises(ValueError, match=r"request 1: .*token id 384 is outside the vocabulary"):
        batcher.score([(ctx, [9]), (ctx, [384]), (ctx, [10])])
    bad = [5, 384]
    with pytest.raises(ValueError, match=r"request 0: .*token id 384 is outside the vocabulary"):
        batcher.score([(bad, [9]), (bad, [10])])
    with pytest.raises(ValueError, match=r"request 1: .*non-integer token ids"):
        batcher.score([(ctx, [9]), (ctx, [2.5])])
    assert batcher.num_unfinished == 0


def test_add_request_names_its_id(batcher):
    with pytest.raises(ValueError, match="request 77: prompt is empty"):
        batcher.add_request([], request_id=77)
    rid = batcher.add_request(GOOD, SamplingParams(max_new_tokens=1), request_id=78)
    with pytest.raises(ValueError, match="request 78: id already in use"):
        batcher.add_request(GOOD, request_id=78)
    assert [r.index for r in batcher.drain()] == [rid]


def test_mismatched_sampling_list_is_rejected(batcher):
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        batcher.generate([GOOD] * 3, [SamplingParams()] * 2)


@pytest.mark.parametrize("key,value,accepted", [
    ("num_blocks", 0, "positive int"), ("block_size", 12, "power of two"), ("mode", "asnyc", "one of"),
    ("scheduler", "lifo", "one of"), ("max_batch_tokens", 0, "positive int"), ("max_num_seqs", -1, "positive int"),
    ("memory_fraction", 1.5, "fraction"), ("attention_backend", "flash", "one of"), ("dtype", "fp8", "one of"),
    ("admit_threshold", 0, "positive int"), ("prefill_graphs", "yes", "true, false or null"),
])
def test_invalid_config_names_the_key_and_accepted_values(key, value, accepted):
    with pytest.raises(ValueError, match=rf"BatcherConfig\.{key}=.* is invalid: expected .*{accepted}"):
        BatcherConfig.from_overrides(**{key: value})


def test_unknown_config_key_is_a_clear_error():
    with pytest.raises(TypeError, match=r"unknown BatcherConfig field\(s\) \['max_batch_tokns'\]"):
        ContinuousBatcher(tiny_model("llama"), max_batch_tokns=8)


def test_cuda_only_options_on_cpu_are_refused():
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        ContinuousBatcher(tiny_model("llama"), cuda_graphs=True)
    with pytest.raises(ValueError, match="attention_backend='triton' needs a CUDA device"):
        ContinuousBatcher(tiny_model("llama"), attention_backend="triton")
    with pytest.raises(ValueError, match=r"prefill_graphs=True is not supported with decode steps do not run in CUDA "
                                         r"graphs here .* use prefill_graphs=null \(auto\) or false"):
        ContinuousBatcher(tiny_model("llama"), prefill_graphs=True)
    assert not ContinuousBatcher(tiny_model("llama"), prefill_graphs=False).runner.want_prefill_graphs
