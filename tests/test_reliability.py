"""Bugs a differential fuzz against PyTorch found, one test each, on every backend.

Each compares with something that is not fastloss: a float64 closed form written here, NumPy,
SciPy, or the documented contract (error type and message).  The numerical semantics of
non-finite inputs (NaN weights, infinite weights, soft targets without mass, softmax of a
row holding +inf) are in ``test_semantics.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp as sp_logsumexp

import fastloss as fl
from conftest import close, sizes


# ----------------------------------------------------------------------------- silently wrong
@pytest.mark.parametrize("var_kind", ["full", "row1"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gnll_d_var_when_the_layout_has_no_2d_view(backend, var_kind, reduction):
    """A (5, 3, 4) transpose of a C-ordered (3, 4, 5) array has no 2-D view: d_var used to be
    the uninitialised buffer, not the kernel's output (which went into a reshape copy)."""
    r = np.random.default_rng(0)
    a, b, c = sizes((3, 4, 5), sim=(2, 3, 2))
    x = np.ascontiguousarray(r.standard_normal((a, b, c))).transpose(2, 0, 1)
    t = r.standard_normal(x.shape)
    if var_kind == "full":
        var = np.ascontiguousarray(r.uniform(0.5, 2.0, (a, b, c))).transpose(2, 0, 1)
    else:  # size-1 dims: broadcast, its gradient summed back
        var = r.uniform(0.5, 2.0, (c, 1, b))
    go = r.standard_normal(x.shape) if reduction == "none" else 0.7
    _, (d_in, d_var) = fl.gaussian_nll_loss(x, t, var, reduction=reduction, return_grad=True, grad_output=go,
                                            backend=backend)
    v = np.broadcast_to(var, x.shape)
    scale = 1.0 / x.size if reduction == "mean" else 1.0
    exp_in = go * scale * (x - t) / v
    exp_var_full = go * scale * 0.5 * (1 / v - (x - t) ** 2 / v**2)
    exp_var = exp_var_full if var_kind == "full" else exp_var_full.sum(axis=1, keepdims=True)
    close(d_in, exp_in, kind="grad")
    close(d_var, exp_var, kind="grad")
    assert d_var.shape == var.shape


def test_bce_keeps_the_small_term_near_one(backend):
    """float32 p = 1 - 2**-24, y = 1: -log p = 5.96e-8, not the -0.0 that a reassociated
    ``b + y (a - b)`` gave."""
    p = np.float32([1 - 2.0**-24])
    got = fl.binary_cross_entropy(p, np.float32([1.0]), reduction="none", backend=backend)
    close(got, -np.log(p.astype(np.float64)), np.float32)
    assert got[0] > 0
    n = sizes((100_000,), sim=(64,))[0]
    q = (1 - np.random.default_rng(1).uniform(1e-6, 1e-5, n)).astype(np.float32)
    y = np.ones_like(q)
    y[::7] = np.float32(1 - 2.0**-24)  # targets just below 1 as well
    ref = -np.mean(y.astype(np.float64) * np.log(q.astype(np.float64))
                   + (1 - y.astype(np.float64)) * np.log1p(-q.astype(np.float64)))
    close(fl.binary_cross_entropy(q, y, backend=backend), ref, np.float32)


def test_uint64_targets_beyond_int64_are_an_index_error(backend):
    logits = np.zeros((4, 3))
    t = np.array([0, 2**64 - 100, 1, 2], np.uint64)  # would wrap to -100 = ignore_index
    before = logits.copy()
    with pytest.raises(IndexError, match=r"target: expected class indices in \[0, 3\).*found 18446744073709551516 at position \(1,\)"):
        fl.cross_entropy(logits, t, return_grad=True, grad_out=logits, backend=backend)
    assert np.array_equal(logits, before)
    # in-range uint64 targets still work
    got = fl.cross_entropy(logits, np.array([0, 1, 1, 2], np.uint64), backend=backend)
    close(got, np.log(3.0))


