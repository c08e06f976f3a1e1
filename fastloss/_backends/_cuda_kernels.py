"""Numba CUDA kernels of the ``cuda`` backend (see :mod:`fastloss._backends.cuda_backend`):
the losses and normalizers, and the registry of every kernel (:func:`get`; the checks, sums
and copies are in :mod:`._cuda_memory_kernels`).

Nothing here is compiled at import: ``@cuda.jit`` without a signature compiles on the first
launch, once per argument-type combination.  Kernels are built by ``_make_*`` factories per
compute dtype, so that arithmetic stays in float32 for float32 data (``ftype(...)`` casts)
while every reduction accumulates in float64.

Layout conventions
------------------
* Row-wise kernels run one *row group* per ``threadIdx.y`` and ``blockDim.x`` threads per row:
  thread ``tx`` visits columns ``tx, tx + blockDim.x, ...`` so that neighbouring threads read
  neighbouring addresses (coalesced for a contiguous class axis).  Large class counts
  (262,144) are handled by that loop, small ones by several rows per block.  Block-wide
  reductions go through shared memory (the simulator has no warp shuffles) and every thread
  of a block runs the same number of ``syncthreads`` -- rows past ``N`` take part with
  neutral values.
* Elementwise kernels take 2-D ``(R, K)`` arrays with any strides (stride-0 broadcast views
  included) and run on a 2-D grid: x threads over the columns (coalesced for C-ordered
  rows), y over the rows, so no thread divides a flat index; each block writes one float64
  partial sum, which the host adds up (deterministic, no atomics).
* Large logits: every kernel forms ``log p_c = (x_c - m) - log s`` (``m`` the row max,
  ``s = sum exp(x - m)``) and ``p_c = exp(x_c - m) / s``, never ``x_c - lse`` or
  ``exp(x_c - lse)``: ``lse = m + log s`` rounded to the compute dtype loses the O(1) part
  next to a large ``m`` (float32 logits ~1e4 lose ~5e-4; at 3e38 all of ``log s``), whereas
  ``x_c - m`` is exact near the max and ``log s`` is at most ``log C``.  ``lse`` itself is
  used only where it is the quantity asked for (``logsumexp``, the z-loss) or where the row
  max is not finite (then ``lse = m`` is exact).  The class-sharded kernel (``ce_shard``) is
  the exception: it is given only the global float64 ``lse`` (no row max of the other
  shards), so it forms ``x_c - lse`` -- in float64 (see :func:`_make_ce_shard`).
* ``math.log``/``math.exp`` are guarded where their argument can be 0, negative or huge: on
  the GPU they would return -inf/nan/inf, but the simulator runs Python's ``math`` which
  raises instead.
"""
from __future__ import annotations

import math
from functools import partial

from numba import cuda, float32, float64

MAX_THREADS = 1024  # shared scratch per block; blockDim.x * blockDim.y never exceeds it
_FMAX = {float32: 3.4028234663852886e38, float64: 1.7976931348623157e308}  # largest finite value
INF = math.inf
NAN = math.nan

_cache: dict = {}


def get(name: str, dtype):
    """Return kernel ``name`` specialized for compute dtype ``dtype`` (built on first use)."""
    key = (name, str(dtype))
    k = _cache.get(key)
    if k is None:
        from . import _cuda_memory_kernels

        ftype = float32 if str(dtype) == "float32" else float64
        k = (_FACTORIES.get(name) or _cuda_memory_kernels.FACTORIES[name])(ftype)
        _cache[key] = k
    return k


# ----------------------------------------------------------------------------- device helpers
@cuda.jit(device=True)
def _safe_log(v):
    """log(v) with log(0) = -inf and log(<0 or nan) = nan (Python's math would raise)."""
    if v > 0:
        return math.log(v)
    if v == 0:
        return -INF
    return NAN


@cuda.jit(device=True)
def _safe_log1p(v):
    if v > -1:
        return math.log1p(v)
    if v == -1:
        return -INF
    return NAN


@cuda.jit(device=True)
def _safe_exp(v):
    """exp(v) that returns inf instead of raising OverflowError under the simulator."""
    if v > 709.0:
        return INF
    return math.exp(v)


@cuda.jit(device=True)
def _max_nan(a, b):
    """max(a, b) that returns NaN when ``a`` is NaN (like ``np.maximum``; not fmax)."""
    if a != a or a >= b:
        return a
    return b


