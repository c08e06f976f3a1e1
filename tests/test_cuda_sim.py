"""Tests of the ``cuda`` backend that run under the Numba CUDA simulator (no GPU needed).

Run in their own process, with the simulator switched on before Numba is imported::

    NUMBA_ENABLE_CUDASIM=1 FASTLOSS_TEST_BACKENDS=cuda python -m pytest tests/test_cuda_sim.py -q

Shapes are tiny: the simulator runs every GPU thread as a Python thread.  Tests marked
``gpu`` need a real GPU and are skipped otherwise.
"""
from __future__ import annotations

import os
import sys
import types

import ml_dtypes
import numpy as np
import pytest

numba_cuda = pytest.importorskip("numba.cuda")
cuda = numba_cuda

import fastloss as fl  # noqa: E402
from fastloss._backends import cuda_backend as C  # noqa: E402
from fastloss._backends import numpy_backend as R  # noqa: E402

SIM = bool(getattr(cuda.config, "ENABLE_CUDASIM", 0))
if not SIM and C.unavailable_reason():
    pytest.skip(f"cuda backend unavailable: {C.unavailable_reason()}", allow_module_level=True)
from fastloss._backends import _cuda_adaptor as A  # noqa: E402
from fastloss._backends import _cuda_arrays as D  # noqa: E402

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(SIM or bool(C.unavailable_reason()), reason="needs a real CUDA GPU")

DTYPES = [np.float32, np.float64]
BF16 = np.dtype(ml_dtypes.bfloat16)
TOL = {np.float32: dict(rtol=2e-6, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


def close(a, b, dt):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), equal_nan=True, **TOL[dt])


def host(d):
    return d.copy_to_host() if hasattr(d, "copy_to_host") else np.asarray(d)


# ----------------------------------------------------------------------------- availability
def test_available_and_lazy():
    assert C.unavailable_reason() == ""
    assert C.NAME == "cuda"
    from fastloss._backends import _cuda_kernels as K

    # nothing is compiled at import: kernels are built per (name, dtype) on first use
    assert set(K._FACTORIES) >= {"row_lse", "ce_hard", "ce_shard", "ce_soft", "bce_with_logits", "gaussian_nll"}


def test_unavailable_reason_without_numba_cuda(monkeypatch):
    monkeypatch.setattr(C, "cuda", None)
    monkeypatch.setattr(C, "_IMPORT_ERROR", "numba-cuda cannot be imported (ImportError: x)")
    assert 'pip install "fastloss[cuda]"' in C.unavailable_reason()


def test_unavailable_reason_without_gpu(monkeypatch):
    fake = types.SimpleNamespace(is_available=lambda: False, config=cuda.config)
    monkeypatch.setattr(C, "cuda", fake)
    assert "no CUDA GPU" in C.unavailable_reason()


# ----------------------------------------------------------------------------- offload (NumPy in)
def _rows_input(dt, rng, n=5, c=7):
    x = rng.standard_normal((n, c)).astype(dt)
    x[1, 2] = -np.inf  # a masked class
    x[3] = -np.inf  # a row of only -inf
    x[4, 1] = np.inf  # +inf anywhere
    return x


@pytest.mark.parametrize("dt", DTYPES)
def test_offload_normalizers_match_numpy(dt):
    rng = np.random.default_rng(1)
    x = _rows_input(dt, rng)
    a, b = np.empty(5, dt), np.empty(5, dt)
    R.logsumexp(x, a)
    C.logsumexp(x, b)
    close(a, b, dt)
    assert b[3] == -np.inf and b[4] == np.inf
    for f in ("softmax", "log_softmax"):
        a, b = np.empty_like(x), np.empty_like(x)
        getattr(R, f)(x, a)
        getattr(C, f)(x, b)
        close(a, b, dt)


@pytest.mark.parametrize("dt", DTYPES)
def test_offload_large_logits_keep_the_log_term(dt):
    """log p is ``(x - m) - log s`` and p is ``exp(x - m) / s``, never via ``lse = m + log s``,
    which rounds to ``m`` for large logits (1e4 in float32 loses ~5e-4; at 3e38 / 1e300 the
    whole ``log s``): log_softmax, the hard loss with smoothing and weights, soft targets."""
    rng = np.random.default_rng(12)
    big = 3e38 if dt == np.float32 else 1e300
    c = 5
    x = np.array([1e4 + rng.standard_normal(c), -1e4 + rng.standard_normal(c), np.full(c, big),
                  np.r_[big, 0.97 * big, np.zeros(c - 2)], np.r_[np.full(c - 1, -big), -0.99 * big]]).astype(dt)
    n = x.shape[0]
    a, b = np.empty_like(x), np.empty_like(x)
    R.log_softmax(x, a)
    C.log_softmax(x, b)
    close(a, b, dt)
    np.testing.assert_allclose(b[2], -np.log(c), rtol=1e-6)
    t = np.arange(n) % c
    w = (rng.random(c) + 0.5).astype(dt)
    y = rng.random((n, c)).astype(dt)
    y /= y.sum(1, keepdims=True)
    for weight in (None, w):
        for eps in (0.0, 0.1):
            la, lb, ga, gb = np.empty(n), np.empty(n), np.empty_like(x), np.empty_like(x)
            R.cross_entropy(x, t, weight, -100, eps, 0.0, 0.0, la, None, ga, np.ones(n))
            C.cross_entropy(x, t, weight, -100, eps, 0.0, 0.0, lb, None, gb, np.ones(n))
            close(la, lb, dt)
            close(ga, gb, dt)
            if weight is None and eps == 0:
                np.testing.assert_allclose(lb[2], np.log(c), rtol=1e-6)  # equal huge logits
            R.cross_entropy_soft(x, y, weight, eps, 0.0, 0.0, la, None, ga, np.ones(n))
            C.cross_entropy_soft(x, y, weight, eps, 0.0, 0.0, lb, None, gb, np.ones(n))
            close(la, lb, dt)
            close(ga, gb, dt)


@pytest.mark.parametrize("dt", DTYPES)
def test_offload_layouts_and_inplace(dt):
    rng = np.random.default_rng(2)
    base = rng.standard_normal((9, 6)).astype(dt)
    for x in (np.asfortranarray(base), base[::2, ::-1], base.T.copy().T[1:, :5]):
        a, b = np.empty_like(x), np.empty_like(x)
        R.log_softmax(x, a)
        C.log_softmax(x, b)
        close(a, b, dt)
    x = base.copy()
    expect = np.empty_like(x)
    R.softmax(x, expect)
    C.softmax(x, x)  # in place
    close(expect, x, dt)
    g = rng.standard_normal(base.shape).astype(dt)
    for f in ("softmax_backward", "log_softmax_backward"):
        a = np.empty_like(base)
        getattr(R, f)(g, base, a)
        b = g.copy()
        getattr(C, f)(b, base, b)
        close(a, b, dt)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps,z", [(0.0, 0.0), (0.1, 1e-2)])
def test_offload_cross_entropy(dt, weighted, eps, z):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 9)).astype(dt)
    x[2, 3] = -np.inf  # the target logit is -inf: loss +inf, no nan in the gradient
    t = np.array([0, 3, -100, 8, 2, 1])
    t[2] = 3 if not eps else -100
    w = rng.random(9).astype(dt) if weighted else None
    gs = rng.random(6)
    la, lb = np.empty(6), np.empty(6)
    ga = np.empty_like(x)
    gb = x.copy()
    R.cross_entropy(x, t, w, -100, eps, z, 0.0, la, None, ga, gs)
    C.cross_entropy(gb, t, w, -100, eps, z, 0.0, lb, None, gb, gs)  # gradient in place
    close(la, lb, dt)
    close(ga, gb, dt)
    assert not np.isnan(gb).any()
    y = rng.random((6, 9)).astype(dt)
    y /= y.sum(1, keepdims=True)
    x[2, 3] = 0.5
    lc = np.empty(6)
    R.cross_entropy_soft(x, y, w, eps, z, 0.0, la, None, ga, gs)
    C.cross_entropy_soft(x, y, w, eps, z, 0.0, lc, None, gb, gs)
    close(la, lc, dt)
    close(ga, gb, dt)
    C.cross_entropy_soft(x, y, w, eps, z, 0.0, lc, None, None, None)  # loss only
    close(la, lc, dt)


