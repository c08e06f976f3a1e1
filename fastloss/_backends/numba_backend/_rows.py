"""Row-wise kernels of the numba backend: the row helpers (max, sums of exp, log-sum-exp),
the normalizers and their backward passes, and the cross-entropy row by row (hard and
probability targets).  Few-class hard targets go to :mod:`._cols` instead.
"""
from __future__ import annotations

import numpy as np

from ._jit import _JIT, _SUMBLK, _kernel, _readonly, _src, njit, prange
from ._math import cast_like, key_value, neg_log_p, order_key, sub_sub, vexp, vexpn, vsoftcap

# ----------------------------------------------------------------------------- row helpers
@njit(**_JIT)
def _mx(a, b):
    return b if b > a else a  # NaN in b is skipped (a NaN in the row shows up in the sum)


@njit(**_JIT)
def _rowmax(x, i, c):
    """Max of row ``i`` of ``x`` (NaN ignored; -inf for an empty or all-NaN row).

    An integer max over the floats' order keys (:func:`._math.order_key`): a float max
    reduction that skips NaN vectorizes only under ``nnan`` (not allowed: inf/NaN semantics),
    an integer one always -- 16 float32 lanes per instruction on AVX-512.  (Eight scalar
    ``vmaxss`` chains before: 8 G el/s per core on Zen 5, a fifth of the CE 8192x1000 time.)
    A NaN is skipped here but reaches the row's result through the sum of ``exp``.
    """
    xr = x[i]  # a row view: j from range(c) indexes it without wrap-around tests
    m = order_key(cast_like(-np.inf, x))
    for j in range(c):
        k = order_key(xr[j])
        m = k if k > m else m
    return key_value(m, x)


@njit(**_JIT)
def _finite(v):
    return v - v == 0  # false for +-inf and nan


@njit(**_JIT)
def _ublock(j0, c):
    """The indices of the block of ``_SUMBLK`` starting at ``j0`` (``< c``), unsigned (see
    :func:`_sumexp`).  Loop bodies use them only to index: uint64 mixed with int64 arithmetic
    is float64 in Numba."""
    return range(np.uint64(j0), np.uint64(min(c, j0 + _SUMBLK)))


@njit(**_JIT)
def _sumexp(x, i, c, shift, neg):
    """``sum_j exp(x[i, j] - shift)``, in float64 across blocks of ``_SUMBLK`` terms.

    ``neg``: ``shift`` is the row's finite maximum, so every argument is <= 0 (or NaN) and
    the cheaper :func:`vexpn` applies (30% faster); otherwise (shift 0 for a row whose max is
    inf or nan) the general :func:`vexp`.

    The block loops run over unsigned indices (``_ublock``): Numba wraps a negative index
    (``j < 0 -> j + c``) unless it can prove ``j >= 0``, which it cannot for a loop starting at
    ``j0``; with that per-element select LLVM vectorized the loop with gathers and scatters
    on AVX-512 targets (``vgatherqps``/``vscatterqps``, microcoded on AMD: the Numba
    cross-entropy ran at 3x the Cython one's time on Zen 5) and kept it scalar on AVX2.
    """
    s = 0.0
    for j0 in range(0, c, _SUMBLK):
        bs = cast_like(0.0, x)
        if neg:
            for j in _ublock(j0, c):
                bs += vexpn(x[i, j] - shift)
        else:
            for j in _ublock(j0, c):
                bs += vexp(x[i, j] - shift)
        s += bs
    return s


@njit(**_JIT)
def _sumexp_store(x, i, c, shift, neg, out):
    """Like :func:`_sumexp`, also storing ``out[i, j] = exp(x[i, j] - shift)``.

    ``x`` None: in place, the row is read from ``out`` itself (``_jit._src``).  Given as two
    arguments, the same memory would fail LLVM's run-time overlap test (this function is
    compiled on its own, not inlined: it cannot see that they are one array) and the loop
    would run scalar."""
    src = _src(x, out)
    s = 0.0
    for j0 in range(0, c, _SUMBLK):
        bs = cast_like(0.0, out)
        if neg:
            for j in _ublock(j0, c):
                e = vexpn(src[i, j] - shift)
                out[i, j] = e
                bs += e
        else:
            for j in _ublock(j0, c):
                e = vexp(src[i, j] - shift)
                out[i, j] = e
                bs += e
        s += bs
    return s