@cuda.jit(device=True)
def _tree_sum(sh, base, t, width, v):
    """Sum ``v`` over ``width`` threads (a power of two) numbered ``t = 0 .. width-1`` whose
    scratch is ``sh[base : base + width]``; every one of them gets the sum.  Every thread of
    the block must call it (it synchronizes the block), with neutral values where it has none."""
    sh[base + t] = v
    cuda.syncthreads()
    w = width // 2
    while w > 0:
        if t < w:
            sh[base + t] += sh[base + t + w]
        cuda.syncthreads()
        w //= 2
    r = sh[base]
    cuda.syncthreads()  # the scratch is reused by the next reduction
    return r


@cuda.jit(device=True)
def _block_sum(sh, v):
    """Sum ``v`` over the threads of this row group (``threadIdx.y``); every thread gets it."""
    return _tree_sum(sh, cuda.threadIdx.y * cuda.blockDim.x, cuda.threadIdx.x, cuda.blockDim.x, v)


@cuda.jit(device=True)
def _block_max(sh, v):
    """NaN-propagating maximum of ``v`` over the row group (NaN wins over everything)."""
    tx = cuda.threadIdx.x
    base = cuda.threadIdx.y * cuda.blockDim.x
    sh[base + tx] = v
    cuda.syncthreads()
    w = cuda.blockDim.x // 2
    while w > 0:
        if tx < w:
            b = sh[base + tx + w]
            if b > sh[base + tx] or b != b:
                sh[base + tx] = b
        cuda.syncthreads()
        w //= 2
    r = sh[base]
    cuda.syncthreads()
    return r


@cuda.jit(device=True)
def _block_sum_all(sh, v):
    """Sum ``v`` over all threads of the block (1-D or 2-D, ``blockDim.x * blockDim.y`` a
    power of two)."""
    return _tree_sum(sh, 0, cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x,
                     cuda.blockDim.x * cuda.blockDim.y, v)


@cuda.jit(device=True)
def _row_max(x, i, ok):
    """This thread's NaN-propagating partial max of row ``i`` (``-inf`` when not ``ok``)."""
    m = -INF
    if ok:
        for j in range(cuda.threadIdx.x, x.shape[1], cuda.blockDim.x):
            v = x[i, j]
            if v > m or v != v:
                m = v
    return m



@cuda.jit(device=True)
def _block_sumexp(sh, x, i, ok, mf):
    """The block's float64 sum of ``exp(x[i, j] - mf)`` over row ``i`` (a thread not ``ok``
    adds 0; every thread of the block must call it: it synchronizes)."""
    s = 0.0
    if ok:
        for j in range(cuda.threadIdx.x, x.shape[1], cuda.blockDim.x):
            s += math.exp(x[i, j] - mf)
    return _block_sum(sh, s)


def _make_softcap(ftype):
    """Device functions of the soft cap ``x' = cap tanh(x / cap)`` for ``ftype`` logits ``v``
    (``cap`` and ``rcap = 1 / cap`` in ``ftype``):

    * ``cap_val(v, cap, rcap) -> x'``: ``math.tanh`` (libdevice ``tanhf``/``tanh``, within 2
      ulps everywhere), so ``x'`` is accurate relative to itself also where ``|x| << cap``
      (``(1 - t) / (1 + t)`` would carry an absolute error of ``cap`` ulps of 1 there);
    * ``cap_grad(v, cap, rcap) -> (x', dx'/dx)``: the derivative ``1 - tanh**2`` as
      ``4 t / (1 + t)**2`` with ``t = exp(-2 |x| / cap)`` in ``[0, 1]``: no overflow, accurate
      relative to itself where ``tanh`` is near 1 (no ``1 - tanh**2`` cancellation).

    An infinite ``v`` gives ``x' = +-cap`` and a derivative of exactly 0 (``t = 0``); NaN
    gives NaN for both."""

    @cuda.jit(device=True)
    def cap_val(v, cap, rcap):
        return cap * math.tanh(v * rcap)

    @cuda.jit(device=True)
    def cap_grad(v, cap, rcap):
        one = ftype(1)
        u = v * rcap
        t = math.exp(ftype(-2) * abs(u))
        r = one / (one + t)
        return cap * math.tanh(u), ftype(4) * t * r * r

    return cap_val, cap_grad


