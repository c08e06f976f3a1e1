"""pytest-benchmark suite of fastloss: every kernel x every backend x a shape set.

Run from the repository root (``tests/`` is the default test path, so name ``bench``)::

    python -m pytest bench                                  # small + medium shapes and the goal
                                                            # workloads (full size), several minutes
    python -m pytest bench --shapes all                     # + narrow, large and the LLM vocabulary
    python -m pytest bench --shapes llm --dtypes float32 -k cross_entropy
    python -m pytest bench --benchmark-autosave             # save under .benchmarks/
    python -m pytest bench --benchmark-compare              # compare with the last saved run
    python -m pytest bench -q --benchmark-disable           # each case runs once, as a test

Each group (``--benchmark-group-by=group``, the default) holds one kernel, mode, shape and
dtype, so its table compares the backends, the NumPy baseline and the installed peers
(SciPy, PyTorch, JAX) directly.  Every benchmark checks its result against the ``numpy``
backend, so a ``--benchmark-disable`` run is a real test.

``test_goals.py`` times the goal workloads of ``goals.py`` (memcpy, numpy, numba, cython,
JAX per workload) and prints the goal table with a verdict per goal at the end of the session
(see its docstring)::

    python -m pytest bench/test_goals.py                    # the goal report (a few minutes)

Options added here:

``--shapes``      comma list of small, medium, narrow, large, llm, or ``all`` (default small,medium)
``--dtypes``      comma list of float32, float64 (default both)
``--impls``       comma list of backends and peers to run (default every one; unavailable ones skip)
``--goal-shapes`` ``full``, ``reduced`` or ``auto`` (default): the goal workloads' shapes;
                  ``auto`` = full, or reduced under ``--benchmark-disable``
``--goals-json``  write the goal table (and start-up numbers) of the session to a JSON file
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # for benchlib, whatever the import mode

import benchlib  # noqa: E402
import pytest  # noqa: E402

_GOAL_RECORD = pytest.StashKey[dict]()


def pytest_addoption(parser):
    g = parser.getgroup("fastloss benchmarks")
    g.addoption("--shapes", default="small,medium",
                help="comma list of shape sets: " + ", ".join(benchlib.SHAPE_SETS) + ", or all "
                     "(default: small,medium; large and llm move hundreds of MB per call)")
    g.addoption("--dtypes", default="float32,float64", help="comma list of float32, float64 (default both)")
    g.addoption("--impls", default="all",
                help="comma list of implementations: " + ", ".join(benchlib.IMPLS) + " (default all)")
    g.addoption("--goal-shapes", default="auto", choices=("auto", "full", "reduced"),
                help="shapes of the goal workloads (test_goals.py): full (the goals' shapes, up to 262 MB of "
                     "logits), reduced (~100x smaller, same class counts: checks and a quick look), or auto "
                     "(default): full unless benchmarks are disabled")
    g.addoption("--goals-json", metavar="FILE", help="write the goal verdicts and start-up numbers to FILE")


def pytest_configure(config):
    config.addinivalue_line("markers", "large: shapes moving hundreds of MB per call (--shapes large,llm)")


def _choice(config, name, allowed):
    raw = config.getoption(name)
    if raw.strip() == "all":
        return list(allowed)
    vals = [v.strip() for v in raw.split(",") if v.strip()]
    bad = [v for v in vals if v not in allowed]
    if bad:
        raise pytest.UsageError(f"--{name}: expected a comma list of {', '.join(allowed)} or all, found {bad}")
    return vals


def _goal_shapes_reduced(config) -> bool:
    opt = config.getoption("goal_shapes")
    return opt == "reduced" or (opt == "auto" and benchlib.benchmarks_disabled(config))


def _goal_record(config) -> dict:
    if _GOAL_RECORD not in config.stash:
        config.stash[_GOAL_RECORD] = {"times": {}, "infos": {}, "startup": None, "not_run": {}, "reduced": False,
                                      "ran": False, "goals": None}
    return config.stash[_GOAL_RECORD]


@pytest.fixture(scope="session")
def goal_record(pytestconfig):
    """The session's goal measurements: ``times[(workload, dtype)][impl]`` = best seconds,
    the benchmarks' ``extra_info`` dicts, the start-up numbers; read by the hooks below."""
    return _goal_record(pytestconfig)


