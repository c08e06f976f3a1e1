"""Tests specific to the compiled ``cython`` backend (``fastloss._kernels_cy``).

* the backend explains itself when the extension is missing;
* the vectorized polynomial exp / log / log1p of ``kernels/fl_math.h`` over the whole float
  range, specials included;
* every kernel entry point against the NumPy reference on normalized 2-D arrays, in every
  memory layout (C, Fortran, strided, reversed, stride-0 broadcast), with the optional
  arguments, in place, and with +-inf / NaN;
* accuracy at 262,144 classes and thread-count independence.

The cross-backend test matrix over the public API lives elsewhere; these tests call the kernel
protocol directly.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fastloss.backends import cython_backend as C
from fastloss.backends import numpy_backend as R

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
        from fastloss.backends import cython_backend as C
        why = C.unavailable_reason()
        assert "fastloss._kernels_cy is not built" in why, why
        import importlib
        reg = importlib.import_module("fastloss.backends")  # the registry (fastloss.backends is also a function)
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


# ----------------------------------------------------------------------------- vs the reference
def _close(got, want, dt, what):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want)), f"{what}: NaN positions differ"
    rtol, atol = (1e-12, 1e-13) if dt == np.float64 else (2e-6, 1e-6)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


def _layouts(a):
    """The same values in C order, Fortran order, a strided view and a reversed view."""
    yield "C", a
    yield "F", np.asfortranarray(a)
    big = np.zeros((a.shape[0] * 2, a.shape[1] * 3), a.dtype)
    big[::2, ::3] = a
    yield "strided", big[::2, ::3]
    yield "reversed", np.ascontiguousarray(a[::-1, ::-1])[::-1, ::-1]


def _empty(shape, dt, order):
    return np.empty(shape, dt, order=order)


def _logits(n, c, dt, rng, specials=True):
    x = (rng.standard_normal((n, c)) * 3).astype(dt)
    if specials and n >= 4 and c >= 3:
        x[1, 2] = -np.inf  # a masked class
        x[2, :] = -np.inf  # a row of only -inf
        x[3, 1] = np.inf  # a row holding +inf
    return x


# (37, 50): several row panels of a Fortran-order operand, the last one partial
SHAPES = [(5, 7), (3, 1), (4, 3000), (0, 5), (2, 5000), (37, 50)]


@needs_ext
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_normalizers(dt, shape):
    rng = np.random.default_rng(4)
    n, c = shape
    x = _logits(n, c, dt, rng)
    for name, xv in _layouts(x):
        want = np.empty(n, dt)
        got = np.empty(n, dt)
        R.logsumexp(x, want)
        C.logsumexp(xv, got)
        _close(got, want, dt, f"logsumexp {name}")
        for fn in ("softmax", "log_softmax"):
            want = np.empty((n, c), dt)
            getattr(R, fn)(x, want)
            for order in "CF":
                got = _empty((n, c), dt, order)
                getattr(C, fn)(xv, got)
                _close(got, want, dt, f"{fn} {name} out={order}")
        # in place: out is x
        xi = xv.copy(order="F" if name == "F" else "C")
        C.softmax(xi, xi)
        want = np.empty((n, c), dt)
        R.softmax(x, want)
        _close(xi, want, dt, f"softmax in place {name}")


@needs_ext
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), (4, 3000), (0, 3), (37, 50)])
def test_softmax_backward(dt, shape):
    rng = np.random.default_rng(5)
    n, c = shape
    y = np.empty((n, c), dt)
    R.softmax(_logits(n, c, dt, rng, specials=False), y)
    ly = np.log(y)
    g = rng.standard_normal((n, c)).astype(dt)
    for fn, yy in (("softmax_backward", y), ("log_softmax_backward", ly)):
        want = np.empty((n, c), dt)
        getattr(R, fn)(g, yy, want)
        for (gn, gv), (yn, yv) in itertools.product(_layouts(g), _layouts(yy)):
            got = np.empty((n, c), dt)
            getattr(C, fn)(gv, yv, got)
            _close(got, want, dt, f"{fn} g={gn} y={yn}")
        gi = g.copy()  # grad in place: out is the incoming gradient
        getattr(C, fn)(gi, yy, gi)
        _close(gi, want, dt, f"{fn} in place")


@needs_ext
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), (3, 1), (6, 3000), (37, 50)])
def test_cross_entropy_hard(dt, shape):
    rng = np.random.default_rng(6)
    n, c = shape
    x = _logits(n, c, dt, rng)
    t = rng.integers(0, c, n)
    t[0] = -100  # ignored
    if c >= 3 and n >= 4:
        t[1] = 2  # target logit -inf -> loss +inf, finite gradient
    w = (rng.random(c) + 0.5).astype(dt)
    for weight, eps, z in itertools.product((None, w, np.broadcast_to(w[:1], (c,))), (0.0, 0.1), (0.0, 1e-3)):
        gs = rng.random(n)
        want_l, want_g = np.empty(n), np.empty((n, c), dt)
        R.cross_entropy(x, t, weight, -100, eps, z, want_l, want_g, gs)
        want_g[0] = 0  # the protocol: zeros for an ignored row
        for name, xv in _layouts(x):
            what = f"{name} weight={weight is not None} eps={eps} z={z}"
            got_l, got_g = np.empty(n), np.empty((n, c), dt, order="F" if name == "F" else "C")
            C.cross_entropy(xv, t, weight, -100, eps, z, got_l, got_g, gs)
            _close(got_l, want_l, dt, "loss " + what)
            _close(got_g, want_g, dt, "grad " + what)
            xi = xv.copy(order="K") if name != "strided" else next(v for k, v in _layouts(x) if k == "strided")
            C.cross_entropy(xi, t, weight, -100, eps, z, got_l, xi, gs)  # in place
            _close(got_l, want_l, dt, "loss in place " + what)
            _close(xi, want_g, dt, "grad in place " + what)
            got_l2 = np.empty(n)
            C.cross_entropy(xv, t, weight, -100, eps, z, got_l2, None, None)
            _close(got_l2, want_l, dt, "loss without grad " + what)
        if n >= 4 and c >= 3:
            assert got_l[1] == np.inf and np.isfinite(xi[1]).all()
            if eps == 0 and z == 0:
                assert np.isnan(got_l[2])  # a row of only -inf, as the reference


@needs_ext
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), (4, 3000), (37, 50)])
def test_cross_entropy_soft(dt, shape):
    rng = np.random.default_rng(7)
    n, c = shape
    x = _logits(n, c, dt, rng)
    y = rng.random((n, c)).astype(dt)
    y /= y.sum(axis=1, keepdims=True)
    y[0, :2] = 0
    w = (rng.random(c) + 0.5).astype(dt)
    for weight, eps, z in itertools.product((None, w), (0.0, 0.2), (0.0, 1e-3)):
        gs = np.full(n, 0.25)
        want_l, want_g = np.empty(n), np.empty((n, c), dt)
        R.cross_entropy_soft(x, y, weight, eps, z, want_l, want_g, gs)
        for (xn, xv), (yn, yv) in itertools.product(_layouts(x), _layouts(y)):
            got_l, got_g = np.empty(n), np.empty((n, c), dt)
            C.cross_entropy_soft(xv, yv, weight, eps, z, got_l, got_g, np.broadcast_to(0.25, (n,)))
            what = f"x={xn} y={yn} weight={weight is not None} eps={eps} z={z}"
            _close(got_l, want_l, dt, "loss " + what)
            _close(got_g, want_g, dt, "grad " + what)


def _large_logits(dt, c, rng):
    """Rows of large logits with O(1) differences (offsets 1e4 and near the dtype's max)."""
    big = 3e38 if dt == np.float32 else 1e300
    rows = [1e4 + rng.standard_normal(c), -1e4 + rng.standard_normal(c), np.full(c, big),
            np.r_[big, 0.97 * big, np.zeros(c - 2)], np.r_[np.full(c - 1, -big), -0.99 * big]]
    return np.array(rows).astype(dt)


@needs_ext
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("c", [3, 3000])
def test_large_logits_keep_the_log_term(dt, c):
    """log p is ``(x - m) - log s``, never ``x - lse``: ``lse = m + log s`` rounds to ``m`` for
    large logits (1e4 in float32 loses ~5e-4; at 3e38 / 1e300 the whole ``log s``).  Checked
    for log_softmax, the hard loss with label smoothing and weights, and soft targets, on the
    direct and the gathered (strided) row paths."""
    rng = np.random.default_rng(12)
    x = _large_logits(dt, c, rng)
    n = x.shape[0]
    want = np.empty_like(x)
    R.log_softmax(x, want)
    np.testing.assert_allclose(want[2], -np.log(c), rtol=1e-6)  # the reference itself
    for name, xv in _layouts(x):
        got = np.empty_like(x)
        C.log_softmax(xv, got)
        _close(got, want, dt, f"log_softmax {name}")
    t = np.arange(n) % c
    w = (rng.random(c) + 0.5).astype(dt)
    y = rng.random((n, c)).astype(dt)
    y /= y.sum(axis=1, keepdims=True)
    for weight, eps in itertools.product((None, w), (0.0, 0.1)):
        want_l, want_g = np.empty(n), np.empty_like(x)
        R.cross_entropy(x, t, weight, -100, eps, 0.0, want_l, want_g, np.ones(n))
        ws_l, ws_g = np.empty(n), np.empty_like(x)
        R.cross_entropy_soft(x, y, weight, eps, 0.0, ws_l, ws_g, np.ones(n))
        if weight is None and eps == 0:
            assert abs(want_l[2] - np.log(c)) < 1e-6 * np.log(c)  # equal huge logits: log C
        for name, xv in _layouts(x):
            what = f"{name} weight={weight is not None} eps={eps}"
            got_l, got_g = np.empty(n), np.empty_like(x)
            C.cross_entropy(xv, t, weight, -100, eps, 0.0, got_l, got_g, np.ones(n))
            _close(got_l, want_l, dt, "hard loss " + what)
            _close(got_g, want_g, dt, "hard grad " + what)
            C.cross_entropy_soft(xv, y, weight, eps, 0.0, got_l, got_g, np.ones(n))
            _close(got_l, ws_l, dt, "soft loss " + what)
            _close(got_g, ws_g, dt, "soft grad " + what)


# ----------------------------------------------------------------------------- few classes
def _few_class_logits(n, c, dt, rng):
    """Logits for the column-block kernel: several blocks (the last one partial) and one row of
    each special kind (the reference's semantics are the contract)."""
    x = (rng.standard_normal((n, c)) * 3).astype(dt)
    big = 3e38 if dt == np.float32 else 1e300
    x[1, :] = -np.inf  # only -inf
    x[2, 0] = np.inf  # +inf (with finite others)
    x[3, :] = np.inf  # only +inf
    x[4, -1] = np.nan  # NaN with a finite max
    x[5, :] = big  # huge equal logits: loss log C
    x[6, :] = -big
    x[6, 0] = -0.99 * big
    x[7, :] = 800.0  # exp(x) overflows without the shift
    x[8, 0] = -np.inf  # a masked class (the target of row 8)
    x[300, :] = np.nan
    x[301, 0] = np.inf
    x[301, -1] = 1e30  # +inf max with a large finite entry: exp(x - 0) overflows
    return x


def _few_class_targets(n, c, rng, ignore):
    t = rng.integers(0, c, n)
    t[8] = 0  # target logit -inf -> loss +inf, finite gradient
    t[9] = ignore
    t[10:n:7] = ignore  # ignored rows all over the blocks
    t[12] = ignore
    return t


@needs_ext
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("c", [1, 2, 3, 5, 7, 8, 9, 10, 16, 31, 32, 33, 47, 64, 97])
def test_cross_entropy_few_classes(dt, c):
    """The column-block kernel (few classes in C order, more in Fortran order) against the
    reference: every option, every special row, per-row and scalar gradient scales, every
    layout (the row kernel takes some of them: 97 classes, float64 from 49), in place and loss
    only."""
    rng = np.random.default_rng(20 + c)
    n = 600  # blocks of 256 rows: two full ones and a partial one
    x = _few_class_logits(n, c, dt, rng)
    w = (rng.random(c) + 0.5).astype(dt)
    gs_rows = rng.standard_normal(n)
    gs_rows[:3] = [0.0, -1.0, 2.5]
    gs_scalar = np.broadcast_to(0.5, (n,))
    for ignore, weight, eps, z, gs in itertools.product(
        (-100, min(1, c - 1)), (None, w), (0.0, 0.1), (0.0, 1e-3), (gs_rows, gs_scalar)
    ):
        t = _few_class_targets(n, c, rng, ignore)
        what = f"c={c} ignore={ignore} weight={weight is not None} eps={eps} z={z} gs={gs.strides}"
        want_l, want_g = np.empty(n), np.empty((n, c), dt)
        with np.errstate(all="ignore"):
            R.cross_entropy(x, t, weight, ignore, eps, z, want_l, want_g, gs)
        want_g[t == ignore] = 0  # the protocol: exact zeros for an ignored row
        for name, xv in _layouts(x):
            for gorder in "CF":
                got_l, got_g = np.full(n, 7.0), np.full((n, c), 7, dt, order=gorder)
                C.cross_entropy(xv, t, weight, ignore, eps, z, got_l, got_g, gs)
                _close(got_l, want_l, dt, f"loss {name} grad={gorder} {what}")
                _close(got_g, want_g, dt, f"grad {name} grad={gorder} {what}")
                assert np.all(got_g[t == ignore] == 0)
            xi = xv.copy(order="K") if name != "strided" else next(v for k, v in _layouts(x) if k == "strided")
            C.cross_entropy(xi, t, weight, ignore, eps, z, got_l, xi, gs)  # in place
            _close(got_l, want_l, dt, f"loss in place {name} {what}")
            _close(xi, want_g, dt, f"grad in place {name} {what}")
            got_l2 = np.zeros(2 * n)[::2]  # a strided loss output
            C.cross_entropy(xv, t, weight, ignore, eps, z, got_l2, None, None)
            _close(got_l2, want_l, dt, f"loss without grad {name} {what}")
        if c > 1:  # target logit -inf among finite ones
            assert got_l[8] == np.inf and np.isfinite(xi[8]).all()
        if weight is None and eps == 0 and z == 0 and t[5] != ignore:  # equal huge logits
            assert abs(got_l[5] - np.log(c)) <= 1e-6 * max(1.0, np.log(c))


@needs_ext
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("c", [1, 2, 5, 10, 33, 64, 300, 3000])
def test_normalizers_column_blocks(dt, c):
    """logsumexp / softmax / log_softmax through the column-block kernel (few classes, or
    Fortran order up to 2048 / 1024 classes) against the reference: several blocks, special
    rows (+inf, only -inf, NaN, huge logits), every layout of input and output, in place."""
    rng = np.random.default_rng(23)
    n = 600
    x = _few_class_logits(n, c, dt, rng)
    want_lse = np.empty(n, dt)
    with np.errstate(all="ignore"):
        R.logsumexp(x, want_lse)
    for name, xv in _layouts(x):
        got = np.zeros(2 * n, dt)[::2]  # a strided output
        C.logsumexp(xv, got)
        _close(got, want_lse, dt, f"logsumexp c={c} {name}")
        for fn in ("softmax", "log_softmax"):
            want = np.empty((n, c), dt)
            with np.errstate(all="ignore"):
                getattr(R, fn)(x, want)
            for order in "CF":
                got = _empty((n, c), dt, order)
                getattr(C, fn)(xv, got)
                _close(got, want, dt, f"{fn} c={c} {name} out={order}")
            xi = xv.copy(order="K") if name != "strided" else next(v for k, v in _layouts(x) if k == "strided")
            getattr(C, fn)(xi, xi)
            _close(xi, want, dt, f"{fn} in place c={c} {name}")


@needs_ext
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("c", [300, 1000, 3000])
def test_cross_entropy_fortran_order_columns(dt, c):
    """Fortran-order logits are read by columns in place (float32 up to 2048 classes, float64
    up to 1024; the rest through gathered row panels): several blocks, more than FL_CB_SUMC
    classes (partial sums of exp added in float64), special rows, both gradient orders."""
    rng = np.random.default_rng(22)
    n = 320
    x = _few_class_logits(n, c, dt, rng)
    xf = np.asfortranarray(x)
    w = (rng.random(c) + 0.5).astype(dt)
    for weight, eps, z in ((None, 0.0, 0.0), (w, 0.1, 1e-3)):
        t = _few_class_targets(n, c, rng, -100)
        gs = rng.standard_normal(n)
        want_l, want_g = np.empty(n), np.empty((n, c), dt)
        with np.errstate(all="ignore"):
            R.cross_entropy(x, t, weight, -100, eps, z, want_l, want_g, gs)
        want_g[t == -100] = 0
        for gorder in "FC":
            got_l, got_g = np.empty(n), np.empty((n, c), dt, order=gorder)
            C.cross_entropy(xf, t, weight, -100, eps, z, got_l, got_g, gs)
            _close(got_l, want_l, dt, f"loss c={c} grad={gorder} eps={eps}")
            _close(got_g, want_g, dt, f"grad c={c} grad={gorder} eps={eps}")
        xi = xf.copy(order="F")
        C.cross_entropy(xi, t, weight, -100, eps, z, got_l, xi, gs)
        _close(got_l, want_l, dt, f"loss in place c={c}")
        _close(xi, want_g, dt, f"grad in place c={c}")


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
        C.cross_entropy(x, t, None, -100, 0.0, 0.0, loss, grad, np.ones(300))
        assert np.isnan(loss[[0, 299]]).all() and np.isnan(grad[[0, 299]]).all()
        assert np.isfinite(loss[1:299]).all() and np.isfinite(grad[1:299]).all()


def _ew_inputs(n, c, dt, rng):
    z = (rng.standard_normal((n, c)) * 5).astype(dt)
    y = rng.random((n, c)).astype(dt)
    p = rng.random((n, c)).astype(dt)
    if n * c > 10:
        z.flat[:5] = [np.inf, -np.inf, 800, -800, np.nan]
        p.flat[:2] = [0, 1]
        y.flat[:2] = [0, 1]
    return z, y, p


@needs_ext
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", [(6, 5), (1, 3000), (3000, 1), (0, 3), (7, 2100)])
def test_elementwise(dt, shape):
    rng = np.random.default_rng(8)
    n, c = shape
    z, y, p = _ew_inputs(n, c, dt, rng)
    w = np.broadcast_to((rng.random(c) + 0.5).astype(dt), (n, c))
    pw = np.broadcast_to((rng.random(c) * 3).astype(dt), (n, c))
    gout = rng.standard_normal((n, c)).astype(dt)
    var = np.broadcast_to(rng.random((n, 1)).astype(dt), (n, c)).copy()
    if n * c > 10:
        var.flat[5:7] = [0.0, np.nan]

    def both(fn, args_ref, args_got, what):
        with np.errstate(all="ignore"):
            outs_r = [np.zeros((n, c), dt) for _ in range(3)]  # an unused output stays 0
            outs_c = [np.zeros((n, c), dt) for _ in range(3)]
            sr = fn(R, *args_ref, outs_r)
            sc = fn(C, *args_got, outs_c)
        _close(sc, sr, dt, what + " sum")
        for k, (a, b) in enumerate(zip(outs_c, outs_r)):
            _close(a, b, dt, f"{what} output {k}")

    for (name, zv), weight, pos, go in itertools.product(_layouts(z), (None, w), (None, pw), (None, gout)):
        what = f"bce_with_logits {name} w={weight is not None} pw={pos is not None} gout={go is not None}"
        both(lambda m, zz, o: m.bce_with_logits(zz, y, weight, pos, o[0], o[1], 0.3, go), (z,), (zv,), what)
    for name, pv in _layouts(p):
        for weight in (None, w):
            both(lambda m, pp, o: m.bce(pp, y, weight, o[0], o[1], 0.5, gout), (p,), (pv,), f"bce {name}")
        with np.errstate(divide="ignore"):
            logp = np.log(p)  # log(0) = -inf: a zero target probability, given as a log-target
        for lt, tt in ((False, p), (True, logp)):
            both(lambda m, xx, o: m.kl_div(xx, tt, lt, o[0], o[1], 0.5, None), (z,), (z if name == "C" else np.asfortranarray(z),), f"kl_div {lt}")
        both(lambda m, xx, o: m.mse(xx, y, o[0], o[1], 0.5, gout), (z,), (np.asfortranarray(z),), "mse")
        for full in (False, True):
            both(lambda m, xx, o: m.gaussian_nll(xx, y, var, full, 1e-6, o[0], o[1], o[2], 0.5, gout), (z,), (z,), f"gnll {full}")
            vb = np.broadcast_to(var[:, :1], (n, c))
            both(lambda m, xx, o: m.gaussian_nll(xx, y, vb, full, 1e-6, o[0], o[1], o[2], 0.5, None), (z,), (z,), "gnll var broadcast")


@needs_ext
@pytest.mark.parametrize("dt", DTYPES)
def test_elementwise_optional_outputs_and_in_place(dt):
    rng = np.random.default_rng(9)
    z, y, _ = _ew_inputs(40, 300, dt, rng)
    with np.errstate(all="ignore"):
        lr, gr = np.empty_like(z), np.empty_like(z)
        sr = R.bce_with_logits(z, y, None, None, lr, gr, 0.5, None)
        s1 = C.bce_with_logits(z, y, None, None, None, None, 0.5, None)
        _close(s1, sr, dt, "sum only")
        zi = z.copy()
        s2 = C.bce_with_logits(zi, y, None, None, None, zi, 0.5, None)
        _close(s2, sr, dt, "sum in place")
        _close(zi, gr, dt, "grad in place")
        zf = np.asfortranarray(z)
        s3 = C.bce_with_logits(zf, y, None, None, None, zf, 0.5, None)
        _close(zf, gr, dt, "grad in place, Fortran order")
        gvr = np.empty_like(z)
        R.gaussian_nll(z, y, np.abs(y), False, 1e-6, lr, None, gvr, 1.0, None)
        gv = np.empty_like(z)
        C.gaussian_nll(z, y, np.abs(y), False, 1e-6, None, None, gv, 1.0, None)
        _close(gv, gvr, dt, "grad_var only")


# ----------------------------------------------------------------------------- accuracy at scale
@needs_ext
@pytest.mark.parametrize("dt", DTYPES)
def test_cross_entropy_262144_classes(dt):
    """float32 loss within 2e-6 relative (gradient 1e-6 absolute when scaled to O(1)), float64
    within 1e-12, against a float64 / longdouble computation on the same input values."""
    rng = np.random.default_rng(10)
    n, c = 3, 262_144
    x = (rng.standard_normal((n, c)) * 4 + 50).astype(dt)  # large offset: tests the shift
    t = rng.integers(0, c, n)
    loss, grad = np.empty(n), np.empty((n, c), dt)
    C.cross_entropy(x, t, None, -100, 0.1, 1e-4, loss, grad, np.ones(n))
    xl = x.astype(np.longdouble)
    m = xl.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(xl - m).sum(axis=1))
    ref = 0.9 * (lse - xl[np.arange(n), t]) + 0.1 / c * (lse[:, None] - xl).sum(axis=1) + 1e-4 * lse**2
    rtol = 2e-6 if dt == np.float32 else 1e-12
    np.testing.assert_allclose(loss, ref.astype(np.float64), rtol=rtol)
    p = np.exp(xl - lse[:, None])
    gref = p * (1 + 2e-4 * lse[:, None]) - 0.1 / c
    gref[np.arange(n), t] -= 0.9
    # gradient errors relative to its largest entry (the gradient scaled to O(1))
    tol = 1e-6 if dt == np.float32 else 1e-12
    gref = gref.astype(np.float64)
    np.testing.assert_allclose(grad, gref, rtol=0, atol=tol * np.abs(gref).max())


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
            C.cross_entropy(x, t, None, -100, 0.0, 0.0, loss, grad, np.ones(256))
            s = C.mse(x, x[::-1], None, None, 1.0, None)
            ls, gsm = np.empty(40_000), np.empty_like(xs)
            C.cross_entropy(xs, ts, None, -100, 0.1, 0.0, ls, gsm, np.ones(40_000))
            res.append((loss, grad, s, ls, gsm))
    finally:
        C.set_num_threads(old)
    for r in res[1:]:
        for a, b in zip(r, res[0]):
            np.testing.assert_array_equal(a, b)
