"""Backend registry: name -> lazily imported kernel module.

Each backend is a module implementing the kernel entry points of the backend protocol,
:class:`fastloss._backends._protocol.KernelSet` (checked when the backend is loaded).
Nothing is imported (and nothing compiled) until a backend is first asked for; a backend
that cannot load raises :class:`BackendUnavailable` saying why and how to install it.

It also keeps the state the compiled backends share: whether this process is a child
forked after a parallel call (see :func:`forked_serial`), and the calling thread's cap on
kernel threads (see :func:`thread_cap`).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
from dataclasses import dataclass

from numpy import ndarray as _ndarray

__all__ = ["BackendUnavailable", "BackendStatus", "NumbaCacheWarning", "KNOWN", "get", "status",
           "backends", "forked_serial", "is_device_array", "thread_cap", "thread_cap_now"]

_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged (kDLCUDAHost, pinned host memory, is not device memory)


def is_device_array(obj) -> bool:
    """True for arrays resident on a CUDA device: CuPy arrays, PyTorch CUDA tensors, Numba
    device arrays (the simulator's too), anything with ``__cuda_array_interface__`` or a
    ``__dlpack__`` on a CUDA device.  Such data goes to the ``cuda`` backend whole."""
    if type(obj) is _ndarray:  # the common case first: every call asks this of each argument
        return False
    if getattr(obj, "__cuda_ndarray__", False):
        return True
    if type(obj).__module__.split(".")[0] == "torch":  # (a bfloat16 tensor's interface raises)
        return bool(getattr(obj, "is_cuda", False))
    if hasattr(obj, "__cuda_array_interface__"):
        return True
    dev = getattr(obj, "__dlpack_device__", None)
    if dev is not None and not hasattr(obj, "__array_interface__"):
        try:
            return int(dev()[0]) in _DLPACK_CUDA
        except Exception:
            return False
    return False


class BackendUnavailable(RuntimeError):
    """A backend was asked for that is unknown or cannot be used on this machine."""


class NumbaCacheWarning(RuntimeWarning):
    """Numba cannot use a disk cache for the ``numba`` backend's kernels where it was asked to.

    Emitted at most once per process, when the backend is loaded: either no cache directory
    is writable (the kernels then compile in memory on every run), or ``NUMBA_CACHE_DIR``
    names a directory Numba cannot write (Numba then silently caches elsewhere).  The
    message says which directories were tried and how to fix it.
    """


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can be used here, and if not, why and how to get it."""

    name: str
    available: bool
    reason: str  # "" when available
    install: str  # how to make it available ("" when available)

    def __bool__(self) -> bool:
        return self.available


# name -> (module, install hint)
KNOWN = {
    "numpy": ("fastloss._backends.numpy_backend", ""),
    "numba": ("fastloss._backends.numba_backend", 'pip install "numba>=0.60"'),
    "cython": (
        "fastloss._backends.cython_backend",
        "reinstall fastloss from source with a C compiler and Cython available: "
        'pip install --no-build-isolation -e ".[test]" (or: pip install cython && python setup.py build_ext --inplace)',
    ),
    "cuda": ("fastloss._backends.cuda_backend", 'pip install "fastloss[cuda]"  (numba-cuda with its CUDA 12 extra) and an NVIDIA GPU with a driver'),
}

_lock = threading.Lock()
_loaded: dict[str, object] = {}
_failed: dict[str, str] = {}
_cap = threading.local()  # .n: this Python thread's cap on kernel threads (see thread_cap)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; all cores where the OS has
    no affinity API)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - no affinity API
        return os.cpu_count() or 1


def _disabled_reason(name: str) -> str:
    if name == "numba" and os.environ.get("FASTLOSS_DISABLE_NUMBA", "") not in ("", "0"):
        return "disabled by FASTLOSS_DISABLE_NUMBA=1"
    return ""


def get(name: str):
    """Return the kernel module of backend ``name``, importing it on first use.

    Raises
    ------
    BackendUnavailable
        ``name`` is unknown, disabled, or failed to import; the message says why, how to
        install it, and lists the known backends.
    """
    mod = _loaded.get(name)
    if mod is not None:
        return mod
    if name not in KNOWN:
        raise BackendUnavailable(
            f"backend: expected one of {sorted(KNOWN) + ['auto']}, found {name!r} (unknown backend)"
        )
    with _lock:
        mod = _loaded.get(name)
        if mod is not None:
            return mod
        why = _disabled_reason(name) or _failed.get(name, "")
        if not why:
            try:
                mod = importlib.import_module(KNOWN[name][0])
                check = getattr(mod, "unavailable_reason", None)
                why = check() if check is not None else ""
                if not why:  # a module that breaks the protocol is a bug: say what it lacks
                    from ._protocol import check as conforms

                    problems = conforms(mod)
                    if problems:
                        why = f"{KNOWN[name][0]} breaks the backend protocol ({'; '.join(problems)})"
            except Exception as exc:  # ImportError, missing shared library, no GPU driver ...
                why = f"{type(exc).__name__}: {exc}"
            if why:
                _failed[name] = why
            else:
                _loaded[name] = mod
                cap = thread_cap_now()
                hook = getattr(mod, "set_thread_cap", None)
                if cap and hook is not None:  # loaded inside a thread_cap block of this thread
                    hook(cap)
                return mod
    raise BackendUnavailable(
        f"backend {name!r} is unavailable: {why}. To install it: {KNOWN[name][1]}. "
        f"Known backends: {', '.join(KNOWN)}."
    )


