"""bfloat16 (``ml_dtypes.bfloat16``) input to every public function, on every backend.

The SPEC: float16 and bfloat16 are computed in float32 and returned in the input dtype;
scalar results are ``np.float32``. For each public function this module checks

* types: array results (softmax, log-sum-exp arrays, unreduced losses, gradients,
  ``out``/``grad_out``) are bfloat16 arrays; scalar results are exactly ``np.float32``;
* values, against float64 NumPy/SciPy formulas (here, or the reference helpers of
  ``conftest``; never fastloss itself) evaluated on the bfloat16 inputs upcast to float64:
  scalars within float32 accuracy (``rtol=1e-5``), bfloat16 arrays within one bfloat16
  rounding of the output (``rtol=2**-8``, plus an ``atol`` for the float32 error of O(10)
  intermediates);
* that no input changes, bit for bit, unless it is passed as ``out``/``grad_out``;
* extremes: ``+-inf`` and logits of 1e30 or the bfloat16 maximum (bfloat16 has float32's
  exponent range) give exactly the float64 result rounded to bfloat16, and no NaN; a mean
  of huge losses that fits float32 although their float32 sum would not stays finite (the
  SPEC's float64 accumulation);
* ``grad_out`` (a bfloat16 buffer, or the first argument in place) receives, bit for bit,
  the gradient the same call returns without it (that one being checked against the
  references above);
* mixed dtypes, which the host path allows: the compute dtype is that of the first
  (differentiated) argument, the other operands are cast to it, so a float32 target with
  bfloat16 logits is used at full float32 precision and results are bfloat16 -- and
  float32 logits with a bfloat16 target give float32 results;
* ``grad_out``/``out`` of another dtype than the input's is a ``ValueError`` naming the
  argument, and nothing is written.

Shapes go through :func:`conftest.sizes` and parameter lists through :func:`conftest.pick`,
so the ``cuda`` backend (host offload under the CUDA simulator) stays fast.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import scipy.special as sp

import fastloss as fl
from conftest import (
    close, pick, ref_bce, ref_bce_with_logits, ref_ce, ref_ce_soft, ref_gnll, ref_kl, ref_mse, rng, sizes,
)

BF16 = np.dtype(ml_dtypes.bfloat16)

F32_RTOL, F32_ATOL = 1e-5, 1e-6  # a scalar (or float32 array) computed in float32
BF16_RTOL, BF16_ATOL = 2.0**-8, 1e-5  # one bfloat16 rounding of a float32 result

N, C = sizes((4, 5))
REDUCTIONS = ["mean", "sum", "none"]
BIG = float(np.float64(1e30).astype(BF16))  # 1e30 rounded to bfloat16: finite, float32's range
BMAX = float(ml_dtypes.finfo(BF16).max)  # ~3.39e38
INF = np.inf


# ----------------------------------------------------------------------------- helpers
def bf16(a):
    """``a`` rounded to bfloat16."""
    return np.asarray(a, dtype=np.float64).astype(BF16)


def f64(a):
    return np.asarray(a).astype(np.float64)


def call(fname, *args, **kwargs):
    """``fl.<fname>(*args, **kwargs)``, asserting that no array argument changed (bit for bit)
    except the one passed as ``out``/``grad_out``."""
    written = {id(kwargs.get("out")), id(kwargs.get("grad_out"))}
    arrays = [a for a in (*args, *kwargs.values()) if isinstance(a, np.ndarray) and id(a) not in written]
    before = [(a, a.tobytes()) for a in arrays]
    res = getattr(fl, fname)(*args, **kwargs)
    for a, b in before:
        assert a.tobytes() == b, f"{fname} modified an input array (dtype {a.dtype}, shape {a.shape})"
    return res


def check_scalar(v, want, what="loss"):
    assert type(v) is np.float32, f"{what}: a scalar of bfloat16 input should be np.float32, got {type(v).__name__}"
    close(v, want, rtol=F32_RTOL, atol=F32_ATOL, err_msg=what)


def check_array(a, want, dtype=BF16, what="result"):
    assert isinstance(a, np.ndarray), f"{what}: expected an ndarray, got {type(a).__name__}"
    assert a.dtype == dtype, f"{what}: expected dtype {np.dtype(dtype)}, got {a.dtype}"
    assert a.shape == np.shape(want), f"{what}: expected shape {np.shape(want)}, got {a.shape}"
    rtol, atol = (BF16_RTOL, BF16_ATOL) if np.dtype(dtype) == BF16 else (F32_RTOL, F32_ATOL)
    close(f64(a), want, rtol=rtol, atol=atol, err_msg=what)


def check_loss(loss, want, reduction, dtype=BF16):
    if reduction == "none":
        check_array(loss, want, dtype, "unreduced loss")
    else:
        check_scalar(loss, want)


def check_exact(a, want, what):
    """``a`` is bfloat16 and equals the float64 ``want`` rounded to bfloat16, infinities
    included; no NaN."""
    found = getattr(a, "dtype", type(a))
    assert isinstance(a, np.ndarray) and a.dtype == BF16, f"{what}: expected a bfloat16 array, found {found}"
    got = f64(a)
    assert not np.isnan(got).any(), f"{what}: NaN in {got}"
    np.testing.assert_array_equal(got, f64(bf16(want)), err_msg=what)


def grad_output(reduction, shape, seed=97):
    """A non-trivial upstream gradient: a bfloat16 array for ``"none"``, else a bfloat16 scalar."""
    if reduction == "none":
        return bf16(rng(seed).uniform(-2, 2, shape))
    return BF16.type(-1.5)


def go_scale(go, reduction, denom):
    """The float64 factor of the per-element gradient: ``go / denom`` for ``"mean"``."""
    if reduction == "none":
        return f64(go)
    g = float(go)
    return g / denom if reduction == "mean" else g


def _x(shape, seed, scale=3.0):
    return bf16(rng(seed).standard_normal(shape) * scale)


# ----------------------------------------------------------------------------- normalizers
@pytest.mark.parametrize("axis,keepdims", pick(
    [(-1, False), (-1, True), (0, False), (1, True), ((0, 2), False), (None, False), (None, True)],
    [(1, True), ((0, 2), False), (None, False)]))
def test_logsumexp(backend, axis, keepdims):
    x = _x(sizes((3, 4, 5)), seed=1)
    got = call("logsumexp", x, axis=axis, keepdims=keepdims, backend=backend)
    want = sp.logsumexp(f64(x), axis=axis, keepdims=keepdims)
    if np.ndim(want) == 0:
        check_scalar(got, want, "logsumexp over all axes")
    else:
        check_array(got, want, what=f"logsumexp axis={axis} keepdims={keepdims}")


def test_logsumexp_1d_is_float32_scalar(backend):
    x = _x(sizes((7,)), seed=2)
    check_scalar(call("logsumexp", x, backend=backend), sp.logsumexp(f64(x)), "logsumexp of a 1-D array")


@pytest.mark.parametrize("fname,ref", [("softmax", sp.softmax), ("log_softmax", sp.log_softmax)])
@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("out", pick(["new", "out", "in place"], ["out", "in place"]))
def test_softmax_log_softmax(backend, fname, ref, axis, out):
    x = _x(sizes((3, 4, 5)), seed=3)
    want = ref(f64(x), axis=axis)
    if out == "new":
        got = call(fname, x, axis=axis, backend=backend)
    else:
        buf = np.full(x.shape, np.nan, BF16) if out == "out" else x.copy()
        got = call(fname, buf if out == "in place" else x, axis=axis, out=buf, backend=backend)
        assert got is buf, f"{fname}(out=...) should return out itself"
    check_array(got, want, what=f"{fname} axis={axis} ({out})")


@pytest.mark.parametrize("fname", ["softmax_backward", "log_softmax_backward"])
def test_backward(backend, fname):
    x = _x((N, C), seed=4)
    g = _x((N, C), seed=5, scale=1.0)
    if fname == "softmax_backward":
        y = bf16(sp.softmax(f64(x), axis=0))
        want = f64(y) * (f64(g) - np.sum(f64(g) * f64(y), axis=0, keepdims=True))
    else:
        y = bf16(sp.log_softmax(f64(x), axis=0))
        want = f64(g) - np.exp(f64(y)) * np.sum(f64(g), axis=0, keepdims=True)
    check_array(call(fname, g, y, axis=0, backend=backend), want, what=fname)


def test_normalizers_extremes(backend):
    """+-inf and huge logits: the float64 result rounded to bfloat16, exactly, no NaN."""
    finite_max = bf16([
        [BIG, 0.0, -INF, 1.0],  # one huge logit takes everything
        [-BIG, -BIG, -INF, -INF],  # shift-invariance far from 0: softmax 1/2, log_softmax -log 2
        [BIG, BIG, 0.0, -BIG],
        [BMAX, BMAX, 0.0, 0.0],  # the largest bfloat16
        [0.0, 0.0, -INF, -INF],
    ])
    x = np.concatenate([finite_max, bf16([[INF, 0.0, -INF, 1.0], [-INF] * 4])])  # lse: +inf, -inf
    check_exact(call("logsumexp", x, backend=backend), sp.logsumexp(f64(x), axis=-1), "logsumexp")
    for fname, ref in [("softmax", sp.softmax), ("log_softmax", sp.log_softmax)]:
        check_exact(call(fname, finite_max, backend=backend), ref(f64(finite_max), axis=-1), fname)
    assert call("logsumexp", bf16([BIG, BIG]), backend=backend) == np.float32(BIG)


# ----------------------------------------------------------------------------- cross-entropy
def _ce_grad(x, q, axis, scale):
    """float64 d/dx of ``scale * sum_c q_c (lse - x_c)`` per row: ``(softmax(x) sum(q) - q) * scale``,
    with ``q`` (and a per-row ``scale``) given class-last."""
    xm = np.moveaxis(f64(x), axis, -1)
    g = (sp.softmax(xm, axis=-1) * q.sum(-1, keepdims=True) - q) * np.asarray(scale)[..., None]
    return np.moveaxis(g, -1, axis)


CE_OPTS = {
    "plain": dict(),
    "weight+ignore": dict(weight=True, ignore=True),
    "smoothing": dict(label_smoothing=0.2),
    "all": dict(weight=True, ignore=True, label_smoothing=0.1),
    "axis0": dict(axis=0, weight=True),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opt", pick(list(CE_OPTS), ["all", "axis0"]))
def test_cross_entropy_hard(backend, opt, reduction):
    o = CE_OPTS[opt]
    axis = o.get("axis", -1)
    r = rng(6)
    x = _x(sizes((3, 4, 5)), seed=7)
    ax = axis % x.ndim
    row_shape = tuple(s for i, s in enumerate(x.shape) if i != ax)
    c = x.shape[ax]
    t = r.integers(0, c, row_shape)
    kw = dict(axis=axis, label_smoothing=o.get("label_smoothing", 0.0))
    if o.get("ignore"):
        t.flat[0] = -100
    if o.get("weight"):
        kw["weight"] = bf16(r.uniform(0.2, 2.0, c))
    want = ref_ce(x, t, reduction=reduction, **kw)
    check_loss(call("cross_entropy", x, t, reduction=reduction, backend=backend, **kw), want, reduction)

    go = grad_output(reduction, row_shape)
    loss, g = call("cross_entropy", x, t, reduction=reduction, return_grad=True, grad_output=go, backend=backend, **kw)
    check_loss(loss, want, reduction)
    # target distribution q (class-last): (1-eps) w_t onehot(t) + eps/C w, zero on ignored rows
    w = np.ones(c) if "weight" not in kw else f64(kw["weight"])
    eps = kw["label_smoothing"]
    keep = t != -100
    tt = np.where(keep, t, 0)
    q = (1 - eps) * w[tt][..., None] * (np.arange(c) == tt[..., None]) + eps / c * w
    q = q * keep[..., None]
    denom = w[tt][keep].sum()
    check_array(g, _ce_grad(x, q, axis, go_scale(go, reduction, denom)), what="cross_entropy grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target_dtype", [BF16, np.dtype(np.float32)], ids=["bf16-target", "f32-target"])
def test_cross_entropy_soft(backend, target_dtype, reduction):
    """Probability targets; a float32 target (mixed) is used at float32 precision."""
    r = rng(8)
    x = _x((N, C), seed=9)
    y = sp.softmax(r.standard_normal((N, C)) * 2, axis=-1).astype(target_dtype)
    kw = dict(weight=bf16(r.uniform(0.2, 2.0, C)), label_smoothing=0.1)
    want = ref_ce_soft(x, y, reduction=reduction, **kw)
    check_loss(call("cross_entropy", x, y, reduction=reduction, backend=backend, **kw), want, reduction)
    go = grad_output(reduction, (N,))
    loss, g = call("cross_entropy", x, y, reduction=reduction, return_grad=True, grad_output=go, backend=backend, **kw)
    check_loss(loss, want, reduction)
    q = f64(kw["weight"]) * (0.9 * f64(y) + 0.1 / C)
    check_array(g, _ce_grad(x, q, -1, go_scale(go, reduction, N)), what="soft cross_entropy grad")


def test_cross_entropy_extremes(backend):
    """Huge and -inf logits: exact losses (0, 1e30, +inf) and gradients, no NaN."""
    x = bf16([[BIG, 0.0, -INF], [BIG, 0.0, -INF], [0.0, 0.0, -INF]])
    t = np.array([0, 1, 2])  # certain; off by 1e30; a masked target class
    check_exact(call("cross_entropy", x, t, reduction="none", backend=backend), [0.0, BIG, INF], "loss")
    loss, g = call("cross_entropy", x, t, reduction="sum", return_grad=True, backend=backend)
    assert type(loss) is np.float32 and loss == np.inf
    check_exact(g, [[0.0, 0.0, 0.0], [1.0, -1.0, 0.0], [0.5, 0.5, -1.0]], "grad")


# ----------------------------------------------------------------------------- binary
BCE_OPTS = pick(["plain", "weight", "pos_weight", "weight+pos_weight"], ["weight+pos_weight"])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opt", BCE_OPTS)
@pytest.mark.parametrize("target_dtype", [BF16, np.dtype(np.float32)], ids=["bf16-target", "f32-target"])
def test_bce_with_logits(backend, target_dtype, opt, reduction):
    r = rng(10)
    z = _x((N, C), seed=11, scale=2.0)
    y = r.uniform(0, 1, (N, C)).astype(target_dtype)
    y.flat[0], y.flat[1] = 0.0, 1.0
    kw = {}
    if "weight" in opt.split("+"):
        kw["weight"] = bf16(r.uniform(0.2, 2.0, (N, 1)))  # broadcast along the last axis
    if "pos_weight" in opt:
        kw["pos_weight"] = bf16(r.uniform(0.5, 3.0, C))
    want = ref_bce_with_logits(z, y, reduction=reduction, **kw)
    fname = "binary_cross_entropy_with_logits"
    check_loss(call(fname, z, y, reduction=reduction, backend=backend, **kw), want, reduction)
    go = grad_output(reduction, z.shape)
    loss, g = call(fname, z, y, reduction=reduction, return_grad=True, grad_output=go, backend=backend, **kw)
    check_loss(loss, want, reduction)
    zz, yy = f64(z), f64(y)
    w = f64(kw.get("weight", 1.0))
    pw = f64(kw.get("pos_weight", 1.0))
    want_g = w * ((1 - yy) - (1 + (pw - 1) * yy) * sp.expit(-zz)) * go_scale(go, reduction, z.size)
    check_array(g, want_g, what="bce_with_logits grad")


@pytest.mark.filterwarnings("error:overflow encountered in cast:RuntimeWarning")  # an inf loss is no fault
def test_bce_with_logits_extremes(backend):
    """|logits| up to the bfloat16 maximum: exact losses and gradients, no overflow."""
    z = bf16([BIG, -BIG, BMAX, -BMAX])
    y = bf16([1.0, 0.0, 0.0, 1.0])
    fname = "binary_cross_entropy_with_logits"
    check_exact(call(fname, z, y, reduction="none", backend=backend), [0.0, 0.0, BMAX, BMAX], "loss")
    loss, g = call(fname, z, y, reduction="sum", return_grad=True, backend=backend)
    assert type(loss) is np.float32 and loss == np.inf  # 2 BMAX: beyond float32's range
    check_exact(g, [0.0, 0.0, 1.0, -1.0], "grad")


@pytest.mark.parametrize("fname", ["binary_cross_entropy_with_logits", "mse_loss"])
def test_mean_of_huge_losses_fits(backend, fname):
    """A mean that fits float32 although the sum does not (bfloat16 reaches float32's range):
    the float64 accumulation of the SPEC gives it, finite."""
    x = bf16([BMAX, -BMAX, 0.0, 0.0] if fname != "mse_loss" else [1.5e19, -1.5e19, 0.0, 0.0])
    y = bf16([0.0, 1.0, 0.0, 0.0])
    want = (ref_bce_with_logits if fname != "mse_loss" else ref_mse)(x, y)  # BMAX / 2, resp. ~1.1e38
    check_scalar(call(fname, x, y, backend=backend), want)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weight"])
def test_bce(backend, weighted, reduction):
    r = rng(12)
    p = bf16(r.uniform(0.02, 0.98, (N, C)))
    y = bf16(r.uniform(0, 1, (N, C)))
    p.flat[0], p.flat[1] = 0.0, 1.0  # the log clamp at -100 and PyTorch's 1e-12 gradient guard
    y.flat[0], y.flat[1] = 0.75, 0.25
    kw = {"weight": bf16(r.uniform(0.2, 2.0, C))} if weighted else {}
    want = ref_bce(p, y, reduction=reduction, **kw)
    check_loss(call("binary_cross_entropy", p, y, reduction=reduction, backend=backend, **kw), want, reduction)
    go = grad_output(reduction, p.shape)
    loss, g = call("binary_cross_entropy", p, y, reduction=reduction, return_grad=True, grad_output=go,
                   backend=backend, **kw)
    check_loss(loss, want, reduction)
    pp, yy = f64(p), f64(y)
    want_g = f64(kw.get("weight", 1.0)) * (pp - yy) / np.maximum(pp * (1 - pp), 1e-12) * go_scale(go, reduction, p.size)
    check_array(g, want_g, what="bce grad")


# ----------------------------------------------------------------------------- KL, regression
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div(backend, log_target, reduction):
    r = rng(13)
    x = bf16(sp.log_softmax(r.standard_normal((N, C)), axis=-1))
    p = sp.softmax(r.standard_normal((N, C)) * 2, axis=-1)
    p[0, 0] = 0.0  # a zero term: 0 (and -inf with log_target)
    with np.errstate(divide="ignore"):
        t = bf16(np.log(p) if log_target else p)
    want = ref_kl(x, t, log_target=log_target, reduction=reduction)
    check_loss(call("kl_div", x, t, log_target=log_target, reduction=reduction, backend=backend), want, reduction)
    go = grad_output(reduction, x.shape)
    loss, g = call("kl_div", x, t, log_target=log_target, reduction=reduction, return_grad=True, grad_output=go,
                   backend=backend)
    check_loss(loss, want, reduction)
    prob = np.exp(f64(t)) if log_target else f64(t)
    denom = x.shape[0] if reduction == "batchmean" else x.size
    check_array(g, -prob * go_scale(go, "mean" if reduction == "batchmean" else reduction, denom), what="kl grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target_shape", ["full", "broadcast"])
def test_mse_loss(backend, target_shape, reduction):
    x = _x((N, C), seed=14, scale=1.0)
    t = _x((N, C) if target_shape == "full" else (C,), seed=15, scale=1.0)
    want = ref_mse(x, t, reduction=reduction)
    check_loss(call("mse_loss", x, t, reduction=reduction, backend=backend), want, reduction)
    go = grad_output(reduction, x.shape)
    loss, g = call("mse_loss", x, t, reduction=reduction, return_grad=True, grad_output=go, backend=backend)
    check_loss(loss, want, reduction)
    check_array(g, 2 * (f64(x) - f64(t)) * go_scale(go, reduction, x.size), what="mse grad")


GNLL_VARS = {  # name: (var shape or None for a Python float, axes d_var sums over)
    "full": ((N, C), ()),
    "row": ((N,), (1,)),  # one dimension fewer: one variance per row
    "col1": ((1, C), (0,)),  # same rank, size-1 dimension
    "float": (None, (0, 1)),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("var_kind", pick(list(GNLL_VARS), ["full", "row", "float"]))
def test_gaussian_nll_loss(backend, var_kind, reduction):
    r = rng(16)
    x = _x((N, C), seed=17, scale=1.0)
    t = _x((N, C), seed=18, scale=1.0)
    shape, red = GNLL_VARS[var_kind]
    eps = 0.05
    if shape is None:
        var = 0.7
    else:
        var = bf16(r.uniform(0.2, 2.0, shape))
        var.flat[0] = 0.01  # below eps: clamped
    kw = dict(eps=eps, full=var_kind == "row")
    want = ref_gnll(x, t, var, reduction=reduction, **kw)
    check_loss(call("gaussian_nll_loss", x, t, var, reduction=reduction, backend=backend, **kw), want, reduction)
    go = grad_output(reduction, x.shape)
    loss, (gx, gv) = call("gaussian_nll_loss", x, t, var, reduction=reduction, return_grad=True, grad_output=go,
                          backend=backend, **kw)
    check_loss(loss, want, reduction)
    v = np.maximum(f64(var), eps)
    if var_kind == "row":
        v = v[:, None]
    d = f64(x) - f64(t)
    s = go_scale(go, reduction, x.size)
    check_array(gx, d / v * s, what="d_input")
    gv_want = np.sum(0.5 * (1 / v - d**2 / v**2) * s, axis=red)
    if shape is None:
        check_scalar(gv, gv_want, "d_var of a float var")
    else:
        check_array(gv, gv_want.reshape(shape), what="d_var")


# ----------------------------------------------------------------------------- mixed dtypes, layouts
def test_float32_logits_bfloat16_target(backend):
    """The compute dtype follows the first argument: float32 logits with bfloat16 targets
    give float32 results."""
    r = rng(19)
    z = r.standard_normal((N, C)).astype(np.float32)
    y = bf16(r.uniform(0, 1, (N, C)))
    l = call("binary_cross_entropy_with_logits", z, y, reduction="none", backend=backend)
    check_array(l, ref_bce_with_logits(z, y, reduction="none"), np.float32, "bce_with_logits loss")
    ys = bf16(sp.softmax(r.standard_normal((N, C)), axis=-1))
    loss, g = call("cross_entropy", z, ys, return_grad=True, backend=backend)
    check_scalar(loss, ref_ce_soft(z, ys))
    check_array(g, _ce_grad(z, f64(ys), -1, 1.0 / N), np.float32, "soft cross_entropy grad")


@pytest.mark.parametrize("layout", pick(["fortran", "strided", "transposed"], ["strided"]))
def test_layouts(backend, layout):
    x = _x((N, C), seed=20)
    big = np.zeros((2 * N, 3 * C), BF16)
    big[::2, ::3] = x
    v = {"fortran": np.asfortranarray(x), "strided": big[::2, ::3], "transposed": np.ascontiguousarray(x.T).T}[layout]
    check_array(call("softmax", v, backend=backend), sp.softmax(f64(x), axis=-1), what="softmax")
    t = rng(21).integers(0, C, N)
    loss, g = call("cross_entropy", v, t, return_grad=True, backend=backend)
    check_scalar(loss, ref_ce(x, t))
    check_array(g, _ce_grad(x, np.eye(C)[t], -1, 1.0 / N), what="cross_entropy grad")


# ----------------------------------------------------------------------------- grad_out
def _args(fname, seed=22):
    """Small bfloat16 arguments for each function that takes ``grad_out``."""
    r = rng(seed)
    x = bf16(r.standard_normal((N, C)))
    if fname == "cross_entropy":
        return x, r.integers(0, C, N)
    if fname == "binary_cross_entropy_with_logits":
        return x, bf16(r.uniform(0, 1, (N, C)))
    if fname == "binary_cross_entropy":
        return bf16(r.uniform(0.05, 0.95, (N, C))), bf16(r.uniform(0, 1, (N, C)))
    if fname == "kl_div":
        return bf16(sp.log_softmax(f64(x), axis=-1)), bf16(sp.softmax(r.standard_normal((N, C)), axis=-1))
    return x, bf16(r.standard_normal((N, C)))  # mse_loss


GRAD_OUT_FNS = ["cross_entropy", "binary_cross_entropy_with_logits", "binary_cross_entropy", "kl_div", "mse_loss"]


@pytest.mark.parametrize("mode", ["buffer", "in place"])
@pytest.mark.parametrize("fname", pick(GRAD_OUT_FNS, ["cross_entropy", "mse_loss"]))
def test_grad_out(backend, fname, mode):
    """A bfloat16 ``grad_out`` (or the first argument itself) receives, bit for bit, the
    gradient that is otherwise returned (checked against references above) and is returned."""
    a, b = _args(fname)
    want_loss, want_g = call(fname, a, b, return_grad=True, backend=backend)
    buf = np.full(a.shape, np.nan, BF16) if mode == "buffer" else a.copy()
    first = buf if mode == "in place" else a
    loss, g = call(fname, first, b, return_grad=True, grad_out=buf, backend=backend)
    assert g is buf, f"{fname}: grad_out should be returned as the gradient"
    assert type(loss) is np.float32 and loss == want_loss
    assert g.dtype == BF16 and g.tobytes() == want_g.tobytes()


@pytest.mark.parametrize("wrong", [np.float32, np.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("fname", GRAD_OUT_FNS)
def test_grad_out_wrong_dtype(backend, fname, wrong):
    a, b = _args(fname)
    buf = np.full(a.shape, 7.0, wrong)
    with pytest.raises(ValueError, match="grad_out") as ei:
        call(fname, a, b, return_grad=True, grad_out=buf, backend=backend)
    assert "bfloat16" in str(ei.value), f"the message should name the expected dtype: {ei.value}"
    assert (buf == 7.0).all(), "grad_out was written although the call raised"


@pytest.mark.parametrize("fname", ["softmax", "log_softmax"])
def test_out_wrong_dtype(backend, fname):
    x = _x((N, C), seed=23)
    buf = np.full(x.shape, 7.0, np.float32)
    with pytest.raises(ValueError, match="out"):
        call(fname, x, out=buf, backend=backend)
    assert (buf == 7.0).all(), "out was written although the call raised"
