"""Worker processes forked after a parallel call (issue #16, item 11).

GNU OpenMP's thread pool does not survive ``fork()``: before the fix a ``'fork'`` child of a
process that had made one large (parallel) call was killed at once by Numba's OpenMP layer
("fork() called from a process already using GNU OpenMP, this is unsafe") and hung in the
cython backend's first parallel region.  Such a child must instead compute correct results,
single-threaded, and ``set_num_threads`` there must not bring the pool back.  Both compiled
backends share libgomp, so a pool started by one must make the other safe too.

Every child is bounded in time and killed (and the test failed) when it overruns.
"""
from __future__ import annotations

import importlib
import itertools
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastloss as fl

registry = importlib.import_module("fastloss._backends")

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or "fork" not in mp.get_all_start_methods(),
    reason="needs the 'fork' start method (POSIX)",
)

COMPILED = [name for name in ("numba", "cython") if fl.backends()[name].available]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_TIMEOUT = 120  # s; a serial child takes well under a second once its kernels are compiled


def _data(n, c, m, k):
    rng = np.random.default_rng(16)
    x = rng.standard_normal((n, c)).astype(np.float32)
    t = rng.integers(0, c, n)
    z = (3 * rng.standard_normal((m, k))).astype(np.float32)
    y = rng.random((m, k)).astype(np.float32)
    return x, t, z, y


# 4096 x 1000 and 512 x 1024 elements: parallel in both backends (numba from 65536 elements,
# cython from 262144); the small twins have the same argument types, so a call on them
# compiles (Numba) the serial kernels that the forked child will run.
BIG = _data(4096, 1000, 512, 1024)
SMALL = _data(8, 1000, 4, 16)


def _compute(backend, x, t, z, y):
    loss, grad = fl.cross_entropy(x, t, return_grad=True, backend=backend)
    bloss, bgrad = fl.binary_cross_entropy_with_logits(z, y, return_grad=True, backend=backend)
    return float(loss), grad, float(bloss), bgrad


def _child(conn, backend, threads):
    try:
        if threads:
            fl.set_num_threads(threads)  # must not re-enable the parent's unusable pool
        res = _compute(backend, *BIG)
        conn.send(("ok", res, registry.get(backend).get_num_threads(), registry.forked_serial(backend)))
    except BaseException as exc:  # report, do not hang the parent
        conn.send(("error", repr(exc), None, None))
    finally:
        conn.close()


def _run_forked(backend, threads=0):
    """Run ``_child`` in a 'fork' child; return what it sent.  The child is always reaped."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, backend, threads), daemon=True)
    proc.start()
    send.close()
    try:
        # receive before joining: the child blocks on a full pipe until the parent reads
        if not recv.poll(CHILD_TIMEOUT):
            alive = proc.is_alive()
            pytest.fail(
                f"forked child ({backend}) sent nothing within {CHILD_TIMEOUT} s: "
                + ("it hangs" if alive else f"it died with exit code {proc.exitcode}")
            )
        try:
            msg = recv.recv()
        except EOFError:
            proc.join(10)
            pytest.fail(f"forked child ({backend}) died with exit code {proc.exitcode} before answering")
        proc.join(CHILD_TIMEOUT)
        assert not proc.is_alive(), f"forked child ({backend}) did not exit after answering"
        assert proc.exitcode == 0, f"forked child ({backend}) exit code {proc.exitcode}"
        return msg
    finally:
        recv.close()
        if proc.is_alive():
            proc.kill()
            proc.join(10)


def _pool_started() -> bool:
    """Whether this (parent) process now runs an OpenMP pool that a forked child cannot use."""
    layer, cython_team = registry._gomp_pools()
    return layer == "omp" or cython_team


def _check(res, want):
    loss, grad, bloss, bgrad = res
    wloss, wgrad, wbloss, wbgrad = want
    np.testing.assert_allclose(loss, wloss, rtol=1e-5)
    np.testing.assert_allclose(grad, wgrad, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(bloss, wbloss, rtol=1e-5)
    np.testing.assert_allclose(bgrad, wbgrad, rtol=1e-4, atol=1e-9)


@pytest.fixture(scope="module")
def reference():
    return _compute("numpy", *BIG)


@pytest.mark.skipif(not COMPILED, reason="no compiled CPU backend is available")
@pytest.mark.parametrize("parent, child", list(itertools.product(COMPILED, repeat=2)))
def test_child_forked_after_parallel_call(parent, child, reference):
    """Parent: a large parallel call with ``parent``; 'fork' child: the same work with
    ``child`` -- correct, bounded in time, and single-threaded when the parent's pool runs."""
    _compute(child, *SMALL)  # compile the serial kernels here, so the child only computes
    _check(_compute(parent, *BIG), reference)  # the parallel call (starts the pool)
    status, res, nthreads, serial = _run_forked(child)
    assert status == "ok", f"forked child raised {res}"
    _check(res, reference)
    if _pool_started():
        assert serial and nthreads == 1, (nthreads, serial)


@pytest.mark.skipif(not COMPILED, reason="no compiled CPU backend is available")
@pytest.mark.parametrize("name", COMPILED)  # not "backend": conftest parametrizes that one
def test_set_num_threads_in_forked_child_stays_serial(name, reference):
    """``set_num_threads(2)`` in such a child is accepted but keeps the kernels serial."""
    _compute(name, *SMALL)
    _compute(name, *BIG)
    status, res, nthreads, serial = _run_forked(name, threads=2)
    assert status == "ok", f"forked child raised {res}"
    _check(res, reference)
    if _pool_started():
        assert serial and nthreads == 1, (nthreads, serial)


@pytest.mark.skipif(not COMPILED, reason="no compiled CPU backend is available")
def test_child_forked_before_any_parallel_call_stays_parallel():
    """A fresh process that forks before any parallel call: its children keep every thread."""
    code = textwrap.dedent(
        """
        import importlib, multiprocessing as mp, sys
        import numpy as np
        import fastloss as fl
        reg = importlib.import_module("fastloss._backends")
        names = sys.argv[1:]
        for name in names:
            reg.get(name)  # imported, nothing computed: no pool yet
        x = np.random.default_rng(0).standard_normal((4096, 1000)).astype(np.float32)
        t = np.arange(4096) % 1000
        want = float(fl.cross_entropy(x, t, backend="numpy"))

        def child(conn):
            out = []
            for name in names:
                got = float(fl.cross_entropy(x, t, backend=name))
                out.append((name, reg.forked_serial(name), reg.get(name).get_num_threads(),
                            abs(got - want) <= 1e-5 * abs(want)))
            conn.send(out)
            conn.close()

        ctx = mp.get_context("fork")
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=child, args=(send,), daemon=True)
        p.start()
        send.close()
        if not recv.poll(240):
            p.kill()
            sys.exit("child timed out")
        for name, serial, nthreads, ok in recv.recv():
            print(name, serial, nthreads, ok)
        p.join(60)
        if p.is_alive():
            p.kill()
            sys.exit("child did not exit")
        sys.exit(p.exitcode)
        """
    )
    env = dict(os.environ)
    for var in ("FASTLOSS_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env.pop(var, None)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code, *COMPILED], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line.split() for line in r.stdout.splitlines()]
    assert [row[0] for row in rows] == COMPILED, r.stdout + r.stderr
    for name, serial, nthreads, ok in rows:
        assert serial == "False", f"{name}: child of a fresh process marked serial"
        assert ok == "True", f"{name}: wrong result in the child"
        if (os.cpu_count() or 1) > 1:
            assert int(nthreads) > 1, f"{name}: child of a fresh process runs {nthreads} thread(s)"
