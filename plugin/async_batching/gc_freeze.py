"""Python's cyclic garbage collector kept away from what start-up built, while engines run.

torch and transformers alone leave about half a million tracked Python objects (a full collection of them takes
0.2 s on the 2-core CPU machine), and compiling a model (dynamo's guards and graphs, inductor's code) adds more. A run
allocates many small objects (token lists, plans, results), so the collector runs often, and a full collection walks
all of them in the engine's host thread, where the async step has only milliseconds to hide its work behind the GPU.
After start-up, ``engine_started`` moves every tracked object to the permanent generation (``gc.freeze``, as vLLM
does after capturing its graphs); collections then walk only what the run itself allocates. Frozen objects are still
freed when their reference count drops to zero; only cycles among them (start-up's cyclic garbage included: a full
collection first would cost those 0.2 s for every engine built) wait until the last engine closes (``gc.unfreeze``).
Measured on W1 (H200): one full collection (12 ms) in a timed run without the freeze; with it, +4.8% in one run,
about run-to-run noise (``docs/results/bench_w1_h200_s6.md``).
"""

from __future__ import annotations

import contextlib
import gc
import threading

FREEZE = True  # recipes/bench/variants.py's ours_async_gc turns it off to show what it gives
# re-entrant: a collection made while it is held (ours, or one the allocator triggers) may free a dropped engine,
# whose finalizer calls engine_closed in the same thread
_lock = threading.RLock()
_live = 0  # engines started with the freeze and not yet closed


def engine_started() -> bool:
    """Freeze what exists now (after a collection of the young generations); True if the caller must call
    ``engine_closed`` later."""
    global _live
    if not FREEZE:
        return False
    with _lock:
        gc.collect(1)
        gc.freeze()
        _live += 1
    return True


def engine_closed() -> None:
    """One engine that froze is gone; the last one gives the frozen objects back to the collector."""
    global _live
    with _lock:
        _live = max(0, _live - 1)
        if _live == 0:
            gc.unfreeze()


def collect_all() -> int:
    """A full collection that also walks what engines froze; returns the number of objects found unreachable.

    An engine dropped without ``close`` whose objects sit in a reference cycle (an exception kept with its traceback
    is enough) was frozen with everything else when it, or a later engine, started: its KV cache and graphs stay
    allocated until the last engine closes, and a plain ``gc.collect()`` does not free them. A new engine sizing its
    cache from free memory calls this first (``ModelRunner._auto_num_blocks``), so a dropped engine's memory counts
    as free. It costs one full collection (~0.2 s on the 2-core CI machine): start-up only, never inside a run. What
    survives is frozen again while engines live."""
    with _lock:
        frozen = gc.get_freeze_count() > 0
        if frozen:
            gc.unfreeze()
        found = gc.collect()
        if frozen and _live:
            gc.freeze()
    return found


@contextlib.contextmanager
def no_collection():
    """No automatic collection inside, after a full one on entry (``collect_all``): for CUDA graph capture. A
    collection there could free an engine dropped without ``close()`` (its finalizers release device memory and
    restore its model's weights), and freeing or syncing in the middle of a capture invalidates it; torch collects
    before a capture, but not what is frozen."""
    collect_all()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def live_engines() -> int:
    return _live
