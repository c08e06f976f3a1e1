"""``fastloss bench``: time every kernel on every backend against the NumPy baseline.

What is measured
----------------
Each *workload* is one public function (``fl.cross_entropy`` ...) in one mode -- ``fwd``
(the loss only), ``fwd+grad`` (loss and gradient in one fused call) or ``bwd`` (the
softmax/log-softmax vector-Jacobian products) -- on one shape and dtype.  Every workload is
called through the public API with ``backend=NAME``, so the numbers include argument
validation and dispatch: they are what a user gets.  For each workload and backend:

time
    Best of ``k`` timed batches after a warm-up call (the warm-up also compiles Numba
    kernels, faults in output pages, and provides the result checked against NumPy).  A
    batch repeats the call enough times to last ``min_batch`` seconds, so that the clock's
    resolution does not matter for tiny shapes.  The minimum, not the mean, is reported: on a
    shared machine noise only ever adds time.
GB/s
    ``bytes_moved / time`` with ``bytes_moved`` = every input read once plus every output
    written once (the logits, the int64 targets, the gradient, the loss).  A kernel that
    reads its input twice (max pass, then exp pass) is not credited for the second read: this
    is the traffic an ideal fused kernel needs.
speedup
    ``time(numpy) / time(backend)``.  ``numpy`` always runs, as the baseline.
memcpy share
    ``GB/s(backend) / GB/s(np.copyto)`` where the copy moves the same traffic --
    ``bytes_moved / 2`` bytes read and as many written -- in the same run, timed the same way.
    An ideal streaming kernel reaches ~100 %; cache-resident shapes measure cache bandwidth on
    both sides.  ``np.copyto`` is single threaded, so a kernel using several cores can exceed
    100 %.
alloc
    Peak of ``tracemalloc`` during one call: memory the call allocates beyond its inputs and
    preallocated outputs (NumPy temporaries, fresh result arrays).  tracemalloc sees every
    NumPy array allocation made from Python, but not C-level ``malloc`` inside a compiled
    kernel (Numba's ``np.empty`` in ``nopython`` mode, a Cython scratch buffer): those kernels
    are designed to allocate nothing per element, and the number is a lower bound for them.
check
    The backend's result (loss, gradient, ...) compared with the NumPy backend's on the same
    inputs (float32: rtol 1e-4, atol 1e-5 of the largest magnitude; float64: 1e-9 / 1e-10).
    A mismatch is printed, recorded in the JSON, and makes the command exit with status 1.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

__all__ = ["add_arguments", "run", "KERNELS", "make_case", "Case", "outputs", "compare", "SCHEMA"]

SCHEMA = "fastloss-bench/1"

_CPU_BACKENDS = ("numpy", "numba", "cython")


# ============================================================================ cases
@dataclass
class Case:
    """One workload's inputs, ready to call.

    ``call(backend)`` runs the public function on ``backend`` and returns its result;
    ``inputs`` holds the arrays (for peers such as PyTorch); ``nbytes`` is the traffic an ideal
    kernel needs: every input read once plus every output written once.
    """

    function: str
    mode: str
    shape: tuple
    dtype: np.dtype
    inputs: dict
    nbytes: int
    call: Callable[[str], Any]
    note: str = ""


@dataclass(frozen=True)
class Kernel:
    function: str  # the public name, fl.<function>
    kind: str  # "rowwise" (N, C) with classes last, or "elementwise" (R, K)
    modes: tuple  # subset of ("fwd", "fwd+grad", "bwd")
    build: Callable = field(repr=False)


def _fl():
    import fastloss

    return fastloss


def _normal(rng, shape, dt, scale=1.0):
    x = rng.standard_normal(shape, dtype=dt)
    if scale != 1.0:
        x *= dt.type(scale)
    return x


def _uniform(rng, shape, dt, lo=0.0, hi=1.0):
    u = rng.random(shape, dtype=dt)
    if (lo, hi) != (0.0, 1.0):
        u *= dt.type(hi - lo)
        u += dt.type(lo)
    return u


def _row_softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e


# Each builder: (rng, shape, dtype, mode, reuse) -> Case.  ``reuse`` passes a preallocated
# ``grad_out`` / ``out`` buffer, as a training loop would (the fast path: a fresh 262 MB
# gradient costs page faults on every call).
def _b_logsumexp(rng, shape, dt, mode, reuse):
    x = _normal(rng, shape, dt, 3.0)
    fl = _fl()
    return Case("logsumexp", mode, shape, dt, {"x": x}, x.nbytes + shape[0] * dt.itemsize,
                lambda b: fl.logsumexp(x, backend=b))


def _b_softmax_like(name):
    def build(rng, shape, dt, mode, reuse):
        x = _normal(rng, shape, dt, 3.0)
        out = np.empty_like(x) if reuse else None
        f = getattr(_fl(), name)
        return Case(name, mode, shape, dt, {"x": x}, 2 * x.nbytes,
                    lambda b: f(x, out=out, backend=b), "out= reused" if reuse else "")

    return build


def _b_softmax_backward(name):
    def build(rng, shape, dt, mode, reuse):
        x = _normal(rng, shape, dt, 3.0)
        y = _row_softmax(x) if name == "softmax_backward" else x - np.log(np.exp(x).sum(1, keepdims=True))
        g = _normal(rng, shape, dt)
        f = getattr(_fl(), name)
        return Case(name, mode, shape, dt, {"grad": g, "y": y}, 3 * x.nbytes, lambda b: f(g, y, backend=b))

    return build


def _loss_case(name, mode, shape, dt, inputs, reuse, n_grad_outputs=1, grad_out_ok=True):
    """A loss called as ``fl.<name>(*inputs)`` with ``return_grad`` for ``fwd+grad``."""
    f = getattr(_fl(), name)
    args = tuple(inputs.values())
    first = args[0]
    nbytes = sum(a.nbytes for a in args) + dt.itemsize  # + the scalar loss
    note = ""
    if mode == "fwd":
        call = lambda b: f(*args, backend=b)  # noqa: E731
    else:
        nbytes += n_grad_outputs * first.nbytes
        if reuse and grad_out_ok:
            gout = np.empty_like(first)
            note = "grad_out reused"
            call = lambda b: f(*args, return_grad=True, grad_out=gout, backend=b)  # noqa: E731
        else:
            call = lambda b: f(*args, return_grad=True, backend=b)  # noqa: E731
    return Case(name, mode, shape, dt, inputs, nbytes, call, note)


def _b_cross_entropy(rng, shape, dt, mode, reuse):
    x = _normal(rng, shape, dt, 3.0)
    t = rng.integers(0, shape[1], shape[0], dtype=np.int64)
    return _loss_case("cross_entropy", mode, shape, dt, {"logits": x, "target": t}, reuse)


def _b_bce_logits(rng, shape, dt, mode, reuse):
    z = _normal(rng, shape, dt, 3.0)
    y = (rng.random(shape, dtype=dt) < 0.5).astype(dt)
    return _loss_case("binary_cross_entropy_with_logits", mode, shape, dt, {"logits": z, "target": y}, reuse)


def _b_bce(rng, shape, dt, mode, reuse):
    p = _uniform(rng, shape, dt, 0.01, 0.99)
    y = _uniform(rng, shape, dt)
    return _loss_case("binary_cross_entropy", mode, shape, dt, {"probs": p, "target": y}, reuse)


def _b_kl_div(rng, shape, dt, mode, reuse):
    x = np.log(_row_softmax(_normal(rng, shape, dt)))
    t = _row_softmax(_normal(rng, shape, dt))
    return _loss_case("kl_div", mode, shape, dt, {"input": x, "target": t}, reuse)


def _b_mse(rng, shape, dt, mode, reuse):
    return _loss_case("mse_loss", mode, shape, dt,
                      {"input": _normal(rng, shape, dt), "target": _normal(rng, shape, dt)}, reuse)


def _b_gaussian_nll(rng, shape, dt, mode, reuse):
    inputs = {"input": _normal(rng, shape, dt), "target": _normal(rng, shape, dt),
              "var": _uniform(rng, shape, dt, 0.5, 1.5)}
    # the gradient is the pair (d_input, d_var); gaussian_nll_loss takes no grad_out
    return _loss_case("gaussian_nll_loss", mode, shape, dt, inputs, reuse, n_grad_outputs=2, grad_out_ok=False)


KERNELS: dict[str, Kernel] = {k.function: k for k in (
    Kernel("logsumexp", "rowwise", ("fwd",), _b_logsumexp),
    Kernel("softmax", "rowwise", ("fwd",), _b_softmax_like("softmax")),
    Kernel("log_softmax", "rowwise", ("fwd",), _b_softmax_like("log_softmax")),
    Kernel("softmax_backward", "rowwise", ("bwd",), _b_softmax_backward("softmax_backward")),
    Kernel("log_softmax_backward", "rowwise", ("bwd",), _b_softmax_backward("log_softmax_backward")),
    Kernel("cross_entropy", "rowwise", ("fwd", "fwd+grad"), _b_cross_entropy),
    Kernel("binary_cross_entropy_with_logits", "elementwise", ("fwd", "fwd+grad"), _b_bce_logits),
    Kernel("binary_cross_entropy", "elementwise", ("fwd", "fwd+grad"), _b_bce),
    Kernel("kl_div", "elementwise", ("fwd", "fwd+grad"), _b_kl_div),
    Kernel("mse_loss", "elementwise", ("fwd", "fwd+grad"), _b_mse),
    Kernel("gaussian_nll_loss", "elementwise", ("fwd", "fwd+grad"), _b_gaussian_nll),
)}


def make_case(function, mode, shape, dtype, rng=None, reuse=True) -> Case:
    """Build the inputs of one workload (also used by the pytest-benchmark suite in ``bench/``)."""
    k = KERNELS[function]
    if mode not in k.modes:
        raise ValueError(f"mode: expected one of {k.modes} for {function}, found {mode!r}")
    rng = np.random.default_rng(0) if rng is None else rng
    return k.build(rng, tuple(shape), np.dtype(dtype), mode, reuse)


# ============================================================================ checking
def outputs(result) -> list:
    """Flatten a result (scalar, array, ``(loss, grad)``, ``(loss, (d_in, d_var))``) into a
    list of NumPy array copies, so that a later call writing the same ``grad_out`` buffer
    cannot change what was recorded."""
    if isinstance(result, (tuple, list)):
        return [a for r in result for a in outputs(r)]
    return [np.array(result, copy=True)]


def compare(ref: list, got: list, dtype) -> tuple[bool, float]:
    """Compare flattened results; return ``(ok, max_err)`` with ``max_err`` the largest
    absolute difference relative to the largest reference magnitude of that output.

    float32 passes within rtol 1e-4 plus 1e-5 of the output's largest magnitude, float64 within
    1e-9 plus 1e-10: loose enough for a different (correct) summation order or exp, tight
    enough that a wrong kernel cannot pass.  Non-finite entries must match exactly.
    """
    rtol, atol = (1e-4, 1e-5) if np.dtype(dtype) == np.float32 else (1e-9, 1e-10)
    if len(ref) != len(got):
        return False, math.inf
    worst, ok = 0.0, True
    for r, g in zip(ref, got):
        r = np.asarray(r, dtype=np.float64)
        g = np.asarray(g, dtype=np.float64)
        if r.shape != g.shape:
            return False, math.inf
        fin = np.isfinite(r)
        if not np.array_equal(fin, np.isfinite(g)) or not np.array_equal(r[~fin], g[~fin], equal_nan=True):
            return False, math.inf
        if not fin.any():
            continue
        rf, gf = r[fin], g[fin]
        scale = float(np.max(np.abs(rf))) or 1.0
        diff = np.abs(gf - rf)
        worst = max(worst, float(np.max(diff)) / scale)
        ok &= bool(np.all(diff <= rtol * np.abs(rf) + atol * scale))
    return ok, worst


# ============================================================================ workload sets
f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
CE, LSE = "cross_entropy", "logsumexp"
BCEL, BCE = "binary_cross_entropy_with_logits", "binary_cross_entropy"

# (function, mode, shape, dtype, reuse)
_FULL = [
    (CE, "fwd+grad", (2048, 32000), f32, True),  # an LLM vocabulary, the headline workload
    (CE, "fwd+grad", (2048, 32000), f32, False),  # the same allocating a fresh gradient
    (CE, "fwd", (2048, 32000), f32, True),
    (CE, "fwd+grad", (8192, 1000), f32, True),
    (CE, "fwd+grad", (262144, 10), f32, True),
    (CE, "fwd+grad", (8192, 1000), f64, True),
    (LSE, "fwd", (2048, 32000), f32, True),
    (LSE, "fwd", (8192, 1000), f64, True),
    ("softmax", "fwd", (8192, 1000), f32, True),
    ("log_softmax", "fwd", (8192, 1000), f32, True),
    ("softmax", "fwd", (8192, 1000), f64, True),
    ("softmax_backward", "bwd", (8192, 1000), f32, True),
    ("log_softmax_backward", "bwd", (8192, 1000), f32, True),
    (BCEL, "fwd+grad", (4096, 4096), f32, True),  # 16M elements
    (BCEL, "fwd", (4096, 4096), f32, True),
    (BCEL, "fwd+grad", (2048, 2048), f64, True),
    (BCE, "fwd+grad", (2048, 2048), f32, True),
    ("kl_div", "fwd+grad", (2048, 2048), f32, True),
    ("mse_loss", "fwd+grad", (4096, 4096), f32, True),
    ("mse_loss", "fwd+grad", (2048, 2048), f64, True),
    ("gaussian_nll_loss", "fwd+grad", (2048, 2048), f32, True),
]

_QUICK = [
    (CE, "fwd+grad", (512, 32000), f32, True),
    (CE, "fwd+grad", (4096, 1000), f32, True),
    (CE, "fwd+grad", (65536, 10), f32, True),
    (CE, "fwd+grad", (2048, 1000), f64, True),
    (LSE, "fwd", (512, 32000), f32, True),
    ("softmax", "fwd", (4096, 1000), f32, True),
    ("log_softmax", "fwd", (4096, 1000), f32, True),
    (BCEL, "fwd+grad", (2048, 2048), f32, True),
    (BCE, "fwd+grad", (1024, 1024), f32, True),
    ("kl_div", "fwd+grad", (1024, 1024), f32, True),
    ("mse_loss", "fwd+grad", (2048, 2048), f32, True),
    ("mse_loss", "fwd+grad", (1024, 1024), f64, True),
    ("gaussian_nll_loss", "fwd+grad", (1024, 1024), f32, True),
]

# every kernel and mode once, on shapes small enough for a test suite
_TINY = [(fn, mode, (16, 50) if k.kind == "rowwise" else (24, 40), f32, True)
         for fn, k in KERNELS.items() for mode in k.modes] + [
    (CE, "fwd+grad", (16, 50), f64, True),
    (CE, "fwd+grad", (16, 50), f32, False),
    (BCEL, "fwd+grad", (24, 40), f64, True),
]


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


# ============================================================================ machine
def _read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _version(dist):
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def machine_info() -> dict:
    """CPU model, cores, SIMD flags, memory and library versions (nothing is imported or compiled)."""
    cpuinfo = _read("/proc/cpuinfo")
    model, flags = None, set()
    for line in cpuinfo.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "Hardware") and model is None:
            model = val.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(val.split())
    if not model:
        model = platform.processor() or platform.machine()
    mem = None
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    fl = _fl()
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "simd": sorted(f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512dq", "neon", "asimd") if f in flags),
        "memory_bytes": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "fastloss": getattr(fl, "__version__", _version("fastloss")),
        "numpy": np.__version__,
        "numba": _version("numba"),
        "scipy": _version("scipy"),
        "cython": _version("Cython"),
    }


def _threads_info(fl) -> dict:
    info = {"requested": None}
    get = getattr(fl, "get_num_threads", None)
    if get is not None:
        try:
            info["fastloss"] = get()
        except Exception:
            pass
    if "numba" in sys.modules:  # only report it if a backend imported it
        nb = sys.modules["numba"]
        try:
            info["numba"] = nb.get_num_threads()
            info["numba_threading_layer"] = nb.threading_layer()  # raises before any parallel run
        except Exception:
            pass
    return info


# ============================================================================ progress
class Progress:
    """A plain-text progress bar on stderr: ``[#####.....] 12/40  0:31  label``.

    Redrawn in place with a carriage return, so it is shown only on a terminal (or when
    forced); a log file would collect every frame.
    """

    def __init__(self, total: int, enabled: bool, stream=None):
        self.total, self.enabled, self.done = max(total, 1), enabled, 0
        self.stream = sys.stderr if stream is None else stream
        self.start = time.perf_counter()
        self._width = 0

    def update(self, label: str) -> None:
        """Show ``label`` as the step now running (``done`` steps finished)."""
        if not self.enabled:
            return
        cols = shutil.get_terminal_size((100, 20)).columns
        frac = self.done / self.total
        bar = "#" * int(frac * 20)
        el = int(time.perf_counter() - self.start)
        head = f"[{bar:.<20}] {self.done}/{self.total} {el // 60}:{el % 60:02d}  "
        line = (head + label)[: max(cols - 1, 20)]
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def step(self) -> None:
        self.done += 1

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()


# ============================================================================ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``fastloss bench`` to ``parser`` (the ``bench`` subcommand)."""
    parser.description = (
        "Time every kernel on every available CPU backend against the NumPy baseline, and "
        "print time, GB/s, speedup vs NumPy, share of the memory-copy bandwidth measured in "
        "the same run, and the memory each call allocates.")
    parser.add_argument("--quick", action="store_true",
                        help="smaller shapes and fewer repeats: the whole run takes under a minute")
    parser.add_argument("--backend", action="append", metavar="NAME",
                        help="backend to time (repeatable, or a comma list); default: every "
                             "available CPU backend. numpy always runs, as the baseline")
    parser.add_argument("--json", metavar="PATH", help="write machine info and every row to PATH as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG chart (speedup vs NumPy, share of "
                                                       "memcpy bandwidth) to PATH; needs matplotlib")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for the compiled backends "
                                                                 "(fl.set_num_threads)")
    parser.add_argument("--repeat", type=int, metavar="K", help="best of K timed batches (default 7, --quick 5)")
    parser.add_argument("-k", "--filter", metavar="TEXT", action="append",
                        help="only workloads with each word of TEXT as a word of their name, or its "
                             "start up to a '_' (cross_entropy does not select binary_cross_entropy; "
                             "binary selects both binary losses; repeatable)")
    parser.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                        help="progress bar on stderr: auto shows it when stderr is a terminal")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    # tiny shapes covering every kernel and mode once: for the test suite
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


