"""Compilation and execution of the numba backend's kernels: the jit options, the
parallel/serial twin of every entry kernel and the choice between them, the thread bound and
its guard, the task decompositions, and the optional-operand segment helpers.

Tunables (block sizes, thresholds) live here and in the modules that use them; tests patch
them on this module.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from ... import _config as cfg
from .. import forked_serial, thread_cap_now
from . import _cache

NAME = "numba"

try:  # the registry reports the backend unavailable (with this reason) if numba is missing
    import numba
    from numba import njit, prange

    _IMPORT_ERROR = ""
except Exception as exc:  # pragma: no cover - exercised only without numba
    numba = None
    _IMPORT_ERROR = f"numba cannot be imported ({type(exc).__name__}: {exc})"

if numba is not None:
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
    _CACHE_INFO = _cache.setup()
    _PJIT = dict(_JIT, parallel=True, cache=_CACHE_INFO["enabled"])
    _SJIT = dict(_JIT, cache=_CACHE_INFO["enabled"])
    _NOJIT = bool(numba.config.DISABLE_JIT)  # NUMBA_DISABLE_JIT=1: kernels run as Python
else:  # pragma: no cover
    _JIT = _PJIT = _SJIT = {}
    _NOJIT = False
    _CACHE_INFO = _cache.setup(_IMPORT_ERROR)

    def njit(*a, **k):
        return lambda f: f

    prange = range

# The tunables (fastloss/_config.py): the block sizes are compiled into the kernels, as globals
# of this module; the thresholds are read from _config at each call.
_SUMBLK = cfg.NUMBA_SUM_BLOCK
_EBLK = cfg.NUMBA_LOSS_BLOCK


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
    """Run kernel ``kern`` on ``args``: serially for small ``work``, else in parallel (also
    with one thread: see ``_call_jit``).

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
    # serial for small work only -- a choice by shape, never by thread count: the twins are
    # compiled apart and LLVM may vectorize (reassociate, contract to FMA) a loop differently
    # in each, so choosing by thread count could change a result's last bits between 1 and 2
    # threads (tests/test_determinism.py).  One thread runs the parallel kernel on one worker.
    if _fork_serial or _force_mode == "serial" or (_force_mode is None and work < cfg.NUMBA_SERIAL_MAX):
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
        # the calling thread's cap (fastloss._backends.thread_cap); Numba's own thread count
        # is per calling thread too, so applying it affects no other thread's calls
        cap = thread_cap_now()
        if 0 < cap < n:
            n = cap
        if numba.get_num_threads() != n:
            numba.set_num_threads(n)
        return self

    def __exit__(self, *exc):
        if self.locked:
            _call_lock.release()
        return False


def _nblocks(n, work):
    """Row blocks for a row-wise kernel: one per thread (more would only add overhead),
    a single one for work that runs serially (see ``_call``).  Each row's result does not
    depend on the block it falls in."""
    if work < cfg.NUMBA_SERIAL_MAX:
        return 1
    return max(1, min(n, get_num_threads()))


def _tasks(r, k):
    """(number of tasks, column chunk, rows per task) for an elementwise (R, K) kernel.

    A function of the shape alone -- never of the thread count -- so that the tasks' totals,
    added in task order, give the same reduced loss whichever threads run them."""
    if r * k < cfg.NUMBA_SERIAL_MAX:
        return 1, k, max(r, 1)  # one task: all rows (the serial twin runs it)
    chunk = cfg.NUMBA_CHUNK
    if k >= chunk:
        nck = -(-k // chunk)
        return r * nck, chunk, 1
    rpt = max(1, chunk // max(k, 1))
    return -(-r // rpt), k, rpt


# ============================================================================= segments
def _seg(a, i, j0, j1):
    """``a[i, j0:j1]``, or ``None`` for an absent operand (plain-Python twin of the overload)."""
    return None if a is None else a[i, j0:j1]


def _seg1(a, r0, r1):
    """``a[r0:r1]`` of a 1-D array, or ``None`` for an absent one."""
    return None if a is None else a[r0:r1]


def _src(xr, gr):
    """The row to read: ``xr``, or ``gr`` (the gradient row, written in place over the
    logits) when ``xr`` is None (plain-Python twin of the overload)."""
    return gr if xr is None else xr


def _readonly(a):
    """``a`` as a read-only array (plain-Python twin of the overload: a read-only view)."""
    v = a.view()
    v.flags.writeable = False
    return v


if numba is not None and not _NOJIT:
    from numba.core.imputils import impl_ret_borrowed as _borrowed
    from numba.extending import intrinsic as _intrinsic
    from numba.extending import overload as _overload
    from numba.core import types as _types

    @_intrinsic
    def _readonly_ir(typingctx, a):
        # the same array value, typed read-only (the two types share one data model).  Why:
        # the row helpers are compiled once per argument type, and the logits arrive read-only
        # (``_ro``) while a kernel's scratch row (a capped row) is writable -- read through
        # this, the scratch row calls the helpers' read-only specializations instead of
        # compiling each helper a second time (``fastloss warmup``'s time)
        rt = a.copy(readonly=True)

        def codegen(context, builder, sig, args):
            return _borrowed(context, builder, sig.return_type, args[0])

        return rt(a), codegen

    @_overload(_readonly, inline="always")
    def _ov_readonly(a):
        return lambda a: _readonly_ir(a)

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

    @_overload(_src, inline="always")
    def _ov_src(xr, gr):
        # Chosen by type, not at run time: ``src = gr if xr is None else xr`` would not type
        # (a read-only and a writable array).  In place the loop then reads and writes one
        # array value, so LLVM sees one pointer and vectorizes without a run-time overlap test
        # (two arguments pointing at the same memory fail that test: the scalar loop, 10x).
        if isinstance(xr, _types.NoneType):
            return lambda xr, gr: gr
        return lambda xr, gr: xr
