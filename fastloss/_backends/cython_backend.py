"""The ``cython`` backend: ahead-of-time compiled OpenMP kernels (``fastloss._kernels_cy``).

This is the fallback compiled backend for machines without Numba (or with
``FASTLOSS_DISABLE_NUMBA=1``).  The extension is built from ``kernels/_kernels_cy.pyx`` and
``kernels/fl_math.hpp`` by ``setup.py`` when a C compiler and Cython are present; it is optional,
and when it is missing :func:`unavailable_reason` says why.

Kernels
-------
Every entry point has the signature and semantics of :mod:`fastloss._backends.numpy_backend`
(the protocol).  This module only adapts arguments: ``None`` optional arrays become empty
dummies plus a flag, scalars/array ``gscale`` are normalized, class indices become int64.
The compiled side accepts any strides (Fortran order, strided and stride-0 broadcast views)
through typed memoryviews, gathering non-contiguous rows/blocks into thread-local buffers.

* Row-wise kernels (log-sum-exp, softmax, cross-entropy): OpenMP ``prange`` over rows.  The
  row log-sum-exp is ``m + log(sum(exp(x - m)))`` with ``m`` the row max (0 when it is not
  finite: ``+inf`` rows give ``+inf``, rows of only ``-inf`` give ``-inf``, never
  ``inf - inf``).  Log-probabilities are formed as ``(x - m) - log(sum(exp(x - m)))``,
  never ``x - lse``: with large logits ``lse`` rounds to ``m`` and would lose the O(1) part
  (float32 logits ~1e4 lose ~5e-4; at 3e38 all of it).  The cross-entropy reads a row once
  from memory and writes its gradient once: the exponentials are stored into the gradient
  row while they are summed (the row stays in L2) and then rescaled.
* Logit soft cap (``softcap > 0``): the row kernels' first pass writes the capped row
  ``cap tanh(x / cap)`` into a per-thread row buffer (and the cap's derivative into the
  gradient row) and the other passes run on it; the few-class kernels cap the transposed block
  and multiply the gradient by the derivative before writing it back.  No extra pass over the
  logits in memory; ``softcap == 0`` runs the loops as before.  The ``lse`` output (every row,
  ignored ones included) comes from the same max and sum of exp.
* Class-sharded cross-entropy (``cross_entropy_shard``, the global row ``lse`` given): one
  pass per row, ``p = exp(x' - lse)`` with no max and no sum of exps, the gradient written
  once (in place over ``x`` allowed) and the smoothing sum ``sum_c w_c x'_c`` accumulated in
  float64 in the same loop; float32 subtracts ``lse`` split into two floats (its low digits
  matter once ``|lse|`` is large).  With the soft cap each block of 1024 classes is capped
  into an L1 buffer first (a fused loop was ~1.45x slower).  No column-block path: a shard
  pass has no max/sum chains to vectorize across rows.
* Few classes (e.g. 262144 x 10): a 10-element row never fills a vector and its max / sum
  chains are latency bound, so blocks of 16-64 rows are transposed into column layout
  (AVX 8x8 / 4x4 tile transposes) and every loop runs over the rows of the block; the
  gradient is transposed back.  Same formulas and inf/NaN semantics as the row kernels (rows
  with a non-finite max or a NaN are recomputed by them).  About 5x faster at 10 classes;
  used up to ~100 (float32) / ~48 (float64) classes for the cross-entropy, fewer for the
  normalizers.  Fortran-order logits (row stride 1) are read by columns in place, without
  the transpose, up to ``C * itemsize`` = 8 KB.
* Elementwise kernels: OpenMP over blocks of 1024 elements.
* Inner loops are vectorized by the C compiler with ``#pragma omp simd`` and a polynomial
  ``exp``/``log`` (< 1.5 ulp), without ``-ffast-math`` (inf/NaN behave as in the reference).
  Row losses and all sums are accumulated in float64.

Threads: :func:`set_num_threads` sets the OpenMP team size of every following call (default:
OpenMP's own, i.e. ``OMP_NUM_THREADS`` or all cores).  Calls below ~262k elements run on one
thread (``_PAR_MIN`` in the extension).

Fork safety: GNU OpenMP's thread pool does not survive ``fork()`` -- a child forked after a
parallel call (``multiprocessing``'s ``'fork'`` start method, DataLoader-style workers) would
hang in its first parallel region.  In such a child (see
:func:`fastloss.forked_serial`; a pool started by the ``numba`` backend's OpenMP layer
counts too, as both use the same libgomp) every kernel runs with a team of one thread, which
libgomp runs on the calling thread without touching the stale pool.  :func:`set_num_threads`
there checks its argument but keeps one thread.  Use the ``'spawn'`` or ``'forkserver'``
start method for workers that should compute in parallel.
"""
from __future__ import annotations