def status(name: str) -> BackendStatus:
    try:
        get(name)
    except BackendUnavailable:
        why = _disabled_reason(name) or _failed.get(name, "unknown backend")
        return BackendStatus(name, False, why, KNOWN.get(name, ("", ""))[1])
    return BackendStatus(name, True, "", "")


def backends() -> dict[str, BackendStatus]:
    """Report every known backend: ``{name: BackendStatus(name, available, reason, install)}``.

    Importing a backend to check it may take a moment (Numba, CUDA); nothing is compiled.
    """
    return {name: status(name) for name in KNOWN}


# ----------------------------------------------------------------------------- fork safety
# GNU OpenMP (libgomp) does not survive fork(): its worker threads are not copied into the
# child, but the calling thread's team state is, so the child's first parallel region waits
# forever for them (the cython backend hangs) -- and Numba's 'omp' layer detects the fork
# and kills the child ("fork() called from a process already using GNU OpenMP").  A region
# of ONE thread is safe: libgomp returns from gomp_team_start before it looks at the pool,
# and Numba's serial kernels do not enter its threading layer at all.  Both backends load the
# same libgomp, so a pool started by either one makes the other unsafe in a forked child.
# TBB and Numba's workqueue layer are fork-safe (Numba's threading-layer documentation).
_forked_serial: frozenset = frozenset()  # backends that must run single-threaded here


def _gomp_pools() -> tuple:
    """(``numba``'s layer if Numba has launched one (else ``None``), whether the cython
    backend's kernels have run an OpenMP team of more than one thread) in this process."""
    par = sys.modules.get("numba.np.ufunc.parallel")  # never imports Numba
    layer = getattr(par, "_threading_layer", None) if getattr(par, "_is_initialized", False) else None
    cy = sys.modules.get("fastloss._kernels_cy")
    if cy is None:
        return layer, False
    started = getattr(cy, "openmp_team_started", None)
    if started is None:  # an extension built before it could tell: assume it did
        return layer, bool(cy.openmp_enabled())
    return layer, bool(started())


def _after_fork_in_child() -> None:
    global _forked_serial
    layer, cy_team = _gomp_pools()
    unsafe = set()
    if layer == "omp" or cy_team:
        unsafe.add("cython")  # libgomp's team of this thread is stale
    if layer == "omp" or (layer is None and cy_team):
        # Numba's own 'omp' pool; or none yet, and the one it would launch (OpenMP when TBB
        # is missing) would start from libgomp's stale team
        unsafe.add("numba")
    if unsafe:
        _forked_serial = _forked_serial | unsafe  # a grandchild inherits it (and adds to it)


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork
    # registered at package import, before any backend can start a pool, so that it runs in
    # every forked child -- also for a backend first imported in the child
    os.register_at_fork(after_in_child=_after_fork_in_child)


def forked_serial(name: str) -> bool:
    """Whether backend ``name`` must run single-threaded in this process.

    True in a child process forked (``os.fork``, ``multiprocessing``'s ``'fork'`` start
    method, e.g. DataLoader-style workers) from a process that had started an OpenMP thread
    pool -- in practice, after a parallel call of the ``numba`` or ``cython`` backend.  Such
    a pool does not survive ``fork()``, so the backend then runs every kernel on the calling
    thread, whatever :func:`fastloss.set_num_threads` says.  Children started with
    ``'spawn'`` or ``'forkserver'``, and children forked before any parallel call, are
    unaffected.
    """
    return name in _forked_serial


# ----------------------------------------------------------------------------- thread cap
def thread_cap_now() -> int:
    """The calling Python thread's cap on kernel threads (0: none); see :func:`thread_cap`."""
    return getattr(_cap, "n", 0)


def _apply_cap(n: int) -> None:
    _cap.n = n
    for mod in list(_loaded.values()):
        hook = getattr(mod, "set_thread_cap", None)
        if hook is not None:
            hook(n)


@contextlib.contextmanager
def thread_cap(n):
    """Within the block, kernels called *by this Python thread* run on at most ``n`` threads
    (``None`` or 0: no cap).  Other threads' calls and :func:`fastloss.set_num_threads` are
    untouched; results do not change (no kernel's result depends on its thread count).

    What it is for: a loop that alternates the kernels with another library's multithreaded
    calls -- ``linear_cross_entropy``'s BLAS products.  Each OpenMP team keeps spinning for a
    while after its parallel region (libgomp's default ``GOMP_SPINCOUNT``: milliseconds), on
    the cores the BLAS threads want next, and the BLAS threads then spin on ours; capped at
    one thread, the kernels start no team that could spin (see ``_config.LINEAR_CE_THREADS``
    for the measurements).  Applies to the backends loaded when the block starts or loaded in
    it by this thread (the numba backend reads :func:`thread_cap_now` at each call; the cython
    extension keeps a C++ ``thread_local`` copy, set through its ``set_thread_cap``); it is a
    matter of speed only, never of results."""
    n = int(n or 0)
    if n < 0:
        raise ValueError(f"n: expected a number of threads >= 0 (0: no cap), found {n}")
    prev = thread_cap_now()
    _apply_cap(n)
    try:
        yield
    finally:
        _apply_cap(prev)
