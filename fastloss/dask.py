r"""The fastloss functions on Dask arrays: lazy, chunked along rows and/or classes, on any Dask
scheduler (threads, processes, a ``dask.distributed`` cluster).

>>> import dask, dask.array as da, numpy as np, fastloss.dask as fld
>>> x = da.from_array(np.random.default_rng(0).normal(size=(6, 10)), chunks=(3, 4))
>>> t = da.from_array(np.arange(6), chunks=3)
>>> loss, grad = fld.cross_entropy(x, t, return_grad=True)     # lazy: nothing computed yet
>>> loss, grad = dask.compute(loss, grad, scheduler="threads")  # one pass per block

Every function has the parameters, defaults and semantics of the :mod:`fastloss` function of
the same name (the class axis ``axis`` defaults to -1, ``kl_div`` to ``"batchmean"``, ...)
and returns Dask results: a reduced loss is a 0-d Dask array of the compute dtype (float32
for float16/float32 input, float64 for float64), an unreduced loss a Dask array chunked like
the rows, and the gradient (``return_grad=True``) a Dask array shaped, typed **and chunked**
like the differentiated input.  Nothing is computed inside these functions; compute the
results together (``dask.compute(loss, grad)``) so that each block is read once.

How the class axis is split
---------------------------
No function rechunks the class axis.  A row's log-sum-exp over class chunks
:math:`B_1, \dots, B_m` is the log-sum-exp of the chunks' own log-sum-exps (exact: the
exponentials add up)

.. math:: \operatorname{lse}(x) = \log\sum_k e^{\operatorname{lse}(x_{B_k})}
          = \operatorname{lse}\big(\operatorname{lse}(x_{B_1}), \dots, \operatorname{lse}(x_{B_m})\big),

a :func:`dask.array.reduction` whose chunk, combine and aggregate steps are all
:func:`fastloss.logsumexp` (a tree over many chunks).  :func:`softmax` and
:func:`log_softmax` then map ``exp(x - lse)`` / ``x - lse`` over the blocks.
:func:`cross_entropy` (class indices) passes the global row ``lse`` to the class-sharded
:func:`fastloss.cross_entropy` (``lse=``, ``class_offset=``, ``num_classes=``) on each block,
which returns the block's additive share of the loss and exactly its slice of the gradient
(the first class chunk counts the ``lse`` terms and the z-loss); the shares add up to the
loss.  When the class axis is one chunk, every block is a plain (unsharded) call.

Reductions
----------
Each block computes its ``"sum"`` (accumulated in float64 by the kernel, returned in the
compute dtype); the blocks' sums are added in float64 and ``"mean"`` divides by the global denominator: the element count (or
``input.shape[0]`` for ``kl_div``'s ``"batchmean"``), or for the cross-entropy the summed
weight :math:`\sum_i w_{t_i}` of the non-ignored targets -- a lazy 0-d Dask array reduced
from the targets alone -- or ``num_items``.  The gradient of every block is scaled by
``grad_output / denominator``, so it equals the single-machine gradient.

Limits
------
* Chunks are NumPy arrays (CuPy chunks go through the same public functions, but are not
  tested).  ``backend=None`` is resolved when the graph is built (the current
  :func:`fastloss.get_backend`, so :func:`fastloss.use_backend` applies) and the name is sent
  with the tasks; whether that backend is available is judged where a task runs.
* Outputs are new Dask arrays: ``out=`` and ``grad_out=`` are refused (``ValueError``).
* Class-probability targets of :func:`cross_entropy` need the class axis in one chunk (a
  probability target's share needs the row's global weighted target mass too).
* Bad arguments judged from metadata (dtypes, shapes, options) raise when the graph is
  built; bad values (a class index out of range, probabilities outside [0, 1]) raise when
  the block holding them is computed -- an ``IndexError`` naming the global position.
* Class-chunked input: the partial log-sum-exps and the blocks' shares are float64
  whatever the dtype (a float32-rounded lse or share would cost a confident prediction's
  small loss far more than the spec's float32 tolerance: the first chunk's ``lse`` terms and
  the target chunk's ``-x_t`` nearly cancel).  An unreduced row loss is the float64 sum of
  its shares, exact to float64 rounding of ``|lse|`` (the sharded kernels' own limit): an
  absolute error near ``1e-16 |lse|``, relative only for rows whose loss is near 0.
"""
from __future__ import annotations

import math

import dask.array as da
import numpy as np
from dask.base import is_dask_collection

from . import _api as _fl
from ._api._common import _grad_scale_value, _scalar
from ._api.cross_entropy import _options, row_lse
from ._arrays import HOST
from ._dispatch import _check_name, get_backend
from ._validate import (
    check_class_target,
    check_reduction,
    first_position,
    float_dtype_or_raise,
    host_array,
    normalize_axis,
)

__all__ = [
    "logsumexp",
    "softmax",
    "log_softmax",
    "cross_entropy",
    "binary_cross_entropy_with_logits",
    "kl_div",
    "mse_loss",
]

_I64_MAX = np.iinfo(np.int64).max


# ----------------------------------------------------------------------------- plumbing
def _backend(backend):
    """The backend name sent with the tasks: ``None`` is the caller's current default, fixed
    now (a worker process knows nothing of the caller's ``use_backend``)."""
    return get_backend() if backend is None else _check_name(backend)


def _dask(a, name):
    """``a`` as a Dask array (a NumPy-like one becomes a one-chunk Dask array)."""
    if isinstance(a, da.Array):
        return a
    if is_dask_collection(a):
        raise TypeError(f"{name}: expected a Dask array or an array-like, found {type(a).__name__} (a Dask "
                        f"collection that is not an array); convert it with dask.array.from_delayed")
    h = host_array(a, name)
    if h.dtype == object:
        raise TypeError(f"{name}: expected a numeric array-like, found dtype object (ragged or non-numeric input); "
                        f"convert it with np.asarray({name}, dtype=np.float32)")
    return da.from_array(h, chunks=-1)


