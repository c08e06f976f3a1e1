"""The ``cuda`` backend: Numba CUDA (numba-cuda) kernels for NVIDIA GPUs.

Two ways in, one set of launchers
---------------------------------
* Device-resident data (CuPy arrays, PyTorch CUDA tensors, Numba device arrays, anything with
  ``__cuda_array_interface__`` or a CUDA ``__dlpack__``): the public layer runs its one code
  path with this backend's array adaptor (:func:`device_arrays`,
  :class:`fastloss._backends._cuda_arrays.DeviceArrays`) and the kernel entry points bound to
  the caller's current stream (:class:`OnStream`); results come back in the caller's library.
* NumPy host arrays with ``backend="cuda"`` (*offload*): the module-level entry points of the
  backend protocol (:mod:`fastloss._backends._protocol`) copy the inputs to the GPU, run the
  same launchers, and copy the results back into the given host outputs (a gradient output
  may be the first input itself).

Kernels (:mod:`fastloss._backends._cuda_kernels`) compile on first use, never at import.
Row-wise kernels give each row ``blockDim.x`` threads (several rows per block for small class
counts) with shared-memory reductions; the softmax cross-entropy computes loss and gradient
in one launch that reads the logits from DRAM once and writes the gradient once (the second
and third pass over a row hit L2).  Loss sums are reduced in float64 on the device into one
partial per block, and the few partials are added on the host.  Absent operands reach a
kernel as small dummies with a flag (a kernel takes arrays, never None).  A cross-entropy
``softcap > 0`` launches the capped twin of its kernel (``ce_hard_cap``/``ce_soft_cap``,
compiled apart: the tanh and its derivative in the same passes), so ``softcap == 0`` runs the
uncapped kernels as before.  A class shard (``cross_entropy_shard``: the global row lse given)
runs ``ce_shard``/``ce_shard_cap`` in the same launch shape: one pass over the shard, a block
reduction only for the label-smoothing sum.
"""
from __future__ import annotations

import numpy as np

try:  # numba-cuda is optional: without it the backend reports itself unavailable
    from numba import cuda

    from ._cuda_adaptor import DeviceArrays
    from ._cuda_arrays import (
        _bcast_scalar,
        _device_sum,
        _empty,
        _fill,
        _grid2,
        _kern,
        _row_cfg,
        _sum_partials,
        _upload,
    )

    _IMPORT_ERROR = ""
except Exception as exc:  # ImportError, or a broken CUDA toolkit install
    cuda = None
    _IMPORT_ERROR = f"numba-cuda cannot be imported ({type(exc).__name__}: {exc})"

NAME = "cuda"


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


def device_arrays(lead):
    """The array adaptor for a call whose argument ``lead`` lives on a GPU."""
    return DeviceArrays(lead, OnStream)


# ----------------------------------------------------------------------------- device kernels
# These take Numba device arrays already normalized as the protocol says (2-D, compute
# dtype, outputs allocated) and launch on ``stream``; every entry point (OnStream, and through
# it the offload ones) ends here.
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


def _ce_launch(name, x, softcap, weight, lse, grad, gscale, stream):
    """Cross-entropy kernel ``name`` (its capped twin ``name + "_cap"`` when ``softcap > 0``)
    configured for the rows of ``x`` on ``stream``, and its operands ``(w, ls, gr, gs)``:
    absent ones become 1-element placeholders (a kernel takes arrays, never None; the
    ``has_w``/``want_lse``/``want_grad`` flags say what is real)."""
    dt = x.dtype
    grid, block = _row_cfg(*x.shape)
    return _kern(name + "_cap" if softcap > 0 else name, dt)[grid, block, stream], (
        weight if weight is not None else _empty((1,), dt, stream),
        lse if lse is not None else _empty((1,), np.float64, stream),
        grad if grad is not None else _empty((1, 1), dt, stream),
        gscale if gscale is not None else _empty((1,), np.float64, stream))


