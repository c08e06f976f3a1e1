"""The ``cuda`` backend's array adaptor (see :mod:`fastloss._arrays`).

The public layer runs the same code for device arrays as for NumPy ones; :class:`DeviceArrays`
supplies what only device memory can: Numba device views of the caller's arrays (CuPy,
PyTorch CUDA tensors, Numba device arrays, CUDA DLPack; no copy), the 2-D views the kernels
take (:class:`DeviceLayout`), buffers, float64 sums, the value checks as flag-raising
kernels, and results returned in the caller's library on the caller's stream.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .. import _validate as V
from . import is_device_array
from ._cuda_arrays import (
    _BF16,
    _bcast_scalar,
    _bcast_view,
    _c_strides,
    _cast_to,
    _contiguous,
    _copy,
    _device_sum,
    _empty,
    _extent,
    _fill,
    _flat,
    _flat_cfg,
    _grid2,
    _kern,
    _merge,
    _meta,
    _retype,
    _same_view,
    _simulated,
    _sum_partials,
    _upload,
    _view,
)

_I64_MAX = np.iinfo(np.int64).max


def _torch_from_dlpack(obj):
    """``torch.from_dlpack(obj)`` when PyTorch with CUDA is importable (it takes bfloat16,
    which CuPy has no dtype for), else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch.from_dlpack(obj) if torch.cuda.is_available() else None


def _bf16_supported(name, what):
    """bfloat16 follows the host path's dtype rules, which need ``ml_dtypes`` to name it."""
    if V._BF16 is None:
        raise TypeError(
            f"{name}: {what} need the ml_dtypes package (pip install ml_dtypes), which gives NumPy "
            f"its bfloat16 dtype; found it missing. Install it, or convert with {name}.float()"
        )


# ----------------------------------------------------------------------------- 2-D layout
class DeviceLayout:
    """The device twin of :class:`fastloss._layout.Layout`: an N-d array seen as ``(N, C)``.

    Row-wise: the class ``axes`` moved last and merged.  Elementwise (``axes=None``): the
    array around its last axis, or transposed for a Fortran-ordered one, so that kernels
    walk memory in order.  Inputs are viewed without a copy whenever their strides allow
    (broadcast stride-0 operands included); outputs are written in place into the user's
    buffer when it can be viewed so, else into a temporary copied over once."""

    def __init__(self, xp, x, axes=None):
        nd = len(x.shape)
        if axes is not None:
            order, k = [d for d in range(nd) if d not in axes] + list(axes), nd - len(axes)
        else:
            fortran = nd >= 2 and x.is_f_contiguous() and not x.is_c_contiguous()
            order, k = (list(range(nd))[::-1] if fortran else list(range(nd))), max(nd - 1, 0)
        self.xp, self.shape, self.order, self.k = xp, tuple(x.shape), order, k
        moved = [self.shape[d] for d in order]
        self.N, self.C = math.prod(moved[:k]), math.prod(moved[k:])

    def _moved(self, a):
        return _view(a, [a.shape[d] for d in self.order], [a.strides[d] for d in self.order])

    def _as2(self, a, dtype):
        """A ``(N, C)`` view of ``a`` when its dims merge so and it has ``dtype``, else None."""
        if np.dtype(a.dtype) != np.dtype(dtype) or min(tuple(a.strides) + (0,)) < 0:
            return None
        shape = [a.shape[d] for d in self.order]
        strides = [a.strides[d] for d in self.order]
        rd, cd = _merge(shape[:self.k], [strides[:self.k]]), _merge(shape[self.k:], [strides[self.k:]])
        if len(rd) > 1 or len(cd) > 1:
            return None
        isz = np.dtype(dtype).itemsize
        return _view(a, (self.N, self.C), (rd[0][1][0] if rd else self.C * isz, cd[0][1][0] if cd else isz))

    def view_in(self, a, dtype):
        """``(N, C)`` view of an input shaped like ``x`` in ``dtype``, else a C-contiguous copy."""
        a = self.xp.asarray(a, "input")
        v = self._as2(a, dtype)
        if v is not None:
            return v
        m = self._moved(a)
        dst = _empty((self.N, self.C), dtype, self.xp.stream)
        _copy(m, _view(dst, m.shape, _c_strides(m.shape, np.dtype(dtype).itemsize)), self.xp.stream)
        return dst

    def output(self, user, out_dtype, cdt, wrap=True):
        """``(buf2d, finish)``: the kernel writes ``buf2d`` (``user``'s memory itself when it
        can be viewed as ``(N, C)`` of ``cdt``, else a temporary); ``finish()`` copies a
        temporary over and returns the result (``user``, or a new array in the caller's
        library when ``wrap``)."""
        xp = self.xp
        ud = None
        if user is not None:
            ud = xp.asarray(user, "out")
            v = self._as2(ud, cdt)
            if v is not None:
                return v, lambda: V.mark_written(user)
        tmp = _empty((self.N, self.C), cdt, xp.stream)
        moved_shape = [self.shape[d] for d in self.order]

        def back(dst):
            # tmp seen with the original dim order (moved axes back in place)
            st = _c_strides(moved_shape, np.dtype(cdt).itemsize)
            shp, strd = [0] * len(self.order), [0] * len(self.order)
            for pos, d in enumerate(self.order):
                shp[d], strd[d] = moved_shape[pos], st[pos]
            full = _view(tmp, shp, strd)
            if dst is None:
                return full
            _copy(full, dst, xp.stream)
            return dst

        if ud is not None:
            return tmp, lambda: (back(ud), V.mark_written(user))[1]
        fin = xp.wrap if wrap else (lambda d: d)
        if np.dtype(out_dtype) == np.dtype(cdt):
            return tmp, lambda: fin(back(None))
        return tmp, lambda: fin(back(_empty(self.shape, out_dtype, xp.stream)))


