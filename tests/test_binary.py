"""binary_cross_entropy_with_logits and binary_cross_entropy: values vs SciPy closed forms,
gradients vs finite differences, PyTorch clamp semantics, extremes, dtypes and buffers."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

import fastloss as fl
from conftest import check_grad, close, pick, ref_bce, ref_bce_with_logits, rng, sizes

N, C = sizes((3, 4), sim=(2, 3))
REDUCTIONS = ["mean", "sum", "none"]


def _gos(reduction, shape):
    if reduction == "none":
        return pick([None, rng(98).standard_normal(shape)], [rng(98).standard_normal(shape)])
    return pick([None, -1.3], [-1.3])


def _logit_case(opt, dtype=np.float64, seed=0, shape=(N, C)):
    r = rng(seed)
    z = (r.standard_normal(shape) * 2).astype(dtype)
    y = r.uniform(0, 1, shape).astype(dtype)
    y.flat[0], y.flat[1] = 0.0, 1.0  # hard labels too
    kw = {}
    if "weight_full" in opt:
        kw["weight"] = r.uniform(0.2, 2, shape).astype(dtype)
    if "weight_row" in opt:
        kw["weight"] = r.uniform(0.2, 2, (shape[0], 1)).astype(dtype)
    if "weight_col" in opt:
        kw["weight"] = r.uniform(0.2, 2, shape[-1]).astype(dtype)
    if "pos_weight" in opt:
        kw["pos_weight"] = r.uniform(0.5, 3, shape[-1]).astype(dtype)
    return z, y, kw


LOGIT_OPTS = ["plain", "weight_full", "weight_row", "weight_col", "pos_weight", "weight_row+pos_weight"]


# ----------------------------------------------------------------------------- with logits
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opt", LOGIT_OPTS)
def test_bce_logits_values(backend, opt, reduction, dtype):
    z, y, kw = _logit_case(opt, dtype)
    got = fl.binary_cross_entropy_with_logits(z, y, reduction=reduction, backend=backend, **kw)
    close(got, ref_bce_with_logits(z, y, reduction=reduction, **kw), dtype)
    if reduction == "none":
        assert got.shape == z.shape and got.dtype == dtype
    else:
        assert type(got) is np.dtype(dtype).type


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opt", pick(LOGIT_OPTS, ["weight_row+pos_weight"]))
def test_bce_logits_grad_fd(backend, opt, reduction):
    z, y, kw = _logit_case(opt, seed=1)
    for go in _gos(reduction, z.shape):
        loss, g = fl.binary_cross_entropy_with_logits(z, y, reduction=reduction, return_grad=True, grad_output=go,
                                                      backend=backend, **kw)
        assert g.shape == z.shape and g.dtype == z.dtype
        close(loss, ref_bce_with_logits(z, y, reduction=reduction, **kw))
        check_grad(lambda zz: fl.binary_cross_entropy_with_logits(zz, y, reduction=reduction, backend=backend, **kw),
                   g, z, grad_output=go)


def test_bce_logits_3d_pos_weight_last_axis(backend):
    shape = sizes((2, 3, 4), sim=(2, 2, 3))
    z, y, kw = _logit_case("weight_row+pos_weight", seed=2, shape=shape)
    kw["weight"] = rng(3).uniform(0.2, 2, (shape[0], 1, 1))
    loss, g = fl.binary_cross_entropy_with_logits(z, y, return_grad=True, backend=backend, **kw)
    close(loss, ref_bce_with_logits(z, y, **kw))
    check_grad(lambda zz: fl.binary_cross_entropy_with_logits(zz, y, backend=backend, **kw), g, z)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bce_logits_extremes(backend, dtype):
    big = np.finfo(dtype).max
    z = np.array([big, big, -big, -big, 1e4, -1e4, 0.0, np.nan], dtype)
    y = np.array([0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.0], dtype)
    loss, g = fl.binary_cross_entropy_with_logits(z, y, reduction="none", return_grad=True,
                                                  grad_output=np.ones_like(z), backend=backend)
    want = [big, 0.0, 0.0, big, 1e4, 0.0, np.log(2.0), np.nan]
    close(loss, want, dtype)
    close(g, [1, 0, 0, -1, 1, 0, 0, np.nan], dtype, kind="grad")
    assert np.all(np.isfinite(loss[:-1])) and np.all(np.isfinite(g[:-1]))
    # pos_weight on the positive term only: loss for y=1, z=-big is pos_weight * big
    pw = np.array([0.5], dtype)
    loss, g = fl.binary_cross_entropy_with_logits(z[:4], y[:4], pos_weight=pw, reduction="none", return_grad=True,
                                                  grad_output=np.ones(4, dtype), backend=backend)
    close(loss, [big, 0, 0, 0.5 * np.float64(big)], dtype)
    close(g, [1, 0, 0, -0.5], dtype, kind="grad")


def test_bce_logits_nan_only_affected(backend):
    z = rng(4).standard_normal((3, 4))
    y = rng(5).uniform(0, 1, (3, 4))
    z[1, 2] = np.nan
    loss, g = fl.binary_cross_entropy_with_logits(z, y, reduction="none", return_grad=True,
                                                  grad_output=np.ones((3, 4)), backend=backend)
    mask = np.zeros((3, 4), bool)
    mask[1, 2] = True
    assert np.isnan(loss[mask]).all() and np.isfinite(loss[~mask]).all()
    assert np.isnan(g[mask]).all() and np.isfinite(g[~mask]).all()


def test_bce_logits_literal(backend):
    # z = 0: loss log 2 whatever y; gradient sigmoid(0) - y = 0.5 - y; mean over 4
    z = np.zeros(4)
    y = np.array([0.0, 1.0, 0.25, 1.0])
    pw = np.array([3.0])
    loss, g = fl.binary_cross_entropy_with_logits(z, y, pos_weight=pw, return_grad=True, backend=backend)
    # (1 + (pw-1) y) log 2 per element
    close(loss, np.mean(1 + 2 * y) * np.log(2))
    # d/dz [(1-y) z + (1+(pw-1)y) softplus(-z)] = (1-y) - (1+(pw-1)y)/2 at z = 0
    close(g, ((1 - y) - (1 + 2 * y) / 2) / 4, kind="grad")


def test_bce_logits_float16(backend):
    z, y, kw = _logit_case("pos_weight", np.float16, seed=6)
    loss, g = fl.binary_cross_entropy_with_logits(z, y, return_grad=True, backend=backend, **kw)
    assert type(loss) is np.float32 and g.dtype == np.float16
    close(loss, ref_bce_with_logits(z, y, **kw), np.float32, rtol=1e-5, atol=1e-6)
    l = fl.binary_cross_entropy_with_logits(z, y, reduction="none", backend=backend, **kw)
    assert l.dtype == np.float16


def test_bce_logits_layouts_and_buffers(backend):
    z, y, kw = _logit_case("weight_col+pos_weight", seed=7, shape=(6, 5))
    want_l, want_g = fl.binary_cross_entropy_with_logits(z, y, return_grad=True, backend="numpy", **kw)
    big = np.zeros((12, 10))
    big[::2, ::2] = z
    for name, v in {"fortran": np.asfortranarray(z), "strided": big[::2, ::2], "T": np.ascontiguousarray(z.T).T}.items():
        l, g = fl.binary_cross_entropy_with_logits(v, np.asfortranarray(y), return_grad=True, backend=backend, **kw)
        close(l, want_l, err_msg=name)
        close(g, want_g, kind="grad", err_msg=name)
    buf = z.copy()
    l, g = fl.binary_cross_entropy_with_logits(buf, y, return_grad=True, grad_out=buf, backend=backend, **kw)
    assert np.shares_memory(g, buf)
    close(l, want_l)
    close(buf, want_g, kind="grad")
    out = np.empty_like(z)
    for _ in range(2):
        l, g = fl.binary_cross_entropy_with_logits(z, y, return_grad=True, grad_out=out, backend=backend, **kw)
        assert np.shares_memory(g, out)
        close(out, want_g, kind="grad")


def test_bce_logits_empty(backend):
    z = np.zeros((0, 3))
    loss, g = fl.binary_cross_entropy_with_logits(z, z, reduction="sum", return_grad=True, backend=backend)
    assert loss == 0 and g.shape == (0, 3)
    assert fl.binary_cross_entropy_with_logits(z, z, reduction="none", backend=backend).shape == (0, 3)


# ----------------------------------------------------------------------------- on probabilities
def _prob_case(opt, dtype=np.float64, seed=0, shape=(N, C)):
    r = rng(seed)
    p = r.uniform(0.2, 0.8, shape).astype(dtype)
    y = r.uniform(0, 1, shape).astype(dtype)
    y.flat[0], y.flat[1] = 0.0, 1.0
    kw = {}
    if opt == "weight_full":
        kw["weight"] = r.uniform(0.2, 2, shape).astype(dtype)
    elif opt == "weight_col":
        kw["weight"] = r.uniform(0.2, 2, shape[-1]).astype(dtype)
    elif opt == "weight_row":
        kw["weight"] = r.uniform(0.2, 2, (shape[0], 1)).astype(dtype)
    return p, y, kw


PROB_OPTS = ["plain", "weight_full", "weight_col", "weight_row"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opt", PROB_OPTS)
def test_bce_values(backend, opt, reduction, dtype):
    p, y, kw = _prob_case(opt, dtype)
    got = fl.binary_cross_entropy(p, y, reduction=reduction, backend=backend, **kw)
    close(got, ref_bce(p, y, reduction=reduction, **kw), dtype)
    # and against the sigmoid form: BCE(expit(z)) == BCE-with-logits(z) away from the clamp
    z = np.log(p.astype(np.float64)) - np.log1p(-p.astype(np.float64))
    close(got, ref_bce_with_logits(z, y, reduction=reduction, **kw), dtype, rtol=1e-10 if dtype == np.float64 else 2e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opt", pick(PROB_OPTS, ["weight_col"]))
def test_bce_grad_fd(backend, opt, reduction):
    p, y, kw = _prob_case(opt, seed=1)
    for go in _gos(reduction, p.shape):
        loss, g = fl.binary_cross_entropy(p, y, reduction=reduction, return_grad=True, grad_output=go,
                                          backend=backend, **kw)
        assert g.shape == p.shape and g.dtype == p.dtype
        check_grad(lambda pp: fl.binary_cross_entropy(pp, y, reduction=reduction, backend=backend, **kw),
                   g, p, grad_output=go, h=5e-4)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bce_clamp_literal(backend, dtype):
    """PyTorch: log terms clamped at -100; gradient (p - y) / max(p (1 - p), 1e-12), where ATen's
    1e-12 is a float constant (9.99999996e-13) in every dtype."""
    p = np.array([0.0, 0.0, 1.0, 1.0, 0.5, 1e-50 if dtype == np.float64 else 0.0], dtype)
    y = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.5], dtype)
    loss, g = fl.binary_cross_entropy(p, y, reduction="none", return_grad=True, grad_output=np.ones(6, dtype),
                                      backend=backend)
    last = 0.5 * 100 if dtype == np.float32 else 0.5 * min(100.0, -np.log(1e-50))
    close(loss, [100.0, 0.0, 100.0, 0.0, np.log(2.0), last], dtype)
    e = np.float64(np.float32(1e-12))
    close(g, [-1 / e, 0.0, 1 / e, 0.0, -2.0, (float(p[-1]) - 0.5) / max(float(p[-1]) * (1 - float(p[-1])), e)],
          dtype, kind="grad", rtol=1e-6 if dtype == np.float32 else 1e-12)
    assert np.all(np.isfinite(g))
    s = fl.binary_cross_entropy(p[:4], y[:4], reduction="sum", backend=backend)
    close(s, 200.0, dtype)


def test_bce_probabilities_at_bounds_are_valid(backend):
    p = np.array([0.0, 1.0])
    assert np.isfinite(fl.binary_cross_entropy(p, np.array([0.0, 1.0]), backend=backend))


def test_bce_float16_and_buffers(backend):
    p, y, kw = _prob_case("weight_col", np.float16, seed=8)
    loss, g = fl.binary_cross_entropy(p, y, return_grad=True, backend=backend, **kw)
    assert type(loss) is np.float32 and g.dtype == np.float16
    close(loss, ref_bce(p, y, **kw), np.float32, rtol=1e-5, atol=1e-6)
    p, y, kw = _prob_case("weight_full", seed=9)
    want_l, want_g = fl.binary_cross_entropy(p, y, return_grad=True, backend="numpy", **kw)
    buf = p.copy()
    l, g = fl.binary_cross_entropy(buf, y, return_grad=True, grad_out=buf, backend=backend, **kw)
    assert np.shares_memory(g, buf)
    close(l, want_l)
    close(buf, want_g, kind="grad")
    l, g = fl.binary_cross_entropy(np.asfortranarray(p), y, return_grad=True, backend=backend, **kw)
    close(g, want_g, kind="grad")


def test_bce_nan_propagates(backend):
    p = np.array([0.5, np.nan, 0.25])
    y = np.array([1.0, 1.0, 0.0])
    loss, g = fl.binary_cross_entropy(p, y, reduction="none", return_grad=True, grad_output=np.ones(3), backend=backend)
    assert np.isnan(loss[1]) and np.isnan(g[1])
    close(loss[[0, 2]], [np.log(2), -np.log(0.75)])
    close(g[[0, 2]], [-2.0, 0.25 / (0.25 * 0.75)], kind="grad")


def test_bce_sigmoid_consistency(backend):
    """d BCE(sigmoid(z))/dz = d BCE-with-logits/dz by the chain rule."""
    z = rng(10).standard_normal((N, C))
    y = rng(11).uniform(0, 1, (N, C))
    p = expit(z)
    _, gp = fl.binary_cross_entropy(p, y, reduction="sum", return_grad=True, backend=backend)
    _, gz = fl.binary_cross_entropy_with_logits(z, y, reduction="sum", return_grad=True, backend=backend)
    close(gp * p * (1 - p), gz, kind="grad", rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", pick([300, 5000, 1 << 17], [300]))
def test_float32_sums_of_equal_terms(backend, n):
    """A float32 reduction of many equal terms -- where float32 partial sums round the same way
    every time and their errors add up (~terms per lane x 2**-24: 3.1e-6 on 300 BCE terms once,
    numba, with a gradient) -- is within the contract's 2e-6 of the exact value, with and
    without a gradient, in place too."""
    p = np.float32(0.5390625)
    want = -np.log(np.float64(p))  # y = 1: every term is -log p
    zv = np.float32(-0.75)
    want_l = float(np.logaddexp(0.0, -np.float64(zv)))  # softplus(-z), y = 1
    for grad in (False, True):
        x = np.full(n, p, np.float32)
        y = np.ones(n, np.float32)
        got = fl.binary_cross_entropy(x, y, return_grad=grad, grad_out=x if grad else None, backend=backend)
        got = got[0] if grad else got
        assert abs(float(got) - want) <= 2e-6 * want, (grad, float(got), want)
        z = np.full(n, zv, np.float32)
        got = fl.binary_cross_entropy_with_logits(z, y, reduction="sum", return_grad=grad, backend=backend)
        got = got[0] if grad else got
        assert abs(float(got) - n * want_l) <= 2e-6 * n * want_l, (grad, float(got), n * want_l)
