"""The speed and start-up goals (``goals.py``) as a pytest-benchmark suite.

The workloads are those of ``goals.py`` (imported, not copied): cross-entropy fwd+grad on
2048x32000, 8192x1000 and 262144x10, logsumexp on 2048x32000, BCE-with-logits fwd+grad on 16M
elements, in float32 and float64, gradients into a reused ``grad_out``.  Each workload and
dtype is one benchmark group holding:

``memcpy``  ``np.copyto`` of the same logits into a preallocated array (the bandwidth bound)
``numpy``   fastloss's NumPy backend (the baseline of the speedup goals)
``numba``, ``cython``  the compiled backends (skipped when unavailable)
``jax``     ``jax.jit(jax.value_and_grad(loss))`` in its idiomatic form (float32; skipped
            without JAX).  XLA's CPU client uses every usable core.
``torch.compile``  inductor's compilation of the ``torch.nn.functional`` form with
            ``torch.autograd.grad`` (float32; skipped without PyTorch).

Every benchmark checks its result against the numpy backend's.  At the end of the session
``conftest.py`` computes the goal ratios from the best times of this run's stats
(numba / cython, best backend / memcpy, each backend / each peer), prints the goal table with a
met / NOT MET verdict per goal, and stores each benchmark's ratios and verdicts in its
``extra_info`` (so ``--benchmark-json`` and ``--benchmark-autosave`` keep them).
``test_startup`` measures the start-up goals in fresh processes (``goals.measure_startup``).

Run from the repository root::

    python -m pytest bench/test_goals.py                       # the goal report (a few minutes)
    python -m pytest bench/test_goals.py --dtypes float32 -k ce_2048x32000
    python -m pytest bench/test_goals.py --benchmark-json goals-bench.json --goals-json goals.json
    python -m pytest bench/test_goals.py --benchmark-disable   # checks only, reduced shapes, seconds

Under ``--benchmark-disable`` (how the bench suite runs as a test) the workloads use their
reduced shapes (~100x smaller, the same class counts, so the same kernel paths) and each
implementation runs once, checked against the numpy backend; no goal table is printed (there
are no timings) and ``test_startup`` is skipped.  ``--goal-shapes full|reduced`` overrides
the choice.  ``--dtypes`` and ``--impls`` select as for the other bench modules (memcpy and
numpy always run: the goals are ratios to them); ``--shapes`` does not apply here.
The goal shapes are large: the biggest group holds ~0.8 GB (float64 logits, gradient, copy).
"""
import benchlib
import goals
import pytest

import fastloss as fl


def test_startup(request, goal_record):
    """``import fastloss`` and the first cross-entropy calls, in fresh processes (not a
    pytest-benchmark benchmark: the clock must run inside the child, after interpreter start)."""
    cfg = request.config
    if benchlib.benchmarks_disabled(cfg) or cfg.getoption("benchmark_skip", False):
        pytest.skip("start-up is measured only when benchmarks run")
    st = fl.backends()
    cython = st["cython"].available
    if not cython:
        goal_record["not_run"]["cython"] = f"unavailable: {st['cython'].reason}"
    res = goals.measure_startup(runs=3, cython=cython)
    goal_record["startup"] = res
    for name, r in res.items():
        assert "error" not in r, f"{name}: {r['error']}"
        assert r.get("finite", True), f"{name}: non-finite loss or gradient"
    assert not res["import"]["imported_numba"], "importing fastloss imported numba"


def test_goal(benchmark, goal_spec, goal_record):
    benchlib.run_goal(benchmark, goal_spec, goal_record)
