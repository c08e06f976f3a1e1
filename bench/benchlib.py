"""Shared machinery of the pytest-benchmark suite: shape sets, specs, peers, the benchmark body.

Inputs and byte counts come from :func:`fastloss._bench.make_case` -- the same workloads the
``fastloss bench`` command times -- so both report the same GB/s for the same shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from fastloss import _bench
from fastloss._bench import peers

# (N, C) for row-wise kernels (classes last), (R, K) for elementwise ones
ROWWISE = {
    "small": (128, 1000),
    "medium": (8192, 1000),
    "narrow": (262144, 10),  # many rows of few classes: per-row overhead dominates
    "large": (256, 262144),  # a row (1 MB in float32) no longer fits in L2
    "llm": (2048, 32000),  # an LLM vocabulary: 262 MB of float32 logits
}
ELEMENTWISE = {
    "small": (256, 256),
    "medium": (2048, 2048),
    "large": (4096, 4096),  # 16M elements
}
# (N, H, V) for the fused linear + cross-entropy: tokens, hidden size, vocabulary
LINEAR = {
    "small": (64, 32, 1000),
    "medium": (1024, 256, 32000),
    "llm": (4096, 512, 32000),  # the large-vocabulary goal shape (500 MB of logits never held)
    "large": (1024, 512, 128256),  # a 128k vocabulary
}
TABLES = {"rowwise": ROWWISE, "elementwise": ELEMENTWISE, "linear": LINEAR}
SHAPE_SETS = ("small", "medium", "narrow", "large", "llm")
LARGE = {"large", "llm"}
BACKENDS = ("numpy", "numba", "cython")
PEERS = peers.PEERS
# yardsticks: the work a fused kernel cannot avoid, timed beside it (``Case.yardstick``)
YARDSTICKS = ("products",)
IMPLS = BACKENDS + PEERS + YARDSTICKS

_MODE_ID = {"fwd": "fwd", "fwd+grad": "fwd_grad", "bwd": "bwd"}


@dataclass(frozen=True)
class Spec:
    function: str
    mode: str
    shape_name: str
    shape: tuple
    dtype: str
    impl: str

    @property
    def id(self):
        return f"{self.function}-{_MODE_ID[self.mode]}-{self.shape_name}-{self.dtype}-{self.impl}"

    @property
    def group(self):
        return f"{self.function} {self.mode} {self.shape_name} {'x'.join(map(str, self.shape))} {self.dtype}"

    @property
    def case_key(self):
        return (self.function, self.mode, self.shape, self.dtype)


def specs(kernels, shape_sets, dtypes, impls):
    """Every (kernel, mode, shape, dtype, impl) selected, as ``pytest.param``s.

    Ordered so that all implementations of one case are adjacent: the case's inputs and its
    NumPy reference are built once and reused by the whole group.
    """
    out = []
    for fn in kernels:
        k = _bench.KERNELS[fn]
        table = TABLES[k.kind]
        for mode in k.modes:
            for sname in shape_sets:
                if sname not in table:
                    continue
                for dt in dtypes:
                    for impl in impls:
                        if impl in PEERS and fn not in PEER_KERNELS[impl]:
                            continue
                        if impl in YARDSTICKS and k.kind != "linear":  # (the only kind with one)
                            continue
                        s = Spec(fn, mode, sname, table[sname], dt, impl)
                        marks = [pytest.mark.large] if sname in LARGE else []
                        out.append(pytest.param(s, id=s.id, marks=marks))
    return out


# ------------------------------------------------------------------------------ cases
_cache: dict = {}


def case_and_reference(spec):
    """The case's inputs and the NumPy backend's result on them, built once per case.

    One case is kept at a time: the LLM shape holds ~0.5 GB of inputs and outputs.
    """
    key = spec.case_key
    if key not in _cache:
        _cache.clear()
        case = _bench.make_case(spec.function, spec.mode, spec.shape, spec.dtype, np.random.default_rng(0))
        _cache[key] = (case, _bench.outputs(case.call("numpy")))
    return _cache[key]


# ------------------------------------------------------------------------------ peers
PEER_KERNELS = peers.PEER_FUNCTIONS  # the peers' table is fastloss._bench.peers, shared with goals.py


def _peer(impl, case):
    """The callable of peer ``impl`` on ``case`` (skips where it cannot run)."""
    try:
        return peers.peer_callable(impl, case.function, case.mode, case.inputs, case.dtype)
    except peers.Unavailable as e:
        pytest.skip(str(e))


def _to_numpy(result):
    if isinstance(result, (tuple, list)):
        return type(result)(_to_numpy(r) for r in result)
    if hasattr(result, "detach"):  # torch
        return result.detach().cpu().numpy()
    return np.asarray(result)


def callable_for(spec, case):
    """A zero-argument callable running ``spec.impl`` on ``case`` (skips when unavailable)."""
    if spec.impl in BACKENDS:
        import fastloss as fl

        st = fl.backends()[spec.impl]
        if not st.available:
            pytest.skip(f"backend {spec.impl} unavailable: {st.reason}")
        return lambda: case.call(spec.impl)
    if spec.impl in YARDSTICKS:
        return case.yardstick[1]
    return _peer(spec.impl, case)


# ------------------------------------------------------------------------------ the body
def run(benchmark, spec):
    """Benchmark ``spec`` and check its result against the NumPy backend's."""
    case, ref = case_and_reference(spec)
    fn = callable_for(spec, case)
    benchmark.group = spec.group
    benchmark.extra_info.update(impl=spec.impl, shape="x".join(map(str, spec.shape)), dtype=spec.dtype,
                                bytes_moved=case.nbytes, note=case.note)
    if not benchmark.disabled:
        fn()  # warm-up outside the timing: JIT compilation, page faults of fresh outputs
    result = benchmark(fn)
    if spec.impl in YARDSTICKS:  # not the workload's result: nothing to check
        return
    ok, err = _bench.compare(ref, _bench.outputs(_to_numpy(result)), case.dtype)
    assert ok, f"{spec.impl} disagrees with the numpy backend on {spec.group}: max relative error {err:.3g}"
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        best = stats.stats.min
        benchmark.extra_info["GB/s (best)"] = round(case.nbytes / best / 1e9, 3)
        benchmark.extra_info["GB/s (median)"] = round(case.nbytes / stats.stats.median / 1e9, 3)


# ------------------------------------------------------------------------------ goal workloads
# The workloads of bench/goals.py (the speed goals), as pytest-benchmark groups: one group per
# workload and dtype holding the memcpy, the numpy backend, the compiled backends and the
# peers (JAX jit, torch.compile).  The goal table is computed at the end of the
# session from the same run's stats (conftest.py).
GOAL_BASELINES = ("memcpy", "numpy")
GOAL_PEERS = ("jax", "torch.compile")  # goals.PEERS
GOAL_IMPLS = GOAL_BASELINES + ("numba", "cython") + GOAL_PEERS


def benchmarks_disabled(config) -> bool:
    """True when pytest-benchmark runs each benchmark once, untimed (``--benchmark-disable``,
    or disabled automatically, e.g. under xdist), or is not installed."""
    bs = getattr(config, "_benchmarksession", None)
    if bs is not None:
        return bool(bs.disabled)
    try:
        return bool(config.getoption("benchmark_disable")) and not config.getoption("benchmark_enable")
    except ValueError:  # pytest-benchmark is not installed: the benchmark tests error out anyway
        return True


@dataclass(frozen=True)
class GoalSpec:
    key: str  # the workload's key in goals.WORKLOADS
    dtype: str
    impl: str  # memcpy, numpy, numba, cython, jax or torch.compile
    reduced: bool  # the workload's reduced shape (checks only) instead of its goal shape

    @property
    def workload(self):
        import goals

        return goals.BY_KEY[self.key]

    @property
    def shape(self):
        w = self.workload
        return w.reduced if self.reduced else w.shape

    @property
    def id(self):
        return f"{self.key}-{self.dtype}-{self.impl}"

    @property
    def group(self):
        return f"goal: {self.workload.name(self.shape)} {self.dtype}" + (" (reduced shape)" if self.reduced else "")


def goal_specs(dtypes, impls, reduced):
    """Every goal workload x dtype x implementation, as ``pytest.param``s.

    The memcpy and numpy baselines always run (the goals are ratios to them); ``impls``
    selects among the rest.  The peers run float32 only (see ``goals.peer_callable``).  Ordered so
    that a workload's implementations are adjacent and the baselines come first.
    """
    import goals

    chosen = [i for i in GOAL_IMPLS if i in GOAL_BASELINES or i in impls]
    out = []
    for dt in dtypes:
        for w in goals.WORKLOADS:
            for impl in chosen:
                if impl in GOAL_PEERS and dt != "float32":
                    continue
                s = GoalSpec(w.key, dt, impl, reduced)
                marks = [] if reduced else [pytest.mark.large]
                out.append(pytest.param(s, id=s.id, marks=marks))
    return out


_goal_cache: dict = {}


def goal_case_and_reference(spec):
    """The workload's inputs and the numpy backend's result on them, built once per workload.

    One workload is kept at a time (the largest holds ~0.8 GB of inputs, gradient and copy).
    """
    import goals

    key = (spec.key, spec.dtype, spec.shape)
    if key not in _goal_cache:
        _goal_cache.clear()
        case = goals.build_case(spec.workload, spec.dtype, spec.shape)
        _goal_cache[key] = (case, _bench.outputs(case.call("numpy")))
    return _goal_cache[key]


def goal_callable(spec, case):
    """A zero-argument callable running ``spec.impl`` on ``case`` (skips when unavailable)."""
    import goals

    if spec.impl == "memcpy":
        return case.memcpy()
    if spec.impl in GOAL_PEERS:
        try:
            return goals.peer_callable(case, spec.impl)
        except goals.Unavailable as e:
            pytest.skip(str(e))
    import fastloss as fl

    st = fl.backends()[spec.impl]
    if not st.available:
        pytest.skip(f"backend {spec.impl} unavailable: {st.reason}")
    return lambda: case.call(spec.impl)


def run_goal(benchmark, spec, record):
    """Benchmark one goal implementation, check its result, and record its stats in ``record``."""
    import fastloss as fl

    record["ran"] = True
    case, ref = goal_case_and_reference(spec)
    try:
        fn = goal_callable(spec, case)
    except pytest.skip.Exception as e:  # the goal table says why this implementation is missing
        record["not_run"][spec.impl] = str(e)
        raise
    benchmark.group = spec.group
    benchmark.extra_info.update(impl=spec.impl, workload=spec.key, shape="x".join(map(str, spec.shape)),
                                dtype=spec.dtype, logits_bytes=case.logits.nbytes, reduced_shape=spec.reduced,
                                threads=fl.get_num_threads(),
                                note="np.copyto of the logits" if spec.impl == "memcpy" else
                                "fresh gradient (peer)" if spec.impl in GOAL_PEERS else "grad_out reused")
    if not benchmark.disabled:
        fn()  # warm-up outside the timing: JIT compilation, XLA compilation, page faults
    result = benchmark(fn)
    if spec.impl == "memcpy":
        assert np.array_equal(result, case.logits), "np.copyto produced a different array"
    else:
        ok, err = _bench.compare(ref, _bench.outputs(_to_numpy(result)), case.dtype)
        assert ok, f"{spec.impl} disagrees with the numpy backend on {spec.group}: max relative error {err:.3g}"
    del result
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        record["times"].setdefault((spec.key, spec.dtype), {})[spec.impl] = stats.stats.min
        record["infos"][(spec.key, spec.dtype, spec.impl)] = benchmark.extra_info
        record["reduced"] |= spec.reduced


def finish_goals(record):
    """Evaluate the goals from the recorded times; put each benchmark's ratios and verdicts in
    its ``extra_info`` (before pytest-benchmark saves them)."""
    import goals

    times = record["times"]
    record["goals"] = goals.evaluate(times, record.get("startup"), record.get("not_run"),
                                     reduced=record["reduced"])
    for (key, dt, impl), info in record["infos"].items():
        t = times[(key, dt)]
        mine = t[impl]
        ratios = {}
        if impl != "memcpy" and "memcpy" in t:
            ratios["time / memcpy"] = round(mine / t["memcpy"], 4)
        if impl not in ("memcpy", "numpy") and "numpy" in t:
            ratios["speedup vs numpy"] = round(t["numpy"] / mine, 4)
        if impl == "numba" and "cython" in t:
            ratios["time / cython"] = round(mine / t["cython"], 4)
        for p in GOAL_PEERS:
            if impl in ("numba", "cython") and p in t:
                ratios[f"time / {p}"] = round(mine / t[p], 4)
        info["goal ratios"] = ratios
        verdicts = [{"measure": g["measure"], "value": g["value"], "goal": g["target"], "verdict": g["verdict"]}
                    for g in record["goals"] if g["workload"] == key and g["dtype"] == dt and g["backend"] == impl]
        if verdicts:
            info["goals"] = verdicts
