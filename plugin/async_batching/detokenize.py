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
        # Fast tokenizers: the same window algorithm in one Rust call a token (tokenizers' DecodeStream), instead of
        # two decodes through transformers (about 0.7 against 6.8 us a token on a CPU). Its state mirrors the offsets
        # above; any error drops it, and the window decodes carry on from those offsets.
        self._rust, self._stream = _decode_stream(tokenizer, skip_special_tokens)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def push(self, token: int) -> bool:
        """Add one id; return True when a stop string has appeared (the text is then cut before it)."""
        self.ids.append(token)
        new = None
        if self._stream is not None:
            try:
                new = self._stream.step(self._rust, token)  # the new text once it ends in a complete character
            except Exception:  # noqa: BLE001 -- e.g. a decoded window that does not extend its prefix: windows below
                self._stream = None
            if new is None and self._stream is not None and not self.stop:
                return False  # nothing complete to add, and no stop string to look for in the partial text
        if new is not None:
            grew = complete = True
        else:
            prefix_text = self._decode(self.ids[self._prefix:self._read])
            full = self._decode(self.ids[self._prefix:])
            grew, complete = len(full) > len(prefix_text), not full.endswith("\ufffd")
            new = full[len(prefix_text):] if grew else ""
            if grew and complete and self._stream is not None:
                self._stream = None  # the stream saw no complete text where the windows do: trust the windows
        if self.stop:
            # Text before a character still incomplete is final already: a stop string it completes counts now.
            start = max(0, len(self.text) - self._max_stop + 1)
            tail = self.text[start:] + (new if complete else new.rstrip("\ufffd"))  # where a new stop can be
            hits = [i for s in self.stop if (i := tail.find(s)) >= 0]
            if hits:
                self.text = self.text[:start] + tail[: min(hits)]
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


def _decode_stream(tokenizer, skip_special_tokens: bool):
    """``(rust tokenizer, DecodeStream)`` for a fast tokenizer whose ``decode`` is the Rust decode itself (no clean-up
    of spaces), else ``(None, None)``."""
    rust = getattr(tokenizer, "_tokenizer", None)
    if rust is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None, None
    try:
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream
    except ImportError:  # tokenizers older than 0.21
        return None, None
    if not isinstance(rust, Tokenizer):
        return None, None
    return rust, DecodeStream(skip_special_tokens=skip_special_tokens)