import os

import numpy as np

from . import forked_serial

NAME = "cython"

try:  # the compiled extension is optional
    from .. import _kernels_cy as _k
except ImportError as _exc:  # not built, built for another Python, or a missing libgomp
    _k = None
    _IMPORT_ERROR = f"{type(_exc).__name__}: {_exc}"
else:
    _IMPORT_ERROR = ""


def unavailable_reason() -> str:
    """Why this backend cannot be used here ("" when it can)."""
    if _k is None:
        return (
            "the compiled extension fastloss._kernels_cy is not built (fastloss was installed "
            "without a C compiler or without Cython, or the build failed; "
            f"importing it gave {_IMPORT_ERROR})"
        )
    return ""


def build_info() -> str:
    """How the extension was compiled (target, OpenMP), or why it is missing."""
    if _k is None:
        return unavailable_reason()
    return _k.build_info()


def _stay_serial() -> None:
    """In a child forked after a parallel call: one-thread OpenMP teams from now on."""
    if _k is not None and forked_serial(NAME):
        _k.set_num_threads(1)


_stay_serial()  # imported in such a child (the fork happened before this import)
if hasattr(os, "register_at_fork"):
    # runs after the registry's own handler, which decides (registration order)
    os.register_at_fork(after_in_child=_stay_serial)


def set_num_threads(n: int) -> None:
    """Run every following kernel on ``n`` (>= 1) OpenMP threads.

    In a child process forked after a parallel call (:func:`fastloss.forked_serial`)
    the request is checked but not applied: the kernels keep running on the calling thread,
    since the parent's OpenMP pool is unusable there.
    """
    if _k is None:
        return
    n = int(n)
    if forked_serial(NAME):
        if n < 1:
            raise ValueError(f"n: expected a positive number of threads, found {n}")
        return
    _k.set_num_threads(n)


def set_thread_cap(n: int) -> None:
    """Cap the OpenMP team of the kernels the calling thread runs at ``n`` (0: no cap); see
    :func:`fastloss._backends.thread_cap`.  An extension built without the cap ignores it."""
    hook = getattr(_k, "set_thread_cap", None)
    if hook is not None:
        hook(int(n))


def get_num_threads() -> int:
    """Threads the kernels use (1 in a child forked after a parallel call)."""
    return 1 if _k is None else _k.get_num_threads()


# ----------------------------------------------------------------------------- helpers
_DUMMY1 = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0, np.float64)}
_DUMMY2 = {np.dtype(np.float32): np.empty((0, 0), np.float32), np.dtype(np.float64): np.empty((0, 0), np.float64)}


def _ok(a):
    """``a`` as an ndarray whose strides are whole numbers of elements (else a copy).

    Typed memoryviews index by element; a view into a structured array (a field) can have a
    byte stride that is not a multiple of the item size -- rare enough for a copy.
    """
    a = np.asarray(a)
    if any(s % a.itemsize for s in a.strides):
        a = np.ascontiguousarray(a)
    return a


class _Out:
    """An output array for the kernels, with a write-back when the kernel cannot fill it
    directly -- strides that are not whole elements (a field of a structured array), a
    non-native byte order, or a dtype other than ``dt``: the kernel then fills a temporary."""

    __slots__ = ("dst", "arr")

    def __init__(self, a, dt=None):
        self.dst = a
        self.arr = a
        if a is not None:
            dt = a.dtype if dt is None else np.dtype(dt)
            if a.dtype != dt or not a.dtype.isnative or any(s % a.itemsize for s in a.strides):
                self.arr = np.empty(a.shape, dt.newbyteorder("="))

    def done(self):
        if self.arr is not self.dst:
            self.dst[...] = self.arr


def _rows(loss, n):
    """The row-loss output: ``loss``, or for a reduced loss (None) a buffer of ``n`` rows
    that :func:`_total` sums (the row kernels write rows: 8 bytes against C logits a row)."""
    return np.empty(n, np.float64) if loss is None else loss


