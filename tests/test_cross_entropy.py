"""cross_entropy: values vs a SciPy/closed-form PyTorch reference, gradients vs finite
differences, PyTorch-semantics literals, extremes, layouts, dtypes, in-place and grad_out."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.special as sp

import fastloss as fl
from conftest import check_grad, close, pick, ref_ce, ref_ce_soft, rng, sizes

W5 = np.array([0.5, 2.0, 1.0, 0.25, 1.5])
N, C = sizes((4, 5), sim=(2, 3))

# hard-target option sets; the target of each case is chosen so that it exercises the option
HARD = {
    "plain": {},
    "weight": {"weight": W5},
    "ignore_default": {"_ignore": -100},
    "ignore_index": {"ignore_index": 2, "_ignore": 2},
    "smoothing": {"label_smoothing": 0.3},
    "z_loss": {"z_loss": 0.05},
    "weight_smoothing": {"weight": W5, "label_smoothing": 0.2},
    "all": {"weight": W5, "ignore_index": 2, "_ignore": 2, "label_smoothing": 0.3, "z_loss": 0.05},
}
SOFT = {
    "plain": {},
    "weight": {"weight": W5},
    "smoothing": {"label_smoothing": 0.3},
    "z_loss": {"z_loss": 0.05},
    "all": {"weight": W5, "label_smoothing": 0.2, "z_loss": 0.05},
}


def _case(name, dtype=np.float64, seed=0, n=N, c=C):
    opts = dict(HARD[name])
    ign = opts.pop("_ignore", None)
    r = rng(seed)
    x = r.standard_normal((n, c)).astype(dtype)
    t = r.integers(0, c, n)
    if ign is not None:
        t[0] = ign
        if ign >= 0:
            t[1] = (ign + 1) % c  # not everything ignored
    if "weight" in opts:
        opts["weight"] = opts["weight"][:c].astype(dtype)
    return x, t, opts


def _soft(name, dtype=np.float64, seed=0, n=N, c=C, rowsum=1.0):
    opts = dict(SOFT[name])
    r = rng(seed)
    x = r.standard_normal((n, c)).astype(dtype)
    y = (r.dirichlet(np.ones(c), n) * rowsum).astype(dtype)
    if "weight" in opts:
        opts["weight"] = opts["weight"][:c].astype(dtype)
    return x, y, opts


def _gos(reduction, n):
    if reduction == "none":
        return pick([None, rng(99).standard_normal(n)], [rng(99).standard_normal(n)])
    return pick([None, 0.7], [0.7])


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(HARD))
def test_hard_values(backend, case, reduction, dtype):
    x, t, opts = _case(case, dtype)
    got = fl.cross_entropy(x, t, reduction=reduction, backend=backend, **opts)
    want = ref_ce(x, t, reduction=reduction, **{k: (np.asarray(v, np.float64) if k == "weight" else v) for k, v in opts.items()})
    close(got, want, dtype)
    if reduction == "none":
        assert isinstance(got, np.ndarray) and got.dtype == dtype and got.shape == (N,)
    else:
        assert type(got) is np.dtype(dtype).type


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(SOFT))
def test_soft_values(backend, case, reduction, dtype):
    x, y, opts = _soft(case, dtype)
    got = fl.cross_entropy(x, y, reduction=reduction, backend=backend, **opts)
    close(got, ref_ce_soft(x, y, reduction=reduction, **opts), dtype)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("reduction", pick(["mean", "sum", "none"], ["mean", "none"]))
@pytest.mark.parametrize("case", pick(HARD, ["plain", "all"]))
def test_hard_grad_fd(backend, case, reduction):
    x, t, opts = _case(case, seed=1)
    for go in _gos(reduction, N):
        loss, g = fl.cross_entropy(x, t, reduction=reduction, return_grad=True, grad_output=go, backend=backend, **opts)
        assert g.shape == x.shape and g.dtype == x.dtype
        close(loss, fl.cross_entropy(x, t, reduction=reduction, backend="numpy", **opts))
        check_grad(lambda xx: fl.cross_entropy(xx, t, reduction=reduction, backend=backend, **opts), g, x, grad_output=go)
        if "_ignore" in HARD[case] or "ignore_index" in opts:
            assert np.all(g[0] == 0), "an ignored row has a zero gradient"


@pytest.mark.parametrize("rowsum", pick([1.0, 0.7], [0.7]))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", pick(SOFT, ["all"]))
def test_soft_grad_fd(backend, case, reduction, rowsum):
    x, y, opts = _soft(case, seed=2, rowsum=rowsum)
    for go in _gos(reduction, N):
        loss, g = fl.cross_entropy(x, y, reduction=reduction, return_grad=True, grad_output=go, backend=backend, **opts)
        close(loss, ref_ce_soft(x, y, reduction=reduction, **opts))
        check_grad(lambda xx: fl.cross_entropy(xx, y, reduction=reduction, backend=backend, **opts), g, x, grad_output=go)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("reduction", pick(["mean", "none"], ["none"]))
def test_axis1_of_3d(backend, soft, reduction):
    n, c, d = sizes((2, 4, 3), sim=(2, 3, 2))
    r = rng(3)
    x = r.standard_normal((n, c, d))
    if soft:
        t = np.moveaxis(r.dirichlet(np.ones(c), (n, d)), -1, 1)
        want = ref_ce_soft(x, t, axis=1, label_smoothing=0.1, reduction=reduction)
    else:
        t = r.integers(0, c, (n, d))
        t[0, 0] = -100
        want = ref_ce(x, t, axis=1, label_smoothing=0.1, reduction=reduction)
    go = None if reduction == "mean" else r.standard_normal((n, d))
    loss, g = fl.cross_entropy(x, t, axis=1, label_smoothing=0.1, reduction=reduction, return_grad=True,
                               grad_output=go, backend=backend)
    close(loss, want)
    if reduction == "none":
        assert loss.shape == (n, d)
    assert g.shape == x.shape
    check_grad(lambda xx: fl.cross_entropy(xx, t, axis=1, label_smoothing=0.1, reduction=reduction, backend=backend),
               g, x, grad_output=go)
    # same thing with the class axis moved last
    x_last = np.moveaxis(x, 1, -1)
    t_last = np.moveaxis(t, 1, -1) if soft else t
    l2, g2 = fl.cross_entropy(x_last, t_last, label_smoothing=0.1, reduction=reduction, return_grad=True,
                              grad_output=go, backend=backend)
    close(l2, loss)
    close(np.moveaxis(g2, -1, 1), g, kind="grad")


@pytest.mark.parametrize("case", ["plain", "all"])
def test_float32_grad_vs_float64_reference(backend, case):
    x, t, opts = _case(case, np.float64, seed=4, n=sizes((16,), sim=(3,))[0], c=5)
    x32 = x.astype(np.float32)
    x64 = x32.astype(np.float64)
    o32 = {k: (v.astype(np.float32) if k == "weight" else v) for k, v in opts.items()}
    o64 = {k: (v.astype(np.float32).astype(np.float64) if k == "weight" else v) for k, v in opts.items()}
    l32, g32 = fl.cross_entropy(x32, t, reduction="sum", return_grad=True, backend=backend, **o32)
    l64, g64 = fl.cross_entropy(x64, t, reduction="sum", return_grad=True, backend="numpy", **o64)
    assert type(l32) is np.float32 and g32.dtype == np.float32
    close(l32, l64, np.float32)
    close(g32, g64, np.float32, kind="grad")


# ----------------------------------------------------------------------------- PyTorch semantics, literal
def test_literal_weight_ignore_smoothing_mean(backend):
    """Hand-computed: logits log([1,2,3]) so -log p = [log 6, log 3, log 2]."""
    x = np.log(np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [5.0, 1.0, 2.0]]))
    t = np.array([0, 2, -100])
    w = np.array([1.0, 2.0, 3.0])
    eps = 0.3
    S = np.log(6) * 1 + np.log(3) * 2 + np.log(2) * 3  # sum_c w_c (-log p_c)
    row0 = (1 - eps) * 1 * np.log(6) + eps / 3 * S
    row1 = (1 - eps) * 3 * np.log(2) + eps / 3 * S
    want_mean = (row0 + row1) / (1.0 + 3.0)  # PyTorch: divide by the summed weight of kept targets
    p = np.array([1, 2, 3]) / 6
    g0 = ((1 - eps) * 1 + eps / 3 * 6) * p - (1 - eps) * np.array([1, 0, 0]) - eps / 3 * w
    g1 = ((1 - eps) * 3 + eps / 3 * 6) * p - (1 - eps) * 3 * np.array([0, 0, 1]) - eps / 3 * w
    want_g = np.stack([g0, g1, np.zeros(3)]) / 4.0
    b = backend
    loss, g = fl.cross_entropy(x, t, weight=w, label_smoothing=eps, return_grad=True, backend=b)
    close(loss, want_mean)
    close(g, want_g, kind="grad")
    close(fl.cross_entropy(x, t, weight=w, label_smoothing=eps, reduction="sum", backend=b), row0 + row1)
    close(fl.cross_entropy(x, t, weight=w, label_smoothing=eps, reduction="none", backend=b), [row0, row1, 0.0])


def test_literal_z_loss_mean_denominator(backend):
    x = np.log(np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [1.0, 1.0, 1.0]]))
    t = np.array([1, 0, -100])
    w = np.array([1.0, 2.0, 3.0])
    z = 0.1
    # lse row0 = log 6, row1 = log 6; z-loss unweighted, mean divides by w[1] + w[0] = 3
    row0 = 2.0 * np.log(3) + z * np.log(6) ** 2
    row1 = 1.0 * np.log(3) + z * np.log(6) ** 2
    close(fl.cross_entropy(x, t, weight=w, z_loss=z, backend=backend), (row0 + row1) / 3.0)


def test_literal_soft_weight_mean_divides_by_rows(backend):
    x = np.log(np.array([[1.0, 1.0], [1.0, 3.0]]))
    y = np.array([[0.5, 0.5], [1.0, 0.0]])
    w = np.array([2.0, 1.0])
    row0 = 2 * 0.5 * np.log(2) + 1 * 0.5 * np.log(2)
    row1 = 2 * 1.0 * np.log(4)
    close(fl.cross_entropy(x, y, weight=w, backend=backend), (row0 + row1) / 2)


def test_all_ignored(backend):
    x = rng(5).standard_normal((3, 4))
    t = np.full(3, -100)
    loss, g = fl.cross_entropy(x, t, return_grad=True, backend=backend)
    assert loss == 0.0 and not np.isnan(loss) and type(loss) is np.float64
    assert np.array_equal(g, np.zeros_like(x))
    loss, g = fl.cross_entropy(x, t, weight=np.ones(4), label_smoothing=0.1, z_loss=0.1, return_grad=True, backend=backend)
    assert loss == 0.0 and np.array_equal(g, np.zeros_like(x))
    assert fl.cross_entropy(x, t, reduction="sum", backend=backend) == 0.0
    assert np.array_equal(fl.cross_entropy(x, t, reduction="none", backend=backend), np.zeros(3))


def test_ignored_row_with_nan_inf(backend):
    # an ignored row contributes nothing, exactly: loss 0 and a zero gradient even if it
    # holds NaN or inf (the documented choice of the kernel protocol)
    x = rng(21).standard_normal((3, 4))
    x[1] = [np.nan, np.inf, -np.inf, 0.0]
    t = np.array([2, -100, 0])
    loss, g = fl.cross_entropy(x, t, label_smoothing=0.1, return_grad=True, backend=backend)
    close(loss, ref_ce(x[[0, 2]], t[[0, 2]], label_smoothing=0.1))
    assert np.array_equal(g[1], np.zeros(4))
    assert np.all(np.isfinite(g))


# ----------------------------------------------------------------------------- extremes
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_target_logit_minus_inf(backend, dtype):
    inf = np.inf
    x = np.array([[-inf, 0.0, 0.0], [-inf, 0.0, 0.0], [1.0, -inf, 2.0]], dtype)
    t = np.array([0, 1, 1])
    loss, g = fl.cross_entropy(x, t, reduction="none", return_grad=True, grad_output=np.ones(3), backend=backend)
    close(loss, [inf, np.log(2), inf], dtype)
    assert not np.any(np.isnan(g))
    p2 = sp.softmax([1.0, 2.0])
    close(g, [[-1, 0.5, 0.5], [0, -0.5, 0.5], [p2[0], -1, p2[1]]], dtype, kind="grad")
    # label smoothing: the -inf class enters the smoothing term -> +inf loss, still no nan grad
    loss, g = fl.cross_entropy(x, t, label_smoothing=0.1, reduction="none", return_grad=True,
                               grad_output=np.ones(3), backend=backend)
    assert np.all(np.isinf(loss)) and not np.any(np.isnan(g))
    loss = fl.cross_entropy(x, t, backend=backend)
    assert loss == inf


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("c", pick([3, 10, 40], [3, 10]))
# both sides of fastloss._config.NUMBA_SERIAL_MAX at c = 10; under the CUDA simulator (a Python
# thread per element) 7000 x 40 ran for hours, and its kernels have no row blocks to cover
@pytest.mark.parametrize("n", pick([300, 7000], [20]))
@pytest.mark.parametrize("opts", ["plain", "weight", "smoothing", "z_loss"])
def test_nonfinite_rows_as_the_reference(backend, dtype, c, n, opts):
    """Rows holding +inf, NaN, only -inf, or huge logits among ordinary rows: every backend's
    row losses, lse and gradient as the reference backend's, NaN for NaN (a row with +inf has
    a NaN gradient everywhere: p = exp(x - lse) is NaN at the inf and its coefficient
    a = ... + 2 z lse is NaN).  Few classes take the column-block kernels, whose normal rows
    divide by the row sum and whose other rows are patched by a second pass -- the case
    where a folded ``s - s`` test once skipped the patch on the compiled backends."""
    r = rng(31)
    x = r.standard_normal((n, c)).astype(dtype) * 3
    x[5, 0] = np.inf
    x[9, 1] = np.nan
    x[13] = -np.inf
    x[17, :2] = [3e38 if dtype == np.float32 else 1e300, -1e30]
    x[-2, c - 1] = np.inf
    t = r.integers(0, c, n)
    t[9] = 1
    t[5] = 1
    o = dict(HARD[opts])
    if "weight" in o:
        o["weight"] = np.resize(o["weight"], c).astype(dtype)
    with np.errstate(all="ignore"):
        got = fl.cross_entropy(x, t, reduction="none", return_grad=True, return_lse=True, backend=backend, **o)
        want = fl.cross_entropy(x, t, reduction="none", return_grad=True, return_lse=True, backend="numpy", **o)
    for what, a, b in zip(("loss", "grad", "lse"), got, want):
        # NaN where the reference has NaN, the same infinities; the values to 1e-6 absolute
        # in float32 (a loss of 0.003 is log(1.003) from a float32 row sum: ~2e-5 relative)
        close(a, b, dtype, kind="grad", err_msg=what)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_nan_row_only(backend, dtype):
    x = rng(7).standard_normal((4, 5)).astype(dtype)
    x[2, 3] = np.nan
    t = np.array([0, 1, 2, 3])
    loss, g = fl.cross_entropy(x, t, reduction="none", return_grad=True, grad_output=np.ones(4), backend=backend)
    assert np.isnan(loss[2]) and np.all(np.isfinite(np.delete(loss, 2)))
    assert np.all(np.isnan(g[2])) and np.all(np.isfinite(np.delete(g, 2, axis=0)))
    close(np.delete(loss, 2), np.delete(ref_ce(x, t, reduction="none"), 2), dtype)
    assert np.isnan(fl.cross_entropy(x, t, backend=backend))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_huge_logits(backend, dtype):
    x = np.array([[1e4, 0.0], [0.0, 1e4], [-1e4, 1e4]], dtype)
    t = np.array([1, 1, 0])
    loss, g = fl.cross_entropy(x, t, reduction="none", return_grad=True, grad_output=np.ones(3), backend=backend)
    close(loss, [1e4, 0.0, 2e4], dtype)
    close(g, [[1, -1], [0, 0], [-1, 1]], dtype, kind="grad")
    # near the dtype's max: -log p = (m - x_t) + log(sum exp(x - m)), never lse - x_t (which
    # loses the O(1) log term next to m)
    a, b = (dtype(3e38), dtype(2.9e38)) if dtype == np.float32 else (1e300, 0.9e300)
    x = np.array([[a, b, 0], [a, b, 0], [a, a, a]], dtype)
    loss, g = fl.cross_entropy(x, np.array([1, 0, 2]), reduction="none", return_grad=True,
                               grad_output=np.ones(3), backend=backend)
    close(loss, [float(a) - float(b), 0.0, np.log(3)], dtype)
    close(g, [[1, -1, 0], [0, 0, 0], [1 / 3, 1 / 3, -2 / 3]], dtype, kind="grad")
    s = fl.cross_entropy(x[:2], np.array([1, 0]), reduction="sum", backend=backend)
    assert type(s) is np.dtype(dtype).type and np.isfinite(s)


def test_empty_batch(backend):
    for dtype in (np.float64, np.float32):
        x = np.zeros((0, 5), dtype)
        t = np.zeros(0, np.int64)
        loss, g = fl.cross_entropy(x, t, reduction="sum", return_grad=True, backend=backend)
        assert loss == 0 and type(loss) is np.dtype(dtype).type and g.shape == (0, 5) and g.dtype == dtype
        l = fl.cross_entropy(x, t, reduction="none", backend=backend)
        assert l.shape == (0,) and l.dtype == dtype
        # no targets at all: like all-ignored, mean gives 0.0 (documented choice for "mean" with no targets)
        m = fl.cross_entropy(x, t, backend=backend)
        assert m == 0.0
        ls = fl.cross_entropy(x, np.zeros((0, 5), dtype), reduction="sum", backend=backend)
        assert ls == 0


def test_one_class(backend):
    x = rng(8).standard_normal((3, 1))
    loss, g = fl.cross_entropy(x, np.zeros(3, np.int64), label_smoothing=0.2, return_grad=True, backend=backend)
    close(loss, 0.0)
    close(g, np.zeros_like(x), kind="grad")


# ----------------------------------------------------------------------------- layouts, dtypes, buffers
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_strided_and_fortran(backend, dtype):
    x, t, opts = _case("all", dtype, seed=9, n=6, c=5)
    want_l, want_g = fl.cross_entropy(x.copy(), t, return_grad=True, backend=backend, **opts)
    big = np.zeros((12, 15), dtype)
    big[::2, ::3] = x
    views = {"fortran": np.asfortranarray(x), "strided": big[::2, ::3], "reversed": x[::-1].copy()[::-1],
             "transposed": np.ascontiguousarray(x.T).T}
    for name, v in views.items():
        l, g = fl.cross_entropy(v, t, return_grad=True, backend=backend, **opts)
        close(l, want_l, dtype, err_msg=name)
        close(g, want_g, dtype, kind="grad", err_msg=name)
        assert g.shape == x.shape
    # strided target and weight views too
    tb = np.zeros(12, np.int64)
    tb[::2] = t
    wb = np.zeros(10, dtype)
    wb[::2] = opts["weight"]
    o2 = dict(opts, weight=wb[::2])
    close(fl.cross_entropy(x, tb[::2], backend=backend, **o2), want_l, dtype)


def test_float16(backend):
    x, t, _ = _case("plain", np.float16, seed=10)
    loss, g = fl.cross_entropy(x, t, return_grad=True, backend=backend)
    assert type(loss) is np.float32
    assert g.dtype == np.float16
    close(loss, ref_ce(x, t), np.float32, rtol=1e-5, atol=1e-6)  # computed in float32 from the float16 values
    l = fl.cross_entropy(x, t, reduction="none", backend=backend)
    assert l.dtype == np.float16
    close(l, ref_ce(x, t, reduction="none"), np.float16)
    g64 = fl.cross_entropy(x.astype(np.float64), t, return_grad=True, backend="numpy")[1]
    close(g, g64, np.float16)


def test_in_place_grad(backend):
    for dtype in (np.float64, np.float32):
        x, t, opts = _case("all", dtype, seed=11)
        want_l, want_g = fl.cross_entropy(x.copy(), t, return_grad=True, backend="numpy", **opts)
        buf = x.copy()
        l, g = fl.cross_entropy(buf, t, return_grad=True, grad_out=buf, backend=backend, **opts)
        assert np.shares_memory(g, buf)
        close(l, want_l, dtype)
        close(buf, want_g, dtype, kind="grad")
        # soft targets in place
        x, y, so = _soft("all", dtype, seed=12)
        want_l, want_g = fl.cross_entropy(x.copy(), y, return_grad=True, backend="numpy", **so)
        buf = x.copy()
        l, g = fl.cross_entropy(buf, y, return_grad=True, grad_out=buf, backend=backend, **so)
        assert np.shares_memory(g, buf)
        close(l, want_l, dtype)
        close(buf, want_g, dtype, kind="grad")


def test_in_place_axis1(backend):
    x = rng(13).standard_normal((2, 4, 3))
    t = rng(14).integers(0, 4, (2, 3))
    # reference: class axis moved last into a C-contiguous copy (the plain 2-D path)
    want_l, want_g = fl.cross_entropy(np.moveaxis(x, 1, -1).copy(), t, return_grad=True, backend="numpy")
    want_g = np.moveaxis(want_g, -1, 1)
    buf = x.copy()
    l, g = fl.cross_entropy(buf, t, axis=1, return_grad=True, grad_out=buf, backend=backend)
    close(l, want_l)
    close(buf, want_g, kind="grad")


def test_grad_out_reuse(backend):
    buf = np.full((N, C), 123.0)
    for seed in (15, 16):
        x, t, opts = _case("all", seed=seed)
        want_l, want_g = fl.cross_entropy(x, t, return_grad=True, backend="numpy", **opts)
        l, g = fl.cross_entropy(x, t, return_grad=True, grad_out=buf, backend=backend, **opts)
        assert np.shares_memory(g, buf)
        close(l, want_l)
        close(buf, want_g, kind="grad")


# ----------------------------------------------------------------------------- large class counts
def _large(backend, n, c):
    r = rng(17)
    x32 = (r.standard_normal((n, c)) * 3).astype(np.float32)
    x = x32.astype(np.float64)
    t = r.integers(0, c, n)
    loss, g = fl.cross_entropy(x32, t, reduction="sum", return_grad=True, backend=backend)
    close(loss, ref_ce(x, t, reduction="sum"), np.float32)
    want_g = sp.softmax(x, axis=-1)
    want_g[np.arange(n), t] -= 1
    close(g, want_g, np.float32, kind="grad", rtol=0, atol=1e-6)
    # with every option, against the float64 reference backend on the same inputs
    w = r.uniform(0.5, 2, c)
    opts = dict(label_smoothing=0.1, z_loss=1e-3)
    l32, g32 = fl.cross_entropy(x32, t, weight=w.astype(np.float32), reduction="sum", return_grad=True,
                                backend=backend, **opts)
    close(l32, ref_ce(x, t, weight=w.astype(np.float32), reduction="sum", **opts), np.float32)
    g64 = fl.cross_entropy(x, t, weight=w.astype(np.float32).astype(np.float64), reduction="sum",
                           return_grad=True, backend="numpy", **opts)[1]
    close(g32, g64, np.float32, kind="grad", rtol=0, atol=1e-6)


def test_many_classes_small(backend):
    _large(backend, *sizes((4, 4099), sim=(2, 70)))


@pytest.mark.slow
def test_many_classes_262144(backend):
    _large(backend, *sizes((4, 262144), sim=(2, 300)))


@pytest.mark.slow
def test_big_batch(backend):
    n, c = sizes((4096, 1000), sim=(8, 16))
    r = rng(18)
    x32 = r.standard_normal((n, c)).astype(np.float32)
    t = r.integers(0, c, n)
    t[::7] = -100
    loss, g = fl.cross_entropy(x32, t, label_smoothing=0.1, return_grad=True, backend=backend)
    l64, g64 = fl.cross_entropy(x32.astype(np.float64), t, label_smoothing=0.1, return_grad=True, backend="numpy")
    close(loss, ref_ce(x32, t, label_smoothing=0.1), np.float32)
    close(g * n, g64 * n, np.float32, kind="grad")


def test_grad_out_any_layout(backend):
    x, t, opts = _case("all", seed=19, n=6, c=5)
    want_l, want_g = fl.cross_entropy(x, t, return_grad=True, backend="numpy", **opts)
    big = np.full((12, 10), 9.0)
    for name, buf in {"fortran": np.asfortranarray(np.zeros_like(x)), "strided": big[::2, ::2]}.items():
        l, g = fl.cross_entropy(x, t, return_grad=True, grad_out=buf, backend=backend, **opts)
        assert np.shares_memory(g, buf), name
        close(buf, want_g, kind="grad", err_msg=name)
    assert np.all(big[1::2] == 9.0) and np.all(big[:, 1::2] == 9.0), "wrote outside the grad_out view"
    # grad_out with the class axis not last
    x3 = rng(20).standard_normal((2, 4, 3))
    t3 = rng(21).integers(0, 4, (2, 3))
    want = fl.cross_entropy(np.moveaxis(x3, 1, -1).copy(), t3, return_grad=True, backend="numpy")[1]
    buf = np.empty_like(x3)
    fl.cross_entropy(x3, t3, axis=1, return_grad=True, grad_out=buf, backend=backend)
    close(np.moveaxis(buf, 1, -1), want, kind="grad")


# ----------------------------------------------------------------------------- large vocabularies
# softcap / return_lse / num_items (SPEC "Large vocabularies"), with every existing option

def _capped64(x, cap):
    """``cap * tanh(x / cap)`` in float64: the closed form the kernels' cap must give."""
    return cap * np.tanh(np.asarray(x, np.float64) / cap)


