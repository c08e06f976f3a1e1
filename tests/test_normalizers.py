"""logsumexp, softmax, log_softmax and their backward passes against SciPy and closed forms."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.special as sp

import fastloss as fl
from conftest import SIM, close, fd_grad, rng, sizes

DTYPES = [np.float64, np.float32]


def _x(shape, dtype, seed=0, scale=3.0):
    return (rng(seed).standard_normal(shape) * scale).astype(dtype)


# ----------------------------------------------------------------------------- values vs SciPy
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), (3, 1000), (1, 1), (4, 1)])
def test_logsumexp_matches_scipy(backend, dtype, shape):
    x = _x(sizes(shape), dtype)
    got = fl.logsumexp(x, backend=backend)
    assert isinstance(got, np.ndarray) and got.dtype == dtype and got.shape == x.shape[:-1]
    close(got, sp.logsumexp(x.astype(np.float64), axis=-1), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_logsumexp_keepdims_and_axis(backend, dtype):
    x = _x(sizes((3, 4, 5)), dtype)
    for axis in (0, 1, 2, -1, -2):
        for keepdims in (False, True):
            got = fl.logsumexp(x, axis=axis, keepdims=keepdims, backend=backend)
            want = sp.logsumexp(x.astype(np.float64), axis=axis, keepdims=keepdims)
            assert got.shape == want.shape, (axis, keepdims)
            assert got.dtype == dtype
            close(got, want, dtype, err_msg=f"axis={axis} keepdims={keepdims}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_logsumexp_1d_is_numpy_scalar(backend, dtype):
    x = _x(sizes((9,)), dtype)
    got = fl.logsumexp(x, backend=backend)
    assert np.ndim(got) == 0
    assert isinstance(got, (np.generic, np.ndarray)) and np.asarray(got).dtype == dtype
    close(got, sp.logsumexp(x.astype(np.float64)), dtype)


@pytest.mark.parametrize("fn,ref", [("softmax", sp.softmax), ("log_softmax", sp.log_softmax)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((6, 9), -1), ((3, 4, 5), 1), ((3, 4, 5), 0), ((2, 1000), -1), ((4, 1), -1)])
def test_softmax_matches_scipy(backend, fn, ref, dtype, shape, axis):
    x = _x(sizes(shape), dtype, seed=1)
    got = getattr(fl, fn)(x, axis=axis, backend=backend)
    assert got.shape == x.shape and got.dtype == dtype
    close(got, ref(x.astype(np.float64), axis=axis), dtype, kind="grad")


@pytest.mark.parametrize("fn,ref", [("softmax", sp.softmax), ("log_softmax", sp.log_softmax)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_out_and_in_place(backend, fn, ref, dtype):
    x = _x(sizes((4, 6)), dtype, seed=2)
    want = ref(x.astype(np.float64), axis=-1)
    out = np.full_like(x, 7.0)
    got = getattr(fl, fn)(x, out=out, backend=backend)
    assert got is out or np.shares_memory(got, out)
    close(out, want, dtype, kind="grad")
    xi = x.copy()
    got = getattr(fl, fn)(xi, out=xi, backend=backend)
    assert np.shares_memory(got, xi)
    close(xi, want, dtype, kind="grad")


# ----------------------------------------------------------------------------- extremes
def test_logsumexp_inf_nan_rows(backend):
    inf, nan = np.inf, np.nan
    x = np.array([
        [inf, 0.0, 1.0],       # +inf anywhere -> +inf
        [-inf, -inf, -inf],    # all -inf -> -inf
        [inf, -inf, 0.0],      # never inf - inf
        [inf, inf, inf],       # all +inf -> +inf, not nan
        [nan, 0.0, 1.0],       # nan propagates to this row only
        [-inf, 0.0, 0.0],      # -inf entries drop out
        [1.0, 2.0, 3.0],
    ])
    want = np.array([inf, -inf, inf, inf, nan, np.log(2.0), sp.logsumexp([1.0, 2.0, 3.0])])
    for dtype in DTYPES:
        got = fl.logsumexp(x.astype(dtype), backend=backend)
        close(got, want, dtype)


def test_softmax_rows_with_inf(backend):
    inf = np.inf
    x = np.array([[-inf, 0.0, 0.0, -inf], [-inf, 1.0, -inf, -inf], [np.nan, 0, 0, 0], [0.0, 1.0, 2.0, 3.0]])
    for dtype in DTYPES:
        xs = x.astype(dtype)
        s = fl.softmax(xs, backend=backend)
        ls = fl.log_softmax(xs, backend=backend)
        close(s[0], [0, 0.5, 0.5, 0], dtype, kind="grad")
        close(s[1], [0, 1, 0, 0], dtype, kind="grad")
        close(ls[0], [-inf, -np.log(2), -np.log(2), -inf], dtype, kind="grad")
        close(ls[1], [-inf, 0, -inf, -inf], dtype, kind="grad")
        assert np.all(np.isnan(s[2])) and np.all(np.isnan(ls[2]))
        close(s[3], sp.softmax([0.0, 1, 2, 3]), dtype, kind="grad")
        close(ls[3], sp.log_softmax([0.0, 1, 2, 3]), dtype, kind="grad")
    # a row of only -inf has no softmax: NaN, as in SciPy and PyTorch (never a finite guess)
    x = np.full((2, 3), -np.inf)
    x[1] = [0.0, 1.0, 2.0]
    for dtype in DTYPES:
        s = fl.softmax(x.astype(dtype), backend=backend)
        ls = fl.log_softmax(x.astype(dtype), backend=backend)
        assert np.all(np.isnan(s[0])) and np.all(np.isnan(ls[0]))
        close(s[1], sp.softmax([0.0, 1.0, 2.0]), dtype, kind="grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_plus_inf_single(backend, dtype):
    # a single +inf in a row: no softmax, no log-softmax: NaN throughout, as PyTorch gives
    # (torch.softmax / torch.log_softmax of [inf, 0, 1] are [nan, nan, nan]); lse = +inf
    x = np.array([[np.inf, 0.0, 1.0], [0.0, 1.0, 2.0], [1000.0, np.inf, -np.inf]], dtype)
    for fn in (fl.softmax, fl.log_softmax):
        s = fn(x, backend=backend)
        assert s.shape == x.shape and s.dtype == dtype
        assert np.isnan(s[[0, 2]]).all()
        close(s[1], (sp.softmax if fn is fl.softmax else sp.log_softmax)([0.0, 1.0, 2.0]), dtype, kind="grad")
    assert fl.logsumexp(x, backend=backend)[0] == np.inf


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_logits(backend, dtype):
    big = 3e38
    x = np.array([[big, big, 0.0], [1e4, 0.0, -1e4], [-big, -big, -big]], dtype=dtype)
    got = fl.logsumexp(x, backend=backend)
    want = [np.float64(dtype(big)) + np.log(2.0), 1e4, np.float64(dtype(-big)) + np.log(3.0)]
    close(got, want, dtype)
    assert np.all(np.isfinite(got))
    s = fl.softmax(x, backend=backend)
    close(s, [[0.5, 0.5, 0], [1, 0, 0], [1 / 3, 1 / 3, 1 / 3]], dtype, kind="grad")
    ls = fl.log_softmax(x, backend=backend)
    assert np.all(np.isfinite(ls[:, :2]))
    close(ls[0, :2], [-np.log(2), -np.log(2)], dtype, kind="grad")
    close(ls[1], [0.0, -1e4, -2e4], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_softmax_large_offset(backend, dtype):
    # large logits with O(1) differences: log_softmax must be (x - m) - log(sum), not x - lse
    # (lse rounded to the dtype loses ulp(1e4) ~ 1e-3 in float32)
    x = np.array([[1e4, 1e4 + 0.5, 1e4 - 3.0], [-1e4, -1e4 + 0.25, -1e4 - 1.0]], dtype)
    close(fl.log_softmax(x, backend=backend), sp.log_softmax(x.astype(np.float64), axis=-1), dtype, kind="grad")
    close(fl.softmax(x, backend=backend), sp.softmax(x.astype(np.float64), axis=-1), dtype, kind="grad")


def test_empty_batch(backend):
    for dtype in DTYPES:
        x = np.zeros((0, 5), dtype)
        assert fl.logsumexp(x, backend=backend).shape == (0,)
        assert fl.softmax(x, backend=backend).shape == (0, 5)
        assert fl.log_softmax(x, backend=backend).shape == (0, 5)
        g = fl.softmax_backward(x, x, backend=backend)
        assert g.shape == (0, 5) and g.dtype == dtype


def test_one_class(backend):
    x = np.array([[3.0], [-2.0], [np.inf]])
    close(fl.logsumexp(x, backend=backend), [3.0, -2.0, np.inf])
    close(fl.softmax(x[:2], backend=backend), [[1.0], [1.0]])
    close(fl.log_softmax(x[:2], backend=backend), [[0.0], [0.0]])


# ----------------------------------------------------------------------------- layouts
def _views(x):
    yield "fortran", np.asfortranarray(x)
    big = np.zeros((x.shape[0] * 2, x.shape[1] * 3), x.dtype)
    big[::2, ::3] = x
    yield "strided", big[::2, ::3]
    yield "reversed", x[::-1, ::-1].copy()[::-1, ::-1]
    yield "transposed", np.ascontiguousarray(x.T).T


@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts(backend, dtype):
    x = _x(sizes((5, 8)), dtype, seed=3)
    x64 = x.astype(np.float64)
    for name, v in _views(x):
        assert np.array_equal(v, x)
        close(fl.logsumexp(v, backend=backend), sp.logsumexp(x64, axis=-1), dtype, err_msg=name)
        close(fl.softmax(v, backend=backend), sp.softmax(x64, axis=-1), dtype, kind="grad", err_msg=name)
        close(fl.log_softmax(v, axis=0, backend=backend), sp.log_softmax(x64, axis=0), dtype, kind="grad", err_msg=name)
    # backward passes on the same layouts (both operands as views)
    g = _x(x.shape, dtype, seed=4)
    y = sp.softmax(x64, axis=-1).astype(dtype)
    want = y * (g - np.sum(g.astype(np.float64) * y, axis=-1, keepdims=True))
    for (name, gv), (_, yv) in zip(_views(g), _views(y)):
        close(fl.softmax_backward(gv, yv, backend=backend), want, dtype, kind="grad", err_msg=name)


def test_float16_and_scalar_types(backend):
    x = _x(sizes((4, 6)), np.float16, seed=5)
    x64 = x.astype(np.float64)
    for fn, ref in [("softmax", sp.softmax), ("log_softmax", sp.log_softmax)]:
        got = getattr(fl, fn)(x, backend=backend)
        assert got.dtype == np.float16
        close(got, ref(x64, axis=-1), np.float16)
    got = fl.logsumexp(x, backend=backend)
    assert got.dtype == np.float16
    close(got, sp.logsumexp(x64, axis=-1), np.float16)
    s = fl.logsumexp(x[0], backend=backend)  # a scalar result: np.float32 for float16 input
    assert np.ndim(s) == 0
    assert type(s) is np.float32, f"scalar result of float16 input should be np.float32, got {type(s)}"


def test_input_not_modified(backend):
    x = _x(sizes((4, 6)), np.float32, seed=6)
    g = _x(x.shape, np.float32, seed=7)
    x0, g0 = x.copy(), g.copy()
    fl.logsumexp(x, backend=backend)
    fl.softmax(x, backend=backend)
    fl.log_softmax(x, backend=backend)
    fl.softmax_backward(g, x, backend=backend)
    fl.log_softmax_backward(g, x, backend=backend)
    assert np.array_equal(x, x0) and np.array_equal(g, g0)


# ----------------------------------------------------------------------------- backward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_backward_is_vjp(backend, dtype, axis):
    shape = sizes((3, 4, 5), sim=(2, 3, 2))
    x = _x(shape, np.float64, seed=8, scale=1.0)
    g = _x(shape, np.float64, seed=9, scale=1.0)
    # closed form y * (g - sum(g*y))
    y = sp.softmax(x, axis=axis)
    want = y * (g - np.sum(g * y, axis=axis, keepdims=True))
    got = fl.softmax_backward(g.astype(dtype), y.astype(dtype), axis=axis, backend=backend)
    assert got.dtype == dtype and got.shape == shape
    close(got, want, dtype, kind="grad", rtol=1e-12 if dtype == np.float64 else 2e-6,
          atol=1e-14 if dtype == np.float64 else 1e-6)
    if dtype == np.float64 and not SIM:
        # and it really is the VJP of softmax: finite differences of sum(g * softmax(x))
        fd = fd_grad(lambda xx: np.sum(g * fl.softmax(xx, axis=axis, backend=backend)), x)
        np.testing.assert_allclose(fl.softmax_backward(g, fl.softmax(x, axis=axis, backend=backend), axis=axis,
                                                       backend=backend), fd, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_log_softmax_backward_is_vjp(backend, dtype, axis):
    shape = sizes((3, 4, 5), sim=(2, 3, 2))
    x = _x(shape, np.float64, seed=10, scale=1.0)
    g = _x(shape, np.float64, seed=11, scale=1.0)
    y = sp.log_softmax(x, axis=axis)
    want = g - np.exp(y) * np.sum(g, axis=axis, keepdims=True)
    got = fl.log_softmax_backward(g.astype(dtype), y.astype(dtype), axis=axis, backend=backend)
    assert got.dtype == dtype and got.shape == shape
    close(got, want, dtype, kind="grad", rtol=1e-12 if dtype == np.float64 else 2e-6,
          atol=1e-14 if dtype == np.float64 else 1e-6)
    if dtype == np.float64 and not SIM:
        fd = fd_grad(lambda xx: np.sum(g * fl.log_softmax(xx, axis=axis, backend=backend)), x)
        np.testing.assert_allclose(fl.log_softmax_backward(g, fl.log_softmax(x, axis=axis, backend=backend),
                                                           axis=axis, backend=backend), fd, rtol=1e-7, atol=1e-9)


def test_logsumexp_gradient_is_softmax(backend):
    # d logsumexp / dx = softmax(x): finite differences of fl.logsumexp against fl.softmax
    x = _x(sizes((3, 5)), np.float64, seed=12, scale=1.0)
    fd = fd_grad(lambda xx: np.sum(fl.logsumexp(xx, backend=backend)), x)
    np.testing.assert_allclose(fd, sp.softmax(x, axis=-1), rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------- large
def _large(backend, n, c):
    x64 = rng(13).standard_normal((n, c)) * 4.0
    x = x64.astype(np.float32)
    xr = x.astype(np.float64)  # reference from the same (rounded) inputs
    close(fl.logsumexp(x, backend=backend), sp.logsumexp(xr, axis=-1), np.float32)
    close(fl.softmax(x, backend=backend), sp.softmax(xr, axis=-1), np.float32, kind="grad")
    close(fl.log_softmax(x, backend=backend), sp.log_softmax(xr, axis=-1), np.float32, kind="grad")


def test_many_classes_small(backend):
    _large(backend, *sizes((3, 4099), sim=(2, 70)))


@pytest.mark.slow
def test_many_classes_262144(backend):
    _large(backend, *sizes((4, 262144), sim=(2, 300)))
