"""Fused linear + cross-entropy on device arrays: what the chunk loop of
:func:`fastloss.linear_cross_entropy` needs from device memory.

The loop itself is the public layer's (:mod:`fastloss._api.linear`), written once for host and
device; it asks an *ops* object for buffers, row gathers and scatters, the bias, the bias
gradient's column sums and the three matrix products.  :class:`DeviceLinearOps` is the device
one.  The products run on the caller's cuBLAS: PyTorch's (``torch.matmul(..., out=)``,
``addmm_``) for PyTorch CUDA tensors, CuPy's for CuPy arrays, on zero-copy views of the same
buffers and on the caller's current stream (the stream every other kernel of the call runs on).
Numba device arrays (and the CUDA simulator, where the tests run) get a tiled shared-memory
GEMM kernel of this module instead: correct for any strides, but several times slower than
cuBLAS -- pass CuPy arrays or PyTorch tensors for speed.
"""
from __future__ import annotations

import numpy as np
from numba import cuda, float32, float64

from ._cuda_arrays import _block_shape, _copy, _empty, _fill, _grid2, _simulated, _view

# GEMM tile edge: 16 x 16 threads per block on a GPU; 4 x 4 under the simulator (every thread
# is a Python thread there)
_TILE_GPU, _TILE_SIM = 16, 4
_gemm_cache = {}