@pytest.mark.parametrize("tpb,blocks,row", [(2, 1, 1), (8, 3, 4)])
def test_launch_shapes_from_config_change_nothing_but_the_split(monkeypatch, tpb, blocks, row):
    """The launch shapes are read from fastloss._config at each call: other block sizes and
    block counts (grid-stride loops, several rows per block, one partial sum) give the same
    values as the NumPy reference."""
    from fastloss import _config

    monkeypatch.setattr(_config, "CUDA_SIM_THREADS_PER_BLOCK", tpb)
    monkeypatch.setattr(_config, "CUDA_SIM_MAX_BLOCKS", blocks)
    monkeypatch.setattr(_config, "CUDA_SIM_ROW_MAX_THREADS", row)
    r = np.random.default_rng(30)
    x, t = r.standard_normal((5, 7)), np.array([0, 6, -100, 3, 2])
    lc, gc = fl.cross_entropy(x, t, return_grad=True, backend="cuda")
    ln, gn = fl.cross_entropy(x, t, return_grad=True, backend="numpy")
    close(lc, ln, np.float64)
    close(gc, gn, np.float64)
    y = r.random((5, 7))
    ec = fl.binary_cross_entropy_with_logits(x, y, reduction="sum", return_grad=True, backend="cuda")
    en = fl.binary_cross_entropy_with_logits(x, y, reduction="sum", return_grad=True, backend="numpy")
    close(ec[0], en[0], np.float64)
    close(ec[1], en[1], np.float64)
    close(fl.logsumexp(x, backend="cuda"), fl.logsumexp(x, backend="numpy"), np.float64)


@pytest.mark.parametrize("dt", DTYPES)
def test_offload_elementwise(dt):
    rng = np.random.default_rng(4)
    z = rng.standard_normal((4, 5)).astype(dt) * 30
    y = rng.random((4, 5)).astype(dt)
    p = rng.random((4, 5)).astype(dt)
    p[0, 0], p[0, 1] = 0.0, 1.0
    w = np.broadcast_to(rng.random(5).astype(dt), (4, 5))  # stride-0 views
    pw = np.broadcast_to(rng.random((4, 1)).astype(dt), (4, 5))
    go = rng.random((4, 5)).astype(dt)
    t_log = np.log(y)
    t_log[1, 1] = -np.inf
    yz = y.copy()
    yz[2, 2] = 0
    cases = [
        ("bce_with_logits", (z, y, w, pw)),
        ("bce_with_logits", (z, y, None, None)),
        ("bce", (p, y, w)),
        ("kl_div", (z, yz, False)),
        ("kl_div", (z, t_log, True)),
        ("mse", (np.asfortranarray(z), y[:, ::-1])),
    ]
    for name, args in cases:
        for gout in (None, go):
            la, lb = np.empty_like(z), np.empty_like(z)
            ga, gb = np.empty_like(z), np.empty_like(z)
            sa = getattr(R, name)(*args, la, ga, 0.5, gout)
            sb = getattr(C, name)(*args, lb, gb, 0.5, gout)
            close(sa, sb, dt)
            close(la, lb, dt)
            close(ga, gb, dt)
    var = np.abs(rng.standard_normal((4, 1))).astype(dt)
    var[0] = 0  # clamped at eps
    var = np.broadcast_to(var, (4, 5))
    for full in (False, True):
        out = [np.empty_like(z) for _ in range(6)]
        sa = R.gaussian_nll(z, y, var, full, 1e-6, out[0], out[1], out[2], 0.5, None)
        sb = C.gaussian_nll(z, y, var, full, 1e-6, out[3], out[4], out[5], 0.5, None)
        close(sa, sb, dt)
        for k in range(3):
            close(out[k], out[k + 3], dt)


def test_offload_large_class_count_loops_within_block():
    # more classes than threads per row: every thread loops over its columns
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 300)) * 5).astype(np.float32)
    a, b = np.empty(2, np.float32), np.empty(2, np.float32)
    R.logsumexp(x, a)
    C.logsumexp(x, b)
    close(a, b, np.float32)


def test_offload_empty():
    x = np.empty((0, 4))
    out = np.empty(0)
    C.logsumexp(x, out)
    assert C.mse(np.empty((0, 3)), np.empty((0, 3)), None, None, 1.0, None) == 0.0


# ----------------------------------------------------------------------------- device arrays through the public API
def dcall(fname, kwargs):
    """Public function ``fname`` on device-resident arguments (the device path of fastloss._api)."""
    return getattr(fl, fname)(**kwargs)


def dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


def ref_ce(x, t, w=None, ignore=-100, eps=0.0, z=0.0, reduction="mean", gout=1.0):
    """PyTorch semantics from the numpy reference kernels (2-D, class axis last)."""
    n, c = x.shape
    keep = t != ignore
    wt = np.where(keep, (np.ones(c) if w is None else w)[np.where(keep, t, 0)], 0.0)
    denom = wt.sum() if reduction == "mean" else 1.0
    scale = 0.0 if denom == 0 else 1.0 / denom
    gs = np.full(n, gout * scale) if np.ndim(gout) == 0 else np.asarray(gout, np.float64)
    loss = np.empty(n)
    g = np.empty_like(x)
    R.cross_entropy(x, t, w, ignore, eps, z, 0.0, loss, None, g, gs)
    if reduction == "none":
        return loss.astype(x.dtype), g
    return loss.sum() * scale, g


@pytest.mark.parametrize("dt", DTYPES)
def test_device_normalizers_axis_and_layout(dt):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4, 5)).astype(dt)
    for axis in (0, 1, -1):
        r = dcall("logsumexp", dict(x=dev(x), axis=axis, keepdims=False))
        ref = np.log(np.sum(np.exp(x.astype(np.float64)), axis=axis))
        close(host(r), ref, dt)
        assert host(r).dtype == dt
        r = dcall("logsumexp", dict(x=dev(x), axis=axis, keepdims=True))
        assert r.shape == np.expand_dims(ref, axis).shape
        sm = dcall("softmax", dict(x=dev(x), axis=axis, out=None))
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        close(host(sm), e / e.sum(axis=axis, keepdims=True), dt)
    s = dcall("logsumexp", dict(x=dev(x[0, 0]), axis=-1, keepdims=False))
    assert isinstance(s, np.generic) and s.dtype == dt
    # a strided device view (class axis not contiguous) and out=
    dx = dev(x)[:, ::2, :]
    out = cuda.device_array((3, 2, 5), dt)
    got = dcall("log_softmax", dict(x=dx, axis=1, out=out))
    assert got is out
    xs = x[:, ::2, :]
    ls = xs - np.log(np.exp(xs).sum(axis=1, keepdims=True))
    close(host(out), ls, dt)
    g = rng.standard_normal(xs.shape).astype(dt)
    r = dcall("log_softmax_backward", dict(grad=dev(g), y=dev(ls), axis=1))
    close(host(r), g - np.exp(ls) * g.sum(axis=1, keepdims=True), dt)
    y = np.exp(ls)
    r = dcall("softmax_backward", dict(grad=dev(g), y=dev(y), axis=1))
    close(host(r), y * (g - (g * y).sum(axis=1, keepdims=True)), dt)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_device_cross_entropy(dt, reduction):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 6)).astype(dt)
    t = np.array([1, -100, 5, 0, 2])
    w = rng.random(6).astype(dt)
    gout = rng.random(5) if reduction == "none" else 0.5
    lv, g = dcall("cross_entropy", dict(
        logits=dev(x), target=dev(t), axis=-1, weight=dev(w), ignore_index=-100, label_smoothing=0.1,
        z_loss=1e-3, reduction=reduction, return_grad=True,
        grad_output=dev(gout.astype(dt)) if reduction == "none" else gout, grad_out=None))
    el, eg = ref_ce(x, t, w.astype(dt), -100, 0.1, 1e-3, reduction,
                    gout.astype(dt).astype(np.float64) if reduction == "none" else gout)
    if reduction == "none":
        close(host(lv), el, dt)
    else:
        assert isinstance(lv, np.generic) and lv.dtype == dt
        close(lv, el, dt)
    close(host(g), eg, dt)


def test_device_cross_entropy_class_axis_0_and_soft():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 3, 2))  # classes on axis 1 of a 3-d array
    t = rng.integers(0, 3, size=(4, 2))
    lv = dcall("cross_entropy", dict(logits=dev(x), target=dev(t), axis=1, reduction="sum"))
    x2 = np.moveaxis(x, 1, -1).reshape(-1, 3)
    el, _ = ref_ce(x2, t.reshape(-1), reduction="sum")
    close(lv, el, np.float64)
    y = rng.random(x.shape)
    y /= y.sum(axis=1, keepdims=True)
    lv, g = dcall("cross_entropy", dict(logits=dev(x), target=dev(y), axis=1, return_grad=True))
    y2 = np.moveaxis(y, 1, -1).reshape(-1, 3)
    loss = np.empty(8)
    g2 = np.empty_like(x2)
    R.cross_entropy_soft(x2, y2, None, 0.0, 0.0, 0.0, loss, None, g2, np.full(8, 1 / 8))
    close(lv, loss.mean(), np.float64)
    close(host(g), np.moveaxis(g2.reshape(4, 2, 3), -1, 1), np.float64)