# ----------------------------------------------------------------------------- row-wise
def _make_row_lse(ftype):
    """``lse[i]`` (float64) of every row: max pass, then a sum of ``exp(x - max)``.

    The shift is the row max; a row whose max is not finite is settled without summing:
    NaN anywhere -> NaN, +inf anywhere -> +inf, only -inf -> -inf (never ``inf - inf``).
    ``mode`` 0 only stores ``lse``; 1 writes ``softmax`` into ``out`` (NaN throughout a row
    without a finite max: one holding +inf or NaN, or only -inf); 2 writes ``log_softmax`` as
    ``(x - m) - log s`` (not ``x - lse``, see the module docstring; a row holding +inf gives
    NaN throughout, as PyTorch).
    ``out`` may be ``x``: a row is fully reduced before it is written.
    """

    @cuda.jit
    def k(x, lse, out, mode):
        sh = cuda.shared.array(MAX_THREADS, float64)
        n = x.shape[0]
        c = x.shape[1]
        step = cuda.gridDim.x * cuda.blockDim.y
        r0 = cuda.blockIdx.x * cuda.blockDim.y
        while r0 < n:  # uniform over the block: every thread meets every syncthreads
            i = r0 + cuda.threadIdx.y
            ok = i < n
            m = _block_max(sh, _row_max(x, i, ok))
            finite = -INF < m < INF  # False for nan and +-inf
            s = _block_sumexp(sh, x, i, ok and finite, ftype(m))
            ls = 0.0
            if finite:
                ls = math.log(s)  # s >= 1: the max contributes exp(0)
                l = m + ls
            else:
                l = m  # nan, +inf or -inf
            if ok:
                if cuda.threadIdx.x == 0 and mode == 0:
                    lse[i] = l
                if mode == 1:
                    for j in range(cuda.threadIdx.x, c, cuda.blockDim.x):
                        v = x[i, j]
                        if finite:
                            out[i, j] = math.exp(v - ftype(m)) / ftype(s)
                        else:
                            # a row holding +inf has no defined softmax: NaN everywhere, as
                            # PyTorch gives (exp(x - inf) / inf); a nan row, a row of only -inf
                            out[i, j] = NAN
                elif mode == 2:
                    mf = ftype(m)
                    lsf = ftype(ls)
                    for j in range(cuda.threadIdx.x, c, cuda.blockDim.x):
                        v = x[i, j]
                        if finite:
                            out[i, j] = (v - mf) - lsf  # x - m exact near the max
                        else:
                            # a row holding +inf has no log-softmax: NaN throughout, as
                            # PyTorch gives; a nan row; a row of only -inf (-inf - -inf)
                            out[i, j] = NAN
            r0 += step

    return k


def _make_softmax_bwd(ftype):
    """``mode`` 0: ``y * (g - sum(g*y))``; 1: ``g - exp(y) * sum(g)`` (y the log-softmax)."""

    @cuda.jit
    def k(g, y, out, mode):
        sh = cuda.shared.array(MAX_THREADS, float64)
        n = y.shape[0]
        c = y.shape[1]
        step = cuda.gridDim.x * cuda.blockDim.y
        r0 = cuda.blockIdx.x * cuda.blockDim.y
        while r0 < n:
            i = r0 + cuda.threadIdx.y
            ok = i < n
            s = 0.0
            if ok:
                for j in range(cuda.threadIdx.x, c, cuda.blockDim.x):
                    if mode == 0:
                        s += float64(g[i, j]) * float64(y[i, j])
                    else:
                        s += float64(g[i, j])
            s = ftype(_block_sum(sh, s))
            if ok:
                for j in range(cuda.threadIdx.x, c, cuda.blockDim.x):
                    gv = g[i, j]  # read before the write: out may be g
                    yv = y[i, j]
                    if mode == 0:
                        out[i, j] = yv * (gv - s)
                    else:
                        out[i, j] = gv - _safe_exp(yv) * s
            r0 += step

    return k


