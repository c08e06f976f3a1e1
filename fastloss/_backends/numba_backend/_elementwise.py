"""Elementwise kernels of the numba backend: each loss written once as an element function,
one generated block loop around each (``_make_ew_block``), and one generated parallel driver
per loss (``_make_driver``), all with one signature.
"""
from __future__ import annotations

import math

import numpy as np

from ._jit import _EBLK, _JIT, _NOJIT, _kernel, _seg, njit, numba, prange
from ._math import bce_mix, cast_like, vexp, vexpn, vlog, vlog1p, vlog1p_unit_recip

if numba is not None and not _NOJIT:
    from numba.core import types as _types
    from numba.extending import overload as _overload

# Each block function handles rows [r0, r1) x columns [j0, j1) and returns its float64 loss
# sum; the parallel driver maps tasks to blocks (see _tasks) and stores each task's sum.


@njit(**_JIT)
def _block_total(bs, scr, nb):
    """The float64 total of one block of ``nb`` elementwise losses (stored in ``scr``) whose
    compute-dtype sum is ``bs``.

    float64 losses: ``bs`` itself.  float32 ones: the block's losses summed again, in float64
    (a second pass over the block, in L1; LLVM drops the float32 ``bs`` then), as the Cython
    kernels' ``fl_dsum``: a float32 block sum carries ~(terms per lane) x 2**-24 relative
    error -- 3.1e-6 on 300 equal BCE terms (p = 0.5390625, y = 1), past the 2e-6 of the
    contract -- and overflows where two terms of 2e38 do.  (A float64 accumulator in the
    loss loop itself keeps that loop scalar, see ``_EBLK``.)"""
    if scr.itemsize >= 8:
        return float(bs)
    t = 0.0
    for k in range(nb):
        t += float(scr[k])  # float(): in plain Python a Python float + np.float32 stays float32
    return t


# Each elementwise loss is written once, as an element function
# ``elem(a, b, p, q, c1, c2) -> (loss, dloss/da, dloss/dq)`` of one element's values
# (``p``/``q`` are None where the operand is absent, which prunes their code; ``c1``/``c2`` are
# per-call constants), and ``_make_ew_block`` wraps it in the one block loop that all of them
# share: row segments, blocks of ``_EBLK`` with a float64 total, the gradient scale, the
# optional loss output.  Numba inlines ``elem`` into the loop, so terms a call does not need
# (the gradient without ``grad``) are dropped by LLVM, and the loop vectorizes as if written
# out (checked in tests/test_numba_math.py).
# Element functions are inlined at Numba's IR level (a big one, exp and log1p inside, stays a
# call when left to LLVM, and a loop with a call does not vectorize: BCE with logits measured
# 8x slower), where ``if w is None`` on an inlined argument is no longer pruned by type; an
# absent operand is therefore handled by the overloads below, which are chosen by type.
def _at(seg, j):
    """``seg[j]``, or ``None`` for an absent operand (plain-Python twin of the overload)."""
    return None if seg is None else seg[j]


def _mul_opt(v, w):
    """``v * w``, or ``v`` when the factor ``w`` is absent (None)."""
    return v if w is None else v * w


def _if_absent(o, a, b):
    """``a`` when operand ``o`` is absent (None), else ``b``."""
    return a if o is None else b


if numba is not None and not _NOJIT:
    @_overload(_at, inline="always")
    def _ov_at(seg, j):
        if isinstance(seg, _types.NoneType):
            return lambda seg, j: None
        return lambda seg, j: seg[j]

    @_overload(_mul_opt, inline="always")
    def _ov_mul_opt(v, w):
        if isinstance(w, _types.NoneType):
            return lambda v, w: v
        return lambda v, w: v * w

    @_overload(_if_absent, inline="always")
    def _ov_if_absent(o, a, b):
        if isinstance(o, _types.NoneType):
            return lambda o, a, b: a
        return lambda o, a, b: b


# Element functions with exp/log inside are inlined at the IR level (see _at); the small ones
# (KL, MSE) are left to LLVM, which inlines them anyway: IR inlining costs compile time
# (measured: a serial elementwise kernel compiles in ~2.5 s instead of ~1.7 s with it).
_EJIT = dict(_JIT, inline="always") if _JIT else {}


