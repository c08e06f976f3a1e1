"""The speed and start-up goals of fastloss, measured in one run, with a verdict per goal.

The goals (portability issue): float32, the library's threads (2 on the development machine),
gradients into a reused ``grad_out``; *memcpy* is ``np.copyto`` of the same logits into a
preallocated array; the peers are JAX ``jit`` and PyTorch ``torch.compile`` (inductor, CPU):

=========================================  ===============  =====================  =================
workload                                   numba vs cython  best backend / memcpy  vs peers
=========================================  ===============  =====================  =================
cross_entropy fwd+grad 2048x32000          <= 1.15x         <= 1.2x                faster than both
cross_entropy fwd+grad 8192x1000           <= 1.15x         <= 1.5x                faster than both
cross_entropy fwd+grad 262144x10           <= 1.15x         <= 3x                  faster than both
logsumexp 2048x32000                       <= 1.15x         <= 0.8x                faster than both
binary_cross_entropy_with_logits fwd+grad  <= 1.15x         <= 2x                  faster than both
16M elements
float64, the same shapes                   <= 1.15x
start-up                                   ``import fastloss`` < 0.2 s; the first call with a warm
                                           Numba cache < 0.5 s; the first cython call < 10 ms;
                                           ``fastloss warmup`` (float32 + float64, C order) < 2 min
                                           (``--warmup``: compiles into an empty cache directory)
=========================================  =================================================

"Faster than both" is checked for each compiled backend ("both backends meet the table").

Method
------
* Each workload's inputs are built once; then, in this order and in the same process: the
  memcpy, the numpy backend, each compiled backend, the peers.  Every implementation gets
  one untimed warm-up call (Numba compilation or cache load, page faults of fresh outputs,
  JAX tracing and XLA compilation, inductor's compilation) whose result is checked against the numpy backend's, then
  ``--reps`` timed calls (numpy: half as many, at least 2): the memcpy, the numpy backend and
  the compiled backends in turns (``--reps`` rounds of one call each: their ratios, numba /
  cython and best / memcpy, come from the same minutes of a noisy machine -- timed in blocks,
  one after the other, a numba/cython ratio moved 1.0x -> 1.75x between runs), the peers
  after, each in a block of its own (their thread pools may keep spinning after a call).  The
  *best* time is used for the ratios -- on a shared machine noise only ever adds time -- and
  the median is reported too.
* ``cpu/wall`` is the process CPU time over the wall time of the timed calls: the number of
  cores the implementation kept busy on average.  JAX (XLA's CPU client) sizes its thread
  pool to every usable core and has no thread-count knob short of disabling multithreading,
  so the JAX comparison is at equal threads only when fastloss's thread count equals the
  machine's usable cores (true on the 2-core development machine); a mismatch is flagged.
* The JAX peer is written the idiomatic way -- ``jax.jit(jax.value_and_grad(loss))`` with
  ``loss = -mean(take_along_axis(jax.nn.log_softmax(x), t))``, integer targets,
  ``jax.block_until_ready`` -- on ``jax.device_put`` inputs.  It returns a fresh gradient
  each call (JAX arrays are immutable): that is what a JAX user gets.  Float32 only.
* The ``torch.compile`` peer is ``torch.compile(F.cross_entropy)`` (and the other functions'
  ``torch.nn.functional`` forms, ``fastloss._bench.peers``) with ``torch.autograd.grad`` of the
  loss, on zero-copy tensors of the same arrays, PyTorch's threads set to fastloss's.
  Float32 only.
* Start-up is measured in fresh Python processes (``sys.executable``, the same fastloss):
  the time of ``import numpy; import fastloss`` (numpy included: a user pays it), and the
  time of the first ``fl.cross_entropy(x, t, return_grad=True)`` on a 1000x1000 float32 input
  after import -- the default backend (``auto``, which picks ``numba`` when it imports) after
  a throwaway process has run the same call to warm Numba's on-disk cache, and
  ``backend="cython"``.  The median (and best) of ``--startup-runs`` processes is reported;
  the verdict uses the median.

Usage::

    python bench/goals.py                        # every goal: numba, cython, JAX, start-up
    python bench/goals.py --backend cython --dtype float32 ce
    python bench/goals.py --json goals.json      # every number, the machine and the verdicts
    python bench/goals.py --no-peers --no-startup  # the backends' throughput goals only
    python bench/goals.py --warmup               # also time `fastloss warmup` (minutes)

Positional ``names`` select workloads: ``ce``, ``lse`` and ``bce`` select a family, anything
else matches a substring of a workload's name (``2048x32000``) or key (``ce_8192x1000``).
The exit status is 1 when an implementation failed or disagreed with the numpy backend;
goals not met do not change it (they depend on the machine and its load).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import fastloss as fl
from fastloss import _bench
from fastloss._bench import timing as _timing
from fastloss._backends import usable_cores as _usable_cores
from fastloss._bench.peers import Unavailable
from fastloss._bench.peers import jax_callable as jax_peer
from fastloss._bench.peers import torch_callable as torch_peer
from fastloss._bench.timing import Timing

SCHEMA = "fastloss-goals/1"

COMPILED = ("numba", "cython")
BASELINES = ("memcpy", "numpy")
PEERS = ("jax", "torch.compile")
PEER = "jax"  # (the first peer; kept for callers of the earlier single-peer interface)
PEER_LABEL = {"jax": "JAX jit", "torch.compile": "torch.compile"}

NUMBA_MAX_VS_CYTHON = 1.15  # numba's time <= 1.15x cython's, every workload and dtype
IMPORT_MAX = 0.2  # seconds: import fastloss, numpy included
FIRST_CALL_MAX = 0.5  # seconds: first call with a warm Numba cache
CYTHON_FIRST_CALL_MAX = 0.010  # seconds: first cython call after import
WARMUP_MAX = 120.0  # seconds: fastloss warmup --dtype float32 --dtype float64 --layout C
STARTUP_SHAPE = (1000, 1000)
STARTUP_SUBJECT = f"fwd+grad {'x'.join(map(str, STARTUP_SHAPE))} float32"


# ============================================================================ workloads
@dataclass(frozen=True)
class Workload:
    """One goal workload: a fused call on a fixed shape, with its float32 goals.

    ``reduced`` is a shape ~100x smaller with the same class count (the same kernel path),
    used where only correctness matters (``--tiny``, ``pytest --benchmark-disable``).
    """

    key: str
    title: str
    function: str  # "cross_entropy", "logsumexp" or "bce_with_logits"
    shape: tuple
    reduced: tuple
    max_memcpy: float  # float32: the best backend's time <= max_memcpy * memcpy time

    @property
    def family(self) -> str:
        return self.key.split("_")[0]

    def name(self, shape=None) -> str:
        """``"cross_entropy fwd+grad 2048x32000"``; a 1-D shape in M/K elements (``16M``)."""
        shape = self.shape if shape is None else tuple(shape)
        if len(shape) == 1:
            n = shape[0]
            size = f"{n >> 20}M" if n % (1 << 20) == 0 else f"{n >> 10}K" if n % (1 << 10) == 0 else str(n)
        else:
            size = "x".join(map(str, shape))
        return f"{self.title} {size}"

    def matches(self, selector: str) -> bool:
        if selector in ("ce", "lse", "bce"):
            return self.family == selector
        return selector in self.name() or selector in self.key


WORKLOADS = (
    Workload("ce_2048x32000", "cross_entropy fwd+grad", "cross_entropy", (2048, 32000), (16, 32000), 1.2),
    Workload("ce_8192x1000", "cross_entropy fwd+grad", "cross_entropy", (8192, 1000), (128, 1000), 1.5),
    Workload("ce_262144x10", "cross_entropy fwd+grad", "cross_entropy", (262144, 10), (4096, 10), 3.0),
    Workload("lse_2048x32000", "logsumexp", "logsumexp", (2048, 32000), (16, 32000), 0.8),
    Workload("bce_16M", "bce_with_logits fwd+grad", "bce_with_logits", (1 << 24,), (1 << 16,), 2.0),
)
BY_KEY = {w.key: w for w in WORKLOADS}


def select(names) -> list:
    """The workloads matching any of ``names`` (every workload when ``names`` is empty)."""
    return [w for w in WORKLOADS if not names or any(w.matches(s) for s in names)]


@dataclass
class Case:
    """A workload's inputs on one dtype and shape, ready to call on any implementation."""

    workload: Workload
    dtype: np.dtype
    shape: tuple
    arrays: dict  # name -> ndarray, the logits first
    call: Callable[[str], Any]  # backend name -> the public call's result

    @property
    def logits(self) -> np.ndarray:
        return next(iter(self.arrays.values()))

    @property
    def name(self) -> str:
        return f"{self.workload.name(self.shape)} {self.dtype.name}"

    def memcpy(self) -> Callable[[], np.ndarray]:
        """``np.copyto`` of the logits into a preallocated array whose pages are already
        faulted in; the callable returns the destination."""
        src = self.logits
        dst = np.zeros_like(src)  # zeros: its pages are touched now, not in the timed copy

        def copy():
            np.copyto(dst, src)
            return dst

        return copy


