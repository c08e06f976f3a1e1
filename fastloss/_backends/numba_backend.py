"""The ``numba`` backend: fused, parallel, SIMD CPU kernels compiled by Numba.

Implements every entry point of the backend protocol documented in
:mod:`fastloss._backends.numpy_backend`, with the same signatures and the same results (within
the accuracy contract of SPEC.md), but without temporaries and in one or two sweeps over memory.

Design
------
* **Parallelism.**  Row-wise kernels split the rows into one contiguous block per task and
  run the blocks with ``prange`` (static scheduling: equal blocks, one per thread).  Elementwise
  kernels see ``(R, K)`` arrays; their tasks are row segments of ``_CHUNK`` elements when
  ``K`` is large (so a ``(1, 16M)`` view keeps every thread busy) and groups of whole rows
  when ``K`` is small (so a tall, thin array does not pay a task per tiny row).
* **SIMD.**  ``exp``/``log``/``log1p`` come from :mod:`._numba_math` (polynomials plus bit
  manipulation), which LLVM vectorizes; ``math.exp`` would be a scalar libm call.  Loops are
  compiled with ``fastmath={'contract', 'arcp', 'nsz', 'reassoc', 'afn'}``: ``reassoc`` lets
  LLVM vectorize sums, and ``nnan``/``ninf`` are deliberately *not* set so that inf and NaN
  keep IEEE semantics.  A running maximum does not vectorize as a reduction without ``nnan``,
  so the row maximum keeps 16 independent partial maxima.
* **Fused cross-entropy.**  Per row: (1) the maximum ``m`` (one read of the logits from
  memory); (2) ``e = exp(x - m)`` written into the gradient buffer while summing it in
  float64; (3) ``grad = e * (gscale * a / s) - corrections``, re-reading ``e`` from L2 (a row of
  32k float32 is 128 KiB).  The logits are read from memory once and the gradient written once,
  and ``exp`` is evaluated once per element.  Everything the loss needs from ``x`` (the target
  logit, the label-smoothing sum) is read before step (2), so ``grad`` may be ``x`` itself.
* **Few classes (C <= 32).**  Rows that short never vectorize and their max and sum are
  latency-bound chains, so the hard-target cross-entropy takes a column-block path instead:
  blocks of 256 rows are transposed into a ``(C, 256)`` buffer and every step runs across
  rows (see ``_ce_cols_block``).  On 262144 x 10 float32 (one thread, forward + gradient)
  it takes about a quarter of the row-wise kernel's time.
* **Stability.**  ``lse = m + log(sum(exp(x - m)))`` with ``m`` replaced by 0 when it is not
  finite: a row with ``+inf`` gives ``+inf``, a row of only ``-inf`` gives ``-inf``, never
  ``inf - inf``.  Row sums and losses are accumulated in float64.
* **Layouts.**  Every kernel indexes ``x[i, j]``, so Numba compiles a specialization for
  C-contiguous arrays (vectorized) and one for any-stride ('A') arrays (Fortran order,
  strided and broadcast views) -- never a copy.  Elementwise kernels on Fortran-ordered
  operands run on the transposes, which are C-contiguous.
* **Small calls run serially.**  Every entry kernel has a serial twin (the same Python
  function compiled without ``parallel``, see ``_kernel``); calls with fewer than
  ``_SERIAL_MAX`` elements, or with one thread, run it on the calling thread and never touch
  the thread pool: waking the workers costs microseconds on an idle machine and milliseconds
  on a loaded one, more than a small call computes.
* **Compilation.**  ``cache=True`` on every entry kernel and nothing is compiled at import;
  the first call of each specialization compiles it (seconds) and caches it on disk.
  :func:`warmup` compiles every specialization the public layer can reach, both twins.
  Helpers (row and block functions here, the math in :mod:`._numba_math`) are deliberately
  *not* cached: a function loaded from Numba's disk cache is linked into its callers as
  object code, which LLVM cannot inline, and the vectorizable ``exp`` would then be an
  out-of-line call that keeps every loop scalar.  They compile in memory with, and are cached
  inside, the entry kernels.  Numba itself invalidates a cached kernel only
  when *this* file changes, so this module keys the cache on the sources of every module
  its kernels compile (:data:`_KERNEL_SOURCES`): a digest of them is kept beside the cached
  kernels, and when it differs (an edited helper, a partial upgrade) this module's cached
  kernels are dropped at import and compiled afresh (:func:`_drop_stale_kernels`).
* **Where the cache lives.**  Numba (0.68) caches a function in the first of these
  directories that it can create and write a file in: ``NUMBA_CACHE_DIR`` (when set),
  ``__pycache__`` next to this file, the user-wide ``$XDG_CACHE_HOME/numba`` (or
  ``~/.cache/numba``); it neither reads nor writes a directory it cannot write, and skips an
  unwritable ``NUMBA_CACHE_DIR`` silently.  With none of them writable (a read-only install
  for a user without a home cache) ``cache=True`` would raise at import ("no locator
  available") and the whole backend would be lost; so the search is run once at import on a
  probe function (``_cache_setup``) and, when it fails, every kernel is compiled with
  ``cache=False`` -- in memory, again in every process -- and one
  :class:`~fastloss.NumbaCacheWarning` says how to fix it (``NUMBA_CACHE_DIR`` set
  to a writable directory).  An unwritable ``NUMBA_CACHE_DIR`` that Numba skips for another
  directory gets the warning too.  :func:`cache_info` (shown by ``fastloss info``) reports it.
* **Strict subexpressions under ``reassoc``.**  ``(x - m) - log s`` (log-softmax) and
  ``log s - (x[t] - m)`` (cross-entropy) are evaluated in helpers compiled without
  ``reassoc`` (``sub_sub``, ``neg_log_p``): LLVM would otherwise rewrite them through
  ``lse = m + log s`` and lose the O(1) part next to huge logits.
* **Threads.**  :func:`set_num_threads` bounds the worker threads.  Numba's default
  ``workqueue`` threading layer is not safe for concurrent calls from several Python threads;
  this module asks for a thread-safe layer (OpenMP or TBB) unless the user chose one, and
  serializes calls if Numba still ends up on ``workqueue``.
* **Fork.**  GNU OpenMP's pool does not survive ``fork()``: in a child forked after a
  parallel call (``multiprocessing``'s ``'fork'`` start method, DataLoader-style workers)
  Numba's ``omp`` layer kills the process ("fork() called from a process already using GNU
  OpenMP, this is unsafe"), and a libgomp pool started by the ``cython`` backend would hang
  it.  In such a child (:func:`fastloss.forked_serial`, decided by an
  ``os.register_at_fork`` handler from the state of the parent) every call runs the serial
  twin of its kernel on the calling thread, :func:`get_num_threads` is 1 and
  :func:`set_num_threads` checks its argument without applying it.  Children of a process
  that never started a pool (or that uses the fork-safe TBB or workqueue layers) stay
  parallel; workers started with ``'spawn'`` or ``'forkserver'`` are always parallel.
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
import threading
import warnings

import numpy as np

from . import NumbaCacheWarning, forked_serial

try:  # the registry reports the backend unavailable (with this reason) if numba is missing
    import numba
    from numba import njit, prange

    _IMPORT_ERROR = ""
except Exception as exc:  # pragma: no cover - exercised only without numba
    numba = None
    _IMPORT_ERROR = f"numba cannot be imported ({type(exc).__name__}: {exc})"

NAME = "numba"

__all__ = [
    "NAME", "unavailable_reason", "set_num_threads", "get_num_threads", "warmup", "cache_info",
    "logsumexp", "softmax", "log_softmax", "softmax_backward", "log_softmax_backward",
    "cross_entropy", "cross_entropy_soft", "bce_with_logits", "bce", "kl_div", "mse",
    "gaussian_nll",
]


def unavailable_reason() -> str:
    """``""`` when Numba imports, else why this backend cannot be used."""
    return _IMPORT_ERROR


# ----------------------------------------------------------------------------- disk cache
def _cache_probe(a):  # never called: Numba's cache-directory search is run on it at import
    return a


def _dir_problem(path) -> str:
    """``""`` if a file can be written in directory ``path``, else why not -- checked as Numba
    checks it (create the directory if missing, write a temporary file), not with
    ``os.access``, which cannot tell whether a missing directory could be created and may
    disagree with ACLs, quotas or network filesystems."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return ""


