"""What ``fastloss bench`` records about the machine: CPU, memory, versions, threads."""
from __future__ import annotations

import os
import platform
import sys

import numpy as np

from .cases import _fl


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
    from .._backends import usable_cores

    usable = usable_cores()
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
