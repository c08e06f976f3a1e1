"""Validation and normalization shared by every public function.

Everything here runs before any output is written.  Messages name the argument, what was
expected and what was found.  The helpers that judge metadata only (dtype, shape) serve host
and device arrays alike; the checks that need the values are the array adaptors'
(:mod:`fastloss._arrays`).
"""
from __future__ import annotations

import functools
import math
import numbers
import operator
import sys

import numpy as np

REDUCTIONS = ("mean", "sum", "none")

_NATIVE = (np.dtype(np.float32), np.dtype(np.float64))


@functools.cache
def _bf16():
    """ml_dtypes' bfloat16 dtype (None without ml_dtypes), imported at its first need, not at
    ``import fastloss``: importing ml_dtypes takes ~0.4 s, three quarters of the import time
    it would add.  A bfloat16 array only exists once ml_dtypes (or torch) is loaded anyway."""
    try:  # optional: ml_dtypes.bfloat16 is computed in float32 like float16
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    except Exception:  # pragma: no cover - ml_dtypes missing
        return None


def __getattr__(name):  # ``_validate._BF16`` for the adaptors: the lazily imported dtype
    if name == "_BF16":
        return _bf16()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_F16 = np.dtype(np.float16)


def _is_low(dtype) -> bool:
    """float16 or bfloat16: stored narrow, computed in float32.  (A dtype named bfloat16 can
    only be ml_dtypes' -- or a look-alike, which the comparison rejects -- so ml_dtypes is
    imported here only when such a dtype is actually seen.)"""
    return dtype == _F16 or (dtype.name == "bfloat16" and dtype == _bf16())


def float_dtype_or_raise(dtype, name: str) -> np.dtype:
    """Return the compute dtype (float32/float64) for a values array of ``dtype``."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and not dtype.isnative:  # byte-swapped data: judged by its native twin
        dtype = dtype.newbyteorder("=")
    if dtype in _NATIVE:
        return dtype
    if _is_low(dtype):
        return np.dtype(np.float32)
    if dtype.kind == "f":  # longdouble
        fix = "float64"
    else:
        fix = "float32"
    raise TypeError(
        f"{name}: expected a floating array (float16, bfloat16, float32 or float64), found dtype "
        f"{dtype}; convert it with {name}.astype(np.{fix})"
    )


def _is_torch(obj) -> bool:
    return type(obj).__module__.split(".")[0] == "torch" and hasattr(obj, "requires_grad")


def host_array(a, name: str):
    """``np.asarray(a)``, with a PyTorch CPU tensor taken as a zero-copy view (bfloat16 ones as
    ``ml_dtypes.bfloat16``) and one that requires grad refused with a pointer to
    :mod:`fastloss.torch` (NumPy would raise torch's own ``Can't call numpy()`` there)."""
    if not _is_torch(a):
        return np.asarray(a)
    if a.requires_grad:
        raise TypeError(
            f"{name}: expected an array, found a torch.Tensor that requires grad; the fastloss functions "
            f"answer NumPy arrays outside autograd: use fastloss.torch (its functions record the gradient "
            f"for loss.backward()), or pass {name}.detach()"
        )
    if str(a.dtype) == "torch.bfloat16":
        bf16 = _bf16()
        if bf16 is None:  # pragma: no cover - ml_dtypes missing
            raise TypeError(f"{name}: a bfloat16 tensor needs the ml_dtypes package (pip install ml_dtypes)")
        return a.view(sys.modules["torch"].int16).numpy().view(bf16)
    return a.numpy()


def mark_written(out):
    """Tell PyTorch's autograd that ``out`` was written (``out`` a tensor, or a NumPy view of
    one, as ``tensor.numpy()`` gives): its version counter is bumped, so a graph that saved
    the tensor before the write raises instead of using the new values silently. Returns ``out``."""
    t = out
    while isinstance(t, np.ndarray):
        t = t.base
    if t is not None and _is_torch(t):
        sys.modules["torch"].autograd.graph.increment_version(t)
    return out


def as_float_array(a, name: str):
    """``np.asarray(a)`` checked to hold floating values; returns (array, compute dtype).

    An array of non-native byte order (``>f8`` on a little-endian machine, as read from some
    files) is converted to native order once: the kernels and every result use native dtypes.
    """
    arr = host_array(a, name)
    if arr.dtype == object:
        raise TypeError(
            f"{name}: expected a floating array-like, found dtype object (ragged or non-numeric "
            f"input); convert it with np.asarray({name}, dtype=np.float32)"
        )
    cdt = float_dtype_or_raise(arr.dtype, name)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr, cdt


def as_cast(a, name: str, dtype, shape=None):
    """A floating operand (target, weight, ...) cast to the compute ``dtype``; if ``shape`` is
    given it must broadcast to it without enlarging it, and the result is broadcast (a view)."""
    arr, _ = as_float_array(a, name)
    if arr.dtype != dtype:
        arr = arr.astype(dtype)
    if shape is not None:
        arr = broadcast_to_or_raise(arr, shape, name)
    return arr


def broadcast_to_or_raise(arr, shape, name, what="the input's shape"):
    shape = tuple(shape)
    try:
        b = np.broadcast_shapes(arr.shape, shape)
    except ValueError:
        b = None
    if b != shape:
        raise ValueError(f"{name}: expected a shape broadcastable to {what} {shape}, found {arr.shape}")
    return np.broadcast_to(arr, shape)


def check_reduction(reduction, allowed=REDUCTIONS) -> str:
    if not isinstance(reduction, str) or reduction not in allowed:
        raise ValueError(f"reduction: expected one of {', '.join(map(repr, allowed))}, found {reduction!r}")
    return reduction


def check_real(value, name: str, lo=None, hi=None, lo_open=False) -> float:
    # a Python float (the common case) skips the type tests, and math.isfinite is a tenth of
    # np.isfinite's time on a scalar: every call checks a few of these
    if type(value) is not float and (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name}: expected a real number, found {type(value).__name__} {value!r}")
    v = float(value)
    bad = not math.isfinite(v)
    if lo is not None:
        bad |= v <= lo if lo_open else v < lo
    if hi is not None:
        bad |= v > hi
    if bad:
        lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_s = "" if hi is None else f"<= {hi}"
        rng = " and ".join(s for s in (lo_s, hi_s) if s) or "finite"
        raise ValueError(f"{name}: expected a finite number {rng}, found {value!r}")
    return v


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def check_int(value, name: str, int64=False) -> int:
    """``value`` as a Python int; with ``int64`` it must fit a 64-bit signed integer (what the
    kernels take), else ``ValueError``."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected an integer, found bool {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an integer, found {type(value).__name__} {value!r}") from None
    if int64 and not _INT64_MIN <= v <= _INT64_MAX:
        raise ValueError(f"{name}: expected an integer in [{_INT64_MIN}, {_INT64_MAX}], found {value!r}")
    return v


