"""How every benchmark of fastloss times a call (:func:`time_calls`), tracemalloc peaks, the memcpy baseline."""
from __future__ import annotations

import gc
import math
import statistics
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
# The one timer of every benchmark here: ``fastloss bench`` (best of batches), bench/goals.py
# (single calls, best and median) and bench/gpu_check.py (CUDA events, through ``clock``).
# pytest-benchmark suites time with pytest-benchmark itself, on the same cases.
@dataclass(frozen=True)
class Timing:
    """What :func:`time_calls` measured; times in seconds per call."""

    best: float  # the fastest batch, per call
    median: float  # the median batch, per call
    cpu_per_wall: float  # process CPU time / wall time over the timed batches: cores kept busy
    reps: int  # batches timed
    number: int  # calls per batch
    first: float  # the warm-up call (compilation, cache load, page faults); 0 when none was made

    def as_dict(self) -> dict:
        return {"best": self.best, "median": self.median, "cpu_per_wall": self.cpu_per_wall,
                "reps": self.reps, "number": self.number, "first": self.first}


def _host_batch(fn, number):
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return time.perf_counter() - t0


def time_calls(fn, reps: int, *, min_reps: int | None = None, min_batch: float = 0.0,
               budget: float = math.inf, warmup: bool = True, batch=None,
               max_number: int = 100_000) -> Timing:
    """Time ``fn()``: an optional warm-up call, then up to ``reps`` batches of ``number`` calls.

    ``number`` is 1 unless one call is shorter than ``min_batch`` seconds (then enough calls
    to last that long: a timer's resolution and the loop's overhead stay small beside the
    batch).  After ``min_reps`` batches (default ``reps``) timing stops once ``budget`` seconds
    have passed.  The garbage collector is off while timing (as in :mod:`timeit`): a collection
    triggered by some other object's allocation is not the kernel's cost.

    ``batch(fn, number) -> seconds`` times one batch: the host's wall clock by default; a GPU
    benchmark passes one that records device events around the batch (the calls are
    asynchronous, the host clock would time their launch).
    """
    batch = _host_batch if batch is None else batch
    first = 0.0
    if warmup:
        gc.collect()
        first = batch(fn, 1)
    gc_on = gc.isenabled()
    gc.disable()
    try:
        number = 1
        if min_batch > 0:
            single = batch(fn, 1)
            if single < min_batch:
                number = min(max_number, math.ceil(min_batch / max(single, 1e-9)))
        ts = []
        c0, start = time.process_time(), time.perf_counter()
        for _ in range(max(1, reps)):
            ts.append(batch(fn, number) / number)
            if len(ts) >= (reps if min_reps is None else min_reps) and time.perf_counter() - start > budget:
                break
        cpu, wall = time.process_time() - c0, time.perf_counter() - start
    finally:
        if gc_on:
            gc.enable()
    return Timing(min(ts), statistics.median(ts), cpu / max(wall, 1e-12), len(ts), number, first)


def time_in_turns(fns: dict, reps: int, *, rounds: dict | None = None) -> dict:
    """Time already warmed-up callables in turns: ``reps`` rounds, each calling every ``fns``
    value once, in order (``rounds[name]``: that callable's rounds, when fewer).

    Returns ``{name: Timing}`` (one call per batch; ``first`` 0).  Why in turns: on a shared
    machine a noisy stretch lasts seconds, longer than one implementation's block of calls;
    timed in blocks one after another, one of two kernels can fall into it and their ratio
    move by 1.5x from run to run, while in turns every implementation sees the same minutes.
    The garbage collector is off while timing, as in :func:`time_calls`.
    """
    rounds = rounds or {}
    ts = {k: [] for k in fns}
    cpu = dict.fromkeys(fns, 0.0)
    gc_on = gc.isenabled()
    gc.disable()
    try:
        for i in range(max(1, reps)):
            for k, fn in fns.items():
                if i >= max(1, rounds.get(k, reps)):
                    continue
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                ts[k].append(time.perf_counter() - t0)
                cpu[k] += time.process_time() - c0
    finally:
        if gc_on:
            gc.enable()
    return {k: Timing(min(v), statistics.median(v), cpu[k] / max(sum(v), 1e-12), len(v), 1, 0.0)
            for k, v in ts.items()}


def measure(fn, timing: _Timing) -> tuple[float, int, int]:
    """``fastloss bench``'s timing of an already warmed-up ``fn``: best of batches, as
    ``(seconds per call, batches, calls per batch)``."""
    t = time_calls(fn, timing.repeat, min_reps=timing.min_repeat, min_batch=timing.min_batch,
                   budget=timing.budget, warmup=False, max_number=timing.max_number)
    return t.best, t.reps, t.number


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