def _float_dask(a, name):
    """A floating values argument as a Dask array and its compute dtype (``TypeError`` as the
    core functions raise it)."""
    a = _dask(a, name)
    if any(math.isnan(n) for c in a.chunks for n in c):
        raise ValueError(f"{name}: expected a Dask array of known chunk sizes, found unknown (NaN) ones "
                         f"{a.chunks}; call {name}.compute_chunk_sizes() first")
    if a.dtype == object:
        raise TypeError(f"{name}: expected a floating array-like, found dtype object; convert it with "
                        f"{name}.astype(np.float32)")
    return a, float_dtype_or_raise(a.dtype, name)


def _no_output(value, name):
    if value is not None:
        raise ValueError(f"{name}: expected None (Dask arrays are immutable: the result is a new Dask array), "
                         f"found {type(value).__name__}")


def _like(a, name, shape, chunks, what="the input's shape"):
    """``a`` (Dask or array-like) broadcast to ``shape`` without enlarging it, chunked as
    ``chunks``: its own full-size axes are rechunked to ``chunks`` (cheap for the small
    operands that broadcast), its size-1 ones are broadcast as views, never copied."""
    a = _dask(a, name)
    shape = tuple(shape)
    try:
        b = np.broadcast_shapes(a.shape, shape)
    except ValueError:
        b = None
    if b != shape:
        raise ValueError(f"{name}: expected a shape broadcastable to {what} {shape}, found {tuple(a.shape)}")
    if a.ndim < len(shape):
        a = a.reshape((1,) * (len(shape) - a.ndim) + tuple(a.shape))
    own = tuple(chunks[d] if a.shape[d] == shape[d] else (1,) for d in range(len(shape)))
    if a.chunks != own:
        a = a.rechunk(own)
    if tuple(a.shape) == shape:
        return a
    return da.broadcast_to(a, shape, chunks=chunks)


def _offsets(x):
    """One 1-element Dask array per axis of ``x`` holding its blocks' first indices, to pass
    to :func:`dask.array.blockwise` aligned with ``x``'s blocks (each block learns where it
    is: its first class for the sharded call, its first row for error messages)."""
    out = []
    for d, c in enumerate(x.chunks):
        starts = np.concatenate([[0], np.cumsum(c)[:-1]]).astype(np.int64)
        out += [da.from_array(starts, chunks=1), (d,)]
    return out


def _tuples(func, x, args, **kwargs):
    """A Dask array whose block ``b`` is ``func(x_b, ...)``, a tuple (its declared chunks are
    ``x``'s: only :func:`_pick` reads it).  ``args`` are (array, index) pairs for
    :func:`dask.array.blockwise`, indices over ``range(x.ndim)`` (``x.ndim`` itself: a
    contracted axis, the whole array given to every block), already chunked like ``x``."""
    ind = tuple(range(x.ndim))
    return da.blockwise(func, ind, x, ind, *args, *_offsets(x), dtype=object, meta=np.empty((0,) * x.ndim, object),
                        concatenate=True, align_arrays=False, **kwargs)


def _item(r, i):
    return r[i]


def _pick(R, i, chunks, dtype):
    """Item ``i`` of every block of a :func:`_tuples` array, as a Dask array of ``chunks``."""
    return R.map_blocks(_item, i, chunks=chunks, dtype=dtype, meta=np.empty((0,) * len(chunks), dtype))


def _one_per_block(x):
    return tuple((1,) * len(c) for c in x.chunks)


def _total(partials, cdt, scale=None):
    """The 0-d loss: the blocks' float64 partial sums added in float64, times ``scale`` (a
    number, or a lazy 0-d denominator ``D`` whose scale is ``1/D``, 0 when ``D`` is 0), as the
    compute dtype."""
    s = partials.sum(dtype=np.float64)
    if scale is None or not isinstance(scale, da.Array):
        return da.blockwise(_finish_scalar, (), s, (), None if scale is None else float(scale), None,
                            cdt, None, dtype=cdt, meta=np.empty((), cdt))
    return da.blockwise(_finish_mean, (), s, (), scale, (), cdt, None, dtype=cdt, meta=np.empty((), cdt))


def _finish_scalar(s, scale, cdt):
    v = float(s) if scale is None else float(s) * scale
    return np.asarray(_scalar(v, cdt))


def _inv(d):
    """``1/d`` for a ``"mean"`` denominator, 0 when it is 0 (the core functions' rule: nothing
    to average gives loss 0 and a zero gradient)."""
    d = float(d)
    return 1.0 / d if d != 0 else 0.0


def _finish_mean(s, d, cdt):
    return np.asarray(_scalar(float(s) * _inv(d), cdt))


def _go_scalar(grad_output, reduction):
    """A scalar upstream gradient: a float (checked as the core functions check it), a 0-d
    Dask array (kept lazy), or None for an array with ``reduction="none"``."""
    if isinstance(grad_output, da.Array):
        if grad_output.ndim == 0:
            if grad_output.dtype.kind not in "iuf":
                raise TypeError(f"grad_output: expected real numbers, found dtype {grad_output.dtype}")
            return grad_output
        if reduction != "none":
            raise ValueError(f"grad_output: expected a scalar for reduction={reduction!r} (the loss is a scalar), "
                             f"found an array of shape {tuple(grad_output.shape)}")
        return None
    return _grad_scale_value(HOST, grad_output, reduction)


