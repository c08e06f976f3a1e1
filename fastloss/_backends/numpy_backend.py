"""The ``numpy`` backend: the readable reference every compiled backend is tested against.

It implements every kernel entry point of the backend protocol
(:class:`fastloss._backends._protocol.KernelSet`, where the contract of each one is written)
in a few lines of array code, with the same stability tricks as the compiled kernels.

Optional hooks: ``set_num_threads(n)``.
"""
from __future__ import annotations

import functools

import numpy as np

NAME = "numpy"

_HALF_LOG_2PI = 0.5 * np.log(2.0 * np.pi)


def set_num_threads(n: int) -> None:  # NumPy's own loops are single threaded
    return None


# ----------------------------------------------------------------------------- helpers
def _shifted(x):
    """``(m, d, s)`` per row: the max ``m`` ``(N, 1)``, ``d = x - m`` and ``s = sum(exp(d))``.

    Every exponent is ``<= 0``, so nothing overflows. ``m`` is replaced by 0 where it is not
    finite, so a row of only ``-inf`` gives ``s = 0`` (``log s = -inf``) and a row holding
    ``+inf`` gives ``s = inf`` -- never ``inf - inf``. ``s`` is float64. Callers form ``log p = d - log s``
    rather than ``x - lse``: with huge logits (``3e38``) ``lse = m + log s`` rounds to ``m``
    and the O(1) part would be lost.
    """
    m = np.max(x, axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    d = x - m
    with np.errstate(over="ignore"):  # exp of a finite x beside a +inf max (shift 0): inf, on purpose
        # summed in float64: NumPy adds the terms of a strided (e.g. Fortran-order) row one by
        # one, and 3000 float32 terms would lose 5e-6 relative -- beyond the float32 contract
        s = np.sum(np.exp(d), axis=1, keepdims=True, dtype=np.float64)
    return m, d, s


def _log(s):
    with np.errstate(divide="ignore"):
        return np.log(s)


# ----------------------------------------------------------------------------- row-wise
def logsumexp(x, out):
    if x.shape[0]:
        m, _, s = _shifted(x)
        out[...] = (_log(s) + m)[:, 0]


def log_softmax(x, out):
    if x.size:
        _, d, s = _shifted(x)
        with np.errstate(invalid="ignore"):
            # a row of only -inf: -inf - (-inf) = nan, as PyTorch gives
            r = d - _log(s)
        out[...] = np.where(np.max(x, axis=1, keepdims=True) == np.inf, np.nan, r)  # see softmax


def softmax(x, out):
    if x.size:
        m, d, s = _shifted(x)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            p = np.exp(d) / s
        # a row holding +inf has no softmax: NaN throughout, as PyTorch gives (e / s alone
        # would give 0 or NaN at its finite entries, depending on whether exp(x) overflows)
        out[...] = np.where(np.max(x, axis=1, keepdims=True) == np.inf, np.nan, p)


def softmax_backward(g, y, out):
    if y.size:
        out[...] = y * (g - np.sum(g * y, axis=1, keepdims=True, dtype=np.float64)).astype(y.dtype)


def log_softmax_backward(g, y, out):
    if y.size:
        out[...] = g - np.exp(y) * np.sum(g, axis=1, keepdims=True, dtype=np.float64).astype(y.dtype)


def _row_terms(x):
    """float64 ``lse`` and ``log s``, the shifted logits ``d`` and the softmax ``p`` of each row
    (see ``_shifted``)."""
    m, d, s = _shifted(x)
    logs = _log(s.astype(np.float64))  # (N, 1)
    lse = logs + m.astype(np.float64)
    with np.errstate(invalid="ignore"):
        p = np.exp(d) / s  # exact 0 for a -inf logit; nan for a row without a defined softmax
    return lse[:, 0], logs, d, p


def _capped(x, softcap):
    """``(x', dcap)``: the capped logits ``softcap * tanh(x / softcap)`` and the cap's
    derivative ``1 - tanh(x / softcap)**2``, written ``1 / cosh**2`` (accurate where tanh is
    near 1; ``cosh`` overflows to inf, and the derivative to an exact 0, for huge or infinite
    ``x``).  Without a cap (``softcap == 0``): ``(x, None)``."""
    if not softcap:
        return x, None
    with np.errstate(over="ignore"):
        u = x / x.dtype.type(softcap)
        ch = np.cosh(u)
        return (np.tanh(u) * x.dtype.type(softcap)).astype(x.dtype), (1.0 / (ch * ch)).astype(x.dtype)


def _loss_out(loss, rows):
    """The row losses into ``loss``, or -- ``loss`` None, a reduced loss -- their float64
    total returned (NumPy's pairwise sum: an order fixed by the shape)."""
    if loss is None:
        return float(np.sum(rows, dtype=np.float64))
    loss[...] = rows
    return None


def cross_entropy(x, target, weight, ignore_index, label_smoothing, z_loss, softcap, loss, lse, grad, gscale):
    n, c = x.shape
    if n == 0:
        return _loss_out(loss, np.zeros(0))
    x, dcap = _capped(x, softcap)
    dt = x.dtype
    keep = target != ignore_index
    t = np.where(keep, target, 0)
    w = np.ones(c, dt) if weight is None else weight
    rlse, logs, d, p = _row_terms(x)
    if lse is not None:
        lse[...] = rlse
    wt = w[t].astype(np.float64)
    eps = label_smoothing
    with np.errstate(invalid="ignore"):
        # -log p[t] = log s - (x[t] - m); an x[t] of -inf gives +inf
        nll = logs[:, 0] - np.take_along_axis(d, t[:, None], axis=1)[:, 0].astype(np.float64)
        row = (1.0 - eps) * wt * nll
        if eps:
            # sum_c w_c (-log p_c); a class with x_c = -inf contributes +inf, as in PyTorch
            row = row + eps / c * np.sum(w.astype(np.float64) * (logs - d.astype(np.float64)), axis=1)
    if z_loss:
        row = row + z_loss * rlse * rlse
    total = _loss_out(loss, np.where(keep, row, 0.0))
    if grad is None:
        return total
    with np.errstate(invalid="ignore", over="ignore"):
        a = (1.0 - eps) * wt + 2.0 * z_loss * rlse
        if eps:  # not 0 * sum(w): a NaN weight of a class no target uses must not leak
            a = a + (eps / c) * float(np.sum(w, dtype=np.float64))
        gs = np.where(keep, gscale, 0.0)
        g = p * (gs * a)[:, None].astype(dt)
        if eps:
            g -= (gs[:, None] * (eps / c) * w[None, :]).astype(dt)
        rows = np.arange(n)
        g[rows, t] -= (gs * (1.0 - eps) * wt).astype(dt)
        if dcap is not None:
            g *= dcap  # through the cap: d x' / d x
        g[~keep] = 0  # an ignored row contributes nothing: exactly 0, even if it holds inf/NaN
    grad[...] = g
    return total


def cross_entropy_shard(x, target, weight, ignore_index, label_smoothing, z_loss, softcap, lse, class_offset,
                        num_classes, loss, grad, gscale):
    """One shard of the classes, ``x`` holding ``[class_offset, class_offset + C)`` of
    ``num_classes``, with the global row lse given (see the protocol)."""
    n, c = x.shape
    if n == 0:
        return _loss_out(loss, np.zeros(0))
    x, dcap = _capped(x, softcap)
    dt = x.dtype
    K = num_classes
    keep = target != ignore_index
    t = np.where(keep, target, 0)
    tl = t - class_offset
    mine = keep & (tl >= 0) & (tl < c)  # the rows whose target class is in this shard
    tl = np.where(mine, tl, 0)
    w = np.ones(K, dt) if weight is None else weight
    ws = w[class_offset:class_offset + c].astype(np.float64)  # this shard's class weights
    wt = w[t].astype(np.float64)
    eps = label_smoothing
    L = np.asarray(lse, np.float64)
    first = class_offset == 0
    with np.errstate(invalid="ignore", over="ignore"):
        xt = np.take_along_axis(x, tl[:, None], axis=1)[:, 0].astype(np.float64)
        row = np.where(mine, -(1.0 - eps) * wt * xt, 0.0)
        if eps:  # this shard's classes' -x part of the smoothing term; a -inf logit gives +inf
            row = row - eps / K * np.sum(ws * x.astype(np.float64), axis=1)
        if first:  # the lse terms (and the z-loss), counted once: by the first shard
            coef = (1.0 - eps) * wt
            if eps:
                coef = coef + eps / K * float(np.sum(w, dtype=np.float64))
            row = row + coef * L
            if z_loss:
                row = row + z_loss * L * L
    total = _loss_out(loss, np.where(keep, row, 0.0))
    if grad is None:
        return total
    with np.errstate(invalid="ignore", over="ignore"):
        a = (1.0 - eps) * wt + 2.0 * z_loss * L
        if eps:  # not 0 * sum(w): a NaN weight of a class no target uses must not leak
            a = a + (eps / K) * float(np.sum(w, dtype=np.float64))
        gs = np.where(keep, gscale, 0.0)
        p = np.exp(x.astype(np.float64) - L[:, None])  # the global softmax of this shard's classes
        g = p * (gs * a)[:, None]
        if eps:
            g -= gs[:, None] * (eps / K) * ws[None, :]
        rows = np.nonzero(mine)[0]
        g[rows, tl[rows]] -= gs[rows] * (1.0 - eps) * wt[rows]
        g = g.astype(dt)
        if dcap is not None:
            g *= dcap  # through the cap: d x' / d x
        g[~keep] = 0  # an ignored row contributes nothing: exactly 0, even if it holds inf/NaN
    grad[...] = g
    return total


def cross_entropy_soft(x, target, weight, label_smoothing, z_loss, softcap, loss, lse, grad, gscale):
    n, c = x.shape
    if n == 0:
        return _loss_out(loss, np.zeros(0))
    x, dcap = _capped(x, softcap)
    eps = label_smoothing
    y = target.astype(np.float64)
    if eps:
        y = (1.0 - eps) * y + eps / c
    if weight is not None:
        y = y * weight.astype(np.float64)
    rlse, logs, d, p = _row_terms(x)
    if lse is not None:
        lse[...] = rlse
    with np.errstate(invalid="ignore"):
        # sum_c y_c (log s - d_c) = sum(y) log s - sum_c y_c d_c, where a class without target
        # mass is left out of the second sum: a masked class (x_c = -inf, y_c = 0) contributes
        # 0, not 0 * inf = nan.  log s itself keeps every NaN and +inf of the row, so such a row
        # gives NaN even when its target mass is 0 (as PyTorch).
        # (a term at the row max, d_c = 0, is 0 too: an infinite y_c w_c there gives inf through
        # sum(y) log s, not inf * 0 = nan)
        yd = np.where((y == 0) | (d == 0), 0.0, y * d.astype(np.float64))
        row = np.sum(y, axis=1) * logs[:, 0] - np.sum(yd, axis=1)
    if z_loss:
        row = row + z_loss * rlse * rlse
    total = _loss_out(loss, row)
    if grad is None:
        return total
    with np.errstate(invalid="ignore", over="ignore"):
        a = np.sum(y, axis=1) + 2.0 * z_loss * rlse
        g = np.asarray(gscale, np.float64).reshape(-1, 1) * (p * a[:, None] - y)
        if dcap is not None:
            g = g * dcap
    grad[...] = g
    return total


# ----------------------------------------------------------------------------- elementwise
def _ieee(fn):
    """Run an elementwise loss without NumPy's floating-point warnings (every one of them,
    so the losses need no errstate of their own): an overflow to inf, a log of 0 or a NaN
    from the data is the IEEE value the compiled backends give silently too (the documented
    semantics), not a condition to warn about."""
    @functools.wraps(fn)
    def quiet(*args):
        with np.errstate(all="ignore"):
            return fn(*args)

    return quiet


def _finish(l, loss, grad, g, gscale, gout):
    """Store the elementwise loss and the scaled gradient; return the float64 loss sum."""
    if loss is not None:
        loss[...] = l
    if grad is not None:
        g = g * gscale
        if gout is not None:
            g = g * gout
        grad[...] = g
    return float(np.sum(l, dtype=np.float64))


def _softplus(z):
    """log(1 + exp(z)) as ``max(z, 0) + log1p(exp(-|z|))``: never overflows."""
    return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))


