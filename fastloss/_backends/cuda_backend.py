"""The ``cuda`` backend: Numba CUDA (numba-cuda) kernels for NVIDIA GPUs.

Two ways in
-----------
* The backend protocol (:mod:`fastloss._backends._protocol`) with NumPy host arrays
  (``backend="cuda"`` with NumPy input, *offload*): inputs are copied to the GPU, the kernels
  run there, and the results are copied back into the given host outputs (a gradient output
  may be the first input itself).
* :func:`device_call` for device-resident input (CuPy arrays, PyTorch CUDA tensors, Numba
  device arrays, anything with ``__cuda_array_interface__`` or a CUDA ``__dlpack__``): the
  public layer hands over the public function's name and arguments, and everything --
  validation of the values, axis handling, float16 -> float32, the reductions -- happens on
  the device, on the caller's current stream, with results in the caller's library.
  ``torch.bfloat16`` tensors are computed in float32 and answered in bfloat16 like float16
  ones (with ``ml_dtypes`` installed, which names the dtype for the host path's rules): Numba
  has no bfloat16 type, so they enter as their int16 bits (:class:`_BF16`) and cross to and
  from float32 in bit-exact conversion kernels (round to nearest even on the way back).

Kernels (:mod:`fastloss._backends._cuda_kernels`) compile on first use, never at import.
Row-wise kernels give each row ``blockDim.x`` threads (several rows per block for small class
counts) with shared-memory reductions; the softmax cross-entropy computes loss and gradient
in one launch that reads the logits from DRAM once and writes the gradient once (the second
and third pass over a row hit L2).  Loss sums are reduced in float64 on the device into one
partial per block, and the few partials are added on the host.
"""
from __future__ import annotations

import math

import numpy as np

try:  # numba-cuda is optional: without it the backend reports itself unavailable
    from numba import cuda

    _IMPORT_ERROR = ""
except Exception as exc:  # ImportError, or a broken CUDA toolkit install
    cuda = None
    _IMPORT_ERROR = f"numba-cuda cannot be imported ({type(exc).__name__}: {exc})"

NAME = "cuda"


def _simulated() -> bool:
    return cuda is not None and bool(getattr(cuda.config, "ENABLE_CUDASIM", 0))


def unavailable_reason() -> str:
    """``""`` when numba-cuda imports and a GPU is usable (or the simulator is on), else why not."""
    if cuda is None:
        return f'{_IMPORT_ERROR}; install it with pip install "fastloss[cuda]"'
    try:
        if cuda.is_available():
            return ""
    except Exception as exc:  # driver library present but broken
        return f"no usable CUDA GPU: {type(exc).__name__}: {exc}"
    return "no CUDA GPU or NVIDIA driver found (cuda.is_available() is False)"


def set_num_threads(n: int) -> None:  # GPU work does not use CPU threads
    return None


def _kern(name, dtype):
    from . import _cuda_kernels

    return _cuda_kernels.get(name, np.dtype(dtype))