def normalize_axis(axis, ndim: int, name="axis") -> int:
    ax = check_int(axis, name)
    if not -ndim <= ax < ndim:
        raise ValueError(f"{name}: expected an integer in [{-ndim}, {ndim}) for an array with {ndim} dimension(s), found {axis}")
    return ax % ndim


def check_class_target(dtype, shape, xshape, ax: int, axis) -> bool:
    """The rules of a cross-entropy ``target`` that need only its metadata (``dtype`` and
    ``shape``), for logits of shape ``xshape`` with classes along ``ax`` (``axis`` as the
    user gave it); returns whether it holds class probabilities.

    Floating targets are probabilities of the logits' shape; integer targets are class indices
    of the logits' shape without the class axis.  A float target of the index shape and a
    target that fits another class axis (transposed logits) get a hint at the likely fix.
    """
    dtype, shape, xshape = np.dtype(dtype), tuple(shape), tuple(xshape)
    kind = dtype.kind
    row_shape = tuple(s for i, s in enumerate(xshape) if i != ax)
    if kind in "fV":
        if shape != xshape:
            hint = ("; class indices must be integers: convert them with target.astype(np.int64)"
                    if shape == row_shape else "")
            raise ValueError(
                f"target: expected class probabilities of the logits' shape {xshape} or class indices "
                f"of shape {row_shape}, found floating values of shape {shape}{hint}"
            )
        return True
    if kind not in "iu":
        raise TypeError(
            f"target: expected integer class indices or floating class probabilities, found dtype "
            f"{dtype}; convert it with target.astype(np.int64)"
        )
    if shape != row_shape:
        hint = ""
        for k in range(len(xshape)):
            if k != ax and tuple(s for i, s in enumerate(xshape) if i != k) == shape:
                # the target is right for logits with the classes along axis k
                hint = (f"; it fits logits of shape {xshape} with the classes along axis {k}: pass axis={k}, "
                        f"or transpose the logits")
                break
        raise ValueError(f"target: expected class indices of shape {row_shape} (logits without axis {axis}), "
                         f"found {shape}{hint}")
    return False


def first_position(mask, shape):
    """Index tuple of the first True of ``mask`` (for error messages)."""
    flat = int(np.argmax(mask.reshape(-1)))
    return tuple(int(i) for i in np.unravel_index(flat, shape)) if shape else ()


def same_buffer(a, b) -> bool:
    """True if ``a`` and ``b`` are the very same view of memory (in-place use)."""
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.shape == b.shape
        and a.strides == b.strides
    )


def check_no_partial_overlap(out, inputs, name="grad_out"):
    """An output may be exactly an input (in place) but must not partly overlap one."""
    for in_name, arr in inputs:
        if isinstance(arr, np.ndarray) and np.may_share_memory(out, arr) and not same_buffer(out, arr):
            try:
                overlap = np.shares_memory(out, arr, max_work=10**6)
            except np.exceptions.TooHardError:  # undecidable cheaply: refuse rather than risk it
                overlap = True
            if overlap:
                raise overlap_error(name, in_name)


def overlap_error(name, in_name):
    """The error for an output ``name`` that partly overlaps the input ``in_name``."""
    return ValueError(
        f"{name}: expected either {in_name} itself (in place) or an array that does not "
        f"overlap it, found an array partly overlapping {in_name}"
    )