@pytest.mark.parametrize("reduction", pick(["mean", "sum", "none"], ["mean", "none"]))
@pytest.mark.parametrize("case", pick(HARD, ["plain", "all"]))
def test_softcap_hard_values_and_grad_fd(backend, case, reduction):
    """Values: the reference cross-entropy (SciPy) of the capped logits; gradients: finite
    differences through the cap, for every option set and reduction."""
    x, t, opts = _case(case, seed=3)
    x = x * 4  # logits that the cap bends
    cap = 3.0
    for go in _gos(reduction, N):
        loss, g = fl.cross_entropy(x, t, softcap=cap, reduction=reduction, return_grad=True, grad_output=go,
                                   backend=backend, **opts)
        close(loss, ref_ce(_capped64(x, cap), t, reduction=reduction, **opts))
        check_grad(lambda xx: fl.cross_entropy(xx, t, softcap=cap, reduction=reduction, backend=backend, **opts),
                   g, x, grad_output=go)
        if "_ignore" in HARD[case] or "ignore_index" in opts:
            assert np.all(g[0] == 0), "an ignored row has a zero gradient"


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", pick(SOFT, ["plain", "all"]))
def test_softcap_soft_values_and_grad_fd(backend, case, reduction):
    x, y, opts = _soft(case, seed=4)
    x = x * 4
    cap = 2.5
    for go in _gos(reduction, N):
        loss, g = fl.cross_entropy(x, y, softcap=cap, reduction=reduction, return_grad=True, grad_output=go,
                                   backend=backend, **opts)
        close(loss, ref_ce_soft(_capped64(x, cap), y, reduction=reduction, **opts))
        check_grad(lambda xx: fl.cross_entropy(xx, y, softcap=cap, reduction=reduction, backend=backend, **opts),
                   g, x, grad_output=go)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("c", pick([5, 40, 3000], [5]))
