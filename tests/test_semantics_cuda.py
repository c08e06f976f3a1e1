"""The agreed edge-case semantics K1-K6 (issue #16) on the ``cuda`` backend.

Every K item is checked on both ways into the backend: NumPy input offloaded with
``backend="cuda"`` (the public layer, then the backend's kernel entry points) and device
arrays (the public layer with the backend's device adaptor: validation and axis handling on
the device).  References are PyTorch
float64 autograd or closed forms written out here -- never fastloss itself.

Runs under the Numba CUDA simulator, in its own process (shapes stay tiny)::

    NUMBA_ENABLE_CUDASIM=1 FASTLOSS_TEST_BACKENDS=cuda python -m pytest tests/test_semantics_cuda.py -q

or on a real GPU; skipped otherwise.
"""
from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest

numba_cuda = pytest.importorskip("numba.cuda")
cuda = numba_cuda

import fastloss as fl  # noqa: E402
from fastloss import _dispatch  # noqa: E402
from fastloss._backends import cuda_backend as C  # noqa: E402

SIM = bool(getattr(cuda.config, "ENABLE_CUDASIM", 0))
if not SIM and C.unavailable_reason():
    pytest.skip(f"cuda backend unavailable: {C.unavailable_reason()}", allow_module_level=True)

PATHS = ["offload", "device"]
I64_MIN, I64_MAX = -(2**63), 2**63 - 1


@pytest.fixture(autouse=True)
def _routes_device_arrays(monkeypatch):
    """Numba simulator arrays reach the device path (as in tests/test_cuda_sim.py)."""
    probe = cuda.to_device(np.zeros(1))
    if not _dispatch.is_device_array(probe):
        monkeypatch.setattr(_dispatch, "is_device_array", C.is_device_array)


@pytest.fixture(autouse=True)
def _quiet():
    # inf/nan arithmetic is the point here: the simulator runs kernels as NumPy scalars
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def dev(a):
    a = np.asarray(a)  # (np.ascontiguousarray would make a 0-d array 1-d)
    return cuda.to_device(a if a.flags.c_contiguous else np.ascontiguousarray(a))


def to_host(r):
    if isinstance(r, tuple):
        return tuple(to_host(v) for v in r)
    return r.copy_to_host() if hasattr(r, "copy_to_host") else r