def _go_array(grad_output, shape, chunks):
    """``grad_output`` for ``reduction="none"``, broadcast to the unreduced loss and chunked
    like it."""
    g = _dask(grad_output, "grad_output")
    if g.dtype.kind not in "iu":
        float_dtype_or_raise(g.dtype, "grad_output")
    return _like(g, "grad_output", shape, chunks, "the unreduced loss shape")


def _gscale(go, d, scale):
    """The gradient scale of a block: the upstream ``go`` (a number or 0-d array) times the
    reduction's factor: ``1/d`` for a lazy ``"mean"`` denominator ``d`` (0 when ``d`` is 0),
    else the ``scale`` known when the graph was built."""
    return float(go) * (_inv(d) if d is not None else scale)


# ----------------------------------------------------------------------------- normalizers
def _lse_chunk(b, axis, keepdims, backend, softcap=None, computing_meta=False):
    """One block's own log-sum-exp over ``axis`` (kept, size 1), in float64: of the logits, or
    with ``softcap`` of the capped logits (from the cross-entropy kernel's own pass, every row
    ignored: no capped copy of the block).

    Kept in float64 whatever the block's dtype (the kernel's own float64 sum, from
    :func:`fastloss._api.cross_entropy.row_lse`): :func:`fastloss.logsumexp` rounds a float32
    block's lse to float32, an error of up to ``6e-8 |lse|`` that ``p = exp(x - lse)`` and the
    loss ``lse - x_t`` would inherit (1e-6 and more at ``|lse|`` ~ 30: beyond the spec's
    float32 tolerance where the loss is far below ``|lse|``).  Several axes at once (only
    :func:`logsumexp` asks for that) go through a float64 copy of the block."""
    if computing_meta:
        return np.empty((0,) * b.ndim, np.float64)
    if len(axis) == 1:
        (ax,) = axis
        return np.expand_dims(row_lse(b, axis=ax, softcap=softcap, backend=backend), ax)
    return _fl.logsumexp(b.astype(np.float64), axis=axis, keepdims=True, backend=backend)


def _lse_combine(p, axis, keepdims, backend, computing_meta=False):
    """The log-sum-exp of the blocks' log-sum-exps (exact: ``log sum_k exp(lse_k)``)."""
    if computing_meta:
        return p
    return _fl.logsumexp(p, axis=axis, keepdims=keepdims, backend=backend)


def _lse(x, axes, keepdims, backend, softcap=None):
    """The global log-sum-exp of ``x`` over ``axes`` as a float64 Dask array, without
    rechunking: a tree of :func:`fastloss.logsumexp` over the blocks' own values."""
    out_ndim = x.ndim if keepdims else x.ndim - len(axes)
    return da.reduction(
        x, _lse_chunk_bound(backend, softcap), _lse_combine_bound(backend),
        combine=_lse_combine_bound(backend), axis=axes, keepdims=keepdims, dtype=np.float64,
        meta=np.empty((0,) * out_ndim, np.float64), concatenate=True,
    )


class _lse_chunk_bound:
    """:func:`_lse_chunk` with its options bound (a picklable callable for distributed
    workers; :func:`functools.partial` would hide ``computing_meta`` from dask)."""

    def __init__(self, backend, softcap):
        self.backend, self.softcap = backend, softcap

    def __call__(self, b, axis=None, keepdims=True, computing_meta=False):
        return _lse_chunk(b, axis, keepdims, self.backend, self.softcap, computing_meta)


class _lse_combine_bound:
    def __init__(self, backend):
        self.backend = backend

    def __call__(self, p, axis=None, keepdims=True, computing_meta=False):
        return _lse_combine(p, axis, keepdims, self.backend, computing_meta)


def logsumexp(x, axis=-1, keepdims=False, *, backend=None):
    r"""Log-sum-exp of a Dask array along ``axis``, exact over any chunking.

    .. math:: \operatorname{lse}(x) = \log\sum_k e^{\operatorname{lse}(x_{B_k})}

    over the chunks :math:`B_k` of the reduced axes: each block's own
    :func:`fastloss.logsumexp` (max-shifted, so nothing overflows), then the log-sum-exp of
    those partial values (a :func:`dask.array.reduction` tree), never a rechunk.  Same rules
    as :func:`fastloss.logsumexp`: ``+inf`` anywhere in a row gives ``+inf``, a row of only
    ``-inf`` gives ``-inf``, NaN propagates.

    Parameters
    ----------
    x : dask.array.Array or array_like
        Floating values (float16/bfloat16: partial values in float32, result in ``x``'s dtype).
    axis : int, tuple of int or None, default -1
        Axis or axes to reduce; ``None`` reduces all of them.
    keepdims : bool, default False
        Keep the reduced axes with size 1.
    backend : str, optional
        The kernels' backend (see :func:`fastloss.logsumexp`); ``None``: the current default,
        resolved now.

    Returns
    -------
    dask.array.Array
        Chunked like ``x`` along the kept axes, in ``x``'s dtype; a full reduction is a 0-d
        array of the compute dtype (as the NumPy scalar :func:`fastloss.logsumexp` returns).

    Examples
    --------
    >>> import dask.array as da, numpy as np, fastloss.dask as fld
    >>> x = da.from_array(np.array([[1000.0, 1000.0, 1000.0, 1000.0]]), chunks=(1, 2))
    >>> round(float(fld.logsumexp(x, axis=1).compute(scheduler="threads")[0]), 9)  # 1000 + log 4, no overflow
    1001.386294361
    """
    from ._api._common import _class_axes

    x, cdt = _float_dask(x, "x")
    be = _backend(backend)
    keepdims = bool(keepdims)
    if x.ndim == 0:  # the log-sum-exp of one value is that value (as fastloss.logsumexp)
        for ax in axis if isinstance(axis, tuple) else (() if axis is None else (axis,)):
            normalize_axis(ax, 1)
        return x.astype(x.dtype if keepdims else cdt)
    axes = _class_axes(axis, x.ndim)
    dtype = x.dtype if keepdims or len(axes) < x.ndim else cdt  # a full reduction: the compute dtype
    if all(len(x.chunks[a]) == 1 for a in axes):  # every row in one block: the kernel itself
        red = tuple((1,) if i in axes else c for i, c in enumerate(x.chunks) if keepdims or i not in axes)
        return x.map_blocks(_lse_block, axes, keepdims, be, chunks=red, drop_axis=() if keepdims else axes,
                            dtype=dtype, meta=np.empty((0,) * len(red), dtype))
    return _lse(x, axes, keepdims, be).astype(dtype)