# the goal workloads as fastloss bench's cases (fastloss._bench.cases: one set of inputs for
# every benchmark): (function, mode)
_CASES = {"cross_entropy": ("cross_entropy", "fwd+grad"), "logsumexp": ("logsumexp", "fwd"),
          "bce_with_logits": ("binary_cross_entropy_with_logits", "fwd+grad")}


def build_case(wl: Workload, dtype, shape=None, seed: int = 0) -> Case:
    """Inputs of ``wl`` (its full shape unless ``shape`` is given), deterministic in ``seed``:
    :func:`fastloss._bench.make_case`'s, so that ``fastloss bench``, this script and the
    pytest-benchmark suite time the same data.  The gradient buffer is allocated once and
    reused by every call (``grad_out=``), as a training loop does.
    """
    if wl.function not in _CASES:
        raise ValueError(f"function: expected one of {sorted(_CASES)}, found {wl.function!r}")
    dt = np.dtype(dtype)
    shape = wl.shape if shape is None else tuple(shape)
    fn, mode = _CASES[wl.function]
    bc = _bench.make_case(fn, mode, shape, dt, np.random.default_rng(seed), reuse=True)
    return Case(wl, dt, shape, bc.inputs, bc.call)


# ============================================================================ JAX peer
# The peer forms are fastloss._bench.peers' (the one peer table of every benchmark).
# the goal workloads' functions: (fastloss name, forward and gradient?)
_JAX_WORKLOADS = {"cross_entropy": ("cross_entropy", True), "logsumexp": ("logsumexp", False),
                  "bce_with_logits": ("binary_cross_entropy_with_logits", True)}