def _make_gemm(ftype, tile):
    """``c (+)= a @ b`` for 2-D device arrays of any strides: a ``tile x tile`` block of
    threads per output tile, the operands staged through shared memory a ``tile``-wide slice
    of the inner dimension at a time, accumulated in the compute dtype (as cuBLAS does)."""

    @cuda.jit
    def k(a, b, c, add):
        sa = cuda.shared.array((tile, tile), ftype)
        sb = cuda.shared.array((tile, tile), ftype)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        m, kk = a.shape
        n = b.shape[1]
        # grid-stride over output tiles; the bounds are the same for every thread of a block,
        # so every thread reaches every syncthreads
        for bi in range(cuda.blockIdx.y, (m + tile - 1) // tile, cuda.gridDim.y):
            for bj in range(cuda.blockIdx.x, (n + tile - 1) // tile, cuda.gridDim.x):
                row, col = bi * tile + ty, bj * tile + tx
                acc = ftype(0.0)
                for k0 in range(0, kk, tile):
                    sa[ty, tx] = a[row, k0 + tx] if row < m and k0 + tx < kk else ftype(0.0)
                    sb[ty, tx] = b[k0 + ty, col] if k0 + ty < kk and col < n else ftype(0.0)
                    cuda.syncthreads()
                    for q in range(tile):
                        acc += sa[ty, q] * sb[q, tx]
                    cuda.syncthreads()
                if row < m and col < n:
                    c[row, col] = c[row, col] + acc if add else acc

    return k


def _gemm(dtype):
    tile = _TILE_SIM if _simulated() else _TILE_GPU
    key = (str(np.dtype(dtype)), tile)
    k = _gemm_cache.get(key)
    if k is None:
        k = _gemm_cache[key] = _make_gemm(float32 if np.dtype(dtype) == np.float32 else float64, tile)
    return k, tile


@cuda.jit
def _take_rows(src, idx, dst):
    """``dst[i, :] = src[idx[i], :]`` (2-D grid: x threads over the columns, y over rows)."""
    j0 = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    for i in range(cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, dst.shape[0], cuda.gridDim.y * cuda.blockDim.y):
        r = idx[i]
        for j in range(j0, dst.shape[1], cuda.gridDim.x * cuda.blockDim.x):
            dst[i, j] = src[r, j]


@cuda.jit
def _put_rows(dst, idx, src):
    """``dst[idx[i], :] = src[i, :]`` (the indices are distinct: no two threads write one row)."""
    j0 = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    for i in range(cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, src.shape[0], cuda.gridDim.y * cuda.blockDim.y):
        r = idx[i]
        for j in range(j0, src.shape[1], cuda.gridDim.x * cuda.blockDim.x):
            dst[r, j] = src[i, j]


@cuda.jit
def _add_row(z, b):
    """``z[i, :] += b`` (the bias on every row of the chunk's logits)."""
    j0 = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    for i in range(cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, z.shape[0], cuda.gridDim.y * cuda.blockDim.y):
        for j in range(j0, z.shape[1], cuda.gridDim.x * cuda.blockDim.x):
            z[i, j] += b[j]


@cuda.jit
def _colsum_add(acc, z):
    """``acc[j] += sum_i z[i, j]`` in float64: one thread per column walks the rows in order
    (neighbouring threads read neighbouring addresses), so the sum is deterministic."""
    for j in range(cuda.grid(1), z.shape[1], cuda.gridsize(1)):
        s = 0.0
        for i in range(z.shape[0]):
            s += float64(z[i, j])
        acc[j] += s


def _as2(a):
    """A 1-D device array as an ``(n, 1)`` view (the row kernels take 2-D arrays)."""
    return a if len(a.shape) == 2 else _view(a, (a.shape[0], 1), (a.strides[0], a.strides[0]))


def transpose(a):
    """The transpose of a 2-D device array, as a view."""
    return _view(a, tuple(a.shape)[::-1], tuple(a.strides)[::-1])


class _KernelProducts:
    """The products as this module's GEMM kernel (Numba device arrays; the simulator)."""

    def __init__(self, stream):
        self.stream = stream

    def _launch(self, a, b, c, add):
        m, n = c.shape
        if m == 0 or n == 0:
            return
        k, tile = _gemm(c.dtype)  # (an empty inner dimension gives zeros: no k0 step runs)
        cap = _block_shape(65535)[1]  # the simulator's block bound from _config, as every launch
        grid = (min(-(-n // tile), cap), min(-(-m // tile), cap))
        k[grid, (tile, tile), self.stream](a, b, c, add)

    def mm(self, a, b, out):
        self._launch(a, b, out, False)

    def mm_add(self, c, a, b):
        self._launch(a, b, c, True)


class _TorchProducts:
    """The products on PyTorch's cuBLAS, on tensor views of the same device buffers (PyTorch's
    current stream is the call's stream)."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device

    def _t(self, d):
        return self.torch.as_tensor(d, device=self.device)

    def mm(self, a, b, out):
        self.torch.matmul(self._t(a), self._t(b), out=self._t(out))

    def mm_add(self, c, a, b):
        self._t(c).addmm_(self._t(a), self._t(b))


class _CupyProducts:
    """The products on CuPy's cuBLAS (CuPy's current stream is the call's stream); the
    accumulation through a bounded temporary of 256 rows of ``c``."""

    def __init__(self):
        import cupy

        self.cp = cupy

    def mm(self, a, b, out):
        cp = self.cp
        cp.matmul(cp.asarray(a), cp.asarray(b), out=cp.asarray(out))

    def mm_add(self, c, a, b):
        cp = self.cp
        ca, cb, cc = cp.asarray(a), cp.asarray(b), cp.asarray(c)
        for r0 in range(0, cc.shape[0], 256):
            cc[r0:r0 + 256] += cp.matmul(ca[r0:r0 + 256], cb)


class DeviceLinearOps:
    """The device half of :func:`fastloss.linear_cross_entropy`'s chunk loop, on the stream
    of the call's array adaptor ``xp`` (:class:`._cuda_adaptor.DeviceArrays`); the same
    methods as the host's ``_HostOps`` (:mod:`fastloss._api.linear`)."""

    def __init__(self, xp):
        self.xp, self.stream = xp, xp.stream
        if xp.lib == "torch":
            self.products = _TorchProducts(xp.torch_device)
        elif xp.lib == "cupy":
            self.products = _CupyProducts()
        else:
            self.products = _KernelProducts(self.stream)
        self.mm, self.mm_add = self.products.mm, self.products.mm_add

    transpose = staticmethod(transpose)

    def zeros(self, shape, dtype):
        a = _empty(shape, dtype, self.stream)
        if a.size:
            _fill(_view(a, (a.size,), (np.dtype(dtype).itemsize,)), 0.0, self.stream)
        return a

    def empty(self, shape, dtype):
        return _empty(shape, dtype, self.stream)

    def kept_rows(self, t2, ignore_index):
        """The rows whose target is not ignored, as device int64 indices, and their count
        (the targets are brought to the host once: N int64, against the chunks' products)."""
        keep = np.flatnonzero(self.xp.to_host(t2) != ignore_index).astype(np.int64)
        return (cuda.to_device(keep, stream=self.stream) if keep.size else _empty((0,), np.int64, self.stream)), \
            int(keep.size)

    def rows(self, a, k0, k1, idx, buf):
        """Rows ``k0:k1`` of ``a`` (a view), or the rows ``idx[k0:k1]`` gathered into ``buf``."""
        if idx is None:
            return a[k0:k1]
        n = k1 - k0
        dst = buf[:n]
        if n:
            ix = idx[k0:k1]
            grid, block = _grid2(n, 1 if len(a.shape) == 1 else a.shape[1])
            _take_rows[grid, block, self.stream](_as2(a), ix, _as2(dst))
        return dst

    def put_rows(self, dst, k0, k1, idx, src):
        """``dst[k0:k1] = src``, or ``dst[idx[k0:k1]] = src``."""
        n = k1 - k0
        if not n:
            return
        if idx is None:
            _copy(src, dst[k0:k1], self.stream)
            return
        grid, block = _grid2(n, 1 if len(src.shape) == 1 else src.shape[1])
        _put_rows[grid, block, self.stream](_as2(dst), idx[k0:k1], _as2(src))

    def add_bias(self, z, b):
        if z.size:
            grid, block = _grid2(*z.shape)
            _add_row[grid, block, self.stream](z, b)

    @staticmethod
    def matrix(buf, n, m):
        """The first ``n * m`` elements of the flat device ``buf`` as a C-contiguous ``(n, m)``
        view."""
        item = np.dtype(buf.dtype).itemsize
        return _view(buf, (n, m), (m * item, item))

    def add_to(self, acc, v):
        """``acc += v`` (float64 ``acc``; ``v`` 1-D), as the column sums of ``v`` seen as one row."""
        if v.shape[0]:
            item = np.dtype(v.dtype).itemsize
            self.colsum_add(acc, _view(v, (1, v.shape[0]), (v.shape[0] * item, item)))

    def colsum_add(self, acc, z):
        if z.size:
            grid, block = _grid2(1, z.shape[1])
            _colsum_add[grid[0], block[0], self.stream](acc, z)