def _lse_block(b, axes, keepdims, backend):
    return np.asarray(_fl.logsumexp(b, axis=axes, keepdims=keepdims, backend=backend))


def _softmax_block(xb, lb, log):
    """``x - lse`` or ``exp(x - lse)`` of one block, with ``lse`` the row's global value:
    exactly :func:`fastloss.log_softmax` / :func:`fastloss.softmax` of the row, including
    their rules -- a ``-inf`` entry gives ``-inf`` / 0, a row of only ``-inf`` (``lse = -inf``)
    or holding ``+inf`` (``lse = +inf``) gives NaN throughout."""
    with np.errstate(invalid="ignore", over="ignore"):
        z = xb.astype(np.float64) - lb  # lb: float64; exp and the difference exact to x's precision
        z = np.where(np.isposinf(lb), np.nan, z)
        out = z if log else np.exp(z)
    return out.astype(xb.dtype, copy=False)


def _normalized(x, axis, out, backend, log):
    _no_output(out, "out")
    x, cdt = _float_dask(x, "x")
    if x.ndim == 0:
        raise ValueError("x: expected an array with at least 1 dimension (the class axis), found a 0-d array")
    ax = normalize_axis(axis, x.ndim)
    be = _backend(backend)
    fn = _fl.log_softmax if log else _fl.softmax
    if len(x.chunks[ax]) == 1:  # every row in one block: the fused kernel itself
        return x.map_blocks(fn, axis=ax, backend=be, dtype=x.dtype, meta=np.empty((0,) * x.ndim, x.dtype))
    lse = _lse(x, (ax,), True, be)
    return da.map_blocks(_softmax_block, x, lse, log, dtype=x.dtype, meta=np.empty((0,) * x.ndim, x.dtype))


def softmax(x, axis=-1, *, out=None, backend=None):
    r"""Softmax of a Dask array along ``axis``: :math:`\sigma(x)_j = e^{x_j - \operatorname{lse}(x)}`.

    With the class axis in one chunk, each block is :func:`fastloss.softmax` itself.  With
    class chunks, the global row ``lse`` is reduced first (see :func:`logsumexp`: the lse of
    the chunks' lse values) and each block is ``exp(x - lse)`` -- every exponent ``<= 0``.
    Entries of ``-inf`` give exactly 0; a row of only ``-inf`` or holding ``+inf`` gives NaN,
    as :func:`fastloss.softmax` and PyTorch.

    Parameters
    ----------
    x : dask.array.Array or array_like
        Floating values.
    axis : int, default -1
        The class axis.
    out : None
        Not accepted (``ValueError``): Dask arrays are immutable.
    backend : str, optional
        See :func:`logsumexp`.

    Returns
    -------
    dask.array.Array
        Shape, dtype and chunks of ``x``.

    Examples
    --------
    >>> import dask.array as da, numpy as np, fastloss.dask as fld
    >>> x = da.from_array(np.array([[0.0, np.log(3.0)]]), chunks=(1, 1))
    >>> fld.softmax(x).compute(scheduler="threads").round(6).tolist()
    [[0.25, 0.75]]
    """
    return _normalized(x, axis, out, backend, log=False)


def log_softmax(x, axis=-1, *, out=None, backend=None):
    r"""Log-softmax of a Dask array along ``axis``: :math:`x_j - \operatorname{lse}(x)`.

    As :func:`softmax`: one fused :func:`fastloss.log_softmax` per block when the class axis
    is one chunk, else ``x - lse`` with the global row ``lse`` (never ``log(softmax(x))``).

    Parameters
    ----------
    x : dask.array.Array or array_like
        Floating values.
    axis : int, default -1
        The class axis.
    out : None
        Not accepted (``ValueError``): Dask arrays are immutable.
    backend : str, optional
        See :func:`logsumexp`.

    Returns
    -------
    dask.array.Array
        Shape, dtype and chunks of ``x``.

    Examples
    --------
    >>> import dask.array as da, numpy as np, fastloss.dask as fld
    >>> x = da.from_array(np.array([[0.0, 1e4]]), chunks=(1, 1))
    >>> fld.log_softmax(x).compute(scheduler="threads").tolist()
    [[-10000.0, 0.0]]
    """
    return _normalized(x, axis, out, backend, log=True)


# ----------------------------------------------------------------------------- cross-entropy
def _global_position(mask, offs):
    """The first True of a block's ``mask`` as a position in the whole array (block origin
    ``offs``)."""
    pos = first_position(mask, mask.shape)
    return tuple(int(p + o) for p, o in zip(pos, offs))


def _check_indices(tb, K, ii, row_offs):
    """The core function's ``IndexError`` for a block's out-of-range class index, with the
    position in the whole target (the core call would name the position in the block)."""
    h = np.asarray(tb)
    if h.dtype.kind == "u" and h.dtype.itemsize == 8 and (h > np.uint64(_I64_MAX)).any():
        bad = h > np.uint64(_I64_MAX)
    else:
        t64 = h.astype(np.int64, copy=False)
        bad = ((t64 < 0) | (t64 >= K)) & (t64 != ii)
    if bad.any():
        pos = _global_position(bad, row_offs)
        raise IndexError(f"target: expected class indices in [0, {K}) or ignore_index={ii}, found "
                         f"{h[first_position(bad, h.shape)]} at position {pos}")