def _make_ce_hard(ftype, capped=False):
    """Fused softmax cross-entropy with class indices: loss row and gradient in one launch.

    Per row: pass 1 the max (and ``x[t]``, read before anything of the row is written),
    pass 2 ``s = sum exp(x - max)``, pass 3 the smoothing term
    ``sum_c w_c (lse - x_c)`` and the gradient
    ``gs * (p_c a - eps/C w_c - [c = t] (1-eps) w_t)`` with ``p = exp(x - max) / s`` and
    ``a = (1-eps) w_t + eps/C sum(w) + 2 z lse``.  Every ``lse - x_c`` is formed as
    ``log s - (x_c - max)`` (see the module docstring).  Without smoothing (``eps == 0``) no
    smoothing term is evaluated at all -- not ``eps/C sum(w)`` in ``a``, not ``eps/C w_c``,
    not the smoothing sum -- so a NaN/inf weight of a class no target uses cannot leak in as
    ``0 * nan``.  With smoothing, ``sum_c w_c (lse - x_c)`` is evaluated per element, as
    PyTorch does (an infinite weight gives +inf, never a factored ``inf - inf``).  ``has_w`` 0
    means unit weights (``w`` is then a dummy); ``want_grad`` 0 skips the gradient.  Ignored
    rows get loss 0 and a zero gradient.

    ``want_lse`` 1 writes every row's ``lse`` into ``lse_out`` (a dummy otherwise), ignored
    rows included: their max and sum are then computed too (and only then).

    ``capped`` (compile time: the ``ce_hard_cap`` kernel) applies the soft cap
    ``x' = cap tanh(x / cap)`` (``cap > 0``) to every logit read in passes 2 and 3 (with
    :func:`_make_softcap`: no capped copy of the row), and multiplies the gradient by the
    cap's derivative.  The max of the capped row is the cap of the raw max (``tanh`` is
    increasing), so pass 1 is unchanged; a capped max is finite unless the row holds NaN.
    The uncapped kernel (``ce_hard``) has none of this code.
    """
    cap_val, cap_grad = _make_softcap(ftype)
    big = _FMAX[ftype]

    @cuda.jit
    def k(x, target, w, has_w, wsum, ignore_index, eps, zl, cap, loss, lse_out, want_lse, grad, want_grad,
          gscale):
        sh = cuda.shared.array(MAX_THREADS, float64)
        n = x.shape[0]
        c = x.shape[1]
        capf = ftype(cap)
        rcapf = ftype(1.0 / cap if 1.0 / cap < big else big) if capped else ftype(0)  # finite: 0 stays 0
        step = cuda.gridDim.x * cuda.blockDim.y
        r0 = cuda.blockIdx.x * cuda.blockDim.y
        while r0 < n:
            i = r0 + cuda.threadIdx.y
            ok = i < n
            keep = False
            t = 0
            if ok:
                t = target[i]
                keep = t != ignore_index
            if not keep:
                t = 0
            act = keep or (ok and want_lse)  # rows whose max and sum are needed
            xt = float64(x[i, t]) if keep else 0.0
            m = _block_max(sh, _row_max(x, i, act))
            if capped and act:
                m = float64(cap_val(ftype(m), capf, rcapf))  # max of x' = cap(max of x)
            finite = -INF < m < INF  # False for nan and +-inf
            if capped:
                s = 0.0
                if act and finite:
                    mf = ftype(m)
                    for j in range(cuda.threadIdx.x, c, cuda.blockDim.x):
                        s += math.exp(cap_val(x[i, j], capf, rcapf) - mf)
                s = _block_sum(sh, s)
            else:
                s = _block_sumexp(sh, x, i, act and finite, ftype(m))
            ls = math.log(s) if finite else 0.0  # log s; s >= 1 when finite
            lse = m + ls if finite else m  # nan, +inf or -inf when the max is not finite
            wt = float64(w[t]) if has_w else 1.0
            sm = 0.0
            if keep and (eps != 0 or want_grad):
                # finite max: p_c = exp(x_c - m) * (1/s) (x_c - m <= 0, exact near the max);
                # otherwise exp(x_c - m) * a with m = lse = +-inf/nan gives the reference's
                # 0 / nan entries
                mf = ftype(m)
                gs = gscale[i] if want_grad else 0.0  # gscale is a dummy without a gradient
                # the smoothing term only with smoothing: without it a NaN/inf weight of a
                # class no target uses must not reach the gradient (0 * nan)
                a = (1.0 - eps) * wt
                if eps != 0:
                    a += eps / c * wsum
                a = gs * (a + 2.0 * zl * lse)
                pa = ftype(a / s) if finite else ftype(a)
                b = ftype(gs * (eps / c))
                at_t = ftype(gs * (1.0 - eps) * wt)
                for j in range(cuda.threadIdx.x, c, cuda.blockDim.x):
                    v = x[i, j]
                    dc = ftype(1)
                    if capped:
                        if want_grad:
                            v, dc = cap_grad(v, capf, rcapf)  # x'_j and d x'_j / d x_j
                        else:
                            v = cap_val(v, capf, rcapf)
                    wj = w[j] if has_w else ftype(1.0)
                    if eps != 0:
                        # -log p_c = log s - (x_c - m); lse - x_c without a finite max
                        # evaluated per element, as PyTorch: an infinite weight gives +inf
                        # where -log p_c > 0 (and nan where it is 0, as inf * 0 does)
                        d = ls - (float64(v) - m) if finite else lse - float64(v)
                        sm += float64(wj) * d
                    if want_grad:
                        gv = math.exp(v - mf) * pa
                        if eps != 0:
                            gv -= b * wj
                        if j == t:
                            gv -= at_t
                        if capped:
                            gv *= dc  # through the cap
                        grad[i, j] = gv
            elif ok and want_grad:
                for j in range(cuda.threadIdx.x, c, cuda.blockDim.x):
                    grad[i, j] = 0
            sm = _block_sum(sh, sm)
            if ok and cuda.threadIdx.x == 0:
                if want_lse:
                    lse_out[i] = lse
                if keep:
                    if capped:
                        xt = float64(cap_val(ftype(xt), capf, rcapf))  # x'[t] (x[t] read first)
                    # -log p_t = log s - (x_t - m): +inf when x[t] = -inf.  Not lse - x_t,
                    # which loses log s next to a large m (see the module docstring)
                    nll = ls - (xt - m) if finite else lse - xt
                    row = (1.0 - eps) * wt * nll
                    if eps != 0:
                        row += eps / c * sm
                    if zl != 0:
                        row += zl * lse * lse
                    loss[i] = row
                else:
                    loss[i] = 0.0
            r0 += step

    return k