@_ieee
def bce_with_logits(z, y, weight, pos_weight, loss, grad, gscale, gout):
    sp = _softplus(-z)  # -log sigmoid(z)
    if pos_weight is None:
        l = (1 - y) * z + sp
    else:
        l = (1 - y) * z + (1 + (pos_weight - 1) * y) * sp
    if weight is not None:
        l = l * weight
    g = None
    if grad is not None:
        # d/dz: sigmoid(z) - 1 = -sigmoid(-z), computed without overflow
        s = np.exp(-_softplus(-z))  # sigmoid(z)
        sm = np.exp(-_softplus(z))  # sigmoid(-z) = 1 - sigmoid(z), accurate for large z
        if pos_weight is None:
            g = s - y
        else:
            g = (1 - y) - (1 + (pos_weight - 1) * y) * sm
        if weight is not None:
            g = g * weight
    return _finish(l, loss, grad, g, gscale, gout)


@_ieee
def bce(p, y, weight, loss, grad, gscale, gout):
    logp = np.maximum(np.log(p), -100)
    log1mp = np.maximum(np.log1p(-p), -100)
    l = -(y * logp + (1 - y) * log1mp)
    if weight is not None:
        l = l * weight
    g = None
    if grad is not None:
        # PyTorch's gradient: (p - y) / max(p (1 - p), 1e-12), its 1e-12 a float32 constant
        # (9.99999996e-13) in every dtype, as in ATen's kernel
        g = (p - y) / np.maximum(p * (1 - p), p.dtype.type(np.float32(1e-12)))
        if weight is not None:
            g = g * weight
    return _finish(l, loss, grad, g, gscale, gout)