def _kept_block(tb, w, K, ii, cdt):
    """A target block's part of the ``"mean"`` denominator: the summed class weight (in the
    compute dtype, added in float64, as the core functions do) of its non-ignored targets, or
    their count.  Out-of-range indices count nothing here: their block's loss raises."""
    t = np.asarray(tb)
    if t.dtype.kind == "u" and t.dtype.itemsize == 8:
        t = np.where(t > np.uint64(_I64_MAX), np.uint64(K), t)
    t = t.astype(np.int64, copy=False)
    keep = (t != ii) & (t >= 0) & (t < K)
    if w is None:
        v = float(np.count_nonzero(keep))
    else:
        v = float(np.sum(np.asarray(w).astype(cdt)[t[keep]], dtype=np.float64))
    return np.full((1,) * t.ndim, v)


class _CEBlock:
    """One block of :func:`cross_entropy` (a picklable callable for distributed workers):
    ``(loss part, grad or None, lse or None)``.

    The loss part is the block's float64 ``"sum"`` (shape ``(1,)*ndim``) or, for
    ``"none"``, its row losses (its shares when ``sharded``) with the class axis kept (size
    1).  ``scale`` is the ``"mean"``/``"sum"`` factor of the gradient when it is known now;
    otherwise the lazy denominator ``d`` arrives with the block."""

    def __init__(self, *, ax, K, dtype, sharded, opts, scale, reduction, return_grad, return_lse, backend):
        self.ax, self.K, self.dtype, self.sharded = ax, K, dtype, sharded
        self.opts, self.scale, self.reduction = opts, scale, reduction
        self.return_grad, self.return_lse, self.backend = return_grad, return_lse, backend

    def __call__(self, xb, tb, lb, w, go, d, *offs):
        ax = self.ax
        if np.asarray(tb).dtype.kind != "f":  # the error names the position in the whole target
            _check_indices(tb, self.K, self.opts["ignore_index"], [int(o[0]) for i, o in enumerate(offs) if i != ax])
        kw = dict(self.opts)
        if self.sharded:
            # the sharded call returns float64 shares whatever the dtype: the first block's lse
            # terms and the others' -x_t terms cancel where the loss is far below |lse|
            kw.update(lse=lb, class_offset=int(offs[ax][0]), num_classes=self.K)
        red, gout = ("none", go) if self.reduction == "none" else ("sum", None)
        if self.return_grad and red == "sum":  # the gradient scaled by grad_output / the global denominator
            gout = _gscale(1.0 if go is None else go, d, self.scale)
        want_lse = self.return_lse and not self.sharded
        res = _fl.cross_entropy(xb, tb, axis=ax, weight=w, reduction=red, return_grad=self.return_grad,
                                return_lse=want_lse, grad_output=gout,
                                backend=self.backend, **kw)
        res = res if isinstance(res, tuple) else (res,)
        if red == "sum":
            part = np.full((1,) * xb.ndim, float(res[0]))
        else:  # row losses (shares, added up over the class blocks), the class axis kept (size 1)
            part = np.expand_dims(np.asarray(res[0], np.float64 if self.sharded else None), ax)
        grad = res[1] if self.return_grad else None
        if grad is not None and grad.dtype != self.dtype:
            grad = grad.astype(self.dtype)
        lse = np.expand_dims(res[-1], ax) if want_lse else None
        return part, grad, lse