def test_device_cross_entropy_in_place_and_all_ignored():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    t = np.array([0, 4, 2, 1])
    dx = dev(x)
    lv, g = dcall("cross_entropy", dict(logits=dx, target=t, return_grad=True, grad_out=dx))
    assert g is dx
    el, eg = ref_ce(x, t)
    close(lv, el, np.float32)
    close(host(dx), eg, np.float32)
    lv, g = dcall("cross_entropy", dict(logits=dev(x), target=np.full(4, -100), return_grad=True))
    assert lv == 0 and not host(g).any()


@pytest.mark.parametrize("inplace", [False, True])
def test_device_index_error_before_any_write(inplace):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    dx = dev(x)
    gout = dx if inplace else cuda.to_device(np.full((3, 4), 7, np.float32))
    before = host(gout).copy()
    with pytest.raises(IndexError, match=r"found 9 at position \(1,\)"):
        dcall("cross_entropy", dict(logits=dx, target=dev(np.array([0, 9, 1])), return_grad=True, grad_out=gout))
    np.testing.assert_array_equal(host(gout), before)
    np.testing.assert_array_equal(host(dx), x)
    with pytest.raises(IndexError):
        dcall("cross_entropy", dict(logits=dx, target=np.array([0, -1, 1])))


def test_device_validation_errors():
    dx = dev(np.zeros((2, 3)))
    with pytest.raises(TypeError, match="astype"):
        dcall("logsumexp", dict(x=dev(np.zeros((2, 3), np.int32))))
    with pytest.raises(ValueError, match="reduction"):
        dcall("mse_loss", dict(input=dx, target=dx, reduction="avg"))
    with pytest.raises(ValueError, match="grad_out"):
        dcall("mse_loss", dict(input=dx, target=dx, grad_out=dx))
    with pytest.raises(ValueError, match="grad_out"):
        dcall("mse_loss", dict(input=dx, target=dx, return_grad=True, grad_out=dev(np.zeros((3, 2)))))
    with pytest.raises(ValueError, match="axis"):
        dcall("softmax", dict(x=dx, axis=2))
    with pytest.raises(ValueError, match="target"):
        dcall("cross_entropy", dict(logits=dx, target=dev(np.zeros(3, np.int64))))
    with pytest.raises(ValueError, match=r"probs: expected probabilities in \[0, 1\]"):
        dcall("binary_cross_entropy", dict(probs=dev(np.array([0.5, 1.5])), target=dev(np.array([0.0, 1.0]))))
    with pytest.raises(ValueError, match="var"):
        dcall("gaussian_nll_loss", dict(input=dx, target=dx, var=dev(-np.ones((2, 3)))))


@pytest.mark.parametrize("dt", DTYPES)
def test_device_elementwise(dt):
    rng = np.random.default_rng(10)
    z = rng.standard_normal((3, 4)).astype(dt)
    y = rng.random((3, 4)).astype(dt)
    w = rng.random(4).astype(dt)
    pw = rng.random(4).astype(dt)
    go = rng.random((3, 4)).astype(dt)
    # bce_with_logits, weight/pos_weight broadcast along the last axis, reduction none + grad_output
    lv, g = dcall("binary_cross_entropy_with_logits", dict(
        logits=dev(z), target=dev(y), weight=dev(w), pos_weight=dev(pw), reduction="none",
        return_grad=True, grad_output=dev(go)))
    la, ga = np.empty_like(z), np.empty_like(z)
    bw, bp = np.broadcast_to(w, z.shape), np.broadcast_to(pw, z.shape)
    R.bce_with_logits(z, y, bw, bp, la, ga, 1.0, go)
    close(host(lv), la, dt)
    close(host(g), ga, dt)
    # bce mean with scalar grad_output
    p = rng.random((3, 4)).astype(dt)
    lv, g = dcall("binary_cross_entropy", dict(probs=dev(p), target=dev(y), return_grad=True, grad_output=2.0))
    s = R.bce(p, y, None, None, ga, 2.0 / 12, None)
    close(lv, s / 12, dt)
    close(host(g), ga, dt)
    # kl_div batchmean, log_target
    t = np.log(y)
    lv, g = dcall("kl_div", dict(input=dev(z), target=dev(t), log_target=True, return_grad=True))
    s = R.kl_div(z, t, True, None, ga, 1.0 / 3, None)
    close(lv, s / 3, dt)
    close(host(g), ga, dt)
    # mse sum with a transposed (non-contiguous) device view, result into grad_out
    dz = dev(z.T.copy()).T
    gout = cuda.device_array((3, 4), dt)
    lv, g = dcall("mse_loss", dict(input=dz, target=dev(y), reduction="sum", return_grad=True, grad_out=gout))
    assert g is gout
    close(lv, ((z - y) ** 2).sum(), dt)
    close(host(gout), 2 * (z - y), dt)


@pytest.mark.parametrize("var_shape", [(3, 4), (3,), (3, 1), "float"])
def test_device_gaussian_nll(var_shape):
    rng = np.random.default_rng(11)
    x, t = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    if var_shape == "float":
        var, full_var = 0.7, np.full((3, 4), 0.7)
    else:
        var = rng.random(var_shape) + 0.1
        full_var = np.broadcast_to(var[:, None] if var.ndim == 1 else var, (3, 4))
    lv, (gx, gv) = dcall("gaussian_nll_loss", dict(
        input=dev(x), target=dev(t), var=var if var_shape == "float" else dev(var), full=True, eps=1e-6,
        reduction="mean", return_grad=True))
    gxa, gva = np.empty_like(x), np.empty_like(x)
    s = R.gaussian_nll(x, t, np.ascontiguousarray(full_var), True, 1e-6, None, gxa, gva, 1 / 12, None)
    close(lv, s / 12, np.float64)
    close(host(gx), gxa, np.float64)
    if var_shape == "float":  # a NumPy scalar: the sum of the full-size gradient, as on the host
        assert isinstance(gv, np.float64)
        close(gv, gva.sum(), np.float64)
    else:
        assert gv.shape == var.shape
        close(host(gv), gva.sum(axis=1).reshape(var.shape) if var.shape != (3, 4) else gva, np.float64)


def test_device_float16_computed_in_float32():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((3, 5)).astype(np.float16)
    t = np.array([1, 0, 4])
    lv, g = dcall("cross_entropy", dict(logits=dev(x), target=dev(t), return_grad=True))
    assert isinstance(lv, np.float32)
    assert g.dtype == np.float16
    el, eg = ref_ce(x.astype(np.float32), t)
    np.testing.assert_allclose(lv, el, rtol=1e-6)
    np.testing.assert_allclose(host(g).astype(np.float32), eg, atol=1e-3)
    sm = dcall("softmax", dict(x=dev(x)))
    assert sm.dtype == np.float16
    dx = dev(x)
    lv2, g2 = dcall("cross_entropy", dict(logits=dx, target=t, return_grad=True, grad_out=dx))
    assert g2 is dx
    np.testing.assert_array_equal(host(dx), host(g))


# ----------------------------------------------------------------------------- host/device agreement
# Every public function, called through the public API (fastloss._api) once with NumPy arrays
# on backend="numpy" and once with the same data as Numba device arrays (the same public code
# with the CUDA backend's device adaptor): same values (within the SPEC's tolerances), dtypes, result types
# (NumPy scalar of the compute dtype vs device array), the same ``grad_out`` object back, and
# the same exception type and message.
import re  # noqa: E402

from fastloss import _dispatch  # noqa: E402

SAME = "same-as-first"  # grad_out / out = the first argument itself (in place)
_r = np.random.default_rng(20)


def _a(shape, dt=np.float64, lo=None, hi=None):
    a = _r.standard_normal(shape) if lo is None else _r.uniform(lo, hi, shape)
    return a.astype(dt)


