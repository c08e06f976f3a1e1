"""Array adaptors: what the public layer needs from the memory its arrays live in.

The public functions (:mod:`fastloss._api`) are written once, for host and device data
alike, against the small interface below.  :data:`HOST` serves NumPy arrays (and anything
``np.asarray`` takes); the CUDA backend supplies the same interface for device arrays
(``cuda_backend.device_arrays``: CuPy, PyTorch CUDA tensors, Numba device arrays, DLPack),
with its results in the caller's library and its work on the caller's stream.

An adaptor knows how to hold, view and allocate arrays and runs the checks that need the
data; it never interprets an argument (which is valid, what a reduction means, which error
to raise): that is the public layer's job, from the arrays' metadata (``shape``,
``strides``, ``dtype``) and the few facts an adaptor reports (say, *that* a class index is
out of range; the message is built by the public layer from a host copy).

The interface (every method takes and returns arrays of the adaptor's kind):

``KIND``
    How an output argument of this kind is named in error messages.
``asarray(obj, name)``
    ``obj`` as an array of this kind (no copy when it already is one).
``float_array(obj, name)``
    ``(array, compute dtype)`` of a floating input (float16/bfloat16 compute in float32).
``operand(obj, name, dtype, shape=None)``
    A floating operand cast to ``dtype``, broadcast to ``shape`` (a view) when given.
``copy(a)``, ``cast(a, dtype)``, ``broadcast(a, shape, name, what)``, ``expand_last(a)``, ``const(value, dtype)``
``layout(x, axes=None)``
    The 2-D views the kernels take (:class:`fastloss._layout.Layout`): ``N``, ``C``,
    ``view_in(a, dtype)`` and ``output(user, out_dtype, cdt)``.
``empty(n, dtype)``, ``fill(v, value)``, ``vec(a, n, dtype)``
    1-D buffers; ``vec`` gives a C-contiguous ``(n,)`` copy or view of ``a`` in ``dtype``.
``sum(a)``, ``sum_to(g, shape)``
    float64 sums: of everything (a Python float), or over the axes where ``shape`` is 1.
``result(a, shape, dtype)``
    A computed array as the caller's result: reshaped, rounded once to ``dtype``.
``item(a)``, ``to_host(a)``
    A one-element array's value; a NumPy copy (error messages, 0-d values).
``as_output(obj)``, ``writeable(a)``, ``check_overlap(out, inputs, name)``
    An output argument as an array of this kind (None when it is not one), and its checks.
``any_outside(a, lo, hi)``
    Whether some value lies outside ``[lo, hi]`` (NaN passes).
``class_indices(t, C, ignore_index)``, ``kept_weight(t2, ignore_index, w, info)``
    Class indices as a contiguous int64 ``(N,)`` array, whether one is out of range (and
    not ignored), and the summed weight (or count) of the rows that are not ignored.
``kernels(backend)``
    The kernel set to run (:mod:`fastloss._backends._protocol`).
"""
from __future__ import annotations

import numpy as np

from . import _dispatch, _validate
from ._layout import Layout, rounded
from ._validate import as_cast, as_float_array, broadcast_to_or_raise, check_no_partial_overlap, host_array

_I64_MAX = np.iinfo(np.int64).max


class HostArrays:
    """NumPy arrays in host memory: the reference adaptor."""

    KIND = "a numpy.ndarray"

    asarray = staticmethod(lambda obj, name="an argument": host_array(obj, name))
    float_array = staticmethod(as_float_array)
    operand = staticmethod(as_cast)
    broadcast = staticmethod(broadcast_to_or_raise)
    layout = Layout
    result = staticmethod(lambda a, shape, dtype: rounded(a.reshape(shape), dtype))
    to_host = staticmethod(lambda a: a)

    @staticmethod
    def cast(a, dtype):
        return a.astype(dtype, copy=False)

    @staticmethod
    def copy(a):
        return a.copy()

    @staticmethod
    def expand_last(a):
        return a[..., None]

    @staticmethod
    def const(value, dtype):
        return np.asarray(value, dtype=dtype)

    @staticmethod
    def empty(n, dtype):
        return np.empty(n, dtype)

    @staticmethod
    def fill(v, value):
        v.fill(value)

    @staticmethod
    def vec(a, n, dtype):
        return np.ascontiguousarray(a.reshape(-1), dtype=dtype)

    @staticmethod
    def sum(a) -> float:
        return float(np.sum(a, dtype=np.float64))

    @staticmethod
    def sum_to(g, shape):
        red = tuple(i for i, (a, b) in enumerate(zip(shape, g.shape)) if a == 1 and b != 1)
        return np.sum(g, axis=red, keepdims=True, dtype=np.float64)

    @staticmethod
    def item(a) -> float:
        return float(a.reshape(-1)[0])

    @staticmethod
    def as_output(obj, name="out"):
        # a CPU tensor is written through its NumPy view (its version counter is bumped after
        # the write: _validate.mark_written)
        return host_array(obj, name) if _validate._is_torch(obj) else (obj if isinstance(obj, np.ndarray) else None)

    @staticmethod
    def writeable(a) -> bool:
        return bool(a.flags.writeable)

    check_overlap = staticmethod(check_no_partial_overlap)

    @staticmethod
    def any_outside(a, lo, hi) -> bool:
        with np.errstate(invalid="ignore"):
            return bool(((a < lo) | (a > hi)).any())

    @staticmethod
    def class_indices(t, C, ignore_index):
        if t.dtype.kind == "u" and t.dtype.itemsize == 8 and t.size and int(t.max()) > _I64_MAX:
            # judged before the int64 cast, which would wrap 2**64 - 100 to -100 (a valid
            # ignore_index): the row would be silently ignored
            return None, True, None
        t64 = t.astype(np.int64, copy=False)
        # one reduction and no temporaries in the common case (every target a class): the
        # largest index read as unsigned, where a negative one is >= 2**63 -- below C exactly
        # when every index is a class (a min and a max were 58 us at 262144 targets, this
        # 25 us: 2 % of a 262144 x 10 cross-entropy).  The elementwise test only when some
        # index is out of range or ignored.
        all_classes = not t64.size or int(t64.view(np.uint64).max()) < C
        if not all_classes and (((t64 < 0) | (t64 >= C)) & (t64 != ignore_index)).any():
            return None, True, None
        # (an ignore_index that is a class may be some row's target: the rows are counted)
        nothing_ignored = all_classes and not 0 <= ignore_index < C
        return np.ascontiguousarray(t64.reshape(-1)), False, nothing_ignored

    @staticmethod
    def kept_weight(t2, ignore_index, w, nothing_ignored) -> float:
        if nothing_ignored:
            return float(np.sum(w[t2], dtype=np.float64)) if w is not None else float(t2.size)
        keep = t2 != ignore_index
        return float(np.sum(w[t2[keep]], dtype=np.float64)) if w is not None else float(np.count_nonzero(keep))

    @staticmethod
    def kernels(backend):
        return _dispatch.resolve(backend)


HOST = HostArrays()


def for_call(backend, *objs):
    """The adaptor of a call: the CUDA backend's when an argument lives on a GPU (its first
    such argument gives the caller's library and stream), else :data:`HOST`."""
    for a in objs:
        if a is not None and _dispatch.is_device_array(a):
            return _dispatch.resolve(backend, device=True).device_arrays(a)
    return HOST