def pytest_generate_tests(metafunc):
    cfg = metafunc.config
    if "goal_spec" in metafunc.fixturenames:
        metafunc.parametrize("goal_spec", benchlib.goal_specs(
            _choice(cfg, "dtypes", ("float32", "float64")), _choice(cfg, "impls", benchlib.IMPLS),
            _goal_shapes_reduced(cfg)))
    if "spec" not in metafunc.fixturenames:
        return
    kernels = getattr(metafunc.module, "KERNELS")
    specs = benchlib.specs(kernels,
                           _choice(cfg, "shapes", benchlib.SHAPE_SETS),
                           _choice(cfg, "dtypes", ("float32", "float64")),
                           _choice(cfg, "impls", benchlib.IMPLS))
    metafunc.parametrize("spec", specs)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # before pytest-benchmark's own (plain) wrapper saves --benchmark-json / --benchmark-autosave,
    # so that the goal ratios computed here are in the saved extra_info
    rec = session.config.stash.get(_GOAL_RECORD, None)
    if rec is not None and (rec["times"] or rec["startup"] is not None):
        benchlib.finish_goals(rec)
        path = session.config.getoption("goals_json")
        if path:
            _write_goals_json(session.config, rec, path)
    yield


def _write_goals_json(config, rec, path):
    import json
    import time

    import goals
    from fastloss import _bench

    import fastloss as fl

    doc = {
        "schema": "fastloss-goals-pytest/1",
        "source": "pytest bench/test_goals.py (pytest-benchmark stats: best time of the rounds)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "reduced_shapes": rec["reduced"],
        "machine": _bench.machine_info(),
        "threads": {"fastloss": fl.get_num_threads(), "jax": goals.jax_threads()},
        "times": [{"workload": k, "dtype": dt, "best_seconds": t} for (k, dt), t in rec["times"].items()],
        "startup": rec["startup"],
        "goals": rec["goals"],
        "summary": goals.summarize(rec["goals"]),
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rec = config.stash.get(_GOAL_RECORD, None)
    if rec is None or not (rec["ran"] or rec["startup"] is not None):
        return
    tr = terminalreporter
    tr.write_sep("=", "fastloss goals")
    if rec["goals"] is None:
        tr.write_line("benchmarks disabled: every goal workload ran once and was checked against the numpy "
                      "backend" + (" on reduced shapes" if _goal_shapes_reduced(config) else "")
                      + "; no timings, so no goal table (run without --benchmark-disable)")
        return
    import goals

    import fastloss as fl

    threads, cores = fl.get_num_threads(), goals._usable_cores()
    ran_jax = any("jax" in t for t in rec["times"].values())
    tr.write_line(f"ratios of the best times in this run's stats; fastloss threads={threads}, usable cores={cores}"
                  + ("" if not ran_jax else f"; JAX (XLA CPU) uses all {cores} cores"
                     + ("" if threads == cores else " -- NOT an equal-thread comparison")))
    if rec["reduced"]:
        tr.write_line("reduced shapes: the ratios are indicative only, the goals are defined on the full shapes "
                      "(--goal-shapes full)")
    if rec["startup"] is not None:
        tr.write_line("start-up (fresh processes):")
        tr.write_line(goals.format_startup(rec["startup"]))
    tr.write_line("")
    for line in goals.format_goals(rec["goals"]).splitlines():
        tr.write_line(line)
    path = config.getoption("goals_json")
    if path:
        tr.write_line(f"wrote {path}")