def _d_cross_entropy(x, target, weight, wsum, ignore_index, eps, zl, softcap, loss, lse, grad, gscale, stream):
    if x.shape[0] == 0:
        return
    cap = float(softcap or 0.0)
    k, (w, ls, gr, gs) = _ce_launch("ce_hard", x, cap, weight, lse, grad, gscale, stream)
    k(x, target, w, weight is not None, float(wsum), int(ignore_index), float(eps), float(zl), cap, loss,
      ls, lse is not None, gr, grad is not None, gs)


def _d_cross_entropy_shard(x, target, weight, wsum, ignore_index, eps, zl, softcap, lse, class_offset, num_classes,
                           loss, grad, gscale, stream):
    """One shard of the classes (``ce_shard``): ``lse`` is the given global float64 row lse."""
    if x.shape[0] == 0:
        return
    cap = float(softcap or 0.0)
    k, (w, ls, gr, gs) = _ce_launch("ce_shard", x, cap, weight, lse, grad, gscale, stream)
    k(x, target, w, weight is not None, float(wsum), int(ignore_index), float(eps), float(zl), cap, ls,
      int(class_offset), int(num_classes), loss, gr, grad is not None, gs)


def _d_cross_entropy_soft(x, y, weight, eps, zl, softcap, loss, lse, grad, gscale, stream):
    if x.shape[0] == 0:
        return
    cap = float(softcap or 0.0)
    k, (w, ls, gr, gs) = _ce_launch("ce_soft", x, cap, weight, lse, grad, gscale, stream)
    k(x, y, w, weight is not None, float(eps), float(zl), cap, loss, ls, lse is not None, gr, grad is not None,
      gs)


def _d_elementwise(name, a, b, p, q, flag, eps, loss, grad, grad2, gscale, gout, stream):
    """Launch elementwise kernel ``name``; returns the device array of per-block partial
    float64 sums of the loss.  ``p``/``q``/``gout`` None mean ones (stride-0 views)."""
    r, k = a.shape
    dt = a.dtype
    grid, block = _grid2(r, k)
    part = _empty((grid[0] * grid[1],), np.float64, stream)
    if r * k == 0:
        _fill(part, 0.0, stream)
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


# ----------------------------------------------------------------------------- entry points on a stream
class _Total:
    """The float64 loss total of an elementwise launch: its per-block partials, added on the
    host only when the total is asked for (a reduced loss), so ``reduction="none"`` never
    waits for the stream."""

    __slots__ = ("part", "stream")

    def __init__(self, part, stream):
        self.part, self.stream = part, stream

    def __float__(self):
        return _sum_partials(self.part, self.stream)


