"""The public functions of fastloss.

Each function is written once, for host and device data alike, against the array adaptor
of its call (:mod:`fastloss._arrays`: NumPy arrays, or the CUDA backend's device arrays).  It
validates everything once (nothing is written before validation passed), normalizes its
arrays to the 2-D views the kernels take (``xp.layout``), computes the reduction factors, and
calls one kernel entry point of one backend (see :mod:`fastloss._backends._protocol` for the
kernel protocol).  Every user-facing message is built here or in :mod:`fastloss._validate`.
"""
from __future__ import annotations

import math

import numpy as np

from . import _arrays, _dispatch
from ._validate import (
    check_class_target,
    check_int,
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

_I64_MAX = np.iinfo(np.int64).max


# ----------------------------------------------------------------------------- plumbing
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


def _host_or(xp, obj, name):
    """A host argument as a NumPy array (never uploaded: its checks and value are read on
    the host), a device one through the adaptor."""
    return xp.asarray(obj, name) if _dispatch.is_device_array(obj) else np.asarray(obj)


def _grad_scale_value(xp, grad_output, reduction, name="grad_output"):
    """The scalar upstream gradient of a reduced loss (default 1); None for an array with
    ``reduction="none"``."""
    if grad_output is None:
        return 1.0
    g = _host_or(xp, grad_output, name)
    dt = np.dtype(g.dtype)
    if dt.kind not in "iuf" and dt.name != "bfloat16":
        raise TypeError(f"{name}: expected real numbers, found dtype {dt}")
    if len(g.shape) != 0:
        if reduction == "none":
            return None
        raise ValueError(
            f"{name}: expected a scalar for reduction={reduction!r} (the loss is a scalar), found an array of shape {tuple(g.shape)}"
        )
    return float(g) if isinstance(g, np.ndarray) else xp.item(g)


def _grad_output_array(xp, grad_output, shape, cdt, name="grad_output"):
    """``grad_output`` for ``reduction="none"``: broadcast to the unreduced loss ``shape``."""
    g = xp.asarray(grad_output, name)
    if np.dtype(g.dtype).kind in "iu":
        g = xp.cast(g, cdt)
    float_dtype_or_raise(g.dtype, name)
    return xp.broadcast(xp.cast(g, cdt), shape, name, "the unreduced loss shape")


def _check_output(xp, name, obj, shape, dtype, inputs):
    """An ``out=`` argument: an array of the call's kind, of ``shape`` and ``dtype``, writeable,
    not partly overlapping an input."""
    o = xp.as_output(obj)
    if o is None or tuple(o.shape) != tuple(shape) or np.dtype(o.dtype) != np.dtype(dtype):
        raise ValueError(
            f"{name}: expected {xp.KIND} of shape {tuple(shape)} and dtype {np.dtype(dtype)}, found "
            f"{type(obj).__name__} of shape {getattr(obj, 'shape', None)} and dtype {getattr(obj, 'dtype', None)}"
        )
    _check_writeable_no_overlap(xp, name, o, inputs)


def _check_writeable_no_overlap(xp, name, o, inputs):
    if not xp.writeable(o):
        raise ValueError(f"{name}: expected a writeable array, found a read-only one")
    xp.check_overlap(o, inputs, name)


def _check_grad_out(xp, grad_out, x, return_grad, inputs, name="grad_out"):
    """``grad_out`` (given only with ``return_grad``): an array of the call's kind with exactly
    the shape and dtype of ``x``, writeable, ``x`` itself or not overlapping an input."""
    if grad_out is None:
        return
    if not return_grad:
        raise ValueError(f"{name}: expected None unless return_grad=True, found an array (pass return_grad=True to get the gradient)")
    g = xp.as_output(grad_out)
    if g is None:
        raise ValueError(f"{name}: expected {xp.KIND}, found {type(grad_out).__name__}")
    if tuple(g.shape) != tuple(x.shape) or np.dtype(g.dtype) != np.dtype(x.dtype):
        raise ValueError(
            f"{name}: expected an array of shape {tuple(x.shape)} and dtype {np.dtype(x.dtype)}, "
            f"found shape {tuple(g.shape)} and dtype {np.dtype(g.dtype)}"
        )
    _check_writeable_no_overlap(xp, name, g, inputs)


def _check_range(xp, a, name, expected, lo, hi):
    """Values of ``a`` must lie in ``[lo, hi]`` (NaN passes: it propagates); the first one
    outside is found on a host copy for the message (error path only)."""
    if xp.any_outside(a, lo, hi):
        h = xp.to_host(a)
        with np.errstate(invalid="ignore"):
            bad = (h < lo) | (h > hi)
        pos = first_position(bad, h.shape)
        raise ValueError(f"{name}: expected {expected}, found {h[pos]} at position {pos}")


def _index_error(xp, t, C, ii):
    """The first class index out of range, found on a host copy (error path).  Unsigned
    64-bit values beyond the int64 range are judged first, before the int64 cast that would
    wrap them onto a valid or ignored index."""
    h = xp.to_host(t)
    big = h > np.uint64(_I64_MAX) if (h.dtype.kind == "u" and h.dtype.itemsize == 8) else None
    if big is not None and big.any():
        bad = big
    else:
        t64 = h.astype(np.int64, copy=False)
        bad = ((t64 < 0) | (t64 >= C)) & (t64 != ii)
    pos = first_position(bad, h.shape)
    return IndexError(f"target: expected class indices in [0, {C}) or ignore_index={ii}, found {h[pos]} at position {pos}")


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
    xp = _arrays.for_call(backend, x)
    a, cdt = xp.float_array(x, "x")
    keepdims = bool(keepdims)
    shape = tuple(a.shape)
    if not shape:
        # the log-sum-exp of one value is that value (scipy.special.logsumexp agrees); the
        # axes a 0-d array can name are -1 and 0, as a 1-element row
        for ax in axis if isinstance(axis, tuple) else (() if axis is None else (axis,)):
            normalize_axis(ax, 1)
        return xp.copy(a) if keepdims else _scalar(xp.item(a), cdt)
    axes = _class_axes(axis, len(shape))
    be = xp.kernels(backend)
    lay = xp.layout(a, axes)
    out = xp.empty(lay.N, cdt)
    if lay.C == 0:
        xp.fill(out, -np.inf)  # the log of an empty sum
    elif lay.N:
        be.logsumexp(lay.view_in(a, cdt), out)
    red_shape = tuple(1 if i in axes else s for i, s in enumerate(shape)) if keepdims else tuple(
        s for i, s in enumerate(shape) if i not in axes
    )
    if not red_shape:  # a full reduction: a NumPy scalar of the compute dtype
        return _scalar(xp.item(out), cdt)
    return xp.result(out, red_shape, a.dtype)


def _rowwise_out(fname, x, axis, out, backend):
    xp = _arrays.for_call(backend, x, out)
    a, cdt = xp.float_array(x, "x")
    if not a.shape:
        raise ValueError("x: expected an array with at least 1 dimension (the class axis), found a 0-d array")
    ax = normalize_axis(axis, len(a.shape))
    if out is not None:
        _check_output(xp, "out", out, a.shape, a.dtype, [("x", a)])
    be = xp.kernels(backend)
    lay = xp.layout(a, (ax,))
    x2 = lay.view_in(a, cdt)
    o2, finish = lay.output(out, a.dtype, cdt)
    if lay.N * lay.C:
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
    xp = _arrays.for_call(backend, grad, y)
    ya, cdt = xp.float_array(y, "y")
    if not ya.shape:
        raise ValueError("y: expected an array with at least 1 dimension (the class axis), found a 0-d array")
    g = xp.asarray(grad, "grad")
    float_dtype_or_raise(g.dtype, "grad")
    if tuple(g.shape) != tuple(ya.shape):
        raise ValueError(f"grad: expected the shape of y {tuple(ya.shape)}, found {tuple(g.shape)}")
    ax = normalize_axis(axis, len(ya.shape))
    be = xp.kernels(backend)
    lay = xp.layout(ya, (ax,))
    y2 = lay.view_in(ya, cdt)
    g2 = lay.view_in(g, cdt)
    o2, finish = lay.output(None, ya.dtype, cdt)
    if lay.N * lay.C:
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
    xp = _arrays.for_call(backend, logits, target, weight, grad_output, grad_out)
    x, cdt = xp.float_array(logits, "logits")
    xshape = tuple(x.shape)
    if not xshape:
        raise ValueError("logits: expected an array with at least 1 dimension (the class axis), found a 0-d array")
    ax = normalize_axis(axis, len(xshape))
    C = xshape[ax]
    if C == 0:
        raise ValueError(f"logits: expected at least one class along axis {axis}, found shape {xshape}")
    reduction = check_reduction(reduction)
    eps = check_real(label_smoothing, "label_smoothing", 0.0, 1.0)
    zl = check_real(z_loss, "z_loss", 0.0)
    ii = check_int(ignore_index, "ignore_index", int64=True)
    return_grad = bool(return_grad)
    lay = xp.layout(x, (ax,))
    row_shape = tuple(s for i, s in enumerate(xshape) if i != ax)

    t = xp.asarray(target, "target")
    if np.dtype(t.dtype).kind in "fV":
        float_dtype_or_raise(t.dtype, "target")
    soft = check_class_target(t.dtype, t.shape, xshape, ax, axis)
    if not soft:  # the class indices are checked before anything else is judged or written
        t2, bad, info = xp.class_indices(t, C, ii)
        if bad:
            raise _index_error(xp, t, C, ii)
    w = None
    if weight is not None:
        w = xp.operand(weight, "weight", cdt)
        if tuple(w.shape) != (C,):
            raise ValueError(f"weight: expected a 1-D array of {C} class weights, found shape {tuple(w.shape)}")
        w = xp.vec(w, C, cdt)
    go = _grad_scale_value(xp, grad_output, reduction)
    gout_rows = None
    if go is None:  # an array (reduction="none"): checked even when no gradient is asked for
        gout_rows = _grad_output_array(xp, grad_output, row_shape, np.dtype(np.float64))
    _check_grad_out(xp, grad_out, x, return_grad, [("logits", x), ("target", t)])

    be = xp.kernels(backend)
    N = lay.N
    x2 = lay.view_in(x, cdt)
    if soft:
        t2 = lay.view_in(t, cdt)
        denom = float(N)
    elif reduction == "mean":
        denom = xp.kept_weight(t2, ii, w, info)
    scale = 1.0 / denom if reduction == "mean" and denom != 0 else (0.0 if reduction == "mean" else 1.0)

    loss_rows = xp.empty(N, np.float64)
    g2 = gscale = finish = None
    if return_grad:
        g2, finish = lay.output(grad_out, x.dtype, cdt)
        if gout_rows is not None:
            gscale = xp.vec(gout_rows, N, np.float64)
        else:
            gscale = float(go * scale)  # a scalar: no (N,) array to fill on every call
    if soft:
        be.cross_entropy_soft(x2, t2, w, eps, zl, loss_rows, g2, gscale)
    else:
        be.cross_entropy(x2, t2, w, ii, eps, zl, loss_rows, g2, gscale)

    if reduction == "none":
        loss = xp.result(loss_rows, row_shape, x.dtype)
    else:
        loss = _scalar(xp.sum(loss_rows) * scale, cdt)
    return (loss, finish()) if return_grad else loss


# ----------------------------------------------------------------------------- elementwise
def _elementwise(xp, kernel, x, cdt, operands, params, reduction, denom, return_grad, grad_output, grad_out,
                 backend, grad_var=None):
    """Run an elementwise kernel: ``operands`` are arrays broadcast to ``x.shape`` (or None),
    ``params`` are scalar kernel arguments; ``denom`` divides the total for ``"mean"``."""
    go = _grad_scale_value(xp, grad_output, reduction)
    gout = None
    if go is None:  # an array (reduction="none"): checked even when no gradient is asked for
        gout = _grad_output_array(xp, grad_output, x.shape, cdt)
        if not return_grad:
            gout = None
        go = 1.0
    be = xp.kernels(backend)
    lay = xp.layout(x)
    x2 = lay.view_in(x, cdt)
    ops2 = [None if a is None else lay.view_in(a, cdt) for a in operands]
    loss2 = finish_loss = None
    if reduction == "none":
        loss2, finish_loss = lay.output(None, x.dtype, cdt)
    scale = 1.0 if reduction in ("none", "sum") else (1.0 / denom if denom else np.nan)
    g2 = finish = gv2 = None
    if return_grad:
        g2, finish = lay.output(grad_out, x.dtype, cdt)
    gout2 = None if gout is None else lay.view_in(gout, cdt)
    fn = getattr(be, kernel)
    if grad_var is not None:
        # an output buffer laid out like x, through the same path as the other outputs (a
        # view_in of an input-like array may be a reshape *copy* that the kernel would fill
        # instead of the returned buffer)
        gv2, finish_gv = lay.output(None, cdt, cdt, wrap=False) if return_grad else (None, None)
        total = fn(x2, *ops2, *params, loss2, g2, gv2, go * scale, gout2)
    else:
        total = fn(x2, *ops2, *params, loss2, g2, go * scale, gout2)
    loss = finish_loss() if reduction == "none" else _scalar(float(total) * scale, cdt)
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
    xp = _arrays.for_call(backend, logits, target, weight, pos_weight, grad_output, grad_out)
    x, cdt = xp.float_array(logits, "logits")
    shape = tuple(x.shape)
    reduction = check_reduction(reduction)
    y = _same_shape_target(xp, target, x, cdt, "target")
    w = None if weight is None else xp.operand(weight, "weight", cdt, shape)
    pw = None
    if pos_weight is not None:
        pw = xp.operand(pos_weight, "pos_weight", cdt)
        if shape and pw.shape and tuple(pw.shape)[-1] not in (1, shape[-1]):
            raise ValueError(
                f"pos_weight: expected one weight per class along the last axis ({shape[-1]}), found shape {tuple(pw.shape)}"
            )
        pw = xp.broadcast(pw, shape, "pos_weight")
    _check_grad_out(xp, grad_out, x, bool(return_grad), [("logits", x), ("target", y)])
    return _elementwise(xp, "bce_with_logits", x, cdt, [y, w, pw], [], reduction, math.prod(shape),
                        bool(return_grad), grad_output, grad_out, backend)


def _same_shape_target(xp, target, x, cdt, name):
    t, _ = xp.float_array(target, name)
    if tuple(t.shape) != tuple(x.shape):
        raise ValueError(f"{name}: expected the shape of the input {tuple(x.shape)}, found {tuple(t.shape)}")
    return xp.cast(t, cdt)


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
    xp = _arrays.for_call(backend, probs, target, weight, grad_output, grad_out)
    p, cdt = xp.float_array(probs, "probs")
    reduction = check_reduction(reduction)
    y = _same_shape_target(xp, target, p, cdt, "target")
    _check_range(xp, p, "probs", "probabilities in [0, 1]", 0.0, 1.0)
    _check_range(xp, y, "target", "targets in [0, 1]", 0.0, 1.0)  # PyTorch refuses them too
    w = None if weight is None else xp.operand(weight, "weight", cdt, p.shape)
    _check_grad_out(xp, grad_out, p, bool(return_grad), [("probs", p), ("target", y)])
    return _elementwise(xp, "bce", p, cdt, [y, w], [], reduction, math.prod(p.shape), bool(return_grad),
                        grad_output, grad_out, backend)


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
    xp = _arrays.for_call(backend, input, target, grad_output, grad_out)
    x, cdt = xp.float_array(input, "input")
    reduction = check_reduction(reduction, ("batchmean", "mean", "sum", "none"))
    t = xp.operand(target, "target", cdt, x.shape)
    _check_grad_out(xp, grad_out, x, bool(return_grad), [("input", x), ("target", t)])
    if reduction == "batchmean":
        reduction, denom = "mean", (x.shape[0] if x.shape else 1)
    else:
        denom = math.prod(x.shape)
    return _elementwise(xp, "kl_div", x, cdt, [t], [bool(log_target)], reduction, denom, bool(return_grad),
                        grad_output, grad_out, backend)


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
    xp = _arrays.for_call(backend, input, target, grad_output, grad_out)
    x, cdt = xp.float_array(input, "input")
    reduction = check_reduction(reduction)
    t = xp.operand(target, "target", cdt, x.shape)
    _check_grad_out(xp, grad_out, x, bool(return_grad), [("input", x), ("target", t)])
    return _elementwise(xp, "mse", x, cdt, [t], [], reduction, math.prod(x.shape), bool(return_grad), grad_output,
                        grad_out, backend)


def _var_shape(xp, var, x, cdt):
    """``var`` as an array broadcast to ``x.shape`` plus a function reducing a full-size
    gradient back to the shape (or Python-float-ness) of ``var``."""
    shape = tuple(x.shape)
    if isinstance(var, (int, float, np.integer, np.floating)) and not isinstance(var, (bool, np.bool_)):
        if var < 0:
            raise ValueError(f"var: expected a non-negative variance, found {var!r}")
        return xp.broadcast(xp.const(var, cdt), shape, "var"), (lambda g: _scalar(xp.sum(g), cdt))
    v, _ = xp.float_array(var, "var")
    orig = tuple(v.shape)
    if orig == shape:
        pass
    elif shape and orig == shape[:-1]:
        v = xp.expand_last(v)  # one dimension fewer: one variance per row (homoscedastic)
    elif len(orig) == len(shape) and all(a == b or a == 1 for a, b in zip(orig, shape)):
        pass
    else:
        raise ValueError(
            f"var: expected a float, the input's shape {shape}, that shape without its last dimension, "
            f"or the same rank with size-1 dimensions, found shape {orig}"
        )
    _check_range(xp, v, "var", "non-negative variances", 0.0, np.inf)
    vshape, vdt = tuple(v.shape), v.dtype
    reduced = vshape != shape

    def reduce_grad(g):
        # summed in float64 over the broadcast axes, in the dtype of var like every gradient
        return xp.result(xp.sum_to(g, vshape) if reduced else g, orig, vdt)

    return xp.broadcast(xp.cast(v, cdt), shape, "var"), reduce_grad


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
    xp = _arrays.for_call(backend, input, target, var, grad_output)
    x, cdt = xp.float_array(input, "input")
    reduction = check_reduction(reduction)
    e = check_real(eps, "eps", 0.0)
    t = xp.operand(target, "target", cdt, x.shape)
    v, reduce_grad = _var_shape(xp, var, x, cdt)
    return _elementwise(xp, "gaussian_nll", x, cdt, [t, v], [bool(full), e], reduction, math.prod(x.shape),
                        bool(return_grad), grad_output, None, backend, grad_var=reduce_grad)