_X = _a((3, 5))
_T = np.array([0, 4, 2])
def _agreement_cases():
    c = []

    def case(id, fn, marks=(), **kw):
        c.append(pytest.param(fn, kw, id=id, marks=marks))

    for dt in (np.float32, np.float64, np.float16, BF16):
        n = np.dtype(dt).name
        case(f"lse-{n}", "logsumexp", x=_a((3, 5), dt))
        case(f"lse-1d-scalar-{n}", "logsumexp", x=_a((5,), dt))
        case(f"softmax-{n}", "softmax", x=_a((3, 5), dt))
        case(f"ce-{n}", "cross_entropy", logits=_a((3, 5), dt), target=_T, return_grad=True)
        case(f"ce-none-{n}", "cross_entropy", logits=_a((3, 5), dt), target=_T, reduction="none")
        case(f"bcel-{n}", "binary_cross_entropy_with_logits", logits=_a((3, 4), dt), target=_a((3, 4), dt, 0, 1),
             return_grad=True)
        case(f"gnll-float-var-{n}", "gaussian_nll_loss", input=_a((3, 4), dt), target=_a((3, 4), dt), var=0.5,
             return_grad=True)
    case("lse-axis0-keepdims", "logsumexp", x=_a((3, 4, 2)), axis=0, keepdims=True)
    case("lse-axis-tuple", "logsumexp", x=_a((3, 4, 2)), axis=(0, 2))
    case("lse-axis-none", "logsumexp", x=_a((3, 4)), axis=None)
    case("lse-empty-axis", "logsumexp", x=np.zeros((3, 0)))
    case("lse-empty-rows", "logsumexp", x=np.zeros((0, 3)))
    case("lse-inf-nan", "logsumexp", x=np.array([[1.0, np.inf], [-np.inf, -np.inf], [np.nan, 1.0]]))
    case("log_softmax-axis0", "log_softmax", x=_a((3, 4)), axis=0)
    case("softmax-out", "softmax", x=_a((3, 4)), out=np.zeros((3, 4)))
    case("softmax-in-place", "softmax", x=_a((3, 4)), out=SAME)
    case("softmax-f16-out", "softmax", x=_a((3, 4), np.float16), out=np.zeros((3, 4), np.float16))
    case("softmax_backward-axis0", "softmax_backward", grad=_a((3, 4)), y=_a((3, 4), np.float64, 0, 1), axis=0)
    case("log_softmax_backward-f32", "log_softmax_backward", grad=_a((3, 4), np.float32), y=_a((3, 4), np.float32))
    case("ce-weight-ignore-smooth-z", "cross_entropy", logits=_a((4, 5)), target=np.array([0, -100, 4, 1]),
         weight=_a((5,), np.float64, 0.1, 2), label_smoothing=0.1, z_loss=1e-3, return_grad=True)
    case("ce-sum-grad_output", "cross_entropy", logits=_a((4, 5)), target=np.array([0, 3, 4, 1]), reduction="sum",
         return_grad=True, grad_output=2.0)
    case("ce-none-grad_output-rows", "cross_entropy", logits=_a((4, 5), np.float32), target=np.array([0, 3, -100, 1]),
         reduction="none", return_grad=True, grad_output=_a((4,), np.float32))
    case("ce-all-ignored", "cross_entropy", logits=_a((3, 5)), target=np.full(3, -100), return_grad=True)
    case("ce-ignored-row-inf", "cross_entropy", logits=np.array([[np.inf, np.nan, 0.0], [0.0, 1.0, 2.0]]),
         target=np.array([-100, 2]), return_grad=True)
    case("ce-axis1-3d", "cross_entropy", logits=_a((2, 5, 3)),
         target=np.array([[0, 1, 4], [2, 3, 0]]), axis=1, return_grad=True)
    case("ce-axis0-2d", "cross_entropy", logits=_a((5, 3)), target=np.array([0, 1, 4]), axis=0, return_grad=True)
    case("ce-soft-weight-smooth", "cross_entropy", logits=_a((3, 5)), target=_a((3, 5), np.float64, 0, 1),
         weight=_a((5,), np.float64, 0.1, 2), label_smoothing=0.2, return_grad=True)
    case("ce-in-place", "cross_entropy", logits=_a((3, 5), np.float32), target=_T, return_grad=True, grad_out=SAME)
    case("ce-in-place-f16", "cross_entropy", logits=_a((3, 5), np.float16), target=_T, return_grad=True,
         grad_out=SAME)
    case("ce-grad_out", "cross_entropy", logits=_a((3, 5)), target=_T, return_grad=True, grad_out=np.zeros((3, 5)))
    case("ce-masked-target", "cross_entropy", logits=np.array([[-np.inf, 0.0, 1.0], [0.0, 1.0, 2.0]]),
         target=np.array([0, 1]), return_grad=True)
    case("bcel-weight-pos_weight-none", "binary_cross_entropy_with_logits", logits=_a((3, 4)),
         target=_a((3, 4), np.float64, 0, 1), weight=_a((4,), np.float64, 0, 1), pos_weight=_a((4,), np.float64, 0.5, 2),
         reduction="none", return_grad=True, grad_output=_a((3, 4)))
    case("bce-weight-col", "binary_cross_entropy", probs=_a((3, 4), np.float64, 0, 1), target=_a((3, 4), np.float64, 0, 1),
         weight=_a((3, 1)), return_grad=True)
    case("bce-edges", "binary_cross_entropy", probs=np.array([0.0, 1.0, 0.5]), target=np.array([1.0, 0.0, 0.5]),
         reduction="sum", return_grad=True)
    for red in ("batchmean", "mean", "sum", "none"):
        case(f"kl-{red}", "kl_div", input=np.log(_a((3, 4), np.float64, 0.1, 1)), target=_a((3, 4), np.float64, 0, 1),
             reduction=red, return_grad=True)
    with np.errstate(divide="ignore"):
        lt = np.log(np.array([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]))
    case("kl-log_target-zero-mass", "kl_div", input=_a((2, 3)), target=lt, log_target=True, return_grad=True)
    case("kl-target-broadcast-f32", "kl_div", input=_a((3, 4), np.float32), target=_a((4,), np.float32, 0, 1),
         return_grad=True)
    case("mse-fortran", "mse_loss", input=np.asfortranarray(_a((3, 4))), target=_a((3, 4)), reduction="sum",
         return_grad=True)
    case("mse-in-place-target-bcast", "mse_loss", input=_a((3, 4)), target=_a((4,)), return_grad=True, grad_out=SAME)
    case("mse-empty", "mse_loss", input=np.zeros((0, 3)), target=np.zeros((0, 3)), return_grad=True)
    case("mse-0d-grad_output", "mse_loss", input=_a((3, 4)), target=_a((3, 4)), return_grad=True,
         grad_output=np.array(3.0))
    case("gnll-var-per-row-full", "gaussian_nll_loss", input=_a((3, 4)), target=_a((3, 4)),
         var=_a((3,), np.float64, 0.1, 2), full=True, return_grad=True)
    case("gnll-var-col-none-f32", "gaussian_nll_loss", input=_a((3, 4), np.float32), target=_a((3, 4), np.float32),
         var=_a((1, 4), np.float32, 0.1, 2), reduction="none", return_grad=True)
    case("gnll-var-clamped-eps", "gaussian_nll_loss", input=_a((3, 4)), target=_a((3, 4)),
         var=_a((3, 4), np.float64, 0, 0.3), eps=0.1, reduction="sum", return_grad=True)
    # bfloat16 (torch.bfloat16 on a GPU): every operand kind, outputs, in place, range checks
    case("softmax-bf16-out", "softmax", x=_a((3, 4), BF16), out=np.zeros((3, 4), BF16))
    case("log_softmax-bf16-in-place-axis0", "log_softmax", x=_a((3, 4), BF16), axis=0, out=SAME)
    case("softmax_backward-bf16", "softmax_backward", grad=_a((3, 4), BF16), y=_a((3, 4), BF16, 0, 1))
    case("ce-bf16-in-place-weight", "cross_entropy", logits=_a((3, 5), BF16), target=_T,
         weight=_a((5,), BF16, 0.1, 2), return_grad=True, grad_out=SAME)
    case("ce-bf16-soft-target", "cross_entropy", logits=_a((3, 5), BF16), target=_a((3, 5), BF16, 0, 1),
         label_smoothing=0.1, return_grad=True)
    case("ce-bf16-none-grad_output", "cross_entropy", logits=_a((4, 5), BF16), target=np.array([0, 3, -100, 1]),
         reduction="none", return_grad=True, grad_output=_a((4,), BF16))
    case("ce-bf16-grad_out", "cross_entropy", logits=_a((3, 5), BF16), target=_T, return_grad=True,
         grad_out=np.zeros((3, 5), BF16))
    case("bce-bf16-probs", "binary_cross_entropy", probs=_a((3, 4), BF16, 0, 1), target=_a((3, 4), BF16, 0, 1),
         reduction="none", return_grad=True)
    case("kl-bf16-f32-target", "kl_div", input=_a((3, 4), BF16), target=_a((3, 4), np.float32, 0, 1),
         return_grad=True)
    case("mse-bf16-fortran-grad_out", "mse_loss", input=np.asfortranarray(_a((3, 4), BF16)), target=_a((3, 4), BF16),
         return_grad=True, grad_out=np.zeros((3, 4), BF16))
    case("gnll-var-bf16-per-row", "gaussian_nll_loss", input=_a((3, 4), np.float32), target=_a((3, 4), np.float32),
         var=_a((3,), BF16, 0.1, 1), return_grad=True)
    case("lse-bf16-specials", "logsumexp", x=np.array([[1e30, 1e30], [np.inf, 1.0], [-np.inf, -np.inf],
                                                        [np.nan, 0.0]], BF16))
    case("E-bce-range-bf16", "binary_cross_entropy", probs=np.array([[0.5, 1.5]], BF16), target=np.ones((1, 2), BF16))
    case("E-ce-grad_out-dtype-bf16", "cross_entropy", logits=_a((3, 5), BF16), target=_T, return_grad=True,
         grad_out=np.zeros((3, 5), np.float32))
    case("E-gnll-negative-var-bf16", "gaussian_nll_loss", input=_X, target=_X, var=-np.ones((3, 5), BF16))
    case("gnll-var-f16", "gaussian_nll_loss", input=_a((3, 4), np.float32), target=_a((3, 4), np.float32),
         var=_a((3, 4), np.float16, 0.1, 1), return_grad=True)
    # errors: same type, same message
    X, T = _X, _T
    case("E-lse-int", "logsumexp", x=np.ones((3, 4), np.int64))
    case("E-lse-axis", "logsumexp", x=X, axis=5)
    case("E-lse-axis-float", "logsumexp", x=X, axis=1.0)
    case("E-lse-axis-dup", "logsumexp", x=X, axis=(0, 0))
    case("E-softmax-0d", "softmax", x=np.array(1.0))
    case("E-softmax-out-shape", "softmax", x=X, out=np.zeros((5, 3)))
    case("E-softmax-bool", "softmax", x=np.ones((2, 2), bool))
    case("E-smb-shape", "softmax_backward", grad=np.ones((3, 4)), y=X)
    case("E-smb-grad-int", "softmax_backward", grad=np.ones((3, 5), np.int32), y=X)
    case("E-lsmb-y-complex", "log_softmax_backward", grad=X, y=X.astype(np.complex128))
    case("E-ce-index", "cross_entropy", logits=X, target=np.array([0, 5, 1]))
    case("E-ce-index-neg-in-place", "cross_entropy", logits=X, target=np.array([0, 1, -3]), return_grad=True,
         grad_out=SAME)
    case("E-ce-target-shape", "cross_entropy", logits=X, target=np.array([0, 1]))
    case("E-ce-target-float-shape", "cross_entropy", logits=X, target=T.astype(np.float64))
    case("E-ce-target-bool", "cross_entropy", logits=X, target=np.array([True, False, True]))
    case("E-ce-weight-shape", "cross_entropy", logits=X, target=T, weight=np.ones(4))
    case("E-ce-weight-int", "cross_entropy", logits=X, target=T, weight=np.ones(5, np.int64))
    case("E-ce-reduction", "cross_entropy", logits=X, target=T, reduction="avg")
    case("E-ce-label_smoothing", "cross_entropy", logits=X, target=T, label_smoothing=1.5)
    case("E-ce-z_loss", "cross_entropy", logits=X, target=T, z_loss=-1.0)
    case("E-ce-ignore_index", "cross_entropy", logits=X, target=T, ignore_index=1.5)
    case("E-ce-no-class", "cross_entropy", logits=np.zeros((3, 0)), target=T)
    case("E-ce-grad_out-without-return_grad", "cross_entropy", logits=X, target=T, grad_out=np.zeros((3, 5)))
    case("E-ce-grad_out-dtype", "cross_entropy", logits=X, target=T, return_grad=True,
         grad_out=np.zeros((3, 5), np.float32))
    case("E-ce-grad_output-array-mean", "cross_entropy", logits=X, target=T, return_grad=True, grad_output=np.ones(3))
    case("E-ce-grad_output-shape-none", "cross_entropy", logits=X, target=T, reduction="none", return_grad=True,
         grad_output=np.ones(5))
    case("E-bcel-target-shape", "binary_cross_entropy_with_logits", logits=X, target=np.ones((3, 4)))
    case("E-bcel-pos_weight-shape", "binary_cross_entropy_with_logits", logits=X, target=X, pos_weight=np.ones(3))
    case("E-bcel-weight-shape", "binary_cross_entropy_with_logits", logits=X, target=X, weight=np.ones((2, 5)))
    case("E-bce-range", "binary_cross_entropy", probs=np.array([[0.5, 1.5], [-0.1, 0.2]]), target=np.ones((2, 2)))
    case("E-kl-reduction", "kl_div", input=X, target=X, reduction="avg")
    case("E-mse-target-enlarges", "mse_loss", input=np.ones(3), target=np.ones((2, 3)))
    case("E-mse-grad_output-shape", "mse_loss", input=X, target=X, reduction="none", return_grad=True,
         grad_output=np.ones((3, 4)))
    case("E-gnll-negative-var", "gaussian_nll_loss", input=X, target=X,
         var=np.array([[1.0] * 5, [1.0, -2.0, 1, 1, 1], [1.0] * 5]))
    case("E-gnll-var-shape", "gaussian_nll_loss", input=X, target=X, var=np.ones((2, 5)))
    case("E-gnll-eps", "gaussian_nll_loss", input=X, target=X, var=1.0, eps=-1.0)
    case("E-gnll-reduction", "gaussian_nll_loss", input=X, target=X, var=1.0, reduction="batchmean")
    return c


