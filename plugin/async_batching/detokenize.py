"""Incremental detokenization and stop strings."""

from __future__ import annotations

from typing import Sequence


class IncrementalDetokenizer:
    """Turns a request's generated ids into text as they arrive, and spots stop strings.

    Decodes only a short window of recent ids each time (prefix/read offsets, as streamers do), so the cost per token
    does not grow with the output length; text ending in an incomplete UTF-8 sequence waits for the next token.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.skip_special = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # ids before this are settled context for decoding the window
        self._read = 0  # ids before this are already in self.text
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def push(self, token: int) -> bool:
        """Add one id; return True when a stop string has appeared (the text is then cut before it)."""
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        full = self._decode(self.ids[self._prefix:])
        grew, complete = len(full) > len(prefix_text), not full.endswith("\ufffd")
        new = full[len(prefix_text):] if grew else ""
        if self.stop:
            # Text before a character still incomplete is final already: a stop string it completes counts now.
            start = max(0, len(self.text) - self._max_stop + 1)
            text = self.text + (new if complete else new.rstrip("\ufffd"))
            hits = [i for s in self.stop if (i := text.find(s, start)) >= 0]
            if hits:
                self.text = text[: min(hits)]
                self.stopped = True
                return True
        if grew and complete:
            self.text += new
            self._prefix, self._read = self._read, len(self.ids)
        return False

    def finish(self) -> str:
        """Flush ids held back for an incomplete character."""
        if self._read < len(self.ids) and not self.stopped:
            tail = self._decode(self.ids[self._prefix:])[len(self._decode(self.ids[self._prefix:self._read])):]
            self.text += tail
            self._read = len(self.ids)
        return self.text
