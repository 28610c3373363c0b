"""Shared oracles for engine tests: prompts, `model.generate` references, a word-level tokenizer."""

from __future__ import annotations

import random
from typing import Optional

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


def record_launches(monkeypatch, module, name: str, flag: Optional[str] = None) -> list:
    """Replace the Triton kernel ``module.name`` (for the test) with one that records the grid of every launch, or
    with ``flag`` that keyword argument (a constexpr; None where not passed), in order, and launches the real kernel:
    the list it returns."""
    seen: list = []
    real = getattr(module, name)

    class Recording:
        def __getitem__(self, grid):
            if flag is None:
                seen.append(grid)
                return real[grid]

            def launch(*args, **kwargs):
                seen.append(kwargs.get(flag))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, name, Recording())
    return seen
