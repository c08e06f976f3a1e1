"""kl_div, mse_loss and gaussian_nll_loss: values vs SciPy/closed forms, gradients vs finite
differences for every option and reduction, PyTorch semantics (zero targets, -inf log-targets,
variance clamp), dtypes, layouts and buffers."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax, softmax

import fastloss as fl
from conftest import check_grad, close, fd_grad, pick, ref_gnll, ref_kl, ref_mse, rng, sizes

N, C = sizes((3, 4), sim=(2, 3))


def _gos(reduction, shape):
    if reduction == "none":
        return pick([None, rng(97).standard_normal(shape)], [rng(97).standard_normal(shape)])
    return pick([None, 0.6], [0.6])


# ----------------------------------------------------------------------------- kl_div
def _kl_case(log_target, dtype=np.float64, seed=0, shape=(N, C)):
    r = rng(seed)
    x = log_softmax(r.standard_normal(shape), axis=-1).astype(dtype)
    t = softmax(r.standard_normal(shape), axis=-1)
    t[0, 1] = 0.0  # a zero target: its term is 0
    if log_target:
        with np.errstate(divide="ignore"):
            t = np.log(t)  # -inf where the target is 0
    return x, t.astype(dtype)


KL_RED = ["batchmean", "mean", "sum", "none"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reduction", KL_RED)
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_values(backend, log_target, reduction, dtype):
    x, t = _kl_case(log_target, dtype)
    got = fl.kl_div(x, t, log_target=log_target, reduction=reduction, backend=backend)
    close(got, ref_kl(x, t, log_target=log_target, reduction=reduction), dtype)
    if reduction == "none":
        assert got.shape == x.shape and got.dtype == dtype
    else:
        assert type(got) is np.dtype(dtype).type


def test_kl_default_is_batchmean(backend):
    x, t = _kl_case(False, shape=(3, 4, 2))
    got = fl.kl_div(x, t, backend=backend)
    close(got, ref_kl(x, t, reduction="sum") / 3)  # / input.shape[0], not / size


@pytest.mark.parametrize("reduction", KL_RED)
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_grad_fd(backend, log_target, reduction):
    x, t = _kl_case(log_target, seed=1)
    for go in _gos(reduction, x.shape):
        loss, g = fl.kl_div(x, t, log_target=log_target, reduction=reduction, return_grad=True, grad_output=go,
                            backend=backend)
        assert g.shape == x.shape and g.dtype == x.dtype and np.all(np.isfinite(g))
        check_grad(lambda xx: fl.kl_div(xx, t, log_target=log_target, reduction=reduction, backend=backend),
                   g, x, grad_output=go)


def test_kl_literal_zero_and_minus_inf(backend):
    inf = np.inf
    x = np.array([[-inf, np.log(0.5), np.log(0.5)], [np.log(0.25), -1.0, np.log(0.75)]])
    t = np.array([[0.0, 0.5, 0.5], [0.25, 0.0, 0.75]])
    loss, g = fl.kl_div(x, t, reduction="none", return_grad=True, grad_output=np.ones_like(x), backend=backend)
    # target 0 -> term 0 (also against input -inf); p == q elsewhere -> 0
    close(loss, np.zeros_like(x), kind="grad", atol=1e-15)
    close(g, -t, kind="grad")
    with np.errstate(divide="ignore"):
        lt = np.log(t)
    loss, g = fl.kl_div(x, lt, log_target=True, reduction="none", return_grad=True, grad_output=np.ones_like(x),
                        backend=backend)
    close(loss, np.zeros_like(x), kind="grad", atol=1e-15)
    close(g, -t, kind="grad")
    assert not np.any(np.isnan(g))
    # a real divergence by hand: KL([.5,.5] || [.25,.75]) = .5 log 2 + .5 log(2/3)
    p = np.array([[0.5, 0.5]])
    q = np.log(np.array([[0.25, 0.75]]))
    close(fl.kl_div(q, p, backend=backend), 0.5 * np.log(2) + 0.5 * np.log(2 / 3))
    close(fl.kl_div(q, np.log(p), log_target=True, backend=backend), 0.5 * np.log(2) + 0.5 * np.log(2 / 3))
    close(fl.kl_div(q, p, reduction="mean", backend=backend), (0.5 * np.log(2) + 0.5 * np.log(2 / 3)) / 2)


def test_kl_nan_propagates(backend):
    x, t = _kl_case(False, seed=2)
    x[1, 1] = np.nan
    loss = fl.kl_div(x, t, reduction="none", backend=backend)
    assert np.isnan(loss[1, 1]) and np.isfinite(np.delete(loss.ravel(), 1 * C + 1)).all()


# ----------------------------------------------------------------------------- mse
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_values(backend, reduction, dtype):
    r = rng(3)
    x = r.standard_normal((N, C)).astype(dtype)
    t = r.standard_normal((N, C)).astype(dtype)
    got = fl.mse_loss(x, t, reduction=reduction, backend=backend)
    close(got, ref_mse(x, t, reduction=reduction), dtype)
    if reduction != "none":
        assert type(got) is np.dtype(dtype).type


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_grad_fd(backend, reduction):
    r = rng(4)
    x = r.standard_normal((N, C))
    t = r.standard_normal((N, C))
    for go in _gos(reduction, x.shape):
        loss, g = fl.mse_loss(x, t, reduction=reduction, return_grad=True, grad_output=go, backend=backend)
        check_grad(lambda xx: fl.mse_loss(xx, t, reduction=reduction, backend=backend), g, x, grad_output=go)


def test_mse_literal_and_extremes(backend):
    x = np.array([1.0, 2.0, 4.0, np.nan])
    t = np.array([0.0, 2.0, 1.0, 0.0])
    loss, g = fl.mse_loss(x[:3], t[:3], return_grad=True, backend=backend)
    close(loss, 10 / 3)
    close(g, [2 / 3, 0.0, 2.0], kind="grad")
    l = fl.mse_loss(x, t, reduction="none", backend=backend)
    assert np.isnan(l[3]) and np.array_equal(l[:3], [1.0, 0.0, 9.0])
    big = np.array([3e38], np.float32)
    assert fl.mse_loss(big, np.zeros(1, np.float32), reduction="none", backend=backend)[0] == np.inf


def test_mse_dtypes_layouts_buffers(backend):
    r = rng(5)
    x = r.standard_normal((6, 5))
    t = r.standard_normal((6, 5))
    want_l, want_g = fl.mse_loss(x, t, return_grad=True, backend="numpy")
    close(want_l, ref_mse(x, t))
    close(want_g, 2 * (x - t) / x.size, kind="grad")
    big = np.zeros((12, 10))
    big[::2, ::2] = x
    for name, v in {"fortran": np.asfortranarray(x), "strided": big[::2, ::2]}.items():
        l, g = fl.mse_loss(v, t, return_grad=True, backend=backend)
        close(l, want_l, err_msg=name)
        close(g, want_g, kind="grad", err_msg=name)
    buf = x.copy()
    l, g = fl.mse_loss(buf, t, return_grad=True, grad_out=buf, backend=backend)
    assert np.shares_memory(g, buf)
    close(buf, want_g, kind="grad")
    h = x.astype(np.float16)
    l, g = fl.mse_loss(h, t.astype(np.float16), return_grad=True, backend=backend)
    assert type(l) is np.float32 and g.dtype == np.float16
    close(l, ref_mse(h, t.astype(np.float16)), np.float32, rtol=1e-5, atol=1e-6)
    e = np.zeros((0, 3))
    l, g = fl.mse_loss(e, e, reduction="sum", return_grad=True, backend=backend)
    assert l == 0 and g.shape == (0, 3)


# ----------------------------------------------------------------------------- gaussian_nll
VAR_SHAPES = ["float", "full", "one_dim_fewer", "col1", "row1", "all1"]


def _gnll_case(var_kind, dtype=np.float64, seed=0, shape=(N, C)):
    r = rng(seed)
    x = r.standard_normal(shape).astype(dtype)
    t = r.standard_normal(shape).astype(dtype)
    vshape = {"float": None, "full": shape, "one_dim_fewer": shape[:-1], "col1": shape[:-1] + (1,),
              "row1": (1,) + shape[1:], "all1": (1,) * len(shape)}[var_kind]
    var = 0.8 if vshape is None else r.uniform(0.3, 2.0, vshape).astype(dtype)
    return x, t, var


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("var_kind", VAR_SHAPES)
def test_gnll_values(backend, var_kind, full, reduction, dtype):
    x, t, var = _gnll_case(var_kind, dtype)
    got = fl.gaussian_nll_loss(x, t, var, full=full, reduction=reduction, backend=backend)
    close(got, ref_gnll(x, t, var, full=full, reduction=reduction), dtype)
    if reduction == "none":
        assert got.shape == x.shape and got.dtype == dtype
    else:
        assert type(got) is np.dtype(dtype).type


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("var_kind", pick(VAR_SHAPES, ["float", "one_dim_fewer", "row1"]))
def test_gnll_grad_fd(backend, var_kind, reduction):
    x, t, var = _gnll_case(var_kind, seed=1)
    for go in _gos(reduction, x.shape):
        loss, (gx, gv) = fl.gaussian_nll_loss(x, t, var, full=True, reduction=reduction, return_grad=True,
                                              grad_output=go, backend=backend)
        assert gx.shape == x.shape and gx.dtype == x.dtype
        check_grad(lambda xx: fl.gaussian_nll_loss(xx, t, var, full=True, reduction=reduction, backend=backend),
                   gx, x, grad_output=go)
        # d/d var, summed back to the shape of var
        assert np.shape(gv) == np.shape(var), f"d_var has shape {np.shape(gv)}, var {np.shape(var)}"
        if var_kind == "float":
            fd = fd_grad(lambda vv: np.sum((1.0 if go is None else go) * np.asarray(
                fl.gaussian_nll_loss(x, t, float(vv), full=True, reduction=reduction, backend=backend))), np.float64(var))
            close(gv, fd, kind="grad", rtol=1e-7, atol=1e-8)
        else:
            check_grad(lambda vv: fl.gaussian_nll_loss(x, t, vv, full=True, reduction=reduction, backend=backend),
                       gv, var, grad_output=go)


def test_gnll_3d_one_dim_fewer(backend):
    shape = sizes((2, 3, 2))
    x, t, _ = _gnll_case("full", seed=2, shape=shape)
    var = rng(3).uniform(0.5, 1.5, shape[:-1])
    loss, (gx, gv) = fl.gaussian_nll_loss(x, t, var, return_grad=True, backend=backend)
    close(loss, ref_gnll(x, t, var))
    assert gv.shape == var.shape
    check_grad(lambda vv: fl.gaussian_nll_loss(x, t, vv, backend=backend), gv, var)


def test_gnll_clamp_literal(backend):
    """var below eps is clamped; the var-gradient is evaluated at the clamped value."""
    eps = 1e-6
    x = np.array([1.0, 0.5, 0.0, 2.0])
    t = np.array([0.0, 0.0, 0.0, 0.0])
    var = np.array([0.0, 1e-9, 1.0, 4.0])
    v = np.array([eps, eps, 1.0, 4.0])
    d = x - t
    loss, (gx, gv) = fl.gaussian_nll_loss(x, t, var, reduction="none", return_grad=True, grad_output=np.ones(4),
                                          backend=backend)
    close(loss, 0.5 * (np.log(v) + d * d / v))
    close(gx, d / v, kind="grad", rtol=1e-12, atol=1e-12)
    close(gv, 0.5 * (1 / v - d * d / (v * v)), kind="grad", rtol=1e-12, atol=1e-12)
    # a different eps
    loss = fl.gaussian_nll_loss(x, t, var, eps=0.5, reduction="sum", backend=backend)
    v2 = np.maximum(var, 0.5)
    close(loss, np.sum(0.5 * (np.log(v2) + d * d / v2)))
    # full adds 0.5 log(2 pi) per element
    close(fl.gaussian_nll_loss(x, t, var, full=True, backend=backend) - fl.gaussian_nll_loss(x, t, var, backend=backend),
          0.5 * np.log(2 * np.pi), rtol=1e-10)


def test_gnll_dtypes(backend):
    x, t, var = _gnll_case("col1", np.float16, seed=4)
    loss, (gx, gv) = fl.gaussian_nll_loss(x, t, var, return_grad=True, backend=backend)
    assert type(loss) is np.float32 and gx.dtype == np.float16 and gv.dtype == np.float16
    close(loss, ref_gnll(x, t, var), np.float32, rtol=1e-5, atol=1e-6)
    x, t, var = _gnll_case("full", np.float32, seed=5)
    loss, (gx, gv) = fl.gaussian_nll_loss(x, t, var, return_grad=True, backend=backend)
    assert type(loss) is np.float32 and gx.dtype == np.float32 and gv.dtype == np.float32
    x64 = [a.astype(np.float64) for a in (x, t, var)]
    l64, (gx64, gv64) = fl.gaussian_nll_loss(*x64, return_grad=True, backend="numpy")
    close(loss, l64, np.float32)
    close(gx * x.size, gx64 * x.size, np.float32, kind="grad")
    close(gv * x.size, gv64 * x.size, np.float32, kind="grad")


def test_gnll_layouts(backend):
    x, t, var = _gnll_case("full", seed=6, shape=(6, 5))
    want = fl.gaussian_nll_loss(x, t, var, return_grad=True, backend="numpy")
    big = np.zeros((12, 10))
    big[::2, ::2] = x
    for name, v in {"fortran": np.asfortranarray(x), "strided": big[::2, ::2]}.items():
        l, (gx, gv) = fl.gaussian_nll_loss(v, t, np.asfortranarray(var), return_grad=True, backend=backend)
        close(l, want[0], err_msg=name)
        close(gx, want[1][0], kind="grad", err_msg=name)
        close(gv, want[1][1], kind="grad", err_msg=name)


def test_gnll_nan_propagates(backend):
    x, t, var = _gnll_case("full", seed=7)
    x[0, 0] = np.nan
    l = fl.gaussian_nll_loss(x, t, var, reduction="none", backend=backend)
    assert np.isnan(l[0, 0]) and np.isfinite(l.ravel()[1:]).all()


@pytest.mark.parametrize("return_grad", [False, True])
@pytest.mark.parametrize("C", [2, 40], ids=["column-blocks", "rows"])
def test_float32_weighted_cross_entropy_mean_near_flt_max(backend, C, return_grad):
    """A row loss of 1.13e38 times a class weight of 3 passes FLT_MAX (3.40282e38) in float32;
    the weighted mean divides by the summed weight 3 and is 1.13e38. Found by Hypothesis
    (tests/test_torch_diff.py): the Cython few-class kernel multiplied in float32 and gave inf."""
    big = np.float32(1.1342746e38)
    x = np.zeros((1, C), np.float32)
    x[0, 1] = big
    w = np.full(C, 3.0, np.float32)
    r = fl.cross_entropy(x, np.array([0]), weight=w, return_grad=return_grad, backend=backend)
    loss = r[0] if return_grad else r
    assert type(loss) is np.float32
    close(loss, np.float64(big), np.float32)  # lse = x[1] exactly (exp(-1.1e38) = 0), minus x[0] = 0
    if return_grad:  # (softmax - onehot) * 3 / 3
        want = np.zeros((1, C))
        want[0, 0], want[0, 1] = -1.0, 1.0
        close(r[1], want, np.float32, kind="grad")


# ----------------------------------------------------------------------------- float64 totals
M32 = 3e38  # near the float32 maximum (3.4e38)


def _huge(fn):
    """float32 losses whose every term fits float32 but whose sum does not; the mean fits."""
    f = np.float32
    if fn == "binary_cross_entropy_with_logits":  # softplus: |z| per term
        return fl.binary_cross_entropy_with_logits, (f([M32, -M32, 0, 0]), f([0, 1, 0, 1])), {}, M32 / 2
    if fn == "binary_cross_entropy":  # the -100 clamp times a weight of 3e36
        return fl.binary_cross_entropy, (f([0, 1, 0.5, 0.5]), f([1, 0, 0.5, 0.5])), {"weight": f([3e36] * 4)}, (
            (2 * 100 + 2 * np.log(2)) * 3e36 / 4)
    if fn == "kl_div":  # t (log t - x) with x = -3e38
        return fl.kl_div, (f([[-M32, -M32, 0, 0]]), f([[1, 1, 0, 0]])), {"reduction": "mean"}, M32 / 2
    if fn == "mse_loss":
        return fl.mse_loss, (f([1.5e19, -1.5e19, 0, 0]), f([0, 0, 0, 0])), {}, 2 * np.float64(1.5e19) ** 2 / 4
    d = np.float64(np.float32(1.8e19))  # (log 1 + d^2) / 2 = 1.62e38 per term, three of them
    return fl.gaussian_nll_loss, (f([1.8e19, -1.8e19, 1.8e19, 0]), f([0, 0, 0, 0]), f([1, 1, 1, 1])), {}, (
        3 * d * d / 2 / 4)


@pytest.mark.parametrize("fn", ["binary_cross_entropy_with_logits", "binary_cross_entropy", "kl_div", "mse_loss",
                                "gaussian_nll_loss"])
@pytest.mark.parametrize("return_grad", [False, True])
def test_float32_mean_of_huge_terms_is_finite(backend, fn, return_grad):
    """SPEC: reduced losses are accumulated in float64.  Fast kernels sum blocks of float32
    terms in float32 lanes; a block whose lanes overflow must be summed again in float64, so a
    mean (and a sum below the float64 range) of terms near FLT_MAX is exact, not inf."""
    f, args, kw, want = _huge(fn)
    r = f(*args, **kw, return_grad=return_grad, backend=backend)
    loss = r[0] if return_grad else r
    assert type(loss) is np.float32
    close(loss, want, np.float32)
