"""The incremental detokenizer against ``tokenizer.decode``, with a real byte-level BPE that splits characters."""

from __future__ import annotations

import random

import pytest

from async_batching.detokenize import IncrementalDetokenizer

CORPUS = ["Café crème brûlée", "naïve façade", "hello world", "the quick brown fox", "über straße",
          "日本語のテキスト", "emoji 😀 party 🎉"] * 5
TEXTS = ["Café 😀 naïve", "日本 🎉 über", "👩‍👩‍👧 x", "plain ascii only", "ß😀ß😀ß"]


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE (GPT-2 style) trained here on a few strings: small enough that emoji and CJK characters
    are split over several tokens, as in real vocabularies for rarer characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    bpe.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


def pushed(tok, ids, stop=()):
    """Push ``ids`` one at a time; returns the detokenizer, the text after each push and the first stopping index."""
    detok = IncrementalDetokenizer(tok, stop)
    texts, stopped_at = [], None
    for i, t in enumerate(ids):
        if detok.push(t) and stopped_at is None:
            stopped_at = i
            break
        texts.append(detok.text)
    return detok, texts, stopped_at


def test_the_tokenizer_splits_characters_across_tokens(tok):
    """The premise of the tests below: some single tokens decode to half a character."""
    split = [t for text in TEXTS for t in tok.encode(text) if "\ufffd" in tok.decode([t])]
    assert len(split) >= 10


@pytest.mark.parametrize("text", TEXTS)
def test_text_equals_decode_and_never_shows_half_a_character(tok, text):
    ids = tok.encode(text)
    detok, texts, _ = pushed(tok, ids)
    for n, shown in enumerate(texts, 1):
        assert "\ufffd" not in shown, (text, n)  # an incomplete UTF-8 sequence waits for its next token
        assert tok.decode(ids).startswith(shown)
    assert detok.finish() == tok.decode(ids) == text


def test_random_texts_and_random_ids_decode_as_a_whole(tok):
    rng = random.Random(0)
    alphabet = "aé ü😀🎉日本x\n"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20)))
        ids = tok.encode(text)
        assert pushed(tok, ids)[0].finish() == text
    for _ in range(300):  # what a model may generate: byte tokens that do not form valid UTF-8
        ids = [rng.randrange(0, len(tok)) for _ in range(rng.randint(1, 12))]
        assert pushed(tok, ids)[0].finish() == tok.decode(ids, skip_special_tokens=True), ids


@pytest.mark.parametrize("text, stop", [
    ("Café 😀 naïve", "😀 na"),  # starts inside an emoji's bytes, ends in a later token
    ("日本 🎉 über", "本 🎉"),
    ("the quick brown fox", "ck br"),  # inside and across word tokens
    ("ß😀ß😀ß", "ß😀ß"),  # the earliest occurrence wins
])
def test_stop_string_spanning_tokens_stops_at_the_completing_token_and_cuts_the_text(tok, text, stop):
    ids = tok.encode(text)
    detok, _, stopped_at = pushed(tok, ids, [stop])
    first = next(i for i in range(len(ids)) if stop in tok.decode(ids[: i + 1]))
    assert stop not in tok.decode([ids[first]])  # the stop string spans several tokens
    assert stopped_at == first and detok.stopped
    assert detok.finish() == text.split(stop)[0]


def test_stop_string_is_found_when_its_start_was_already_emitted(tok):
    """The stop's first characters came out with earlier tokens; the token that completes it must still stop."""
    text = "hello world"
    ids = tok.encode(text)
    detok, texts, stopped_at = pushed(tok, ids, ["o w"])
    assert texts[-1] == "hello"  # emitted before the token that completes the stop
    assert stopped_at == len(texts) and detok.finish() == "hell"


def test_no_stop_string_means_no_stop(tok):
    ids = tok.encode("Café 😀 naïve")
    detok, texts, stopped_at = pushed(tok, ids, ["🎉", "xyz"])
    assert stopped_at is None and not detok.stopped and detok.finish() == "Café 😀 naïve"


def test_the_rust_decode_stream_gives_what_the_window_decodes_give(tok):
    """A fast tokenizer takes tokenizers' DecodeStream (one Rust call a token); the text after every push, the stopping
    token and the final text equal those of the window decodes through ``tokenizer.decode``, on random ids (invalid
    UTF-8 and the special token included) with stop strings."""
    rng = random.Random(3)
    stops = ["😀", "é ü", "\n", "ab"]
    assert IncrementalDetokenizer(tok)._stream is not None
    for _ in range(300):
        ids = [rng.randrange(0, len(tok)) for _ in range(rng.randint(1, 16))]
        stop = [rng.choice(stops)] if rng.random() < 0.7 else []
        fast = IncrementalDetokenizer(tok, stop)
        slow = IncrementalDetokenizer(tok, stop)
        slow._stream = None
        for t in ids:
            a, b = fast.push(t), slow.push(t)
            assert (a, fast.text) == (b, slow.text), (ids, stop)
            if a:
                break
        assert fast.finish() == slow.finish(), (ids, stop)