@pytest.fixture
def routes_device_arrays(monkeypatch):
    """Under the simulator, Numba "device" arrays have no ``__cuda_array_interface__`` (they
    flag themselves with ``__cuda_ndarray__``); make the public layer route them to the
    device path when fastloss._dispatch does not recognize them itself."""
    probe = cuda.to_device(np.zeros(1))
    if not _dispatch.is_device_array(probe):
        monkeypatch.setattr(_dispatch, "is_device_array", A.is_device_array)


def _resolve_same(kw):
    first = next(iter(kw))
    return {k: kw[first] if isinstance(v, str) and v == SAME else v for k, v in kw.items()}


def _norm_msg(msg):
    # the only intended difference: the kind of array an out=/grad_out= must be
    msg = re.sub(r"numpy\.ndarray|device array", "ARRAY", msg)
    return re.sub(r"\b(ndarray|FakeCUDAArray|DeviceNDArray)\b", "TYPE", msg)


def _call(fn, kw):
    try:
        return getattr(fl, fn)(**kw), None
    except Exception as exc:  # compared below
        return None, exc


def _agree(h, d, path="result"):
    if isinstance(h, tuple):
        assert isinstance(d, tuple) and len(d) == len(h), f"{path}: {type(d)}"
        for k, (a, b) in enumerate(zip(h, d)):
            _agree(a, b, f"{path}[{k}]")
        return
    if isinstance(h, np.generic):
        assert type(d) is type(h), f"{path}: host {type(h).__name__}, device {type(d).__name__}"
        dv = d
    else:
        assert isinstance(h, np.ndarray), f"{path}: unexpected host result {type(h)}"
        assert hasattr(d, "copy_to_host"), f"{path}: expected a device array, found {type(d)}"
        assert (tuple(d.shape), np.dtype(d.dtype)) == (h.shape, h.dtype), f"{path}: {d.shape} {d.dtype} vs {h.shape} {h.dtype}"
        dv = d.copy_to_host()
    dt = np.asarray(h).dtype
    # float16/bfloat16 outputs: computed in float32 on both paths, so they agree to one
    # rounding of the output dtype (bfloat16 keeps 8 bits: 2^-8 = 3.9e-3 relative)
    tol = {np.dtype(np.float64): (1e-12, 1e-13), np.dtype(np.float32): (2e-6, 1e-6), BF16: (8e-3, 8e-3)}.get(
        dt, (2e-3, 2e-3))
    np.testing.assert_allclose(np.asarray(dv, np.float64), np.asarray(h, np.float64), rtol=tol[0], atol=tol[1],
                               equal_nan=True, err_msg=path)


def _assert_same(a, b, name):
    """Unchanged input: equal values, NaN where NaN (bfloat16 compared on its bits, since
    NumPy's NaN-aware equality does not know the ml_dtypes type)."""
    if a.dtype == BF16:
        a, b = a.view(np.uint16), b.view(np.uint16)
    np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("fn,kw", _agreement_cases())
def test_host_device_agreement(routes_device_arrays, fn, kw):
    hkw = _resolve_same({k: v.copy() if isinstance(v, np.ndarray) else v for k, v in kw.items()})
    dkw = _resolve_same({k: cuda.to_device(v) if isinstance(v, np.ndarray) and (v.dtype.kind in "biuf" or v.dtype == BF16)
                         else v
                         for k, v in kw.items()})
    before = {k: v.copy_to_host() for k, v in dkw.items() if hasattr(v, "copy_to_host")}
    hr, he = _call(fn, dict(hkw, backend="numpy"))
    dr, de = _call(fn, dkw)
    if he is not None or de is not None:
        assert type(de) is type(he), f"host raised {he!r}, device raised {de!r}"
        assert _norm_msg(str(de)) == _norm_msg(str(he))
        for k, v in before.items():  # nothing written when a call raises (in place included)
            _assert_same(dkw[k].copy_to_host(), v, k)
        return
    _agree(hr, dr)
    for name in ("out", "grad_out"):
        if dkw.get(name) is not None:  # the given output object comes back
            res = dr[1] if isinstance(dr, tuple) else dr
            assert res is dkw[name], name
    in_place = any(isinstance(v, str) and v == SAME for v in kw.values())
    outs = {"out", "grad_out"} | ({next(iter(dkw))} if in_place else set())
    for k, v in before.items():  # inputs untouched
        if k not in outs:
            _assert_same(dkw[k].copy_to_host(), v, k)


