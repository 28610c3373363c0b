"""Checks of one request before it is queued: every problem found, as readable phrases, so the caller can name the
request in one error and nothing is queued or computed for it."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .request import SamplingParams

_PLAIN_INT = frozenset([int])
TYPE_PROBLEMS = ("prompt must", "sampling must", "prompt tensor", "prompt is a string", "context must",
                 "continuation must", "context is a string", "continuation is a string")


class RequestValidator:
    """Knows the limits a request must fit: vocabulary, positions, cache size, token budget, tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int, block_size: int, usable_blocks: int,
                 max_batch_tokens: int, chunked_prefill: bool):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.usable_blocks = usable_blocks
        self.max_batch_tokens = max_batch_tokens
        self.chunked_prefill = chunked_prefill

    def _ids(self, what: str, value: Any, problems: list[str], special_tokens: bool = True) -> Optional[list[int]]:
        if isinstance(value, str):
            if self.tokenizer is None:
                problems.append(f"{what} is a string but the batcher has no tokenizer")
                return None
            return list(self.tokenizer.encode(value, add_special_tokens=special_tokens))
        if isinstance(value, torch.Tensor):
            if value.dim() > 1:
                problems.append(f"{what} tensor must be 1-D, got shape {tuple(value.shape)}")
                return None
            return value.reshape(-1).tolist()
        if isinstance(value, (list, tuple)):
            ids = list(value)
            if not set(map(type, ids)) <= _PLAIN_INT:  # else every id is a plain int: nothing to look for
                bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool)]
                if bad:
                    problems.append(f"{what} holds non-integer token ids, e.g. {bad[0]!r}")
                    return None
            return ids
        problems.append(f"{what} must be a list of token ids or a string, got {type(value).__name__}")
        return None

    def _in_vocab(self, ids: list[int]) -> bool:
        return not ids or (min(ids) >= 0 and max(ids) < self.vocab_size)

    def _fits(self, what: str, ids: list[int], total: int, problems: list[str],
              unchecked: Optional[list[int]] = None) -> None:
        """``unchecked``: the part of ``ids`` whose vocabulary range is not known to be fine (default: all)."""
        if not self._in_vocab(ids if unchecked is None else unchecked):
            out = [t for t in ids if t < 0 or t >= self.vocab_size]
            problems.append(f"token id {out[0]} is outside the vocabulary [0, {self.vocab_size})")
        limit = self.max_model_len
        if total > limit:
            problems.append(f"{what} = {total} tokens exceeds the model's {limit} positions")
        need = -(-total // self.block_size)
        if need > self.usable_blocks:
            problems.append(f"needs {need} KV blocks for {total} tokens, the whole cache has {self.usable_blocks} "
                            "(raise num_blocks or memory_fraction, or lower max_new_tokens)")
        if not self.chunked_prefill and total > self.max_batch_tokens:
            problems.append(f"{what} = {total} exceeds max_batch_tokens ({self.max_batch_tokens}) and chunked_prefill "
                            "is off")

    def generation(self, prompt: Any, sampling: Any) -> tuple[list[int], list[str]]:
        """Token ids of a generation request, and its problems."""
        if not isinstance(sampling, SamplingParams):
            return [], [f"sampling must be a SamplingParams, got {type(sampling).__name__}"]
        problems = sampling.problems()
        if sampling.stop and self.tokenizer is None:
            problems.append("stop strings need a tokenizer")
        ids = self._ids("prompt", prompt, problems)
        if ids is None:
            return [], problems
        if not ids:
            return ids, problems + ["prompt is empty"]
        if len(ids) >= self.max_model_len:
            problems.append(f"prompt has {len(ids)} tokens, the model allows {self.max_model_len} positions")
        elif isinstance(sampling.max_new_tokens, int):
            self._fits(f"prompt ({len(ids)}) + max_new_tokens ({sampling.max_new_tokens})", ids,
                       len(ids) + sampling.max_new_tokens, problems)
        return ids, problems

    def scoring(self, context: Any, continuation: Any,
                contexts: Optional[dict] = None) -> tuple[list[int], int, list[str]]:
        """Token ids of context + continuation, the first scored position, and the problems. An empty context scores
        every continuation token after the first (the first one is the context).

        ``contexts``: a dict the caller keeps over pairs that cannot change meanwhile (one materialised list): a
        context list met again, the same object (the choices of a question share theirs), is not checked again."""
        problems: list[str] = []
        known = contexts.get(id(context)) if contexts is not None else None
        ctx_in_vocab = known is not None and known[0] is context  # the entry holds the object: its id is not reused
        if ctx_in_vocab:
            ctx = known[1]
        else:
            ctx = self._ids("context", context, problems)
            if contexts is not None and isinstance(context, list) and ctx and not problems and self._in_vocab(ctx):
                contexts[id(context)] = (context, ctx)
                ctx_in_vocab = True
        cont = self._ids("continuation", continuation, problems, special_tokens=False)
        if ctx is None or cont is None:
            return [], -1, problems
        if not ctx:
            ctx, cont = cont[:1], cont[1:]
        if not cont:
            problems.append("continuation is empty (nothing to score)")
            return ctx + cont, -1, problems
        ids = ctx + cont
        self._fits(f"context ({len(ctx)}) + continuation ({len(cont)})", ids, len(ids), problems,
                   unchecked=cont if ctx_in_vocab else None)
        return ids, len(ctx) - 1, problems


def raise_problems(name: object, problems: list[str]) -> None:
    """One TypeError (wrong types) or ValueError naming the request and every problem; nothing when there are none."""
    if problems:
        kind = TypeError if any(p.startswith(TYPE_PROBLEMS) for p in problems) else ValueError
        raise kind(f"request {name}: " + "; ".join(problems))
