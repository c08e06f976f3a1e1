"""Fused linear + cross-entropy: the loss of ``input @ linear_weight.T + linear_bias`` and its
gradients, chunk by chunk of rows (and, for huge vocabularies, of classes too: two passes over
the class chunks, the sharded cross-entropy of each), never holding the N x V logits.

The matrix products run on the BLAS of the caller's array library -- NumPy's for NumPy arrays
(``np.matmul(..., out=)`` into reused buffers, the weight gradient accumulated in blocks),
PyTorch's for PyTorch CPU tensors (``torch.matmul``
and ``addmm_`` on views of the same buffers; for NumPy arrays too with
``_config.LINEAR_BLAS = "torch"``) -- and each
chunk's cross-entropy and its gradient -- written in place over the chunk's logits -- is the
fused kernel of the chosen backend, through :func:`fastloss.cross_entropy` (so every backend,
the CUDA one offloading each chunk, and every option of the cross-entropy; class chunks through
its sharded form, ``lse=`` / ``class_offset=``, with each chunk's lse from ``row_lse``).
"""
from __future__ import annotations

import contextlib

import numpy as np

from .. import _arrays, _config
from .._backends import thread_cap
from .._validate import _is_torch, check_int
from ._common import _grad_output_array, _grad_scale_value, _index_error, _scalar
from .cross_entropy import _class_weight, _options, cross_entropy, row_lse
from .normalizers import logsumexp

# The default chunk: 1/16 of the N x V logits, within [CHUNK_MIN_BYTES, CHUNK_BYTES], and at
# least _MIN_ROWS rows.  Large chunks matter: the three products run on (chunk, .) operands, and
# d_linear_weight (V x H) is read and written once per chunk -- at 4096 x 512 x 32000 float32
# (AMD EPYC Zen 5, 2 threads) fastloss took 3.7x the products' time with 64-row chunks, 2.7x
# with 128, 2.0x with 256 (1/16 of the logits) and 1.7x with 512.
CHUNK_BYTES = 64 << 20
CHUNK_MIN_BYTES = 8 << 20
_MIN_ROWS = 16


