"""Backend selection: the process default, a per-context override, and ``auto``.

``auto`` picks, for NumPy-resident data, ``numba`` when it imports (and is not disabled by
``FASTLOSS_DISABLE_NUMBA=1``), else ``cython`` when the extension was built, else ``numpy``;
for data that lives on a GPU (``__cuda_array_interface__`` or a CUDA DLPack device), ``cuda``.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading

from . import _backends as _reg
from ._backends import BackendUnavailable, is_device_array

__all__ = ["set_backend", "get_backend", "use_backend", "set_num_threads", "get_num_threads", "resolve", "is_device_array"]

_CPU_ORDER = ("numba", "cython", "numpy")
_NAMES = tuple(_reg.KNOWN) + ("auto",)

_default = "auto"
_default_from_env = True  # FASTLOSS_BACKEND is read lazily, on the first call that needs it
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastloss_backend", default=None)
_auto_cpu: object | None = None
_lock = threading.Lock()
_num_threads: int | None = None


def _check_name(name, what="backend"):
    if not isinstance(name, str) or name not in _NAMES:
        raise BackendUnavailable(
            f"{what}: expected one of {', '.join(repr(n) for n in _NAMES)}, found {name!r} (unknown backend)"
        )
    return name


def set_backend(name: str) -> None:
    """Set the process-wide default backend (``"auto"``, ``"numpy"``, ``"numba"``, ``"cython"``, ``"cuda"``).

    A named backend is checked at once: an unavailable one raises :class:`BackendUnavailable`.
    """
    global _default, _default_from_env
    _check_name(name)
    if name != "auto":
        _reg.get(name)
    _default, _default_from_env = name, False


def get_backend() -> str:
    """The name of the backend used when ``backend=None``: the innermost ``use_backend``, else
    the ``set_backend`` value, else ``FASTLOSS_BACKEND``, else ``"auto"``."""
    o = _override.get()
    if o is not None:
        return o
    if _default_from_env:
        return _check_name(os.environ.get("FASTLOSS_BACKEND", "auto") or "auto", "FASTLOSS_BACKEND")
    return _default


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: use backend ``name`` for calls with ``backend=None`` inside the block.

    The override is per thread / per asyncio task (a :class:`contextvars.ContextVar`).

    Examples
    --------
    >>> import fastloss as fl, numpy as np
    >>> with fl.use_backend("numpy"):
    ...     float(fl.logsumexp(np.zeros(4)))
    1.3862943611198906
    """
    _check_name(name)
    if name != "auto":
        _reg.get(name)
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def _auto_cpu_backend():
    global _auto_cpu
    if _auto_cpu is None:
        with _lock:
            if _auto_cpu is None:
                for name in _CPU_ORDER:
                    try:
                        _auto_cpu = _activate(name)
                        break
                    except BackendUnavailable:
                        continue
    return _auto_cpu


def _activate(name):
    mod = _reg.get(name)
    if _num_threads is not None and hasattr(mod, "set_num_threads"):
        mod.set_num_threads(_num_threads)
    return mod


def resolve(backend, device: bool = False):
    """Return the kernel module for ``backend`` (None = the current default)."""
    name = get_backend() if backend is None else _check_name(backend)
    if name == "auto":
        return _activate("cuda") if device else _auto_cpu_backend()
    if device and name != "cuda":
        raise ValueError(
            f"backend: expected 'cuda' or 'auto' for arrays that live on a GPU, found {name!r}; "
            "copy the data to the host first (e.g. cupy.asnumpy / tensor.cpu().numpy())"
        )
    return _activate(name)


def set_num_threads(n: int) -> None:
    """Bound the CPU threads of the compiled backends (Numba, OpenMP) to ``n`` (>= 1).

    Also settable with the environment variable ``FASTLOSS_NUM_THREADS``.
    """
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive integer number of threads, found {n!r}")
    _num_threads = min(n, os.cpu_count() or n)
    for name in ("numba", "cython"):
        mod = _reg._loaded.get(name)
        if mod is not None and hasattr(mod, "set_num_threads"):
            mod.set_num_threads(_num_threads)


def get_num_threads() -> int:
    """The CPU thread bound in effect (``set_num_threads``, ``FASTLOSS_NUM_THREADS`` or all cores)."""
    return _num_threads if _num_threads is not None else (os.cpu_count() or 1)


def _init_threads_from_env():
    v = os.environ.get("FASTLOSS_NUM_THREADS")
    if v:
        try:
            set_num_threads(int(v))
        except ValueError:
            raise ValueError(f"FASTLOSS_NUM_THREADS: expected a positive integer, found {v!r}") from None


_init_threads_from_env()