def cross_entropy(logits, target, *, axis=-1, weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                  softcap=None, num_items=None, lse=None, class_offset=0, num_classes=None, reduction="mean",
                  return_grad=False, return_lse=False, grad_output=None, grad_out=None, backend=None):
    r"""Softmax cross-entropy of a Dask array of logits, chunked along rows and/or classes.

    The values and gradients of :func:`fastloss.cross_entropy` (PyTorch's ``cross_entropy``
    with the class dimension at ``axis``, plus ``z_loss`` and ``softcap``).  With the class
    axis split into chunks :math:`[o, o + C_b)` of :math:`K` classes, the row log-sum-exp of
    the (capped) logits is reduced first, exactly, as the lse of the chunks' lse values
    (:func:`logsumexp`), and each block then makes one sharded call
    ``fastloss.cross_entropy(block, target, lse=lse, class_offset=o, num_classes=K, ...)``,
    whose result is the block's additive share of the row loss

    .. math:: s_b = [o = 0]\Big(\big((1-\varepsilon)w_t + \tfrac{\varepsilon}{K}\textstyle\sum_k w_k\big)\operatorname{lse} + z\operatorname{lse}^2\Big)
              - [t \in b](1-\varepsilon)\,w_t x_t - \tfrac{\varepsilon}{K}\textstyle\sum_{c \in b} w_c x_c

    (so :math:`\sum_b s_b = \ell`) and whose gradient is exactly the block's slice of the
    unsharded gradient.  ``"mean"`` divides by the global :math:`\sum_i w_{t_i}` over the
    non-ignored rows (a lazy scalar reduced from the targets) or ``num_items``; each block's
    gradient is scaled by ``grad_output`` over it.

    Parameters
    ----------
    logits : dask.array.Array or array_like
        Floating logits with the classes along ``axis``, chunked in any way.
    target : dask.array.Array or array_like
        Integer class indices shaped like ``logits`` without ``axis`` (rechunked to the
        logits' row chunks -- small), or floating class probabilities shaped like ``logits``
        (then the class axis must be one chunk: ``ValueError`` otherwise, suggesting the
        rechunk).
    axis, weight, ignore_index, label_smoothing, z_loss, softcap, num_items, reduction, return_grad, grad_output, backend
        As in :func:`fastloss.cross_entropy` (``weight`` the whole ``(C,)`` vector, a NumPy or
        Dask array, given whole to every block; ``grad_output`` a number or 0-d Dask array,
        or with ``"none"`` an array broadcastable to the unreduced loss).
    return_lse : bool, default False
        Also return the row log-sum-exps of the (capped) logits (compute dtype).
    lse, class_offset, num_classes : None
        Not accepted (``ValueError``): the Dask array holds every class; chunk its class axis
        instead of sharding by hand.
    grad_out : None
        Not accepted (``ValueError``): Dask arrays are immutable.

    Returns
    -------
    loss : dask.array.Array
        0-d, of the compute dtype (reduced), or shaped like the index target and chunked like
        the logits' rows (``"none"``).
    grad : dask.array.Array
        Only with ``return_grad=True``: shape, dtype and chunks of ``logits``.
    lse : dask.array.Array
        Only with ``return_lse=True`` (after ``grad``).

    Raises
    ------
    ValueError, TypeError
        Bad shapes, options or dtypes, when the graph is built.
    IndexError
        A class index outside ``[0, C)`` that is not ``ignore_index``: when its block is
        computed, naming its position in the whole target.

    Examples
    --------
    >>> import dask.array as da, numpy as np, fastloss as fl, fastloss.dask as fld
    >>> x = np.random.default_rng(0).normal(size=(8, 10)); t = np.arange(8)
    >>> loss = fld.cross_entropy(da.from_array(x, chunks=(3, 4)), t, label_smoothing=0.1)
    >>> bool(np.isclose(loss.compute(scheduler="threads"), fl.cross_entropy(x, t, label_smoothing=0.1)))
    True
    """
    _no_output(grad_out, "grad_out")
    if lse is not None or class_offset != 0 or num_classes is not None:
        which = "lse" if lse is not None else ("class_offset" if class_offset != 0 else "num_classes")
        raise ValueError(f"{which}: expected None (fastloss.dask.cross_entropy takes the whole class axis as one "
                         f"Dask array and shards it by its chunks; rechunk the class axis instead), found "
                         f"{type(lse).__name__ if which == 'lse' else repr(locals()[which])}")
    x, cdt = _float_dask(logits, "logits")
    if x.ndim == 0:
        raise ValueError("logits: expected an array with at least 1 dimension (the class axis), found a 0-d array")
    ax = normalize_axis(axis, x.ndim)
    K = x.shape[ax]
    if K == 0:
        raise ValueError(f"logits: expected at least one class along axis {axis}, found shape {tuple(x.shape)}")
    reduction, eps, zl, cap, nitems, ii = _options(reduction, label_smoothing, z_loss, softcap, num_items,
                                                   ignore_index)
    be = _backend(backend)
    return_grad, return_lse = bool(return_grad), bool(return_lse)
    row_shape = tuple(s for i, s in enumerate(x.shape) if i != ax)
    row_chunks = tuple(c for i, c in enumerate(x.chunks) if i != ax)
    t = _dask(target, "target")
    if t.dtype.kind in "fV":
        float_dtype_or_raise(t.dtype, "target")
    soft = check_class_target(t.dtype, t.shape, x.shape, ax, axis)
    sharded = len(x.chunks[ax]) > 1
    if soft and sharded:
        raise ValueError(f"target: expected class indices when the class axis {axis} of the logits is split into "
                         f"chunks {x.chunks[ax]} (a probability target's share needs the row's global weighted mass "
                         f"too), found class probabilities; rechunk the classes into one chunk first: "
                         f"logits.rechunk({{{ax}: -1}}) and target.rechunk({{{ax}: -1}})")
    rind = tuple(i for i in range(x.ndim) if i != ax)
    t = t.rechunk(x.chunks if soft else row_chunks)
    tind = tuple(range(x.ndim)) if soft else rind

    w = None
    if weight is not None:
        w, _ = _float_dask(weight, "weight")
        if tuple(w.shape) != (K,):
            raise ValueError(f"weight: expected a 1-D array of {K} class weights, found shape {tuple(w.shape)}")
    wargs = (w, (x.ndim,)) if w is not None else (None, None)

    go = _go_scalar(grad_output, reduction)
    gargs = (None, None)
    if go is None:  # an array (reduction="none"): checked even when no gradient is asked for
        g = _go_array(grad_output, row_shape, row_chunks)
        gargs = (g, rind) if return_grad else (None, None)
    elif isinstance(go, da.Array):
        gargs = (go, ())
    else:
        gargs = (go, None)

    # the "mean" denominator: num_items, the row count (probabilities), or sum_i w[t_i] over
    # the non-ignored targets, a lazy scalar reduced from the targets alone
    opts = dict(ignore_index=ii, label_smoothing=eps, z_loss=zl, softcap=None if cap == 0.0 else cap)
    D = None
    if reduction == "mean":
        if nitems is not None:
            scale = 1.0 / nitems
        elif soft:
            n = math.prod(row_shape)
            scale = 1.0 / n if n else 0.0
        else:
            parts = da.blockwise(_kept_block, rind, t, rind, *wargs, K, None, ii, None, cdt, None,
                                 dtype=np.float64, adjust_chunks={i: lambda c: 1 for i in rind},
                                 concatenate=True, align_arrays=False, meta=np.empty((0,) * len(rind), np.float64))
            D = parts.sum(dtype=np.float64)
            scale = D
    else:
        scale = 1.0

    largs = (None, None)
    L = None
    if sharded:
        L = _lse(x, (ax,), False, be, None if cap == 0.0 else cap)
        largs = (L, rind)
    dargs = (D, ()) if (D is not None and return_grad) else (None, None)

    R = _tuples(_CEBlock(ax=ax, K=K, dtype=x.dtype, sharded=sharded, opts=opts,
                         scale=scale if D is None else None, reduction=reduction, return_grad=return_grad,
                         return_lse=return_lse, backend=be),
                x, [t, tind, *largs, *wargs, *gargs, *dargs])
    # the per-row outputs, the class axis kept with one entry per class block
    pchunks = tuple((1,) * len(c) if i == ax else c for i, c in enumerate(x.chunks))
    if reduction == "none":
        if sharded:  # the shares of the class blocks added up, in float64
            loss = _pick(R, 0, pchunks, np.float64).sum(axis=ax, dtype=np.float64).astype(x.dtype)
        else:
            loss = _pick(R, 0, pchunks, x.dtype).squeeze(axis=ax)
    else:
        loss = _total(_pick(R, 0, _one_per_block(x), np.float64), cdt, scale if D is None else D)
    out = (loss,)
    if return_grad:
        out += (_pick(R, 1, x.chunks, x.dtype),)
    if return_lse:
        out += (L.astype(cdt) if sharded else _pick(R, 2, pchunks, cdt).squeeze(axis=ax),)
    return out if len(out) > 1 else loss