def _budget(K, V, H, itemsize):
    """Bytes for a chunk's buffers: 1/16 of the ``K x V`` logits less the float64 bias gradient
    ``(V,)`` and the accumulation's temporary, clamped to ``[CHUNK_MIN_BYTES, CHUNK_BYTES]`` (a
    small batch still gets BLAS-sized chunks; a huge one a bounded buffer)."""
    return min(CHUNK_BYTES, max(CHUNK_MIN_BYTES, K * V * itemsize // 16 - 8 * V - _ACC_ROWS * H * itemsize))


def _default_chunk(K, V, H, itemsize):
    """Rows per chunk of whole rows: the chunk's buffers -- its logits ``(rows, V)``, the
    gathered input rows and the ``d_input`` rows ``(rows, H)`` each -- within :func:`_budget`,
    at least ``_MIN_ROWS`` rows."""
    return max(_MIN_ROWS, _budget(K, V, H, itemsize) // ((V + 2 * H) * itemsize))


def _chunks(K, V, H, itemsize, chunk_size):
    """``(rows, classes)`` per chunk.  Whole rows (``classes == V``) unless the default row
    chunk would be shorter than ``_config.LINEAR_MIN_ROWS`` rows (a huge vocabulary): then
    ``LINEAR_CLASS_ROWS`` rows by as many classes as :func:`_budget` holds.  A ``chunk_size``
    given by the caller keeps whole rows; ``_config.LINEAR_CLASS_CHUNK`` forces the classes."""
    forced = _config.LINEAR_CLASS_CHUNK
    if forced is not None:
        return max(1, min(K, chunk_size or _config.LINEAR_CLASS_ROWS)), max(1, min(V, int(forced)))
    if chunk_size is not None:
        return max(1, min(K, chunk_size)), V
    rows = _default_chunk(K, V, H, itemsize)
    if rows >= min(K, _config.LINEAR_MIN_ROWS):
        return max(1, min(K, rows)), V
    rows = max(1, min(K, _config.LINEAR_CLASS_ROWS))
    classes = (_budget(K, V, H, itemsize) - 2 * rows * H * itemsize) // (rows * itemsize)
    return rows, max(1, min(V, classes))


# rows of d_linear_weight per block of the accumulation on NumPy's BLAS (its temporary:
# _ACC_ROWS x H, counted in the default chunk's budget)
_ACC_ROWS = 1024


class _NumpyBlas:
    """The products on NumPy's BLAS: ``np.matmul(..., out=)``; the accumulation ``c += a @ b``
    in blocks of ``_ACC_ROWS`` rows of ``c`` through one reused temporary.

    Not SciPy's ``gemm`` with ``beta = 1`` (an accumulation without the temporary): SciPy
    bundles an OpenBLAS of its own, whose threads, spinning after each call, took the cores
    from NumPy's -- at 4096 x 512 x 32000 float32 in 246-row chunks (AMD EPYC Zen 5, 2
    threads) the three products took 4.0 s with SciPy's accumulation against 2.9 s with this
    one (2.8 s for the full-size products).  Nor NumPy's own OpenBLAS's ``cblas_sgemm`` with
    ``beta = 1`` through ``ctypes`` (no temporary, no extra pass): tried, it timed the same as
    these blocks at 4096 x 512 x 32000, 1024 x 256 x 32000 and 2048 x 1024 x 32000 float32
    (AMD EPYC Zen 4, 2 threads, in turns).  What chunking costs over the full-size products is
    a cost per chunk that grows with ``V x H`` -- the products alone (no cross-entropy) in
    254-row chunks took 1.16x the full-size products' time there, in 512-row chunks 1.08x --
    presumably the BLAS packing ``linear_weight`` afresh for each product: larger chunks
    amortize it, within the memory bound of :func:`_budget`."""

    def __init__(self):
        self.tmp = None

    @staticmethod
    def mm(a, b, out):
        """``out = a @ b``."""
        np.matmul(a, b, out=out)

    def mm_add(self, c, a, b):
        """``c += a @ b`` (``c`` is the weight gradient, ``V x H``) without a temporary the
        size of ``c``."""
        rows = min(_ACC_ROWS, c.shape[0])
        if self.tmp is None or self.tmp.shape != (rows, c.shape[1]) or self.tmp.dtype != c.dtype:
            self.tmp = np.empty((rows, c.shape[1]), c.dtype)
        for r0 in range(0, c.shape[0], rows):
            r1 = min(c.shape[0], r0 + rows)
            t = self.tmp[: r1 - r0]
            np.matmul(a[r0:r1], b, out=t)
            c[r0:r1] += t


class _TorchBlas:
    """The products on PyTorch's BLAS (for PyTorch CPU tensors: the caller's library), on
    zero-copy tensor views of the same buffers: ``torch.matmul(..., out=)`` and ``addmm_``."""

    def __init__(self):
        import torch

        self.t = torch.from_numpy

    def mm(self, a, b, out):
        import torch

        torch.matmul(self.t(a), self.t(b), out=self.t(out))

    def mm_add(self, c, a, b):
        self.t(c).addmm_(self.t(a), self.t(b))


class _HostOps:
    """The host half of the chunk loop: NumPy buffers, row gathers and scatters, the bias and
    its gradient's column sums, and the products on ``blas`` (:class:`_NumpyBlas` or
    :class:`_TorchBlas`).  The device half, with the same methods, is
    :class:`fastloss._backends._cuda_linear.DeviceLinearOps`."""

    zeros = staticmethod(np.zeros)
    empty = staticmethod(np.empty)
    transpose = staticmethod(np.transpose)

    def __init__(self, blas):
        self.mm, self.mm_add = blas.mm, blas.mm_add

    @staticmethod
    def kept_rows(t2, ignore_index):
        """The indices of the rows whose target is not ignored, and their count."""
        keep = np.flatnonzero(t2 != ignore_index)
        return keep, int(keep.shape[0])

    @staticmethod
    def rows(a, k0, k1, idx, buf):
        """Rows ``k0:k1`` of ``a`` (a view), or the rows ``idx[k0:k1]`` gathered into ``buf``."""
        if idx is None:
            return a[k0:k1]
        # (mode="clip": the indices are valid, and "raise" would buffer the output)
        return np.take(a, idx[k0:k1], axis=0, out=buf[: k1 - k0], mode="clip")

    @staticmethod
    def put_rows(dst, k0, k1, idx, src):
        """``dst[k0:k1] = src``, or ``dst[idx[k0:k1]] = src``."""
        dst[slice(k0, k1) if idx is None else idx[k0:k1]] = src

    @staticmethod
    def add_bias(z, b):
        z += b

    @staticmethod
    def matrix(buf, n, m):
        """The first ``n * m`` elements of the flat ``buf`` as a C-contiguous ``(n, m)`` view."""
        return buf[: n * m].reshape(n, m)

    @staticmethod
    def add_to(acc, v):
        """``acc += v`` (float64 ``acc``)."""
        acc += v

    @staticmethod
    def colsum_add(acc, z):
        """``acc += z.sum(axis=0)`` in float64 (the bias gradient)."""
        acc += np.sum(z, axis=0, dtype=np.float64)


def _blas(torch_input, *arrays):
    """The BLAS of a call: the caller's library's -- PyTorch's for PyTorch tensors, NumPy's for
    NumPy arrays (``_config.LINEAR_BLAS = "auto"`` or ``"numpy"``); ``"torch"`` puts NumPy
    arrays on PyTorch's too (importing it; zero-copy ``torch.from_numpy`` views, a negatively
    strided operand staying on NumPy's).  Measured at 4096 x 512 x 32000 float32 in 246-row
    chunks (AMD EPYC Zen 5, 2 threads): NumPy arrays 2.49 s on NumPy's BLAS, 2.89 s on
    PyTorch's (NumPy's full-size products 2.00 s, PyTorch's 2.25 s)."""
    if torch_input:
        return _TorchBlas()
    if _config.LINEAR_BLAS == "torch" and all(min(a.strides, default=0) >= 0 for a in arrays):
        try:
            return _TorchBlas()
        except ImportError:  # pragma: no cover - "torch" asked for but not installed
            pass
    return _NumpyBlas()


def linear_cross_entropy(
    input,
    linear_weight,
    target,
    *,
    linear_bias=None,
    weight=None,
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    num_items=None,
    reduction="mean",
    return_grad=False,
    grad_output=None,
    chunk_size=None,
    backend=None,
):
    r"""Cross-entropy of a linear layer's output, ``cross_entropy(input @ linear_weight.T +
    linear_bias, target, ...)``, without ever holding the N x V logits.

    The rows are processed in chunks of ``chunk_size``: per chunk, the logits
    :math:`Z = H_k W^T + b` are formed by one BLAS product into a reused ``(chunk, V)`` buffer,
    the fused cross-entropy kernel (:func:`cross_entropy`, every option) writes
    :math:`G = \partial\ell/\partial Z` in place over them, and two more products give
    :math:`\partial\ell/\partial H_k = G W` and accumulate :math:`\partial\ell/\partial W
    \mathrel{+}= G^T H_k` (``addmm_`` on PyTorch's BLAS, blocks of rows through a small
    temporary on NumPy's: no ``V x H`` temporary);
    :math:`\partial\ell/\partial b = \sum_k \sum_{rows} G`.  Rows whose target is
    ``ignore_index`` are dropped before the products (their ``d_input`` is 0).  Extra memory:
    one chunk of logits plus two ``(chunk, H)`` buffers -- the default chunk's logits are 1/16
    of the N x V logits (32 MB at 4096 x 32000 float32), at least 8 MB and at most 64 MB
    (``CHUNK_MIN_BYTES``, ``CHUNK_BYTES``): the products reach BLAS speed only on chunks of a
    few hundred rows.

    Huge vocabularies: where that memory holds fewer than ``_config.LINEAR_MIN_ROWS`` whole
    rows (1024 x 128256 float32: ~60), the classes are chunked too -- ``LINEAR_CLASS_ROWS`` rows
    by as many classes as the same memory holds -- in two passes over the class chunks: the
    first forms each chunk's logits :math:`Z_c = H_k W_c^T + b_c` for its rows' log-sum-exp
    (float64, combined over the chunks as :func:`fastloss.logsumexp` combines shards'), the
    second forms them again for the sharded cross-entropy (``lse=``, ``class_offset=``: each
    chunk's share of the loss, its slice of :math:`G` in place), then
    :math:`\partial\ell/\partial H_k \mathrel{+}= G_c W_c` and
    :math:`\partial\ell/\partial W_c \mathrel{+}= G_c^T H_k`.  Four products instead of three,
    on BLAS-sized operands, and ``d_linear_weight`` is written once per row chunk rather than
    once per few dozen rows.  A ``chunk_size`` given keeps whole rows.
    Stability and accuracy are those of :func:`cross_entropy` on the same logits (whose
    values depend on the chunking only through BLAS rounding).  The products run on the BLAS
    of the caller's library: NumPy's for NumPy arrays, PyTorch's for PyTorch CPU tensors
    (which :mod:`fastloss.torch` passes) -- their speeds differ by CPU.

    Parameters
    ----------
    input : array_like
        ``(..., H)`` hidden states, floating.
    linear_weight : array_like
        ``(V, H)``, the layout of ``torch.nn.Linear.weight``; the dtype of ``input``.
    target : array_like
        Integer class indices shaped like ``input`` without its last axis.  (Class
        probabilities would be an N x V input themselves: use :func:`cross_entropy`.)
    linear_bias : array_like, optional
        ``(V,)``.
    weight, ignore_index, label_smoothing, z_loss, softcap, num_items, reduction, grad_output, backend
        As in :func:`cross_entropy`.
    return_grad : bool, default False
        Also return the gradients ``(d_input, d_linear_weight)``, and ``d_linear_bias`` third
        when a bias is given, each shaped and typed like its argument.
    chunk_size : int, optional
        Rows per chunk, whole rows (default: logits of 1/16 of the N x V logits, within 8-64 MB,
        at least 16 rows; classes chunked too for huge vocabularies, see above).

    Returns
    -------
    loss : scalar or ndarray
        As :func:`cross_entropy`.
    grads : tuple
        Only with ``return_grad=True``: ``(d_input, d_linear_weight[, d_linear_bias])``.

    Notes
    -----
    float16 and bfloat16 arguments are multiplied in float32 (copies of ``input`` and
    ``linear_weight`` in float32) and the gradients rounded back once.  Arrays on a GPU run
    the whole loop there (the ``cuda`` backend): the products on the caller's cuBLAS --
    PyTorch's for CUDA tensors, CuPy's for CuPy arrays -- and, for Numba device arrays, on a
    tiled GEMM kernel of fastloss's own (correct, but several times slower than cuBLAS);
    results come back in the caller's library.  ``backend="cuda"`` with host arrays runs each
    chunk's cross-entropy on the GPU and the products on the host.

    Examples
    --------
    >>> import numpy as np, fastloss as fl
    >>> rng = np.random.default_rng(0)
    >>> h, W = rng.standard_normal((6, 4)), rng.standard_normal((10, 4))
    >>> t = np.array([1, 2, 3, -100, 5, 9])
    >>> loss, (dh, dW) = fl.linear_cross_entropy(h, W, t, return_grad=True, chunk_size=4)
    >>> bool(np.isclose(loss, fl.cross_entropy(h @ W.T, t)))
    True
    >>> dh.shape, dW.shape, bool(np.all(dh[3] == 0))
    ((6, 4), (10, 4), True)
    """
    xp = _arrays.for_call(backend, input, linear_weight, target, linear_bias, weight, grad_output)
    h, cdt = xp.float_array(input, "input")
    W, wdt = xp.float_array(linear_weight, "linear_weight")
    hshape, wshape = tuple(h.shape), tuple(W.shape)
    if len(hshape) < 1:
        raise ValueError("input: expected an array of at least 1 dimension (..., H), found a 0-d array")
    if len(wshape) != 2 or wshape[1] != hshape[-1] or wshape[0] == 0:
        raise ValueError(f"linear_weight: expected shape (V, {hshape[-1]}) with V >= 1 (the layout of "
                         f"torch.nn.Linear.weight for input of shape {hshape}), found {wshape}")
    if np.dtype(W.dtype) != np.dtype(h.dtype):
        raise TypeError(f"linear_weight: expected the dtype of input ({np.dtype(h.dtype)}), found {np.dtype(W.dtype)}")
    V, H = wshape
    b = None
    if linear_bias is not None:
        b, _ = xp.float_array(linear_bias, "linear_bias")
        if tuple(b.shape) != (V,) or np.dtype(b.dtype) != np.dtype(h.dtype):
            raise ValueError(f"linear_bias: expected shape ({V},) and dtype {np.dtype(h.dtype)}, found shape "
                             f"{tuple(b.shape)} and dtype {np.dtype(b.dtype)}")
    reduction, eps, zl, cap, nitems, ii = _options(reduction, label_smoothing, z_loss, softcap, num_items,
                                                   ignore_index)
    if chunk_size is not None:
        chunk_size = check_int(chunk_size, "chunk_size")
        if chunk_size < 1:
            raise ValueError(f"chunk_size: expected a positive number of rows, found {chunk_size}")
    return_grad = bool(return_grad)
    row_shape = hshape[:-1]
    N = int(np.prod(row_shape, dtype=np.int64))
    t = xp.asarray(target, "target")
    if np.dtype(t.dtype).kind not in "iu":
        raise TypeError(f"target: expected integer class indices, found dtype {np.dtype(t.dtype)} (class "
                        f"probabilities: use cross_entropy on the logits)")
    if tuple(t.shape) != row_shape:
        raise ValueError(f"target: expected shape {row_shape} (input without its last axis), found {tuple(t.shape)}")
    t2, bad, info = xp.class_indices(t, V, ii)
    if bad:
        raise _index_error(xp, t, V, ii)
    w = _class_weight(xp, weight, V, cdt)
    go = _grad_scale_value(xp, grad_output, reduction)
    gout_rows = None
    if go is None:
        gout_rows = xp.vec(_grad_output_array(xp, grad_output, row_shape, np.dtype(np.float64)), N, np.float64)
    xp.kernels(backend)  # an unknown or unavailable backend fails before any work

    if reduction == "mean":
        denom = nitems if nitems is not None else xp.kept_weight(t2, ii, w, info)
        scale = 1.0 / denom if denom != 0 else 0.0
    else:
        scale = 1.0
    # (N, H) rows in the compute dtype (copies of float16/bfloat16 arguments: BLAS multiplies
    # float32/float64), viewed without a copy where the strides allow
    h2 = xp.layout(h, (len(hshape) - 1,)).view_in(h, cdt)
    W2 = xp.cast(W, cdt)
    b2 = None if b is None else xp.cast(b, cdt)
    ops = _HostOps(_blas(_is_torch(input), h2, W2)) if xp is _arrays.HOST else xp.linear_ops()

    # the rows that are not ignored (None: all of them; the host knows it from the check)
    keep, K = (None, N) if (xp is _arrays.HOST and info) else ops.kept_rows(t2, ii)
    if K == N:
        keep = None
    chunk, vchunk = _chunks(K, V, H, np.dtype(cdt).itemsize, chunk_size)

    loss_rows = None if reduction != "none" else xp.empty(N, np.float64)
    if loss_rows is not None:
        xp.fill(loss_rows, 0.0)
    total = 0.0
    dh = dW = db = None
    if return_grad:
        dh = ops.zeros((N, H), cdt) if keep is not None else ops.empty((N, H), cdt)
        # (every class of d_linear_weight is set by the first row chunk: zeros only without one)
        dW = ops.zeros((V, H), cdt) if K == 0 else ops.empty((V, H), cdt)
        if b2 is not None:
            db = ops.zeros((V,), np.float64)
    # reused buffers: the chunk's logits (then its gradient; flat, so that a narrower last class
    # chunk is C-contiguous too), and where rows are gathered, their input rows, targets,
    # gradient scales and d_input rows
    logits = ops.empty((chunk * vchunk,), cdt)
    gathered = keep is not None
    hbuf = ops.empty((chunk, H), cdt) if gathered else None
    tbuf = ops.empty((chunk,), np.int64) if gathered else None
    gbuf = ops.empty((chunk,), np.float64) if gathered and gout_rows is not None else None
    dh_tmp = ops.empty((chunk, H), cdt) if return_grad and gathered else None
    share = ops.empty((chunk,), np.float64) if vchunk < V and loss_rows is not None else None
    opts = dict(weight=w, ignore_index=ii, label_smoothing=eps, z_loss=zl, softcap=cap if cap else None,
                reduction="none", return_grad=return_grad, backend=backend)
    # the kernels between the host's BLAS products on _config.LINEAR_CE_THREADS threads (see there)
    capped = xp is _arrays.HOST and _config.LINEAR_CE_THREADS
    with thread_cap(_config.LINEAR_CE_THREADS) if capped else contextlib.nullcontext():
        for k0 in range(0, K, chunk):
            k1 = min(K, k0 + chunk)
            n = k1 - k0
            hk = ops.rows(h2, k0, k1, keep, hbuf)
            tk = ops.rows(t2, k0, k1, keep, tbuf)
            gs = scale * go if go is not None else ops.rows(gout_rows, k0, k1, keep, gbuf)
            dhk = None if not return_grad else (dh[k0:k1] if not gathered else dh_tmp[:n])

            def logits_of(c0, c1):
                """The chunk's logits of classes ``c0:c1`` (into the reused buffer)."""
                z = ops.matrix(logits, n, c1 - c0)
                ops.mm(hk, ops.transpose(W2[c0:c1]), z)
                if b2 is not None:
                    ops.add_bias(z, b2[c0:c1])
                return z

            def backward(z, c0, c1):
                """The products of the gradient ``z`` of classes ``c0:c1``: ``d_input`` (set by the
                first class chunk, accumulated by the others) and ``d_linear_weight`` (set by the
                first row chunk, accumulated by the others), and the bias gradient."""
                if c0 == 0:
                    ops.mm(z, W2[c0:c1], dhk)
                else:
                    ops.mm_add(dhk, z, W2[c0:c1])
                if k0 == 0:
                    ops.mm(ops.transpose(z), hk, dW[c0:c1])
                else:
                    ops.mm_add(dW[c0:c1], ops.transpose(z), hk)
                if db is not None:
                    ops.colsum_add(db[c0:c1], z)

            if vchunk >= V:  # whole rows: one pass
                z = logits_of(0, V)
                r = cross_entropy(z, tk, grad_output=gs, grad_out=z if return_grad else None, **opts)
                rows = r[0] if return_grad else r
                if loss_rows is None:
                    total += xp.sum(rows)
                if return_grad:  # z now holds G = d loss / d logits of the chunk (scaled)
                    backward(z, 0, V)
            else:
                # class chunks, two passes: the rows' log-sum-exp from each chunk's own (float64,
                # combined as fastloss.logsumexp combines shards'), then each chunk's share of the
                # loss and its slice of the gradient -- the sharded cross-entropy, whose shares add
                # up to the unsharded loss and whose gradient slices are the unsharded gradient's
                bounds = [(c0, min(V, c0 + vchunk)) for c0 in range(0, V, vchunk)]
                parts = ops.empty((len(bounds), n), np.float64)
                for i, (c0, c1) in enumerate(bounds):
                    ops.put_rows(parts[i], 0, n, None, row_lse(logits_of(c0, c1), softcap=opts["softcap"],
                                                               backend=backend))
                lse = logsumexp(parts, axis=0, backend=backend)
                rows = share[:n] if share is not None else None
                if rows is not None:
                    xp.fill(rows, 0.0)
                for c0, c1 in bounds:
                    z = logits_of(c0, c1)
                    r = cross_entropy(z, tk, lse=lse, class_offset=c0, num_classes=V, grad_output=gs,
                                      grad_out=z if return_grad else None, **opts)
                    part = r[0] if return_grad else r
                    if rows is not None:
                        ops.add_to(rows, part)
                    else:
                        total += xp.sum(part)
                    if return_grad:
                        backward(z, c0, c1)
            if loss_rows is not None:
                ops.put_rows(loss_rows, k0, k1, keep, rows)
            if gathered and return_grad:
                ops.put_rows(dh, k0, k1, keep, dhk)

    if reduction == "none":
        loss = xp.result(loss_rows, row_shape, h.dtype)
    else:
        loss = _scalar(total * scale, cdt)
    if not return_grad:
        return loss
    # each gradient in its argument's dtype (rounded once), in the caller's library
    grads = (xp.result(dh, hshape, h.dtype), xp.result(dW, wshape, W.dtype))
    if db is not None:
        grads += (xp.result(db, (V,), h.dtype),)
    return loss, grads