class OnStream:
    """The backend protocol's entry points for device arrays, launched on one ``stream``."""

    def __init__(self, stream):
        self.stream = stream

    def logsumexp(self, x, out):
        _d_row_lse(x, out, None, 0, self.stream)

    def softmax(self, x, out):
        _d_row_lse(x, None, out, 1, self.stream)

    def log_softmax(self, x, out):
        _d_row_lse(x, None, out, 2, self.stream)

    def softmax_backward(self, g, y, out):
        _d_softmax_bwd(g, y, out, 0, self.stream)

    def log_softmax_backward(self, g, y, out):
        _d_softmax_bwd(g, y, out, 1, self.stream)

    def _rows_scale(self, gscale, n):
        """A scalar gradient scale as the (n,) float64 array the kernels index."""
        if gscale is None or np.ndim(gscale):
            return gscale
        g = _empty((n,), np.float64, self.stream)
        _fill(g, float(gscale), self.stream)
        return g

    def _rows(self, loss, n):
        """The row-loss output: ``loss``, or for a reduced loss (None) ``n`` device rows that
        :meth:`_total` sums."""
        return _empty((n,), np.float64, self.stream) if loss is None else loss

    def _total(self, loss, rows):
        """The protocol's return: for a reduced loss (``loss`` None) the float64 total of the
        row losses (per-block partial sums on the device, added on the host in block order),
        else None."""
        return _device_sum(rows, self.stream) if loss is None else None

    def cross_entropy(self, x, target, weight, ignore_index, label_smoothing, z_loss, softcap, loss, lse, grad,
                      gscale):
        wsum = float(x.shape[1]) if weight is None else _device_sum(weight, self.stream)
        rows = self._rows(loss, x.shape[0])
        _d_cross_entropy(x, target, weight, wsum, ignore_index, label_smoothing, z_loss, softcap, rows, lse, grad,
                         None if grad is None else self._rows_scale(gscale, x.shape[0]), self.stream)
        return self._total(loss, rows)

    def cross_entropy_shard(self, x, target, weight, ignore_index, label_smoothing, z_loss, softcap, lse,
                            class_offset, num_classes, loss, grad, gscale):
        # the sum of all num_classes weights enters only the smoothing terms: without
        # smoothing no device sum (which waits for the stream) is taken
        if not label_smoothing:
            wsum = 0.0
        else:
            wsum = float(num_classes) if weight is None else _device_sum(weight, self.stream)
        rows = self._rows(loss, x.shape[0])
        _d_cross_entropy_shard(x, target, weight, wsum, ignore_index, label_smoothing, z_loss, softcap, lse,
                               class_offset, num_classes, rows, grad,
                               None if grad is None else self._rows_scale(gscale, x.shape[0]), self.stream)
        return self._total(loss, rows)

    def cross_entropy_soft(self, x, target, weight, label_smoothing, z_loss, softcap, loss, lse, grad, gscale):
        rows = self._rows(loss, x.shape[0])
        _d_cross_entropy_soft(x, target, weight, label_smoothing, z_loss, softcap, rows, lse, grad,
                              None if grad is None else self._rows_scale(gscale, x.shape[0]), self.stream)
        return self._total(loss, rows)

    def _ew(self, name, a, b, p, q, flag, eps, loss, grad, grad2, gscale, gout):
        return _Total(_d_elementwise(name, a, b, p, q, flag, eps, loss, grad, grad2, gscale, gout, self.stream),
                      self.stream)

    def bce_with_logits(self, z, y, weight, pos_weight, loss, grad, gscale, gout):
        return self._ew("bce_with_logits", z, y, weight, pos_weight, 0, 0.0, loss, grad, None, gscale, gout)

    def bce(self, p, y, weight, loss, grad, gscale, gout):
        return self._ew("bce", p, y, weight, None, 0, 0.0, loss, grad, None, gscale, gout)

    def kl_div(self, x, t, log_target, loss, grad, gscale, gout):
        return self._ew("kl_div", x, t, None, None, log_target, 0.0, loss, grad, None, gscale, gout)

    def mse(self, x, t, loss, grad, gscale, gout):
        return self._ew("mse", x, t, None, None, 0, 0.0, loss, grad, None, gscale, gout)

    def gaussian_nll(self, x, t, var, full, eps, loss, grad, grad_var, gscale, gout):
        return self._ew("gaussian_nll", x, t, var, None, full, eps, loss, grad, grad_var, gscale, gout)


# ----------------------------------------------------------------------------- offload (host)
class _Offload:
    """One offloaded call: NumPy operands copied to the GPU, the entry points of
    :class:`OnStream` on a new stream, device results copied back into the host outputs."""

    def __init__(self):
        self.stream = cuda.stream()
        self.k = OnStream(self.stream)
        self._back = []  # (device array, host output)

    def up(self, a):
        """Device copy of host array ``a`` (None stays None; a scalar stays a scalar)."""
        if a is None or not np.ndim(a) and not isinstance(a, np.ndarray):
            return a
        return _upload(a, self.stream)

    def out(self, host, like=None):
        """A device array for host output ``host``; copied back by :meth:`finish`.  ``like``
        (a device input that ``host`` aliases) is reused as the output: in place."""
        if host is None:
            return None
        dev = like if like is not None else _empty(host.shape, host.dtype, self.stream)
        self._back.append((dev, host))
        return dev

    def finish(self, total=None):
        total = None if total is None else float(total)
        tmps = [(d.copy_to_host(stream=self.stream), h) for d, h in self._back]
        self.stream.synchronize()
        for tmp, host in tmps:
            host[...] = tmp
        return total