def test_device_only_errors(routes_device_arrays):
    dx = dev(_X)
    # a host grad_out for device data would be silently left unwritten: refused
    with pytest.raises(ValueError, match="grad_out: expected a device array"):
        fl.cross_entropy(dx, _T, return_grad=True, grad_out=np.zeros((3, 5)))
    # an output partly overlapping an input is refused before anything is written
    big = dev(np.zeros((4, 5)))
    with pytest.raises(ValueError, match="partly overlapping logits"):
        fl.cross_entropy(big[:3], _T, return_grad=True, grad_out=big[1:])
    with pytest.raises(ValueError, match="partly overlapping x"):
        fl.softmax(big[:3], out=big[1:])
    # a negative float var (SPEC: ValueError); the host path does not check it yet
    with pytest.raises(ValueError, match="var: expected a non-negative"):
        fl.gaussian_nll_loss(dx, dx, -1.0)


def test_device_strided_and_mixed_operands(routes_device_arrays):
    """Strided device views and host operands mixed with device data give the host values."""
    x = _a((4, 6))
    dxs = dev(x)[:, ::2]  # a strided view: the class axis is not contiguous
    t3 = np.array([1, 2, 0, 1])
    l_d, g_d = fl.cross_entropy(dxs, t3, return_grad=True)  # the target stays a NumPy array
    l_h, g_h = fl.cross_entropy(x[:, ::2], t3, return_grad=True, backend="numpy")
    _agree((l_h, g_h), (l_d, g_d))
    y = _a((4, 6), np.float32)
    l_d, g_d = fl.mse_loss(dev(y).T, y.T[::-1].copy(), return_grad=True, reduction="none")
    l_h, g_h = fl.mse_loss(y.T, y.T[::-1].copy(), return_grad=True, reduction="none", backend="numpy")
    _agree((l_h, g_h), (l_d, g_d))


# ----------------------------------------------------------------------------- class-sharded cross-entropy
def _capped_lse(x, cap=None):
    """The global row lse of the (capped) logits, in float64 (NumPy, not fastloss)."""
    xc = np.asarray(x, np.float64)
    if cap is not None:
        xc = cap * np.tanh(xc / cap)
    m = xc.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(xc - m).sum(axis=-1, keepdims=True)))[..., 0]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_device_sharded_cross_entropy_adds_up(routes_device_arrays, dt, reduction):
    """Class-sharded cross-entropy on Numba device arrays through the public API (``lse``,
    ``class_offset``, ``num_classes``): every shard -- a one-class first shard, a middle and
    a last one -- equals the NumPy backend's shard, the shards' losses add up to the NumPy
    backend's unsharded loss, and their gradients, side by side, are its gradient; with
    weights, an ignored row, smoothing, z-loss, a cap, 3-D logits and a per-row grad_output."""
    rng = np.random.default_rng(22)
    x = (rng.standard_normal((2, 3, 7)) * 3).astype(dt)
    t = np.array([[0, 6, -100], [3, 4, 2]])  # targets in the first, last and middle shards
    w = (rng.random(7) + 0.5).astype(dt)
    cap = 4.0
    lse = _capped_lse(x, cap)
    gout = rng.random((2, 3)) if reduction == "none" else 0.5
    kw = dict(weight=w, ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, softcap=cap, reduction=reduction,
              grad_output=gout)
    want_l, want_g = fl.cross_entropy(x, t, return_grad=True, backend="numpy", **kw)
    shares, grads = [], []
    for a, b in ((0, 1), (1, 4), (4, 7)):
        xs = np.ascontiguousarray(x[..., a:b])
        shard = dict(kw, lse=lse, class_offset=a, num_classes=7)
        ref_l, ref_g = fl.cross_entropy(xs, t, return_grad=True, backend="numpy", **shard)
        dkw = dict(shard, weight=dev(w), lse=dev(lse), grad_output=dev(gout) if reduction == "none" else gout)
        got_l, got_g, got_lse = fl.cross_entropy(dev(xs), dev(t), return_grad=True, return_lse=True, **dkw)
        # a share (a difference of lse-sized terms) and the lse come back in float64
        if reduction == "none":
            assert hasattr(got_l, "copy_to_host") and got_l.shape == (2, 3) and got_l.dtype == np.float64
        else:
            assert isinstance(got_l, np.float64)
        assert got_g.shape == xs.shape and got_g.dtype == dt
        assert host(got_lse).dtype == np.float64
        close(host(got_l), ref_l, dt)
        close(host(got_g), ref_g, dt)
        np.testing.assert_array_equal(host(got_lse), lse)  # the given lse, as it was given
        assert not host(got_g)[0, 2].any()  # the ignored row: exact zeros
        shares.append(np.asarray(host(got_l), np.float64))
        grads.append(host(got_g))
    # the shares of float32 logits are float64 sums of float32-accurate terms: their sum is
    # exact to the compute dtype's tolerance of the shares' magnitudes
    mag = sum(np.abs(s) for s in shares)
    np.testing.assert_allclose(sum(shares), np.asarray(want_l, np.float64), rtol=0,
                               atol=TOL[dt]["rtol"] * float(np.max(mag)) + TOL[dt]["atol"])
    close(np.concatenate(grads, axis=-1), want_g, dt)


def test_device_sharded_cross_entropy_operand_forms(routes_device_arrays):
    """The sharded call's other operand forms on the device path, each against the NumPy
    backend given the same values: a float32 device ``lse`` for float64 logits (cast on the
    device), a host ``lse`` with device logits, a broadcast ``(1,)`` lse, the gradient in place
    over the logits, loss only (no smoothing: the target-logit gather), the class axis 0 and
    ``num_classes`` defaulted on the first shard."""
    rng = np.random.default_rng(23)
    x = rng.standard_normal((4, 9))
    t = np.array([8, 2, -100, 5])
    lse = _capped_lse(x)
    lse32 = lse.astype(np.float32)
    xs = np.ascontiguousarray(x[:, 3:9])
    # float32 device lse (the kernel sees its float64 cast) and loss + gradient
    ref = fl.cross_entropy(xs, t, lse=lse32, class_offset=3, num_classes=9, label_smoothing=0.2,
                           return_grad=True, backend="numpy")
    got = fl.cross_entropy(dev(xs), dev(t), lse=dev(lse32), class_offset=3, num_classes=9, label_smoothing=0.2,
                           return_grad=True)
    _agree(ref, got)
    # a host lse with device logits; the gradient in place over the logits
    dx = dev(xs)
    ref = fl.cross_entropy(xs, t, lse=lse, class_offset=3, num_classes=9, z_loss=1e-2, return_grad=True,
                           backend="numpy")
    got = fl.cross_entropy(dx, t, lse=lse, class_offset=3, num_classes=9, z_loss=1e-2, return_grad=True,
                           grad_out=dx)
    assert got[1] is dx
    _agree(ref, got)
    # a (1,) lse broadcast over the rows, loss only without smoothing, reduction="none"
    one = np.array([2.5])
    ref = fl.cross_entropy(xs, t, lse=one, class_offset=3, num_classes=9, reduction="none", backend="numpy")
    got = fl.cross_entropy(dev(xs), dev(t), lse=dev(one), class_offset=3, num_classes=9, reduction="none")
    _agree(ref, got)
    # the class axis 0, the first shard with num_classes defaulted to its own C
    xt = np.ascontiguousarray(x[:, :5].T)  # (5 classes, 4 rows)
    t5 = np.array([4, 2, -100, 0])
    l5 = _capped_lse(x[:, :5])
    ref = fl.cross_entropy(xt, t5, axis=0, lse=l5, label_smoothing=0.1, return_grad=True, backend="numpy")
    got = fl.cross_entropy(dev(xt), dev(t5), axis=0, lse=dev(l5), label_smoothing=0.1, return_grad=True)
    _agree(ref, got)
    # and that is the unsharded loss (one shard holding every class)
    _agree(fl.cross_entropy(xt, t5, axis=0, label_smoothing=0.1, return_grad=True, backend="numpy"), got)


# ----------------------------------------------------------------------------- streams / other libraries
def test_stream_of_numba_array_is_used(monkeypatch):
    s = cuda.stream()
    d = cuda.to_device(np.zeros((2, 3)), stream=s)
    d = d.bind(s) if hasattr(d, "bind") else d
    ctx = A.DeviceArrays(d, C.OnStream)
    assert ctx.stream is s
    assert A.DeviceArrays(cuda.to_device(np.zeros(2)), C.OnStream).stream is not None


