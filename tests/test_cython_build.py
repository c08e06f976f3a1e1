"""Tests specific to the compiled ``cython`` backend (``fastloss._kernels_cy``).

* the backend explains itself when the extension is missing;
* the vectorized polynomial exp / log / log1p of ``kernels/fl_math.hpp`` over the whole float
  range, specials included;
* a direct caller's out-of-range target gives a NaN row, never an out-of-bounds read;
* thread-count independence.

Every kernel entry point against the NumPy reference (every layout, option, special row and
the 262,144-class accuracy) is ``tests/test_kernels.py``, on every backend.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fastloss._backends import cython_backend as C

needs_ext = pytest.mark.skipif(bool(C.unavailable_reason()), reason=C.unavailable_reason() or "built")
DTYPES = (np.float32, np.float64)


# ----------------------------------------------------------------------------- availability
def test_reports_why_when_extension_missing():
    """With the extension unimportable the backend loads but reports a clear reason, and the
    registry turns it into BackendUnavailable naming the cause and the install hint."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["fastloss._kernels_cy"] = None  # makes `import fastloss._kernels_cy` fail
        from fastloss._backends import cython_backend as C
        why = C.unavailable_reason()
        assert "fastloss._kernels_cy is not built" in why, why
        import importlib
        reg = importlib.import_module("fastloss._backends")  # the registry
        try:
            reg.get("cython")
        except reg.BackendUnavailable as exc:
            msg = str(exc)
            assert "not built" in msg and "build_ext" in msg, msg
        else:
            raise AssertionError("expected BackendUnavailable")
        assert reg.status("cython").available is False
        print("OK")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


@needs_ext
def test_build_info_and_threads():
    from fastloss import _kernels_cy as K

    assert "march=" in C.build_info()
    assert isinstance(K.openmp_enabled(), bool)
    old = C.get_num_threads()
    try:
        C.set_num_threads(1)
        assert C.get_num_threads() == 1
        with pytest.raises(ValueError):
            K.set_num_threads(0)
    finally:
        C.set_num_threads(old)


# ----------------------------------------------------------------------------- exp / log
def _ulps(got, ref, dt):
    """Max error of ``got`` in units of the last place of ``dt``, against float64/longdouble ``ref``."""
    ref = np.asarray(ref, np.longdouble)
    sp = np.spacing(np.abs(ref.astype(dt))).astype(np.longdouble)
    return float(np.max(np.abs(got.astype(np.longdouble) - ref) / sp))


def _check_specials(fn, dt, xs, want):
    x = np.array(xs, dt)
    o = np.empty_like(x)
    fn(x, o)
    np.testing.assert_array_equal(o, np.array(want, dt))


@needs_ext
@pytest.mark.parametrize("dt", DTYPES)
def test_exp_accuracy_full_range(dt):
    from fastloss import _kernels_cy as K

    rng = np.random.default_rng(1)
    fi = np.finfo(dt)
    lo, hi = float(np.log(fi.smallest_subnormal)) - 2, float(np.log(fi.max)) + 2
    x = np.concatenate(
        [rng.uniform(lo, hi, 400_000), rng.uniform(-1, 1, 100_000), np.linspace(-1e-6, 1e-6, 1001)]
    ).astype(dt)
    o = np.empty_like(x)
    K._vexp(x, o)
    with np.errstate(over="ignore", under="ignore"):
        ref = np.exp(x.astype(np.longdouble))
    normal = (ref > fi.tiny) & (ref < fi.max)
    assert _ulps(o[normal], ref[normal], dt) < 1.5
    # subnormal results: within one subnormal step; beyond the range: exactly inf / 0
    sub = (ref <= fi.tiny) & (ref > 0)
    assert np.all(np.abs(o[sub].astype(np.longdouble) - ref[sub]) <= fi.smallest_subnormal)
    big = ref >= np.longdouble(fi.max) * 2
    assert np.all(o[big] == np.inf)
    _check_specials(K._vexp, dt, [np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, fi.max, -fi.max],
                    [np.inf, 0.0, 1.0, 1.0, np.inf, 0.0, np.inf, 0.0])
    o = np.empty(1, dt)
    K._vexp(np.array([np.nan], dt), o)
    assert np.isnan(o[0])