def _total(loss, rows):
    """What a cross-entropy entry point returns: the float64 total of ``rows`` (NumPy's
    pairwise sum, an order fixed by the shape) for a reduced loss (``loss`` None), else None."""
    return float(np.sum(rows)) if loss is None else None


def _gscale_rows(gscale, n):
    """``gscale`` (scalar or per-row) as a float64 ``(n,)`` view (stride 0 for a scalar)."""
    g = np.asarray(gscale, dtype=np.float64)
    if g.ndim == 0 or g.shape != (n,):
        g = np.broadcast_to(g.reshape(-1) if g.size == 1 else g, (n,))
    return _ok(g)


def _transpose_if_fortran(arrays):
    """Elementwise kernels do not care which axis is last: when the first input is laid out with
    its first axis the faster one (Fortran order), work on the transposed views, whose rows are
    contiguous (and then usually collapse to one long row)."""
    s0, s1 = arrays[0].strides
    if arrays[0].shape[0] > 1 and arrays[0].shape[1] > 1 and abs(s0) < abs(s1):
        return [None if a is None else a.T for a in arrays]
    return arrays


def _collapse(arrays):
    """Elementwise operands ``(R, K)`` seen as ``(1, R*K)`` when every one allows it.

    A 1-D problem normalized to ``(N, 1)`` would otherwise give N one-element tasks.  An
    operand collapses when its row stride equals ``K`` times its element stride (contiguous
    rows back to back, or stride 0 on both axes).
    """
    first = next(a for a in arrays if a is not None)
    r, k = first.shape
    if r <= 1:
        return arrays
    out = []
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        s0, s1 = a.strides
        if s0 != k * s1:
            return arrays
        out.append(np.lib.stride_tricks.as_strided(a, (1, r * k), (0, s1), writeable=a.flags.writeable))
    return out


def _elementwise(kind, dt, x, t, w, pw, gout, loss, grad, grad_var, gscale, p1=0.0, p2=0.0, flag=0):
    shape = x.shape
    gsv = float(gscale)  # a scalar (the protocol): a per-element scale arrives as gout
    outs = [_Out(a, dt) for a in (loss, grad, grad_var)]
    arrays = [None if a is None else _ok(a) for a in (x, t, w, pw, gout)] + [o.arr for o in outs]
    for i in range(5):
        a = arrays[i]
        if a is not None and (a.dtype != dt or a.shape != shape):
            arrays[i] = np.broadcast_to(np.asarray(a, dtype=dt), shape)
    arrays = _transpose_if_fortran(arrays)
    arrays = _collapse(arrays)
    total = _k.elementwise(_k.KIND[kind], arrays, gsv, float(p1), float(p2), int(flag), dt)
    for o in outs:
        o.done()
    return total


# ----------------------------------------------------------------------------- row-wise
def _rowwise(fn, *args):
    ins = [_ok(a) for a in args[:-1]]
    o = _Out(args[-1], ins[0].dtype)
    fn(*ins, o.arr)
    o.done()


def logsumexp(x, out):
    _rowwise(_k.logsumexp, x, out)


def softmax(x, out):
    _rowwise(_k.softmax, x, out)


def log_softmax(x, out):
    _rowwise(_k.log_softmax, x, out)


def softmax_backward(g, y, out):
    _rowwise(_k.softmax_backward, g, y, out)


def log_softmax_backward(g, y, out):
    _rowwise(_k.log_softmax_backward, g, y, out)


def cross_entropy(x, target, weight, ignore_index, label_smoothing, z_loss, softcap, loss, lse, grad, gscale):
    x = _ok(x)
    dt = x.dtype
    n = x.shape[0]
    target = _ok(np.asarray(target, dtype=np.int64))
    if weight is None:
        w, has_w, wsum = _DUMMY1[dt], False, float(x.shape[1])
    else:
        w, has_w = np.ascontiguousarray(weight, dtype=dt), True
        wsum = float(np.sum(w, dtype=np.float64))
    has_g, has_lse = grad is not None, lse is not None
    go, lo, so = _Out(grad, dt), _Out(loss, np.float64), _Out(lse, np.float64)
    g = go.arr if has_g else _DUMMY2[dt]
    gs = _gscale_rows(gscale, n) if has_g else _DUMMY1[np.dtype(np.float64)]
    # loss None (a reduced loss): the kernel returns the total -- the few-classes one summing
    # per block, without writing the N row losses
    total = _k.cross_entropy(x, target, w, has_w, wsum, int(ignore_index), float(label_smoothing),
                             float(z_loss), float(softcap), _DUMMY1[np.dtype(np.float64)] if loss is None else lo.arr,
                             loss is None, so.arr if has_lse else _DUMMY1[np.dtype(np.float64)], has_lse, g,
                             has_g, gs)
    go.done()
    lo.done()
    so.done()
    return total


