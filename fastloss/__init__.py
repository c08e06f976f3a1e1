"""fastloss: fused, compiled loss + gradient kernels for maximum-likelihood learning.

>>> import numpy as np, fastloss as fl
>>> logits = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
>>> loss, grad = fl.cross_entropy(logits, np.array([1, 2, 3, 4]), return_grad=True)

Every function runs on interchangeable backends (``numpy``, ``numba``, ``cython``, ``cuda``);
see :func:`backends`. Importing fastloss imports no backend and compiles nothing.
"""
from . import _api
from ._api import (
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    cross_entropy,
    linear_cross_entropy,
    gaussian_nll_loss,
    kl_div,
    log_softmax,
    log_softmax_backward,
    logsumexp,
    mse_loss,
    softmax,
    softmax_backward,
)
from ._dispatch import get_backend, get_num_threads, set_backend, set_num_threads, use_backend
from ._backends import BackendStatus, BackendUnavailable, NumbaCacheWarning, backends, forked_serial

__version__ = "0.1.0"

__all__ = [
    *_api.__all__,
    "backends",
    "set_backend",
    "get_backend",
    "use_backend",
    "set_num_threads",
    "get_num_threads",
    "BackendUnavailable",
    "BackendStatus",
    "NumbaCacheWarning",
    "forked_serial",
    "warmup",
]


def _check_choice(name, values, allowed):
    vals = [values] if isinstance(values, str) else list(values)
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise ValueError(f"warmup(): {name} must be a non-empty selection of {allowed}, found {vals!r}")
    return vals


def warmup(backends=None, verbose=False, dtypes=None, layouts=None, processes=None):
    """Compile (and cache on disk) every kernel of the compiled CPU backends ahead of use.

    Parameters
    ----------
    backends : iterable of str, optional
        Backends to warm up; default every available backend that has a ``warmup`` hook
        (``numba``; the ``cython`` backend is compiled ahead of time and needs none).
    verbose : bool
        Print what is compiled and how long it took.
    dtypes : iterable of {"float32", "float64"}, optional
        Compute dtypes to compile for (default both; float16 input computes in float32).
    layouts : iterable of {"C", "A"}, optional
        ``"C"``: C-contiguous operands; ``"A"``: strided, broadcast and Fortran-ordered ones
        (default both).  Warming only what a program uses (say ``dtypes=["float32"],
        layouts=["C"]``) takes about a quarter of the time of everything.
    processes : int, optional
        Processes compiling at once (default: the usable cores; Numba compiles on one core
        per process, and its disk cache is shared).  1 compiles in this process.

    Returns
    -------
    dict
        ``{backend: seconds}`` for each backend warmed up.
    """
    import time

    from ._backends import usable_cores
    from ._dispatch import _reg

    names = list(backends) if backends is not None else [n for n in _reg.KNOWN if n != "cuda"]
    if processes is None:
        processes = usable_cores()
    if int(processes) < 1:
        raise ValueError(f"processes: expected a positive integer, found {processes!r}")
    processes = int(processes)
    done = {}
    for name in names:
        try:
            mod = _reg.get(name)
        except BackendUnavailable:
            if backends is not None:
                raise
            continue
        hook = getattr(mod, "warmup", None)
        if hook is None:
            continue
        opts = {}
        if dtypes is not None:
            opts["dtypes"] = tuple(_check_choice("dtypes", dtypes, ("float32", "float64")))
        if layouts is not None:
            opts["layouts"] = tuple(_check_choice("layouts", layouts, ("C", "A")))
        opts["processes"] = processes
        t0 = time.perf_counter()
        hook(**opts)
        done[name] = time.perf_counter() - t0
        if verbose:
            print(f"{name}: compiled in {done[name]:.1f} s")
    return done
