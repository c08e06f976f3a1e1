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


def _shard(lse, class_offset, num_classes, C):
    """``(class_offset, num_classes)`` of a sharded call (``lse`` given), ``(0, None)`` for an
    unsharded one."""
    off = check_int(class_offset, "class_offset", int64=True)
    if lse is None:
        if off != 0 or num_classes is not None:
            raise ValueError("lse: expected the global row log-sum-exp with class_offset or num_classes (the "
                             f"classes are sharded), found None (class_offset={class_offset!r}, "
                             f"num_classes={num_classes!r})")
        return 0, None
    if off < 0:
        raise ValueError(f"class_offset: expected an integer >= 0, found {class_offset!r}")
    if num_classes is None:
        if off != 0:
            raise ValueError("num_classes: expected the number of classes of all shards with class_offset != 0, "
                             "found None")
        return 0, C
    K = check_int(num_classes, "num_classes", int64=True)
    if K < off + C:
        raise ValueError(f"num_classes: expected at least class_offset + C = {off} + {C} = {off + C} (this "
                         f"shard's classes), found {num_classes!r}")
    return off, K


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
    lse=None,
    class_offset=0,
    num_classes=None,
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

    Sharded classes (``lse`` given): ``logits`` hold the classes
    :math:`[o, o + C)` of :math:`K` (``class_offset``, ``num_classes``) and ``lse`` is the global
    row log-sum-exp (``fl.logsumexp`` over the shards' own log-sum-exps).  The result is the
    shard's additive share, one pass over the shard (no max, no sum of exps)::

        share = [o = 0] (((1-eps) w_t + eps/K sum_k w_k) lse + z lse**2)
                - [t in shard] (1-eps) w_t x_t - eps/K sum_{c in shard} w_c x_c

    so the shards' shares add up to the unsharded loss (the ``lse`` terms and the z-loss are
    counted by the first shard, as the spec says), and the gradient
    :math:`p_j A - \ldots` with :math:`p_j = e^{x_j - \operatorname{lse}}` is exactly the
    shard's slice of the unsharded gradient (every shard carries the z-loss's
    :math:`2z\operatorname{lse}\,p_j`).  A share is a difference of lse-sized terms, so the
    sharded loss (and the returned ``lse``) is float64 whatever the logits' dtype, and ``lse``
    should be float64 too: a float32-rounded lse costs the summed loss ``ulp(lse)``, a relative
    error of 1e-3 on the small loss of a confident prediction (``fastloss.distributed`` and
    ``fastloss.dask`` combine each shard's float64 row lse).  The unsharded loss is then
    recovered to float64 rounding of :math:`|\operatorname{lse}|`: exact for any float32
    training logits, but not for logits near 1e12 and beyond, where the unsharded kernels
    (which never add ``lse`` and ``x_t`` apart) stay exact.

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
    lse : array_like, optional
        The global row log-sum-exp of the (capped) logits of all ``num_classes`` classes,
        shaped like the unreduced loss (any floating dtype; used in float64): the classes are
        sharded (see above).  Index targets only: a probability target's share would need the
        global sum of its weighted mass too (``ValueError``).
    class_offset : int >= 0, default 0
        The global index of this shard's first class (with ``lse``).
    num_classes : int, optional
        The number of classes of all shards (with ``lse``); default ``class_offset + C`` when
        ``class_offset`` is 0, required otherwise.  Targets are global indices in
        ``[0, num_classes)``; ``weight`` is the whole ``(num_classes,)`` vector; the smoothing
        mass is spread over ``num_classes`` classes.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides the total by the summed weight ``w_t`` of the non-ignored targets
        (index targets) or by the number of rows (probability targets); sharded, every shard
        divides by the same global denominator (it has every target and the whole weight).
    return_grad : bool, default False
        Also return d(reduced loss)/d(logits).
    return_lse : bool, default False
        Also return each row's log-sum-exp of the (capped) logits, shaped like the unreduced
        loss, in the compute dtype (float32 for float16/bfloat16 logits), for every row --
        ignored rows included.  It comes from the same pass (no extra read of the logits).
        Sharded, it is the given ``lse`` (float64).
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
    xp = _arrays.for_call(backend, logits, target, weight, grad_output, grad_out, lse)
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
    off, K = _shard(lse, class_offset, num_classes, C)
    return_grad = bool(return_grad)
    return_lse = bool(return_lse)
    lay = xp.layout(x, (ax,))
    row_shape = tuple(s for i, s in enumerate(xshape) if i != ax)

    t = xp.asarray(target, "target")
    if np.dtype(t.dtype).kind in "fV":
        float_dtype_or_raise(t.dtype, "target")
    soft = check_class_target(t.dtype, t.shape, xshape, ax, axis)
    if soft and K is not None:
        raise ValueError("lse: expected None with probability targets (sharded classes take class indices: a "
                         "probability target's share needs its global weighted mass too), found an array")
    if not soft:  # the class indices are checked before anything else is judged or written
        t2, bad, info = xp.class_indices(t, K or C, ii)
        if bad:
            raise _index_error(xp, t, K or C, ii)
    w = _class_weight(xp, weight, K or C, cdt)
    if K is not None:
        lse_in = xp.vec(_grad_output_array(xp, lse, row_shape, np.dtype(np.float64), name="lse"), lay.N,
                        np.float64)
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

    # a reduced loss asks the kernels for their total (None: no N row losses written and read
    # back; summed in an order fixed by the shape, see the backend protocol)
    loss_rows = xp.empty(N, np.float64) if reduction == "none" else None
    lse_rows = xp.empty(N, np.float64) if return_lse and K is None else None
    g2 = gscale = finish = None
    if return_grad:
        g2, finish = lay.output(grad_out, x.dtype, cdt)
        if gout_rows is not None:
            gscale = xp.vec(gout_rows, N, np.float64)
        else:
            gscale = float(go * scale)  # a scalar: no (N,) array to fill on every call
    if K is not None:
        total = be.cross_entropy_shard(x2, t2, w, ii, eps, zl, cap, lse_in, off, K, loss_rows, g2, gscale)
        lse_rows = xp.copy(lse_in) if return_lse else None  # a new array, never a view of the caller's
    elif soft:
        total = be.cross_entropy_soft(x2, t2, w, eps, zl, cap, loss_rows, lse_rows, g2, gscale)
    else:
        total = be.cross_entropy(x2, t2, w, ii, eps, zl, cap, loss_rows, lse_rows, g2, gscale)

    # sharded: float64 results -- a share is a difference of lse-sized terms, and rounding it to
    # float32 would lose a small loss (a confident prediction) in the shards' sum
    ldt, rdt = (np.dtype(np.float64),) * 2 if K is not None else (x.dtype, cdt)
    if reduction == "none":
        loss = xp.result(loss_rows, row_shape, ldt)
    else:
        loss = _scalar(float(total) * scale, rdt)
    out = (loss, finish()) if return_grad else (loss,)
    if return_lse:
        out += (xp.result(lse_rows, row_shape, rdt),)
    return out if len(out) > 1 else loss


def row_lse(logits, axis=-1, softcap=None, backend=None):
    r"""The float64 row log-sum-exp of the (capped) logits: a shard's own lse for sharded calls.

    :math:`\operatorname{lse}_i = m_i + \log \sum_j e^{x'_{ij} - m_i}` with
    :math:`x' = s \tanh(x / s)` under ``softcap`` :math:`s` and :math:`m_i` the row max, from the
    cross-entropy kernel's own pass (every row ignored, so no loss or gradient is formed),
    kept in float64: :func:`fastloss.logsumexp` and ``return_lse`` round to the compute dtype,
    and a float32-rounded lse would cost a sharded loss ``ulp(lse)`` -- a relative error of
    1e-3 on the small loss of a confident prediction.  Combine the shards' values with
    ``fastloss.logsumexp(np.stack(values), axis=0)``.  (Private: the building block of
    :mod:`fastloss.distributed` and :mod:`fastloss.dask`.)
    """
    xp = _arrays.for_call(backend, logits)
    x, cdt = xp.float_array(logits, "logits")
    xshape = tuple(x.shape)
    if not xshape:
        raise ValueError("logits: expected an array with at least 1 dimension (the class axis), found a 0-d array")
    ax = normalize_axis(axis, len(xshape))
    if xshape[ax] == 0:
        raise ValueError(f"logits: expected at least one class along axis {axis}, found shape {xshape}")
    cap = 0.0 if softcap is None else check_real(softcap, "softcap", 0.0, lo_open=True)
    lay = xp.layout(x, (ax,))
    row_shape = tuple(s for i, s in enumerate(xshape) if i != ax)
    ignore = -1  # every row ignored: no class index is read
    t2 = xp.empty(lay.N, np.int64)
    xp.fill(t2, ignore)
    loss_rows, lse_rows = xp.empty(lay.N, np.float64), xp.empty(lay.N, np.float64)
    xp.kernels(backend).cross_entropy(lay.view_in(x, cdt), t2, None, ignore, 0.0, 0.0, cap, loss_rows, lse_rows,
                                      None, 1.0)
    return xp.result(lse_rows, row_shape, np.dtype(np.float64))