def _make_ew_block(elem):
    """``blk(a, b, p, q, c1, c2, loss, grad, grad2, gs, gout, r0, r1, j0, j1)``: ``elem`` over
    rows ``r0:r1``, columns ``j0:j1`` of the (R, K) operands; returns the float64 loss total.

    ``grad[j] = g * gs * gout[j]`` and ``grad2[j] = g2 * gs * gout[j]`` (each optional;
    ``gout`` None means ones).  ``loss`` is always an array -- an (R, 0) one when the losses
    are not wanted: the losses of a block go to a scratch block in L1 and are copied out when
    wanted.  One type for both cases halves the specializations to compile (``fastloss
    warmup``) at the cost of an L1 copy.  Block totals are float64 (``_block_total``)."""

    def row(a_, b_, p_, q_, c1, c2, loss_, grad_, grad2_, gout_, gsd, scr, n):
        # one row segment.  A function of its own rather than the body of blk's row loop:
        # measured, KL with log-targets ran 1.25x slower with this loop nested in blk (LLVM
        # unrolled the vector loop half as much there); the other losses do not care
        tot = 0.0
        for jb in range(0, n, _EBLK):
            je = min(n, jb + _EBLK)
            bs = cast_like(0.0, a_)
            # unsigned indices: with signed ones from range(jb, je) Numba's negative-index
            # wrap-around (j < 0 -> j + n) stays in the loop, which LLVM then vectorized with
            # gathers and scatters on AVX-512 (microcoded on AMD: BCE-with-logits 3x slower on Zen 5)
            ub = np.uint64(jb)
            for j in range(ub, np.uint64(je)):
                l, g, g2 = elem(a_[j], b_[j], _at(p_, j), _at(q_, j), c1, c2)
                if grad_ is not None or grad2_ is not None:
                    sc = gsd
                    if gout_ is not None:
                        sc = sc * gout_[j]
                    if grad_ is not None:
                        grad_[j] = g * sc
                    if grad2_ is not None:
                        grad2_[j] = g2 * sc
                scr[j - ub] = l
                bs += l
            if loss_.shape[0] != 0:  # the losses are wanted ("none" reduction)
                for j in range(ub, np.uint64(je)):
                    loss_[j] = scr[j - ub]
            tot += _block_total(bs, scr, je - jb)
        return tot

    row.__name__ = row.__qualname__ = f"_row_of{elem.__name__}"
    row = njit(**_JIT)(row)

    def blk(a, b, p, q, c1, c2, loss, grad, grad2, gs, gout, r0, r1, j0, j1):
        tot = 0.0
        scr = np.empty(_EBLK, a.dtype)  # the block's losses
        gsd = cast_like(gs, a)
        for i in range(r0, r1):
            tot += row(_seg(a, i, j0, j1), _seg(b, i, j0, j1), _seg(p, i, j0, j1), _seg(q, i, j0, j1), c1, c2,
                       _seg(loss, i, j0, j1), _seg(grad, i, j0, j1), _seg(grad2, i, j0, j1),
                       _seg(gout, i, j0, j1), gsd, scr, j1 - j0)
        return tot

    blk.__name__ = blk.__qualname__ = f"_block_of{elem.__name__}"
    return njit(**_JIT)(blk)


@njit(**_EJIT)
def _bcel_elem(z, y, w, pw, c1, c2):
    """Binary cross-entropy with logits: ``(1 - y) z + c softplus(-z)``, ``c = 1 + (pw - 1) y``."""
    one = cast_like(1.0, z)
    zero = cast_like(0.0, z)
    # e = exp(-|z|) in (0, 1]: softplus(-z) = max(-z, 0) + log1p(e)
    na = -z if z > zero else z
    e = vexpn(na)
    mz = -z if -z > zero else zero
    lp, r = vlog1p_unit_recip(e)  # e in [0, 1]; r = 1 / (1 + e), reused by the gradient
    sp = mz + lp
    er = e * r
    pos = z >= zero
    # c = 1 + (pw - 1) y; without pos_weight the gradient is sigmoid(z) - y, with it
    # (1 - y) - c sigmoid(-z) (sigmoid(-z) = 1 - sigmoid(z) formed without cancellation)
    cpw = _if_absent(pw, one, one + (_if_absent(pw, one, pw) - one) * y)
    l = (one - y) * z + cpw * sp
    g = _if_absent(pw, (r if pos else er) - y, (one - y) - cpw * (er if pos else r))
    return _mul_opt(l, w), _mul_opt(g, w), zero


_BCE_EPS = float(np.float32(1e-12))  # a global: a compile-time constant


@njit(**_EJIT)
def _bce_elem(p, y, w, q, c1, c2):
    """Binary cross-entropy on probabilities, PyTorch's clamps: each log term at -100 (the
    "not less than" form keeps NaN), the gradient's ``p (1 - p)`` at ``float32(1e-12)`` (ATen's
    constant is a float, also for float64 input)."""
    one = cast_like(1.0, p)
    lo = cast_like(-100.0, p)
    tiny = cast_like(_BCE_EPS, p)
    a = vlog(p)
    a = a if not (a < lo) else lo
    b = vlog1p(-p)
    b = b if not (b < lo) else lo
    l = bce_mix(y, a, b)
    den = p * (one - p)
    den = den if not (den < tiny) else tiny
    g = (p - y) / den
    return _mul_opt(l, w), _mul_opt(g, w), cast_like(0.0, p)


@njit(**_JIT)
def _kl_elem(x, t, p, q, c1, c2):
    """KL term ``t (log t - x)``, 0 where ``t == 0``.  The log stays outside the select: LLVM
    does not speculate a call-sized expression out of a branch, and a branch keeps the loop
    scalar."""
    zero = cast_like(0.0, x)
    lt = vlog(t)
    return (zero if t == zero else t * (lt - x)), -t, zero


