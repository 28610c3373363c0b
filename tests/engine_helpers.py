"""Shared oracles for engine tests: prompts, `model.generate` references, a word-level tokenizer."""

from __future__ import annotations

import random

import torch


def mixed_prompts(n: int, lo: int = 1, hi: int = 200, vocab: int = 384, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [lo, hi] + [rng.randint(lo, hi) for _ in range(n - 2)]
    return [[rng.randrange(3, vocab) for _ in range(L)] for L in lengths]


@torch.no_grad()
def reference(model, prompt: list[int], max_new_tokens: int, eos=None) -> list[int]:
    """Greedy `model.generate` on one unpadded prompt: the oracle."""
    out = model.generate(
        torch.tensor([prompt], device=model.device), attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=model.device),
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()


def word_tokenizer(vocab: int = 384):
    """A tiny word-level tokenizer: id i <-> the word 'w{i}' (so stop strings and text can be tested offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0", eos_token="w2")


def record_launches(monkeypatch, module, name: str) -> list:
    """Replace the Triton kernel ``module.name`` (for the test) with one that records the grid of every launch, in
    order, and launches the real kernel: the list it returns."""
    grids: list = []
    real = getattr(module, name)

    class Recording:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(module, name, Recording())
    return grids


def record_launch_flag(monkeypatch, module, name: str, flag: str) -> list:
    """Replace the Triton kernel ``module.name`` (for the test) with one that records the keyword argument ``flag``
    (a constexpr; None where not passed) of every launch, in order, and launches the real kernel: the list it
    returns."""
    flags: list = []
    real = getattr(module, name)

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                flags.append(kwargs.get(flag))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, name, Recording())
    return flags