# ----------------------------------------------------------------------------- elementwise losses
class _EWBlock:
    """One block of an elementwise loss (a picklable callable): ``(loss part, grad or None)``,
    the loss part the block's float64 ``"sum"`` (shape ``(1,)*ndim``) or its element losses."""

    def __init__(self, fn, params, dtype, reduction, scale, return_grad, backend):
        self.fn, self.params, self.dtype, self.reduction = fn, params, dtype, reduction
        self.scale, self.return_grad, self.backend = scale, return_grad, backend

    def __call__(self, xb, *rest):
        ops, go = rest[:-1 - xb.ndim], rest[-1 - xb.ndim]
        kw = dict(self.params)
        kw.update(zip(kw.pop("_names"), ops))
        red, gout = ("none", go) if self.reduction == "none" else ("sum", None)
        if self.return_grad and red == "sum":
            gout = _gscale(1.0 if go is None else go, None, self.scale)
        res = getattr(_fl, self.fn)(xb, reduction=red, return_grad=self.return_grad, grad_output=gout,
                                    backend=self.backend, **kw)
        loss, grad = res if self.return_grad else (res, None)
        part = np.full((1,) * xb.ndim, float(loss)) if red == "sum" else loss
        return part, grad


def _elementwise(fn, x, cdt, names, operands, params, reduction, denom, return_grad, grad_output, backend):
    """An elementwise loss over the blocks of ``x``: ``operands`` (named ``names``) are Dask
    arrays broadcast to ``x`` and chunked like it; ``"mean"`` divides the float64 sum of the
    blocks' sums by ``denom``, and every block's gradient is scaled by ``grad_output / denom``."""
    be = _backend(backend)
    return_grad = bool(return_grad)
    ind = tuple(range(x.ndim))
    go = _go_scalar(grad_output, reduction)
    if go is None:  # an array (reduction="none"): checked even when no gradient is asked for
        g = _go_array(grad_output, x.shape, x.chunks)
        gargs = (g, ind) if return_grad else (None, None)
    else:
        gargs = (go, ()) if isinstance(go, da.Array) else (go, None)
    if reduction == "mean":
        scale = 1.0 / denom if denom else np.nan  # the core functions' rule: the mean of nothing is NaN
    else:
        scale = 1.0
    args = []
    for a in operands:
        args += [a, ind] if a is not None else [None, None]
    p = dict(params, _names=tuple(names))
    R = _tuples(_EWBlock(fn, p, x.dtype, reduction, scale, return_grad, be), x, [*args, *gargs])
    if reduction == "none":
        loss = _pick(R, 0, x.chunks, x.dtype)
    else:
        loss = _total(_pick(R, 0, _one_per_block(x), np.float64), cdt, scale)
    return (loss, _pick(R, 1, x.chunks, x.dtype)) if return_grad else loss


def _operand(a, name, x):
    """A floating operand broadcast to ``x`` (``ValueError`` if it would enlarge it) and chunked
    like it."""
    a, _ = _float_dask(a, name)
    return _like(a, name, x.shape, x.chunks)


