"""Build script for the optional compiled ``cython`` backend (``fastloss._kernels_cy``).

Everything else about the package is declared in ``pyproject.toml``; this file only adds the
extension built from ``kernels/_kernels_cy.pyx`` + ``kernels/fl_math.hpp``, compiled as C++ (the
kernels are templates over float / double).  The extension is OPTIONAL: without Cython, without
a C++ compiler, or when compilation fails, fastloss still installs (pure Python) and
``fastloss._backends.cython_backend.unavailable_reason()`` says why.

Development build (in place)::

    python setup.py build_ext --inplace

Compiler flags (gcc / clang):

* ``-O3 -fopenmp`` (OpenMP ``prange`` over rows; dropped when the compiler lacks OpenMP, the
  kernels then run single threaded) and ``-fopenmp-simd`` (``#pragma omp simd`` reductions
  vectorize without ``-ffast-math``, which is never used: it breaks inf/NaN handling).
* ``-fno-trapping-math -fno-math-errno``: the kernels never read floating-point exception flags
  or errno, and without these gcc refuses to if-convert (hence to vectorize) loops whose
  selects guard an operation that could raise an FP exception.  They do not change any
  computed value, inf and NaN included.
* Target: ``FASTLOSS_MARCH`` selects the instruction set:

  - unset or ``native`` (default for source builds): ``-march=native``, tuned to the building
    machine -- the polynomial exp/log are then vectorized with its widest vectors (AVX2+FMA,
    AVX-512).  Do NOT ship wheels built this way: they crash (SIGILL) on older CPUs.
  - ``generic``: no ``-march`` flag (the compiler's baseline, e.g. x86-64 SSE2): portable
    wheels, slower kernels.
  - any other value ``V``: ``-march=V`` (e.g. ``x86-64-v3`` for portable AVX2 wheels).

  A value the compiler rejects (e.g. ``native`` on some clang/arm64 setups) is dropped with a
  warning.  Every flag is first probed on a tiny file, so a missing feature costs no rebuild.
* ``FASTLOSS_NO_OPENMP=1`` builds without OpenMP.

MSVC gets ``/O2 /openmp:llvm`` (``/arch:AVX2`` unless ``FASTLOSS_MARCH=generic``).
"""
from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.extension import Extension

EXT_NAME = "fastloss._kernels_cy"
HERE = os.path.dirname(os.path.abspath(__file__))


def _march_flags():
    m = os.environ.get("FASTLOSS_MARCH", "native").strip() or "native"
    if m == "generic":
        return m, []
    return m, [f"-march={m}"]


_PROBE_C = """
#ifdef FL_PROBE_OMP
#include <omp.h>
#endif
int fl_probe(float *x, int n) {
    float s = 0;
#ifdef FL_PROBE_OMP
    s += (float)omp_get_max_threads();
#endif
    for (int i = 0; i < n; i++) s += x[i];
    return (int)s;
}
"""


class OptionalBuildExt(build_ext):
    """build_ext that probes which flags this compiler accepts (on a tiny file: fast), degrades
    (no OpenMP, no -march) instead of failing, and never fails the installation: the cython
    backend is optional."""

    def _flags_work(self, cflags, lflags, omp):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "fl_probe.cpp")  # compiled as the extension is: C++
            with open(src, "w") as f:
                f.write(_PROBE_C)
            try:
                objs = self.compiler.compile(
                    [src], output_dir=tmp, extra_postargs=cflags,
                    macros=[("FL_PROBE_OMP", "1")] if omp else None,
                )
                self.compiler.link_shared_object(
                    objs, os.path.join(tmp, "fl_probe.so"), extra_postargs=lflags, target_lang="c++"
                )
            except Exception:
                return False
        return True

    def _choose_flags(self):
        march, march_flags = _march_flags()
        want_omp = os.environ.get("FASTLOSS_NO_OPENMP", "") in ("", "0")
        if self.compiler.compiler_type == "msvc":
            base = ["/O2", "/fp:precise"] + ([] if march == "generic" else ["/arch:AVX2"])
            omp_c, omp_l = ["/openmp:llvm"], []
        else:
            base = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-Wno-unused-function"]
            if self._flags_work(base + ["-fopenmp-simd"], [], False):
                base.append("-fopenmp-simd")
            omp_c, omp_l = ["-fopenmp"], ["-fopenmp"]
        if march_flags and not self._flags_work(base + march_flags, [], False):
            self.warn(f"the compiler rejects {march_flags}; building for its default target")
            march, march_flags = "generic", []
        cflags, lflags, omp = base + march_flags, [], False
        if want_omp and self._flags_work(cflags + omp_c, omp_l, True):
            cflags, lflags, omp = cflags + omp_c, omp_l, True
        elif want_omp:
            self.warn("OpenMP is not available with this compiler: the cython backend will run single threaded")
        return cflags, lflags, march, omp

    def build_extensions(self):
        try:
            chosen = self._choose_flags()
        except Exception as exc:  # no usable compiler at all
            self.warn(f"optional compiled extensions were not built: {exc}")
            return
        for ext in self.extensions:
            ext._fl_flags = chosen
        super().build_extensions()

    def build_extension(self, ext):
        cflags, lflags, march, omp = getattr(ext, "_fl_flags", ([], [], "unknown", False))
        base_c, base_l = list(ext.extra_compile_args), list(ext.extra_link_args)
        attempts = [(cflags, lflags, march, omp)]
        if cflags:  # last resort: the compiler's defaults only
            attempts.append(([], [], "default", False))
        last = None
        for cf, lf, m, o in attempts:
            ext.extra_compile_args = base_c + cf
            ext.extra_link_args = base_l + lf
            ext.define_macros = [d for d in ext.define_macros if d[0] != "FL_BUILD_INFO"] + [
                ("FL_BUILD_INFO", '"march=%s openmp=%d"' % (m, int(o)))
            ]
            try:
                super().build_extension(ext)
                return
            except Exception as exc:  # compiler error, missing headers ...
                last = exc
                self.warn(f"building {ext.name} with {' '.join(cf + lf) or 'default flags'} failed: {exc}")
        self.warn(
            f"the optional extension {ext.name} was NOT built ({last}); fastloss works without "
            "it, the 'cython' backend will report itself unavailable"
        )

    def run(self):
        try:
            super().run()
        except Exception as exc:  # e.g. no compiler at all (CCompilerError / DistutilsPlatformError)
            self.warn(f"optional compiled extensions were not built: {exc}")


def _extensions():
    try:
        from Cython.Build import cythonize
        import numpy  # noqa: F401  (only to fail early with a clear message when missing)
    except ImportError as exc:
        sys.stderr.write(f"fastloss: {exc}; building without the optional 'cython' backend\n")
        return []
    ext = Extension(
        EXT_NAME,
        sources=["kernels/_kernels_cy.pyx"],
        include_dirs=["kernels"],
        depends=["kernels/fl_math.hpp"],
        language="c++",  # the loops of fl_math.hpp are templates over float / double
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        optional=True,
    )
    try:
        exts = cythonize(
            [ext],
            compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
            quiet=True,
        )
    except Exception as exc:  # a Cython compile error must not break the installation either
        sys.stderr.write(f"fastloss: cythonize failed ({exc}); building without the 'cython' backend\n")
        return []
    for e in exts:
        e.optional = True  # cythonize() returns new Extension objects without `optional`
    return exts


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
