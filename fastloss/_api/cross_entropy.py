"""Softmax cross-entropy (class indices or class probabilities) with its fused gradient."""
from __future__ import annotations

import numpy as np

from .. import _arrays
from .._validate import (
    check_class_target,
    check_int,
    check_real,
    check_reduction,
    float_dtype_or_raise,
    normalize_axis,
)
from ._common import _check_grad_out, _grad_output_array, _grad_scale_value, _index_error, _scalar


def _options(reduction, label_smoothing, z_loss, softcap, num_items, ignore_index):
    """The scalar options of the cross-entropy (and of :func:`linear_cross_entropy`), checked:
    ``(reduction, eps, z_loss, cap, num_items, ignore_index)``, ``cap`` 0.0 for no cap and
    ``num_items`` None when not given."""
    reduction = check_reduction(reduction)
    eps = check_real(label_smoothing, "label_smoothing", 0.0, 1.0)
    zl = check_real(z_loss, "z_loss", 0.0)
    cap = 0.0 if softcap is None else check_real(softcap, "softcap", 0.0, lo_open=True)
    nitems = None if num_items is None else check_real(num_items, "num_items", 0.0, lo_open=True)
    if nitems is not None and reduction != "mean":
        raise ValueError(f"num_items: expected None with reduction={reduction!r} (it sets the denominator of "
                         f"\"mean\"), found {num_items!r}")
    ii = check_int(ignore_index, "ignore_index", int64=True)
    return reduction, eps, zl, cap, nitems, ii


def _class_weight(xp, weight, C, cdt):
    """The ``(C,)`` class weights as a contiguous vector of the compute dtype (None: none)."""
    if weight is None:
        return None
    w = xp.operand(weight, "weight", cdt)
    if tuple(w.shape) != (C,):
        raise ValueError(f"weight: expected a 1-D array of {C} class weights, found shape {tuple(w.shape)}")
    return xp.vec(w, C, cdt)


def cross_entropy(
    logits,
    target,
    *,
    axis=-1,
    weight=None,
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    num_items=None,
    reduction="mean",
    return_grad=False,
    return_lse=False,
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

    With ``softcap`` :math:`s` (Gemma 2), every formula above is of the capped logits
    :math:`x' = s\tanh(x/s)`, and the gradient flows through the cap:
    :math:`\partial\ell/\partial x_j = \partial\ell/\partial x'_j\,(1 - \tanh^2(x_j/s))`.
    The cap is applied in the kernels' own passes over each row (no capped copy of the
    logits); ``tanh`` is formed from :math:`e^{-2|x|/s}` (never overflows) and its derivative as
    :math:`4e^{-2|u|}/(1+e^{-2|u|})^2` or :math:`1/\cosh^2`, accurate where ``tanh`` is near
    1.  A capped logit lies in :math:`[-s, s]`: a masked class (``-inf``) becomes ``-s`` and
    gets a small nonzero probability, and a ``-inf`` target logit a finite loss -- the cap's
    mathematics, as in the PyTorch expression ``s * torch.tanh(x / s)``.

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
    softcap : float > 0, optional
        Cap the logits at ``softcap * tanh(logits / softcap)`` first (see above); applies to
        every other option (``lse``, ``z_loss`` and ``return_lse`` are of the capped logits).
    num_items : float > 0, optional
        ``"mean"`` divides by ``num_items`` instead of the summed weight of the non-ignored
        targets (or the row count for probability targets): the global token count when a
        batch is split into micro-batches, so that the micro-batches' summed losses and
        gradients equal the full batch's.  Only meaningful with ``reduction="mean"``: with
        ``"sum"`` or ``"none"`` it is a ``ValueError`` (it would silently do nothing).
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides the total by the summed weight ``w_t`` of the non-ignored targets
        (index targets) or by the number of rows (probability targets).
    return_grad : bool, default False
        Also return d(reduced loss)/d(logits).
    return_lse : bool, default False
        Also return each row's log-sum-exp of the (capped) logits, shaped like the unreduced
        loss, in the compute dtype (float32 for float16/bfloat16 logits), for every row --
        ignored rows included.  It comes from the same pass (no extra read of the logits).
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
    lse : ndarray
        Only with ``return_lse=True``: the row log-sum-exps (after ``grad`` when both are
        asked for: ``loss, grad, lse``).

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
    >>> loss, lse = fl.cross_entropy(logits, np.array([0, 2]), softcap=1.0, return_lse=True)
    >>> bool(np.allclose(lse, np.log(np.exp(np.tanh(logits)).sum(axis=1))))
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
    reduction, eps, zl, cap, nitems, ii = _options(reduction, label_smoothing, z_loss, softcap, num_items,
                                                   ignore_index)
    return_grad = bool(return_grad)
    return_lse = bool(return_lse)
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
    w = _class_weight(xp, weight, C, cdt)
    go = _grad_scale_value(xp, grad_output, reduction)
    gout_rows = None
    if go is None:  # an array (reduction="none"): checked even when no gradient is asked for
        gout_rows = _grad_output_array(xp, grad_output, row_shape, np.dtype(np.float64))
    grad_out = _check_grad_out(xp, grad_out, x, return_grad, [("logits", x), ("target", t)])

    be = xp.kernels(backend)
    N = lay.N
    x2 = lay.view_in(x, cdt)
    if soft:
        t2 = lay.view_in(t, cdt)
        denom = float(N)
    elif reduction == "mean" and nitems is None:
        denom = xp.kept_weight(t2, ii, w, info)
    if nitems is not None:
        denom = nitems
    scale = 1.0 / denom if reduction == "mean" and denom != 0 else (0.0 if reduction == "mean" else 1.0)

    loss_rows = xp.empty(N, np.float64)
    lse_rows = xp.empty(N, np.float64) if return_lse else None
    g2 = gscale = finish = None
    if return_grad:
        g2, finish = lay.output(grad_out, x.dtype, cdt)
        if gout_rows is not None:
            gscale = xp.vec(gout_rows, N, np.float64)
        else:
            gscale = float(go * scale)  # a scalar: no (N,) array to fill on every call
    if soft:
        be.cross_entropy_soft(x2, t2, w, eps, zl, cap, loss_rows, lse_rows, g2, gscale)
    else:
        be.cross_entropy(x2, t2, w, ii, eps, zl, cap, loss_rows, lse_rows, g2, gscale)

    if reduction == "none":
        loss = xp.result(loss_rows, row_shape, x.dtype)
    else:
        loss = _scalar(xp.sum(loss_rows) * scale, cdt)
    out = (loss, finish()) if return_grad else (loss,)
    if return_lse:
        out += (xp.result(lse_rows, row_shape, cdt),)
    return out if len(out) > 1 else loss
