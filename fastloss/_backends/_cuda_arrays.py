"""Device memory for the ``cuda`` backend: launch shapes, views, copies, uploads and sums.

The primitives under the backend's array adaptor (:mod:`._cuda_adaptor`) and its launchers
(:mod:`.cuda_backend`): views of device arrays with any shape and byte strides (broadcasts,
axis moves, dim merges; no copy), one strided copy kernel for every dtype pair, host uploads,
and float64 sums from per-block partials.

``torch.bfloat16`` tensors are computed in float32 and answered in bfloat16 like float16
ones (with ``ml_dtypes`` installed, which names the dtype for the host's dtype rules): Numba
has no bfloat16 type, so they enter as their int16 bits (:class:`_BF16`) and cross to and
from float32 only in :func:`_copy`, on the bits (round to nearest even on the way back).
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from .. import _config as cfg
from .. import _validate as V


def _simulated() -> bool:
    return bool(getattr(cuda.config, "ENABLE_CUDASIM", 0))


def _kern(name, dtype):
    from . import _cuda_kernels

    return _cuda_kernels.get(name, np.dtype(dtype))


# ----------------------------------------------------------------------------- launch shapes
def _row_cfg(n: int, c: int):
    """(grid, (bdx, bdy)) for row kernels: a power-of-two number of threads per row
    (enough to cover ``c``, within the bounds of :mod:`fastloss._config`) and several rows
    per block when rows are short."""
    if _simulated():
        lo, hi, per_block = 1, cfg.CUDA_SIM_ROW_MAX_THREADS, cfg.CUDA_SIM_THREADS_PER_BLOCK
    else:
        lo, hi, per_block = cfg.CUDA_ROW_MIN_THREADS, cfg.CUDA_ROW_MAX_THREADS, cfg.CUDA_ROW_BLOCK_THREADS
    bdx = lo
    while bdx < min(c, hi):
        bdx *= 2
    bdy = max(1, per_block // bdx)
    grid = max(1, min(-(-n // bdy), cfg.CUDA_ROW_MAX_BLOCKS))
    return grid, (bdx, bdy)


def _block_shape(cap):
    """(threads per block, most blocks) of the flat and 2-D kernels (``cap`` when on a GPU)."""
    if _simulated():
        return cfg.CUDA_SIM_THREADS_PER_BLOCK, cfg.CUDA_SIM_MAX_BLOCKS
    return cfg.CUDA_THREADS_PER_BLOCK, cap


def _flat_cfg(total: int):
    """(grid, tpb) for 1-D grid-stride kernels; few blocks keep the per-block partials few."""
    tpb, cap = _block_shape(cfg.CUDA_FLAT_MAX_BLOCKS)
    return max(1, min(-(-total // tpb), cap)), tpb


def _grid2(r: int, k: int):
    """((gx, gy), (bdx, bdy)) for the 2-D elementwise/copy kernels over ``(R, K)``: x threads
    cover the K columns (a power of two up to the block size, so a short K packs several rows
    per block), y threads the rows; at most ``cap`` blocks, so the per-block partials stay few."""
    tpb, cap = _block_shape(cfg.CUDA_GRID2_MAX_BLOCKS)
    bdx = 1
    while bdx < min(k, tpb):
        bdx *= 2
    bdy = tpb // bdx
    gx = max(1, min(-(-k // bdx), cap))
    gy = max(1, min(-(-r // bdy), max(1, cap // gx)))
    return (gx, gy), (bdx, bdy)


# ----------------------------------------------------------------------------- device arrays
class _BF16:
    """A bfloat16 device array (a PyTorch ``torch.bfloat16`` CUDA tensor, or under the
    simulator a Numba array of ``ml_dtypes.bfloat16``).

    Numba kernels have no bfloat16 type, so the data is held as ``raw``, an int16 device
    array over the same memory (same shape and byte strides), and it enters and leaves the
    kernels only through :func:`_copy`, which widens it to float32 and rounds float32 back
    on the bits.  It answers the few array attributes the backend's layout helpers use;
    ``dtype`` is ``ml_dtypes.bfloat16``, so validation follows the host path's rules
    (computed in float32, results in bfloat16)."""

    __slots__ = ("raw",)

    def __init__(self, raw):
        self.raw = raw

    dtype = property(lambda self: V._BF16)
    shape = property(lambda self: tuple(self.raw.shape))
    strides = property(lambda self: tuple(self.raw.strides))
    size = property(lambda self: self.raw.size)

    def is_c_contiguous(self):
        return self.raw.is_c_contiguous()

    def is_f_contiguous(self):
        return self.raw.is_f_contiguous()

    def copy_to_host(self, stream=0):
        return self.raw.copy_to_host(stream=stream).view(V._BF16)


def _is_bf16(dtype) -> bool:
    return V._BF16 is not None and np.dtype(dtype) == V._BF16


def _retype(a, dtype):
    """Device array over ``a``'s memory, same shape and byte strides, read as ``dtype`` (of
    the same item size): how bfloat16/float32 bits reach the conversion kernels."""
    dtype = np.dtype(dtype)
    if _simulated():
        return type(a)(a._ary.view(dtype), stream=a.stream)
    desc = dict(a.__cuda_array_interface__)
    desc.update(typestr=dtype.str, stream=None)
    return cuda.from_cuda_array_interface(desc, owner=a, sync=False)


def _view(a, shape, strides):
    """A device array aliasing ``a``'s memory from its first element with new ``shape`` and
    byte ``strides`` (broadcasts, axis moves, dim merges) -- no copy."""
    if isinstance(a, _BF16):
        return _BF16(_view(a.raw, shape, strides))
    shape, strides = tuple(int(s) for s in shape), tuple(int(s) for s in strides)
    if _simulated():
        return type(a)(np.lib.stride_tricks.as_strided(a._ary, shape, strides), stream=a.stream)
    desc = dict(a.__cuda_array_interface__)
    desc.update(shape=shape, strides=strides, stream=None)
    return cuda.from_cuda_array_interface(desc, owner=a, sync=False)


def _empty(shape, dtype, stream, order="C"):
    if _is_bf16(dtype):
        return _BF16(cuda.device_array(tuple(int(n) for n in shape), dtype=np.int16, stream=stream, order=order))
    return cuda.device_array(tuple(int(n) for n in shape), dtype=np.dtype(dtype), stream=stream, order=order)


def _merge(shape, strides_list):
    """Merge adjacent dims that are contiguous in *every* operand, drop size-1 dims.

    Returns ``[(size, [stride per operand]), ...]`` (possibly empty for one element)."""
    out = []
    for k, n in enumerate(shape):
        if n == 1:
            continue
        st = [s[k] for s in strides_list]
        if out and all(ps == s * n for ps, s in zip(out[-1][1], st)):
            out[-1] = (out[-1][0] * n, st)
        else:
            out.append((n, st))
    return out


def _copy(src, dst, stream):
    """``dst[...] = src`` for device arrays of one shape, any strides and dtypes (cast).

    bfloat16 (:class:`_BF16`) goes through float32 on the bits: widening is exact, and
    narrowing rounds to nearest even (NaN kept quiet), as PyTorch and ``ml_dtypes`` do; a
    float64 source is rounded to float32 first (the compute dtype of bfloat16 data is
    float32, so only reduced float64 sums take that path)."""
    if src.size == 0:
        return
    kname = "copy4"
    if isinstance(src, _BF16) or isinstance(dst, _BF16):
        if isinstance(src, _BF16) and isinstance(dst, _BF16):
            src, dst = src.raw, dst.raw
        elif isinstance(src, _BF16) and np.dtype(dst.dtype) == np.float32:
            kname, src, dst = "bf16_widen4", _retype(src.raw, np.uint16), _retype(dst, np.uint32)
        elif isinstance(dst, _BF16) and np.dtype(src.dtype) == np.float32:
            kname, src, dst = "bf16_round4", _retype(src, np.uint32), _retype(dst.raw, np.uint16)
        else:
            tmp = _empty(src.shape, np.float32, stream)
            _copy(src, tmp, stream)
            _copy(tmp, dst, stream)
            return
    dims = _merge(src.shape, [src.strides, dst.strides])
    if len(dims) > 4:
        raise ValueError(
            f"cuda backend: arrays with more than 4 non-mergeable dimensions are not supported "
            f"(found shape {tuple(src.shape)} with strides {tuple(src.strides)}); pass a contiguous array"
        )
    dims = [(1, [0, 0])] * (4 - len(dims)) + dims
    shape = [d[0] for d in dims]
    s4 = _view(src, shape, [d[1][0] for d in dims])
    d4 = _view(dst, shape, [d[1][1] for d in dims])
    grid, block = _grid2(shape[0] * shape[1] * shape[2], shape[3])
    _kern(kname, dst.dtype)[grid, block, stream](s4, d4)


def _fill(v, value, stream):
    """``v[:] = value`` for a 1-D device array."""
    if v.shape[0]:
        grid, tpb = _flat_cfg(v.shape[0])
        _kern("fill", v.dtype)[grid, tpb, stream](v, value)


def _bcast_scalar(value, dtype, shape, stream):
    """A device view of ``shape`` whose every element is ``value`` (one stored element)."""
    one = cuda.to_device(np.full(1, value, dtype=dtype), stream=stream)
    return _view(one, shape, [0] * len(shape))


def _sum_partials(part, stream) -> float:
    """Host float64 sum of the per-block partial sums (synchronizes the stream)."""
    host = part.copy_to_host(stream=stream)
    stream.synchronize()
    return float(np.sum(host, dtype=np.float64))


def _device_sum(v, stream) -> float:
    """float64 sum of a 1-D device array."""
    if v.shape[0] == 0:
        return 0.0
    grid, tpb = _flat_cfg(v.shape[0])
    part = _empty((grid,), np.float64, stream)
    _kern("partial_sum", v.dtype)[grid, tpb, stream](v, part)
    return _sum_partials(part, stream)


def _upload(a, stream):
    """Device copy of host array ``a``: native byte order (kernels take native dtypes only,
    as on the host), and a stride-0 broadcast view sent as its one stored core, re-broadcast
    on the device."""
    a = np.asarray(a)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if a.size and 0 in a.strides:
        core = np.ascontiguousarray(a[tuple(0 if s == 0 else slice(None) for s in a.strides)])
        dcore = cuda.to_device(core, stream=stream)
        it = iter(dcore.strides)
        return _view(dcore, a.shape, [next(it) if s != 0 else 0 for s in a.strides])
    # (not np.ascontiguousarray for a contiguous one: it makes a 0-d array 1-d; kernels take
    # any strides, so a Fortran-ordered one goes as it is)
    return cuda.to_device(a if a.flags.c_contiguous or a.flags.f_contiguous else np.ascontiguousarray(a), stream=stream)


def _c_strides(shape, itemsize):
    st, acc = [], itemsize
    for n in reversed(shape):
        st.append(acc)
        acc *= max(int(n), 1)
    return list(reversed(st))


def _bcast_view(a, shape):
    """Broadcast device array ``a`` to ``shape`` (validated already) as a stride-0 view."""
    shape = tuple(shape)
    ash = tuple(a.shape)
    pad = len(shape) - len(ash)
    strides = [0 if k < pad or ash[k - pad] == 1 else a.strides[k - pad] for k in range(len(shape))]
    return _view(a, shape, strides)


def _cast_to(d, dtype, stream):
    """``d`` itself when it has ``dtype``, else a new cast copy."""
    if np.dtype(d.dtype) == np.dtype(dtype):
        return d
    o = _empty(d.shape, dtype, stream)
    _copy(d, o, stream)
    return o


def _contiguous(d, stream):
    """``d`` when it is C- or F-contiguous, else a C-contiguous copy (same dtype)."""
    if d.is_c_contiguous() or d.is_f_contiguous():
        return d
    o = _empty(d.shape, d.dtype, stream)
    _copy(d, o, stream)
    return o


def _flat(d, stream):
    """A 1-D view of every element of ``d`` (in memory order; a copy when ``d`` is strided)."""
    d = _contiguous(d, stream)
    return _view(d, (d.size,), (np.dtype(d.dtype).itemsize,))


def _meta(d):
    """A NumPy stand-in with ``d``'s shape and dtype (one stored element, all strides 0) for
    the metadata-only validators of :mod:`fastloss._validate`."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, np.dtype(d.dtype)), tuple(d.shape), (0,) * len(d.shape))


def _ptr(d) -> int:
    if isinstance(d, _BF16):
        d = d.raw
    cai = getattr(d, "__cuda_array_interface__", None)
    if cai is None:  # simulator arrays wrap a host ndarray
        return int(d.__array_interface__["data"][0])
    return int(cai["data"][0])


def _extent(d):
    """Byte range ``[lo, hi)`` that device array ``d`` touches (None when empty)."""
    lo = hi = _ptr(d)
    for n, s in zip(d.shape, d.strides):
        if n == 0:
            return None
        if s > 0:
            hi += (n - 1) * s
        else:
            lo += (n - 1) * s
    return lo, hi + np.dtype(d.dtype).itemsize


def _same_view(a, b) -> bool:
    return _ptr(a) == _ptr(b) and tuple(a.shape) == tuple(b.shape) and tuple(a.strides) == tuple(b.strides)