def jax_callable(case: Case) -> Callable[[], Any]:
    """``jax.jit`` of the workload's idiomatic JAX form on ``case``'s inputs (not yet compiled;
    :func:`fastloss._bench.peers.jax_callable`).

    Raises :class:`Unavailable` without JAX, and for float64 unless ``jax_enable_x64`` is set
    (JAX computes in float32 otherwise; setting it process-wide would change every other JAX
    user here).
    """
    name, with_grad = _JAX_WORKLOADS[case.workload.function]
    return jax_peer(name, "fwd+grad" if with_grad else "fwd", case.arrays, case.dtype)


def torch_compile_callable(case: Case) -> Callable[[], Any]:
    """``torch.compile`` (inductor) of the workload's ``torch.nn.functional`` form with
    ``torch.autograd.grad`` (:func:`fastloss._bench.peers.torch_callable`) on zero-copy tensors
    of ``case``'s inputs, PyTorch's intra-op threads set to fastloss's.  Compiled at its first
    call.  Float32 only (the peer goals are float32; inductor compiles each dtype anew)."""
    if case.dtype != np.float32:
        raise Unavailable("the peer goals are float32")
    fn, mode = _CASES[case.workload.function]
    f = torch_peer(fn, mode, case.arrays, "torch.compile")
    import torch

    torch.set_num_threads(fl.get_num_threads())
    return f


def peer_callable(case: Case, peer: str) -> Callable[[], Any]:
    """The callable of goal peer ``peer`` (``"jax"`` or ``"torch.compile"``) on ``case``."""
    if peer == "jax":
        return jax_callable(case)
    if peer == "torch.compile":
        return torch_compile_callable(case)
    raise ValueError(f"peer: expected one of {PEERS}, found {peer!r}")


def jax_threads() -> dict:
    """What is known of JAX's CPU threads without importing it (that takes most of a second):
    its version, the usable cores XLA's CPU client sizes its thread pool to, and any
    ``XLA_FLAGS`` (``--xla_cpu_multi_thread_eigen=false`` makes it single-threaded)."""
    import importlib.metadata
    import importlib.util

    info = {"usable_cores": _usable_cores(), "XLA_FLAGS": os.environ.get("XLA_FLAGS")}
    if importlib.util.find_spec("jax") is None:
        info["unavailable"] = "JAX is not installed"
    else:
        try:
            info["version"] = importlib.metadata.version("jax")
        except importlib.metadata.PackageNotFoundError:
            info["version"] = "?"
    return info


# ============================================================================ timing
def _warm(fn: Callable[[], Any], keep: bool = True) -> tuple[float, list | None]:
    """One untimed warm-up call: its time (compilation, cache load, page faults) and (with
    ``keep``) its result as a list of array copies, taken before the next call overwrites a
    reused ``grad_out``."""
    gc.collect()
    t0 = time.perf_counter()
    r = fn()
    first = time.perf_counter() - t0
    got = _bench.outputs(r) if keep else None
    del r
    return first, got


def time_calls(fn: Callable[[], Any], reps: int, keep: bool = True) -> tuple[Timing, list | None]:
    """One warm-up call, then ``reps`` single timed calls (:func:`fastloss._bench.time_calls`,
    the timer of every benchmark here).

    Returns the timing and (with ``keep``) the warm-up call's result as a list of array
    copies, taken before the next call overwrites a reused ``grad_out``.
    """
    first, got = _warm(fn, keep)
    return dataclasses.replace(_timing.time_calls(fn, reps, warmup=False), first=first), got