def test_cupy_like_caller_stream_and_result_type(monkeypatch):
    """A stand-in CuPy module: the kernels must run on CuPy's current stream (wrapped with
    cuda.external_stream) and the result must come back through cupy.asarray."""
    seen = {}
    marker = cuda.stream()

    def external_stream(ptr):
        seen["ptr"] = ptr
        return marker

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(get_current_stream=lambda: types.SimpleNamespace(ptr=1234))
    fake.asarray = lambda d: ("cupy", d)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(C.cuda, "external_stream", external_stream)
    FakeArr = type(cuda.to_device(np.zeros(1)))
    CupyArr = type("ndarray", (FakeArr,), {"__module__": "cupy"})
    x = np.random.default_rng(13).standard_normal((2, 3))
    a = CupyArr(np.array(x))
    lib, res = dcall("softmax", dict(x=a, axis=-1))
    assert lib == "cupy" and seen["ptr"] == 1234
    e = np.exp(x)
    close(host(res), e / e.sum(1, keepdims=True), np.float64)


def test_cupy_real():
    cp = pytest.importorskip("cupy")
    if SIM:
        pytest.skip("CuPy arrays need a real GPU")
    x = cp.asarray(np.random.default_rng(14).standard_normal((4, 6)).astype(np.float32))
    r = dcall("logsumexp", dict(x=x, axis=-1, keepdims=False))
    assert isinstance(r, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(r), np.log(np.exp(cp.asnumpy(x)).sum(1)), rtol=2e-6)


def test_torch_real():
    torch = pytest.importorskip("torch")
    if SIM or not torch.cuda.is_available():
        pytest.skip("torch CUDA tensors need a real GPU")
    x = torch.randn(8, 10, device="cuda", requires_grad=True)
    t = torch.randint(0, 10, (8,), device="cuda")
    lv, g = dcall("cross_entropy", dict(logits=x, target=t, return_grad=True))
    assert isinstance(g, torch.Tensor) and g.device == x.device
    ref = torch.nn.functional.cross_entropy(x, t)
    ref.backward()
    np.testing.assert_allclose(lv, ref.item(), rtol=2e-6)
    torch.testing.assert_close(g, x.grad, atol=1e-6, rtol=1e-5)


@gpu
@needs_gpu
def test_gpu_large_rows_match_numpy():
    rng = np.random.default_rng(15)
    x = rng.standard_normal((64, 262_144)).astype(np.float32)
    t = rng.integers(0, x.shape[1], 64)
    la, lb = np.empty(64), np.empty(64)
    ga, gb = np.empty_like(x), np.empty_like(x)
    gs = np.full(64, 1 / 64)
    R.cross_entropy(x, t, None, -100, 0.0, 0.0, 0.0, la, None, ga, gs)
    C.cross_entropy(x, t, None, -100, 0.0, 0.0, 0.0, lb, None, gb, gs)
    np.testing.assert_allclose(la, lb, rtol=2e-6)
    np.testing.assert_allclose(ga * 64, gb * 64, atol=1e-6)


@pytest.mark.skipif(not SIM, reason="the dry run of the GPU script needs the CUDA simulator")
def test_gpu_check_script_dry_run_under_the_simulator():
    """bench/gpu_check.py runs end to end (tiny shapes) and every one of its checks passes, so
    the script a GPU session relies on cannot rot unseen between GPU sessions."""
    import re
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, os.path.join(root, "bench", "gpu_check.py"), "--sim"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = re.search(r"verification: (\d+)/(\d+) passed", r.stdout)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) >= 40, r.stdout[-3000:]
    for kernel in ("cross_entropy fwd+grad", "logsumexp", "bce_with_logits fwd+grad"):
        assert kernel in r.stdout
    # without the simulator flag --sim refuses instead of timing the simulator as a GPU
    r2 = subprocess.run([sys.executable, os.path.join(root, "bench", "gpu_check.py")],
                        cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r2.returncode == 2 and "--sim" in r2.stdout


# ----------------------------------------------------------------------------- bfloat16 conversions
def _bf16_device(bits_u16):
    """A bfloat16 device array (the backend's wrapper) holding the given bit patterns."""
    return D._BF16(cuda.to_device(np.asarray(bits_u16, np.uint16).view(np.int16)))


def test_bf16_widening_is_exact_for_every_bit_pattern():
    """All 65,536 bfloat16 values (zeros, subnormals, infinities, every NaN) widen to the
    float32 whose high half they are: bit for bit what ml_dtypes gives."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = cuda.device_array(bits.shape, np.float32)
    D._copy(_bf16_device(bits), out, cuda.default_stream())
    expect = bits.view(BF16).astype(np.float32)
    np.testing.assert_array_equal(out.copy_to_host().view(np.uint32), expect.view(np.uint32))


def test_bf16_narrowing_rounds_to_nearest_even():
    """float32 -> bfloat16 against ml_dtypes: exact values, exact ties (both parities), one
    ulp either side of ties, values that round up into the next binade or to infinity,
    subnormals, random bit patterns; NaNs stay NaN with their sign (quiet)."""
    rng = np.random.default_rng(40)
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    w = np.concatenate([
        hi, hi | 0x8000, hi | 0x7FFF, hi | 0x8001,
        np.array([0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x00000001, 0x80008000, 0x007FFFFF,
                  0x7F800001, 0xFF800001, 0x7FC00000, 0x7FFFFFFF], np.uint32),
        rng.integers(0, 1 << 32, 50_000, dtype=np.uint64).astype(np.uint32),
    ])
    src = cuda.to_device(w.view(np.float32))
    dst = D._empty(w.shape, BF16, cuda.default_stream())
    D._copy(src, dst, cuda.default_stream())
    got = dst.copy_to_host()
    with np.errstate(over="ignore", invalid="ignore"):
        expect = w.view(np.float32).astype(BF16)
    nan = np.isnan(w.view(np.float32))
    assert np.isnan(got[nan].astype(np.float32)).all()
    gb = got.view(np.uint16)
    np.testing.assert_array_equal(gb[nan] >> 15, (w[nan] >> 31).astype(np.uint16))  # sign kept
    assert ((gb[nan] & 0x40) != 0).all()  # quiet
    np.testing.assert_array_equal(gb[~nan], expect[~nan].view(np.uint16))


def test_bf16_strided_copies_and_other_dtypes():
    """Copies from and to bfloat16 views with any strides, through float64 and float16 too."""
    x = np.random.default_rng(41).standard_normal((5, 6)).astype(np.float32).astype(BF16)
    s = cuda.default_stream()
    dx = D._BF16(cuda.to_device(x.view(np.int16)))
    tview = D._view(dx, (6, 3), (2, 24))  # every other row, transposed
    for dt in (np.float64, np.float16, np.float32):
        out = cuda.device_array((6, 3), dt)
        D._copy(tview, out, s)
        np.testing.assert_array_equal(out.copy_to_host(), x[::2].T.astype(dt))
    back = D._empty((6, 3), BF16, s)
    D._copy(cuda.to_device(x[::2].T.astype(np.float64)), back, s)
    np.testing.assert_array_equal(back.copy_to_host().view(np.uint16), x[::2].T.copy().view(np.uint16))
    both = D._empty((6, 3), BF16, s)
    D._copy(tview, both, s)
    np.testing.assert_array_equal(both.copy_to_host().view(np.uint16), x[::2].T.copy().view(np.uint16))


def test_bf16_needs_ml_dtypes_message(monkeypatch):
    monkeypatch.setattr(A.V, "_BF16", None)
    with pytest.raises(TypeError, match=r"logits: torch\.bfloat16 tensors need the ml_dtypes package"):
        A._bf16_supported("logits", "torch.bfloat16 tensors")


@pytest.mark.parametrize("func", ["cross_entropy", "softmax"])
def test_torch_bf16_real(func):
    """torch.bfloat16 CUDA tensors: computed in float32, answered as bfloat16 torch tensors,
    agreeing with PyTorch's own bfloat16 result within one bfloat16 rounding."""
    torch = pytest.importorskip("torch")
    if SIM or not torch.cuda.is_available():
        pytest.skip("torch CUDA tensors need a real GPU")
    x = torch.randn(16, 1000, device="cuda").to(torch.bfloat16)
    if func == "softmax":
        r = dcall("softmax", dict(x=x))
        assert r.dtype == torch.bfloat16 and r.device == x.device
        torch.testing.assert_close(r.float(), torch.softmax(x.float(), -1), rtol=8e-3, atol=1e-5)
        return
    xg = x.clone().requires_grad_(True)
    t = torch.randint(0, 1000, (16,), device="cuda")
    lv, g = dcall("cross_entropy", dict(logits=xg, target=t, return_grad=True))
    assert isinstance(lv, np.float32) and g.dtype == torch.bfloat16 and g.device == x.device
    ref = torch.nn.functional.cross_entropy(x.float().requires_grad_(True), t)
    np.testing.assert_allclose(lv, ref.item(), rtol=2e-6)
    xf = x.float().requires_grad_(True)
    torch.nn.functional.cross_entropy(xf, t).backward()
    torch.testing.assert_close(g.float(), xf.grad.to(torch.bfloat16).float(), rtol=8e-3, atol=1e-7)


class _DLPackOnly:
    """A CUDA array known only through DLPack (no __cuda_array_interface__), like a JAX array."""

    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA, device 0

    def __dlpack__(self, stream=None):  # pragma: no cover - never consumed in these tests
        raise AssertionError("not consumed")


def test_dlpack_only_bf16_refused_with_the_fix(monkeypatch):
    """A bfloat16 array from a library other than PyTorch, through DLPack, would have to come
    back as a Numba device array, which cannot hold bfloat16: refused, naming the fix."""
    bf16_tensor = types.SimpleNamespace(dtype="torch.bfloat16")
    monkeypatch.setattr(A, "_torch_from_dlpack", lambda obj: bf16_tensor)
    obj = _DLPackOnly()
    assert A.is_device_array(obj)
    with pytest.raises(TypeError, match=r"x: expected a bfloat16 array from PyTorch.*torch\.from_dlpack\(x\)"):
        dcall("softmax", dict(x=obj))


def test_dlpack_only_without_torch_or_cupy(monkeypatch):
    monkeypatch.setattr(A, "_torch_from_dlpack", lambda obj: None)
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(TypeError, match="x: a CUDA array without __cuda_array_interface__ .* needs PyTorch"):
        dcall("softmax", dict(x=_DLPackOnly()))


# ----------------------------------------------------------------------------- fused linear + cross-entropy
LIN_CASES = {
    "plain": {},
    "bias_weight_ignore": {"_bias": True, "_weight": True, "_ignore": True},
    "all": {"_bias": True, "_weight": True, "_ignore": True, "label_smoothing": 0.1, "z_loss": 1e-3,
            "softcap": 3.0},
    "num_items": {"_ignore": True, "num_items": 9.0},
}
LIN_TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-11, atol=1e-12)}