# ----------------------------------------------------------------------------- launch shapes
def _row_cfg(n: int, c: int):
    """(grid, (bdx, bdy)) for row kernels: a power-of-two number of threads per row
    (enough to cover ``c`` up to 1024 on a GPU; at most 16 under the slow simulator) and
    several rows per block when rows are short."""
    cap, floor, per_block = (16, 1, 16) if _simulated() else (1024, 32, 256)
    bdx = floor
    while bdx < min(c, cap):
        bdx *= 2
    bdy = max(1, per_block // bdx)
    grid = max(1, min(-(-n // bdy), 1 << 20))
    return grid, (bdx, bdy)


def _flat_cfg(total: int):
    """(grid, tpb) for 1-D grid-stride kernels; grid <= 1024 keeps the per-block partials few."""
    tpb, cap = (16, 4) if _simulated() else (256, 1024)
    return max(1, min(-(-total // tpb), cap)), tpb


def _grid2(r: int, k: int):
    """((gx, gy), (bdx, bdy)) for the 2-D elementwise/copy kernels over ``(R, K)``: x threads
    cover the K columns (a power of two up to the block size, so a short K packs several rows
    per block), y threads the rows; at most ``cap`` blocks, so the per-block partials stay few."""
    tpb, cap = (16, 4) if _simulated() else (256, 4096)
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


def _kernel_dtype(d):
    """The dtype a kernel can read ``d`` in without a conversion (float32 for bfloat16)."""
    return np.dtype(np.float32) if isinstance(d, _BF16) else np.dtype(d.dtype)


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


# ----------------------------------------------------------------------------- device kernels
# These take Numba device arrays already normalized as the protocol says (2-D, compute
# dtype, outputs allocated) and launch on ``stream``; the offload entry points and
# device_call both end here.
def _d_row_lse(x, lse, out, mode, stream):
    n, c = x.shape
    if n == 0:
        return
    grid, block = _row_cfg(n, c)
    dummy = lse if lse is not None else _empty((1,), np.float64, stream)
    _kern("row_lse", x.dtype)[grid, block, stream](x, dummy, out if out is not None else x, mode)


def _d_softmax_bwd(g, y, out, mode, stream):
    n, c = y.shape
    if n == 0:
        return
    grid, block = _row_cfg(n, c)
    _kern("softmax_bwd", y.dtype)[grid, block, stream](g, y, out, mode)


def _ce_operands(x, weight, grad, gscale, stream):
    """``(w, gr, gs)`` for the cross-entropy kernels: absent ones become 1-element dummies
    (a kernel takes arrays, never None; the ``has_w``/``want_grad`` flags say what is real)."""
    dt = x.dtype
    return (weight if weight is not None else _empty((1,), dt, stream),
            grad if grad is not None else _empty((1, 1), dt, stream),
            gscale if gscale is not None else _empty((1,), np.float64, stream))


def _d_cross_entropy(x, target, weight, wsum, ignore_index, eps, zl, loss, grad, gscale, stream):
    n, c = x.shape
    if n == 0:
        return
    w, gr, gs = _ce_operands(x, weight, grad, gscale, stream)
    grid, block = _row_cfg(n, c)
    _kern("ce_hard", x.dtype)[grid, block, stream](
        x, target, w, weight is not None, float(wsum), int(ignore_index), float(eps), float(zl),
        loss, gr, grad is not None, gs,
    )


def _d_cross_entropy_soft(x, y, weight, eps, zl, loss, grad, gscale, stream):
    n, c = x.shape
    if n == 0:
        return
    w, gr, gs = _ce_operands(x, weight, grad, gscale, stream)
    grid, block = _row_cfg(n, c)
    _kern("ce_soft", x.dtype)[grid, block, stream](
        x, y, w, weight is not None, float(eps), float(zl), loss, gr, grad is not None, gs
    )


def _d_elementwise(name, a, b, p, q, flag, eps, loss, grad, grad2, gscale, gout, stream):
    """Launch elementwise kernel ``name``; returns the device array of per-block partial
    float64 sums of the loss.  ``p``/``q``/``gout`` None mean ones (stride-0 views)."""
    r, k = a.shape
    dt = a.dtype
    grid, block = _grid2(r, k)
    part = _empty((grid[0] * grid[1],), np.float64, stream)
    if r * k == 0:
        _kern("fill", np.float64)[1, 1, stream](part, 0.0)
        return part
    ones = None

    def one():
        nonlocal ones
        if ones is None:
            ones = _bcast_scalar(1, dt, (r, k), stream)
        return ones

    dummy = _empty((1, 1), dt, stream)
    want = (loss is not None) | (grad is not None) << 1 | (grad2 is not None) << 2
    _kern(name, dt)[grid, block, stream](
        a, b, p if p is not None else one(), q if q is not None else one(), bool(flag),
        float(eps),
        loss if loss is not None else dummy, grad if grad is not None else dummy,
        grad2 if grad2 is not None else dummy, want, float(gscale),
        gout if gout is not None else one(), part,
    )
    return part


# ----------------------------------------------------------------------------- offload (host)
class _Offload:
    """Copies NumPy operands to the GPU and device results back into host outputs."""

    def __init__(self):
        self.stream = cuda.stream()
        self._back = []  # (device array, host output)

    def up(self, a):
        """Device copy of host array ``a`` (None stays None).  A stride-0 broadcast view is
        sent as its one stored core, re-broadcast on the device."""
        if a is None:
            return None
        a = np.asarray(a)
        if a.size and 0 in a.strides:
            core = a[tuple(0 if s == 0 else slice(None) for s in a.strides)]
            core = np.ascontiguousarray(core)
            keep = [s != 0 for s in a.strides]
            dcore = cuda.to_device(core, stream=self.stream)
            strides, it = [], iter(dcore.strides)
            for k in keep:
                strides.append(next(it) if k else 0)
            return _view(dcore, a.shape, strides)
        if not (a.flags.c_contiguous or a.flags.f_contiguous):
            a = np.ascontiguousarray(a)
        return cuda.to_device(a, stream=self.stream)

    def out(self, host, like=None):
        """A device array for host output ``host``; copied back by :meth:`finish`.  ``like``
        (a device input that ``host`` aliases) is reused as the output: in place."""
        if host is None:
            return None
        dev = like if like is not None else _empty(host.shape, host.dtype, self.stream)
        self._back.append((dev, host))
        return dev

    def finish(self):
        tmps = [(d.copy_to_host(stream=self.stream), h) for d, h in self._back]
        self.stream.synchronize()
        for tmp, host in tmps:
            host[...] = tmp


def _inplace(dev_in, host_in, host_out):
    """Reuse the device copy of the input for the output when they are one host array."""
    if host_out is not None and host_out is host_in and dev_in.is_c_contiguous():
        return dev_in
    return None


def logsumexp(x, out):
    h = _Offload()
    _d_row_lse(h.up(x), h.out(out), None, 0, h.stream)
    h.finish()


def softmax(x, out):
    h = _Offload()
    dx = h.up(x)
    _d_row_lse(dx, None, h.out(out, _inplace(dx, x, out)), 1, h.stream)
    h.finish()


def log_softmax(x, out):
    h = _Offload()
    dx = h.up(x)
    _d_row_lse(dx, None, h.out(out, _inplace(dx, x, out)), 2, h.stream)
    h.finish()


def softmax_backward(g, y, out):
    h = _Offload()
    dg = h.up(g)
    _d_softmax_bwd(dg, h.up(y), h.out(out, _inplace(dg, g, out)), 0, h.stream)
    h.finish()


def log_softmax_backward(g, y, out):
    h = _Offload()
    dg = h.up(g)
    _d_softmax_bwd(dg, h.up(y), h.out(out, _inplace(dg, g, out)), 1, h.stream)
    h.finish()


def _host_gscale(gscale, n):
    """A scalar or per-row gradient scale as the (n,) float64 array the device kernels index."""
    return np.ascontiguousarray(np.broadcast_to(np.asarray(gscale, np.float64), (n,)))


def cross_entropy(x, target, weight, ignore_index, label_smoothing, z_loss, loss, grad, gscale):
    h = _Offload()
    dx = h.up(x)
    c = x.shape[1]
    wsum = c if weight is None else float(np.sum(weight, dtype=np.float64))
    _d_cross_entropy(
        dx, h.up(np.asarray(target, dtype=np.int64)), h.up(weight), wsum, ignore_index,
        label_smoothing, z_loss, h.out(loss), h.out(grad, _inplace(dx, x, grad)),
        None if grad is None else h.up(_host_gscale(gscale, x.shape[0])), h.stream,
    )
    h.finish()


def cross_entropy_soft(x, target, weight, label_smoothing, z_loss, loss, grad, gscale):
    h = _Offload()
    dx = h.up(x)
    _d_cross_entropy_soft(
        dx, h.up(target), h.up(weight), label_smoothing, z_loss, h.out(loss),
        h.out(grad, _inplace(dx, x, grad)),
        None if grad is None else h.up(_host_gscale(gscale, x.shape[0])), h.stream,
    )
    h.finish()


def _offload_elementwise(name, a, b, p, q, flag, eps, loss, grad, grad2, gscale, gout):
    h = _Offload()
    da = h.up(a)
    part = _d_elementwise(
        name, da, h.up(b), h.up(p), h.up(q), flag, eps, h.out(loss),
        h.out(grad, _inplace(da, a, grad)), h.out(grad2), gscale, h.up(gout), h.stream,
    )
    total = _sum_partials(part, h.stream)
    h.finish()
    return total


def bce_with_logits(z, y, weight, pos_weight, loss, grad, gscale, gout):
    return _offload_elementwise("bce_with_logits", z, y, weight, pos_weight, 0, 0.0, loss, grad, None, gscale, gout)


def bce(p, y, weight, loss, grad, gscale, gout):
    return _offload_elementwise("bce", p, y, weight, None, 0, 0.0, loss, grad, None, gscale, gout)


def kl_div(x, t, log_target, loss, grad, gscale, gout):
    return _offload_elementwise("kl_div", x, t, None, None, log_target, 0.0, loss, grad, None, gscale, gout)


def mse(x, t, loss, grad, gscale, gout):
    return _offload_elementwise("mse", x, t, None, None, 0, 0.0, loss, grad, None, gscale, gout)


def gaussian_nll(x, t, var, full, eps, loss, grad, grad_var, gscale, gout):
    return _offload_elementwise("gaussian_nll", x, t, var, None, full, eps, loss, grad, grad_var, gscale, gout)


# ============================================================================ device-resident input
# Validation mirrors :mod:`fastloss._api` step by step, with the helpers of
# :mod:`fastloss._validate` run on metadata stand-ins (:func:`_meta`), so that a device call
# raises the same exception, with the same message, as the same call on NumPy arrays.  Checks
# that need the values (class indices in range, probabilities in [0, 1], variances >= 0) run
# as device kernels that only raise a flag; when one is raised, the offending operand is
# copied to the host once to build the host path's exact message (position and value).
from .. import _api as _A  # noqa: E402  (the public layer is imported before any backend)
from .. import _validate as V  # noqa: E402

_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


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


def is_device_array(obj) -> bool:
    """True for CuPy arrays, PyTorch CUDA tensors, Numba device arrays (simulator ones too) and
    any object with ``__cuda_array_interface__`` or a ``__dlpack__`` on a CUDA device."""
    if getattr(obj, "__cuda_ndarray__", False) or hasattr(obj, "__cuda_array_interface__"):
        return True
    if type(obj).__module__.split(".")[0] == "torch":
        return bool(getattr(obj, "is_cuda", False))
    dev = getattr(obj, "__dlpack_device__", None)
    if dev is not None and not hasattr(obj, "__array_interface__"):
        try:
            return dev()[0] in _DLPACK_CUDA
        except Exception:
            return False
    return False


def _meta(d):
    """A NumPy stand-in with ``d``'s shape and dtype (one stored element, all strides 0) for
    the metadata-only validators of :mod:`fastloss._validate`; it is writeable, so
    ``check_grad_out`` judges shape and dtype only."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, np.dtype(d.dtype)), tuple(d.shape), (0,) * len(d.shape))


def _compute_dtype(d, name):
    """The compute dtype of device array ``d`` (the host path's rules and messages)."""
    return V.float_dtype_or_raise(np.dtype(d.dtype), name)


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


def _check_no_partial_overlap(out, inputs, name):
    """Device counterpart of :func:`fastloss._validate.check_no_partial_overlap` (same
    message); overlap is judged on byte ranges, so interleaved views count as overlapping."""
    eo = _extent(out)
    for in_name, arr in inputs:
        if arr is None or eo is None or _same_view(out, arr):
            continue
        ea = _extent(arr)
        if ea is not None and ea[0] < eo[1] and eo[0] < ea[1]:
            raise ValueError(
                f"{name}: expected either {in_name} itself (in place) or an array that does not "
                f"overlap it, found an array partly overlapping {in_name}"
            )


class _Ctx:
    """One device call: the caller's library and stream, argument conversion, result wrapping."""

    def __init__(self, lead):
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

    # -- inputs
    def dev(self, obj, name):
        """A Numba device array for device-resident ``obj`` (no copy), or a device copy of a
        host array-like (after the host path's object-dtype check)."""
        if getattr(obj, "__cuda_ndarray__", False):
            if _is_bf16(obj.dtype):  # only simulator arrays: Numba's device arrays cannot be bfloat16
                return _BF16(_retype(obj, np.int16))
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
            return self.dev(t, name)
        a = np.asarray(obj)
        if a.dtype == object:
            V.as_float_array(a, name)  # raises the host path's TypeError
        return self.up(a)

    def up(self, a):
        """Device copy of host array ``a``; a stride-0 broadcast view sends its one stored core.
        Data of non-native byte order (``>f8`` on a little-endian machine) is converted to
        native order once, as on the host path: kernels take native dtypes only."""
        a = np.asarray(a)
        if not a.dtype.isnative:
            a = a.astype(a.dtype.newbyteorder("="))
        if a.size and 0 in a.strides:
            core = np.ascontiguousarray(a[tuple(0 if s == 0 else slice(None) for s in a.strides)])
            dcore = cuda.to_device(core, stream=self.stream)
            it = iter(dcore.strides)
            return _view(dcore, a.shape, [next(it) if s != 0 else 0 for s in a.strides])
        # (not np.ascontiguousarray for a contiguous one: it makes a 0-d array 1-d)
        return cuda.to_device(a if a.flags.c_contiguous else np.ascontiguousarray(a), stream=self.stream)

    def host(self, d):
        """Host copy of device array ``d`` (error paths only)."""
        h = d.copy_to_host(stream=self.stream)  # a bfloat16 one comes back as ml_dtypes.bfloat16
        self.stream.synchronize()
        return h

    # -- outputs
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

    @staticmethod
    def scalar(value, cdt):
        """A reduced result: a NumPy scalar of the compute dtype, as on the host."""
        return _A._scalar(value, np.dtype(cdt))


def _first_bad(kname, dtype, args, stream, total) -> bool:
    """Run a check kernel that atomically records the first bad position; True if any."""
    if not total:
        return False
    big = np.iinfo(np.int64).max
    bad = cuda.to_device(np.array([big], np.int64), stream=stream)
    grid, block = _grid2(*args[0].shape)
    _kern(kname, dtype)[grid, block, stream](*args, bad)
    pos = int(bad.copy_to_host(stream=stream)[0])
    stream.synchronize()
    return pos != big


# ----------------------------------------------------------------------------- validation pieces
def _grad_output_scalar(ctx, grad_output, reduction):
    """The host path's ``_grad_scale_value`` for host or device ``grad_output``: a float, or
    None for an array with ``reduction="none"``."""
    if not is_device_array(grad_output):
        return _A._grad_scale_value(grad_output, reduction)
    gd = ctx.dev(grad_output, "grad_output")
    go = _A._grad_scale_value(_meta(gd), reduction)
    if go is not None:  # a 0-d device array: its value
        go = float(ctx.host(gd).reshape(()))
    return go


def _grad_output_array(ctx, grad_output, shape, cdt, upload=True):
    """``grad_output`` for ``reduction="none"`` as a device view broadcast to ``shape`` (the
    host path's ``_grad_output_array`` checks and messages); ``upload=False`` only checks a
    host one."""
    if not is_device_array(grad_output):
        g = _A._grad_output_array(grad_output, shape, cdt)
        return ctx.up(g) if upload else None
    gd = ctx.dev(grad_output, "grad_output")
    if np.dtype(gd.dtype).kind not in "iu":
        _compute_dtype(gd, "grad_output")
    V.broadcast_to_or_raise(_meta(gd), shape, "grad_output", "the unreduced loss shape")
    return _bcast_view(gd, shape)


def _grad_out_device(ctx, grad_out, shape, dtype, return_grad):
    """The host path's ``check_grad_out`` for a device ``grad_out`` (None when not given)."""
    if grad_out is None:
        return None
    if not return_grad:
        V.check_grad_out(grad_out, shape, dtype, False)
    if not is_device_array(grad_out):
        raise ValueError(
            f"grad_out: expected a device array (the inputs live on the GPU), found {type(grad_out).__name__}"
        )
    god = ctx.dev(grad_out, "grad_out")
    V.check_grad_out(_meta(god), shape, dtype, True)
    return god


def _operand(ctx, obj, name, cdt, shape):
    """A floating operand (target, weight, ...) broadcast to ``shape`` (the host's ``as_cast``);
    its dtype may differ from ``cdt`` (kernels get a cast copy when needed)."""
    d = ctx.dev(obj, name)
    _compute_dtype(d, name)
    if shape is not None:
        V.broadcast_to_or_raise(_meta(d), shape, name)
        d = _bcast_view(d, shape)
    return d


# ----------------------------------------------------------------------------- layout helpers
def _c_strides(shape, itemsize):
    st, acc = [], itemsize
    for n in reversed(shape):
        st.append(acc)
        acc *= max(int(n), 1)
    return list(reversed(st))


def _rows_view(a, axes, dtype):
    """(N, C) view of ``a`` with the class ``axes`` last and merged, or None when the dims do
    not merge, the dtype is not ``dtype`` or a stride is negative."""
    nd = len(a.shape)
    order = [d for d in range(nd) if d not in axes] + list(axes)
    shape = [a.shape[d] for d in order]
    strides = [a.strides[d] for d in order]
    k = nd - len(axes)
    n = int(np.prod(shape[:k], dtype=np.int64))
    c = int(np.prod(shape[k:], dtype=np.int64))
    rdims, cdims = _merge(shape[:k], [strides[:k]]), _merge(shape[k:], [strides[k:]])
    if np.dtype(a.dtype) != np.dtype(dtype) or len(rdims) > 1 or len(cdims) > 1 or min(strides + [0]) < 0:
        return None
    isz = np.dtype(dtype).itemsize
    cs = cdims[0][1][0] if cdims else isz
    rs = rdims[0][1][0] if rdims else c * isz
    return _view(a, (n, c), (rs, cs))


def _moved(a, axes):
    """View of ``a`` with ``axes`` moved last (shape, strides)."""
    nd = len(a.shape)
    order = [d for d in range(nd) if d not in axes] + list(axes)
    return _view(a, [a.shape[d] for d in order], [a.strides[d] for d in order])


def _rows(ctx, a, axes, dtype):
    """(N, C) view of ``a`` (see :func:`_rows_view`) or a C-contiguous copy in ``dtype``."""
    v = _rows_view(a, axes, dtype)
    if v is not None:
        return v
    m = _moved(a, axes)
    n = int(np.prod([s for i, s in enumerate(a.shape) if i not in axes], dtype=np.int64))
    c = int(np.prod([a.shape[i] for i in axes], dtype=np.int64))
    dst = _empty((n, c), dtype, ctx.stream)
    _copy(m, _view(dst, m.shape, _c_strides(m.shape, dst.dtype.itemsize)), ctx.stream)
    return dst


def _rows_out(ctx, user, x, axes, cdt):
    """``(rows2d, finish)`` for a row-wise output shaped like ``x``: the kernel writes
    ``rows2d`` (the user's buffer itself when it can be viewed as rows of ``cdt``, else a
    temporary), ``finish()`` returns the result object for the caller."""
    if user is not None:
        ud = ctx.dev(user, "out")
        v = _rows_view(ud, axes, cdt)
        if v is not None:
            return v, lambda: user
    n = int(np.prod([s for i, s in enumerate(x.shape) if i not in axes], dtype=np.int64))
    c = int(np.prod([x.shape[i] for i in axes], dtype=np.int64))
    tmp = _empty((n, c), cdt, ctx.stream)
    moved_shape = [s for i, s in enumerate(x.shape) if i not in axes] + [x.shape[i] for i in axes]
    order = [d for d in range(len(x.shape)) if d not in axes] + list(axes)

    def back(dst):
        # tmp viewed with the original dim order (the class axes back in place)
        st = _c_strides(moved_shape, np.dtype(cdt).itemsize)
        shp, strd = [0] * len(order), [0] * len(order)
        for pos, d in enumerate(order):
            shp[d], strd[d] = moved_shape[pos], st[pos]
        full = _view(tmp, shp, strd)
        if dst is None:
            return full
        _copy(full, dst, ctx.stream)
        return dst

    if user is not None:
        return tmp, lambda: (back(ctx.dev(user, "out")), user)[1]
    if np.dtype(x.dtype) == np.dtype(cdt):
        return tmp, lambda: ctx.wrap(back(None))
    return tmp, lambda: ctx.wrap(back(_empty(x.shape, x.dtype, ctx.stream)))


def _rows_vec(ctx, a, n, dtype):
    """1-D (N,) view or contiguous copy of an array shaped like the rows."""
    dims = _merge(a.shape, [a.strides])
    if np.dtype(a.dtype) == np.dtype(dtype) and len(dims) <= 1 and min(tuple(a.strides) + (0,)) >= 0:
        return _view(a, (n,), (dims[0][1][0] if dims else np.dtype(dtype).itemsize,))
    dst = _empty(a.shape, dtype, ctx.stream)
    _copy(a, dst, ctx.stream)
    return _view(dst, (n,), (np.dtype(dtype).itemsize,))


def _bcast_view(a, shape):
    """Broadcast device array ``a`` to ``shape`` (validated already) as a stride-0 view."""
    shape = tuple(shape)
    ash = tuple(a.shape)
    pad = len(shape) - len(ash)
    strides = [0 if k < pad or ash[k - pad] == 1 else a.strides[k - pad] for k in range(len(shape))]
    return _view(a, shape, strides)


def _cast_to(ctx, d, dtype):
    """``d`` itself when it has ``dtype``, else a new cast copy."""
    if np.dtype(d.dtype) == np.dtype(dtype):
        return d
    o = _empty(d.shape, dtype, ctx.stream)
    _copy(d, o, ctx.stream)
    return o


# ----------------------------------------------------------------------------- normalizers
def _dc_logsumexp(ctx, x, axis=-1, keepdims=False, **_):
    xd = ctx.dev(x, "x")
    cdt = _compute_dtype(xd, "x")
    keepdims = bool(keepdims)
    nd = len(xd.shape)
    if nd == 0:
        # the log-sum-exp of one value is that value (scipy.special.logsumexp agrees); the
        # axes a 0-d array can name are -1 and 0 (as a 1-element row), None and (): the host
        # path's checks and results (a NumPy scalar of the compute dtype; keepdims: a copy)
        for a in axis if isinstance(axis, tuple) else (() if axis is None else (axis,)):
            V.normalize_axis(a, 1)
        if keepdims:
            o = _empty((), xd.dtype, ctx.stream)
            _copy(xd, o, ctx.stream)
            return ctx.wrap(o)
        return ctx.scalar(float(ctx.host(xd).reshape(())), cdt)
    axes = _A._class_axes(axis, nd)
    n = int(np.prod([s for i, s in enumerate(xd.shape) if i not in axes], dtype=np.int64))
    c = int(np.prod([xd.shape[i] for i in axes], dtype=np.int64))
    lse = _empty((n,), cdt, ctx.stream)
    if n and c == 0:
        grid, tpb = _flat_cfg(n)
        _kern("fill", cdt)[grid, tpb, ctx.stream](lse, -math.inf)  # log of an empty sum
    elif n:
        _d_row_lse(_rows(ctx, xd, axes, cdt), lse, None, 0, ctx.stream)
    if keepdims:
        shape = [1 if i in axes else s for i, s in enumerate(xd.shape)]
    else:
        shape = [s for i, s in enumerate(xd.shape) if i not in axes]
    if not shape:  # a full reduction: a NumPy scalar of the compute dtype
        return ctx.scalar(ctx.host(lse)[0], cdt)
    res = _view(lse, shape, _c_strides(shape, lse.dtype.itemsize))
    return ctx.wrap(_cast_to(ctx, res, xd.dtype))


def _dc_softmax_like(ctx, mode, x, axis=-1, out=None, **_):
    xd = ctx.dev(x, "x")
    cdt = _compute_dtype(xd, "x")
    if len(xd.shape) == 0:
        raise ValueError("x: expected an array with at least 1 dimension (the class axis), found a 0-d array")
    ax = V.normalize_axis(axis, len(xd.shape))
    if out is not None:
        od = ctx.dev(out, "out") if is_device_array(out) else None
        if od is None or tuple(od.shape) != tuple(xd.shape) or np.dtype(od.dtype) != np.dtype(xd.dtype):
            raise ValueError(
                f"out: expected a device array of shape {tuple(xd.shape)} and dtype {np.dtype(xd.dtype)}, found "
                f"{type(out).__name__} of shape {getattr(out, 'shape', None)} and dtype {getattr(out, 'dtype', None)}"
            )
        _check_no_partial_overlap(od, [("x", xd)], "out")
    rows = _rows(ctx, xd, (ax,), cdt)
    o2, finish = _rows_out(ctx, out, xd, (ax,), cdt)
    if rows.size:
        _d_row_lse(rows, None, o2, mode, ctx.stream)
    return finish()


def _dc_softmax_bwd(ctx, mode, grad, y, axis=-1, **_):
    yd = ctx.dev(y, "y")
    cdt = _compute_dtype(yd, "y")
    if len(yd.shape) == 0:
        raise ValueError("y: expected an array with at least 1 dimension (the class axis), found a 0-d array")
    gd = ctx.dev(grad, "grad")
    _compute_dtype(gd, "grad")
    if tuple(gd.shape) != tuple(yd.shape):
        raise ValueError(f"grad: expected the shape of y {tuple(yd.shape)}, found {tuple(gd.shape)}")
    ax = V.normalize_axis(axis, len(yd.shape))
    yr = _rows(ctx, yd, (ax,), cdt)
    gr = _rows(ctx, gd, (ax,), cdt)
    o2, finish = _rows_out(ctx, None, yd, (ax,), cdt)
    if yr.size:
        _d_softmax_bwd(gr, yr, o2, mode, ctx.stream)
    return finish()


# ----------------------------------------------------------------------------- cross-entropy
def _dc_cross_entropy(ctx, logits, target, axis=-1, weight=None, ignore_index=-100, label_smoothing=0.0,
                      z_loss=0.0, reduction="mean", return_grad=False, grad_output=None, grad_out=None, **_):
    # the order of the checks is the host path's (fastloss._api.cross_entropy)
    xd = ctx.dev(logits, "logits")
    cdt = _compute_dtype(xd, "logits")
    xshape = tuple(xd.shape)
    nd = len(xshape)
    if nd == 0:
        raise ValueError("logits: expected an array with at least 1 dimension (the class axis), found a 0-d array")
    ax = V.normalize_axis(axis, nd)
    c = xshape[ax]
    if c == 0:
        raise ValueError(f"logits: expected at least one class along axis {axis}, found shape {xshape}")
    reduction = V.check_reduction(reduction)
    eps = V.check_real(label_smoothing, "label_smoothing", 0.0, 1.0)
    zl = V.check_real(z_loss, "z_loss", 0.0)
    ii = V.check_int(ignore_index, "ignore_index")
    if not _I64_MIN <= ii <= _I64_MAX:  # the kernels compare it as an int64
        raise ValueError(f"ignore_index: expected an integer in [{_I64_MIN}, {_I64_MAX}], found {ignore_index!r}")
    return_grad = bool(return_grad)
    row_shape = tuple(s for i, s in enumerate(xshape) if i != ax)

    td = ctx.dev(target, "target")
    tdt = np.dtype(td.dtype)
    if tdt.kind in "fV":
        _compute_dtype(td, "target")
    soft = V.check_class_target(tdt, td.shape, xshape, ax, axis)
    wd = None
    if weight is not None:
        wd = ctx.dev(weight, "weight")
        _compute_dtype(wd, "weight")
        if tuple(wd.shape) != (c,):
            raise ValueError(f"weight: expected a 1-D array of {c} class weights, found shape {tuple(wd.shape)}")
        if np.dtype(wd.dtype) != cdt or not wd.is_c_contiguous():
            w2 = _empty((c,), cdt, ctx.stream)
            _copy(wd, w2, ctx.stream)
            wd = w2
    go = _grad_output_scalar(ctx, grad_output, reduction)
    gvec = None
    if go is None:  # an array (reduction="none"): checked even when no gradient is asked for
        gvec = _grad_output_array(ctx, grad_output, row_shape, np.dtype(np.float64), upload=return_grad)
    god = _grad_out_device(ctx, grad_out, xshape, np.dtype(xd.dtype), return_grad)
    if god is not None:
        _check_no_partial_overlap(god, [("logits", xd), ("target", td)], "grad_out")

    n = int(np.prod(row_shape, dtype=np.int64))
    rows = _rows(ctx, xd, (ax,), cdt)
    if soft:
        tr = _rows(ctx, td, (ax,), cdt)
        denom = float(n)
    else:
        # 64-bit unsigned indices are read as their int64 bits, never cast: a value above
        # 2**63 - 1 is then negative, and flagged as such (``unsigned``) before any
        # comparison with ignore_index -- a cast would wrap it onto a valid or ignored index
        # (and the simulator's cast raises OverflowError)
        u64 = tdt.kind == "u" and tdt.itemsize == 8
        tr = _rows_vec(ctx, _retype(td, np.int64) if u64 else td, n, np.int64)
        denom = 0.0
        if n:  # the class indices are checked before anything is written
            part_n, tpb = _flat_cfg(n)
            part = _empty((part_n,), np.float64, ctx.stream)
            bad = cuda.to_device(np.array([np.iinfo(np.int64).max], np.int64), stream=ctx.stream)
            _kern("check_targets", cdt)[part_n, tpb, ctx.stream](
                tr, c, ii, wd if wd is not None else _empty((1,), cdt, ctx.stream), wd is not None, u64, bad,
                part,
            )
            if int(ctx.host(bad)[0]) != np.iinfo(np.int64).max:
                t = ctx.host(td)  # the error path: the host's message, value and position
                big = t > np.uint64(_I64_MAX) if u64 else np.zeros(t.shape, bool)
                if big.any():  # judged first, before the int64 cast, as on the host
                    badm = big
                else:
                    t64 = t.astype(np.int64, copy=False)
                    badm = ((t64 < 0) | (t64 >= c)) & (t64 != ii)
                pos = V.first_position(badm, t.shape)
                raise IndexError(
                    f"target: expected class indices in [0, {c}) or ignore_index={ii}, found {t[pos]} at position {pos}"
                )
            denom = _sum_partials(part, ctx.stream)
    if reduction == "mean":
        scale = 1.0 / denom if denom != 0 else 0.0  # every target ignored: loss 0, zero grad
    else:
        scale = 1.0

    gscale = gres = finish = None
    if return_grad:
        gscale = _empty((n,), np.float64, ctx.stream)
        grid, tpb = _flat_cfg(n)
        if n and gvec is not None:
            _kern("scale_rows", cdt)[grid, tpb, ctx.stream](_rows_vec(ctx, gvec, n, _kernel_dtype(gvec)), 1.0, gscale)
        elif n:
            _kern("fill", np.float64)[grid, tpb, ctx.stream](gscale, go * scale)
        # the kernel writes grad_out (the logits themselves when in place) directly whenever
        # it can be viewed as rows of the compute dtype; it reads a row before writing it
        gres, finish = _rows_out(ctx, grad_out, xd, (ax,), cdt)
    loss = _empty((n,), np.float64, ctx.stream)
    if soft:
        _d_cross_entropy_soft(rows, tr, wd, eps, zl, loss, gres, gscale, ctx.stream)
    else:
        wsum = float(c) if wd is None else _device_sum(wd, ctx.stream)
        _d_cross_entropy(rows, tr, wd, wsum, ii, eps, zl, loss, gres, gscale, ctx.stream)

    if reduction == "none":
        lo = _empty((n,), xd.dtype, ctx.stream)
        if n:
            _copy(loss, lo, ctx.stream)
        lv = ctx.wrap(_view(lo, row_shape, _c_strides(row_shape, lo.dtype.itemsize)))
    else:
        lv = ctx.scalar(_device_sum(loss, ctx.stream) * scale, cdt)
    return (lv, finish()) if return_grad else lv


# ----------------------------------------------------------------------------- elementwise
def _ew_run(ctx, name, xd, cdt, operands, flag, eps, reduction, denom, return_grad, grad_output, grad_out,
            god, var_grad=None):
    """The device counterpart of ``fastloss._api._elementwise``.

    ``operands``: device views broadcast to ``xd.shape`` (or None) in the kernel's order
    (b, p, q).  ``var_grad``: for the Gaussian NLL, a function of the full-size float64-summable
    gradient buffer that returns ``d_var``."""
    go = _grad_output_scalar(ctx, grad_output, reduction)
    shape = tuple(xd.shape)
    gout = None
    if go is None:  # an array for reduction="none"
        if return_grad:
            gout = _grad_output_array(ctx, grad_output, shape, cdt)
        else:  # validated (shape, dtype), otherwise unused: there is no gradient to scale
            _grad_output_array(ctx, grad_output, shape, cdt, upload=False)
        go = 1.0
    scale = 1.0 if reduction in ("none", "sum") else (1.0 / denom if denom else math.nan)

    # One (R, K) layout for every operand: the dims merged where they are contiguous in all
    # operands and in the outputs, walked in memory order (a Fortran-ordered input is walked
    # transposed and its outputs are allocated Fortran-ordered, like the host's Layout).
    ins = [xd] + list(operands) + [gout]
    fortran = len(shape) >= 2 and xd.is_f_contiguous() and not xd.is_c_contiguous()
    perm = list(range(len(shape)))[::-1] if fortran else list(range(len(shape)))
    pshape = [shape[d] for d in perm]
    out_strides = _c_strides(pshape, cdt.itemsize)

    def permuted(o):
        return [o.strides[d] for d in perm]

    def needs_copy(o, ndims):
        return o is not None and (np.dtype(o.dtype) != cdt or ndims > 2 or min(tuple(o.strides) + (0,)) < 0)

    ndims = len(_merge(pshape, [permuted(o) for o in ins if o is not None] + [out_strides]))
    flat = list(ins)
    if any(needs_copy(o, ndims) for o in ins):
        for k, o in enumerate(ins):
            if needs_copy(o, ndims):
                flat[k] = _empty(shape, cdt, ctx.stream, "F" if fortran else "C")
                _copy(o, flat[k], ctx.stream)
    live = [o for o in flat if o is not None]
    dims = _merge(pshape, [permuted(o) for o in live] + [out_strides])
    rk = [1] * (2 - len(dims)) + [d[0] for d in dims]

    def as2(o, k):
        if o is None:
            return None
        st = [d[1][k] for d in dims]
        return _view(o, rk, [0] * (2 - len(st)) + st)

    col = {id(o): k for k, o in enumerate(live)}
    two = [None if o is None else as2(o, col[id(o)]) for o in flat]
    order = "F" if fortran else "C"
    new_out = lambda: _empty(shape, cdt, ctx.stream, order)  # noqa: E731
    loss = new_out() if reduction == "none" else None
    grad = grad2 = None
    direct = False
    if return_grad:
        # write straight into grad_out (or, in place, the input) when it is laid out like
        # the outputs in the compute dtype; else into a temporary copied over at the end
        direct = (
            god is not None and np.dtype(god.dtype) == cdt
            and (god.is_f_contiguous() if fortran else god.is_c_contiguous())
        )
        grad = god if direct else new_out()
        if var_grad is not None:
            grad2 = new_out()
    gs = go * scale
    part = _d_elementwise(
        name, two[0], two[1], two[2], two[3], flag, eps, as2(loss, len(live)), as2(grad, len(live)),
        as2(grad2, len(live)), gs, two[4], ctx.stream,
    )
    if reduction == "none":
        lv = ctx.wrap(_cast_to(ctx, loss, xd.dtype))
    else:
        lv = ctx.scalar(_sum_partials(part, ctx.stream) * scale, cdt)
    if not return_grad:
        return lv
    if god is not None:
        if not direct:
            _copy(grad, god, ctx.stream)
        g = grad_out
    else:
        g = ctx.wrap(_cast_to(ctx, grad, xd.dtype))
    if var_grad is None:
        return lv, g
    return lv, (g, var_grad(grad2, order))


def _same_shape_target(ctx, target, xshape, name):
    td = ctx.dev(target, name)
    _compute_dtype(td, name)
    if tuple(td.shape) != xshape:
        raise ValueError(f"{name}: expected the shape of the input {xshape}, found {tuple(td.shape)}")
    return td


def _dc_bce_with_logits(ctx, logits, target, weight=None, pos_weight=None, reduction="mean",
                        return_grad=False, grad_output=None, grad_out=None, **_):
    xd = ctx.dev(logits, "logits")
    cdt = _compute_dtype(xd, "logits")
    shape = tuple(xd.shape)
    reduction = V.check_reduction(reduction)
    td = _same_shape_target(ctx, target, shape, "target")
    wd = None if weight is None else _operand(ctx, weight, "weight", cdt, shape)
    pw = None
    if pos_weight is not None:
        pw = _operand(ctx, pos_weight, "pos_weight", cdt, None)
        if len(shape) and len(pw.shape) and tuple(pw.shape)[-1] not in (1, shape[-1]):
            raise ValueError(
                f"pos_weight: expected one weight per class along the last axis ({shape[-1]}), found shape {tuple(pw.shape)}"
            )
        V.broadcast_to_or_raise(_meta(pw), shape, "pos_weight")
        pw = _bcast_view(pw, shape)
    return_grad = bool(return_grad)
    god = _grad_out_device(ctx, grad_out, shape, np.dtype(xd.dtype), return_grad)
    if god is not None:
        _check_no_partial_overlap(god, [("logits", xd), ("target", td)], "grad_out")
    return _ew_run(ctx, "bce_with_logits", xd, cdt, [td, wd, pw], 0, 0.0, reduction, total_of(shape),
                   return_grad, grad_output, grad_out, god)


def total_of(shape):
    return int(np.prod(shape, dtype=np.int64))


def _dc_bce(ctx, probs, target, weight=None, reduction="mean", return_grad=False, grad_output=None,
            grad_out=None, **_):
    xd = ctx.dev(probs, "probs")
    cdt = _compute_dtype(xd, "probs")
    shape = tuple(xd.shape)
    reduction = V.check_reduction(reduction)
    td = _same_shape_target(ctx, target, shape, "target")

    def range_error(d, name, what):  # the host path's message, from a host copy (error path only)
        p = ctx.host(d)
        if d is td:  # the host judges the target cast to the compute dtype
            p = p.astype(cdt)
        with np.errstate(invalid="ignore"):
            bad = (p < 0) | (p > 1)
        pos = V.first_position(bad, p.shape)
        raise ValueError(f"{name}: expected {what} in [0, 1], found {p[pos]} at position {pos}")

    # the range checks run on the raw probs, then the raw targets (any dtype; NaN passes)
    # before the other operands are judged, as on the host
    for d, name, what in ((xd, "probs", "probabilities"), (td, "target", "targets")):
        if _first_bad("check_range", _kernel_dtype(d), (_as2_any(ctx, d), 0.0, 1.0), ctx.stream, total_of(shape)):
            range_error(d, name, what)
    wd = None if weight is None else _operand(ctx, weight, "weight", cdt, shape)
    return_grad = bool(return_grad)
    god = _grad_out_device(ctx, grad_out, shape, np.dtype(xd.dtype), return_grad)
    if god is not None:
        _check_no_partial_overlap(god, [("probs", xd), ("target", td)], "grad_out")
    return _ew_run(ctx, "bce", xd, cdt, [td, wd, None], 0, 0.0, reduction, total_of(shape), return_grad,
                   grad_output, grad_out, god)


def _as2_any(ctx, d):
    """A 2-D (R, K) view (or C-contiguous copy) of device array ``d`` for the check kernels
    (bfloat16 is widened to float32 first: kernels cannot read it)."""
    if isinstance(d, _BF16):
        d = _cast_to(ctx, d, np.float32)
    shape = tuple(d.shape)
    dims = _merge(shape, [d.strides])
    if len(dims) <= 2 and min(tuple(d.strides) + (0,)) >= 0:
        rk = [1] * (2 - len(dims)) + [x[0] for x in dims]
        st = [0] * (2 - len(dims)) + [x[1][0] for x in dims]
        return _view(d, rk, st)
    c = _empty(shape, d.dtype, ctx.stream)
    _copy(d, c, ctx.stream)
    k = shape[-1] if shape else 1
    return _view(c, (total_of(shape) // max(k, 1), k), (k * c.dtype.itemsize, c.dtype.itemsize))


def _dc_kl_div(ctx, input, target, log_target=False, reduction="batchmean", return_grad=False,
               grad_output=None, grad_out=None, **_):
    xd = ctx.dev(input, "input")
    cdt = _compute_dtype(xd, "input")
    shape = tuple(xd.shape)
    reduction = V.check_reduction(reduction, ("batchmean", "mean", "sum", "none"))
    td = _operand(ctx, target, "target", cdt, shape)
    return_grad = bool(return_grad)
    god = _grad_out_device(ctx, grad_out, shape, np.dtype(xd.dtype), return_grad)
    if god is not None:
        _check_no_partial_overlap(god, [("input", xd), ("target", td)], "grad_out")
    if reduction == "batchmean":
        reduction, denom = "mean", (shape[0] if shape else 1)
    else:
        denom = total_of(shape)
    return _ew_run(ctx, "kl_div", xd, cdt, [td, None, None], bool(log_target), 0.0, reduction, denom,
                   return_grad, grad_output, grad_out, god)


def _dc_mse(ctx, input, target, reduction="mean", return_grad=False, grad_output=None, grad_out=None, **_):
    xd = ctx.dev(input, "input")
    cdt = _compute_dtype(xd, "input")
    shape = tuple(xd.shape)
    reduction = V.check_reduction(reduction)
    td = _operand(ctx, target, "target", cdt, shape)
    return_grad = bool(return_grad)
    god = _grad_out_device(ctx, grad_out, shape, np.dtype(xd.dtype), return_grad)
    if god is not None:
        _check_no_partial_overlap(god, [("input", xd), ("target", td)], "grad_out")
    return _ew_run(ctx, "mse", xd, cdt, [td, None, None], 0, 0.0, reduction, total_of(shape), return_grad,
                   grad_output, grad_out, god)


def _dc_gaussian_nll(ctx, input, target, var, full=False, eps=1e-6, reduction="mean",
                     return_grad=False, grad_output=None, **_):
    xd = ctx.dev(input, "input")
    cdt = _compute_dtype(xd, "input")
    shape = tuple(xd.shape)
    reduction = V.check_reduction(reduction)
    e = V.check_real(eps, "eps", 0.0)
    td = _operand(ctx, target, "target", cdt, shape)
    var_is_float = (
        isinstance(var, (int, float, np.integer, np.floating)) and not isinstance(var, (bool, np.bool_))
    )
    if var_is_float:
        if var < 0:  # SPEC: negative var is a ValueError, a float one too
            raise ValueError(f"var: expected non-negative variances, found {var!r}")
        vd = _bcast_scalar(var, cdt, shape, ctx.stream)
        orig = vshape = ()
        vdt = cdt
    else:
        vd = ctx.dev(var, "var")
        _compute_dtype(vd, "var")
        orig = vshape = tuple(vd.shape)
        if vshape == shape:
            pass
        elif len(shape) and vshape == shape[:-1]:  # one dimension fewer: one variance per row
            vshape = vshape + (1,)
            vd = _view(vd, vshape, tuple(vd.strides) + (0,))
        elif len(vshape) == len(shape) and all(a == b or a == 1 for a, b in zip(vshape, shape)):
            pass
        else:
            raise ValueError(
                f"var: expected a float, the input's shape {shape}, that shape without its last dimension, "
                f"or the same rank with size-1 dimensions, found shape {orig}"
            )
        vraw = vd

        def var_error():
            v = ctx.host(vraw)
            with np.errstate(invalid="ignore"):
                neg = v < 0
            pos = V.first_position(neg, v.shape)
            raise ValueError(f"var: expected non-negative variances, found {v[pos]} at position {pos}")

        if _first_bad("check_range", _kernel_dtype(vd), (_as2_any(ctx, vd), 0.0, math.inf), ctx.stream, total_of(vshape)):
            var_error()
        vdt = np.dtype(vd.dtype)  # d_var has var's dtype, like every gradient (float16 too)
        vd = _bcast_view(vd, shape)

    def d_var(g2, order):
        """Sum the full-size gradient back onto ``var`` in float64 (the host's reduce_grad)."""
        src = _view(g2, (g2.size,), (g2.dtype.itemsize,))  # g2 is contiguous in ``order``
        if var_is_float:
            return ctx.scalar(_device_sum(src, ctx.stream) if g2.size else 0.0, cdt)
        nv = total_of(vshape)
        acc = _empty((nv,), np.float64, ctx.stream)
        if nv:
            grid, tpb = _flat_cfg(nv)
            _kern("fill", np.float64)[grid, tpb, ctx.stream](acc, 0.0)
        cs = _c_strides(vshape, 1)
        dstride = [0 if vshape[k] == 1 and shape[k] != 1 else cs[k] for k in range(len(shape))]
        fshape = list(shape)
        if order == "F":  # the flat index of an F-ordered buffer runs over the reversed dims
            fshape, dstride = fshape[::-1], dstride[::-1]
        if g2.size:
            grid, tpb = _flat_cfg(g2.size)
            _kern("sum_to", cdt)[grid, tpb, ctx.stream](
                src, cuda.to_device(np.array(fshape, np.int64), stream=ctx.stream),
                cuda.to_device(np.array(dstride, np.int64), stream=ctx.stream), acc,
            )
        o = _empty(orig, vdt, ctx.stream)
        if nv:
            _copy(_view(acc, orig, _c_strides(orig, 8)), o, ctx.stream)
        return ctx.wrap(o)

    return _ew_run(ctx, "gaussian_nll", xd, cdt, [td, vd, None], bool(full), e, reduction, total_of(shape),
                   bool(return_grad), grad_output, None, None, var_grad=d_var)


_PUBLIC = {
    "logsumexp": _dc_logsumexp,
    "softmax": lambda ctx, **kw: _dc_softmax_like(ctx, 1, **kw),
    "log_softmax": lambda ctx, **kw: _dc_softmax_like(ctx, 2, **kw),
    "softmax_backward": lambda ctx, **kw: _dc_softmax_bwd(ctx, 0, **kw),
    "log_softmax_backward": lambda ctx, **kw: _dc_softmax_bwd(ctx, 1, **kw),
    "cross_entropy": _dc_cross_entropy,
    "binary_cross_entropy_with_logits": _dc_bce_with_logits,
    "binary_cross_entropy": _dc_bce,
    "kl_div": _dc_kl_div,
    "mse_loss": _dc_mse,
    "gaussian_nll_loss": _dc_gaussian_nll,
}


def device_call(func_name: str, kwargs: dict):
    """Run public function ``func_name`` on device-resident arguments.

    ``kwargs`` holds every public argument by name, as the user passed it (``backend``
    is ignored).  Validation comes first and follows the host path (:mod:`fastloss._api`)
    check by check, with the same exception types and messages; an out-of-range class index
    raises ``IndexError`` before any output, an in-place ``grad_out`` included, is written.
    The kernels then run on the caller's current stream (CuPy's / PyTorch's current stream,
    the Numba array's own stream, else the default stream).  Array results come back in the
    caller's library on the same device (CuPy -> CuPy, torch -> torch, Numba device array ->
    Numba device array); fully reduced results (losses, ``d_var`` of a float ``var``, the
    log-sum-exp of a 1-D input) are NumPy scalars of the compute dtype (float16 and bfloat16 ->
    float32), as on the host; reading one synchronizes the stream, like ``tensor.item()``.
    """
    try:
        impl = _PUBLIC[func_name]
    except KeyError:
        raise ValueError(f"func_name: expected one of {sorted(_PUBLIC)}, found {func_name!r}") from None
    kw = {k: v for k, v in kwargs.items() if k != "backend"}
    lead = next(iter(kw.values()))
    for v in kw.values():
        if is_device_array(v):
            lead = v
            break
    return impl(_Ctx(lead), **kw)