def binary_cross_entropy_with_logits(logits, target, *, weight=None, pos_weight=None, reduction="mean",
                                     return_grad=False, grad_output=None, grad_out=None, backend=None):
    r"""Binary cross-entropy on logits of a Dask array, as
    :func:`fastloss.binary_cross_entropy_with_logits` (PyTorch's).

    .. math:: \ell = w\,\big[(1-y)\,z + (1 + (p_w-1)\,y)\,\operatorname{softplus}(-z)\big]

    element by element on each block (the fused kernel); ``"mean"`` is the float64 sum of the
    blocks' sums over the element count, and each block's gradient is scaled by
    ``grad_output`` over that count.

    Parameters
    ----------
    logits : dask.array.Array or array_like
        Floating logits ``z``, chunked in any way.
    target : dask.array.Array or array_like
        Targets ``y`` in [0, 1], the shape of ``logits`` (rechunked like it).
    weight : array_like or dask.array.Array, optional
        Elementwise weight ``w``, broadcastable to ``logits`` (broadcast per block as a view).
    pos_weight : array_like or dask.array.Array, optional
        Weight ``p_w`` of the positive term, broadcast along the last axis (e.g. ``(C,)``).
    reduction, return_grad, grad_output, backend
        As in :func:`fastloss.binary_cross_entropy_with_logits` (see :func:`cross_entropy`
        for ``grad_output``).
    grad_out : None
        Not accepted (``ValueError``): Dask arrays are immutable.

    Returns
    -------
    loss : dask.array.Array
        0-d of the compute dtype, or (``"none"``) shaped and chunked like ``logits``.
    grad : dask.array.Array, only with ``return_grad=True``
        Shape, dtype and chunks of ``logits``.

    Examples
    --------
    >>> import dask.array as da, numpy as np, fastloss.dask as fld
    >>> z = da.zeros((4, 6), chunks=(2, 3))
    >>> round(float(fld.binary_cross_entropy_with_logits(z, da.ones((4, 6))).compute()), 6)  # log 2
    0.693147
    """
    _no_output(grad_out, "grad_out")
    x, cdt = _float_dask(logits, "logits")
    reduction = check_reduction(reduction)
    y, _ = _float_dask(target, "target")
    if tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"target: expected the shape of the input {tuple(x.shape)}, found {tuple(y.shape)}")
    y = y.rechunk(x.chunks)
    w = None if weight is None else _operand(weight, "weight", x)
    pw = None
    if pos_weight is not None:
        pw, _ = _float_dask(pos_weight, "pos_weight")
        if x.ndim and pw.ndim and pw.shape[-1] not in (1, x.shape[-1]):
            raise ValueError(f"pos_weight: expected one weight per class along the last axis ({x.shape[-1]}), "
                             f"found shape {tuple(pw.shape)}")
        pw = _like(pw, "pos_weight", x.shape, x.chunks)
    return _elementwise("binary_cross_entropy_with_logits", x, cdt, ("target", "weight", "pos_weight"),
                        [y, w, pw], {}, reduction, math.prod(x.shape), return_grad, grad_output, backend)


def kl_div(input, target, *, log_target=False, reduction="batchmean", return_grad=False, grad_output=None,
           grad_out=None, backend=None):
    r"""Kullback-Leibler divergence of a Dask array of log-probabilities, as
    :func:`fastloss.kl_div` (PyTorch's ``kl_div``, default ``"batchmean"``).

    .. math:: \ell = y\,(\log y - x) \quad\text{or, with log\_target,}\quad e^{y}(y - x),

    0 where ``y == 0`` (resp. ``y == -inf``), per block; ``"batchmean"`` divides the float64
    sum of the blocks' sums by ``input.shape[0]`` (the whole array's), ``"mean"`` by the
    element count.

    Parameters
    ----------
    input : dask.array.Array or array_like
        Log-probabilities ``x``, chunked in any way.
    target : dask.array.Array or array_like
        Probabilities ``y`` (log-probabilities with ``log_target=True``), broadcastable to
        ``input``.
    log_target : bool, default False
    reduction : {"batchmean", "mean", "sum", "none"}, default "batchmean"
    return_grad, grad_output, backend
        As in :func:`cross_entropy`.
    grad_out : None
        Not accepted (``ValueError``).

    Returns
    -------
    loss : dask.array.Array
        0-d of the compute dtype, or (``"none"``) shaped and chunked like ``input``.
    grad : dask.array.Array, only with ``return_grad=True``

    Examples
    --------
    >>> import dask.array as da, numpy as np, fastloss.dask as fld
    >>> p = da.full((2, 4), 0.25, chunks=(1, 2))
    >>> float(fld.kl_div(da.log(p), p).compute())
    0.0
    """
    _no_output(grad_out, "grad_out")
    x, cdt = _float_dask(input, "input")
    reduction = check_reduction(reduction, ("batchmean", "mean", "sum", "none"))
    t = _operand(target, "target", x)
    if reduction == "batchmean":
        reduction, denom = "mean", (x.shape[0] if x.ndim else 1)
    else:
        denom = math.prod(x.shape)
    return _elementwise("kl_div", x, cdt, ("target",), [t], {"log_target": bool(log_target)}, reduction, denom,
                        return_grad, grad_output, backend)


def mse_loss(input, target, *, reduction="mean", return_grad=False, grad_output=None, grad_out=None, backend=None):
    r"""Mean squared error :math:`\ell = (x - y)^2` of a Dask array, as :func:`fastloss.mse_loss`.

    Per block, then the float64 sum of the blocks' sums (over the element count for
    ``"mean"``); gradient ``2 (x - y)`` times ``grad_output`` (over the count for ``"mean"``).

    Parameters
    ----------
    input : dask.array.Array or array_like
        Predictions ``x``, chunked in any way.
    target : dask.array.Array or array_like
        Targets ``y``, broadcastable to ``input`` (one that would enlarge the loss beyond
        ``input``'s shape is a ``ValueError``).
    reduction, return_grad, grad_output, backend
        As in :func:`fastloss.mse_loss` (see :func:`cross_entropy` for ``grad_output``).
    grad_out : None
        Not accepted (``ValueError``).

    Returns
    -------
    loss : dask.array.Array
        0-d of the compute dtype, or (``"none"``) shaped and chunked like ``input``.
    grad : dask.array.Array, only with ``return_grad=True``

    Examples
    --------
    >>> import dask.array as da, numpy as np, fastloss.dask as fld
    >>> loss, grad = fld.mse_loss(da.from_array(np.array([1.0, 3.0]), chunks=1), np.zeros(2), return_grad=True)
    >>> float(loss.compute()), grad.compute().tolist()
    (5.0, [1.0, 3.0])
    """
    _no_output(grad_out, "grad_out")
    x, cdt = _float_dask(input, "input")
    reduction = check_reduction(reduction)
    t = _operand(target, "target", x)
    return _elementwise("mse_loss", x, cdt, ("target",), [t], {}, reduction, math.prod(x.shape), return_grad,
                        grad_output, backend)
