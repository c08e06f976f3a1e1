"""The public functions of fastloss.

Each function validates everything once (nothing is written before validation passed),
normalizes its arrays to the 2-D views the kernels take (:mod:`fastloss._layout`), computes
the reduction factors, and calls one kernel entry point of one backend (see
:mod:`fastloss._backends._protocol` for the kernel protocol).
"""
from __future__ import annotations

import numpy as np

from . import _dispatch
from ._layout import Layout, rounded
from ._validate import (
    as_cast,
    as_float_array,
    broadcast_to_or_raise,
    check_class_target,
    check_grad_out,
    check_int,
    check_no_partial_overlap,
    check_real,
    check_reduction,
    first_position,
    float_dtype_or_raise,
    normalize_axis,
)

__all__ = [
    "logsumexp",
    "softmax",
    "log_softmax",
    "softmax_backward",
    "log_softmax_backward",
    "cross_entropy",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy",
    "kl_div",
    "mse_loss",
    "gaussian_nll_loss",
]


# ----------------------------------------------------------------------------- plumbing
def _on_device(*arrays) -> bool:
    return any(a is not None and _dispatch.is_device_array(a) for a in arrays)


def _device_call(fname, kwargs):
    """Hand a call whose data lives on a GPU to the CUDA backend, whole."""
    be = _dispatch.resolve(kwargs.get("backend"), device=True)
    return be.device_call(fname, kwargs)


def _scalar(value, cdt):
    """A reduced loss as a NumPy scalar of the compute dtype.

    A float64 total beyond the float32 range becomes ``inf`` without NumPy's overflow
    warning: an infinite loss is the result, as PyTorch returns it, not a fault."""
    with np.errstate(over="ignore"):
        return cdt.type(value)