def _make_ce_shard(ftype, capped=False):
    """One shard of a class-sharded cross-entropy (hard targets), given the global row lse.

    ``x`` ``(N, C)`` holds the classes ``[offset, offset + C)`` of ``nk``; ``target`` holds
    global class indices; ``w`` is the whole ``(nk,)`` weight vector (``has_w`` 0: unit
    weights, ``w`` a dummy) and ``wsum`` its float64 sum; ``lse`` ``(N,)`` float64 is the
    global log-sum-exp of the capped row, read only.  Per row it writes the shard's additive
    share of the loss (``eps/K`` written ``epsk``, ``first``: ``offset == 0``)::

        loss = [first] (((1-eps) w_t + epsk sum_k w_k) lse + z lse**2)
               - [t in shard] (1-eps) w_t x'_t - epsk sum_{c in shard} w_{offset+c} x'_c

    and (``want_grad`` 1) the shard's slice of the unsharded gradient::

        grad_c = gs (p_c a - epsk w_{offset+c} - [c = t - offset] (1-eps) w_t) dx'_c/dx_c
        p_c = exp(x'_c - lse),   a = (1-eps) w_t + epsk sum_k w_k + 2 z lse

    One pass over the row, no max and no sum of exps: the global softmax is known through
    ``lse``.  ``x'_c - lse`` is formed in float64 (the float32 ``x'_c`` is exact there, and a
    float32 ``lse`` would carry an absolute error of an ulp of ``lse``: ~1e-3 at 1e4) and only
    then rounded for the exponential, so ``p_c`` keeps the compute dtype's relative accuracy;
    the shift-by-the-max of the unsharded kernels is not available here, which is why the
    public layer documents the share as exact to float64 rounding of ``|lse|``.

    The only block reduction is the smoothing sum (``eps != 0``, uniform over the block):
    without smoothing, the loss term ``x'_t`` is taken by the thread whose columns hold the
    target (``tl % blockDim.x``), which reads it before it writes that gradient element, so
    the gradient may be written over ``x`` (in place) without a barrier; loss only and no
    smoothing reads just ``x[i, t - offset]`` (no pass over the row).  The smoothing terms
    are left out entirely without smoothing (a NaN weight of a class no target uses must
    not leak in as ``0 * nan``).  Ignored rows get loss 0 and an exact-zero gradient, whatever
    they hold.  ``capped`` (compile time: ``ce_shard_cap``) applies ``x' = cap tanh(x / cap)``
    as in :func:`_make_ce_hard`.  The float64 expression order follows the NumPy reference
    (``numpy_backend.cross_entropy_shard``) term for term.
    """
    cap_val, cap_grad = _make_softcap(ftype)
    big = _FMAX[ftype]

    @cuda.jit
    def k(x, target, w, has_w, wsum, ignore_index, eps, zl, cap, lse, offset, nk, loss, grad, want_grad,
          gscale):
        sh = cuda.shared.array(MAX_THREADS, float64)
        n = x.shape[0]
        c = x.shape[1]
        tx = cuda.threadIdx.x
        bdx = cuda.blockDim.x
        capf = ftype(cap)
        rcapf = ftype(1.0 / cap if 1.0 / cap < big else big) if capped else ftype(0)  # finite: 0 stays 0
        first = offset == 0
        epsk = eps / nk
        full = want_grad or eps != 0  # a pass over the whole row (uniform over the block)
        step = cuda.gridDim.x * cuda.blockDim.y
        r0 = cuda.blockIdx.x * cuda.blockDim.y
        while r0 < n:  # uniform over the block: every thread meets every syncthreads
            i = r0 + cuda.threadIdx.y
            ok = i < n
            keep = False
            t = 0
            if ok:
                t = target[i]
                keep = t != ignore_index
            if not keep:
                t = 0
            tl = t - offset  # the target's column in this shard
            mine = keep and tl >= 0 and tl < c
            if not mine:
                tl = -1  # matches no column
            L = lse[i] if keep else 0.0
            wt = float64(w[t]) if has_w and keep else 1.0
            xt = 0.0  # x'[tl] (float64), held by the writer thread
            sm = 0.0  # this thread's part of sum_c w_{offset+c} x'_c
            if keep and full:
                gs = gscale[i] if want_grad else 0.0  # gscale is a dummy without a gradient
                a = (1.0 - eps) * wt + 2.0 * zl * L
                if eps != 0:
                    a += epsk * wsum
                pa = ftype(gs * a)
                b = ftype(gs * epsk)
                at_t = ftype(gs * (1.0 - eps) * wt)
                for j in range(tx, c, bdx):
                    v = x[i, j]  # read before the write: grad may be x
                    dc = ftype(1)
                    if capped:
                        if want_grad:
                            v, dc = cap_grad(v, capf, rcapf)  # x'_j and d x'_j / d x_j
                        else:
                            v = cap_val(v, capf, rcapf)
                    if j == tl:
                        xt = float64(v)
                    wj = w[offset + j] if has_w else ftype(1.0)
                    if eps != 0:
                        # per element, as the reference: an infinite weight or logit gives
                        # +-inf (nan for inf * 0), never a factored inf - inf
                        sm += float64(wj) * float64(v)
                    if want_grad:
                        d = float64(v) - L  # in float64 (see above); nan stays nan
                        if d > 709.0:  # only for an lse below the row's max (not a true lse):
                            d = 709.0  # inf on a GPU anyway; the simulator's math.exp would raise
                        gv = math.exp(ftype(d)) * pa
                        if eps != 0:
                            gv -= b * wj
                        if j == tl:
                            gv -= at_t
                        if capped:
                            gv *= dc  # through the cap
                        grad[i, j] = gv
            elif ok and want_grad:
                for j in range(tx, c, bdx):
                    grad[i, j] = 0
            elif mine and tx == 0:  # loss only, no smoothing: the target logit is all it reads
                v = x[i, tl]
                if capped:
                    v = cap_val(v, capf, rcapf)
                xt = float64(v)
            if eps != 0:
                sm = _block_sum(sh, sm)
            writer = tl % bdx if mine and full else 0
            if ok and tx == writer:
                if keep:
                    row = -(1.0 - eps) * wt * xt if mine else 0.0
                    if eps != 0:
                        row -= epsk * sm
                    if first:  # the lse terms and the z-loss: counted once, by the first shard
                        coef = (1.0 - eps) * wt
                        if eps != 0:
                            coef += epsk * wsum
                        row += coef * L
                        if zl != 0:
                            row += zl * L * L
                    loss[i] = row
                else:
                    loss[i] = 0.0
            r0 += step

    return k