@njit(**_JIT)
def _kl_log_elem(x, t, p, q, c1, c2):
    """KL term with a log-target: ``exp(t) (t - x)``, taken as 0 where ``t = -inf`` (PyTorch:
    nan)."""
    zero = cast_like(0.0, x)
    ninf = cast_like(-np.inf, x)
    et = vexp(t)  # 0 at t = -inf: the gradient -et needs no case, the loss 0 * inf does
    return (zero if t == ninf else et * (t - x)), -et, zero


@njit(**_JIT)
def _mse_elem(x, t, p, q, c1, c2):
    d = x - t
    return d * d, d * cast_like(2.0, x), cast_like(0.0, x)


_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)  # a global: a compile-time constant


@njit(**_EJIT)
def _gnll_elem(x, t, var, q, full, eps):
    """Gaussian NLL ``(log v + d^2 / v) / 2`` (+ ``log(2 pi) / 2`` when ``full``) with
    ``v = max(var, eps)`` (NaN kept); gradients at the clamped ``v``, as PyTorch's no-grad
    clamp gives: ``d / v`` and ``(1/v - d^2/v^2) / 2``."""
    half = cast_like(0.5, x)
    one = cast_like(1.0, x)
    epsd = cast_like(eps, x)
    v = var if not (var < epsd) else epsd
    d = x - t
    iv = one / v
    l = half * (vlog(v) + d * d * iv)
    if full:
        l = l + cast_like(_HALF_LOG_2PI, x)
    return l, d * iv, half * (iv - d * d * iv * iv)


_bcel_block = _make_ew_block(_bcel_elem)
_bce_block = _make_ew_block(_bce_elem)
_kl_block = _make_ew_block(_kl_elem)
_kl_log_block = _make_ew_block(_kl_log_elem)
_mse_block = _make_ew_block(_mse_elem)
_gnll_block = _make_ew_block(_gnll_elem)


@njit(**_JIT)
def _task_range(task, r, k, ck, rpt):
    """(r0, r1, j0, j1) of elementwise task ``task`` (see _tasks)."""
    if rpt == 1 and ck < k:
        nck = (k + ck - 1) // ck
        i = task // nck
        j0 = (task % nck) * ck
        return i, i + 1, j0, min(k, j0 + ck)
    if rpt == 1:
        return task, task + 1, 0, k
    r0 = task * rpt
    return r0, min(r, r0 + rpt), 0, k


# The parallel driver of each loss, generated from one template.  Generated as source (with
# the block function a global, looked up by name when Numba compiles), not as a closure:
# Numba keys a cached closure on a pickle of its cell contents, and a dispatcher pickles with
# a per-process UUID -- every process would miss the disk cache and compile the drivers again.
# Deterministic totals: each task writes its float64 total to ``part[task]`` (no ``prange``
# reduction, whose association follows the threads' shares), the tasks depend on the shape
# alone (``_tasks``), and the caller adds ``part`` in a fixed order -- the reduced loss is the
# same bits for every thread count and every call.
_DRIVER = """
def {name}(a, b, p, q, c1, c2, loss, grad, grad2, gs, gout, part, ck, rpt):
    r, k = a.shape
    for task in prange(part.shape[0]):
        # int64(task): prange's index is unsigned in the parallel twin and signed in the serial
        # one; as it came, the two twins would compile the block function twice (r0 int64 in
        # one, float64 -- int64 mixed with uint64 -- in the other)
        r0, r1, j0, j1 = _task_range(np.int64(task), r, k, ck, rpt)
        part[task] = {block}(a, b, p, q, c1, c2, loss, grad, grad2, gs, gout, r0, r1, j0, j1)
"""


def _make_driver(name, block):
    """The parallel kernel ``name`` of one elementwise loss (with its serial twin, see
    ``_kernel``): the tasks of ``_tasks`` mapped onto the block function named ``block``, each
    task's float64 total stored in ``part``.  Every loss has the same driver signature,
    ``(a, b, p, q, c1, c2, loss, grad, grad2, gs, gout, part, ck, rpt)``.

    The source is compiled under this file's name (Numba's disk cache needs a real source
    file: it stamps the cache with the file's modification time and size), and each driver is
    cached under its own name."""
    ns = {}
    exec(compile(_DRIVER.format(name=name, block=block), __file__, "exec"), globals(), ns)
    f = ns[name]
    f.__module__ = __name__
    return _kernel(f)


_k_bce_with_logits = _make_driver("_k_bce_with_logits", "_bcel_block")
_k_bce = _make_driver("_k_bce", "_bce_block")
# the KL formula is chosen per call, outside the loops: a branch on a run-time flag inside
# the loop keeps LLVM from vectorizing it (measured 2x slower)
_k_kl_div = _make_driver("_k_kl_div", "_kl_block")
_k_kl_div_log = _make_driver("_k_kl_div_log", "_kl_log_block")
_k_mse = _make_driver("_k_mse", "_mse_block")
_k_gaussian_nll = _make_driver("_k_gaussian_nll", "_gnll_block")