# ============================================================================ measuring
def measure_case(case: Case, backends, reps: int, jax: bool = True, log=None, peers=None) -> dict:
    """Time the memcpy, the numpy backend, ``backends`` and the ``peers`` on ``case``
    (``peers`` None: the JAX peer if ``jax``, as in earlier versions).

    Each gets one warm-up call, checked against the numpy backend's result.  The memcpy, the
    numpy backend and ``backends`` are then timed in turns (:func:`fastloss._bench.
    time_in_turns`: ``reps`` rounds of one call each, the numpy backend in the first
    ``max(2, reps // 2)`` of them), so that their ratios -- the goals' numba / cython and best /
    memcpy -- come from the same minutes; the peers after, each in a block of ``reps`` calls
    (their threads -- JAX's pool, PyTorch's OpenMP team -- may keep spinning after a call,
    which would slow the next implementation in turns, not theirs).

    Returns ``{"times": {impl: Timing dict}, "checks": {impl: {...}}, "not_run": {impl: why}}``.
    A failing or disagreeing implementation is recorded (``checks[impl]["ok"] = False``) and
    the others still run.  ``log(impl, timing_or_None, check)`` is called for each one, in the
    order above.
    """
    res = {"workload": case.workload.key, "name": case.name, "shape": list(case.shape),
           "dtype": case.dtype.name, "logits_bytes": case.logits.nbytes, "times": {}, "checks": {}, "not_run": {}}
    impls = [("memcpy", case.memcpy), ("numpy", lambda: (lambda: case.call("numpy")))]
    impls += [(b, (lambda b=b: (lambda: case.call(b)))) for b in backends]
    if peers is None:
        peers = [PEER] if jax else []
    peer_impls = [(p, (lambda p=p: peer_callable(case, p))) for p in peers]
    ref = None

    def run(impl, make, warm_only):
        """Warm ``impl`` up and check it (``warm_only``), or time it in a block too: ``(fn,
        first or Timing)``, or None when it did not run (recorded in ``res``)."""
        nonlocal ref
        try:
            fn = make()
            if warm_only:
                timed, got = _warm(fn, keep=impl != "memcpy")
            else:
                timed, got = time_calls(fn, reps, keep=True)
            copied = impl != "memcpy" or np.array_equal(fn(), case.logits)
        except Unavailable as e:
            res["not_run"][impl] = str(e)
            return None
        except Exception as e:  # a failing kernel, a broken JAX install: report it, go on with the others
            res["checks"][impl] = {"ok": False, "max_err": None, "error": f"{type(e).__name__}: {e}"}
            return None
        if impl == "memcpy":
            check = {"ok": bool(copied), "max_err": 0.0, "error": None if copied else "np.copyto differs"}
        elif impl == "numpy":
            ref = got
            check = {"ok": True, "max_err": 0.0, "error": None}
        elif ref is None:
            check = {"ok": False, "max_err": None, "error": "no numpy reference (the numpy backend failed)"}
        else:
            ok, err = _bench.compare(ref, got, case.dtype)
            check = {"ok": bool(ok), "max_err": err, "error": None}
        res["checks"][impl] = check
        return fn, timed

    def record(impl, timing):
        if timing is not None:
            res["times"][impl] = timing.as_dict()
        if log and impl in res["checks"]:  # (not for one that is unavailable)
            log(impl, timing, res["checks"][impl])

    # memcpy, numpy, backends: warmed up and checked, then timed in turns
    warm = {impl: r for impl, make in impls if (r := run(impl, make, warm_only=True)) is not None}
    n_np = max(2, reps // 2)
    turns = _timing.time_in_turns({impl: fn for impl, (fn, _) in warm.items()}, max(reps, n_np),
                                  rounds={impl: n_np if impl == "numpy" else reps for impl in warm})
    for impl, _ in impls:
        record(impl, dataclasses.replace(turns[impl], first=warm[impl][1]) if impl in warm else None)
    # the peers, each in a block of its own
    for impl, make in peer_impls:
        r = run(impl, make, warm_only=False)
        record(impl, None if r is None else r[1])
    return res


# ============================================================================ start-up
_IMPORT_SNIPPET = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy
t1 = time.perf_counter()
import fastloss
t2 = time.perf_counter()
imported_numba = "numba" in sys.modules
try:  # a diagnostic, after the measurement: what the first numba call will pay on top
    import numba
    t_numba = time.perf_counter() - t2
except ImportError:
    t_numba = None
print(json.dumps({"total": t2 - t0, "numpy": t1 - t0, "fastloss": t2 - t1, "imported_numba": imported_numba,
                  "numba_import": t_numba, "file": fastloss.__file__}))
"""

_FIRST_CALL_SNIPPET = r"""
import json, sys, time
import numpy as np
import fastloss as fl
from fastloss import _dispatch
backend = sys.argv[1] or None
n, c = int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
x = rng.standard_normal((n, c), dtype=np.float32)
t = rng.integers(0, c, n)
t0 = time.perf_counter()
loss, grad = fl.cross_entropy(x, t, return_grad=True, backend=backend)
t1 = time.perf_counter()
fl.cross_entropy(x, t, return_grad=True, backend=backend)
t2 = time.perf_counter()
print(json.dumps({"first": t1 - t0, "second": t2 - t1, "backend": _dispatch.resolve(backend).NAME,
                  "finite": bool(np.isfinite(loss) and np.isfinite(grad).all())}))
"""


def _subprocess_env(threads=None) -> dict:
    env = dict(os.environ)
    # the child imports the same fastloss as this process, installed or not
    root = os.path.dirname(os.path.dirname(os.path.abspath(fl.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    if threads is not None:
        env["FASTLOSS_NUM_THREADS"] = str(threads)
    return env


def _child(snippet, args=(), threads=None, timeout=900) -> dict:
    proc = subprocess.run([sys.executable, "-c", snippet, *map(str, args)], capture_output=True, text=True,
                          env=_subprocess_env(threads), timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child process exited with {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(runs: list, key: str) -> dict:
    vals = [r[key] for r in runs]
    return {"median": statistics.median(vals), "best": min(vals), "runs": vals}


def time_import(runs: int = 3, threads=None) -> dict:
    """``import numpy; import fastloss`` in ``runs`` fresh processes (seconds, numpy included).

    ``imported_numba`` is True if importing fastloss imported Numba in any run (it must not:
    the backends load on first use).  ``numba_import`` (a diagnostic, timed after the import
    measurement) is what importing Numba itself costs, part of every first Numba call.
    """
    rs = [_child(_IMPORT_SNIPPET, threads=threads) for _ in range(runs)]
    out = _summary(rs, "total")
    out["numpy"] = statistics.median(r["numpy"] for r in rs)
    out["fastloss_only"] = statistics.median(r["fastloss"] for r in rs)
    out["imported_numba"] = any(r["imported_numba"] for r in rs)
    nb = [r["numba_import"] for r in rs if r["numba_import"] is not None]
    out["numba_import"] = statistics.median(nb) if nb else None
    return out


def time_first_call(backend=None, runs: int = 3, shape=STARTUP_SHAPE, warm_cache: bool = True, threads=None) -> dict:
    """The first ``fl.cross_entropy(x, t, return_grad=True, backend=backend)`` after import, in
    ``runs`` fresh processes; float32 ``shape`` logits (built before the clock starts).

    With ``warm_cache`` one throwaway process makes the same call first, so that Numba's
    on-disk cache holds the kernel (its time, ``cache_warming_run``, is a compilation if the
    cache was cold).  ``second`` is the median time of the second call in the same processes:
    ``first - second`` is the one-off cost (importing the backend, loading the kernel).
    """
    args = ("" if backend is None else backend, *shape)
    out = {"requested": backend or "auto", "shape": list(shape)}
    if warm_cache:
        out["cache_warming_run"] = _child(_FIRST_CALL_SNIPPET, args, threads)["first"]
    rs = [_child(_FIRST_CALL_SNIPPET, args, threads) for _ in range(runs)]
    out.update(_summary(rs, "first"))
    out["second"] = statistics.median(r["second"] for r in rs)
    out["backend"] = rs[0]["backend"]
    out["finite"] = all(r["finite"] for r in rs)
    return out


def time_warmup(dtypes=("float32", "float64"), layouts=("C",), timeout=1800) -> dict:
    """``fastloss warmup --backend numba`` for ``dtypes`` x ``layouts`` in a fresh process whose
    Numba cache directory is empty (``NUMBA_CACHE_DIR`` a new temporary directory, removed
    after): the compile time a user's first ``fastloss warmup`` pays.  Seconds, wall clock."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="fastloss-warmup-")
    try:
        env = _subprocess_env()
        env["NUMBA_CACHE_DIR"] = d
        cmd = [sys.executable, "-m", "fastloss", "warmup", "--backend", "numba"]
        for dt in dtypes:
            cmd += ["--dtype", dt]
        for lay in layouts:
            cmd += ["--layout", lay]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        sec = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"fastloss warmup exited with {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}")
        return {"seconds": sec, "dtypes": list(dtypes), "layouts": list(layouts),
                "cache_files": sum(len(f) for _, _, f in os.walk(d))}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def measure_startup(runs: int = 3, cython: bool = True, threads=None, log=None, warmup: bool = False) -> dict:
    """Every start-up measurement: ``import``, first ``auto`` call (warm cache), first cython
    call, and with ``warmup`` the time of ``fastloss warmup`` into an empty cache.

    A measurement that fails is recorded as ``{"error": ...}``.  ``cython=False`` (the
    backend is unavailable) leaves ``first_call_cython`` out.
    """
    out = {}
    jobs = [("import", lambda: time_import(runs, threads)),
            ("first_call_auto", lambda: time_first_call(None, runs, threads=threads))]
    if cython:
        jobs.append(("first_call_cython", lambda: time_first_call("cython", runs, warm_cache=False, threads=threads)))
    if warmup:
        jobs.append(("warmup", time_warmup))
    for name, job in jobs:
        try:
            out[name] = job()
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        if log:
            log(name, out[name])
    return out


