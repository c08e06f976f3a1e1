"""The few-classes (C <= ``fastloss._config.NUMBA_SMALL_C``) hard-target cross-entropy of the
numba backend: blocks of rows turned on their side so that every step vectorizes across rows.
"""
from __future__ import annotations

import numpy as np

from ... import _config as cfg
from ._jit import _JIT, _kernel, _seg1, njit, prange
from ._math import cast_like, neg_log_p, sub_sub, vexp, vexpn, vlog
from ._rows import _finite, _mx, _softcap

# rows per block (fastloss/_config.py: NUMBA_COL_ROWS): its (C, _SB) buffers stay in L1/L2;
# a global, so compiled into the kernel
_SB = cfg.NUMBA_COL_ROWS


@njit(**_JIT)
def _ce_cols_block(x, target, w, sumw, ignore, eps, z, cap, loss, lse_out, grad, gsc, gsa, r0, r1,
                   xt, et, dc, sh, sh2, cg, xtt, s, ls, dd, tc, wt, lse):
    """Rows ``[r0, r1)`` of a hard-target cross-entropy with few classes, vectorized across rows.

    With C <= 32 a per-row loop is too short to vectorize, and its row max and row sum are
    dependency chains (a ``select`` or an ``add`` per class, each waiting on the previous one):
    per-row latency, not arithmetic, would set the speed.  So the block is turned on its side,
    ``xt[j, r] = x[r0 + r, j]`` (one scalar transpose, in L1), and every step after that is a
    loop over the *rows* of the block for one class at a time -- independent lanes, which LLVM
    vectorizes: the running max, ``et[j, r] = exp(xt[j, r] - shift[r])``, the float64 row sums
    and their logs, the label-smoothing sums, the per-row loss and gradient coefficients.  Only
    the gather of the target logit and the transpose of the gradient back into ``grad`` rows
    (scaled on the way) are scalar.  Every read of this block of ``x`` happens before the first
    write of its gradient rows, so ``grad`` may be ``x`` (in place).

    With a cap (``cap != 0``) the transposed block is capped in place (``xt = cap tanh(xt /
    cap)``, vectorized across rows like the rest) and ``dc`` keeps the cap's derivative for the
    gradient's write-back.  ``lse_out`` is ``(N,)``, or ``(0,)`` when not wanted; every row of
    the block has its lse computed anyway (ignored ones included), so writing it is free.

    Scratch: ``xt``, ``et`` (and ``dc``, with a cap) are ``(C, _SB)``; the rest ``(_SB,)``: in the dtype of ``x``
    the shift, a second buffer for the max, the gradient coefficient, the target logit; in
    float64 the row sum, its log, the smoothing sum, the target correction, the target weight
    and lse.  Separate arrays, not rows of one: LLVM then needs no run-time alias checks.
    """
    c = x.shape[1]
    nr = r1 - r0
    zero = cast_like(0.0, x)
    # this block's rows of the per-row arrays, indexed from 0: an index r0 + r (r0 an argument)
    # is not provably >= 0, and Numba's wrap-around test on it would keep the loops scalar
    tg = target[r0:r1]
    lb = loss[r0:r1]
    gb = _seg1(gsa, r0, r1)
    for r in range(nr):
        xr = x[r0 + r]  # a row view: j from range(c) indexes it without wrap-around tests
        for j in range(c):
            xt[j, r] = xr[j]
    if cap != 0.0:
        capx = cast_like(cap, x)
        inv = cast_like(1.0 / cap, x)
        for j in range(c):
            for r in range(nr):
                v, dv = _softcap(xt[j, r], capx, inv)
                xt[j, r] = v
                dc[j, r] = dv
    # Row max, NaN skipped as in _rowmax (a NaN reaches the result through the sum of exp).
    # Two buffers in turn, not ``sh[r] = max(sh[r], ...)``: LLVM turns that read-modify-write
    # into a masked store (only where the max changes), and AVX2 masked stores are microcoded
    # on AMD cores -- five times slower than this loop.
    for r in range(nr):
        sh[r] = xt[0, r]
    src = sh
    dst = sh2
    for j in range(1, c):
        for r in range(nr):
            dst[r] = _mx(src[r], xt[j, r])
        src, dst = dst, src
    # the shift is 0 for a row whose max is not finite, so inf - inf never happens
    for r in range(nr):
        m = src[r]
        sh[r] = m if _finite(m) else zero
        s[r] = 0.0
    # exp, then the float64 row sums in a loop of their own: a float32 exp and a float64
    # accumulation in one loop do not vectorize (LLVM keeps it scalar)
    for j in range(c):
        for r in range(nr):
            # x - shift <= 0 where the max is finite; the other rows (shift 0) get a row sum
            # that is still right (inf, nan or 0) and are recomputed below
            et[j, r] = vexpn(xt[j, r] - sh[r])
    for j in range(c):
        for r in range(nr):
            s[r] += et[j, r]
    if eps != 0.0:  # sum_j w_j (x_j - shift)
        for r in range(nr):
            dd[r] = 0.0
        for j in range(c):
            wj = 1.0 if w is None else np.float64(w[j])
            for r in range(nr):
                # x - shift as an instruction of its own (sub_sub, compiled without reassoc):
                # under reassoc LLVM distributes the sum into sum(w x) - shift sum(w), which
                # for equal huge logits (1e300) is the garbage difference of two huge sums
                v = np.float64(sub_sub(xt[j, r], sh[r], zero))
                dd[r] += wj * v if v != 0.0 else 0.0  # no inf * 0 at the max (see _ce_row)
    # gathers (scalar): the target logit and weight; an ignored row reads class 0, harmlessly
    for r in range(nr):
        t = tg[r]
        t = 0 if t == ignore else t
        xtt[r] = xt[t, r]
        wt[r] = 1.0 if w is None else np.float64(w[t])
    u = eps / c
    us = u * sumw if eps != 0.0 else 0.0  # no 0 * nan from a nan weight of an unused class
    chk = 0.0
    # per-row loss and gradient coefficients: one loop across rows, vectorized
    for r in range(nr):
        lsr = vlog(s[r])
        ls[r] = lsr
        lser = np.float64(sh[r]) + lsr
        lse[r] = lser
        # -log p[t] = log s - (x[t] - shift): huge logits keep their O(1) part (see _ce_row)
        row = (1.0 - eps) * wt[r] * neg_log_p(lsr, xtt[r], sh[r])
        # dd[r] read whatever eps is (unused scratch when 0): read only under the condition,
        # LLVM loads it with a masked load, which AVX2 spells vmaskmovpd (slow on AMD)
        ddr = dd[r]
        if eps != 0.0:
            row += u * (sumw * lsr - ddr)
        if z != 0.0:
            row += z * lser * lser
        lb[r] = row if tg[r] != ignore else 0.0
        if grad is not None:
            # d row / d x_j = a p_j - eps/C w_j - (1-eps) w_t [j = t]
            gs = gsc if gsa is None else gsc * gb[r]
            a = (1.0 - eps) * wt[r] + us + 2.0 * z * lser
            cg[r] = cast_like(gs * a / s[r], x)  # p = e / s
            dd[r] = gs * u
            tc[r] = gs * (1.0 - eps) * wt[r]
            chk += s[r] - s[r]  # 0, or nan once a row sum is inf/nan
    if lse_out.shape[0] != 0:
        lo = lse_out[r0:r1]
        for r in range(nr):
            lo[r] = lse[r]
    if grad is None:
        return
    if chk != 0.0:  # i.e. nan: some row holds +inf or nan
        for r in range(nr):
            if not _finite(s[r]) and tg[r] != ignore:
                # p = exp(x - lse) as the reference computes it (0 for finite x, nan at the
                # inf), not e / s = inf / inf
                gs = gsc if gsa is None else gsc * gb[r]
                lsed = cast_like(lse[r], x)
                for j in range(c):
                    et[j, r] = vexp(xt[j, r] - lsed)
                cg[r] = cast_like(gs * ((1.0 - eps) * wt[r] + us + 2.0 * z * lse[r]), x)
    for r in range(nr):
        t = tg[r]
        gr = grad[r0 + r]
        if t == ignore:  # exact zeros, whatever the row holds
            for j in range(c):
                gr[j] = zero
            continue
        cgr = cg[r]
        ddr = cast_like(dd[r], x)
        if eps == 0.0 and cap == 0.0:
            for j in range(c):
                gr[j] = et[j, r] * cgr
        elif cap == 0.0:
            for j in range(c):
                wj = cast_like(1.0, x) if w is None else w[j]
                gr[j] = et[j, r] * cgr - ddr * wj
        elif eps == 0.0:  # through the cap
            for j in range(c):
                gr[j] = et[j, r] * cgr * dc[j, r]
        else:
            for j in range(c):
                wj = cast_like(1.0, x) if w is None else w[j]
                gr[j] = (et[j, r] * cgr - ddr * wj) * dc[j, r]
        if cap == 0.0:
            gr[t] -= cast_like(tc[r], x)
        else:
            gr[t] -= cast_like(tc[r], x) * dc[t, r]