@njit(**_JIT)
def _row_lse(x, i, c):
    """(shift, log(sum exp(x - shift))) of row ``i``; ``lse = shift + log_s`` in float64."""
    m = _rowmax(x, i, c)
    fin = _finite(m)
    sh = m if fin else cast_like(0.0, x)
    s = _sumexp(x, i, c, sh, fin)
    return sh, np.log(s)


# ============================================================================= normalizers
@_kernel
def _k_logsumexp(x, out, nb):
    n, c = x.shape
    for b in prange(nb):
        for i in range(b * n // nb, (b + 1) * n // nb):
            sh, ls = _row_lse(x, i, c)
            out[i] = sh + ls


@_kernel
def _k_softmax(x, out, inplace, nb):
    """Row by row: the max, ``e = exp(x - m)`` stored into ``out`` while summed, then ``out *=
    1 / s``.  ``inplace``: ``out`` is ``x`` (``softmax(x, out=x)``) and the exp pass reads the
    row through ``out`` (see :func:`_k_cross_entropy`, ``inplace``)."""
    n, c = x.shape
    for b in prange(nb):
        for i in range(b * n // nb, (b + 1) * n // nb):
            m = _rowmax(x, i, c)
            if m == np.inf:
                # no softmax for a row holding +inf: NaN throughout, as PyTorch gives (e / s
                # would give 0 or NaN at the finite entries, depending on overflow)
                for j in range(c):
                    out[i, j] = np.nan
                continue
            fin = _finite(m)
            sh = m if fin else cast_like(0.0, x)
            if inplace:
                s = _sumexp_store(None, i, c, sh, fin, out)
            else:
                s = _sumexp_store(x, i, c, sh, fin, out)
            # e / s as e * (1/s): one rounding more than a division, far inside the contract
            r = cast_like(1.0 / s, x)
            for j in range(c):
                out[i, j] = out[i, j] * r


@_kernel
def _k_log_softmax(x, out, inplace, nb):
    """Row by row: the lse (two reads of the row), then ``out = (x - shift) - log s``.
    ``inplace``: ``out`` is ``x`` and the last pass reads the row through ``out`` (see
    :func:`_k_cross_entropy`, ``inplace``)."""
    n, c = x.shape
    for b in prange(nb):
        for i in range(b * n // nb, (b + 1) * n // nb):
            sh, ls = _row_lse(x, i, c)
            # (x - shift) - log s rather than x - lse: with huge logits (3e38) lse rounds to the
            # max and the O(1) part would be lost.  A row of only -inf: -inf - -inf = nan, as
            # PyTorch gives.  A row holding +inf (log s = inf): NaN throughout, as PyTorch.
            lsd = cast_like(ls, x)
            if ls == np.inf:
                lsd = cast_like(np.nan, x)
            if inplace:
                for j in range(c):
                    out[i, j] = sub_sub(out[i, j], sh, lsd)
            else:
                for j in range(c):
                    out[i, j] = sub_sub(x[i, j], sh, lsd)


@_kernel
def _k_softmax_backward(g, y, out, logsm, nb):
    """Softmax backward ``y * (g - sum_j g_j y_j)``; with ``logsm`` the log-softmax backward
    ``g - exp(y) * sum_j g_j`` (``y`` the log-softmax).  One kernel for both: ``logsm`` is the
    same for every row, so the branches stay outside the vectorized loops."""
    n, c = y.shape
    for b in prange(nb):
        for i in range(b * n // nb, (b + 1) * n // nb):
            d = 0.0
            if logsm:
                for j in range(c):
                    d += g[i, j]
            else:
                for j in range(c):
                    d += g[i, j] * y[i, j]
            dd = cast_like(d, y)
            if logsm:
                for j in range(c):
                    out[i, j] = g[i, j] - vexp(y[i, j]) * dd
            else:
                for j in range(c):
                    out[i, j] = y[i, j] * (g[i, j] - dd)


# ============================================================================= cross-entropy
@njit(**_JIT)
def _softcap(v, cap, inv):
    """``(cap * tanh(v / cap), 1 - tanh(v / cap)**2)`` (``inv = 1 / cap``): :func:`._math.vsoftcap`,
    the same algorithm as the Cython kernels' (a few ulp for every ``v``, no cancellation for
    ``|v| << cap``).  ``v = +-inf`` gives ``+-cap`` and an exact 0 derivative; NaN stays NaN."""
    return vsoftcap(v, cap, inv)


@njit(**_JIT)
def _cap_row(xr, c, cap, inv, out, d):
    """``out[0, j], d[j] = _softcap(xr[j])`` for one row ``xr``: the capped row that the row
    functions then work on (in L1/L2), and the cap's derivative for the chain rule."""
    o = out[0]
    for j in range(c):
        v, dv = _softcap(xr[j], cap, inv)
        o[j] = v
        d[j] = dv


@njit(**_JIT)
def _chain_cap(src, d, gr, c):
    """``gr[j] = src[0, j] * d[j]``: a gradient with respect to the capped logits, through the
    cap.  ``d`` None: the derivative is in ``gr`` itself (see :func:`_k_cross_entropy`), read
    through the same variable (``_jit._src``): as two arguments, one memory would fail LLVM's
    run-time overlap test and the loop would run scalar."""
    dd = _src(d, gr)
    s0 = src[0]
    for j in range(c):
        gr[j] = s0[j] * dd[j]


# bytes between the cap scratch rows (see _cap_scratch)
_CAP_GAP = 2048


@njit(**_JIT)
def _cap_scratch(x, c, cap):
    """One task's scratch for a capped row (empty without a cap): the capped row ``(1, C)``,
    its gradient ``(1, C)`` and the cap's derivative ``(C,)``.  The gradient has a buffer of
    its own, not the capped row's: LLVM guards each vectorized loop that reads one array and
    writes another with a run-time overlap test, and takes the scalar loop when they are
    the same memory (7x slower here).

    The three are rows of one allocation, more than ``_CAP_GAP`` bytes apart, never separate
    allocations: the overlap test is a distance test (``0 <= dst - src < vector step`` takes
    the scalar loop), and two short rows allocated apart could land within a vector step of
    each other or not, depending on the heap -- the scalar and vector loops round a sum
    differently, so the same call gave gradients differing in the last bit from one call to
    the next (tests/test_cross_entropy.py::test_return_lse, soft targets, C = 6)."""
    k = c if cap != 0.0 else 0
    g = 1 + _CAP_GAP // (max(k, 1) * x.itemsize)  # rows between two used ones
    buf = np.empty((2 * g + 1, k), x.dtype)
    return buf[0:1], buf[g:g + 1], buf[2 * g]


@njit(**_JIT)
def _lse_row(x, i, c, cap, inv, cb, cd):
    """The log-sum-exp of row ``i`` (capped with ``cap != 0``): an ignored row's ``lse``."""
    if cap != 0.0:
        _cap_row(x[i], c, cap, inv, cb, cd)
        sh, ls = _row_lse(_readonly(cb), np.int64(0), c)
    else:
        sh, ls = _row_lse(x, i, c)
    return np.float64(sh) + ls


# forceinline: inlined into the kernel's row loop (a call per row otherwise): CE float32
# 65536 x 64 1.04-1.12x -> 0.87x the Cython kernel's time, 8192 x 1000 and 2048 x 32000 within
# noise (2 threads, Zen 4); the kernel's first compile 7.6 -> 9.0 s
@njit(forceinline=True, **_JIT)
def _ce_row(x, i, c, t, w, sumw, eps, z, grad, gs):
    """``(loss, lse)`` (and the gradient) of one non-ignored row of the hard-target
    cross-entropy.

    ``x`` None: in place, the logits are read from ``grad`` (``_jit._src``), which then holds
    them.  Given as two arguments, the same memory would fail LLVM's run-time overlap tests
    (this function is compiled on its own and called, not inlined) and every loop that reads
    the row and writes the gradient would run scalar: 7x the time."""
    xs = _src(x, grad)  # the logits (grad itself in place): every read below goes through it
    # (the read-only helpers get xs typed read-only: in place, grad would compile them again)
    m = _rowmax(_readonly(xs), i, c)
    fin = _finite(m)
    sh = m if fin else cast_like(0.0, xs)
    xt = xs[i, t]  # read before grad (which may be the logits) is written
    wt = 1.0 if w is None else np.float64(w[t])
    # pass 2: s = sum exp(x - sh) (stored as e into grad when that buffer will be rescaled),
    # and for label smoothing sw = sum_c w_c (x_c - sh); all reads of x happen here.
    store = grad is not None and fin
    sw = 0.0
    if eps != 0.0:
        # its own loop (float64 sums; mixed with the float32 exp sums LLVM keeps a loop
        # scalar), before the exp pass, which may overwrite x
        # x - sh through sub_sub (no reassoc): LLVM would otherwise distribute the sum into
        # sum(x) - c sh, the garbage difference of two huge sums for logits near the max
        zero = cast_like(0.0, xs)
        if w is None:
            for j in range(c):
                sw += np.float64(sub_sub(xs[i, j], sh, zero))
        else:
            for j in range(c):
                v = np.float64(sub_sub(xs[i, j], sh, zero))
                # 0 where x_c is the max: an infinite weight there must give inf (through
                # sumw * log s), not inf * 0 = nan.  The product is formed whatever v is: a
                # w[j] read only where v != 0 becomes a masked load (AVX2 vmaskmovps, slow on AMD)
                wv = np.float64(w[j]) * v
                sw += wv if v != 0.0 else 0.0
    if store:
        s = _sumexp_store(x, i, c, sh, fin, grad)
    else:
        s = _sumexp(_readonly(xs), i, c, sh, fin)
    ls = np.log(s)
    lse = np.float64(sh) + ls
    # -log p[t] = log s - (x[t] - shift), not lse - x[t]: huge logits (3e38) keep their O(1)
    # part.  +inf when x[t] = -inf (log s is finite then).
    row = (1.0 - eps) * wt * neg_log_p(ls, xt, sh)
    if eps != 0.0:
        # sum_c w_c (lse - x_c) = sumw * log s - sum_c w_c (x_c - sh)
        row += eps / c * (sumw * ls - sw)
    if z != 0.0:
        row += z * lse * lse
    if grad is not None:
        # d row / d x_j = a p_j - eps/C w_j - (1-eps) w_t [j = t],  a = (1-eps) w_t + eps/C sumw + 2 z lse
        # (the smoothing term only with eps != 0: 0 * sumw is nan for a nan weight of an
        # unused class)
        a = (1.0 - eps) * wt + 2.0 * z * lse
        if eps != 0.0:
            a += eps / c * sumw
        ce = cast_like(gs * eps / c, xs)
        if fin:
            cg = cast_like(gs * a / s, xs)  # grad holds e = exp(x - m); p = e / s
            if eps == 0.0:
                for j in range(c):
                    grad[i, j] = grad[i, j] * cg
            elif w is None:
                for j in range(c):
                    grad[i, j] = grad[i, j] * cg - ce
            else:
                for j in range(c):
                    grad[i, j] = grad[i, j] * cg - ce * w[j]
        else:
            # +inf (or nan) in the row: p = exp(x - lse) as the reference computes it (0 for
            # finite x, nan at the inf); x is still intact here, it was not overwritten
            cg = cast_like(gs * a, xs)
            lsed = cast_like(lse, xs)
            for j in range(c):
                p = vexp(xs[i, j] - lsed)
                wj = cast_like(1.0, xs) if w is None else w[j]
                grad[i, j] = p * cg - ce * wj
        grad[i, t] -= cast_like(gs * (1.0 - eps) * wt, xs)
    return row, lse


@_kernel
def _k_cross_entropy(x, target, w, sumw, ignore, eps, z, cap, loss, lse, grad, gsc, gsa, inplace, nb):
    """Row by row.  ``lse`` is ``(N,)`` or ``(0,)`` (not wanted: one type for both).  With a
    cap, each row is capped into a task-local ``(1, C)`` scratch row first (``_cap_row``), the
    row function runs on it (its gradient into a second scratch row) and ``_chain_cap`` writes
    the gradient through the cap: the logits are still read once, the scratch stays in cache.
    Not in place, the cap's derivative is written straight into the row of ``grad`` (to be
    multiplied there by ``_chain_cap``), not into a third scratch row: the gradient row's
    first touch (a write-allocate from memory) then overlaps the cap's arithmetic, as in
    Cython's ``fl_cap_max``, instead of making ``_chain_cap`` a pass of its own bound by
    memory.  In place the row being read is the one that would be written: the derivative
    stays in scratch there.

    ``inplace``: ``grad`` is ``x`` (the same memory, the same strides: ``grad_out=logits``,
    and every chunk of ``linear_cross_entropy``), and the row function is handed None for the
    logits, which it then reads from ``grad`` (``_jit._src``).  Handed both, its exp pass would
    read one array and write another, which LLVM guards with a run-time overlap test that the
    same memory fails: the scalar loop took 7x the time on 2048 x 32000 float32 (the row
    function is compiled on its own and called: it cannot see that they are one array).  A
    run-time flag, not a type: no specialization more (the kernel holds both calls).
    ``_rows`` helpers that read the row and write the gradient all take this None form."""
    n, c = x.shape
    capx = cast_like(cap, x)
    inv = cast_like(1.0 / cap if cap != 0.0 else 0.0, x)
    want_lse = lse.shape[0] != 0
    for b in prange(nb):
        cb, cg, cd = _cap_scratch(x, c, cap)
        cbr, row0 = _readonly(cb), np.int64(0)  # the capped row, read as the logits are (one helper type)
        for i in range(b * n // nb, (b + 1) * n // nb):
            t = target[i]
            if t == ignore:
                loss[i] = 0.0
                if want_lse:  # the true lse of an ignored row too (the spec); before the
                    # gradient's zeros, which may overwrite the row (in place)
                    lse[i] = _lse_row(x, i, c, capx, inv, cb, cd)
                if grad is not None:
                    zero = cast_like(0.0, x)
                    for j in range(c):
                        grad[i, j] = zero
                continue
            gs = gsc if gsa is None else gsc * gsa[i]
            if cap == 0.0:
                # (the tests on grad, an argument, are settled when the kernel is typed: with
                # grad None only the first call is compiled)
                if grad is None:
                    row, rl = _ce_row(x, i, c, t, w, sumw, eps, z, None, gs)
                elif inplace:  # x None: the row function reads the logits from grad
                    row, rl = _ce_row(None, i, c, t, w, sumw, eps, z, grad, gs)
                else:
                    row, rl = _ce_row(x, i, c, t, w, sumw, eps, z, grad, gs)
            else:  # the cap's scratch rows: never the same memory as x or grad
                if grad is None:
                    _cap_row(x[i], c, capx, inv, cb, cd)
                    row, rl = _ce_row(cbr, row0, c, t, w, sumw, eps, z, None, gs)
                elif inplace:
                    _cap_row(x[i], c, capx, inv, cb, cd)
                    row, rl = _ce_row(cbr, row0, c, t, w, sumw, eps, z, cg, gs)
                    _chain_cap(cg, cd, grad[i], c)
                else:  # the derivative kept in the gradient row (see the docstring)
                    _cap_row(x[i], c, capx, inv, cb, grad[i])
                    row, rl = _ce_row(cbr, row0, c, t, w, sumw, eps, z, cg, gs)
                    _chain_cap(cg, None, grad[i], c)
            loss[i] = row
            if want_lse:
                lse[i] = rl


@njit(**_JIT)
def _ce_soft_row(x, i, y, iy, c, w, eps, z, grad, gs):
    """``(loss, lse)`` (and the gradient) of row ``i`` of ``x`` and ``grad`` (row ``iy`` of the
    targets ``y``) of the probability-target cross-entropy; ``x`` None: in place, the logits
    read from ``grad`` (see :func:`_ce_row`)."""
    xs = _src(x, grad)  # the logits (grad itself in place): every read below goes through it
    # (the read-only helpers get xs typed read-only: in place, grad would compile them again)
    m = _rowmax(_readonly(xs), i, c)
    fin = _finite(m)
    sh = m if fin else cast_like(0.0, xs)
    store = grad is not None and fin
    u = eps / c
    keep = 1.0 - eps
    sy = 0.0  # sum_c y'_c w_c
    syx = 0.0  # sum_c y'_c w_c (x_c - sh), terms with y'_c w_c = 0 left out (no 0 * inf)
    # Two loops, not one: the target sums are float64 and the exp sums float32 blocks; mixed in
    # one loop LLVM keeps it scalar.  The target pass comes first because the exp pass may
    # overwrite x (grad is x when in place); the row is in L2 for the second read.
    for j in range(c):
        v = np.float64(xs[i, j] - sh)
        yw = keep * np.float64(y[iy, j]) + u
        if w is not None:
            yw *= np.float64(w[j])
        sy += yw
        # also 0 at the row max (v = 0): an infinite y'w there gives inf through sy * log s
        syx += yw * v if yw != 0.0 and v != 0.0 else 0.0
    s = _sumexp_store(x, i, c, sh, fin, grad) if store else _sumexp(_readonly(xs), i, c, sh, fin)
    ls = np.log(s)
    lse = np.float64(sh) + ls
    # sum_c y'w (lse - x_c) = sy * log s - sum_c y'w (x_c - sh)
    row = sy * ls - syx
    if z != 0.0:
        row += z * lse * lse
    if grad is not None:
        a = sy + 2.0 * z * lse
        uu = cast_like(u, xs)
        kk = cast_like(keep, xs)
        gsd = cast_like(gs, xs)
        if fin:
            cg = cast_like(gs * a / s, xs)
            for j in range(c):
                yw = kk * y[iy, j] + uu
                if w is not None:
                    yw *= w[j]
                grad[i, j] = grad[i, j] * cg - gsd * yw
        else:
            cg = cast_like(gs * a, xs)
            lsed = cast_like(lse, xs)
            for j in range(c):
                yw = kk * y[iy, j] + uu
                if w is not None:
                    yw *= w[j]
                grad[i, j] = vexp(xs[i, j] - lsed) * cg - gsd * yw
    return row, lse


@_kernel
def _k_cross_entropy_soft(x, y, w, eps, z, cap, loss, lse, grad, gsc, gsa, inplace, nb):
    """Row by row; ``lse``, the cap and ``inplace`` as in :func:`_k_cross_entropy`."""
    n, c = x.shape
    capx = cast_like(cap, x)
    inv = cast_like(1.0 / cap if cap != 0.0 else 0.0, x)
    want_lse = lse.shape[0] != 0
    for b in prange(nb):
        cb, cg, cd = _cap_scratch(x, c, cap)
        cbr, row0 = _readonly(cb), np.int64(0)  # the capped row, read as the logits are (one helper type)
        for i in range(b * n // nb, (b + 1) * n // nb):
            gs = gsc if gsa is None else gsc * gsa[i]
            if cap == 0.0:
                if grad is None:
                    row, rl = _ce_soft_row(x, i, y, i, c, w, eps, z, None, gs)
                elif inplace:  # x None: the row function reads the logits from grad
                    row, rl = _ce_soft_row(None, i, y, i, c, w, eps, z, grad, gs)
                else:
                    row, rl = _ce_soft_row(x, i, y, i, c, w, eps, z, grad, gs)
            elif grad is None:
                _cap_row(x[i], c, capx, inv, cb, cd)
                row, rl = _ce_soft_row(cbr, row0, y, i, c, w, eps, z, None, gs)
            elif inplace:
                _cap_row(x[i], c, capx, inv, cb, cd)
                row, rl = _ce_soft_row(cbr, row0, y, i, c, w, eps, z, cg, gs)
                _chain_cap(cg, cd, grad[i], c)
            else:  # the derivative kept in the gradient row (see _k_cross_entropy)
                _cap_row(x[i], c, capx, inv, cb, grad[i])
                row, rl = _ce_soft_row(cbr, row0, y, i, c, w, eps, z, cg, gs)
                _chain_cap(cg, None, grad[i], c)
            loss[i] = row
            if want_lse:
                lse[i] = rl




# ============================================================================= sharded classes
@njit(**_JIT)
def _split_lse(lse, like):
    """``(hi, lo)`` in the dtype of ``like`` with ``hi + lo = lse`` to twice that dtype's
    precision (``hi`` the rounded ``lse``, ``lo`` the rounding error; ``lo = 0`` where ``lse``
    or ``hi`` is not finite, so that ``inf - inf`` never enters it).

    Why: ``p = exp(x - lse)`` is taken in the dtype of ``x``.  A float32 ``lse`` of 100 is off
    by up to 4e-6, which would be a relative error of 4e-6 in every ``p`` of the row;
    ``(x - hi) - lo`` (:func:`._math.sub_sub`, kept in this order under ``reassoc``) is as
    accurate as the unsharded kernel's ``x - max``."""
    hi = cast_like(lse, like)
    lo = lse - np.float64(hi)
    return hi, cast_like(lo if _finite(lo) else 0.0, like)


@njit(**_JIT)
def _ce_shard_row(xr, c, tl, mine, wt, ws, sumw, eps, u, z, first, lse, gr, d, gs):
    """The loss share of one non-ignored row of a class shard and, with ``gr``, its gradient
    slice written into ``gr``, times the cap's derivative ``d`` when ``d`` is not None.

    ``xr`` is the row of logits (the capped row with a cap), or None when the gradient is
    written in place: the row is then read from ``gr`` itself (see ``_jit._src``).  ``tl`` is
    the target's index in the shard (read only when ``mine``), ``wt`` the target's weight,
    ``ws`` the shard's class weights (None: all 1), ``sumw`` the sum of all ``K`` weights,
    ``u = eps / K``, ``first`` whether the shard starts at class 0, ``lse`` the given global
    row lse (float64)::

        share  = [first] ((1-eps) w_t + u sumw) lse + [first] z lse**2
                 - [mine] (1-eps) w_t x[tl] - u sum_c ws_c x_c
        grad_c = gs (p_c A - u ws_c - [c = tl] (1-eps) w_t) d_c,   p_c = exp(x_c - lse),
        A      = (1-eps) w_t + u sumw + 2 z lse

    (the ``u`` terms only with ``eps != 0``: ``0 * sumw`` is NaN for a NaN weight of a class
    no target uses).  Every read the loss needs happens before the first write of ``gr``, and
    the gradient pass reads element ``j`` before it writes it: in place is safe.
    """
    src = _src(xr, gr)
    xt = np.float64(src[tl]) if mine else 0.0  # read before gr (which may be this row) is written
    row = -(1.0 - eps) * wt * xt if mine else 0.0
    if eps != 0.0:
        # float64 sum in a loop of its own: mixed with the exp pass LLVM keeps a loop scalar;
        # and it must precede that pass, which may overwrite the row
        sw = 0.0
        if ws is None:
            for j in range(c):
                sw += np.float64(src[j])
        else:
            for j in range(c):
                sw += np.float64(ws[j]) * np.float64(src[j])
        row -= u * sw
    if first:  # the lse terms and the z-loss: counted once, by the shard holding class 0
        coef = (1.0 - eps) * wt
        if eps != 0.0:
            coef += u * sumw
        row += coef * lse
        if z != 0.0:
            row += z * lse * lse
    if gr is not None:
        a = (1.0 - eps) * wt + 2.0 * z * lse
        if eps != 0.0:
            a += u * sumw
        cg = cast_like(gs * a, gr)
        ce = cast_like(gs * u, gr)
        tc = cast_like(gs * (1.0 - eps) * wt, gr)
        hi, lo = _split_lse(lse, gr)
        # the one pass: p = exp(x - lse) straight from the given lse (no max, no sum).  vexp,
        # not vexpn: x - lse <= 0 only for a consistent lse (a float32-rounded one can be a
        # hair below the max), and vexpn is wrong for large positive arguments
        if d is None:
            if eps == 0.0:
                for j in range(c):
                    gr[j] = vexp(sub_sub(src[j], hi, lo)) * cg
            elif ws is None:
                for j in range(c):
                    gr[j] = vexp(sub_sub(src[j], hi, lo)) * cg - ce
            else:
                for j in range(c):
                    gr[j] = vexp(sub_sub(src[j], hi, lo)) * cg - ce * ws[j]
            if mine:
                gr[tl] -= tc
        else:  # through the cap, in the same pass (d = 1 - tanh**2 from _cap_row)
            if eps == 0.0:
                for j in range(c):
                    gr[j] = vexp(sub_sub(src[j], hi, lo)) * cg * d[j]
            elif ws is None:
                for j in range(c):
                    gr[j] = (vexp(sub_sub(src[j], hi, lo)) * cg - ce) * d[j]
            else:
                for j in range(c):
                    gr[j] = (vexp(sub_sub(src[j], hi, lo)) * cg - ce * ws[j]) * d[j]
            if mine:
                gr[tl] -= tc * d[tl]
    return row


@_kernel
def _k_cross_entropy_shard(x, target, w, ws, sumw, ignore, eps, z, cap, lse, off, nk, loss, grad, gsc, gsa,
                           inplace, nb):
    """One shard ``[off, off + C)`` of ``nk`` classes, row by row, one pass over each row (see
    :func:`_ce_shard_row`).  ``w`` is the whole ``(nk,)`` weight vector (for the targets'
    weights) and ``ws`` its shard slice, both or neither None.  With a cap, each row is capped
    into task-local scratch first (``_cap_row``, as in :func:`_k_cross_entropy`): the logits
    are read from memory once and the gradient written once, through the cap's derivative.

    ``inplace``: ``grad`` is ``x`` (the same memory, the same strides), and the row is read
    through the gradient row (``_jit._src``): read through ``x``, the gradient pass would
    read one array and write another, which LLVM guards with a run-time overlap test that
    same memory fails -- its scalar loop took 10x the time on 2048 x 32000 float32."""
    n, c = x.shape
    capx = cast_like(cap, x)
    inv = cast_like(1.0 / cap if cap != 0.0 else 0.0, x)
    first = off == 0
    u = eps / nk
    for b in prange(nb):
        cb, _cg, cd = _cap_scratch(x, c, cap)
        cbr = _readonly(cb)  # the capped row, read as the logits are (one helper type)
        for i in range(b * n // nb, (b + 1) * n // nb):
            t = target[i]
            if t == ignore:  # exact zeros, whatever the row holds
                loss[i] = 0.0
                if grad is not None:
                    zero = cast_like(0.0, x)
                    for j in range(c):
                        grad[i, j] = zero
                continue
            tl = t - off
            mine = tl >= 0 and tl < c
            wt = 1.0 if w is None else np.float64(w[t])
            gs = gsc if gsa is None else gsc * gsa[i]
            if cap != 0.0:
                _cap_row(x[i], c, capx, inv, cb, cd)
            # (the tests on grad, an argument, are settled when the kernel is typed; a local
            # None is not pruned, so the row views are taken inside them)
            if grad is None:
                if cap != 0.0:
                    loss[i] = _ce_shard_row(cbr[0], c, tl, mine, wt, ws, sumw, eps, u, z, first, lse[i], None, cd, gs)
                else:
                    loss[i] = _ce_shard_row(x[i], c, tl, mine, wt, ws, sumw, eps, u, z, first, lse[i], None, None,
                                            gs)
            elif cap != 0.0:
                loss[i] = _ce_shard_row(cbr[0], c, tl, mine, wt, ws, sumw, eps, u, z, first, lse[i], grad[i], cd, gs)
            elif inplace:
                loss[i] = _ce_shard_row(None, c, tl, mine, wt, ws, sumw, eps, u, z, first, lse[i], grad[i], None, gs)
            else:
                loss[i] = _ce_shard_row(x[i], c, tl, mine, wt, ws, sumw, eps, u, z, first, lse[i], grad[i], None,
                                        gs)
