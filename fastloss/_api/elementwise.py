"""The elementwise losses: binary cross-entropy (on logits and on probabilities), KL
divergence, mean squared error, Gaussian negative log-likelihood.
"""
from __future__ import annotations

import math

import numpy as np

from .. import _arrays
from .._validate import check_real, check_reduction
from ._common import _check_grad_out, _check_range, _grad_output_array, _grad_scale_value, _scalar


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
    grad_out = _check_grad_out(xp, grad_out, x, bool(return_grad), [("logits", x), ("target", y)])
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
    grad_out = _check_grad_out(xp, grad_out, p, bool(return_grad), [("probs", p), ("target", y)])
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
    grad_out = _check_grad_out(xp, grad_out, x, bool(return_grad), [("input", x), ("target", t)])
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
    grad_out = _check_grad_out(xp, grad_out, x, bool(return_grad), [("input", x), ("target", t)])
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