class _UsageError(Exception):
    pass


def _select_backends(fl, requested) -> tuple[list, dict]:
    statuses = fl.backends()
    if not requested:
        names = [n for n in _CPU_BACKENDS if n in statuses and statuses[n].available]
        skipped = {n: statuses[n].reason for n in _CPU_BACKENDS if n in statuses and not statuses[n].available}
    else:
        names, skipped = [], {}
        for item in requested:
            for n in (s.strip() for s in item.split(",")):
                if not n or n in names:
                    continue
                if n not in statuses:
                    raise _UsageError(f"--backend: expected one of {', '.join(statuses)}, found {n!r}")
                st = statuses[n]
                if not st.available:
                    raise _UsageError(f"--backend: backend {n!r} is unavailable: {st.reason}. "
                                      f"To install it: {st.install}")
                names.append(n)
    names = ["numpy"] + [n for n in names if n != "numpy"]
    return names, skipped


def _matches(text, label):
    """Whether ``--filter TEXT`` selects the workload ``label``: each word of TEXT is a word
    of the label or its start up to a ``_`` (so ``cross_entropy`` selects ``cross_entropy``
    but not ``binary_cross_entropy``, ``binary`` selects both binary losses, ``fwd`` selects
    ``fwd`` but not ``fwd+grad``)."""
    words = label.split()
    return all(any(w == t or w.startswith(t + "_") for w in words) for t in text.split())