# ============================================================================ goals
def _verdict(met) -> str:
    return "met" if met is True else "NOT MET" if met is False else "not measured"


def evaluate(times: dict, startup: dict | None = None, not_run: dict | None = None, reduced: bool = False) -> list:
    """The goal lines, each with its measured value and verdict.

    Parameters
    ----------
    times : dict
        ``{(workload key, dtype name): {impl: best seconds}}`` for the workloads measured;
        impl is ``memcpy``, ``numpy``, a backend name or a peer (``jax``, ``torch.compile``).  A workload absent from
        ``times`` has no goal lines; an implementation absent from a measured workload makes
        its lines "not measured".
    startup : dict, optional
        :func:`measure_startup`'s result; None: no start-up lines.
    not_run : dict, optional
        ``{impl: reason}`` for implementations that could not run (shown in the lines).
    reduced : bool
        The shapes were reduced: the ratios are shown, but no verdict (the goals are defined
        on the full shapes).

    Returns
    -------
    list of dict
        ``issue`` (the section: speed or start-up), ``workload`` (its key, or ``"startup"``), ``dtype``,
        ``subject`` (the label shown), ``backend``, ``measure``, ``value`` (a ratio, or
        seconds for start-up), ``shown`` (the value formatted), ``target``, ``met`` (True,
        False or None = not measured / not applicable) and ``verdict`` (met, NOT MET,
        not measured (why), n/a (reduced shapes)).
    """
    not_run = not_run or {}
    lines = []

    def add(issue, key, dtype, subject, backend, measure, value, op, limit, fmt, why=None, applies=True):
        if value is None:
            met = None
            shown = "-"
            verdict = "not measured" + (f" ({why})" if why else "")
        else:
            shown = fmt(value) if callable(fmt) else fmt.format(value)
            met = (value <= limit if op == "<=" else value < limit if op == "<" else value >= limit) if applies else None
            verdict = _verdict(met) if applies else "n/a (reduced shapes)"
        target = f"{op} {fmt(limit) if callable(fmt) else fmt.format(limit)}"
        lines.append({"issue": issue, "workload": key, "dtype": dtype, "subject": subject, "backend": backend, "measure": measure, "value": value,
                      "shown": shown, "target": target, "met": met, "verdict": verdict})

    def ratio(t, a, b):
        return t[a] / t[b] if a in t and b in t and t[b] > 0 else None

    def why(t, *impls):
        for i in impls:
            if i not in t:
                return not_run.get(i, f"{i} not run")
        return None

    applies = not reduced

    def measured():
        """(workload, dtype, its times, subject) of every workload measured in this run."""
        for dt in ("float32", "float64"):
            for w in WORKLOADS:
                t = times.get((w.key, dt))
                if t is not None:
                    yield w, dt, t, (f"{w.name()} {dt}" if not reduced else f"{w.key} {dt} (reduced)")

    backends = COMPILED
    # ------------------------------------------------------------ speed: the backends, memcpy, peers
    for w, dt, t, subject in measured():
        add("speed", w.key, dt, subject, "numba", "time / cython time", ratio(t, "numba", "cython"), "<=",
            NUMBA_MAX_VS_CYTHON, "{:.2f}x", why(t, "numba", "cython"), applies)
        if dt != "float32":
            continue
        ran = [b for b in backends if b in t]
        best = min(ran, key=lambda b: t[b]) if ran else None
        add("speed", w.key, dt, subject, best or "-", "best backend time / memcpy",
            ratio(t, best, "memcpy") if best else None, "<=", w.max_memcpy, "{:.2f}x",
            why(t, "memcpy") if best else why(t, *backends), applies)
        for b in backends:
            for p in PEERS:
                add("speed", w.key, dt, subject, b, f"time / {PEER_LABEL[p]}", ratio(t, b, p), "<", 1.0,
                    "{:.2f}x", why(t, b, p), applies)
    # ------------------------------------------------------------ start-up
    if startup is not None:
        imp = startup.get("import", {})
        add("start-up", "startup", None, "start-up", "-", "import fastloss (numpy included)",
            imp.get("median"), "<", IMPORT_MAX, "{:.3f} s", imp.get("error", "not run"))
        fc = startup.get("first_call_auto", {})
        be = fc.get("backend", "auto")
        add("start-up", "startup", "float32", f"start-up, CE {STARTUP_SUBJECT}", be,
            f"first call (auto -> {be}), warm cache", fc.get("median"), "<", FIRST_CALL_MAX, "{:.3f} s",
            fc.get("error", "not run"))
        fc = startup.get("first_call_cython")
        add("start-up", "startup", "float32", f"start-up, CE {STARTUP_SUBJECT}", "cython", "first call after import",
            None if fc is None else fc.get("median"), "<", CYTHON_FIRST_CALL_MAX, lambda v: f"{v * 1e3:.2f} ms",
            not_run.get("cython", "not run") if fc is None else fc.get("error", "not run"))
        if "warmup" in startup:
            wu = startup["warmup"]
            add("start-up", "startup", None, "start-up", "numba", "fastloss warmup (float32+float64, C order)",
                wu.get("seconds"), "<", WARMUP_MAX, "{:.0f} s", wu.get("error", "not run"))
    return lines