def cross_entropy_shard(x, target, weight, ignore_index, label_smoothing, z_loss, softcap, lse, class_offset,
                        num_classes, loss, grad, gscale):
    """One shard of the classes (``x`` holds ``[class_offset, class_offset + C)`` of
    ``num_classes``) with the global row ``lse`` given: one pass per row over the shard,
    ``p = exp(x' - lse)``, no max and no sum of exps (see the protocol)."""
    x = _ok(x)
    dt = x.dtype
    n = x.shape[0]
    target = _ok(np.asarray(target, dtype=np.int64))
    lse = _ok(np.asarray(lse, dtype=np.float64))  # read only: any strides
    if weight is None:
        w, has_w, wsum = _DUMMY1[dt], False, float(num_classes)
    else:  # the whole (num_classes,) vector: the kernel reads w[t] and this shard's slice
        w, has_w = np.ascontiguousarray(weight, dtype=dt), True
        wsum = float(np.sum(w, dtype=np.float64))
    has_g = grad is not None
    go, lo = _Out(grad, dt), _Out(_rows(loss, n), np.float64)
    g = go.arr if has_g else _DUMMY2[dt]
    gs = _gscale_rows(gscale, n) if has_g else _DUMMY1[np.dtype(np.float64)]
    _k.cross_entropy_shard(x, target, w, has_w, wsum, int(ignore_index), float(label_smoothing), float(z_loss),
                           float(softcap), lse, int(class_offset), int(num_classes), lo.arr, g, has_g, gs)
    go.done()
    lo.done()
    return _total(loss, lo.arr)


def cross_entropy_soft(x, target, weight, label_smoothing, z_loss, softcap, loss, lse, grad, gscale):
    x = _ok(x)
    dt = x.dtype
    n = x.shape[0]
    target = _ok(np.asarray(target, dtype=dt))
    if weight is None:
        w, has_w = _DUMMY1[dt], False
    else:
        w, has_w = np.ascontiguousarray(weight, dtype=dt), True
    has_g, has_lse = grad is not None, lse is not None
    go, lo, so = _Out(grad, dt), _Out(_rows(loss, n), np.float64), _Out(lse, np.float64)
    g = go.arr if has_g else _DUMMY2[dt]
    gs = _gscale_rows(gscale, n) if has_g else _DUMMY1[np.dtype(np.float64)]
    _k.cross_entropy_soft(x, target, w, has_w, float(label_smoothing), float(z_loss), float(softcap),
                          lo.arr, so.arr if has_lse else _DUMMY1[np.dtype(np.float64)], has_lse, g,
                          has_g, gs)
    go.done()
    lo.done()
    so.done()
    return _total(loss, lo.arr)


# ----------------------------------------------------------------------------- elementwise
def bce_with_logits(z, y, weight, pos_weight, loss, grad, gscale, gout):
    return _elementwise("bce_with_logits", z.dtype, z, y, weight, pos_weight, gout, loss, grad, None, gscale)


def bce(p, y, weight, loss, grad, gscale, gout):
    return _elementwise("bce", p.dtype, p, y, weight, None, gout, loss, grad, None, gscale)


def kl_div(x, t, log_target, loss, grad, gscale, gout):
    return _elementwise("kl_div", x.dtype, x, t, None, None, gout, loss, grad, None, gscale,
                        flag=int(bool(log_target)))


def mse(x, t, loss, grad, gscale, gout):
    return _elementwise("mse", x.dtype, x, t, None, None, gout, loss, grad, None, gscale)


def gaussian_nll(x, t, var, full, eps, loss, grad, grad_var, gscale, gout):
    # eps and the constant are rounded to the compute dtype, as the reference does
    dt = x.dtype
    cst = float(dt.type(0.5 * np.log(2.0 * np.pi))) if full else 0.0
    return _elementwise("gaussian_nll", dt, x, t, var, None, gout, loss, grad, grad_var, gscale,
                        p1=float(dt.type(eps)), p2=cst)