def _class_axes(axis, ndim):
    """``axis`` as a tuple of distinct normalized axes (an int, a tuple, or None = all)."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, tuple):
        axes = tuple(normalize_axis(a, ndim) for a in axis)
        if len(set(axes)) != len(axes):
            raise ValueError(f"axis: expected distinct axes, found {axis}")
        return tuple(sorted(axes))
    return (normalize_axis(axis, ndim),)


def _grad_scale_value(grad_output, reduction, name="grad_output"):
    """The scalar upstream gradient of a reduced loss (default 1)."""
    if grad_output is None:
        return 1.0
    g = np.asarray(grad_output)
    if g.dtype.kind not in "iuf" and g.dtype.name != "bfloat16":
        raise TypeError(f"{name}: expected real numbers, found dtype {g.dtype}")
    if g.ndim != 0:
        if reduction == "none":
            return None
        raise ValueError(
            f"{name}: expected a scalar for reduction={reduction!r} (the loss is a scalar), found an array of shape {g.shape}"
        )
    return float(g)


def _grad_output_array(grad_output, shape, cdt, name="grad_output"):
    """``grad_output`` for ``reduction="none"``: broadcast to the unreduced loss ``shape``."""
    g = np.asarray(grad_output)
    if g.dtype.kind in "iu":
        g = g.astype(cdt)
    float_dtype_or_raise(g.dtype, name)
    return broadcast_to_or_raise(g.astype(cdt, copy=False), shape, name, "the unreduced loss shape")


def _prep_grad_out(grad_out, x, return_grad, inputs):
    check_grad_out(grad_out, x.shape, x.dtype, return_grad)
    if grad_out is not None:
        check_no_partial_overlap(grad_out, inputs)
    return grad_out


# ----------------------------------------------------------------------------- normalizers
def logsumexp(x, axis=-1, keepdims=False, *, backend=None):
    r"""Log of the sum of exponentials along ``axis``.

    .. math:: \operatorname{lse}(x) = m + \log \sum_j e^{x_j - m}, \qquad m = \max_j x_j

    Subtracting the row maximum ``m`` keeps every exponent ``<= 0``, so nothing overflows;
    where ``m`` is not finite the shift is 0, so a row holding ``+inf`` gives ``+inf`` and a
    row of only ``-inf`` gives ``-inf``, never a NaN from ``inf - inf``. NaN propagates.
    Matches :func:`scipy.special.logsumexp` (without ``b``/``return_sign``).

    Parameters
    ----------
    x : array_like
        Floating values (float16/bfloat16 are computed in float32 and returned as such).
    axis : int, tuple of int or None, default -1
        Axis or axes to reduce; ``None`` reduces all of them.
    keepdims : bool, default False
        Keep the reduced axes with size 1.
    backend : str, optional
        ``"auto"``, ``"numpy"``, ``"numba"``, ``"cython"`` or ``"cuda"``; default: the current
        default backend (see :func:`fastloss.set_backend`).

    Returns
    -------
    ndarray or scalar
        The input's dtype for arrays; a full reduction gives a NumPy scalar of the compute
        dtype (float32 for float16 input). An empty axis gives ``-inf`` (``log 0``). A 0-d
        ``x`` gives its value (``axis`` -1, 0, None or ``()``), as SciPy does.

    Examples
    --------
    >>> import numpy as np, fastloss as fl
    >>> float(fl.logsumexp(np.array([1000.0, 1000.0])))  # no overflow
    1000.6931471805599
    """
    if _on_device(x):
        return _device_call("logsumexp", dict(x=x, axis=axis, keepdims=keepdims, backend=backend))
    a, cdt = as_float_array(x, "x")
    keepdims = bool(keepdims)
    if a.ndim == 0:
        # the log-sum-exp of one value is that value (scipy.special.logsumexp agrees); the
        # axes a 0-d array can name are -1 and 0, as a 1-element row
        for ax in axis if isinstance(axis, tuple) else (() if axis is None else (axis,)):
            normalize_axis(ax, 1)
        return a.copy() if keepdims else _scalar(a[()], cdt)
    axes = _class_axes(axis, a.ndim)
    be = _dispatch.resolve(backend)
    lay = Layout(a, axes)
    out = np.empty(lay.N, cdt)
    if lay.C == 0:
        out.fill(-np.inf)
    else:
        be.logsumexp(lay.view_in(a.astype(cdt, copy=False)), out)
    red_shape = tuple(1 if i in axes else s for i, s in enumerate(a.shape)) if keepdims else tuple(
        s for i, s in enumerate(a.shape) if i not in axes
    )
    res = out.reshape(red_shape)
    if res.ndim == 0:
        return _scalar(res[()], cdt)
    return rounded(res, a.dtype)


def _rowwise_out(fname, x, axis, out, backend):
    if _on_device(x, out):
        return _device_call(fname, dict(x=x, axis=axis, out=out, backend=backend))
    a, cdt = as_float_array(x, "x")
    if a.ndim == 0:
        raise ValueError("x: expected an array with at least 1 dimension (the class axis), found a 0-d array")
    ax = normalize_axis(axis, a.ndim)
    if out is not None:
        if not isinstance(out, np.ndarray) or out.shape != a.shape or out.dtype != a.dtype:
            raise ValueError(
                f"out: expected a numpy.ndarray of shape {a.shape} and dtype {a.dtype}, found "
                f"{type(out).__name__} of shape {getattr(out, 'shape', None)} and dtype {getattr(out, 'dtype', None)}"
            )
        if not out.flags.writeable:
            raise ValueError("out: expected a writeable array, found a read-only one")
        check_no_partial_overlap(out, [("x", a)], "out")
    be = _dispatch.resolve(backend)
    lay = Layout(a, (ax,))
    x2 = lay.view_in(a.astype(cdt, copy=False))
    o2, finish = lay.output(out, a.dtype, cdt)
    if a.size:
        getattr(be, fname)(x2, o2)
    return finish()


def softmax(x, axis=-1, *, out=None, backend=None):
    r"""Softmax along ``axis``: :math:`\sigma(x)_j = e^{x_j - m} / \sum_k e^{x_k - m}`, ``m = max x``.

    Shift-invariant; the max shift keeps every exponent ``<= 0``. Entries of ``-inf`` give
    exactly 0 (as long as the row has a finite entry); a row of only ``-inf`` or holding
    ``+inf`` has no defined softmax and gives NaN, as in PyTorch.

    Parameters
    ----------
    x : array_like
        Floating values.
    axis : int, default -1
        The class axis.
    out : ndarray, optional
        Where to write the result (same shape and dtype as ``x``); may be ``x`` itself.
    backend : str, optional
        See :func:`logsumexp`.

    Returns
    -------
    ndarray
        Same shape and dtype as ``x``.

    Examples
    --------
    >>> import numpy as np, fastloss as fl
    >>> fl.softmax(np.array([0.0, np.log(3.0)])).round(6).tolist()
    [0.25, 0.75]
    """
    return _rowwise_out("softmax", x, axis, out, backend)


def log_softmax(x, axis=-1, *, out=None, backend=None):
    r"""Log-softmax along ``axis``: :math:`x_j - \operatorname{lse}(x)`.

    Computed as ``x - lse(x)`` with the max-shifted log-sum-exp -- never as
    ``log(softmax(x))``, which underflows to ``-inf`` for very negative entries. An entry of
    ``-inf`` gives ``-inf`` exactly; a row of only ``-inf``, or one holding ``+inf``, gives NaN
    throughout, as in PyTorch.

    Parameters
    ----------
    x : array_like
        Floating values.
    axis : int, default -1
        The class axis.
    out : ndarray, optional
        Where to write the result (same shape and dtype as ``x``); may be ``x`` itself.
    backend : str, optional
        See :func:`logsumexp`.

    Returns
    -------
    ndarray
        Same shape and dtype as ``x``.

    Examples
    --------
    >>> import numpy as np, fastloss as fl
    >>> fl.log_softmax(np.array([0.0, 1e4])).tolist()
    [-10000.0, 0.0]
    """
    return _rowwise_out("log_softmax", x, axis, out, backend)


def _backward(fname, grad, y, axis, backend):
    if _on_device(grad, y):
        return _device_call(fname, dict(grad=grad, y=y, axis=axis, backend=backend))
    ya, cdt = as_float_array(y, "y")
    if ya.ndim == 0:
        raise ValueError("y: expected an array with at least 1 dimension (the class axis), found a 0-d array")
    g = np.asarray(grad)
    float_dtype_or_raise(g.dtype, "grad")
    if g.shape != ya.shape:
        raise ValueError(f"grad: expected the shape of y {ya.shape}, found {g.shape}")
    ax = normalize_axis(axis, ya.ndim)
    be = _dispatch.resolve(backend)
    lay = Layout(ya, (ax,))
    y2 = lay.view_in(ya.astype(cdt, copy=False))
    g2 = lay.view_in(g.astype(cdt, copy=False))
    o2, finish = lay.output(None, ya.dtype, cdt)
    if ya.size:
        getattr(be, fname)(g2, y2, o2)
    return finish()


def softmax_backward(grad, y, axis=-1, *, backend=None):
    r"""Vector-Jacobian product of :func:`softmax`: ``y * (grad - sum(grad * y))``.

    Parameters
    ----------
    grad : array_like
        Upstream gradient, shaped like ``y``.
    y : array_like
        ``softmax(x, axis)``.
    axis : int, default -1
        The class axis.
    backend : str, optional
        See :func:`logsumexp`.

    Returns
    -------
    ndarray
        d(loss)/dx, shaped like ``y``, in ``y``'s dtype. The row sum is accumulated in float64.

    Examples
    --------
    >>> import numpy as np, fastloss as fl
    >>> y = fl.softmax(np.array([1.0, 2.0, 3.0]))
    >>> bool(abs(fl.softmax_backward(np.ones(3), y)).max() < 1e-15)  # softmax sums to 1
    True
    """
    return _backward("softmax_backward", grad, y, axis, backend)


def log_softmax_backward(grad, y, axis=-1, *, backend=None):
    r"""Vector-Jacobian product of :func:`log_softmax`: ``grad - exp(y) * sum(grad)``.

    Parameters
    ----------
    grad : array_like
        Upstream gradient, shaped like ``y``.
    y : array_like
        ``log_softmax(x, axis)``.
    axis : int, default -1
        The class axis.
    backend : str, optional
        See :func:`logsumexp`.

    Returns
    -------
    ndarray
        d(loss)/dx, shaped like ``y``, in ``y``'s dtype.

    Examples
    --------
    >>> import numpy as np, fastloss as fl
    >>> y = fl.log_softmax(np.array([0.0, 0.0]))
    >>> fl.log_softmax_backward(np.array([1.0, 0.0]), y).tolist()
    [0.5, -0.5]
    """
    return _backward("log_softmax_backward", grad, y, axis, backend)


# ----------------------------------------------------------------------------- cross-entropy
def cross_entropy(
    logits,
    target,
    *,
    axis=-1,
    weight=None,
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    reduction="mean",
    return_grad=False,
    grad_output=None,
    grad_out=None,
    backend=None,
):
    r"""Softmax cross-entropy, as :func:`torch.nn.functional.cross_entropy` with the class
    dimension at ``axis``, plus an optional z-loss; with its gradient in one fused pass.

    For a row with logits :math:`x`, :math:`\operatorname{lse} = \log\sum_c e^{x_c}`,
    class weights :math:`w` (default 1), smoothing :math:`\varepsilon` and :math:`C` classes:

    * class index :math:`t`:
      :math:`\ell = (1-\varepsilon)\,w_t(\operatorname{lse}-x_t) + \frac{\varepsilon}{C}\sum_c w_c(\operatorname{lse}-x_c) + z\,\operatorname{lse}^2`
    * class probabilities :math:`y`:
      :math:`\ell = \sum_c w_c y'_c(\operatorname{lse}-x_c) + z\,\operatorname{lse}^2`, with
      :math:`y' = (1-\varepsilon)y + \varepsilon/C`.

    The gradient is :math:`\partial\ell/\partial x_j = p_j\,A - (\text{target terms})_j` with
    :math:`p = \operatorname{softmax}(x)` and :math:`A = \sum_c w_c y'_c + 2z\operatorname{lse}`.
    Stability: ``lse`` is max-shifted, ``-log p`` is formed as ``lse - x`` (never
    ``log(softmax)``), and ``p = exp(x - lse)``, so logits of any size (up to the dtype's
    max) work and a masked class (``-inf`` logit) gets exactly 0 probability.

    Parameters
    ----------
    logits : array_like
        Unnormalized scores, floating, with the classes along ``axis``.
    target : array_like
        Integer class indices shaped like ``logits`` without ``axis``, or floating class
        probabilities shaped like ``logits``.
    axis : int, default -1
        The class axis of ``logits``.
    weight : array_like, optional
        ``(C,)`` class weights (``w`` above).
    ignore_index : int, default -100
        Class index whose rows contribute nothing (index targets only); it must fit in int64
        (``ValueError`` otherwise). Index targets may have any integer dtype; an unsigned one
        beyond the int64 range is an ``IndexError``, never wrapped around.
    label_smoothing : float in [0, 1], default 0
        ``epsilon`` above.
    z_loss : float >= 0, default 0
        Coefficient of PaLM's auxiliary ``lse**2`` term, added to each non-ignored row
        unweighted by ``weight``.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides the total by the summed weight ``w_t`` of the non-ignored targets
        (index targets) or by the number of rows (probability targets).
    return_grad : bool, default False
        Also return d(reduced loss)/d(logits).
    grad_output : float or array_like, optional
        The upstream gradient: a scalar, or with ``reduction="none"`` an array shaped like
        the unreduced loss. Default 1.
    grad_out : ndarray, optional
        Preallocated gradient (shape and dtype of ``logits``); may be ``logits`` itself, which
        is then overwritten in place with no second N x C buffer.
    backend : str, optional
        See :func:`logsumexp`.

    Returns
    -------
    loss : scalar or ndarray
        NumPy scalar of the compute dtype (reduced, accumulated in float64), or the
        unreduced loss shaped like the index target in ``logits``' dtype.
    grad : ndarray
        Only with ``return_grad=True``: same shape and dtype as ``logits``.

    Raises
    ------
    IndexError
        A class index outside ``[0, C)`` that is not ``ignore_index`` (nothing is written).
    ValueError, TypeError
        Bad shapes, parameters or dtypes.

    Notes
    -----
    Choices where PyTorch differs or is silent (see the README's "Semantics" section):

    * when every target is ignored (or the batch is empty), or the summed weight of the
      targets is 0, ``"mean"`` gives ``0.0`` and a zero gradient (PyTorch: NaN);
    * a target class whose logit is ``-inf`` gives loss ``+inf`` and a finite gradient;
    * a row holding ``+inf`` at a class that is not its target (probability targets: at a
      class without target mass, with mass elsewhere) gives loss ``+inf`` (the limit) and a
      NaN gradient (PyTorch: NaN loss) when ``label_smoothing=0``; with smoothing the
      smoothing term of that class is ``inf - inf`` and the row is NaN, as in PyTorch;
    * an ignored row (``ignore_index``) has loss 0 and gradient 0 even when its logits hold
      NaN or ``inf`` or a class weight is NaN or ``inf`` (PyTorch's gradient there is NaN,
      from ``0 * inf``);
    * probability targets: a class with logit ``-inf`` and no target mass (after smoothing and
      weights) contributes 0 (PyTorch: NaN); a NaN logit, or a ``+inf`` one in a row without
      target mass, still makes the row NaN;
    * with ``label_smoothing=0`` the weights of classes no target uses are never read, so a
      NaN or infinite weight there does not leak into other rows (PyTorch agrees);
    * float32 logits whose row spread (max - min) exceeds the float32 range may give ``inf``,
      as in float32 PyTorch; single logits up to the dtype's max are exact.

    Examples
    --------
    >>> import numpy as np, fastloss as fl
    >>> logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    >>> loss, grad = fl.cross_entropy(logits, np.array([0, 2]), return_grad=True)
    >>> round(float(loss), 6)  # (log(e**2 + 2) - 2 + log(3)) / 2
    0.669079
    >>> bool(np.allclose(grad.sum(axis=1), 0))  # softmax minus one-hot: rows sum to 0
    True
    """
    args = dict(
        logits=logits, target=target, axis=axis, weight=weight, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction, return_grad=return_grad,
        grad_output=grad_output, grad_out=grad_out, backend=backend,
    )
    if _on_device(logits, target, weight, grad_output, grad_out):
        return _device_call("cross_entropy", args)
    x, cdt = as_float_array(logits, "logits")
    if x.ndim == 0:
        raise ValueError("logits: expected an array with at least 1 dimension (the class axis), found a 0-d array")
    ax = normalize_axis(axis, x.ndim)
    C = x.shape[ax]
    if C == 0:
        raise ValueError(f"logits: expected at least one class along axis {axis}, found shape {x.shape}")
    reduction = check_reduction(reduction)
    eps = check_real(label_smoothing, "label_smoothing", 0.0, 1.0)
    zl = check_real(z_loss, "z_loss", 0.0)
    ii = check_int(ignore_index, "ignore_index", int64=True)
    return_grad = bool(return_grad)
    lay = Layout(x, (ax,))
    row_shape = tuple(s for i, s in enumerate(x.shape) if i != ax)

    t = np.asarray(target)
    if t.dtype.kind in "fV":
        float_dtype_or_raise(t.dtype, "target")
    soft = check_class_target(t.dtype, t.shape, x.shape, ax, axis)
    if not soft:
        if t.dtype.kind == "u" and t.dtype.itemsize == 8 and t.size and int(t.max()) > np.iinfo(np.int64).max:
            # checked before the int64 cast, which would wrap 2**64 - 100 to -100 (a valid
            # ignore_index): the row would be silently ignored
            bad = t > np.uint64(np.iinfo(np.int64).max)
            pos = first_position(bad, t.shape)
            raise IndexError(
                f"target: expected class indices in [0, {C}) or ignore_index={ii}, found {t[pos]} at position {pos}"
            )
        t64 = t.astype(np.int64, copy=False)
        # two reductions and no temporaries in the common case (every target a class); the
        # elementwise test only when some index is out of range or ignored
        tmin, tmax = (int(t64.min()), int(t64.max())) if t64.size else (0, 0)
        all_classes = 0 <= tmin and tmax < C
        if not all_classes:
            bad = ((t64 < 0) | (t64 >= C)) & (t64 != ii)
            if bad.any():
                pos = first_position(bad, t.shape)
                raise IndexError(
                    f"target: expected class indices in [0, {C}) or ignore_index={ii}, found {t[pos]} at position {pos}"
                )
    w = None
    if weight is not None:
        w = as_cast(weight, "weight", cdt)
        if w.shape != (C,):
            raise ValueError(f"weight: expected a 1-D array of {C} class weights, found shape {w.shape}")
        w = np.ascontiguousarray(w)
    go = _grad_scale_value(grad_output, reduction)
    gout_rows = None
    if go is None:  # an array (reduction="none"): checked even when no gradient is asked for
        gout_rows = _grad_output_array(grad_output, row_shape, np.dtype(np.float64))
    _prep_grad_out(grad_out, x, return_grad, [("logits", x), ("target", t)])

    be = _dispatch.resolve(backend)
    N = lay.N
    x2 = lay.view_in(x.astype(cdt, copy=False))
    if soft:
        t2 = lay.view_in(t.astype(cdt, copy=False))
        denom = float(N)
    else:
        t2 = np.ascontiguousarray(t64.reshape(-1))
        if reduction == "mean":
            if all_classes and not tmin <= ii <= tmax:  # nothing ignored
                denom = float(np.sum(w[t2], dtype=np.float64)) if w is not None else float(N)
            else:
                keep = t2 != ii
                denom = float(np.sum(w[t2[keep]], dtype=np.float64)) if w is not None else float(np.count_nonzero(keep))
    scale = 1.0 / denom if reduction == "mean" and denom != 0 else (0.0 if reduction == "mean" else 1.0)

    loss_rows = np.empty(N, np.float64)
    g2 = gscale = finish = None
    if return_grad:
        g2, finish = lay.output(grad_out, x.dtype, cdt)
        if gout_rows is not None:
            gscale = np.ascontiguousarray(gout_rows.reshape(-1), dtype=np.float64)
        else:
            gscale = float(go * scale)  # a scalar: no (N,) array to fill on every call
    if soft:
        be.cross_entropy_soft(x2, t2, w, eps, zl, loss_rows, g2, gscale)
    else:
        be.cross_entropy(x2, t2, w, ii, eps, zl, loss_rows, g2, gscale)

    if reduction == "none":
        loss = rounded(loss_rows.reshape(row_shape), x.dtype)
    else:
        loss = _scalar(float(np.sum(loss_rows)) * scale, cdt)
    return (loss, finish()) if return_grad else loss


# ----------------------------------------------------------------------------- elementwise
def _elementwise(kernel, x, cdt, operands, params, reduction, denom, return_grad, grad_output, grad_out, backend,
                 grad_var=None):
    """Run an elementwise kernel: ``operands`` are arrays broadcast to ``x.shape`` (or None),
    ``params`` are scalar kernel arguments; ``denom`` divides the total for ``"mean"``."""
    go = _grad_scale_value(grad_output, reduction)
    gout = None
    if go is None:  # an array (reduction="none"): checked even when no gradient is asked for
        gout = _grad_output_array(grad_output, x.shape, cdt)
        if not return_grad:
            gout = None
        go = 1.0
    be = _dispatch.resolve(backend)
    lay = Layout(x)
    x2 = lay.view_in(x.astype(cdt, copy=False))
    ops2 = [None if a is None else lay.view_in(a) for a in operands]
    loss2 = finish_loss = None
    if reduction == "none":
        loss2, finish_loss = lay.output(None, x.dtype, cdt)
    scale = 1.0 if reduction in ("none", "sum") else (1.0 / denom if denom else np.nan)
    g2 = finish = gv2 = None
    if return_grad:
        g2, finish = lay.output(grad_out, x.dtype, cdt)
    gout2 = None if gout is None else lay.view_in(gout)
    fn = getattr(be, kernel)
    if grad_var is not None:
        # an output buffer laid out like x, through the same path as the other outputs (a
        # view_in of an input-like array may be a reshape *copy* that the kernel would fill
        # instead of the returned buffer)
        gv2, finish_gv = lay.output(None, cdt, cdt) if return_grad else (None, None)
        total = fn(x2, *ops2, *params, loss2, g2, gv2, go * scale, gout2)
    else:
        total = fn(x2, *ops2, *params, loss2, g2, go * scale, gout2)
    loss = finish_loss() if reduction == "none" else _scalar(total * scale, cdt)
    if not return_grad:
        return loss
    grad = finish()
    if grad_var is not None:
        return loss, (grad, grad_var(finish_gv()))
    return loss, grad


def binary_cross_entropy_with_logits(
    logits, target, *, weight=None, pos_weight=None, reduction="mean", return_grad=False, grad_output=None,
    grad_out=None, backend=None,
):
    r"""Binary cross-entropy on logits, as :func:`torch.nn.functional.binary_cross_entropy_with_logits`.

    .. math:: \ell = w\,\big[(1-y)\,z + (1 + (p_w-1)\,y)\,\operatorname{softplus}(-z)\big]

    with ``softplus(-z) = max(-z, 0) + log1p(exp(-|z|))``: the exponent is never positive,
    so the loss is exact for ``|z|`` up to the dtype's max. The gradient
    ``w [(1-y) - (1 + (p_w-1) y) sigmoid(-z)]`` uses ``sigmoid(-z) = exp(-softplus(z))``.

    Parameters
    ----------
    logits : array_like
        Floating logits ``z``.
    target : array_like
        Targets ``y`` in [0, 1], the shape of ``logits``.
    weight : array_like, optional
        Elementwise weight ``w``, broadcastable to ``logits``.
    pos_weight : array_like, optional
        Weight ``p_w`` of the positive term, broadcast along the last axis (e.g. ``(C,)``).
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides by the number of elements.
    return_grad, grad_output, grad_out, backend
        As in :func:`cross_entropy`.

    Returns
    -------
    loss : scalar or ndarray
        Each element's loss is computed in the compute dtype and the reduced loss summed in
        float64, so in float32 an element loss beyond the float32 range (~3.4e38) is ``inf``
        and so is the reduced loss, as in float32 PyTorch (compute in float64 for such data).
    grad : ndarray, only with ``return_grad=True``

    Examples
    --------
    >>> import numpy as np, fastloss as fl
    >>> round(float(fl.binary_cross_entropy_with_logits(np.array([0.0]), np.array([1.0]))), 6)
    0.693147
    >>> float(fl.binary_cross_entropy_with_logits(np.array([-1e300]), np.array([1.0])))  # no overflow
    1e+300
    """
    args = dict(logits=logits, target=target, weight=weight, pos_weight=pos_weight, reduction=reduction,
                return_grad=return_grad, grad_output=grad_output, grad_out=grad_out, backend=backend)
    if _on_device(logits, target, weight, pos_weight, grad_output, grad_out):
        return _device_call("binary_cross_entropy_with_logits", args)
    x, cdt = as_float_array(logits, "logits")
    reduction = check_reduction(reduction)
    y = _same_shape_target(target, x, cdt, "target")
    w = None if weight is None else as_cast(weight, "weight", cdt, x.shape)
    pw = None
    if pos_weight is not None:
        pw = as_cast(pos_weight, "pos_weight", cdt)
        if x.ndim and pw.ndim and pw.shape[-1] not in (1, x.shape[-1]):
            raise ValueError(f"pos_weight: expected one weight per class along the last axis ({x.shape[-1]}), found shape {pw.shape}")
        pw = broadcast_to_or_raise(pw, x.shape, "pos_weight")
    _prep_grad_out(grad_out, x, bool(return_grad), [("logits", x), ("target", y)])
    return _elementwise("bce_with_logits", x, cdt, [y, w, pw], [], reduction, x.size, bool(return_grad),
                        grad_output, grad_out, backend)


def _same_shape_target(target, x, cdt, name):
    t, _ = as_float_array(target, name)
    if t.shape != x.shape:
        raise ValueError(f"{name}: expected the shape of the input {x.shape}, found {t.shape}")
    return t.astype(cdt, copy=False)


def binary_cross_entropy(probs, target, *, weight=None, reduction="mean", return_grad=False, grad_output=None,
                         grad_out=None, backend=None):
    r"""Binary cross-entropy on probabilities, as :func:`torch.nn.functional.binary_cross_entropy`.

    .. math:: \ell = -w\,\big[y \max(\log p, -100) + (1-y)\max(\log(1-p), -100)\big]

    Each log term is clamped at -100 (PyTorch's guard against ``log 0``), and ``log(1-p)`` is
    ``log1p(-p)``. The gradient is PyTorch's, ``w (p - y) / max(p (1-p), 1e-12)`` -- so
    ``+-1e12``-scale at ``p = 0`` or ``1`` -- not the derivative of the clamped loss.
    Prefer :func:`binary_cross_entropy_with_logits` on logits: it is exact everywhere.

    Parameters
    ----------
    probs : array_like
        Probabilities ``p`` in [0, 1] (else ``ValueError``; NaN propagates).
    target : array_like
        Targets ``y`` in [0, 1] (else ``ValueError``, as in PyTorch; NaN propagates), the shape
        of ``probs``.
    weight : array_like, optional
        Elementwise weight ``w``, broadcastable to ``probs``.
    reduction, return_grad, grad_output, grad_out, backend
        As in :func:`binary_cross_entropy_with_logits`.

    Returns
    -------
    loss : scalar or ndarray
        As in :func:`binary_cross_entropy_with_logits` (float32 element losses beyond the
        float32 range are ``inf``).
    grad : ndarray, only with ``return_grad=True``

    Examples
    --------
    >>> import numpy as np, fastloss as fl
    >>> float(fl.binary_cross_entropy(np.array([0.0]), np.array([1.0])))  # clamped log 0
    100.0
    """
    args = dict(probs=probs, target=target, weight=weight, reduction=reduction, return_grad=return_grad,
                grad_output=grad_output, grad_out=grad_out, backend=backend)
    if _on_device(probs, target, weight, grad_output, grad_out):
        return _device_call("binary_cross_entropy", args)
    p, cdt = as_float_array(probs, "probs")
    reduction = check_reduction(reduction)
    y = _same_shape_target(target, p, cdt, "target")
    with np.errstate(invalid="ignore"):
        bad = (p < 0) | (p > 1)
    if bad.any():
        pos = first_position(bad, p.shape)
        raise ValueError(f"probs: expected probabilities in [0, 1], found {p[pos]} at position {pos}")
    with np.errstate(invalid="ignore"):
        bad = (y < 0) | (y > 1)
    if bad.any():  # PyTorch refuses them too; NaN passes (it propagates)
        pos = first_position(bad, y.shape)
        raise ValueError(f"target: expected targets in [0, 1], found {y[pos]} at position {pos}")
    w = None if weight is None else as_cast(weight, "weight", cdt, p.shape)
    _prep_grad_out(grad_out, p, bool(return_grad), [("probs", p), ("target", y)])
    return _elementwise("bce", p, cdt, [y, w], [], reduction, p.size, bool(return_grad), grad_output, grad_out,
                        backend)


def kl_div(input, target, *, log_target=False, reduction="batchmean", return_grad=False, grad_output=None,
           grad_out=None, backend=None):
    r"""Kullback-Leibler divergence, as :func:`torch.nn.functional.kl_div`.

    ``input`` holds log-probabilities. The pointwise term is

    .. math:: \ell = y\,(\log y - x) \quad\text{or, with log\_target,}\quad e^{y}(y - x),

    taken as exactly 0 where ``y == 0`` (resp. ``y == -inf``) -- also where PyTorch gives NaN
    (``0 * -inf``). The gradient with respect to ``input`` is ``-y`` (resp. ``-exp(y)``).

    Parameters
    ----------
    input : array_like
        Log-probabilities ``x``.
    target : array_like
        Probabilities ``y`` (log-probabilities with ``log_target=True``), broadcastable to
        ``input``.
    log_target : bool, default False
    reduction : {"batchmean", "mean", "sum", "none"}, default "batchmean"
        ``"batchmean"`` divides the sum by ``input.shape[0]`` -- the true KL divergence per
        sample (PyTorch's default is ``"mean"``, over all elements).
    return_grad, grad_output, grad_out, backend
        As in :func:`cross_entropy`.

    Returns
    -------
    loss : scalar or ndarray
        As in :func:`binary_cross_entropy_with_logits` (float32 element losses beyond the
        float32 range are ``inf``).
    grad : ndarray, only with ``return_grad=True``

    Examples
    --------
    >>> import numpy as np, fastloss as fl
    >>> p = np.array([[0.5, 0.5]])
    >>> float(fl.kl_div(np.log(p), p))
    0.0
    """
    args = dict(input=input, target=target, log_target=log_target, reduction=reduction, return_grad=return_grad,
                grad_output=grad_output, grad_out=grad_out, backend=backend)
    if _on_device(input, target, grad_output, grad_out):
        return _device_call("kl_div", args)
    x, cdt = as_float_array(input, "input")
    reduction = check_reduction(reduction, ("batchmean", "mean", "sum", "none"))
    t = as_cast(target, "target", cdt, x.shape)
    _prep_grad_out(grad_out, x, bool(return_grad), [("input", x), ("target", t)])
    if reduction == "batchmean":
        reduction, denom = "mean", (x.shape[0] if x.ndim else 1)
    else:
        denom = x.size
    return _elementwise("kl_div", x, cdt, [t], [bool(log_target)], reduction, denom, bool(return_grad), grad_output,
                        grad_out, backend)


def mse_loss(input, target, *, reduction="mean", return_grad=False, grad_output=None, grad_out=None, backend=None):
    r"""Mean squared error :math:`\ell = (x - y)^2`, as :func:`torch.nn.functional.mse_loss`.

    The Gaussian negative log-likelihood with fixed unit variance, up to a factor 2 and a
    constant. Gradient ``2 (x - y)``.

    Parameters
    ----------
    input : array_like
        Predictions ``x``.
    target : array_like
        Targets ``y``, broadcastable to ``input`` (a target that would enlarge the loss
        beyond ``input``'s shape is a ``ValueError``; PyTorch only warns).
    reduction, return_grad, grad_output, grad_out, backend
        As in :func:`binary_cross_entropy_with_logits`.

    Returns
    -------
    loss : scalar or ndarray
        As in :func:`binary_cross_entropy_with_logits` (float32 element losses beyond the
        float32 range are ``inf``).
    grad : ndarray, only with ``return_grad=True``

    Examples
    --------
    >>> import numpy as np, fastloss as fl
    >>> loss, grad = fl.mse_loss(np.array([1.0, 3.0]), np.array([0.0, 0.0]), return_grad=True)
    >>> float(loss), grad.tolist()
    (5.0, [1.0, 3.0])
    """
    args = dict(input=input, target=target, reduction=reduction, return_grad=return_grad, grad_output=grad_output,
                grad_out=grad_out, backend=backend)
    if _on_device(input, target, grad_output, grad_out):
        return _device_call("mse_loss", args)
    x, cdt = as_float_array(input, "input")
    reduction = check_reduction(reduction)
    t = as_cast(target, "target", cdt, x.shape)
    _prep_grad_out(grad_out, x, bool(return_grad), [("input", x), ("target", t)])
    return _elementwise("mse", x, cdt, [t], [], reduction, x.size, bool(return_grad), grad_output, grad_out, backend)


def _var_shape(var, x, cdt):
    """``var`` as an array broadcast to ``x.shape`` plus a function reducing a full-size
    gradient back to the shape (or Python-float-ness) of ``var``."""
    if isinstance(var, (int, float, np.integer, np.floating)) and not isinstance(var, (bool, np.bool_)):
        if var < 0:
            raise ValueError(f"var: expected a non-negative variance, found {var!r}")
        v = np.asarray(var, dtype=cdt)
        return np.broadcast_to(v, x.shape), (lambda g: cdt.type(np.sum(g, dtype=np.float64)))
    v, _ = as_float_array(var, "var")
    orig = v.shape
    if v.shape == x.shape:
        pass
    elif x.ndim and v.shape == x.shape[:-1]:
        v = v[..., None]  # one dimension fewer: one variance per row (homoscedastic)
    elif v.ndim == x.ndim and all(a == b or a == 1 for a, b in zip(v.shape, x.shape)):
        pass
    else:
        raise ValueError(
            f"var: expected a float, the input's shape {x.shape}, that shape without its last dimension, "
            f"or the same rank with size-1 dimensions, found shape {orig}"
        )
    with np.errstate(invalid="ignore"):
        neg = v < 0
    if neg.any():
        pos = first_position(neg, v.shape)
        raise ValueError(f"var: expected non-negative variances, found {v[pos]} at position {pos}")
    red = tuple(i for i, (a, b) in enumerate(zip(v.shape, x.shape)) if a == 1 and b != 1)

    def reduce_grad(g):
        r = np.sum(g, axis=red, keepdims=True, dtype=np.float64) if red else g
        return rounded(r.reshape(orig), v.dtype)  # the dtype of var, like every gradient

    return np.broadcast_to(v.astype(cdt, copy=False), x.shape), reduce_grad


def gaussian_nll_loss(input, target, var, *, full=False, eps=1e-6, reduction="mean", return_grad=False,
                      grad_output=None, backend=None):
    r"""Gaussian negative log-likelihood, as :func:`torch.nn.functional.gaussian_nll_loss`.

    .. math:: \ell = \tfrac12\Big(\log v + \frac{(x - y)^2}{v}\Big) \;[+\; \tfrac12\log 2\pi \text{ if full}],
              \qquad v = \max(\mathrm{var}, \varepsilon)

    As in PyTorch (2.13), the clamp at ``eps`` is applied without gradient: the gradient
    with respect to ``var`` is evaluated at the clamped value as if the clamp were the identity,
    ``0.5 (1/v - (x-y)^2 / v^2)``; with respect to ``input`` it is ``(x - y) / v``.

    Parameters
    ----------
    input : array_like
        Predicted means ``x``.
    target : array_like
        Observations ``y``, broadcastable to ``input``.
    var : float or array_like
        Variances: a float, the shape of ``input``, that shape without its last dimension, or
        the same rank with size-1 dimensions (broadcast). Negative entries are a ``ValueError``.
    full : bool, default False
        Add the constant ``0.5 log(2 pi)``.
    eps : float, default 1e-6
        Lower clamp of ``var`` (>= 0).
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides by the number of elements of ``input``.
    return_grad, grad_output, backend
        As in :func:`cross_entropy` (no ``grad_out``: the gradient is a pair).

    Returns
    -------
    loss : scalar or ndarray
        As in :func:`binary_cross_entropy_with_logits` (float32 element losses beyond the
        float32 range are ``inf``).
    (d_input, d_var) : tuple, only with ``return_grad=True``
        ``d_var`` has the shape of ``var`` (summed over broadcast dimensions); a NumPy scalar
        when ``var`` is a float.

    Examples
    --------
    >>> import numpy as np, fastloss as fl
    >>> float(fl.gaussian_nll_loss(np.array([1.0]), np.array([0.0]), 1.0))
    0.5
    """
    args = dict(input=input, target=target, var=var, full=full, eps=eps, reduction=reduction,
                return_grad=return_grad, grad_output=grad_output, backend=backend)
    if _on_device(input, target, var, grad_output):
        return _device_call("gaussian_nll_loss", args)
    x, cdt = as_float_array(input, "input")
    reduction = check_reduction(reduction)
    e = check_real(eps, "eps", 0.0)
    t = as_cast(target, "target", cdt, x.shape)
    v, reduce_grad = _var_shape(var, x, cdt)
    return _elementwise("gaussian_nll", x, cdt, [t, v], [bool(full), e], reduction, x.size, bool(return_grad),
                        grad_output, None, backend, grad_var=reduce_grad)