def test_softcap_extremes(backend, dtype, c):
    """Capped logits are finite: +-inf logits become +-cap (derivative exactly 0), a -inf
    target logit gives a finite loss, huge logits are exact, NaN stays in its row; the
    closed form at float64 for the rest (few classes: the column-block kernels)."""
    r = rng(5)
    n = 6
    x = (r.standard_normal((n, c)) * 10).astype(dtype)
    x[0, 0] = np.inf
    x[1, :] = -np.inf
    x[2, 1] = -np.inf
    x[3, :2] = [3e38 if dtype == np.float32 else 1e300, -1e30]
    x[4, 2] = np.nan
    t = np.array([1, 0, 1, 0, 0, 3])
    cap = 30.0
    loss, g, lse = fl.cross_entropy(x, t, softcap=cap, reduction="none", return_grad=True, return_lse=True,
                                    backend=backend)
    xc = _capped64(x, cap)
    want = ref_ce(xc, t, reduction="none")
    with np.errstate(invalid="ignore"):
        # float32: the capped logits are float32 numbers near +-30, each rounded by up to
        # 1e-6 (half an ulp of 30) from the float64 closed form, so a small loss (row 3: 0.017,
        # its max dominating) is determined to ~1e-6 absolute, not 2e-6 relative
        close(loss, want, dtype, atol=1e-6 if dtype == np.float32 else None)
    assert np.isfinite(loss[[0, 1, 2, 3, 5]]).all() and np.isnan(loss[4])
    assert np.isnan(g[4]).all() and np.isfinite(np.delete(g, 4, axis=0)).all()
    assert g[0, 0] == 0 and np.all(g[1] == 0) and g[2, 1] == 0  # the cap is flat at +-inf
    close(lse[[0, 1, 2, 3, 5]], sp.logsumexp(xc[[0, 1, 2, 3, 5]], axis=1), dtype)
    np.testing.assert_allclose(lse[1], np.log(c) - cap, rtol=1e-6)  # a row of -inf: uniform at -cap


