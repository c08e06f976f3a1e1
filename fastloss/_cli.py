"""The ``fastloss`` command line: ``info``, ``bench`` (the main job) and ``warmup``."""
from __future__ import annotations

import argparse
import os
import platform
import sys


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions():
    out = {"python": platform.python_version()}
    for mod in ("numpy", "numba", "numba_cuda", "scipy"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod.replace("_", "-"))
        except Exception:
            out[mod] = "not installed"
    return out


def cmd_info(args) -> int:
    import fastloss as fl

    print(f"fastloss {fl.__version__}")
    for k, v in _versions().items():
        print(f"  {k:<11} {v}")
    print(f"cython ext   {_cython_build()}")
    print(f"machine      {_cpu_model()}, {os.cpu_count()} logical CPUs")
    print(f"threads      {fl.get_num_threads()} (set_num_threads / FASTLOSS_NUM_THREADS)")
    default = fl.get_backend()
    if default == "auto":
        from . import _dispatch

        default += f" (host arrays -> {_dispatch.resolve(None).NAME}, GPU arrays -> cuda)"
    print(f"default      {default}")
    print("backends:")
    for name, st in fl.backends().items():
        if st.available:
            print(f"  {name:<7} available")
        else:
            print(f"  {name:<7} unavailable: {st.reason}")
            print(f"  {'':<7} install: {st.install}")
    print(f"numba cache  {_numba_cache()}")
    gpus = _gpus()
    print(f"GPUs         {gpus}")
    return 0


def _cython_build() -> str:
    """How the ahead-of-time extension was built (Cython itself is needed only to build it)."""
    from ._backends import cython_backend

    return cython_backend.build_info()


def _numba_cache() -> str:
    """Where the numba backend's kernels are cached on disk, and whether that works."""
    from ._backends import BackendUnavailable, get

    try:
        info = get("numba").cache_info()
    except BackendUnavailable:
        return "- (the numba backend is unavailable)"
    if info["enabled"]:
        extra = f"; {info['note']}" if info["note"] else ""
        return f"{info['dir']} (writable{extra})"
    if not info["dir"]:
        return f"- ({info['note']})"
    return (f"{info['dir']} (not writable: the kernels are compiled in memory on every run; "
            f"set NUMBA_CACHE_DIR to a writable directory)\n             {info['note']}")


def _gpus() -> str:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"
    try:
        from numba import cuda

        if not cuda.is_available():
            return "none (no CUDA driver or device)"
        return ", ".join(f"{i}: {d.name.decode() if isinstance(d.name, bytes) else d.name}" for i, d in enumerate(cuda.gpus))
    except Exception as exc:
        return f"none ({type(exc).__name__}: {exc})"


def cmd_warmup(args) -> int:
    import fastloss as fl

    names = args.backend or None
    done = fl.warmup(names, verbose=True, dtypes=args.dtype, layouts=args.layout, processes=args.jobs)
    if not done:
        print("nothing to compile: no JIT backend is available (see `fastloss info`)")
    return 0


def main(argv=None) -> int:
    import fastloss

    parser = argparse.ArgumentParser(
        prog="fastloss", description="Fused compiled loss + gradient kernels: "
        "`fastloss info` says what this machine can run, `fastloss bench --quick` times it.")
    parser.add_argument("--version", action="version", version=f"fastloss {fastloss.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{info,bench,warmup}")
    p_info = sub.add_parser("info", help="versions, backends (and why one is missing), threads, GPUs",
                            description="Print versions, how the Cython extension was built, the CPU, "
                                        "threads, every backend (and why one is unavailable), the Numba "
                                        "cache directory and the GPUs.")
    p_info.set_defaults(func=cmd_info)
    p_bench = sub.add_parser("bench", help="time every kernel on every backend against NumPy (the main job)")
    from . import _bench

    _bench.add_arguments(p_bench)
    p_bench.set_defaults(func=_bench.run)
    p_warm = sub.add_parser(
        "warmup", help="compile and cache every Numba kernel ahead of use",
        description="Compile every kernel of the numba backend and store it in the Numba disk "
                    "cache, so that a later program starts without compiling (the cython backend is "
                    "compiled ahead of time and needs none). Takes minutes for everything; --dtype "
                    "and --layout compile only what a program uses.")
    p_warm.add_argument("--backend", action="append", help="backend to warm up (default: all JIT backends)")
    p_warm.add_argument("--dtype", action="append", choices=["float32", "float64"],
                        help="compute dtype to compile for (repeatable; default both)")
    p_warm.add_argument("--layout", action="append", choices=["C", "A"],
                        help="C: C-contiguous operands; A: strided/Fortran-order ones (repeatable; default both)")
    p_warm.add_argument("--jobs", type=int, metavar="N",
                        help="processes compiling at once (default: one per usable core)")
    p_warm.set_defaults(func=cmd_warmup)
    args = parser.parse_args(argv)
    if args.command is None:  # bare `fastloss`: what it can do, not an argparse error
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