def _workloads(args):
    base = _TINY if args.tiny else _QUICK if args.quick else _FULL
    out = []
    for fn, mode, shape, dt, reuse in base:
        label = f"{fn} {mode} {'x'.join(map(str, shape))} {dt.name}"
        if not reuse and mode == "fwd+grad":
            label += " (new grad)"
        if args.filter and not any(_matches(f, label) for f in args.filter):
            continue
        out.append((label, fn, mode, shape, dt, reuse))
    return out


def _fmt_time(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.3f} s"


def _fmt_bytes(n):
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _fmt(v, spec):
    return "-" if v is None else spec.format(v)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _table(rows) -> str:
    head = ("workload", "copy GB/s", "backend", "time", "GB/s", "vs numpy", "memcpy", "alloc", "alloc/np", "check")
    lines, prev = [], None
    for r in rows:
        first = r["workload"] != prev
        prev = r["workload"]
        check = ("ok" if r["ok"] else f"ERROR {r['error']}" if r["error"] else f"MISMATCH {r['max_err']:.1e}")
        lines.append((
            r["workload"] if first else "", f"{r['memcpy_gbps']:.3g}" if first else "", r["backend"],
            _fmt_time(r["seconds"]), _fmt(r["gbps"], "{:.3g}"), _fmt(r["speedup_vs_numpy"], "{:.2f}x"),
            _fmt(r["memcpy_share"] and 100 * r["memcpy_share"], "{:.0f}%"), _fmt_bytes(r["alloc_bytes"]),
            _fmt(r["alloc_vs_numpy"], "{:.2f}x"), check[:120]))
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    left = {0, 2, 9}

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [fmt(head), fmt(["-" * w for w in widths])]
    for i, l in enumerate(lines):
        if l[0] and i:
            out.append("")
        out.append(fmt(l))
    return "\n".join(out)


