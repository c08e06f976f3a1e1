"""pytest-benchmark suite of fastloss: every kernel x every backend x a shape set.

Run from the repository root (``tests/`` is the default test path, so name ``bench``)::

    python -m pytest bench                                  # small + medium shapes, a few minutes
    python -m pytest bench --shapes all                     # + narrow, large and the LLM vocabulary
    python -m pytest bench --shapes llm --dtypes float32 -k cross_entropy
    python -m pytest bench --benchmark-autosave             # save under .benchmarks/
    python -m pytest bench --benchmark-compare              # compare with the last saved run
    python -m pytest bench -q --benchmark-disable           # each case runs once, as a test

Each group (``--benchmark-group-by=group``, the default) holds one kernel, mode, shape and
dtype, so its table compares the backends, the NumPy baseline and the installed peers
(SciPy, PyTorch, JAX) directly.  Every benchmark checks its result against the ``numpy``
backend, so a ``--benchmark-disable`` run is a real test.

Options added here:

``--shapes``   comma list of small, medium, narrow, large, llm, or ``all`` (default small,medium)
``--dtypes``   comma list of float32, float64 (default both)
``--impls``    comma list of backends and peers to run (default every one; unavailable ones skip)
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # for benchlib, whatever the import mode

import benchlib  # noqa: E402


def pytest_addoption(parser):
    g = parser.getgroup("fastloss benchmarks")
    g.addoption("--shapes", default="small,medium",
                help="comma list of shape sets: " + ", ".join(benchlib.SHAPE_SETS) + ", or all "
                     "(default: small,medium; large and llm move hundreds of MB per call)")
    g.addoption("--dtypes", default="float32,float64", help="comma list of float32, float64 (default both)")
    g.addoption("--impls", default="all",
                help="comma list of implementations: " + ", ".join(benchlib.IMPLS) + " (default all)")


def pytest_configure(config):
    config.addinivalue_line("markers", "large: shapes moving hundreds of MB per call (--shapes large,llm)")


def _choice(config, name, allowed):
    raw = config.getoption(name)
    if raw.strip() == "all":
        return list(allowed)
    vals = [v.strip() for v in raw.split(",") if v.strip()]
    bad = [v for v in vals if v not in allowed]
    if bad:
        import pytest

        raise pytest.UsageError(f"--{name}: expected a comma list of {', '.join(allowed)} or all, found {bad}")
    return vals


def pytest_generate_tests(metafunc):
    if "spec" not in metafunc.fixturenames:
        return
    cfg = metafunc.config
    kernels = getattr(metafunc.module, "KERNELS")
    specs = benchlib.specs(kernels,
                           _choice(cfg, "shapes", benchlib.SHAPE_SETS),
                           _choice(cfg, "dtypes", ("float32", "float64")),
                           _choice(cfg, "impls", benchlib.IMPLS))
    metafunc.parametrize("spec", specs)