@pytest.mark.parametrize("soft", [False, True])
def test_softcap_float32_grad_vs_float64(backend, soft):
    """float32 gradients through the cap within the contract's 1e-6 absolute (scaled to O(1):
    "sum"), against the float64 closed form (PyTorch's expression, through autograd by hand:
    softmax minus target, times 1 - tanh**2)."""
    from scipy.special import softmax

    r = rng(6)
    n, c = sizes((64, 300), (8, 40))
    x = (r.standard_normal((n, c)) * 20).astype(np.float32)
    cap = 15.0
    if soft:
        t = r.dirichlet(np.ones(c), n).astype(np.float32)
        y = t.astype(np.float64)
    else:
        t = r.integers(0, c, n)
        y = np.eye(c)[t]
    _, g = fl.cross_entropy(x, t, softcap=cap, reduction="sum", return_grad=True, backend=backend)
    th = np.tanh(x.astype(np.float64) / cap)
    want = (softmax(cap * th, axis=1) * y.sum(axis=1, keepdims=True) - y) * (1 - th * th)
    np.testing.assert_allclose(g, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("cap", [None, 4.0])
def test_return_lse(backend, dtype, soft, cap):
    """``return_lse``: each row's log-sum-exp of the (capped) logits, ignored rows included,
    shaped like the unreduced loss, in the compute dtype, last in the result tuple; the loss
    and gradient unchanged by asking for it; any class axis."""
    r = rng(7)
    x = (r.standard_normal((3, 6, 4)) * 3).astype(dtype)  # classes on axis 1
    if soft:
        t = r.dirichlet(np.ones(6), (3, 4)).transpose(0, 2, 1).astype(dtype)
    else:
        t = r.integers(0, 6, (3, 4))
        t[0, 0] = -100
    xc = np.asarray(x, np.float64) if cap is None else _capped64(x, cap)
    want = sp.logsumexp(xc, axis=1)
    for reduction in pick(("mean", "none"), ("none",)):
        l0, g0 = fl.cross_entropy(x, t, axis=1, softcap=cap, reduction=reduction, return_grad=True,
                                  backend=backend)
        l1, g1, lse = fl.cross_entropy(x, t, axis=1, softcap=cap, reduction=reduction, return_grad=True,
                                       return_lse=True, backend=backend)
        assert lse.shape == (3, 4) and lse.dtype == dtype
        close(lse, want, dtype)
        np.testing.assert_array_equal(l1, l0)
        np.testing.assert_array_equal(g1, g0)
        l2, lse2 = fl.cross_entropy(x, t, axis=1, softcap=cap, reduction=reduction, return_lse=True,
                                    backend=backend)
        close(l2, l0, dtype)  # loss only: a kernel compiled apart (the last bit may differ)
        close(lse2, want, dtype)


def test_return_lse_float16(backend):
    x = rng(8).standard_normal((4, 7)).astype(np.float16)
    _, lse = fl.cross_entropy(x, np.array([0, 1, 2, -100]), return_lse=True, backend=backend)
    assert lse.dtype == np.float32  # the compute dtype
    close(lse, sp.logsumexp(x.astype(np.float64), axis=1), np.float32)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("case", ["plain", "all"])
def test_num_items_micro_batches(backend, soft, case):
    """``num_items``: micro-batches' mean losses and gradients with the global count add up to
    the full batch's (with weights, ignored rows, smoothing, z-loss and a cap)."""
    if soft:
        x, t, opts = _soft(case if case in SOFT else "all", seed=9, n=12)
        total = 12.0
    else:
        x, t, opts = _case(case, seed=9, n=12)
        w = opts.get("weight")
        ii = opts.get("ignore_index", -100)
        keep = t != ii
        total = float(np.sum(w[t[keep]])) if w is not None else float(keep.sum())
    opts["softcap"] = 5.0
    full, gfull = fl.cross_entropy(x, t, return_grad=True, backend=backend, **opts)
    parts = [fl.cross_entropy(x[s], t[s], num_items=total, return_grad=True, backend=backend, **opts)
             for s in (slice(0, 5), slice(5, 12))]
    close(parts[0][0] + parts[1][0], full)
    close(np.concatenate([parts[0][1], parts[1][1]]), gfull, kind="grad")
    # and the closed form: "mean" = sum / num_items
    s = fl.cross_entropy(x, t, reduction="sum", backend=backend, **opts)
    close(fl.cross_entropy(x, t, num_items=2.5, backend=backend, **opts), s / 2.5)


def test_large_vocab_arguments_errors(backend):
    x = np.zeros((2, 3))
    t = np.array([0, 1])
    for bad in (0.0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError, match="softcap: expected a finite number > 0"):
            fl.cross_entropy(x, t, softcap=bad, backend=backend)
        with pytest.raises(ValueError, match="num_items: expected a finite number > 0"):
            fl.cross_entropy(x, t, num_items=bad, backend=backend)
    with pytest.raises(TypeError, match="softcap: expected a real number"):
        fl.cross_entropy(x, t, softcap="3", backend=backend)
    for reduction in ("sum", "none"):
        with pytest.raises(ValueError, match="num_items: expected None with reduction="):
            fl.cross_entropy(x, t, num_items=4, reduction=reduction, backend=backend)
