"""The public layer's shared plumbing: argument helpers every public function uses,
written once for host and device arrays against the array adaptor ``xp``
(:mod:`fastloss._arrays`), and the messages of the checks that need the values.
"""
from __future__ import annotations

import numpy as np

from .. import _dispatch
from .._validate import first_position, float_dtype_or_raise, host_array, normalize_axis

_I64_MAX = np.iinfo(np.int64).max


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
    return xp.asarray(obj, name) if _dispatch.is_device_array(obj) else host_array(obj, name)


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
    not partly overlapping an input. Returns the output to write (:func:`_as_given`)."""
    o = xp.as_output(obj, name)
    if o is None or tuple(o.shape) != tuple(shape) or np.dtype(o.dtype) != np.dtype(dtype):
        raise ValueError(
            f"{name}: expected {xp.KIND} of shape {tuple(shape)} and dtype {np.dtype(dtype)}, found "
            f"{type(obj).__name__} of shape {getattr(obj, 'shape', None)} and dtype {getattr(obj, 'dtype', None)}"
        )
    _check_writeable_no_overlap(xp, name, o, inputs)
    return _as_given(o, obj)


def _check_writeable_no_overlap(xp, name, o, inputs):
    if not xp.writeable(o):
        raise ValueError(f"{name}: expected a writeable array, found a read-only one")
    xp.check_overlap(o, inputs, name)


def _check_grad_out(xp, grad_out, x, return_grad, inputs, name="grad_out"):
    """``grad_out`` (given only with ``return_grad``): an array of the call's kind with exactly
    the shape and dtype of ``x``, writeable, ``x`` itself or not overlapping an input.
    Returns the output to write (:func:`_as_given`; None when not given)."""
    if grad_out is None:
        return None
    if not return_grad:
        raise ValueError(f"{name}: expected None unless return_grad=True, found an array (pass return_grad=True to get the gradient)")
    g = xp.as_output(grad_out, name)
    if g is None:
        raise ValueError(f"{name}: expected {xp.KIND}, found {type(grad_out).__name__}")
    if tuple(g.shape) != tuple(x.shape) or np.dtype(g.dtype) != np.dtype(x.dtype):
        raise ValueError(
            f"{name}: expected an array of shape {tuple(x.shape)} and dtype {np.dtype(x.dtype)}, "
            f"found shape {tuple(g.shape)} and dtype {np.dtype(g.dtype)}"
        )
    _check_writeable_no_overlap(xp, name, g, inputs)
    return _as_given(g, grad_out)


def _as_given(checked, given):
    """The output to write: a host one as its NumPy array (a CPU tensor's view), a device one
    as the caller gave it (the device layout views it, and returns the caller's object)."""
    return checked if isinstance(checked, np.ndarray) else given


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