def _run_one(case, backend, ref, timing, t_copy) -> dict:
    """Warm up, check against ``ref`` (NumPy's outputs; None for NumPy itself), time, trace allocations."""
    call = (lambda c=case.call, b=backend: c(b))
    t0 = time.perf_counter()
    got = outputs(call())  # warm-up: compiles, faults pages in; its result is checked
    first = time.perf_counter() - t0
    ok, max_err = (True, 0.0) if ref is None else compare(ref, got, case.dtype)
    sec, reps, number = measure(call, timing)
    return {
        "seconds": sec, "repeats": reps, "number": number, "gbps": case.nbytes / sec / 1e9,
        "memcpy_share": t_copy / sec, "alloc_bytes": alloc_peak(call),
        "ok": ok, "max_err": max_err, "first_call_seconds": first, "_outputs": got,
    }


def run(args) -> int:
    """Run the benchmark described by the parsed ``args``; print the table; return the exit status.

    0: every backend agreed with NumPy; 1: some result mismatched (the table says which);
    2: a usage error (unknown or unavailable backend, matplotlib missing for ``--plot``).
    """
    fl = _fl()
    err = sys.stderr
    try:
        backends, skipped = _select_backends(fl, getattr(args, "backend", None))
        if args.threads is not None and args.threads < 1:
            raise _UsageError(f"--threads: expected a positive integer, found {args.threads}")
        if args.repeat is not None and args.repeat < 1:
            raise _UsageError(f"--repeat: expected a positive integer, found {args.repeat}")
        if args.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise _UsageError("--plot needs matplotlib: pip install matplotlib (or: pip install \"fastloss[bench]\")")
        workloads = _workloads(args)
        if not workloads:
            raise _UsageError(f"--filter: no workload name matches any of {args.filter}")
    except _UsageError as e:
        print(f"fastloss bench: error: {e}", file=err)
        return 2

    if args.threads is not None:
        fl.set_num_threads(args.threads)
    timing = _TIMINGS["tiny" if args.tiny else "quick" if args.quick else "full"]
    if args.repeat is not None:
        timing = _Timing(args.repeat, min(timing.min_repeat, args.repeat), timing.min_batch,
                         timing.budget if args.repeat <= timing.repeat else math.inf)
    show = args.progress == "always" or (args.progress == "auto" and err.isatty())
    progress = Progress(len(workloads) * (len(backends) + 2), show, err)
    rng = np.random.default_rng(args.seed)
    rows, t_start = [], time.perf_counter()

    try:
        for label, fn, mode, shape, dt, reuse in workloads:
            progress.update(f"{label}: preparing inputs")
            case = make_case(fn, mode, shape, dt, rng, reuse)
            progress.step()
            progress.update(f"{label}: np.copyto baseline")
            t_copy = memcpy_time(case.nbytes, timing)
            progress.step()
            ref = base = None
            for b in backends:
                progress.update(f"{label}: {b}")
                row = {"workload": label, "function": fn, "mode": mode, "shape": list(shape),
                       "dtype": dt.name, "note": case.note, "backend": b, "bytes_moved": case.nbytes,
                       "memcpy_seconds": t_copy, "memcpy_gbps": case.nbytes / t_copy / 1e9, "error": None}
                try:
                    row.update(_run_one(case, b, ref, timing, t_copy))
                except Exception as exc:  # report it, keep benchmarking the other backends
                    row.update(seconds=None, repeats=0, number=0, gbps=None, memcpy_share=None,
                               alloc_bytes=None, ok=False, max_err=None, first_call_seconds=None,
                               error=f"{type(exc).__name__}: {exc}")
                if b == "numpy":
                    base = row
                    ref = row.pop("_outputs", None)
                row.pop("_outputs", None)
                row["speedup_vs_numpy"] = _ratio(base and base["seconds"], row["seconds"])
                row["alloc_vs_numpy"] = _ratio(row["alloc_bytes"], base and base["alloc_bytes"])
                rows.append(row)
                progress.step()
            del case, ref
            gc.collect()
    finally:
        progress.close()

    elapsed = time.perf_counter() - t_start
    info = machine_info()
    threads = _threads_info(fl)
    threads["requested"] = args.threads
    print(f"fastloss bench ({'tiny' if args.tiny else 'quick' if args.quick else 'full'}): "
          f"{info['cpu_model']}, {info['cpus_usable']} usable cores, threads={threads.get('fastloss', threads.get('numba', '?'))}; "
          f"numpy {info['numpy']}, numba {info['numba']}")
    print("time: best of k after warm-up | GB/s: inputs read + outputs written once | copy GB/s: np.copyto "
          "moving the same bytes | memcpy: GB/s / copy GB/s | alloc: tracemalloc peak of one call\n"
          "gradients go to a reused grad_out (softmax: out=) except rows marked (new grad)")
    if "cuda" in backends:
        print("cuda: NumPy inputs are offloaded, so its times include the host<->device copies")
    if skipped:
        print("not run: " + "; ".join(f"{n} ({why})" for n, why in skipped.items()))
    print()
    print(_table(rows))
    firsts = {b: sum(r["first_call_seconds"] or 0.0 for r in rows if r["backend"] == b) for b in backends}
    print(f"\n{len(rows)} measurements in {elapsed:.1f} s; first calls (JIT compile or cache load, page "
          "faults): " + ", ".join(f"{b} {t:.1f} s" for b, t in firsts.items()))
    if firsts.get("numba", 0.0) > 10.0:
        print("(most of the numba first-call time is JIT compilation; `fastloss warmup` compiles and caches "
              "every kernel once, and later runs load them from the cache)")
    bad = [r for r in rows if not r["ok"]]
    if bad:
        print(f"FAILED (an error, or a result that disagrees with numpy) in {len(bad)} row(s):", file=err)
        for r in bad:
            print(f"  {r['workload']} [{r['backend']}]: " +
                  (r["error"] or f"max relative error {r['max_err']:.3g} vs numpy"), file=err)

    if args.json:
        doc = {
            "schema": SCHEMA,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "mode": "tiny" if args.tiny else "quick" if args.quick else "full",
            "elapsed_seconds": elapsed,
            "machine": info,
            "threads": threads,
            "backends": list(backends),
            "not_run": skipped,
            "method": {
                "time": f"best of up to {timing.repeat} batches after one warm-up call; gc disabled",
                "bytes_moved": "every input read once + every output written once",
                "memcpy": "np.copyto moving the same total bytes (half read, half written), same timing",
                "alloc": "tracemalloc peak during one call (NumPy/Python allocations; C mallocs "
                         "inside compiled kernels are not traced)",
            },
            "rows": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                     for r in rows],
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, info, threads, args.plot)
        print(f"wrote {args.plot}")
    return 1 if bad else 0