# ----------------------------------------------------------------------------- the adaptor
class DeviceArrays:
    """The array adaptor (:mod:`fastloss._arrays`) of one call on device data: the caller's
    library and current stream, views of its arrays, and results in its library."""

    KIND = "a device array"

    def __init__(self, lead, kernels):
        self._kernels = kernels
        self.lib = "numba"
        self.torch_device = None
        mod = type(lead).__module__.split(".")[0]
        if mod == "torch":
            import torch

            self.lib = "torch"
            self.torch_device = lead.device
            ptr = torch.cuda.current_stream(lead.device).cuda_stream
            self.stream = cuda.external_stream(ptr) if ptr else cuda.default_stream()
        elif mod == "cupy":
            import cupy

            self.lib = "cupy"
            ptr = cupy.cuda.get_current_stream().ptr
            self.stream = cuda.external_stream(ptr) if ptr else cuda.default_stream()
        else:
            s = getattr(lead, "stream", 0)
            self.stream = s if s else cuda.default_stream()

    # -- arrays in
    def asarray(self, obj, name):
        """A Numba device array over device-resident ``obj`` (no copy), or a device copy of a
        host array of numbers (a host array of anything else stays on the host, for the
        public layer's checks to refuse)."""
        if isinstance(obj, np.ndarray) and not obj.dtype.isnative:
            obj = obj.astype(obj.dtype.newbyteorder("="))
        if getattr(obj, "__cuda_ndarray__", False):
            if V._BF16 is not None and np.dtype(obj.dtype) == V._BF16:  # simulator arrays only
                return _BF16(_retype(obj, np.int16))
            return obj
        if isinstance(obj, _BF16):
            return obj
        mod = type(obj).__module__.split(".")[0]
        if mod == "torch" and getattr(obj, "is_cuda", False):
            t = obj.detach()
            if str(t.dtype) == "torch.bfloat16":  # no CUDA array interface: its bits, as int16
                import torch

                _bf16_supported(name, "torch.bfloat16 tensors")
                return _BF16(cuda.as_cuda_array(t.view(torch.int16), sync=False))
            return cuda.as_cuda_array(t, sync=False)
        if hasattr(obj, "__cuda_array_interface__"):
            return cuda.as_cuda_array(obj, sync=False)
        if is_device_array(obj):  # CUDA DLPack without the array interface: go through torch/CuPy
            t = _torch_from_dlpack(obj)
            if t is None:
                try:
                    import cupy
                except ImportError:
                    raise TypeError(
                        f"{name}: a CUDA array without __cuda_array_interface__ ({type(obj).__name__}) is read "
                        f"through DLPack, which needs PyTorch with CUDA or CuPy; found neither"
                    ) from None
                return cuda.as_cuda_array(cupy.from_dlpack(obj), sync=False)
            if str(t.dtype) == "torch.bfloat16" and self.lib == "numba":
                raise TypeError(
                    f"{name}: expected a bfloat16 array from PyTorch, found one from {type(obj).__module__} "
                    f"through DLPack: its results would be Numba device arrays, which cannot hold bfloat16; "
                    f"pass torch.from_dlpack({name}) (results then come back as torch tensors) or convert it to float32"
                )
            return self.asarray(t, name)
        a = np.asarray(obj)
        if a.dtype.kind not in "biufc" and a.dtype != V._BF16:
            return a
        return _upload(a, self.stream)

    def float_array(self, obj, name):
        d = self.asarray(obj, name)
        if isinstance(d, np.ndarray):  # not numbers: the host's TypeError
            d = _upload(V.as_float_array(d, name)[0], self.stream)
        return d, V.float_dtype_or_raise(np.dtype(d.dtype), name)

    def operand(self, obj, name, dtype, shape=None):
        d, _ = self.float_array(obj, name)
        d = self.cast(d, dtype)  # before broadcasting: only the stored values are converted
        return d if shape is None else self.broadcast(d, shape, name)

    def cast(self, a, dtype):
        return _cast_to(a, dtype, self.stream)

    def broadcast(self, a, shape, name, what="the input's shape"):
        V.broadcast_to_or_raise(_meta(a), shape, name, what)
        return _bcast_view(a, shape)

    def expand_last(self, a):
        return _view(a, tuple(a.shape) + (1,), tuple(a.strides) + (0,))

    def const(self, value, dtype):
        return _bcast_scalar(value, dtype, (), self.stream)

    def layout(self, x, axes=None):
        return DeviceLayout(self, x, axes)

    # -- buffers and sums
    def empty(self, n, dtype):
        return _empty((n,), dtype, self.stream)

    def fill(self, v, value):
        _fill(v, value, self.stream)

    def vec(self, a, n, dtype):
        """1-D ``(n,)`` view of an array of ``n`` elements in ``dtype``, or a contiguous copy."""
        a = self.asarray(a, "input")
        dims = _merge(a.shape, [a.strides])
        if np.dtype(a.dtype) == np.dtype(dtype) and len(dims) <= 1 and min(tuple(a.strides) + (0,)) >= 0:
            return _view(a, (n,), (dims[0][1][0] if dims else np.dtype(dtype).itemsize,))
        dst = _empty(a.shape, dtype, self.stream)
        _copy(a, dst, self.stream)
        return _view(dst, (n,), (np.dtype(dtype).itemsize,))

    def sum(self, a) -> float:
        return _device_sum(_flat(a, self.stream), self.stream) if a.size else 0.0

    def sum_to(self, g, shape):
        """Sum the full-size ``g`` onto ``shape`` (1 along the summed axes) in float64 atomics."""
        g = _contiguous(g, self.stream)
        full, n = list(g.shape), math.prod(shape)
        acc = _empty((n,), np.float64, self.stream)
        self.fill(acc, 0.0)
        cs = _c_strides(shape, 1)
        dstride = [0 if shape[k] == 1 and full[k] != 1 else cs[k] for k in range(len(full))]
        if not g.is_c_contiguous():  # F order: the flat index runs over the reversed dims
            full, dstride = full[::-1], dstride[::-1]
        if g.size:
            grid, tpb = _flat_cfg(g.size)
            _kern("sum_to", g.dtype)[grid, tpb, self.stream](
                _flat(g, self.stream), cuda.to_device(np.array(full, np.int64), stream=self.stream),
                cuda.to_device(np.array(dstride, np.int64), stream=self.stream), acc,
            )
        return _view(acc, shape, _c_strides(shape, 8))

    # -- results
    def result(self, a, shape, dtype):
        if a.is_c_contiguous():
            o = self.cast(a, dtype)
        else:
            o = _empty(a.shape, dtype, self.stream)
            _copy(a, o, self.stream)
        return self.wrap(_view(o, shape, _c_strides(shape, np.dtype(dtype).itemsize)))

    def copy(self, a):
        o = _empty(a.shape, a.dtype, self.stream)
        _copy(a, o, self.stream)
        return self.wrap(o)

    def item(self, a) -> float:
        return float(self.to_host(a).reshape(-1)[0])

    def to_host(self, d):
        """Host copy of device array ``d`` (error paths and 0-d values only)."""
        if isinstance(d, np.ndarray):
            return d
        h = d.copy_to_host(stream=self.stream)  # a bfloat16 one comes back as ml_dtypes.bfloat16
        self.stream.synchronize()
        return h

    def wrap(self, d):
        """Return device array ``d`` in the caller's library (zero copy)."""
        if isinstance(d, _BF16):  # only torch tensors (and simulator arrays) bring bfloat16 in
            if self.lib == "torch":
                import torch

                return torch.as_tensor(d.raw, device=self.torch_device).view(torch.bfloat16)
            if _simulated():
                return _retype(d.raw, V._BF16)
            raise TypeError(f"cuda backend: cannot return bfloat16 results as {self.lib} arrays")  # pragma: no cover
        if self.lib == "cupy":
            import cupy

            return cupy.asarray(d)
        if self.lib == "torch":
            import torch

            return torch.as_tensor(d, device=self.torch_device)
        return d

    # -- outputs and value checks
    def as_output(self, obj, name="out"):
        return self.asarray(obj, name) if is_device_array(obj) else None

    @staticmethod
    def writeable(a) -> bool:
        return True

    @staticmethod
    def check_overlap(out, inputs, name):
        """Overlap judged on byte ranges, so interleaved views count as overlapping."""
        eo = _extent(out)
        for in_name, arr in inputs:
            if arr is None or isinstance(arr, np.ndarray) or eo is None or _same_view(out, arr):
                continue
            ea = _extent(arr)
            if ea is not None and ea[0] < eo[1] and eo[0] < ea[1]:
                raise V.overlap_error(name, in_name)

    def any_outside(self, a, lo, hi) -> bool:
        if isinstance(a, _BF16):  # kernels cannot read bfloat16: widened (exactly) first
            a = self.cast(a, np.float32)
        a2 = DeviceLayout(self, a).view_in(a, a.dtype)
        if not a2.size:
            return False
        bad = cuda.to_device(np.array([_I64_MAX], np.int64), stream=self.stream)
        grid, block = _grid2(*a2.shape)
        _kern("check_range", a2.dtype)[grid, block, self.stream](a2, float(lo), float(hi), bad)
        return int(self.to_host(bad)[0]) != _I64_MAX

    def _targets_pass(self, t2, C, ii, w, unsigned):
        """The check kernel over class indices: (a bad index seen, summed weight of the kept rows)."""
        n = t2.shape[0]
        if not n:
            return False, 0.0
        grid, tpb = _flat_cfg(n)
        part = _empty((grid,), np.float64, self.stream)
        bad = cuda.to_device(np.array([_I64_MAX], np.int64), stream=self.stream)
        wd = w if w is not None else _empty((1,), np.float32, self.stream)
        _kern("check_targets", wd.dtype)[grid, tpb, self.stream](t2, C, ii, wd, w is not None, unsigned, bad, part)
        return int(self.to_host(bad)[0]) != _I64_MAX, _sum_partials(part, self.stream)

    def class_indices(self, t, C, ii):
        # 64-bit unsigned indices are read as their int64 bits, never cast: a value above
        # 2**63 - 1 is then negative and flagged as such before any comparison with
        # ignore_index (a cast would wrap it onto a valid or ignored index)
        tdt = np.dtype(t.dtype)
        u64 = tdt.kind == "u" and tdt.itemsize == 8
        t2 = self.vec(_retype(t, np.int64) if u64 else t, t.size, np.int64)
        bad, count = self._targets_pass(t2, C, ii, None, u64)
        return t2, bad, count

    def kept_weight(self, t2, ii, w, count) -> float:
        return count if w is None else self._targets_pass(t2, w.shape[0], ii, w, False)[1]

    def kernels(self, backend):
        return self._kernels(self.stream)

    def linear_ops(self):
        """The device half of ``linear_cross_entropy``'s chunk loop (:mod:`._cuda_linear`)."""
        from ._cuda_linear import DeviceLinearOps

        return DeviceLinearOps(self)