@needs_ext
@pytest.mark.parametrize("dt", DTYPES)
def test_expn_accuracy(dt):
    """fl_expn, the exp of shifted logits (x <= 0) of the few-class kernels: one 2^k scale and
    a final rounding into the subnormal range; -inf -> 0, +inf -> +inf, NaN -> NaN."""
    from fastloss import _kernels_cy as K

    rng = np.random.default_rng(13)
    fi = np.finfo(dt)
    lo = float(np.log(fi.smallest_subnormal)) - 2
    x = np.concatenate([rng.uniform(lo, 0, 400_000), rng.uniform(-1, 0, 100_000),
                        np.linspace(-1e-6, 0, 1001), [-0.0, fi.smallest_subnormal * -1]]).astype(dt)
    o = np.empty_like(x)
    K._vexpn(x, o)
    with np.errstate(under="ignore"):
        ref = np.exp(x.astype(np.longdouble))
    normal = ref > fi.tiny
    assert _ulps(o[normal], ref[normal], dt) < 1.5
    sub = ~normal
    assert np.all(np.abs(o[sub].astype(np.longdouble) - ref[sub]) <= fi.smallest_subnormal)
    assert np.any((o[sub] > 0) & (o[sub] < fi.tiny))  # gradual underflow, not a flush to 0
    _check_specials(K._vexpn, dt, [-np.inf, 0.0, -0.0, -fi.max, np.inf],
                    [0.0, 1.0, 1.0, 0.0, np.inf])
    o = np.empty(1, dt)
    K._vexpn(np.array([np.nan], dt), o)
    assert np.isnan(o[0])


@needs_ext
@pytest.mark.parametrize("dt", DTYPES)
def test_log_accuracy_full_range(dt):
    from fastloss import _kernels_cy as K

    rng = np.random.default_rng(2)
    ity = np.uint32 if dt == np.float32 else np.uint64
    top = int(np.array(np.inf, dt).view(ity))  # every positive finite bit pattern is below +inf
    x = rng.integers(1, top, 400_000, dtype=ity).view(dt)  # uniform over bit patterns: all binades
    x = np.concatenate([x, rng.uniform(0.5, 2.0, 100_000), [np.finfo(dt).smallest_subnormal]]).astype(dt)
    o = np.empty_like(x)
    K._vlog(x, o)
    assert _ulps(o, np.log(x.astype(np.longdouble)), dt) < 1.0
    _check_specials(K._vlog, dt, [np.inf, 0.0, -0.0, 1.0], [np.inf, -np.inf, -np.inf, 0.0])
    o = np.empty(3, dt)
    K._vlog(np.array([-1.0, -np.inf, np.nan], dt), o)
    assert np.isnan(o).all()


@needs_ext
@pytest.mark.parametrize("dt", DTYPES)
def test_log1p_accuracy(dt):
    from fastloss import _kernels_cy as K

    rng = np.random.default_rng(3)
    u = np.concatenate(
        [rng.uniform(-1, 1, 200_000), 10.0 ** rng.uniform(-40, 30, 200_000), -(10.0 ** rng.uniform(-40, -1e-4, 50_000))]
    ).astype(dt)
    u = u[np.isfinite(u) & (u > -1)]
    o = np.empty_like(u)
    K._vlog1p(u, o)
    assert _ulps(o, np.log1p(u.astype(np.longdouble)), dt) < 3.0
    _check_specials(K._vlog1p, dt, [np.inf, -1.0, 0.0, -0.0], [np.inf, -np.inf, 0.0, -0.0])
    o = np.empty(2, dt)
    K._vlog1p(np.array([-2.0, np.nan], dt), o)
    assert np.isnan(o).all()


# ----------------------------------------------------------------------------- direct callers
@needs_ext
@pytest.mark.parametrize("dt", DTYPES)
def test_cross_entropy_few_classes_bad_target(dt):
    """A direct caller that skipped validation: a target outside [0, C) gives a NaN row on the
    column-block path as on the row path (never an out-of-bounds read)."""
    rng = np.random.default_rng(21)
    for c in (10, 40):  # column blocks / rows
        x = rng.standard_normal((300, c)).astype(dt)
        t = rng.integers(0, c, 300)
        t[[0, 299]] = [c, -5]
        loss, grad = np.empty(300), np.empty_like(x)
        C.cross_entropy(x, t, None, -100, 0.0, 0.0, 0.0, loss, None, grad, np.ones(300))
        assert np.isnan(loss[[0, 299]]).all() and np.isnan(grad[[0, 299]]).all()
        assert np.isfinite(loss[1:299]).all() and np.isfinite(grad[1:299]).all()


# ----------------------------------------------------------------------------- threads
@needs_ext
def test_thread_count_independent_results():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((256, 2048)).astype(np.float32)
    t = rng.integers(0, 2048, 256)
    xs = rng.standard_normal((40_000, 10)).astype(np.float32)  # column blocks, parallel
    ts = rng.integers(0, 10, 40_000)
    old = C.get_num_threads()
    res = []
    try:
        for nt in (1, 2, 3):
            C.set_num_threads(nt)
            loss, grad = np.empty(256), np.empty_like(x)
            C.cross_entropy(x, t, None, -100, 0.0, 0.0, 0.0, loss, None, grad, np.ones(256))
            s = C.mse(x, x[::-1], None, None, 1.0, None)
            ls, gsm = np.empty(40_000), np.empty_like(xs)
            C.cross_entropy(xs, ts, None, -100, 0.1, 0.0, 0.0, ls, None, gsm, np.ones(40_000))
            res.append((loss, grad, s, ls, gsm))
    finally:
        C.set_num_threads(old)
    for r in res[1:]:
        for a, b in zip(r, res[0]):
            np.testing.assert_array_equal(a, b)