def run(path, fn, *args, **kw):
    """``fl.<fn>`` with NumPy arrays offloaded (``backend="cuda"``) or as device arrays;
    results come back as NumPy."""
    if path == "device":
        args = [dev(a) if isinstance(a, np.ndarray) else a for a in args]
        kw = {k: dev(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    else:
        kw["backend"] = "cuda"
    return to_host(getattr(fl, fn)(*args, **kw))


def same(a, b, rtol=1e-12, atol=1e-13):
    """Equal values, NaN where NaN and infinities of the same sign where infinite."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_array_equal(np.isposinf(a), np.isposinf(b))
    np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b))
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, equal_nan=True)


def torch_ce(x, t, weight=None, eps=0.0, reduction="mean"):
    """PyTorch float64 loss and d(sum of the loss)/dx (t: indices or probabilities)."""
    torch = pytest.importorskip("torch")
    X = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    T = torch.tensor(t) if np.asarray(t).dtype.kind in "iu" else torch.tensor(t, dtype=torch.float64)
    W = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    loss = torch.nn.functional.cross_entropy(X, T, weight=W, label_smoothing=eps, reduction=reduction)
    loss.sum().backward()
    return loss.detach().numpy(), X.grad.numpy()


# ============================================================================ K1
@pytest.mark.parametrize("path", PATHS)
def test_k1_reproducer(path):
    x = np.zeros((2, 3))
    loss, grad = run(path, "cross_entropy", x, np.array([0, 1]), weight=np.array([1.0, 1.0, np.nan]),
                     return_grad=True)
    same(loss, math.log(3))
    same(grad, np.array([[-1 / 3, 1 / 6, 1 / 6], [1 / 6, -1 / 3, 1 / 6]]))
    el, eg = torch_ce(x, np.array([0, 1]), [1.0, 1.0, np.nan])
    same(loss, el)
    same(grad, eg)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("c", [3, 200])  # few classes, and a row that loops within its threads
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_k1_nan_inf_weight_of_unused_class_without_smoothing(path, c, reduction):
    rng = np.random.default_rng(c)
    x = rng.standard_normal((3, c))
    t = np.array([0, 1, 0])
    w = rng.random(c) + 0.5
    w[-1] = np.nan  # classes no target uses
    w[2] = np.inf
    loss, grad = run(path, "cross_entropy", x, t, weight=w, reduction=reduction, return_grad=True)
    el, eg = torch_ce(x, t, w, 0.0, reduction)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    same(loss, el)
    same(grad, eg)


@pytest.mark.parametrize("path", PATHS)
def test_k1_nan_weight_with_smoothing_is_nan_as_pytorch(path):
    x = np.zeros((2, 3))
    w = np.array([1.0, 1.0, np.nan])
    loss, grad = run(path, "cross_entropy", x, np.array([0, 1]), weight=w, label_smoothing=0.1,
                     reduction="sum", return_grad=True)
    el, eg = torch_ce(x, np.array([0, 1]), w, 0.1, "sum")
    assert np.isnan(loss)
    same(loss, el)
    same(grad, eg)


# ============================================================================ K2
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_k2_infinite_weight_with_smoothing(path, reduction):
    x = np.zeros((2, 3))
    t = np.array([0, 1])
    w = np.array([1.0, np.inf, 1.0])
    loss, grad = run(path, "cross_entropy", x, t, weight=w, label_smoothing=0.1, reduction=reduction,
                     return_grad=True)
    same(loss, np.inf if reduction == "sum" else [np.inf, np.inf])
    same(grad, [[np.inf, np.nan, np.inf], [np.inf, np.nan, np.inf]])
    el, eg = torch_ce(x, t, w, 0.1, reduction)
    same(loss, el)
    same(grad, eg)


@pytest.mark.parametrize("path", PATHS)
def test_k2_mean_is_inf_over_inf(path):
    loss = run(path, "cross_entropy", np.zeros((2, 3)), np.array([0, 1]), weight=np.array([1.0, np.inf, 1.0]),
               label_smoothing=0.1)
    assert np.isnan(loss)
    same(loss, torch_ce(np.zeros((2, 3)), np.array([0, 1]), [1.0, np.inf, 1.0], 0.1)[0])


@pytest.mark.parametrize("path", PATHS)
def test_k2_infinite_weight_at_the_row_max_of_random_rows(path):
    """An infinite weight at each row's max (x_c - shift == 0 there) gives +inf, per element."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 5))
    x[:, 2] = 4.0  # class 2 is every row's max
    w = rng.random(5) + 0.5
    w[2] = np.inf
    t = np.array([0, 1, 3])
    loss, grad = run(path, "cross_entropy", x, t, weight=w, label_smoothing=0.2, reduction="none",
                     return_grad=True)
    el, eg = torch_ce(x, t, w, 0.2, "none")
    same(loss, el)
    same(grad, eg)


@pytest.mark.parametrize("path", PATHS)
def test_k2_infinite_weight_where_minus_log_p_is_zero(path):
    """The per-element term inf * (lse - x_c) with lse - x_c == 0 exactly (every other class
    underflows) is inf * 0 = NaN, as PyTorch; elsewhere the row is +inf."""
    x = np.array([[4.0, -1000.0, -1000.0], [4.0, 3.0, -1000.0]])
    w = np.array([np.inf, 1.0, 1.0])
    t = np.array([1, 1])
    loss, grad = run(path, "cross_entropy", x, t, weight=w, label_smoothing=0.1, reduction="none",
                     return_grad=True)
    same(loss, [np.nan, np.inf])
    el, eg = torch_ce(x, t, w, 0.1, "none")
    same(loss, el)
    same(grad, eg)


# ============================================================================ K3
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_k3_zero_mass_row_with_nan_or_inf_is_nan(path, bad):
    x = np.array([[0.0, bad, 1.0]])
    loss = run(path, "cross_entropy", x, np.zeros((1, 3)))
    assert np.isnan(loss)
    same(loss, torch_ce(x, np.zeros((1, 3)))[0])


@pytest.mark.parametrize("path", PATHS)
def test_k3_soft_rows(path):
    """Per row ``(sum y') log s - sum_{y' != 0} y' (x - shift)``: NaN or +inf anywhere -> NaN
    even without mass; +inf without mass beside mass elsewhere -> +inf (``log s = inf``); a
    -inf logit with zero mass contributes 0; a row of only -inf -> NaN.  PyTorch gives NaN
    for the last two non-NaN cases (its log-softmax of such rows is NaN throughout): the
    documented divergences."""
    x = np.array([
        [0.0, np.nan, 1.0],      # zero mass, NaN
        [0.0, np.inf, 1.0],      # zero mass, +inf
        [0.0, -np.inf, 1.0],     # -inf with zero mass
        [-np.inf, -np.inf, -np.inf],  # zero mass, only -inf
        [0.5, np.inf, 1.0],      # mass elsewhere, +inf without mass: lse - x = +inf
        [0.0, np.nan, 1.0],      # mass, NaN
        [2.0, -1.0, 0.5],        # ordinary
    ])
    y = np.array([
        [0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0],
        [0.3, 0.0, 0.7],
        [0.0, 0.0, 0.0],
        [0.4, 0.0, 0.6],
        [0.5, 0.0, 0.5],
        [0.2, 0.3, 0.5],
    ])
    loss = run(path, "cross_entropy", x, y, reduction="none")
    fin = x[2, [0, 2]]
    lse = np.log(np.exp(fin).sum())
    row2 = 0.3 * (lse - 0.0) + 0.7 * (lse - 1.0)
    lse6 = np.log(np.exp(x[6]).sum())
    row6 = float(np.sum(y[6] * (lse6 - x[6])))
    same(loss, [np.nan, np.nan, row2, np.nan, np.inf, np.nan, row6])
    el = torch_ce(x, y, reduction="none")[0]
    keep = [0, 1, 3, 5, 6]  # rows 2 and 4 are the documented divergences
    same(loss[keep], el[keep])


@pytest.mark.parametrize("path", PATHS)
def test_k3_with_weight_and_smoothing(path):
    """With smoothing every class has mass: a NaN/+inf row is NaN or inf, as PyTorch."""
    x = np.array([[0.0, np.nan, 1.0], [0.0, np.inf, 1.0], [0.0, 1.0, 2.0]])
    y = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    w = np.array([0.5, 2.0, 1.0])
    loss = run(path, "cross_entropy", x, y, weight=w, label_smoothing=0.1, reduction="none")
    same(loss, torch_ce(x, y, w, 0.1, "none")[0])


# ============================================================================ K4
@pytest.mark.parametrize("path", PATHS)
def test_k4_softmax_of_a_row_holding_inf_is_nan(path):
    x = np.array([[np.inf, 0.0, 1.0], [0.0, 1.0, 2.0], [np.inf, -np.inf, np.inf], [np.nan, 0.0, 1.0],
                  [-np.inf, -np.inf, -np.inf], [-1e300, np.inf, 1e300]])
    torch = pytest.importorskip("torch")
    sm = run(path, "softmax", x)
    same(sm, torch.softmax(torch.tensor(x), dim=-1).numpy())
    assert np.isnan(sm[[0, 2, 3, 4, 5]]).all()
    same(run(path, "softmax", np.array([[np.inf, 0.0, 1.0]])), [[np.nan, np.nan, np.nan]])
    # log_softmax of a row holding +inf is NaN throughout too, as PyTorch
    ls = run(path, "log_softmax", x)
    same(ls, torch.log_softmax(torch.tensor(x), dim=-1).numpy())
    assert np.isnan(ls[[0, 2, 3, 4, 5]]).all()
    same(ls[[1, 3, 4]], torch.log_softmax(torch.tensor(x[[1, 3, 4]]), dim=-1).numpy())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_k4_softmax_other_axis_and_dtype(path, dt):
    x = np.array([[np.inf, 0.0], [0.0, 1.0], [1.0, 2.0]], dt)  # classes along axis 0
    sm = run(path, "softmax", x, axis=0)
    assert sm.dtype == dt
    assert np.isnan(sm[:, 0]).all()
    e = np.exp(np.array([0.0, 1.0, 2.0]) - 2.0)
    same(sm[:, 1], e / e.sum(), rtol=1e-6 if dt == np.float32 else 1e-12)


# ============================================================================ K5
@pytest.mark.parametrize("path", PATHS)
def test_k5_float32_totals_accumulate_in_float64(path):
    """Terms near 1e38 whose float32 sum overflows but whose mean fits float32, with mixed
    operand dtypes (float32 logits, float64 targets, float32 weights).  128 elements: more
    than one per thread even on the simulator's small grids, so a per-thread float32 partial
    sum would overflow."""
    f32 = np.float32
    shape = (16, 8)
    x = np.full(shape, 1.5e19, f32)  # (x - 0)^2 = 2.25e38 per element
    t64 = np.zeros(shape)
    r = run(path, "mse_loss", x, t64)
    assert r.dtype == f32 and np.isclose(float(r), 2.25e38, rtol=1e-6)
    r = run(path, "gaussian_nll_loss", x, t64, np.ones(shape, f32))
    assert np.isclose(float(r), 1.125e38, rtol=1e-6)
    r = run(path, "binary_cross_entropy_with_logits", np.full(shape, -3e38, f32), np.ones(shape),
            weight=np.ones(8, f32))
    assert np.isclose(float(r), 3e38, rtol=1e-6)
    r = run(path, "kl_div", np.full(shape, -3e38, f32), np.ones(shape, f32), reduction="mean")
    assert np.isclose(float(r), 3e38, rtol=1e-6)
    xl = np.array([[0.0, -3e38], [0.0, -3e38]], f32)  # -log p of class 1: 3e38 per row
    r = run(path, "cross_entropy", xl, np.array([1, 1]), weight=np.ones(2, f32))
    assert r.dtype == f32 and np.isclose(float(r), 3e38, rtol=1e-6)
    r = run(path, "cross_entropy", xl, np.array([[0.0, 1.0], [0.0, 1.0]]))
    assert np.isclose(float(r), 3e38, rtol=1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dt", [np.float16, np.float32])
def test_k5_low_precision_mean_close_to_float64_mean(path, dt):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((4, 8)) * 3).astype(dt)
    t = rng.standard_normal((4, 8)).astype(dt)
    r = run(path, "mse_loss", x, t)
    ref = np.mean((x.astype(np.float64) - t.astype(np.float64)) ** 2)
    assert r.dtype == np.float32
    assert abs(float(r) - ref) <= 2e-6 * ref
    logits = rng.standard_normal((4, 8)).astype(dt)
    r = run(path, "cross_entropy", logits, np.arange(4))
    l64 = logits.astype(np.float64)
    m = l64.max(axis=1)
    ref = np.mean(m + np.log(np.exp(l64 - m[:, None]).sum(axis=1)) - l64[np.arange(4), np.arange(4)])
    assert abs(float(r) - ref) <= 2e-6 * abs(ref)


# ============================================================================ K6 (device path)
def test_k6_unsigned_indices_above_int64_max_device():
    x = dev(np.zeros((2, 3)))
    # 2**64 - 100 would wrap to -100, the default ignore_index: never silently ignored
    for tv, val, pos in [([0, 2**64 - 100], 2**64 - 100, 1), ([2**63, 1], 2**63, 0),
                         ([5, 2**64 - 1], 2**64 - 1, 1)]:
        with pytest.raises(IndexError, match=rf"target: expected class indices in \[0, 3\) or "
                                             rf"ignore_index=-100, found {val} at position \({pos},\)"):
            fl.cross_entropy(x, dev(np.array(tv, np.uint64)))
    # in range: as int64 indices; an unsigned index may equal a non-negative ignore_index
    for udt in (np.uint64, np.uint32, np.uint8):
        r = to_host(fl.cross_entropy(x, dev(np.array([0, 2], udt)), reduction="none"))
        same(r, [math.log(3)] * 2)
    r = to_host(fl.cross_entropy(x, dev(np.array([0, 2], np.uint64)), ignore_index=2, reduction="none"))
    same(r, [math.log(3), 0.0])


def test_k6_ignore_index_outside_int64_device():
    x, t = dev(np.zeros((2, 3))), dev(np.array([0, 1]))
    for ii in (2**63, -(2**63) - 1, 2**70):
        msg = rf"ignore_index: expected an integer in \[{I64_MIN}, {I64_MAX}\], found {ii}"
        with pytest.raises(ValueError, match=msg):
            fl.cross_entropy(x, t, ignore_index=ii)
        with pytest.raises(ValueError, match=msg):  # soft targets too
            fl.cross_entropy(x, dev(np.full((2, 3), 1 / 3)), ignore_index=ii)
    for ii in (I64_MAX, I64_MIN, np.int64(-5)):
        same(to_host(fl.cross_entropy(x, t, ignore_index=ii)), math.log(3))


@pytest.mark.parametrize("as_device", [True, False])
def test_k6_grad_output_array_without_gradient_device(as_device):
    rng = np.random.default_rng(6)
    a = rng.random((2, 3)) * 0.8 + 0.1
    b = rng.random((2, 3)) * 0.8 + 0.1
    go = np.full((2, 3), 2.0)
    cases = [("mse_loss", (a, b), {}), ("binary_cross_entropy", (a, b), {}),
             ("binary_cross_entropy_with_logits", (a, b), {}), ("kl_div", (a, b), {}),
             ("gaussian_nll_loss", (a, b, 0.5), {}), ("gaussian_nll_loss", (a, b, b), {})]
    g = (lambda v: dev(v)) if as_device else (lambda v: v)
    for fn, args, kw in cases:
        dargs = [dev(v) if isinstance(v, np.ndarray) else v for v in args]
        plain = to_host(getattr(fl, fn)(*dargs, reduction="none"))
        r = to_host(getattr(fl, fn)(*dargs, reduction="none", grad_output=g(go)))
        same(r, plain)  # returns the loss, unscaled
        with pytest.raises(ValueError, match="grad_output: expected a shape broadcastable"):
            getattr(fl, fn)(*dargs, reduction="none", grad_output=g(np.ones((3, 3))))
        with pytest.raises(TypeError, match="grad_output"):
            getattr(fl, fn)(*dargs, reduction="none", grad_output=g(np.ones((2, 3), np.complex128)))
    x = dev(np.zeros((2, 3)))
    r = to_host(fl.cross_entropy(x, dev(np.array([0, 1])), reduction="none", grad_output=g(np.ones(2))))
    same(r, [math.log(3)] * 2)
    with pytest.raises(ValueError, match="grad_output: expected a shape broadcastable"):
        fl.cross_entropy(x, dev(np.array([0, 1])), reduction="none", grad_output=g(np.ones(3)))


@pytest.mark.parametrize("value", [2.5, -np.inf, np.inf, np.nan])
def test_k6_logsumexp_of_0d_device(value):
    for dt in (np.float64, np.float32, np.float16):
        d = dev(np.array(value, dt))
        cdt = np.float64 if dt == np.float64 else np.float32
        for axis in (-1, 0, None, ()):
            r = fl.logsumexp(d, axis=axis)
            assert isinstance(r, np.generic) and r.dtype == cdt
            same(r, np.array(value, dt))
        k = fl.logsumexp(d, axis=-1, keepdims=True)
        assert tuple(k.shape) == () and np.dtype(k.dtype) == dt
        same(to_host(k), np.array(value, dt))
    with pytest.raises(ValueError, match="axis"):
        fl.logsumexp(dev(np.array(value)), axis=1)


def test_k6_bce_target_outside_unit_interval_device():
    p = dev(np.array([[0.5, 0.5], [0.5, 0.5]]))
    for tv, val, pos in [([[0.0, 1.0], [1.5, 0.0]], "1.5", "(1, 0)"), ([[np.nan, -0.25], [0.0, 2.0]], "-0.25", "(0, 1)")]:
        with pytest.raises(ValueError, match=rf"target: expected targets in \[0, 1\], found {val} at position {re.escape(pos)}"):
            fl.binary_cross_entropy(p, dev(np.array(tv)))
    # the probs are judged first, as on the host
    with pytest.raises(ValueError, match="probs: expected probabilities"):
        fl.binary_cross_entropy(dev(np.array([1.5, 0.5])), dev(np.array([2.0, 0.5])))
    # NaN targets pass and propagate; the bounds themselves are fine
    r = to_host(fl.binary_cross_entropy(p, dev(np.array([[np.nan, 1.0], [0.0, 0.5]])), reduction="none"))
    same(r, [[np.nan, math.log(2)], [math.log(2), math.log(2)]])


def test_k6_host_operands_of_a_device_array_call_0d_and_byte_swapped():
    """Host operands mixed into a device call are sent as they are: a 0-d one stays 0-d, and
    non-native byte order (as read from some files) is converted to native order first."""
    same(fl.binary_cross_entropy(dev(np.array(0.5)), np.array(1.0)), math.log(2))
    x = dev(np.zeros((2, 3)))
    same(fl.cross_entropy(x, np.array([0, 1], ">i8")), math.log(3))
    same(fl.cross_entropy(x, np.full((2, 3), 1 / 3, ">f8")), math.log(3))
    same(fl.mse_loss(x, np.full((2, 3), 2.0, ">f4")), 4.0)
    same(fl.cross_entropy(x, np.array([0, 1]), weight=np.array([1.0, 3.0, 5.0], ">f8")), math.log(3))


# ============================================================================ item 1
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("var_layout", ["same", "contiguous", "row", "bcast"])
def test_gaussian_nll_d_var_for_layouts_without_a_2d_view(path, var_layout):
    """x of shape (5, 3, 4) transposed from a contiguous (3, 4, 5): no (R, K) view exists."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(21)
    x = np.ascontiguousarray(rng.standard_normal((3, 4, 5))).transpose(2, 0, 1)
    t = rng.standard_normal((5, 3, 4))
    if var_layout == "same":
        var = np.ascontiguousarray(rng.random((3, 4, 5)) + 0.5).transpose(2, 0, 1)
    elif var_layout == "contiguous":
        var = rng.random((5, 3, 4)) + 0.5
    elif var_layout == "row":
        var = rng.random((5, 3)) + 0.5
    else:
        var = rng.random((5, 1, 4)) + 0.5
    if path == "device":
        def d(a):  # the same strides on the device: a transposed view of a contiguous copy
            if a.flags.c_contiguous:
                return dev(a)
            return dev(a.transpose(1, 2, 0)).transpose((2, 0, 1))

        dx, dvar = d(x), d(var)
        assert tuple(dx.strides) == x.strides
        loss, (gx, gv) = to_host(fl.gaussian_nll_loss(dx, dev(t), dvar, return_grad=True))
    else:
        loss, (gx, gv) = fl.gaussian_nll_loss(x, t, var, return_grad=True, backend="cuda")
    X = torch.tensor(x, requires_grad=True)
    V = torch.tensor(var[..., None] if var_layout == "row" else var, requires_grad=True)
    L = torch.nn.functional.gaussian_nll_loss(X, torch.tensor(t), V)
    L.backward()
    same(loss, L.item())
    same(gx, X.grad.numpy())
    same(gv, V.grad.numpy().reshape(var.shape))