def _make_ce_soft(ftype, capped=False):
    """Cross-entropy with probability targets ``y`` (N, C) and optional class weights.

    ``y' = ((1-eps) y + eps/C) w``; loss ``sum_c y'_c (lse - x_c) + z lse**2`` (a term with
    ``y'_c = 0`` is 0 even where ``x_c = -inf``); gradient ``gs (p_c a - y'_c)`` with
    ``a = sum_c y'_c + 2 z lse``.  ``lse - x_c`` is formed as ``log s - (x_c - max)`` and
    ``p_c`` as ``exp(x_c - max) / s`` (see the module docstring).  A row whose max is not
    finite (shift 0) gives ``(sum_c y'_c) log s - sum_{y'_c != 0} y'_c x_c`` with
    ``log s = max``: a NaN or +inf logit makes the row NaN/inf even when its whole target mass
    is 0 (as PyTorch), while a ``-inf`` logit with zero mass still contributes nothing.
    ``want_lse`` 1 writes each row's ``lse`` into ``lse_out``; ``capped`` as in
    :func:`_make_ce_hard` (the ``ce_soft_cap`` kernel).
    """
    cap_val, cap_grad = _make_softcap(ftype)
    big = _FMAX[ftype]

    @cuda.jit
    def k(x, y, w, has_w, eps, zl, cap, loss, lse_out, want_lse, grad, want_grad, gscale):
        sh = cuda.shared.array(MAX_THREADS, float64)
        n = x.shape[0]
        c = x.shape[1]
        capf = ftype(cap)
        rcapf = ftype(1.0 / cap if 1.0 / cap < big else big) if capped else ftype(0)  # finite: 0 stays 0
        step = cuda.gridDim.x * cuda.blockDim.y
        r0 = cuda.blockIdx.x * cuda.blockDim.y
        while r0 < n:
            i = r0 + cuda.threadIdx.y
            ok = i < n
            m = _block_max(sh, _row_max(x, i, ok))
            if capped and ok:
                m = float64(cap_val(ftype(m), capf, rcapf))  # max of x' = cap(max of x)
            finite = -INF < m < INF  # False for nan and +-inf
            s = 0.0
            ysum = 0.0
            if ok:
                mf = ftype(m)
                for j in range(cuda.threadIdx.x, c, cuda.blockDim.x):
                    if finite:
                        v = x[i, j]
                        if capped:
                            v = cap_val(v, capf, rcapf)
                        s += math.exp(v - mf)
                    yj = (1.0 - eps) * float64(y[i, j]) + eps / c
                    if has_w:
                        yj *= float64(w[j])
                    ysum += yj
            s = _block_sum(sh, s)
            ysum = _block_sum(sh, ysum)
            ls = math.log(s) if finite else 0.0  # log s; s >= 1 when finite
            lse = m + ls if finite else m  # nan, +inf or -inf when the max is not finite
            tot = 0.0
            if ok:
                # finite max: p_c = exp(x_c - m) * (1/s); otherwise exp(x_c - m) * a, m = lse
                mf = ftype(m)
                gs = gscale[i] if want_grad else 0.0  # gscale is a dummy without a gradient
                a = gs * (ysum + 2.0 * zl * lse)
                pa = ftype(a / s) if finite else ftype(a)
                for j in range(cuda.threadIdx.x, c, cuda.blockDim.x):
                    v = x[i, j]  # read x and y before the write: grad may be x
                    dc = ftype(1)
                    if capped:
                        if want_grad:
                            v, dc = cap_grad(v, capf, rcapf)  # x'_j and d x'_j / d x_j
                        else:
                            v = cap_val(v, capf, rcapf)
                    yj = (1.0 - eps) * float64(y[i, j]) + eps / c
                    if has_w:
                        yj *= float64(w[j])
                    if yj != 0:  # a zero-mass term is left out: no 0 * inf at x_c = -inf
                        if finite:
                            # -log p_c = log s - (x_c - m), not lse - x_c
                            tot += yj * (ls - (float64(v) - m))
                        else:
                            tot -= yj * float64(v)  # the shift is 0: - y'_c x_c
                    if want_grad:
                        gv = math.exp(v - mf) * pa - ftype(gs * yj)
                        if capped:
                            gv *= dc  # through the cap
                        grad[i, j] = gv
            tot = _block_sum(sh, tot)
            if ok and cuda.threadIdx.x == 0:
                if not finite:
                    # (sum_c y'_c) log s with the shift 0, log s = log sum exp(x) = m (nan or
                    # +-inf): a nan/+inf logit gives a nan/inf row even with zero target mass
                    tot += ysum * m
                if want_lse:
                    lse_out[i] = lse
                loss[i] = tot + zl * lse * lse if zl != 0 else tot
            r0 += step

    return k