def _cache_candidates():
    """The directories Numba (0.68) tries for this file, in its order: ``[(label, dir)]``."""
    out = []
    if numba.config.CACHE_DIR:
        out.append(("NUMBA_CACHE_DIR", os.path.abspath(numba.config.CACHE_DIR)))
    out.append(("next to the package",
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")))
    try:
        from numba.misc.appdirs import AppDirs

        out.append(("user-wide", AppDirs(appname="numba", appauthor=False).user_cache_dir))
    except Exception:  # pragma: no cover - a Numba that moved its appdirs
        pass
    return out


# Every module whose code the cached kernels contain (this one and the helpers they inline):
# the cache is keyed on their sources (_drop_stale_kernels)
_KERNEL_SOURCES = ("numba_backend.py", "_numba_math.py")
_STAMP = "numba_backend.sources.sha256"


def _sources_digest() -> str:
    h = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in _KERNEL_SOURCES:
        with open(os.path.join(here, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()


def _drop_stale_kernels(cache_dir: str) -> bool:
    """Delete this module's cached kernels in ``cache_dir`` unless they were compiled from
    the current sources of every module in :data:`_KERNEL_SOURCES`; returns whether any were.

    Numba checks only the stamp of the file defining a kernel; a kernel inlines helpers of
    other modules (:mod:`._numba_math`), whose edit would otherwise be served the old machine
    code.  The digest of the sources is written beside the kernels (atomically) once they
    are dropped.  Best effort: an unreadable source or a file another process removed first
    is no error (the kernels then compile as usual).
    """
    try:
        digest = _sources_digest()
    except OSError:  # pragma: no cover - sources not on disk (zipimport): nothing to compare
        return False
    stamp = os.path.join(cache_dir, _STAMP)
    try:
        with open(stamp) as f:
            if f.read().strip() == digest:
                return False
    except OSError:
        pass
    prefix = os.path.splitext(os.path.basename(__file__))[0] + "."
    dropped = False
    for entry in os.listdir(cache_dir):
        if entry.startswith(prefix) and entry.endswith((".nbi", ".nbc")):
            try:
                os.remove(os.path.join(cache_dir, entry))
                dropped = True
            except OSError:
                pass
    try:
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=_STAMP + ".")
        with os.fdopen(fd, "w") as f:
            f.write(digest + "\n")
        os.replace(tmp, stamp)
    except OSError:  # pragma: no cover - checked writable just before
        pass
    return dropped


def _cache_setup() -> dict:
    """Decide whether this module's kernels can be cached on disk; warn (once) if not.

    Runs Numba's own search (``cache=True`` on :func:`_cache_probe`, a function of this file,
    so exactly the locators, ``NUMBA_CACHE_LOCATOR_CLASSES`` included, that the kernels would
    get), then writes a file in the directory found, as saving will (Numba checks that for
    every locator but the zip-archive one).  Returns :func:`cache_info`'s dictionary.
    """
    info = dict(enabled=False, dir="", writable=False, note="")
    if numba.config.DISABLE_JIT:
        info["note"] = "NUMBA_DISABLE_JIT=1: nothing is compiled"
        return info
    try:
        disp = njit(cache=True)(_cache_probe)
        found = str(getattr(getattr(disp, "_cache", None), "cache_path", "") or "")
        problem = _dir_problem(found) if found else ""
        if problem:  # a locator that does not check (zip archives), or a race
            problem = f"{found} (Numba's choice: {problem})"
    except RuntimeError as exc:  # "cannot cache function ...: no locator available for file ..."
        found, problem = "", str(exc)
    env_dir = os.path.abspath(numba.config.CACHE_DIR) if numba.config.CACHE_DIR else ""
    if not problem:
        info.update(enabled=True, dir=found, writable=True)
        _drop_stale_kernels(found)
        if (env_dir and found and not getattr(numba.config, "CACHE_LOCATOR_CLASSES", "")
                and not os.path.abspath(found).startswith(env_dir.rstrip(os.sep) + os.sep)):
            # Numba skipped the directory the user asked for, without a word
            why = _dir_problem(env_dir) or "no file can be written there"
            info["note"] = f"NUMBA_CACHE_DIR={numba.config.CACHE_DIR} is ignored: not writable ({why})"
            warnings.warn(
                f"fastloss: NUMBA_CACHE_DIR={numba.config.CACHE_DIR!r} is not writable ({why}). "
                "Numba neither reads nor writes a cache directory it cannot write: it caches "
                f"the numba backend's kernels in {found} instead. Point NUMBA_CACHE_DIR at a "
                "writable directory, or unset it.",
                NumbaCacheWarning, stacklevel=2)
        return info
    cands = _cache_candidates()
    tried = "; ".join(f"{d} ({label}: {_dir_problem(d) or 'writable now'})" for label, d in cands)
    if problem and "no locator available" not in problem:  # e.g. NUMBA_CACHE_LOCATOR_CLASSES
        tried = f"{problem}; {tried}"
    info["dir"] = found or cands[0][1]
    info["note"] = f"tried {tried}" if tried else problem
    warnings.warn(
        "fastloss: Numba has no writable cache directory for the numba backend's kernels, so "
        "they are compiled in memory on every run (seconds per kernel at its first use in "
        f"each process). Tried: {tried or problem}. To cache them, set NUMBA_CACHE_DIR to a "
        "writable directory (e.g. export NUMBA_CACHE_DIR=/var/tmp/numba-cache) before "
        "starting Python.",
        NumbaCacheWarning, stacklevel=2)
    return info


def cache_info() -> dict:
    """Where Numba caches this backend's compiled kernels.

    Returns
    -------
    dict
        ``enabled`` (bool): kernels are cached on disk (else compiled in memory in every
        process); ``dir`` (str): the cache directory in use, or when there is none the one
        Numba would try first (``NUMBA_CACHE_DIR``, else ``__pycache__`` next to this
        file); ``writable`` (bool); ``note`` (str): what was tried, or why
        ``NUMBA_CACHE_DIR`` is ignored ("" when nothing is to be said).
    """
    return dict(_CACHE_INFO)


if numba is not None:
    from ._numba_math import bce_mix, cast_like, neg_log_p, sub_sub, vexp, vexpn, vlog, vlog1p, vlog1p_recip

    # Ask for a thread-safe layer before Numba launches its thread pool (it is launched
    # lazily, at the first parallel call).  "threadsafe" = TBB if present, else OpenMP.
    if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "threadsafe"

    _FM = {"contract", "arcp", "nsz", "reassoc", "afn"}  # never fastmath=True: keep inf/nan
    # Helpers (row and block functions) are not cached on their own: a cached function is
    # linked into its callers as object code that LLVM cannot inline, which would keep the
    # vectorizable exp out of the loops.  They compile with, and are cached inside, the
    # parallel entry kernels (cache=True), whose machine code contains them inlined.
    _JIT = dict(nogil=True, fastmath=_FM, error_model="numpy")
    # cache=False when Numba has no writable cache directory (it would raise at definition)
    _CACHE_INFO = _cache_setup()
    _PJIT = dict(_JIT, parallel=True, cache=_CACHE_INFO["enabled"])
    _SJIT = dict(_JIT, cache=_CACHE_INFO["enabled"])
    _NOJIT = bool(numba.config.DISABLE_JIT)  # NUMBA_DISABLE_JIT=1: kernels run as Python
else:  # pragma: no cover
    _JIT = _PJIT = _SJIT = {}
    _NOJIT = False
    _CACHE_INFO = dict(enabled=False, dir="", writable=False, note=_IMPORT_ERROR)

    def njit(*a, **k):
        return lambda f: f

    prange = range

_CHUNK = 16384  # elements per elementwise task: big enough to amortize, small enough for L1/L2
# Row sums of exp: blocks of _SUMBLK terms are summed in the compute dtype (8 float32 lanes
# per ymm instead of 4 float64 ones; each lane adds <= 64 terms in [0, 1], relative error
# ~1e-7 at worst), and the block sums are added in float64.
_SUMBLK = 512
# Elementwise loss sums likewise: blocks of _EBLK terms in the compute dtype (a float64
# accumulator in a float32 loop makes LLVM give up on vectorizing the whole loop -- measured
# 0.15 G el/s instead of ~1 G el/s for BCE), block sums added in float64.
_EBLK = 256

# Work (elements) below which a call runs the serial twin of its kernel on the calling thread:
# waking the worker threads costs microseconds on an idle machine but milliseconds on a loaded
# one (the OpenMP workers spin, or wait for a core), far more than such a call computes.
_SERIAL_MAX = 1 << 16


def _serial_copy(f):
    """A copy of ``f`` under its own name, so that its compiled versions are cached apart."""
    import types as _pytypes

    g = _pytypes.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial",
                              f.__defaults__, f.__closure__)
    g.__qualname__ = f.__qualname__ + "_serial"
    g.__module__ = f.__module__
    g.__doc__ = f.__doc__
    return g


_SERIAL = {}
_force_mode = None  # "serial" / "parallel": used by warmup() and the tests to reach both twins


def _kernel(f):
    """Compile ``f`` twice, lazily: parallel (``prange`` over tasks) and serial (its twin).

    Returns the parallel dispatcher; ``_SERIAL[f.__name__]`` is the serial one, in which
    ``prange`` is a plain ``range``.  Both are cached on disk.
    """
    _SERIAL[f.__name__] = njit(**_SJIT)(_serial_copy(f))
    return njit(**_PJIT)(f)


def _call(kern, work, *args):
    """Run kernel ``kern`` on ``args``: serially for small ``work`` or one thread, else in parallel.

    The caller's task decomposition (``_nblocks`` / ``_tasks``) already gives a single task
    when the call runs serially.  Serial kernels need no thread-pool set-up (``_Guard``).
    """
    if _NOJIT:
        # NUMBA_DISABLE_JIT=1 (coverage runs, debugging): the kernels are plain Python
        # functions (``prange`` is ``range``) on NumPy scalars.  Compiled with
        # error_model="numpy" they never warn; in Python, inf/nan arithmetic and integer
        # wrap-around in the bit tricks would emit RuntimeWarnings, so they are silenced.
        with np.errstate(all="ignore"):
            return _call_jit(kern, work, *args)
    return _call_jit(kern, work, *args)


def _call_jit(kern, work, *args):
    # _fork_serial first: in a child forked after a parallel call even warmup's forced
    # "parallel" mode must not enter the threading layer (see the module docstring, Fork)
    if _fork_serial or _force_mode == "serial" or (
            _force_mode is None and (work < _SERIAL_MAX or get_num_threads() == 1)):
        return _SERIAL[getattr(kern, "py_func", kern).__name__](*args)
    with _Guard():
        return kern(*args)


# ----------------------------------------------------------------------------- threads
_state_lock = threading.Lock()
_call_lock = threading.Lock()
_layer_checked = False
_serialize = False
_nthreads = 0  # 0: not set, use Numba's default


def _after_fork_in_child() -> None:
    global _fork_serial
    _fork_serial = forked_serial(NAME)


# True in a child forked after a parallel call: serial twins only, on the calling thread.
# Set here for a child that imports this module after the fork, and by the handler (run
# after the registry's, which decides: handlers run in registration order) for the others.
_fork_serial = forked_serial(NAME)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def set_num_threads(n: int) -> None:
    """Bound the number of worker threads of this backend's kernels (``1 <= n <= cores``).

    Numba's own setting is per calling thread; the value is stored here and applied on every
    call, so it holds for calls from any Python thread.  In a child process forked after a
    parallel call (:func:`fastloss.forked_serial`) ``n`` is checked and stored but
    the kernels keep running serially on the calling thread: the parent's OpenMP pool is
    unusable there, and Numba is not asked to touch it.
    """
    global _nthreads
    if numba is None:  # pragma: no cover
        return
    n = int(n)
    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(
            f"n: expected an integer in [1, {numba.config.NUMBA_NUM_THREADS}], found {n}"
        )
    _nthreads = n
    if not _fork_serial:
        numba.set_num_threads(n)


def get_num_threads() -> int:
    """Number of worker threads the kernels use (1 in a child forked after a parallel call)."""
    if numba is None or _fork_serial:
        return 1
    return _nthreads or numba.config.NUMBA_NUM_THREADS


@njit(**_PJIT)
def _launch_pool(a):  # tiny parallel kernel: makes Numba start its threading layer
    for i in prange(a.shape[0]):
        a[i] = i


def _check_layer():
    global _layer_checked, _serialize
    with _state_lock:
        if _layer_checked:
            return
        _launch_pool(np.zeros(2))
        # without JIT no threading layer is ever started (prange is range): nothing to guard
        _serialize = not _NOJIT and numba.threading_layer() == "workqueue"
        _layer_checked = True


class _Guard:
    """Context of every kernel call: applies the thread bound, serializes on ``workqueue``."""

    __slots__ = ("locked",)

    def __enter__(self):
        if not _layer_checked:
            _check_layer()
        self.locked = _serialize
        if self.locked:
            _call_lock.acquire()
        n = _nthreads or numba.config.NUMBA_NUM_THREADS
        if numba.get_num_threads() != n:
            numba.set_num_threads(n)
        return self

    def __exit__(self, *exc):
        if self.locked:
            _call_lock.release()
        return False


def _nblocks(n, work):
    """Row blocks for a row-wise kernel: one per thread (more would only add overhead),
    a single one for work that runs serially (see ``_call``)."""
    if work < _SERIAL_MAX:
        return 1
    return max(1, min(n, get_num_threads()))


def _tasks(r, k):
    """(number of tasks, column chunk, rows per task) for an elementwise (R, K) kernel."""
    if r * k < _SERIAL_MAX or get_num_threads() == 1:
        return 1, k, max(r, 1)  # one task: all rows (the serial twin runs it)
    if k >= _CHUNK:
        nck = -(-k // _CHUNK)
        return r * nck, _CHUNK, 1
    rpt = max(1, _CHUNK // max(k, 1))
    return -(-r // rpt), k, rpt


# ============================================================================= segments
def _seg(a, i, j0, j1):
    """``a[i, j0:j1]``, or ``None`` for an absent operand (plain-Python twin of the overload)."""
    return None if a is None else a[i, j0:j1]


def _seg1(a, r0, r1):
    """``a[r0:r1]`` of a 1-D array, or ``None`` for an absent one."""
    return None if a is None else a[r0:r1]


if numba is not None and not _NOJIT:
    from numba.extending import overload as _overload
    from numba.core import types as _types

    @_overload(_seg, inline="always")
    def _ov_seg(a, i, j0, j1):
        # Why the block functions index row segments from 0 rather than a[i, j] with j from
        # range(j0, j1): Numba wraps negative indices (idx < 0 -> idx + dim) unless it can
        # prove idx >= 0, which it cannot for a loop starting at an argument; the per-element
        # sign tests then keep the loop scalar (3.6x slower measured on MSE).  j from
        # range(0, ...) is provably non-negative, and the loop vectorizes.
        if isinstance(a, _types.NoneType):
            return lambda a, i, j0, j1: None
        return lambda a, i, j0, j1: a[i, j0:j1]

    @_overload(_seg1, inline="always")
    def _ov_seg1(a, r0, r1):
        if isinstance(a, _types.NoneType):
            return lambda a, r0, r1: None
        return lambda a, r0, r1: a[r0:r1]


# ============================================================================= row helpers
@njit(**_JIT)
def _mx(a, b):
    return b if b > a else a  # NaN in b is skipped (a NaN in the row shows up in the sum)


@njit(**_JIT)
def _rowmax(x, i, c):
    """Max of row ``i`` of ``x`` (NaN ignored; -inf for an empty row).

    Eight independent running maxima: a single running max is a loop-carried dependency and a
    reduction LLVM vectorizes only under ``nnan`` (not allowed: inf/NaN semantics).  With
    eight chains the scalar ``vmaxss`` run in parallel: 4.5 G el/s per core measured, three
    times the rate of the ``exp`` pass that follows, so it is not the bottleneck (a vectorized
    ``llvm.maxnum`` reduction measured slower, 1.9 G el/s, its NaN fix-ups included).  A NaN
    is skipped here but reaches the row's result through the sum of ``exp``.
    """
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = cast_like(-np.inf, x)
    c8 = c - c % 8
    for j in range(0, c8, 8):
        m0 = _mx(m0, x[i, j])
        m1 = _mx(m1, x[i, j + 1])
        m2 = _mx(m2, x[i, j + 2])
        m3 = _mx(m3, x[i, j + 3])
        m4 = _mx(m4, x[i, j + 4])
        m5 = _mx(m5, x[i, j + 5])
        m6 = _mx(m6, x[i, j + 6])
        m7 = _mx(m7, x[i, j + 7])
    m = _mx(_mx(_mx(m0, m1), _mx(m2, m3)), _mx(_mx(m4, m5), _mx(m6, m7)))
    for j in range(c8, c):
        m = _mx(m, x[i, j])
    return m


@njit(**_JIT)
def _finite(v):
    return v - v == 0  # false for +-inf and nan


@njit(**_JIT)
def _sumexp(x, i, c, shift, neg):
    """``sum_j exp(x[i, j] - shift)``, in float64 across blocks of ``_SUMBLK`` terms.

    ``neg``: ``shift`` is the row's finite maximum, so every argument is <= 0 (or NaN) and
    the cheaper :func:`vexpn` applies (30% faster); otherwise (shift 0 for a row whose max is
    inf or nan) the general :func:`vexp`.
    """
    s = 0.0
    for j0 in range(0, c, _SUMBLK):
        bs = cast_like(0.0, x)
        if neg:
            for j in range(j0, min(c, j0 + _SUMBLK)):
                bs += vexpn(x[i, j] - shift)
        else:
            for j in range(j0, min(c, j0 + _SUMBLK)):
                bs += vexp(x[i, j] - shift)
        s += bs
    return s


@njit(**_JIT)
def _sumexp_store(x, i, c, shift, neg, out):
    """Like :func:`_sumexp`, also storing ``out[i, j] = exp(x[i, j] - shift)``."""
    s = 0.0
    for j0 in range(0, c, _SUMBLK):
        bs = cast_like(0.0, x)
        if neg:
            for j in range(j0, min(c, j0 + _SUMBLK)):
                e = vexpn(x[i, j] - shift)
                out[i, j] = e
                bs += e
        else:
            for j in range(j0, min(c, j0 + _SUMBLK)):
                e = vexp(x[i, j] - shift)
                out[i, j] = e
                bs += e
        s += bs
    return s


@njit(**_JIT)
def _row_lse(x, i, c):
    """(shift, log(sum exp(x - shift))) of row ``i``; ``lse = shift + log_s`` in float64."""
    m = _rowmax(x, i, c)
    fin = _finite(m)
    sh = m if fin else cast_like(0.0, x)
    s = _sumexp(x, i, c, sh, fin)
    return sh, np.log(s)


# ============================================================================= normalizers
@_kernel
def _k_logsumexp(x, out, nb):
    n, c = x.shape
    for b in prange(nb):
        for i in range(b * n // nb, (b + 1) * n // nb):
            sh, ls = _row_lse(x, i, c)
            out[i] = sh + ls


@_kernel
def _k_softmax(x, out, nb):
    n, c = x.shape
    for b in prange(nb):
        for i in range(b * n // nb, (b + 1) * n // nb):
            m = _rowmax(x, i, c)
            if m == np.inf:
                # no softmax for a row holding +inf: NaN throughout, as PyTorch gives (e / s
                # would give 0 or NaN at the finite entries, depending on overflow)
                for j in range(c):
                    out[i, j] = np.nan
                continue
            fin = _finite(m)
            sh = m if fin else cast_like(0.0, x)
            s = _sumexp_store(x, i, c, sh, fin, out)
            # e / s as e * (1/s): one rounding more than a division, far inside the contract
            r = cast_like(1.0 / s, x)
            for j in range(c):
                out[i, j] = out[i, j] * r


@_kernel
def _k_log_softmax(x, out, nb):
    n, c = x.shape
    for b in prange(nb):
        for i in range(b * n // nb, (b + 1) * n // nb):
            sh, ls = _row_lse(x, i, c)
            # (x - shift) - log s rather than x - lse: with huge logits (3e38) lse rounds to the
            # max and the O(1) part would be lost.  A row of only -inf: -inf - -inf = nan, as
            # PyTorch gives.  A row holding +inf (log s = inf): NaN throughout, as PyTorch.
            lsd = cast_like(ls, x)
            if ls == np.inf:
                lsd = cast_like(np.nan, x)
            for j in range(c):
                out[i, j] = sub_sub(x[i, j], sh, lsd)


@_kernel
def _k_softmax_backward(g, y, out, nb):
    n, c = y.shape
    for b in prange(nb):
        for i in range(b * n // nb, (b + 1) * n // nb):
            d = 0.0
            for j in range(c):
                d += g[i, j] * y[i, j]
            dd = cast_like(d, y)
            for j in range(c):
                out[i, j] = y[i, j] * (g[i, j] - dd)


@_kernel
def _k_log_softmax_backward(g, y, out, nb):
    n, c = y.shape
    for b in prange(nb):
        for i in range(b * n // nb, (b + 1) * n // nb):
            sg = 0.0
            for j in range(c):
                sg += g[i, j]
            s = cast_like(sg, y)
            for j in range(c):
                out[i, j] = g[i, j] - vexp(y[i, j]) * s


# ============================================================================= cross-entropy
@njit(**_JIT)
def _ce_row(x, i, c, t, w, sumw, eps, z, loss, grad, gs):
    """Loss (and gradient) of one non-ignored row of the hard-target cross-entropy."""
    m = _rowmax(x, i, c)
    fin = _finite(m)
    sh = m if fin else cast_like(0.0, x)
    xt = x[i, t]  # read before grad (which may be x) is written
    wt = 1.0 if w is None else np.float64(w[t])
    # pass 2: s = sum exp(x - sh) (stored as e into grad when that buffer will be rescaled),
    # and for label smoothing sw = sum_c w_c (x_c - sh); all reads of x happen here.
    store = grad is not None and fin
    sw = 0.0
    if eps != 0.0:
        # its own loop (float64 sums; mixed with the float32 exp sums LLVM keeps a loop
        # scalar), before the exp pass, which may overwrite x
        # x - sh through sub_sub (no reassoc): LLVM would otherwise distribute the sum into
        # sum(x) - c sh, the garbage difference of two huge sums for logits near the max
        zero = cast_like(0.0, x)
        if w is None:
            for j in range(c):
                sw += np.float64(sub_sub(x[i, j], sh, zero))
        else:
            for j in range(c):
                v = np.float64(sub_sub(x[i, j], sh, zero))
                # 0 where x_c is the max: an infinite weight there must give inf (through
                # sumw * log s), not inf * 0 = nan
                sw += np.float64(w[j]) * v if v != 0.0 else 0.0
    if store:
        s = _sumexp_store(x, i, c, sh, fin, grad)
    else:
        s = _sumexp(x, i, c, sh, fin)
    ls = np.log(s)
    lse = np.float64(sh) + ls
    # -log p[t] = log s - (x[t] - shift), not lse - x[t]: huge logits (3e38) keep their O(1)
    # part.  +inf when x[t] = -inf (log s is finite then).
    row = (1.0 - eps) * wt * neg_log_p(ls, xt, sh)
    if eps != 0.0:
        # sum_c w_c (lse - x_c) = sumw * log s - sum_c w_c (x_c - sh)
        row += eps / c * (sumw * ls - sw)
    if z != 0.0:
        row += z * lse * lse
    loss[i] = row
    if grad is not None:
        # d row / d x_j = a p_j - eps/C w_j - (1-eps) w_t [j = t],  a = (1-eps) w_t + eps/C sumw + 2 z lse
        # (the smoothing term only with eps != 0: 0 * sumw is nan for a nan weight of an
        # unused class)
        a = (1.0 - eps) * wt + 2.0 * z * lse
        if eps != 0.0:
            a += eps / c * sumw
        ce = cast_like(gs * eps / c, x)
        if fin:
            cg = cast_like(gs * a / s, x)  # grad holds e = exp(x - m); p = e / s
            if eps == 0.0:
                for j in range(c):
                    grad[i, j] = grad[i, j] * cg
            elif w is None:
                for j in range(c):
                    grad[i, j] = grad[i, j] * cg - ce
            else:
                for j in range(c):
                    grad[i, j] = grad[i, j] * cg - ce * w[j]
        else:
            # +inf (or nan) in the row: p = exp(x - lse) as the reference computes it (0 for
            # finite x, nan at the inf); x is still intact here, it was not overwritten
            cg = cast_like(gs * a, x)
            lsed = cast_like(lse, x)
            for j in range(c):
                p = vexp(x[i, j] - lsed)
                wj = cast_like(1.0, x) if w is None else w[j]
                grad[i, j] = p * cg - ce * wj
        grad[i, t] -= cast_like(gs * (1.0 - eps) * wt, x)


_SMALL_C = 32  # class counts up to this take the column-block path (see _ce_cols_block)
_SB = 256  # rows per block of that path: its (C, _SB) buffers stay in L1/L2


@njit(**_JIT)
def _ce_cols_block(x, target, w, sumw, ignore, eps, z, loss, grad, gsc, gsa, r0, r1,
                   xt, et, sh, sh2, cg, xtt, s, ls, dd, tc, wt, lse):
    """Rows ``[r0, r1)`` of a hard-target cross-entropy with few classes, vectorized across rows.

    With C <= 32 a per-row loop is too short to vectorize, and its row max and row sum are
    dependency chains (a ``select`` or an ``add`` per class, each waiting on the previous one):
    per-row latency, not arithmetic, would set the speed.  So the block is turned on its side,
    ``xt[j, r] = x[r0 + r, j]`` (one scalar transpose, in L1), and every step after that is a
    loop over the *rows* of the block for one class at a time -- independent lanes, which LLVM
    vectorizes: the running max, ``et[j, r] = exp(xt[j, r] - shift[r])``, the float64 row sums
    and their logs, the label-smoothing sums, the per-row loss and gradient coefficients.  Only
    the gather of the target logit and the transpose of the gradient back into ``grad`` rows
    (scaled on the way) are scalar.  Every read of this block of ``x`` happens before the first
    write of its gradient rows, so ``grad`` may be ``x`` (in place).

    Scratch: ``xt``, ``et`` are ``(C, _SB)``; the rest ``(_SB,)``: in the dtype of ``x``
    the shift, a second buffer for the max, the gradient coefficient, the target logit; in
    float64 the row sum, its log, the smoothing sum, the target correction, the target weight
    and lse.  Separate arrays, not rows of one: LLVM then needs no run-time alias checks.
    """
    c = x.shape[1]
    nr = r1 - r0
    zero = cast_like(0.0, x)
    # this block's rows of the per-row arrays, indexed from 0: an index r0 + r (r0 an argument)
    # is not provably >= 0, and Numba's wrap-around test on it would keep the loops scalar
    tg = target[r0:r1]
    lb = loss[r0:r1]
    gb = _seg1(gsa, r0, r1)
    for r in range(nr):
        xr = x[r0 + r]  # a row view: j from range(c) indexes it without wrap-around tests
        for j in range(c):
            xt[j, r] = xr[j]
    # Row max, NaN skipped as in _rowmax (a NaN reaches the result through the sum of exp).
    # Two buffers in turn, not ``sh[r] = max(sh[r], ...)``: LLVM turns that read-modify-write
    # into a masked store (only where the max changes), and AVX2 masked stores are microcoded
    # on AMD cores -- five times slower than this loop.
    for r in range(nr):
        sh[r] = xt[0, r]
    src = sh
    dst = sh2
    for j in range(1, c):
        for r in range(nr):
            dst[r] = _mx(src[r], xt[j, r])
        src, dst = dst, src
    # the shift is 0 for a row whose max is not finite, so inf - inf never happens
    for r in range(nr):
        m = src[r]
        sh[r] = m if _finite(m) else zero
        s[r] = 0.0
    # exp, then the float64 row sums in a loop of their own: a float32 exp and a float64
    # accumulation in one loop do not vectorize (LLVM keeps it scalar)
    for j in range(c):
        for r in range(nr):
            # x - shift <= 0 where the max is finite; the other rows (shift 0) get a row sum
            # that is still right (inf, nan or 0) and are recomputed below
            et[j, r] = vexpn(xt[j, r] - sh[r])
    for j in range(c):
        for r in range(nr):
            s[r] += et[j, r]
    if eps != 0.0:  # sum_j w_j (x_j - shift)
        for r in range(nr):
            dd[r] = 0.0
        for j in range(c):
            wj = 1.0 if w is None else np.float64(w[j])
            for r in range(nr):
                # x - shift as an instruction of its own (sub_sub, compiled without reassoc):
                # under reassoc LLVM distributes the sum into sum(w x) - shift sum(w), which
                # for equal huge logits (1e300) is the garbage difference of two huge sums
                v = np.float64(sub_sub(xt[j, r], sh[r], zero))
                dd[r] += wj * v if v != 0.0 else 0.0  # no inf * 0 at the max (see _ce_row)
    # gathers (scalar): the target logit and weight; an ignored row reads class 0, harmlessly
    for r in range(nr):
        t = tg[r]
        t = 0 if t == ignore else t
        xtt[r] = xt[t, r]
        wt[r] = 1.0 if w is None else np.float64(w[t])
    u = eps / c
    us = u * sumw if eps != 0.0 else 0.0  # no 0 * nan from a nan weight of an unused class
    chk = 0.0
    # per-row loss and gradient coefficients: one loop across rows, vectorized
    for r in range(nr):
        lsr = vlog(s[r])
        ls[r] = lsr
        lser = np.float64(sh[r]) + lsr
        lse[r] = lser
        # -log p[t] = log s - (x[t] - shift): huge logits keep their O(1) part (see _ce_row)
        row = (1.0 - eps) * wt[r] * neg_log_p(lsr, xtt[r], sh[r])
        if eps != 0.0:
            row += u * (sumw * lsr - dd[r])
        if z != 0.0:
            row += z * lser * lser
        lb[r] = row if tg[r] != ignore else 0.0
        if grad is not None:
            # d row / d x_j = a p_j - eps/C w_j - (1-eps) w_t [j = t]
            gs = gsc if gsa is None else gsc * gb[r]
            a = (1.0 - eps) * wt[r] + us + 2.0 * z * lser
            cg[r] = cast_like(gs * a / s[r], x)  # p = e / s
            dd[r] = gs * u
            tc[r] = gs * (1.0 - eps) * wt[r]
            chk += s[r] - s[r]  # 0, or nan once a row sum is inf/nan
    if grad is None:
        return
    if chk != 0.0:  # i.e. nan: some row holds +inf or nan
        for r in range(nr):
            if not _finite(s[r]) and tg[r] != ignore:
                # p = exp(x - lse) as the reference computes it (0 for finite x, nan at the
                # inf), not e / s = inf / inf
                gs = gsc if gsa is None else gsc * gb[r]
                lsed = cast_like(lse[r], x)
                for j in range(c):
                    et[j, r] = vexp(xt[j, r] - lsed)
                cg[r] = cast_like(gs * ((1.0 - eps) * wt[r] + us + 2.0 * z * lse[r]), x)
    for r in range(nr):
        t = tg[r]
        gr = grad[r0 + r]
        if t == ignore:  # exact zeros, whatever the row holds
            for j in range(c):
                gr[j] = zero
            continue
        cgr = cg[r]
        if eps == 0.0:
            for j in range(c):
                gr[j] = et[j, r] * cgr
        else:
            ddr = cast_like(dd[r], x)
            for j in range(c):
                wj = cast_like(1.0, x) if w is None else w[j]
                gr[j] = et[j, r] * cgr - ddr * wj
        gr[t] -= cast_like(tc[r], x)


@_kernel
def _k_cross_entropy_small(x, target, w, sumw, ignore, eps, z, loss, grad, gsc, gsa, nb):
    n, c = x.shape
    for b in prange(nb):
        xt = np.empty((c, _SB), x.dtype)
        et = np.empty((c, _SB), x.dtype)
        sh = np.empty(_SB, x.dtype)
        sh2 = np.empty(_SB, x.dtype)
        cg = np.empty(_SB, x.dtype)
        xtt = np.empty(_SB, x.dtype)
        s = np.empty(_SB, np.float64)
        ls = np.empty(_SB, np.float64)
        dd = np.empty(_SB, np.float64)
        tc = np.empty(_SB, np.float64)
        wt = np.empty(_SB, np.float64)
        lse = np.empty(_SB, np.float64)
        lo = b * n // nb
        hi = (b + 1) * n // nb
        for r0 in range(lo, hi, _SB):
            _ce_cols_block(x, target, w, sumw, ignore, eps, z, loss, grad, gsc, gsa, r0,
                           min(hi, r0 + _SB), xt, et, sh, sh2, cg, xtt, s, ls, dd, tc, wt, lse)


@_kernel
def _k_cross_entropy(x, target, w, sumw, ignore, eps, z, loss, grad, gsc, gsa, nb):
    n, c = x.shape
    for b in prange(nb):
        for i in range(b * n // nb, (b + 1) * n // nb):
            t = target[i]
            if t == ignore:
                loss[i] = 0.0
                if grad is not None:
                    zero = cast_like(0.0, x)
                    for j in range(c):
                        grad[i, j] = zero
                continue
            gs = gsc if gsa is None else gsc * gsa[i]
            _ce_row(x, i, c, t, w, sumw, eps, z, loss, grad, gs)


@njit(**_JIT)
def _ce_soft_row(x, y, i, c, w, eps, z, loss, grad, gs):
    """Loss (and gradient) of one row of the probability-target cross-entropy."""
    m = _rowmax(x, i, c)
    fin = _finite(m)
    sh = m if fin else cast_like(0.0, x)
    store = grad is not None and fin
    u = eps / c
    keep = 1.0 - eps
    sy = 0.0  # sum_c y'_c w_c
    syx = 0.0  # sum_c y'_c w_c (x_c - sh), terms with y'_c w_c = 0 left out (no 0 * inf)
    # Two loops, not one: the target sums are float64 and the exp sums float32 blocks; mixed in
    # one loop LLVM keeps it scalar.  The target pass comes first because the exp pass may
    # overwrite x (grad is x when in place); the row is in L2 for the second read.
    for j in range(c):
        v = np.float64(x[i, j] - sh)
        yw = keep * np.float64(y[i, j]) + u
        if w is not None:
            yw *= np.float64(w[j])
        sy += yw
        # also 0 at the row max (v = 0): an infinite y'w there gives inf through sy * log s
        syx += yw * v if yw != 0.0 and v != 0.0 else 0.0
    s = _sumexp_store(x, i, c, sh, fin, grad) if store else _sumexp(x, i, c, sh, fin)
    ls = np.log(s)
    lse = np.float64(sh) + ls
    # sum_c y'w (lse - x_c) = sy * log s - sum_c y'w (x_c - sh)
    row = sy * ls - syx
    if z != 0.0:
        row += z * lse * lse
    loss[i] = row
    if grad is not None:
        a = sy + 2.0 * z * lse
        uu = cast_like(u, x)
        kk = cast_like(keep, x)
        gsd = cast_like(gs, x)
        if fin:
            cg = cast_like(gs * a / s, x)
            for j in range(c):
                yw = kk * y[i, j] + uu
                if w is not None:
                    yw *= w[j]
                grad[i, j] = grad[i, j] * cg - gsd * yw
        else:
            cg = cast_like(gs * a, x)
            lsed = cast_like(lse, x)
            for j in range(c):
                yw = kk * y[i, j] + uu
                if w is not None:
                    yw *= w[j]
                grad[i, j] = vexp(x[i, j] - lsed) * cg - gsd * yw


@_kernel
def _k_cross_entropy_soft(x, y, w, eps, z, loss, grad, gsc, gsa, nb):
    n, c = x.shape
    for b in prange(nb):
        for i in range(b * n // nb, (b + 1) * n // nb):
            gs = gsc if gsa is None else gsc * gsa[i]
            _ce_soft_row(x, y, i, c, w, eps, z, loss, grad, gs)


# ============================================================================= elementwise
# Each block function handles rows [r0, r1) x columns [j0, j1) and returns its float64 loss
# sum; the parallel driver maps tasks to blocks (see _tasks) and reduces the sums.


@njit(**_JIT)
def _block_total(bs, seg, scr, jb, je):
    """The float64 total of one block of elementwise losses whose compute-dtype sum is ``bs``.

    The block sums run in the compute dtype (a float64 accumulator keeps the loops scalar, see
    ``_EBLK``), so float32 losses near FLT_MAX can overflow a block sum that the float64 total
    holds (two losses of 2e38).  Then the block's stored losses -- ``seg[jb:je]`` (the loss
    output) or ``scr[:je - jb]`` (scratch, when the losses are not asked for) -- are summed
    again in float64; a genuinely inf/NaN loss gives the same inf/NaN.  Rare, and outside the
    hot loop.  ``abs(bs) < inf``, not ``math.isfinite``: Numba writes isfinite as
    ``x - x == x - x``, which this fastmath set folds to true."""
    if abs(bs) < np.inf:
        return float(bs)
    t = 0.0
    if seg is None:
        for k in range(je - jb):
            t += float(scr[k])  # float(): in plain Python a Python float + np.float32 stays float32
    else:
        for j in range(jb, je):
            t += float(seg[j])
    return t


# Each elementwise loss is written once, as an element function
# ``elem(a, b, p, q, c1, c2) -> (loss, dloss/da, dloss/dq)`` of one element's values
# (``p``/``q`` are None where the operand is absent, which prunes their code; ``c1``/``c2`` are
# per-call constants), and ``_make_ew_block`` wraps it in the one block loop that all of them
# share: row segments, blocks of ``_EBLK`` with a compute-dtype sum, the gradient scale, the
# optional loss output.  Numba inlines ``elem`` into the loop, so terms a call does not need
# (the gradient without ``grad``) are dropped by LLVM, and the loop vectorizes as if written
# out (checked in tests/test_numba_math.py).
# Element functions are inlined at Numba's IR level (a big one, exp and log1p inside, stays a
# call when left to LLVM, and a loop with a call does not vectorize: BCE with logits measured
# 8x slower), where ``if w is None`` on an inlined argument is no longer pruned by type; an
# absent operand is therefore handled by the overloads below, which are chosen by type.
def _at(seg, j):
    """``seg[j]``, or ``None`` for an absent operand (plain-Python twin of the overload)."""
    return None if seg is None else seg[j]


def _mul_opt(v, w):
    """``v * w``, or ``v`` when the factor ``w`` is absent (None)."""
    return v if w is None else v * w


def _if_absent(o, a, b):
    """``a`` when operand ``o`` is absent (None), else ``b``."""
    return a if o is None else b


if numba is not None and not _NOJIT:
    @_overload(_at, inline="always")
    def _ov_at(seg, j):
        if isinstance(seg, _types.NoneType):
            return lambda seg, j: None
        return lambda seg, j: seg[j]

    @_overload(_mul_opt, inline="always")
    def _ov_mul_opt(v, w):
        if isinstance(w, _types.NoneType):
            return lambda v, w: v
        return lambda v, w: v * w

    @_overload(_if_absent, inline="always")
    def _ov_if_absent(o, a, b):
        if isinstance(o, _types.NoneType):
            return lambda o, a, b: a
        return lambda o, a, b: b


# Element functions with exp/log inside are inlined at the IR level (see _at); the small ones
# (KL, MSE) are left to LLVM, which inlines them anyway: IR inlining costs compile time
# (measured: a serial elementwise kernel compiles in ~2.5 s instead of ~1.7 s with it).
_EJIT = dict(_JIT, inline="always") if _JIT else {}


def _make_ew_block(elem):
    """``blk(a, b, p, q, c1, c2, loss, grad, grad2, gs, gout, r0, r1, j0, j1)``: ``elem`` over
    rows ``r0:r1``, columns ``j0:j1`` of the (R, K) operands; returns the float64 loss total.

    ``grad[j] = g * gs * gout[j]`` and ``grad2[j] = g2 * gs * gout[j]`` (each optional;
    ``gout`` None means ones); ``loss`` optional.  Block sums run in the compute dtype, and a
    block whose sum overflows is summed again in float64 (``_block_total``)."""

    def row(a_, b_, p_, q_, c1, c2, loss_, grad_, grad2_, gout_, gsd, scr, n):
        # one row segment.  A function of its own rather than the body of blk's row loop:
        # measured, KL with log-targets ran 1.25x slower with this loop nested in blk (LLVM
        # unrolled the vector loop half as much there); the other losses do not care
        tot = 0.0
        for jb in range(0, n, _EBLK):
            je = min(n, jb + _EBLK)
            bs = cast_like(0.0, a_)
            for j in range(jb, je):
                l, g, g2 = elem(a_[j], b_[j], _at(p_, j), _at(q_, j), c1, c2)
                if grad_ is not None or grad2_ is not None:
                    sc = gsd
                    if gout_ is not None:
                        sc = sc * gout_[j]
                    if grad_ is not None:
                        grad_[j] = g * sc
                    if grad2_ is not None:
                        grad2_[j] = g2 * sc
                if loss_ is not None:
                    loss_[j] = l
                else:
                    scr[j - jb] = l
                bs += l
            tot += _block_total(bs, loss_, scr, jb, je)
        return tot

    row.__name__ = row.__qualname__ = f"_row_of{elem.__name__}"
    row = njit(**_JIT)(row)

    def blk(a, b, p, q, c1, c2, loss, grad, grad2, gs, gout, r0, r1, j0, j1):
        tot = 0.0
        scr = np.empty(_EBLK, a.dtype)  # the block's losses when they are not stored
        gsd = cast_like(gs, a)
        for i in range(r0, r1):
            tot += row(_seg(a, i, j0, j1), _seg(b, i, j0, j1), _seg(p, i, j0, j1), _seg(q, i, j0, j1), c1, c2,
                       _seg(loss, i, j0, j1), _seg(grad, i, j0, j1), _seg(grad2, i, j0, j1),
                       _seg(gout, i, j0, j1), gsd, scr, j1 - j0)
        return tot

    blk.__name__ = blk.__qualname__ = f"_block_of{elem.__name__}"
    return njit(**_JIT)(blk)


@njit(**_EJIT)
def _bcel_elem(z, y, w, pw, c1, c2):
    """Binary cross-entropy with logits: ``(1 - y) z + c softplus(-z)``, ``c = 1 + (pw - 1) y``."""
    one = cast_like(1.0, z)
    zero = cast_like(0.0, z)
    # e = exp(-|z|) in (0, 1]: softplus(-z) = max(-z, 0) + log1p(e)
    na = -z if z > zero else z
    e = vexpn(na)
    mz = -z if -z > zero else zero
    lp, r = vlog1p_recip(e)  # r = 1 / (1 + e), reused by the gradient
    sp = mz + lp
    er = e * r
    pos = z >= zero
    # c = 1 + (pw - 1) y; without pos_weight the gradient is sigmoid(z) - y, with it
    # (1 - y) - c sigmoid(-z) (sigmoid(-z) = 1 - sigmoid(z) formed without cancellation)
    cpw = _if_absent(pw, one, one + (_if_absent(pw, one, pw) - one) * y)
    l = (one - y) * z + cpw * sp
    g = _if_absent(pw, (r if pos else er) - y, (one - y) - cpw * (er if pos else r))
    return _mul_opt(l, w), _mul_opt(g, w), zero


_BCE_EPS = float(np.float32(1e-12))  # a global: a compile-time constant


@njit(**_EJIT)
def _bce_elem(p, y, w, q, c1, c2):
    """Binary cross-entropy on probabilities, PyTorch's clamps: each log term at -100 (the
    "not less than" form keeps NaN), the gradient's ``p (1 - p)`` at ``float32(1e-12)`` (ATen's
    constant is a float, also for float64 input)."""
    one = cast_like(1.0, p)
    lo = cast_like(-100.0, p)
    tiny = cast_like(_BCE_EPS, p)
    a = vlog(p)
    a = a if not (a < lo) else lo
    b = vlog1p(-p)
    b = b if not (b < lo) else lo
    l = bce_mix(y, a, b)
    den = p * (one - p)
    den = den if not (den < tiny) else tiny
    g = (p - y) / den
    return _mul_opt(l, w), _mul_opt(g, w), cast_like(0.0, p)


@njit(**_JIT)
def _kl_elem(x, t, p, q, c1, c2):
    """KL term ``t (log t - x)``, 0 where ``t == 0``.  The log stays outside the select: LLVM
    does not speculate a call-sized expression out of a branch, and a branch keeps the loop
    scalar."""
    zero = cast_like(0.0, x)
    lt = vlog(t)
    return (zero if t == zero else t * (lt - x)), -t, zero


@njit(**_JIT)
def _kl_log_elem(x, t, p, q, c1, c2):
    """KL term with a log-target: ``exp(t) (t - x)``, taken as 0 where ``t = -inf`` (PyTorch:
    nan)."""
    zero = cast_like(0.0, x)
    ninf = cast_like(-np.inf, x)
    et = vexp(t)  # 0 at t = -inf: the gradient -et needs no case, the loss 0 * inf does
    return (zero if t == ninf else et * (t - x)), -et, zero


@njit(**_JIT)
def _mse_elem(x, t, p, q, c1, c2):
    d = x - t
    return d * d, d * cast_like(2.0, x), cast_like(0.0, x)


_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)  # a global: a compile-time constant


@njit(**_EJIT)
def _gnll_elem(x, t, var, q, full, eps):
    """Gaussian NLL ``(log v + d^2 / v) / 2`` (+ ``log(2 pi) / 2`` when ``full``) with
    ``v = max(var, eps)`` (NaN kept); gradients at the clamped ``v``, as PyTorch's no-grad
    clamp gives: ``d / v`` and ``(1/v - d^2/v^2) / 2``."""
    half = cast_like(0.5, x)
    one = cast_like(1.0, x)
    epsd = cast_like(eps, x)
    v = var if not (var < epsd) else epsd
    d = x - t
    iv = one / v
    l = half * (vlog(v) + d * d * iv)
    if full:
        l = l + cast_like(_HALF_LOG_2PI, x)
    return l, d * iv, half * (iv - d * d * iv * iv)


_bcel_block = _make_ew_block(_bcel_elem)
_bce_block = _make_ew_block(_bce_elem)
_kl_block = _make_ew_block(_kl_elem)
_kl_log_block = _make_ew_block(_kl_log_elem)
_mse_block = _make_ew_block(_mse_elem)
_gnll_block = _make_ew_block(_gnll_elem)


@njit(**_JIT)
def _task_range(task, r, k, ck, rpt):
    """(r0, r1, j0, j1) of elementwise task ``task`` (see _tasks)."""
    if rpt == 1 and ck < k:
        nck = (k + ck - 1) // ck
        i = task // nck
        j0 = (task % nck) * ck
        return i, i + 1, j0, min(k, j0 + ck)
    if rpt == 1:
        return task, task + 1, 0, k
    r0 = task * rpt
    return r0, min(r, r0 + rpt), 0, k


@_kernel
def _k_bce_with_logits(z, y, w, pw, loss, grad, gs, gout, ntask, ck, rpt):
    r, k = z.shape
    tot = 0.0
    for task in prange(ntask):
        r0, r1, j0, j1 = _task_range(task, r, k, ck, rpt)
        tot += _bcel_block(z, y, w, pw, 0, 0.0, loss, grad, None, gs, gout, r0, r1, j0, j1)
    return tot


@_kernel
def _k_bce(p, y, w, loss, grad, gs, gout, ntask, ck, rpt):
    r, k = p.shape
    tot = 0.0
    for task in prange(ntask):
        r0, r1, j0, j1 = _task_range(task, r, k, ck, rpt)
        tot += _bce_block(p, y, w, None, 0, 0.0, loss, grad, None, gs, gout, r0, r1, j0, j1)
    return tot


@_kernel
def _k_kl_div(x, t, log_target, loss, grad, gs, gout, ntask, ck, rpt):
    r, k = x.shape
    tot = 0.0
    for task in prange(ntask):
        r0, r1, j0, j1 = _task_range(task, r, k, ck, rpt)
        # the formula is chosen once per task, outside the loops: a branch on a run-time
        # flag inside the loop keeps LLVM from vectorizing it (measured 2x slower)
        if log_target:
            tot += _kl_log_block(x, t, None, None, 0, 0.0, loss, grad, None, gs, gout, r0, r1, j0, j1)
        else:
            tot += _kl_block(x, t, None, None, 0, 0.0, loss, grad, None, gs, gout, r0, r1, j0, j1)
    return tot


@_kernel
def _k_mse(x, t, loss, grad, gs, gout, ntask, ck, rpt):
    r, k = x.shape
    tot = 0.0
    for task in prange(ntask):
        r0, r1, j0, j1 = _task_range(task, r, k, ck, rpt)
        tot += _mse_block(x, t, None, None, 0, 0.0, loss, grad, None, gs, gout, r0, r1, j0, j1)
    return tot


@_kernel
def _k_gaussian_nll(x, t, var, full, eps, loss, grad, grad_var, gs, gout, ntask, ck, rpt):
    r, k = x.shape
    tot = 0.0
    for task in prange(ntask):
        r0, r1, j0, j1 = _task_range(task, r, k, ck, rpt)
        tot += _gnll_block(x, t, var, None, full, eps, loss, grad, grad_var, gs, gout, r0, r1, j0, j1)
    return tot


# ============================================================================= entry points
# Every distinct tuple of argument types is one more compiled specialization (seconds of
# LLVM each, twice with the serial twin), and Numba's array type holds the layout and the
# read-only flag: a C-contiguous array, the same values in a stride-0 broadcast view and a
# writable copy are three specializations of every kernel they reach.  The entry points
# therefore hand the kernels few types: every input as a read-only view (a kernel never
# writes its inputs; the flag changes no machine code) and every 1-D operand (class
# weights, targets, per-row losses) C-contiguous -- copying C or N values costs nothing
# next to the N x C pass.
def _ro(a):
    """``a`` as a read-only view (``None`` stays ``None``): one type for every input."""
    if a is None or not a.flags.writeable:
        return a
    v = a.view()
    v.flags.writeable = False
    return v


def _vec(a, dtype=None):
    """A 1-D operand C-contiguous and read-only (a copy only when it is strided)."""
    if a is None:
        return None
    return _ro(np.ascontiguousarray(a, dtype=dtype))


def _rows_out(loss, run):
    """Run ``run(buf)`` on a C-contiguous per-row output buffer and copy it into ``loss``
    when ``loss`` itself is strided."""
    if loss.flags.c_contiguous:
        run(loss)
        return
    buf = np.empty(loss.shape, loss.dtype)
    run(buf)
    loss[...] = buf


def _gscale_rows(gscale, n):
    """Split a row scale into (scalar, per-row float64 array or None)."""
    g = np.asarray(gscale, dtype=np.float64)
    if g.ndim == 0:
        return float(g), None
    return 1.0, np.ascontiguousarray(np.broadcast_to(g, (n,)))




def _elementwise_layout(first, *arrays):
    """Transpose every operand when the first is Fortran-ordered (the kernels prefer C rows).

    The kernels are elementwise, so any consistent permutation of the axes is valid.
    """
    if first.ndim == 2 and not first.flags.c_contiguous and first.flags.f_contiguous:
        return tuple(None if a is None else a.T for a in (first,) + arrays)
    return (first,) + arrays


def logsumexp(x, out):
    if x.shape[0] == 0:
        return
    _rows_out(out, lambda o: _call(_k_logsumexp, x.size, _ro(x), o, _nblocks(x.shape[0], x.size)))


def softmax(x, out):
    if x.size == 0:
        return
    _call(_k_softmax, x.size, _ro(x), out, _nblocks(x.shape[0], x.size))


def log_softmax(x, out):
    if x.size == 0:
        return
    _call(_k_log_softmax, x.size, _ro(x), out, _nblocks(x.shape[0], x.size))


def softmax_backward(g, y, out):
    if y.size == 0:
        return
    _call(_k_softmax_backward, y.size, _ro(g), _ro(y), out, _nblocks(y.shape[0], y.size))


def log_softmax_backward(g, y, out):
    if y.size == 0:
        return
    _call(_k_log_softmax_backward, y.size, _ro(g), _ro(y), out, _nblocks(y.shape[0], y.size))


def cross_entropy(x, target, weight, ignore_index, label_smoothing, z_loss, loss, grad, gscale):
    n, c = x.shape
    if n == 0:
        return
    sumw = float(c) if weight is None else float(np.sum(weight, dtype=np.float64))
    gsc, gsa = _gscale_rows(gscale if grad is not None else 1.0, n)
    # few classes: the column-block kernel, in any layout (it transposes blocks of rows itself)
    kern = _k_cross_entropy_small if c <= _SMALL_C else _k_cross_entropy
    args = (_ro(x), _vec(target, np.int64), _vec(weight), sumw, int(ignore_index), float(label_smoothing),
            float(z_loss))
    _rows_out(loss, lambda lo: _call(kern, x.size, *args, lo, grad, gsc, _vec(gsa), _nblocks(n, x.size)))


def cross_entropy_soft(x, target, weight, label_smoothing, z_loss, loss, grad, gscale):
    n, c = x.shape
    if n == 0:
        return
    gsc, gsa = _gscale_rows(gscale if grad is not None else 1.0, n)
    args = (_ro(x), _ro(target), _vec(weight), float(label_smoothing), float(z_loss))
    _rows_out(loss, lambda lo: _call(_k_cross_entropy_soft, x.size, *args, lo, grad, gsc, _vec(gsa),
                                     _nblocks(n, x.size)))


def bce_with_logits(z, y, weight, pos_weight, loss, grad, gscale, gout):
    if z.size == 0:
        return 0.0
    gs = float(gscale)  # a scalar (the protocol): a per-element scale arrives as gout
    z, y, weight, pos_weight, loss, grad, gout = _elementwise_layout(
        z, y, weight, pos_weight, loss, grad, gout)
    return float(_call(_k_bce_with_logits, z.size, _ro(z), _ro(y), _ro(weight), _ro(pos_weight), loss, grad,
                       gs, _ro(gout), *_tasks(*z.shape)))


def bce(p, y, weight, loss, grad, gscale, gout):
    if p.size == 0:
        return 0.0
    gs = float(gscale)  # a scalar (the protocol): a per-element scale arrives as gout
    p, y, weight, loss, grad, gout = _elementwise_layout(p, y, weight, loss, grad, gout)
    return float(_call(_k_bce, p.size, _ro(p), _ro(y), _ro(weight), loss, grad, gs, _ro(gout),
                       *_tasks(*p.shape)))


def kl_div(x, t, log_target, loss, grad, gscale, gout):
    if x.size == 0:
        return 0.0
    gs = float(gscale)  # a scalar (the protocol): a per-element scale arrives as gout
    x, t, loss, grad, gout = _elementwise_layout(x, t, loss, grad, gout)
    return float(_call(_k_kl_div, x.size, _ro(x), _ro(t), bool(log_target), loss, grad, gs, _ro(gout),
                       *_tasks(*x.shape)))


def mse(x, t, loss, grad, gscale, gout):
    if x.size == 0:
        return 0.0
    gs = float(gscale)  # a scalar (the protocol): a per-element scale arrives as gout
    x, t, loss, grad, gout = _elementwise_layout(x, t, loss, grad, gout)
    return float(_call(_k_mse, x.size, _ro(x), _ro(t), loss, grad, gs, _ro(gout), *_tasks(*x.shape)))


def gaussian_nll(x, t, var, full, eps, loss, grad, grad_var, gscale, gout):
    if x.size == 0:
        return 0.0
    gs = float(gscale)  # a scalar (the protocol): a per-element scale arrives as gout
    x, t, var, loss, grad, grad_var, gout = _elementwise_layout(
        x, t, var, loss, grad, grad_var, gout)
    return float(_call(_k_gaussian_nll, x.size, _ro(x), _ro(t), _ro(var), bool(full), float(eps), loss,
                       grad, grad_var, gs, _ro(gout), *_tasks(*x.shape)))


# ============================================================================= warmup
def warmup(dtypes=("float32", "float64"), layouts=("C", "A"), progress=None) -> int:
    """Compile (and cache on disk) the kernel specializations the public layer can reach.

    For each compute dtype and each layout -- ``"C"`` (C-contiguous operands) and ``"A"``
    (strided views, which also stand for Fortran order) -- every entry point is called on a
    tiny input with the argument types the public layer produces: for the row-wise kernels
    with and without class weights and gradient (the cross-entropy on its general and its
    few-classes path, and in place); for the elementwise kernels each reduction's
    (loss, grad, grad_output) pattern, with the optional operands (weight, pos_weight, var)
    absent or broadcast (stride-0).  Rarer mixtures (say a C-contiguous input with a
    Fortran-ordered ``grad_out``) compile on first use.
    Each kernel has a parallel and a serial twin (small calls run serially, see ``_call``);
    both are compiled.  Later processes load the machine code from Numba's cache instead of
    compiling.

    Parameters
    ----------
    dtypes, layouts : sequences of str
        Subsets to compile.
    progress : callable, optional
        Called as ``progress(done, total, label)`` after each compilation.

    Returns
    -------
    int
        Number of kernel calls made.
    """
    import itertools

    jobs = []

    def arr(shape, dt, layout, fill=0.5):
        a = np.full(shape, fill, dt)
        if layout == "C":
            return a
        big = np.full((shape[0], 2 * shape[1]) if len(shape) == 2 else (2 * shape[0],), fill, dt)
        return big[:, ::2] if len(shape) == 2 else big[::2]

    for dname, lay in itertools.product(dtypes, layouts):
        dt = np.dtype(dname)
        for c in (40, 8):  # 8 classes: the small-class path
            n = 3
            x = arr((n, c), dt, lay)
            y = arr((n, c), dt, lay, 1.0 / c)
            t = np.zeros(n, np.int64)
            w1 = np.ones(c, dt)
            for name in ("logsumexp", "softmax", "log_softmax"):
                out = np.zeros(n if name == "logsumexp" else (n, c), dt)
                jobs.append((f"{name} {dname} {lay}", globals()[name], (x, out)))
            for name in ("softmax_backward", "log_softmax_backward"):
                jobs.append((f"{name} {dname} {lay}", globals()[name], (x, y, np.zeros((n, c), dt))))
            for w, g in itertools.product((None, w1), (None, np.zeros((n, c), dt))):
                # the public layer passes a per-row float64 gscale exactly when it wants a grad
                gs = 1.0 if g is None else np.ones(n)
                jobs.append((f"cross_entropy {dname} {lay} C={c}", cross_entropy,
                             (x, t, w, -100, 0.1, 0.0, np.zeros(n), g, gs)))
                if lay == "A" and g is not None:  # in place on a strided view: grad is 'A' too
                    xi = arr((n, c), dt, lay)
                    jobs.append((f"cross_entropy {dname} {lay} in place", cross_entropy,
                                 (xi, t, w, -100, 0.1, 0.0, np.zeros(n), xi, gs)))
                jobs.append((f"cross_entropy_soft {dname} {lay}", cross_entropy_soft,
                             (x, y, w, 0.1, 0.0, np.zeros(n), g, gs)))
        shape = (2, 16)
        a = arr(shape, dt, lay)
        bcast = np.broadcast_to(np.full(shape[1], 0.5, dt), shape)  # stride-0 rows
        out = np.zeros(shape, dt)
        # (loss, grad, gout) as the public layer passes them: reductions "mean"/"sum" give no
        # loss array and a scalar grad scale; "none" gives a loss array and, with a grad, an
        # optional (broadcast) grad_output
        outs = [(None, None, None), (None, out, None), (out, None, None), (out, out, None),
                (out, out, bcast)]
        # optional operands (weight, pos_weight, var) arrive broadcast to the input's shape
        opts = (None, bcast) if lay == "C" else (None,)
        lbl = f"{dname} {lay}"
        for loss, g, go in outs:
            jobs.append(("kl_div " + lbl, kl_div, (a, a, False, loss, g, 1.0, go)))
            jobs.append(("mse " + lbl, mse, (a, a, loss, g, 1.0, go)))
            for w in opts:
                jobs.append(("bce " + lbl, bce, (a, a, w, loss, g, 1.0, go)))
                for pw in opts:
                    jobs.append(("bce_with_logits " + lbl, bce_with_logits, (a, a, w, pw, loss, g, 1.0, go)))
            for var in ((a, bcast) if lay == "C" else (a,)):
                jobs.append(("gaussian_nll " + lbl, gaussian_nll,
                             (a, a, var, False, 1e-6, loss, g, g, 1.0, go)))
    global _force_mode
    total = 2 * len(jobs)
    done = 0
    try:
        for mode in ("serial", "parallel"):  # both twins of every kernel
            _force_mode = mode
            for label, fn, args in jobs:
                fn(*args)
                done += 1
                if progress is not None:
                    progress(done, total, f"{label} ({mode})")
    finally:
        _force_mode = None
    return total