# ============================================================================ plot
_COLORS = {"numpy": "#8c8c8c", "numba": "#1f77b4", "cython": "#ff7f0e", "cuda": "#2ca02c"}


def plot(rows, info, threads, path) -> None:
    """Two panels sharing the workload axis: speedup vs NumPy (log scale) and % of the memcpy
    bandwidth, one bar per backend.  Uses the Agg canvas directly (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    by = {(r["workload"], r["backend"]): r for r in rows}
    rivals = [b for b in backends if b != "numpy"]  # numpy is the 1x line of the speedup panel
    n, nb = len(workloads), len(backends)
    fig = Figure(figsize=(14, 1.8 + 0.2 * n * max(nb, 2)), layout="constrained")
    FigureCanvasAgg(fig)
    ax_s, ax_m = fig.subplots(1, 2, sharey=True)
    ax_s.set_xscale("log")
    ys = np.arange(n)

    def get(w, b, key, scale=1.0):
        r = by.get((w, b))
        return np.nan if r is None or r[key] is None else scale * r[key]

    # speedup: bars grow from the 1x line, right = faster than NumPy, left = slower
    h = 0.8 / max(len(rivals), 1)
    speeds = []
    for j, b in enumerate(rivals):
        ypos = ys + (j - (len(rivals) - 1) / 2) * h
        sp = np.array([get(w, b, "speedup_vs_numpy") for w in workloads])
        speeds.extend(sp[np.isfinite(sp)])
        ax_s.barh(ypos, sp - 1.0, h, left=1.0, label=b, color=_COLORS.get(b))
        for y, v, w in zip(ypos, sp, workloads):
            if np.isfinite(v):
                bad = not by[(w, b)]["ok"]
                txt = f"{v:.0f}x" if v >= 10 else f"{v:.1f}x" if v >= 1 else f"{v:.2f}x" if v >= 0.1 else f"{v:.2g}x"
                ax_s.text(v, y, f" {txt} " + ("MISMATCH " if bad else ""), va="center",
                          ha="left" if v >= 1 else "right", fontsize=7, color="red" if bad else "black")
    if not rivals:
        ax_s.text(1.0, n / 2, "only the NumPy baseline ran", ha="center", va="center")
    lo = min([0.5] + [v / 2 for v in speeds])
    hi = max([2.0] + [v * 2.5 for v in speeds])
    ax_s.set_xlim(lo, hi)
    # share of the copy bandwidth, every backend
    h = 0.8 / nb
    for j, b in enumerate(backends):
        ypos = ys + (j - (nb - 1) / 2) * h
        ax_m.barh(ypos, [get(w, b, "memcpy_share", 100.0) for w in workloads], h, label=b, color=_COLORS.get(b))
    ax_s.axvline(1.0, color="black", lw=0.8)
    ax_s.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax_s.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax_m.set_xlim(0, max(105.0, ax_m.get_xlim()[1]))
    ax_s.set_xlabel("speedup vs NumPy backend (x, log scale; higher is better)")
    ax_m.axvline(100.0, color="black", lw=0.8, ls="--")
    ax_m.set_xlabel("% of np.copyto bandwidth on the same bytes (dashed: a 1-thread copy)")
    ax_s.set_yticks(ys, workloads, fontsize=8)
    ax_s.invert_yaxis()
    for ax in (ax_s, ax_m):
        ax.grid(axis="x", alpha=0.3)
    ax_m.legend(loc="lower right", fontsize=8)
    nthreads = threads.get("fastloss", threads.get("numba", "?"))
    fig.suptitle(f"fastloss bench: {info['cpu_model']}, {info['cpus_usable']} cores, threads={nthreads}, "
                 f"numpy {info['numpy']}, numba {info['numba']}", fontsize=10)
    fig.savefig(path, dpi=110)
