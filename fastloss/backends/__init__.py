"""Backend registry: name -> lazily imported kernel module.

Each backend is a module implementing the kernel entry points documented in
:mod:`fastloss.backends.numpy_backend`.  Nothing is imported (and nothing compiled) until a
backend is first asked for; a backend that cannot load raises :class:`BackendUnavailable`
saying why and how to install it.
"""
from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass

__all__ = ["BackendUnavailable", "BackendStatus", "KNOWN", "get", "status", "backends"]


class BackendUnavailable(RuntimeError):
    """A backend was asked for that is unknown or cannot be used on this machine."""


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
    "numpy": ("fastloss.backends.numpy_backend", ""),
    "numba": ("fastloss.backends.numba_backend", 'pip install "numba>=0.60"'),
    "cython": (
        "fastloss.backends.cython_backend",
        "reinstall fastloss from source with a C compiler and Cython available: "
        'pip install --no-build-isolation -e ".[test]" (or: pip install cython && python setup.py build_ext --inplace)',
    ),
    "cuda": ("fastloss.backends.cuda_backend", 'pip install "fastloss[cuda]"  (numba-cuda with its CUDA 12 extra) and an NVIDIA GPU with a driver'),
}

_lock = threading.Lock()
_loaded: dict[str, object] = {}
_failed: dict[str, str] = {}


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
            except Exception as exc:  # ImportError, missing shared library, no GPU driver ...
                why = f"{type(exc).__name__}: {exc}"
            if why:
                _failed[name] = why
            else:
                _loaded[name] = mod
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