# ----------------------------------------------------------------------------- crashes, unclear errors
@pytest.mark.parametrize("fn,args", [
    ("binary_cross_entropy_with_logits", lambda x: (x, np.full_like(x, 0.3))),
    ("binary_cross_entropy", lambda x: (1 / (1 + np.exp(-x)), np.full_like(x, 0.3))),
    ("kl_div", lambda x: (x, np.full_like(x, 0.2))),
    ("mse_loss", lambda x: (x, np.zeros_like(x))),
    ("gaussian_nll_loss", lambda x: (x, np.zeros_like(x), np.ones_like(x))),
    ("cross_entropy", lambda x: (x, np.array([0, 2]))),
])
def test_grad_output_array_without_return_grad(backend, fn, args):
    """reduction="none" with a grad_output array and return_grad=False returns the loss (it
    used to raise TypeError on None * float); the array is still validated."""
    x = np.array([[0.5, -1.0, 2.0], [0.1, 0.2, -0.3]])
    a = args(x)
    shape = (2,) if fn == "cross_entropy" else x.shape
    loss = getattr(fl, fn)(*a, reduction="none", grad_output=np.ones(shape), backend=backend)
    loss_ref = getattr(fl, fn)(*a, reduction="none", backend="numpy")
    close(loss, loss_ref)
    with pytest.raises(ValueError, match="grad_output: expected a shape broadcastable to the unreduced loss shape"):
        getattr(fl, fn)(*a, reduction="none", grad_output=np.ones((5, 5)), backend=backend)


@pytest.mark.parametrize("ii", [2**63, -(2**70), 2**64 - 100])
@pytest.mark.parametrize("return_grad", [False, True])
def test_ignore_index_beyond_int64_is_a_value_error(backend, ii, return_grad):
    with pytest.raises(ValueError, match=r"ignore_index: expected an integer in \[-9223372036854775808, 9223372036854775807\], found"):
        fl.cross_entropy(np.zeros((2, 3)), np.array([0, 1]), ignore_index=ii, return_grad=return_grad,
                         backend=backend)


@pytest.mark.parametrize("ii", [2**63 - 1, -(2**63)])
def test_ignore_index_at_the_int64_limits_works(backend, ii):
    close(fl.cross_entropy(np.zeros((2, 3)), np.array([0, 1]), ignore_index=ii, backend=backend), np.log(3.0))


@pytest.mark.parametrize("fn", ["logsumexp", "softmax", "cross_entropy", "mse_loss"])
def test_big_endian_input_is_accepted(backend, fn):
    """A byte-swapped float64 array (as read from some files) is converted once, not refused."""
    r = np.random.default_rng(3)
    x = r.standard_normal((3, 4))
    xb = x.astype(">f8")
    if fn in ("logsumexp", "softmax"):
        got, ref = getattr(fl, fn)(xb, backend=backend), getattr(fl, fn)(x, backend="numpy")
    elif fn == "cross_entropy":
        t = np.array([0, 3, 1])
        got = fl.cross_entropy(xb, t, return_grad=True, backend=backend)
        ref = fl.cross_entropy(x, t, return_grad=True, backend="numpy")
    else:
        tb = r.standard_normal((3, 4)).astype(">f8")
        got = fl.mse_loss(xb, tb, return_grad=True, backend=backend)
        ref = fl.mse_loss(x, tb.astype(np.float64), return_grad=True, backend="numpy")
    for g, e in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
        close(g, e)
        if isinstance(g, np.ndarray):
            assert g.dtype == np.float64 and g.dtype.isnative


@pytest.mark.parametrize("value", [3.0, -np.inf, np.inf, np.nan])
@pytest.mark.parametrize("axis", [-1, 0, None, ()])
def test_logsumexp_of_a_0d_array_is_the_value(backend, value, axis):
    x = np.array(value)
    got = fl.logsumexp(x, axis=axis, backend=backend)
    ref = sp_logsumexp(x)
    assert type(got) is np.float64
    assert np.array_equal(got, ref, equal_nan=True)
    kd = fl.logsumexp(x.astype(np.float32), axis=axis, keepdims=True, backend=backend)
    assert kd.shape == () and kd.dtype == np.float32 and np.array_equal(kd, np.float32(value), equal_nan=True)
    with pytest.raises(ValueError, match="axis"):
        fl.logsumexp(x, axis=1, backend=backend)


@pytest.mark.parametrize("bad", [-0.25, 1.5])
def test_bce_targets_outside_0_1_are_a_value_error(backend, bad):
    p = np.array([0.2, 0.5, 0.7])
    y = np.array([0.0, bad, 1.0])
    with pytest.raises(ValueError, match=rf"target: expected targets in \[0, 1\], found {bad} at position \(1,\)"):
        fl.binary_cross_entropy(p, y, backend=backend)
    # NaN is data, not an error: it propagates
    assert np.isnan(fl.binary_cross_entropy(p, np.array([0.0, np.nan, 1.0]), backend=backend))
