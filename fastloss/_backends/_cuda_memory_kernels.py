"""The CUDA kernels that move, check and sum data (see :mod:`._cuda_kernels` for the losses):
the value checks of the public layer (class indices, ranges), per-block float64 partial sums,
the strided 4-D copy (with its bfloat16 bit conversions), fill, and the sum of a full-size
gradient back onto a broadcast operand.  Built per compute dtype by the ``_make_*``
factories, on first use (:func:`._cuda_kernels.get`).
"""
from __future__ import annotations

from numba import cuda, float64, int64

from ._cuda_kernels import MAX_THREADS, _block_sum_all


def _make_check_targets(ftype):
    """First position of a class index outside ``[0, C)`` (not ``ignore_index``) -> ``bad[0]``
    (atomic min), and per-block partial sums of ``w[t]`` over the kept rows (the ``"mean"``
    denominator) -> ``part``.  ``unsigned``: ``target`` holds the int64 bits of uint64 indices,
    so a negative one is a value above ``2**63 - 1``: out of range even if it equals
    ``ignore_index``."""

    @cuda.jit
    def k(target, c, ignore_index, w, has_w, unsigned, bad, part):
        sh = cuda.shared.array(MAX_THREADS, float64)
        acc = 0.0
        for i in range(cuda.grid(1), target.shape[0], cuda.gridsize(1)):
            t = target[i]
            if unsigned and t < 0:
                cuda.atomic.min(bad, 0, i)
            elif t != ignore_index:
                if t < 0 or t >= c:
                    cuda.atomic.min(bad, 0, i)
                elif has_w:
                    acc += float64(w[t])
                else:
                    acc += 1.0
        acc = _block_sum_all(sh, acc)
        if cuda.threadIdx.x == 0:
            part[cuda.blockIdx.x] = acc

    return k


def _make_check_range(ftype):
    """First flat position of a value outside ``[lo, hi]`` of an ``(R, K)`` array -> ``bad[0]``
    (NaN passes).  2-D launch (see :func:`_elementwise`): no per-element division."""

    @cuda.jit
    def k(x, lo, hi, bad):
        kk = x.shape[1]
        j0 = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        for i in range(cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, x.shape[0], cuda.gridDim.y * cuda.blockDim.y):
            for j in range(j0, kk, cuda.gridDim.x * cuda.blockDim.x):
                v = x[i, j]
                if v < lo or v > hi:
                    cuda.atomic.min(bad, 0, i * kk + j)

    return k


def _make_partial_sum(ftype):
    """Per-block float64 partial sums of a 1-D array."""

    @cuda.jit
    def k(v, part):
        sh = cuda.shared.array(MAX_THREADS, float64)
        acc = 0.0
        for i in range(cuda.grid(1), v.shape[0], cuda.gridsize(1)):
            acc += float64(v[i])
        acc = _block_sum_all(sh, acc)
        if cuda.threadIdx.x == 0:
            part[cuda.blockIdx.x] = acc

    return k


def _copy4_kernel(elem):
    """A kernel ``k(src, dst)`` doing ``dst[...] = elem(src[...])`` over 4-D views of any strides.

    2-D launch: the y threads walk the ``d0 * d1 * d2`` outer index (one division per row,
    not per element), the x threads the innermost dim, which is the contiguous one when
    there is one (coalesced)."""

    @cuda.jit
    def k(src, dst):
        d1 = dst.shape[1]
        d2 = dst.shape[2]
        d3 = dst.shape[3]
        rows = dst.shape[0] * d1 * d2
        j0 = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        for r in range(cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, rows, cuda.gridDim.y * cuda.blockDim.y):
            i2 = r % d2
            q = r // d2
            i1 = q % d1
            i0 = q // d1
            for i3 in range(j0, d3, cuda.gridDim.x * cuda.blockDim.x):
                dst[i0, i1, i2, i3] = elem(src[i0, i1, i2, i3])

    return k


@cuda.jit(device=True)
def _same(v):
    return v


@cuda.jit(device=True)
def _bf16_bits_to_f32_bits(h):
    """bfloat16 bits (uint16) -> the float32 with those as its high half (exact)."""
    return int64(h) << 16


@cuda.jit(device=True)
def _f32_bits_to_bf16_bits(w):
    """float32 bits (uint32) -> bfloat16 bits rounded to nearest even, as ``ml_dtypes`` and
    PyTorch round: add 0x7fff plus the lowest kept bit, drop the low half (a finite value past
    the largest bfloat16 rounds to inf, like every IEEE narrowing); a NaN keeps its sign and
    high payload bits and is made quiet, so rounding cannot carry it into an infinity."""
    b = int64(w)
    if (b & 0x7FFFFFFF) > 0x7F800000:
        return (b >> 16) | 0x40
    return (b + 0x7FFF + ((b >> 16) & 1)) >> 16


def _make_copy4(ftype):
    """``dst[...] = src`` for 4-D views of any strides and dtypes (Numba casts on the store)."""
    return _copy4_kernel(_same)


def _make_bf16_widen4(ftype):
    """bfloat16 -> float32 on the bits: ``src`` a uint16 view of the bfloat16 data, ``dst`` a
    uint32 view of a float32 array (Numba kernels cannot hold a bfloat16 value)."""
    return _copy4_kernel(_bf16_bits_to_f32_bits)


def _make_bf16_round4(ftype):
    """float32 -> bfloat16 on the bits: ``src`` a uint32 view of float32 data, ``dst`` a uint16
    view of the bfloat16 output."""
    return _copy4_kernel(_f32_bits_to_bf16_bits)


def _make_fill(ftype):
    """``v[i] = value`` for a 1-D array."""

    @cuda.jit
    def k(v, value):
        for i in range(cuda.grid(1), v.shape[0], cuda.gridsize(1)):
            v[i] = value

    return k


def _make_sum_to(ftype):
    """``dst_flat[off(e)] += src[e]`` (float64 atomics): sums a C-contiguous full-size array
    back onto a broadcast operand.  ``shape``/``dstride`` (int64, one per dim) give the
    full shape and the element strides of the destination (0 along broadcast dims)."""

    @cuda.jit
    def k(src, shape, dstride, dst):
        nd = shape.shape[0]
        for e in range(cuda.grid(1), src.shape[0], cuda.gridsize(1)):
            r = e
            off = 0
            for d in range(nd - 1, -1, -1):
                off += (r % shape[d]) * dstride[d]
                r //= shape[d]
            cuda.atomic.add(dst, off, float64(src[e]))

    return k


FACTORIES = {
    "check_targets": _make_check_targets,
    "check_range": _make_check_range,
    "partial_sum": _make_partial_sum,
    "copy4": _make_copy4,
    "bf16_widen4": _make_bf16_widen4,
    "bf16_round4": _make_bf16_round4,
    "fill": _make_fill,
    "sum_to": _make_sum_to,
}