@_ieee
def kl_div(x, t, log_target, loss, grad, gscale, gout):
    if log_target:
        et = np.exp(t)
        l = np.where(t == -np.inf, 0, et * (t - x))
        g = None if grad is None else np.where(t == -np.inf, 0, -et)
    else:
        l = np.where(t == 0, 0, t * (np.log(t) - x))
        g = None if grad is None else -t
    return _finish(l, loss, grad, g, gscale, gout)


@_ieee
def mse(x, t, loss, grad, gscale, gout):
    d = x - t
    return _finish(d * d, loss, grad, None if grad is None else 2 * d, gscale, gout)


@_ieee
def gaussian_nll(x, t, var, full, eps, loss, grad, grad_var, gscale, gout):
    v = np.maximum(var, var.dtype.type(eps))
    d = x - t
    l = 0.5 * (np.log(v) + d * d / v)
    if full:
        l = l + x.dtype.type(_HALF_LOG_2PI)
    if grad is not None or grad_var is not None:
        s = gscale if gout is None else gscale * gout
        if grad is not None:
            grad[...] = s * (d / v)
        if grad_var is not None:
            # gradient at the clamped value, as PyTorch's no-grad clamp gives
            grad_var[...] = s * (0.5 * (1 / v - d * d / (v * v)))
    return _finish(l, loss, None, None, gscale, gout)
