"""Shared pieces of the Lightning tests."""

from __future__ import annotations

import lightning as L


class KillAfter(L.Callback):
    """Dies like a killed job (KeyboardInterrupt, what Lightning sees on Ctrl-C / SIGINT) after ``n`` rows are written."""

    def __init__(self, n):
        self.n = n

    def on_generation_result(self, trainer, pl_module, record):
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt
