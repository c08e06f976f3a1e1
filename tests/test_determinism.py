"""Deterministic reductions: a reduced loss (and every gradient) is bitwise the same for every
thread count and every call, on every backend.

How each backend gets there: the cross-entropy row kernels compute one loss per row (each
row's sum in fixed blocks) and add the rows with ``np.sum``; the few-classes kernels (numba,
cython) add the losses of each block of rows at a fixed offset into its own slot, and the
slots in order; the elementwise kernels cut the input into tasks that depend on its shape
alone, each task writes its float64 total to its own slot, and the slots are added in order
(numba, cython); the CUDA kernels write one partial sum per block, added on the host.  A
``prange`` reduction or atomics would add in whatever order the threads finish.

Sizes are above the numba backend's serial threshold and span several elementwise tasks, so
the parallel kernels run with two threads and the serial twins with one.  float64 inputs:
a float32 loss would round most differences away.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastloss as fl
from conftest import SIM, rng, sizes


def _calls(x, y, t, p, var, xf, tf):
    """(name, call) of each reduced function; each call returns (loss, grad).  ``xf``: many rows
    of few classes (many blocks of the few-classes kernels, summed per block)."""
    return [
        ("cross_entropy", lambda b, r: fl.cross_entropy(x, t, reduction=r, return_grad=True, backend=b,
                                                       label_smoothing=0.1)),
        ("cross_entropy few classes", lambda b, r: fl.cross_entropy(x[:, :10], t % 10, reduction=r,
                                                                   return_grad=True, backend=b)),
        ("cross_entropy few classes, many rows", lambda b, r: fl.cross_entropy(xf, tf, reduction=r,
                                                                              return_grad=True, backend=b)),
        ("cross_entropy soft", lambda b, r: fl.cross_entropy(x, p, reduction=r, return_grad=True, backend=b)),
        ("bce_with_logits", lambda b, r: fl.binary_cross_entropy_with_logits(x, y, reduction=r, return_grad=True,
                                                                            backend=b)),
        ("bce", lambda b, r: fl.binary_cross_entropy(y, p, reduction=r, return_grad=True, backend=b)),
        ("kl_div", lambda b, r: fl.kl_div(x, p, reduction=r, return_grad=True, backend=b)),
        ("mse", lambda b, r: fl.mse_loss(x, y, reduction=r, return_grad=True, backend=b)),
        ("gaussian_nll", lambda b, r: fl.gaussian_nll_loss(x, y, var, reduction=r, return_grad=True, backend=b)),
    ]


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reduced_losses_are_bitwise_reproducible(backend, reduction):
    n, c = sizes((160, 1000), (4, 12))
    g = rng(3)
    x = g.normal(0, 3, (n, c))
    y = g.random((n, c))
    p = g.dirichlet(np.ones(c), n)
    t = g.integers(0, c, n)
    var = g.random((n, c)) + 0.1
    xf = g.normal(0, 3, sizes((20000, 10), (3, 10)))
    tf = g.integers(0, 10, xf.shape[0])
    before = fl.get_num_threads()
    counts = sorted({1, before}) if backend != "cuda" else [before]  # CUDA: no host threads
    try:
        for name, call in _calls(x, y, t, p, var, xf, tf):
            results = []
            for k in counts:
                fl.set_num_threads(k)
                results += [call(backend, reduction) for _ in range(2)]  # every call, every count
            l0, g0 = results[0]
            for l1, g1 in results[1:]:
                assert _same(l0, l1), f"{name}: loss {float(l0)!r} != {float(l1)!r} (threads {counts})"
                assert _same(g0, g1), f"{name}: gradient differs between calls/thread counts {counts}"
            assert np.isfinite(float(l0)), name
    finally:
        fl.set_num_threads(before)


@pytest.mark.skipif(SIM, reason="host thread counts: not the CUDA simulator")
def test_numba_elementwise_tasks_do_not_depend_on_threads():
    """The numba backend's elementwise decomposition is a function of the shape alone."""
    pytest.importorskip("numba")
    from fastloss._backends.numba_backend import _jit

    before = fl.get_num_threads()
    try:
        seen = set()
        for k in sorted({1, before}):
            fl.set_num_threads(k)
            seen.add((_jit._tasks(160, 1000), _jit._tasks(1, 1 << 20), _jit._tasks(4, 8)))
        assert len(seen) == 1
    finally:
        fl.set_num_threads(before)


@pytest.mark.skipif(SIM, reason="host thread counts: not the CUDA simulator")
def test_thread_cap_is_per_thread_and_changes_no_result(backend):
    """``_backends.thread_cap(1)`` (what linear_cross_entropy puts around its kernels): the
    results are bitwise those of the uncapped calls; on numba the calling thread's team is 1
    inside the block and back to fastloss's count after it; another Python thread's calls
    inside the block are not capped."""
    import threading

    from fastloss._backends import thread_cap

    g = rng(5)
    x = g.normal(0, 3, (400, 1000))  # above both compiled backends' serial thresholds
    t = g.integers(0, 1000, 400)
    call = lambda: fl.cross_entropy(x, t, label_smoothing=0.1, return_grad=True, backend=backend)  # noqa: E731
    l0, g0 = call()
    seen = {}

    def other():
        fl.cross_entropy(x, t, backend=backend)
        if backend == "numba":
            import numba
            seen["other"] = numba.get_num_threads()

    with thread_cap(1):
        l1, g1 = call()
        if backend == "numba":
            import numba
            seen["inside"] = numba.get_num_threads()
        th = threading.Thread(target=other)
        th.start()
        th.join()
    l2, g2 = call()
    assert _same(l0, l1) and _same(g0, g1) and _same(l0, l2) and _same(g0, g2)
    if backend == "numba":
        import numba
        assert seen["inside"] == 1
        assert seen["other"] == numba.get_num_threads() == fl.get_num_threads()
    with pytest.raises(ValueError, match="n: expected"):
        with thread_cap(-1):
            pass


@pytest.mark.skipif(SIM, reason="host OpenMP teams: not the CUDA simulator")
def test_thread_cap_starts_no_openmp_team():
    """Under ``thread_cap(1)`` the cython backend's large calls start no OpenMP team (in a
    fresh process: ``openmp_team_started`` is process state); without it they do (2+ cores)."""
    import subprocess
    import sys

    pytest.importorskip("fastloss._kernels_cy")
    code = """
import numpy as np, fastloss as fl, fastloss._kernels_cy as k
from fastloss._backends import thread_cap
x = np.random.default_rng(0).normal(size=(600, 1000)); t = np.zeros(600, np.int64)
with thread_cap(1):
    fl.cross_entropy(x, t, return_grad=True, backend="cython")
print(k.openmp_team_started())
fl.cross_entropy(x, t, return_grad=True, backend="cython")
print(k.openmp_team_started())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    capped, free = out.stdout.split()
    assert capped == "False"
    if fl._backends.get("cython").get_num_threads() > 1 and fl._backends.get("cython")._k.openmp_enabled():
        assert free == "True"


@pytest.mark.parametrize("soft", [False, True])
def test_small_capped_rows_are_bitwise_the_same_whatever_the_heap(backend, soft):
    """The same call gives the same bits however the heap lies around it.  The numba row
    kernels' cap scratch (the capped row, its gradient) were separate allocations of C
    elements: two short rows landed within a vector step of each other or not, depending on
    what was allocated before, LLVM's run-time overlap test then took the scalar or the vector
    loop, and they round a sum differently -- 55 of 300 calls differed in the last bit (soft
    targets, C = 6; tests/test_cross_entropy.py::test_return_lse failed in CI from it).  Here
    arrays of random sizes are allocated and freed between the calls."""
    r = rng(7)
    x = r.standard_normal((3, 6, 4)) * 3  # classes on axis 1: the public layer copies rows too
    t = r.dirichlet(np.ones(6), (3, 4)).transpose(0, 2, 1) if soft else r.integers(0, 6, (3, 4))
    keep, first = [], None
    for k in range(pick_calls()):
        keep.append([np.empty(int(s)) for s in r.integers(1, 16, 20)])  # rows of C = 6 are 48 bytes
        if len(keep) > 30:
            keep.pop(int(r.integers(0, len(keep))))
        got = fl.cross_entropy(x, t, axis=1, softcap=4.0, reduction="none", return_grad=True, backend=backend)
        if first is None:
            first = got
        else:
            assert _same(got[0], first[0]) and _same(got[1], first[1]), f"call {k} differs from the first"


def pick_calls():
    """Calls per heap test: 200 (10 under the CUDA simulator, where each costs ~0.1 s)."""
    return 10 if SIM else 200