# ----------------------------------------------------------------------------- elementwise
def _elementwise(ftype, body):
    """Wrap a pointwise ``body(a, b, p, q) -> (loss, grad, grad2)`` into a kernel over
    ``(R, K)`` arrays with any strides; ``want`` bit 0: write ``loss``, bit 1: ``grad``,
    bit 2: ``grad2``.  ``p``/``q`` are two auxiliary operands (weight, pos_weight, var),
    ``gout`` the upstream gradient, all possibly stride-0 views of one value.

    2-D launch: x threads walk the columns ``K`` (the contiguous axis of C-ordered data:
    neighbouring threads touch neighbouring addresses), y threads and blocks walk the rows;
    a short ``K`` gets several rows per block.  No per-element integer division.  Each block
    writes one float64 partial sum of the loss to ``part[blockIdx.y * gridDim.x + blockIdx.x]``."""

    @cuda.jit
    def k(a, b, p, q, flag, eps, loss, grad, grad2, want, gscale, gout, part):
        sh = cuda.shared.array(MAX_THREADS, float64)
        kk = a.shape[1]
        acc = 0.0
        j0 = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        for i in range(cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, a.shape[0], cuda.gridDim.y * cuda.blockDim.y):
            for j in range(j0, kk, cuda.gridDim.x * cuda.blockDim.x):
                l, g, g2 = body(a[i, j], b[i, j], p[i, j], q[i, j], flag, eps)
                acc += float64(l)  # float64 totals, whatever the compute dtype
                if want & 1:
                    loss[i, j] = l
                if want & 6:
                    s = ftype(gscale) * gout[i, j]
                    if want & 2:
                        grad[i, j] = s * g
                    if want & 4:
                        grad2[i, j] = s * g2
        acc = _block_sum_all(sh, acc)
        if cuda.threadIdx.x == 0 and cuda.threadIdx.y == 0:
            part[cuda.blockIdx.y * cuda.gridDim.x + cuda.blockIdx.x] = acc

    return k


