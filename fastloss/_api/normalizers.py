"""Log-sum-exp, softmax, log-softmax and their vector-Jacobian products."""
from __future__ import annotations

import numpy as np

from .. import _arrays
from .._validate import float_dtype_or_raise, normalize_axis
from ._common import _check_output, _class_axes, _scalar


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
        out = _check_output(xp, "out", out, a.shape, a.dtype, [("x", a)])
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
