"""Pinned host buffer pool: a ring of slots allocated once; each slot is guarded by CUDA events.

Invariants (which event guards which buffer):
- ``host_in`` of a slot is rewritten by the CPU only after ``h2d_done`` (recorded after its last host-to-device copy)
  has completed: ``acquire`` sleeps on that event.
- ``dev_in`` is overwritten by the next H2D copy only after ``compute_done`` of the step that last read it: the H2D
  stream waits on that event (a GPU-side wait, the CPU does not block).
- ``dev_tokens`` and ``dev_scores`` are rewritten by compute only after ``d2h_done`` of their last copy-out: the compute
  stream waits on it. ``dev_tokens`` is also read by the next step's carry-over gather, on the same compute stream.
- ``host_tokens``, ``host_logprobs`` and ``host_scores`` are read by the CPU only after ``d2h_done`` of their step:
  ``wait`` sleeps on that event.
On CPU there are no events: every operation has completed when it returns.
"""

from __future__ import annotations

from typing import Optional

import torch


def _event(device: torch.device) -> Optional[torch.cuda.Event]:
    # blocking=True: synchronize() sleeps instead of spinning, so a waiting CPU leaves its core to other threads.
    return torch.cuda.Event(blocking=True) if device.type == "cuda" else None


class BufferSlot:
    """Host and device buffers of one step in flight, and the events that order their reuse."""

    def __init__(self, capacity: int, max_rows: int, max_score_rows: int, device: torch.device):
        pin = device.type == "cuda"
        self.device = device
        self.host_in = torch.zeros(capacity, dtype=torch.int32, pin_memory=pin)
        self.host_in_np = self.host_in.numpy()
        self.dev_in = torch.zeros(capacity, dtype=torch.int32, device=device) if pin else self.host_in
        self.dev_tokens = torch.zeros(max_rows, dtype=torch.int32, device=device)
        self.host_tokens = torch.zeros(max_rows, dtype=torch.int32, pin_memory=pin) if pin else self.dev_tokens
        # Scored rows: (log-probability of the target token, 1.0 if it was the argmax else 0.0).
        self.dev_scores = torch.zeros(max_score_rows, 2, dtype=torch.float32, device=device)
        self.host_scores = torch.zeros(max_score_rows, 2, dtype=torch.float32, pin_memory=pin) if pin else self.dev_scores
        self.logprob_k = -1  # width of the logprob buffers (grown on demand, rarely)
        self.host_logprobs: Optional[torch.Tensor] = None
        self.h2d_done = _event(device)
        self.compute_done = _event(device)
        self.d2h_done = _event(device)
        self.used = False

    def logprob_buffer(self, k: int, rows: int) -> torch.Tensor:
        """Pinned float32 ``[rows, 1 + 2k]``: sampled logprob, top-k ids (as floats) and values."""
        if k > self.logprob_k:
            width = 1 + 2 * max(k, 4)
            self.host_logprobs = torch.zeros(rows, width, dtype=torch.float32, pin_memory=self.device.type == "cuda")
            self.logprob_k = max(k, 4)
        return self.host_logprobs


class PinnedBufferPool:
    """A ring of ``depth`` slots; depth must exceed the steps in flight (async: 1) by at least one."""

    def __init__(self, depth: int, capacity: int, max_rows: int, max_score_rows: int, device: torch.device):
        self.slots = [BufferSlot(capacity, max_rows, max_score_rows, device) for _ in range(depth)]
        self._next = 0

    def acquire(self) -> BufferSlot:
        slot = self.slots[self._next]
        self._next = (self._next + 1) % len(self.slots)
        if slot.used and slot.h2d_done is not None:
            slot.h2d_done.synchronize()
        slot.used = True
        return slot