def is_dev(a):
    from fastloss._dispatch import is_device_array

    return is_device_array(a)


def _lin_inputs(case, dt, n=7, h=3, v=5, seed=0):
    opts = dict(LIN_CASES[case])
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, h)).astype(dt)
    W = (r.standard_normal((v, h)) * 0.8).astype(dt)
    t = r.integers(0, v, n)
    if opts.pop("_ignore", False):
        t[1::3] = -100
    if opts.pop("_weight", False):
        opts["weight"] = (r.random(v) + 0.5).astype(dt)
    b = r.standard_normal(v).astype(dt) if opts.pop("_bias", False) else None
    return x, W, b, t, opts


def _lin_reference(x, W, b, t, reduction, go, opts):
    """The loss and its gradients through cross_entropy on the materialized float64 logits
    (the NumPy reference backend) -- not the chunked code under test."""
    x64, W64 = x.astype(np.float64), W.astype(np.float64)
    z = x64 @ W64.T + (0.0 if b is None else b.astype(np.float64))
    o = {k: (np.asarray(v, np.float64) if k == "weight" else v) for k, v in opts.items()}
    loss, g = fl.cross_entropy(z, t, reduction=reduction, return_grad=True, grad_output=go, backend="numpy", **o)
    return loss, g @ W64, g.T @ x64, g.sum(axis=0)


def _check_device_linear(case, dt, reduction):
    """``linear_cross_entropy`` on device arrays (chunks of 3 rows, a short last one) against
    the materialized float64 reference: the loss and every gradient, on the device in the
    input's dtype, the rows of ignored targets exact zeros."""
    x, W, b, t, opts = _lin_inputs(case, dt)
    if reduction != "mean":
        opts.pop("num_items", None)  # (the "mean" denominator only)
    go = np.linspace(0.5, 2.0, x.shape[0]) if reduction == "none" else 0.7
    kw = {k: (dev(v) if k == "weight" else v) for k, v in opts.items()}
    loss, grads = fl.linear_cross_entropy(
        dev(x), dev(W), dev(t), linear_bias=None if b is None else dev(b), reduction=reduction,
        return_grad=True, grad_output=dev(go) if reduction == "none" else go, chunk_size=3, **kw)
    want = _lin_reference(x, W, b, t, reduction, go, opts)
    assert len(grads) == (3 if b is not None else 2)
    for g in grads:
        assert is_dev(g) and np.dtype(g.dtype) == np.dtype(dt)
    if reduction == "none":
        assert is_dev(loss) and loss.shape == x.shape[:1]
    np.testing.assert_allclose(np.asarray(host(loss), np.float64), want[0], **LIN_TOL[dt])
    for got, ref in zip(grads, want[1:]):
        np.testing.assert_allclose(host(got).astype(np.float64), ref, **LIN_TOL[dt])
    # the rows of ignored targets get exact zeros
    dh = host(grads[0])
    assert np.all(dh[t == -100] == 0)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(LIN_CASES))
def test_device_linear_cross_entropy(dt, reduction, case):
    """Device arrays in, device arrays out: the whole chunk loop on the device (the products on
    the GEMM kernel here), every option, several chunks with a short last one, ignored rows
    gathered and scattered back; against the materialized float64 reference."""
    _check_device_linear(case, dt, reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_device_linear_cross_entropy_class_chunks(reduction, monkeypatch):
    """Classes chunked too (what a huge vocabulary gets, forced by ``_config.LINEAR_CLASS_CHUNK``):
    two passes over the class chunks on the device -- the chunks' lse combined, the sharded
    kernel's loss shares added on the device, d_input accumulated over class chunks and
    d_linear_weight over row chunks; every option, against the float64 reference."""
    import fastloss._config as cfg

    monkeypatch.setattr(cfg, "LINEAR_CLASS_CHUNK", 2)  # V = 5: chunks of 2, 2 and 1 classes
    _check_device_linear("all", np.float64, reduction)


def test_device_linear_cross_entropy_nd_float16_default_chunk_and_all_ignored():
    """(2, 3, H) float16 input (products in float32, gradients rounded back once), the default
    chunk (one chunk here), and a batch whose every target is ignored (zero loss and grads)."""
    r = np.random.default_rng(3)
    x = r.standard_normal((2, 3, 4)).astype(np.float16)
    W = (r.standard_normal((6, 4)) * 0.5).astype(np.float16)
    t = r.integers(0, 6, (2, 3))
    loss, (dh, dW) = fl.linear_cross_entropy(dev(x), dev(W), dev(t), return_grad=True)
    ref = _lin_reference(x.reshape(6, 4).astype(np.float32), W.astype(np.float32), None, t.reshape(6), "mean", 1.0, {})
    assert np.dtype(dh.dtype) == np.float16 and dh.shape == (2, 3, 4) and dW.shape == (6, 4)
    np.testing.assert_allclose(float(loss), ref[0], rtol=1e-5)
    np.testing.assert_allclose(host(dh).reshape(6, 4), ref[1].astype(np.float16).astype(np.float64), rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(host(dW), ref[2].astype(np.float16).astype(np.float64), rtol=2e-3, atol=1e-4)
    t[...] = -100
    loss, (dh, dW) = fl.linear_cross_entropy(dev(x), dev(W), dev(t), return_grad=True, reduction="sum")
    assert float(loss) == 0.0 and not host(dh).any() and not host(dW).any()


def test_device_linear_cross_entropy_bad_target_raises_before_any_work():
    x, W, _, t, _ = _lin_inputs("plain", np.float32)
    t[4] = 5  # V = 5 classes: out of range
    with pytest.raises(IndexError, match="target"):
        fl.linear_cross_entropy(dev(x), dev(W), dev(t), return_grad=True)
    with pytest.raises(TypeError, match="linear_weight"):
        fl.linear_cross_entropy(dev(x), dev(W.astype(np.float64)), dev(np.zeros(7, np.int64)))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("m, k, n", [(5, 3, 6), (9, 0, 2), (1, 7, 1), (6, 5, 9)])
def test_device_gemm_kernel_any_strides(dt, m, k, n):
    """The GEMM kernel that Numba device arrays use (tile 4 under the simulator, so these
    shapes leave partial tiles): c = a @ b and c += a @ b on transposed and strided views,
    against NumPy's product."""
    from fastloss._backends import _cuda_linear as L

    r = np.random.default_rng(m * 100 + k * 10 + n)
    a = r.standard_normal((k, m)).astype(dt)  # passed transposed
    b2 = r.standard_normal((k, 2 * n)).astype(dt)
    b = b2[:, ::2]
    c0 = r.standard_normal((m, n)).astype(dt)
    ops = L._KernelProducts(cuda.default_stream())
    d2 = dev(b2)
    da, db = dev(a), D._view(d2, b.shape, (d2.strides[0], 2 * d2.strides[1]))  # a strided device view
    out = cuda.to_device(np.full((m, n), np.nan, dt))
    ops.mm(L.transpose(da), db, out)
    tol = dict(rtol=1e-5, atol=1e-5) if dt == np.float32 else dict(rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(host(out), a.T.astype(np.float64) @ b, **tol)
    acc = dev(c0)
    ops.mm_add(acc, L.transpose(da), db)
    np.testing.assert_allclose(host(acc), c0 + a.T.astype(np.float64) @ b, **tol)