def _inplace(dev_in, host_in, host_out):
    """Reuse the device copy of the input for the output when they are one host array."""
    if host_out is not None and host_out is host_in and dev_in.is_c_contiguous():
        return dev_in
    return None


def _rowwise(method, a, b, out):
    """Offload a row-wise entry point ``method(a[, b], out)``; ``out`` may be ``a`` itself."""
    h = _Offload()
    da = h.up(a)
    ins = (da,) if b is None else (da, h.up(b))
    getattr(h.k, method)(*ins, h.out(out, _inplace(da, a, out)))
    h.finish()


def logsumexp(x, out):
    h = _Offload()
    h.k.logsumexp(h.up(x), h.out(out))
    h.finish()


def softmax(x, out):
    _rowwise("softmax", x, None, out)


def log_softmax(x, out):
    _rowwise("log_softmax", x, None, out)


def softmax_backward(g, y, out):
    _rowwise("softmax_backward", g, y, out)


def log_softmax_backward(g, y, out):
    _rowwise("log_softmax_backward", g, y, out)


def cross_entropy(x, target, weight, ignore_index, label_smoothing, z_loss, softcap, loss, lse, grad, gscale):
    h = _Offload()
    dx = h.up(x)
    total = h.k.cross_entropy(dx, h.up(np.asarray(target, dtype=np.int64)), h.up(weight), ignore_index,
                              label_smoothing, z_loss, softcap, h.out(loss), h.out(lse),
                              h.out(grad, _inplace(dx, x, grad)), h.up(gscale))
    return h.finish(total)


def cross_entropy_shard(x, target, weight, ignore_index, label_smoothing, z_loss, softcap, lse, class_offset,
                        num_classes, loss, grad, gscale):
    h = _Offload()
    dx = h.up(x)
    total = h.k.cross_entropy_shard(dx, h.up(np.asarray(target, dtype=np.int64)), h.up(weight), ignore_index,
                                    label_smoothing, z_loss, softcap, h.up(np.asarray(lse, dtype=np.float64)),
                                    class_offset, num_classes, h.out(loss), h.out(grad, _inplace(dx, x, grad)),
                                    h.up(gscale))
    return h.finish(total)


def cross_entropy_soft(x, target, weight, label_smoothing, z_loss, softcap, loss, lse, grad, gscale):
    h = _Offload()
    dx = h.up(x)
    total = h.k.cross_entropy_soft(dx, h.up(target), h.up(weight), label_smoothing, z_loss, softcap, h.out(loss),
                                   h.out(lse), h.out(grad, _inplace(dx, x, grad)), h.up(gscale))
    return h.finish(total)


def _offload_elementwise(method, a, operands, params, loss, grads, gscale, gout):
    """Offload elementwise entry point ``method``: ``grads`` are its gradient outputs, the
    first of which may be ``a`` itself."""
    h = _Offload()
    da = h.up(a)
    outs = [h.out(g, _inplace(da, a, g) if k == 0 else None) for k, g in enumerate(grads)]
    total = getattr(h.k, method)(da, *[h.up(o) for o in operands], *params, h.out(loss), *outs, gscale, h.up(gout))
    return h.finish(total)


def bce_with_logits(z, y, weight, pos_weight, loss, grad, gscale, gout):
    return _offload_elementwise("bce_with_logits", z, (y, weight, pos_weight), (), loss, (grad,), gscale, gout)


def bce(p, y, weight, loss, grad, gscale, gout):
    return _offload_elementwise("bce", p, (y, weight), (), loss, (grad,), gscale, gout)


def kl_div(x, t, log_target, loss, grad, gscale, gout):
    return _offload_elementwise("kl_div", x, (t,), (log_target,), loss, (grad,), gscale, gout)


def mse(x, t, loss, grad, gscale, gout):
    return _offload_elementwise("mse", x, (t,), (), loss, (grad,), gscale, gout)


def gaussian_nll(x, t, var, full, eps, loss, grad, grad_var, gscale, gout):
    return _offload_elementwise("gaussian_nll", x, (t, var), (full, eps), loss, (grad, grad_var), gscale, gout)