def _make_bce_with_logits(ftype):
    @cuda.jit(device=True)
    def body(z, y, w, pw, flag, eps):
        one = ftype(1)
        az = z if z >= 0 else -z
        lg = ftype(_safe_log1p(math.exp(-az)))  # log1p(exp(-|z|)), exp argument <= 0
        sp_neg = (-z if z < 0 else ftype(0)) + lg  # softplus(-z) = -log sigmoid(z)
        sp_pos = (z if z > 0 else ftype(0)) + lg  # softplus(z)  = -log sigmoid(-z)
        c = one + (pw - one) * y
        l = ((one - y) * z + c * sp_neg) * w
        sm = math.exp(-sp_pos)  # sigmoid(-z), accurate for large z
        g = ((one - y) - c * sm) * w
        return l, g, ftype(0)

    return _elementwise(ftype, body)


def _make_bce(ftype):
    @cuda.jit(device=True)
    def body(p, y, w, unused, flag, eps):
        one = ftype(1)
        lp = ftype(_max_nan(_safe_log(p), -100.0))  # PyTorch clamps each log term at -100
        l1 = ftype(_max_nan(_safe_log1p(-p), -100.0))
        l = -(y * lp + (one - y) * l1) * w
        # ATen's 1e-12 is a float constant (9.99999996e-13), also for float64 input
        g = (p - y) / _max_nan(p * (one - p), ftype(9.999999960041972e-13)) * w
        return l, g, ftype(0)

    return _elementwise(ftype, body)


def _make_kl_div(ftype):
    @cuda.jit(device=True)
    def body(x, t, unused1, unused2, log_target, eps):
        if log_target:
            if t == -INF:
                return ftype(0), ftype(0), ftype(0)
            et = ftype(_safe_exp(t))
            return et * (t - x), -et, ftype(0)
        if t == 0:
            return ftype(0), -t, ftype(0)
        return t * (ftype(_safe_log(t)) - x), -t, ftype(0)

    return _elementwise(ftype, body)


def _make_mse(ftype):
    @cuda.jit(device=True)
    def body(x, t, unused1, unused2, flag, eps):
        d = x - t
        return d * d, ftype(2) * d, ftype(0)

    return _elementwise(ftype, body)


HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _make_gaussian_nll(ftype):
    @cuda.jit(device=True)
    def body(x, t, var, unused, full, eps):
        v = _max_nan(var, ftype(eps))  # the clamp at eps (NaN stays NaN)
        d = x - t
        l = ftype(0.5) * (ftype(_safe_log(v)) + d * d / v)
        if full:
            l += ftype(HALF_LOG_2PI)
        # gradient at the clamped value, as PyTorch's no-grad clamp gives
        return l, d / v, ftype(0.5) * (ftype(1) / v - d * d / (v * v))

    return _elementwise(ftype, body)


_FACTORIES = {
    "row_lse": _make_row_lse,
    "softmax_bwd": _make_softmax_bwd,
    "ce_hard": _make_ce_hard,
    "ce_hard_cap": partial(_make_ce_hard, capped=True),
    "ce_shard": _make_ce_shard,
    "ce_shard_cap": partial(_make_ce_shard, capped=True),
    "ce_soft": _make_ce_soft,
    "ce_soft_cap": partial(_make_ce_soft, capped=True),
    "bce_with_logits": _make_bce_with_logits,
    "bce": _make_bce,
    "kl_div": _make_kl_div,
    "mse": _make_mse,
    "gaussian_nll": _make_gaussian_nll,
}