def summarize(goals: list) -> dict:
    return {"met": sum(g["met"] is True for g in goals), "not_met": sum(g["met"] is False for g in goals),
            "not_measured": sum(g["met"] is None for g in goals), "total": len(goals)}


def format_goals(goals: list) -> str:
    """The goal lines as a text table, one section per issue, and a summary line."""
    if not goals:
        return "(no goal lines: nothing measured)"
    head = ("workload", "backend", "measure", "value", "goal", "verdict")
    rows = [(g["subject"], g["backend"], g["measure"], g["shown"], g["target"], g["verdict"]) for g in goals]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]

    def fmt(cells):
        return "  " + "  ".join(c.rjust(w) if i in (3, 4) else c.ljust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out, issue = [], None
    for g, r in zip(goals, rows):
        if g["issue"] != issue:
            issue = g["issue"]
            if out:
                out.append("")
            out.append(f"{issue} goals")
            out.append(fmt(head))
            out.append(fmt(["-" * w for w in widths]))
        out.append(fmt(r))
    s = summarize(goals)
    out.append("")
    out.append(f"{s['met']} of {s['total']} goals met, {s['not_met']} not met, {s['not_measured']} not measured/applicable")
    missed = [g for g in goals if g["met"] is False]
    if missed:
        out.append("not met: " + "; ".join(f"{g['subject']} [{g['backend']}] {g['measure']} {g['shown']} "
                                           f"(goal {g['target']})" for g in missed))
    return "\n".join(out)


def format_startup(startup: dict) -> str:
    lines = []
    for name, r in startup.items():
        if "error" in r:
            lines.append(f"  {name}: FAILED {r['error']}")
            continue
        if name == "warmup":
            lines.append(f"  warmup: {r['seconds']:.1f} s for {'+'.join(r['dtypes'])}, layout "
                         f"{'+'.join(r['layouts'])} ({r['cache_files']} files in an empty Numba cache)")
            continue
        runs = ", ".join(f"{v:.4f}" for v in r["runs"])
        if name == "import":
            nb = "" if r["numba_import"] is None else f"; `import numba` alone {r['numba_import']:.3f} s"
            extra = (f"  (numpy {r['numpy']:.3f} s + fastloss {r['fastloss_only']:.3f} s; "
                     f"numba imported: {'YES (it should not be)' if r['imported_numba'] else 'no'}{nb})")
        else:
            extra = f"  backend {r['backend']}; second call {r['second'] * 1e3:.2f} ms"
            if "cache_warming_run" in r:
                extra += f"; cache-warming process {r['cache_warming_run']:.2f} s"
        lines.append(f"  {name}: median {r['median']:.4f} s, best {r['best']:.4f} s  [{runs}]{extra}")
    return "\n".join(lines)


# ============================================================================ CLI
def _fmt_ms(s):
    return "-" if s is None else f"{s * 1e3:9.2f} ms"


def _line(case_name, impl, timing, check, t_mem, t_np):
    if timing is None:
        return f"{case_name:44s} {impl:13s} FAILED {check['error']}"
    r_mem = timing.best / t_mem if t_mem else None
    r_np = t_np / timing.best if t_np else None
    status = "ok" if check["ok"] else (f"ERROR {check['error']}" if check["error"]
                                       else f"MISMATCH (max rel. err {check['max_err']:.2g})")
    return (f"{case_name:44s} {impl:13s} {_fmt_ms(timing.best)} {_fmt_ms(timing.median)}  "
            f"{timing.cpu_per_wall:4.1f}  {'-' if r_mem is None else f'{r_mem:6.2f}x':>8s}  "
            f"{'-' if r_np is None else f'{r_np:6.1f}x':>8s}  {status}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", action="append",
                    help="backend(s) to time besides the numpy baseline (repeatable or a comma list; default: "
                         "numba and cython, if available)")
    ap.add_argument("--dtype", action="append", choices=["float32", "float64"], help="default: both")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per implementation (numpy: half, at least 2)")
    ap.add_argument("--threads", type=int, help="fastloss threads (fl.set_num_threads); default: every core")
    ap.add_argument("--json", metavar="FILE", help="write every number, the machine and the verdicts to FILE")
    ap.add_argument("--no-jax", action="store_true", help="skip the JAX peer")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch.compile peer")
    ap.add_argument("--no-peers", action="store_true", help="skip both peers")
    ap.add_argument("--warmup", action="store_true",
                    help="also time `fastloss warmup` (float32+float64, C order) into an empty Numba cache")
    ap.add_argument("--no-startup", action="store_true", help="skip the start-up measurements (fresh processes)")
    ap.add_argument("--startup-runs", type=int, default=3, help="fresh processes per start-up measurement")
    # the reduced shapes, one timed call, no start-up: exercises the machinery (tests)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("names", nargs="*", help="workloads: ce, lse, bce, or substrings of names/keys")
    a = ap.parse_args(argv)
    if a.reps < 1 or a.startup_runs < 1 or (a.threads is not None and a.threads < 1):
        ap.error("--reps, --startup-runs and --threads take positive integers")
    workloads = select(a.names)
    if not workloads:
        ap.error(f"no workload matches {a.names}; keys: {', '.join(w.key for w in WORKLOADS)}")
    if a.threads is not None:
        fl.set_num_threads(a.threads)
    statuses = fl.backends()
    requested = [b.strip() for item in (a.backend or list(COMPILED)) for b in item.split(",") if b.strip()]
    for b in requested:
        if b not in statuses:
            ap.error(f"--backend: expected one of {', '.join(statuses)}, found {b!r}")
    requested = [b for b in dict.fromkeys(requested) if b != "numpy"]  # numpy always runs, as the baseline
    not_run = {b: f"unavailable: {statuses[b].reason}" for b in requested if not statuses[b].available}
    bes = [b for b in requested if statuses[b].available]
    reps = 1 if a.tiny else a.reps
    dtypes = a.dtype or ["float32", "float64"]
    threads = fl.get_num_threads()
    cores = _usable_cores()
    a.no_jax |= a.no_peers
    a.no_torch |= a.no_peers
    jx = None if a.no_jax else jax_threads()
    if a.no_jax:
        not_run["jax"] = "--no-jax"
    elif "unavailable" in jx:
        not_run["jax"] = jx["unavailable"]
    if a.no_torch:
        not_run["torch.compile"] = "--no-torch"
    else:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            not_run["torch.compile"] = "PyTorch is not installed"
    peers = [p for p in PEERS if p not in not_run]

    print(f"fastloss goals{' (tiny shapes: no verdicts)' if a.tiny else ''}: threads={threads}, "
          f"usable cores={cores}, backends={bes}" + (f", not run: {not_run}" if not_run else ""))
    if jx is not None and "unavailable" not in jx:
        print(f"JAX {jx['version']}: XLA's CPU thread pool uses all {cores} usable cores"
              + (f" (XLA_FLAGS={jx['XLA_FLAGS']!r})" if jx["XLA_FLAGS"] else "")
              + ("" if cores == threads else
                 f" -- NOT an equal-thread comparison: fastloss runs {threads} thread(s)"))
    print("time: best and median of the timed calls | cpu: process CPU time / wall time (cores busy) | "
          "x memcpy: time / np.copyto of the logits | x numpy: numpy-backend time / time\n")
    print(f"{'workload':44s} {'impl':13s} {'best':>12s} {'median':>12s}  {'cpu':>4s}  {'x memcpy':>8s}  "
          f"{'x numpy':>8s}  check")

    results, times, failed, reasons = [], {}, [], {}
    for dn in dtypes:
        for w in workloads:
            case = build_case(w, dn, w.reduced if a.tiny else None)
            seen = {}

            def log(impl, timing, check, case=case, seen=seen):
                if timing is not None:
                    seen[impl] = timing.best
                print(_line(case.name, impl, timing, check, seen.get("memcpy"), seen.get("numpy")), flush=True)

            res = measure_case(case, bes, reps, log=log, peers=peers)
            for impl, why in res["not_run"].items():
                reasons.setdefault(impl, why)
                if impl not in PEERS or dn == "float32":  # float64 peers are skipped by design, not news
                    print(f"{case.name:44s} {impl:13s} not run: {why}")
            failed += [f"{case.name} [{i}]: {c['error'] or 'max relative error %.3g vs numpy' % c['max_err']}"
                       for i, c in res["checks"].items() if not c["ok"]]
            times[(w.key, dn)] = {i: t["best"] for i, t in res["times"].items()}
            results.append(res)
            del case
            gc.collect()
        print()

    startup = None
    if not (a.no_startup or a.tiny):
        print("start-up (fresh processes):")
        startup = measure_startup(a.startup_runs, cython="cython" in statuses and statuses["cython"].available,
                                  threads=a.threads, warmup=a.warmup,
                                  log=lambda n, r: print(format_startup({n: r}), flush=True))
        for name, r in startup.items():
            if "error" in r:
                failed.append(f"start-up {name}: {r['error']}")
            elif r.get("finite") is False:
                failed.append(f"start-up {name}: non-finite loss or gradient")
        print()

    goals = evaluate(times, startup, {**reasons, **not_run}, reduced=a.tiny)
    print(format_goals(goals))
    if failed:
        print("\nFAILED (an error, or a result that disagrees with the numpy backend):", file=sys.stderr)
        for f in failed:
            print("  " + f, file=sys.stderr)

    if a.json:
        doc = {
            "schema": SCHEMA,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tiny": a.tiny,
            "machine": _bench.machine_info(),
            "threads": {"fastloss": threads, "usable_cores": cores, "jax": jx},
            "backends": bes,
            "not_run": not_run,
            "method": {
                "time": f"best (and median) of {reps} timed calls after one untimed warm-up call; numpy backend "
                        f"{max(2, reps // 2)} calls; gc disabled while timing",
                "memcpy": "np.copyto of the same logits into a preallocated, pre-faulted array",
                "gradients": "into a reused grad_out (JAX returns a fresh gradient)",
                "jax": "jax.jit(jax.value_and_grad(loss)) (logsumexp: jax.jit(jax.nn.logsumexp)) on device_put "
                       "inputs, float32, jax.block_until_ready; compilation in the warm-up call",
                "torch.compile": "torch.compile(dynamic=False) of the torch.nn.functional form, loss and "
                                 "torch.autograd.grad, float32, PyTorch threads = fastloss threads; "
                                 "compilation in the warm-up call",
                "startup": "fresh processes; median and best of the runs; numpy's import included",
            },
            "measurements": results,
            "startup": startup,
            "goals": goals,
            "summary": summarize(goals),
            "failed": failed,
        }
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"wrote {a.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
