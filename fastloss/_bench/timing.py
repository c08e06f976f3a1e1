"""How ``fastloss bench`` times a call: best of batches, tracemalloc peaks, the memcpy baseline."""
from __future__ import annotations

import gc
import math
import time
import tracemalloc
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class _Timing:
    repeat: int  # best of this many batches ...
    min_repeat: int  # ... but at least this many when the budget runs out
    min_batch: float  # seconds: a batch repeats the call until it lasts this long
    budget: float  # seconds of timing per (workload, backend), after min_repeat batches
    max_number: int = 100_000


_TIMINGS = {
    "full": _Timing(repeat=7, min_repeat=3, min_batch=0.02, budget=2.0),
    "quick": _Timing(repeat=5, min_repeat=2, min_batch=0.01, budget=0.15),
    "tiny": _Timing(repeat=2, min_repeat=1, min_batch=0.0005, budget=0.01),
}


# ============================================================================ timing
def _timed(fn, number):
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def measure(fn, timing: _Timing) -> tuple[float, int, int]:
    """Best time per call of an already warmed-up ``fn``: ``(seconds, batches, calls per batch)``.

    The garbage collector is off while timing (as in :mod:`timeit`): a collection triggered
    by some other object's allocation is not the kernel's cost.
    """
    gc_on = gc.isenabled()
    gc.disable()
    try:
        single = _timed(fn, 1)  # calibration; also a valid warm sample
        number = 1 if single >= timing.min_batch else min(
            timing.max_number, math.ceil(timing.min_batch / max(single, 1e-9)))
        best = single if number == 1 else math.inf  # a 1-call batch is what we just timed
        reps, start = 0, time.perf_counter()
        while reps < timing.repeat:
            best = min(best, _timed(fn, number))
            reps += 1
            if reps >= timing.min_repeat and time.perf_counter() - start > timing.budget:
                break
        return best, reps, number
    finally:
        if gc_on:
            gc.enable()


def alloc_peak(fn) -> int:
    """Bytes allocated at the peak of one call of ``fn`` (its result included), by tracemalloc."""
    gc.collect()
    was = tracemalloc.is_tracing()
    if not was:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        r = fn()
        _, peak = tracemalloc.get_traced_memory()
        del r
    finally:
        if not was:
            tracemalloc.stop()
    return max(0, peak - base)


_copy_cache: dict[int, tuple[float, int]] = {}


def memcpy_time(nbytes: int, timing: _Timing) -> float:
    """Best time of ``np.copyto`` moving ``nbytes`` of traffic (``nbytes/2`` read, as many written)."""
    half = max(1, nbytes // 2)
    src = np.empty(half, np.uint8)
    src.fill(1)  # fault the pages in: the copy, not the first touch, is measured
    dst = np.empty_like(src)
    dst.fill(0)
    np.copyto(dst, src)
    t, _, _ = measure(lambda: np.copyto(dst, src), timing)
    return t