@_kernel
def _k_cross_entropy_small(x, target, w, sumw, ignore, eps, z, cap, loss, lse_out, grad, gsc, gsa, nb):
    n, c = x.shape
    for b in prange(nb):
        xt = np.empty((c, _SB), x.dtype)
        et = np.empty((c, _SB), x.dtype)
        dc = np.empty((c, _SB if cap != 0.0 else 0), x.dtype)
        sh = np.empty(_SB, x.dtype)
        sh2 = np.empty(_SB, x.dtype)
        cg = np.empty(_SB, x.dtype)
        xtt = np.empty(_SB, x.dtype)
        s = np.empty(_SB, np.float64)
        ls = np.empty(_SB, np.float64)
        dd = np.empty(_SB, np.float64)
        tc = np.empty(_SB, np.float64)
        wt = np.empty(_SB, np.float64)
        lse = np.empty(_SB, np.float64)
        # blocks of _SB rows at fixed offsets (multiples of _SB), dealt out to the tasks: a
        # row's lane in the vectorized loops -- and so its rounding -- does not depend on
        # how many threads there are
        nblk = (n + _SB - 1) // _SB
        for k in range(b * nblk // nb, (b + 1) * nblk // nb):
            r0 = k * _SB
            _ce_cols_block(x, target, w, sumw, ignore, eps, z, cap, loss, lse_out, grad, gsc, gsa, r0,
                           min(n, r0 + _SB), xt, et, dc, sh, sh2, cg, xtt, s, ls, dd, tc, wt, lse)


