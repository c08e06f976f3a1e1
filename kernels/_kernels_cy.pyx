# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, embedsignature=True
"""Compiled kernels of the ``cython`` backend (built from ``kernels/`` by ``setup.py``).

Row-wise kernels run an OpenMP ``prange`` over rows; elementwise kernels over (row, block of
``BLOCK`` elements) tasks.  The vectorized inner loops and the polynomial exp/log are in
``fl_math.hpp`` (``#pragma omp simd``, no ``-ffast-math``); this module drives them on typed
memoryviews of float32 or float64 (the fused type ``floating``) with any strides:

* an operand whose class axis (elementwise: last axis) is contiguous is used in place;
* any other one -- Fortran order, strided or stride-0 broadcast views -- is gathered into a
  thread-local buffer, and a strided output is computed in a buffer and scattered back.

Few classes (cross-entropy, logsumexp, softmax, log-softmax): a row of ~10 classes is too short
for the row loops to vectorize, so blocks of rows are transposed into column layout and every
loop runs over the rows of a block (``fl_ce_cols`` / ``fl_norm_cols``); Fortran-order logits
are already in that layout and are read in place, for up to ~2000 classes.

Every ``def`` entry point here takes already-validated, normalized arguments (see
:mod:`fastloss._backends.numpy_backend` for the protocol); absent optional arrays are passed as
empty dummies with a ``has_*`` flag by :mod:`fastloss._backends.cython_backend`.
Row losses and elementwise loss totals are accumulated in float64; the row sums of exp in float32
lanes at most ``FL_BLOCK`` long, then in float64.
"""
from cython cimport floating
from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from libc.stdint cimport int64_t, uintptr_t
from libc.math cimport log, isfinite, NAN, INFINITY

import numpy as np

cdef extern from "fl_math.hpp" nogil:
    # The loops of fl_math.hpp are templates over T = float, double: the fused-type code below
    # calls them by name and Cython deduces T from the pointer arguments.
    ctypedef Py_ssize_t fl_idx
    int FL_BLOCK
    int fl_openmp_enabled()
    int fl_max_threads()
    const char *fl_build_info()

    T fl_max[T](const T *x, fl_idx n)
    T fl_cap_max[T](const T *x, T *xc, T *d, fl_idx n, T cap)
    double fl_sumexp[T](const T *x, T *e, fl_idx n, T sh, int neg)
    double fl_sumexp_apart[T](const T *x, const T *e, fl_idx n, T sh)
    double fl_wsum_shift[T](const T *x, const T *w, fl_idx n, T sh)
    double fl_dot[T](const T *a, const T *b, fl_idx n)
    double fl_dsum[T](const T *l, fl_idx n)
    void fl_expaxpy[T](const T *x, T *out, fl_idx n, T sh, T a, const T *w, T b)
    void fl_scale_axpy[T](T *g, fl_idx n, T a, const T *w, T b)
    void fl_cap_grad[T](const T *e, T *g, fl_idx n, T a, const T *w, T b)
    void fl_fill[T](T *g, fl_idx n, T v)
    void fl_sub2[T](const T *x, T *out, fl_idx n, T sh, T L)
    void fl_smb[T](const T *g, const T *y, T *out, fl_idx n, T d)
    void fl_lsmb[T](const T *g, const T *y, T *out, fl_idx n, T s)
    double fl_soft_terms[T](const T *x, const T *y, const T *w, fl_idx n, T sh, double L, double a1,
                            double a0, double *ysum)
    void fl_soft_grad[T](const T *x, const T *y, const T *w, T *out, fl_idx n, T sh, T pa, T a1, T a0,
                         T gs, int neg, const T *dc)
    double fl_bce_logits[T](fl_idx n, const T *z, const T *y, const T *w, const T *pw, int has_pw,
                            T *l, T *g, const T *go, T gs)
    double fl_bce[T](fl_idx n, const T *p, const T *y, const T *w, T *l, T *g, const T *go, T gs)
    double fl_kl[T](fl_idx n, const T *x, const T *t, int log_target, T *l, T *g, const T *go, T gs)
    double fl_mse[T](fl_idx n, const T *x, const T *t, T *l, T *g, const T *go, T gs)
    double fl_gnll[T](fl_idx n, const T *x, const T *t, const T *var, T eps, T cst, T *l, T *g, T *gv,
                      const T *go, T gs)
    void fl_gather_panel[T](const T *p, fl_idx rs, fl_idx cs, fl_idx P, fl_idx n, T *buf)
    void fl_scatter_panel[T](const T *buf, T *p, fl_idx rs, fl_idx cs, fl_idx P, fl_idx n)
    void fl_gather[T](const T *p, fl_idx s, T *buf, fl_idx n)
    void fl_scatter[T](const T *buf, T *p, fl_idx s, fl_idx n)
    double fl_ce_shard_row[T](const T *x, T *g, fl_idx n, fl_idx tl, const T *ws, double wt, double wsum,
                              double eps, double ec, double z, T cap, double L, int first, double gs)
    void fl_vexp[T](const T *x, T *out, fl_idx n)
    void fl_vexpn[T](const T *x, T *out, fl_idx n)
    void fl_vsoftcap[T](const T *x, T *out, T *d, fl_idx n, T cap)
    void fl_vlog[T](const T *x, T *out, fl_idx n)
    void fl_vlog1p[T](const T *x, T *out, fl_idx n)

    int FL_NORM_LSE
    int FL_NORM_SOFTMAX
    int FL_NORM_LOGSOFTMAX
    void fl_norm_cols[T](fl_idx nr, fl_idx c, const T *x, fl_idx xrs, fl_idx xcs, int mode,
                         T *out, fl_idx ors, fl_idx ocs, fl_idx sb, void *scratch)
    size_t fl_cols_scratch(fl_idx c, fl_idx sb, size_t isz, int capgrad)
    void fl_ce_cols[T](fl_idx nr, fl_idx c, const T *x, fl_idx xrs, fl_idx xcs,
                       const int64_t *tg, fl_idx ts, const T *w, double wsum, int64_t ign,
                       double eps, double z, T cap, double *loss, fl_idx ls, double *lse, fl_idx lss,
                       const double *gsa, fl_idx gss, T *g, fl_idx grs, fl_idx gcs, fl_idx sb,
                       void *scratch)

BLOCK = FL_BLOCK

# OpenMP team size of every prange; set_num_threads() changes it.
cdef int _nthreads = max(1, fl_max_threads())
# Below this many elements a call runs on one thread: ~100 us of single-thread work, where an
# OpenMP fork/join (~10 us on an idle machine) stops paying.  On an oversubscribed machine a
# parallel region also waits until the OS schedules every team thread (milliseconds), one
# more reason to keep small calls serial.
cdef Py_ssize_t _PAR_MIN = 262144


cdef extern from *:
    """
    /* the calling thread's cap on the team size (0: none): fastloss._backends.thread_cap */
    static thread_local int fl_thread_cap = 0;
    """
    int fl_thread_cap


def set_thread_cap(int n):
    """Cap the OpenMP team of the kernels *the calling thread* runs at ``n`` (0: no cap)."""
    global fl_thread_cap
    if n < 0:
        raise ValueError(f"n: expected a number of threads >= 0 (0: no cap), found {n}")
    fl_thread_cap = n


def set_num_threads(int n):
    """Use ``n`` (>= 1) OpenMP threads in every following kernel call."""
    global _nthreads
    if n < 1:
        raise ValueError(f"n: expected a positive number of threads, found {n}")
    _nthreads = n


def get_num_threads():
    """The OpenMP team size the kernels use."""
    return _nthreads


def build_info():
    """How the extension was compiled, e.g. ``"march=native openmp=1"``."""
    return fl_build_info().decode()


def openmp_enabled():
    """True when the extension was compiled with OpenMP (else every kernel is single threaded)."""
    return bool(fl_openmp_enabled())


# Set once a kernel has run an OpenMP team of more than one thread: from then on libgomp keeps
# a pool of worker threads, which a child forked from this process does not inherit (see
# fastloss.forked_serial: such a child must stay at one thread).
cdef int _team_started = 0


def openmp_team_started():
    """True once a kernel of this process ran an OpenMP team of more than one thread."""
    return bool(_team_started and fl_openmp_enabled())


cdef inline int _team(Py_ssize_t work) noexcept nogil:
    global _team_started
    cdef int n = _nthreads
    if 0 < fl_thread_cap < n:
        n = fl_thread_cap
    if work >= _PAR_MIN and n > 1:
        _team_started = 1
        return n
    return 1


cdef inline const floating *f_row(const floating *p, Py_ssize_t s, Py_ssize_t n, floating *buf) noexcept nogil:
    """The row ``p[0], p[s], ...`` as a contiguous pointer: ``p`` itself, or gathered into ``buf``."""
    if s == 1:
        return p
    fl_gather(p, s, buf, n)
    return buf


cdef inline void f_fill_strided(floating *p, Py_ssize_t s, Py_ssize_t n, floating v) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        p[j * s] = v


cdef inline double _shift(double m) noexcept nogil:
    # the row max as shift, 0 when it is not finite: a row holding +inf then sums to +inf, a
    # row of only -inf to 0 (log -> -inf) -- never inf - inf
    return m if isfinite(m) else 0.0


# ----------------------------------------------------------------------------- row panels
# Row-wise drivers hand each OpenMP task a panel of P consecutive rows.  An operand whose class
# axis is contiguous is used in place; any other one is gathered into a thread-local panel
# buffer of P contiguous rows (a strided output is computed there and scattered back).  P is 1
# unless some strided operand has its rows closer together than its classes (Fortran order,
# a class axis moved last): then P rows share every cache line read, instead of one element
# per line.

cdef struct Opnd:
    char *base        # address of element (0, 0)
    Py_ssize_t rs     # row stride, in elements
    Py_ssize_t es     # class stride, in elements
    bint present


cdef inline Opnd _opnd(char *base, Py_ssize_t rs_bytes, Py_ssize_t es_bytes, Py_ssize_t isz, bint present) noexcept nogil:
    cdef Opnd o
    o.base = base
    o.rs = rs_bytes // isz  # the Python layer guarantees strides that are whole elements
    o.es = es_bytes // isz
    o.present = present
    return o


cdef inline bint _strided(Opnd o) noexcept nogil:
    return o.present and o.es != 1


cdef Py_ssize_t _panel_rows(Opnd a, Opnd b, Opnd o, Py_ssize_t c, Py_ssize_t isz, int nbuf) noexcept nogil:
    """Rows per panel: a cache line's worth when a strided operand has rows closer than classes."""
    cdef Py_ssize_t P = 1
    cdef Opnd ops[3]
    cdef int k
    ops[0] = a
    ops[1] = b
    ops[2] = o
    for k in range(3):
        if _strided(ops[k]) and (ops[k].rs if ops[k].rs >= 0 else -ops[k].rs) < (ops[k].es if ops[k].es >= 0 else -ops[k].es):
            P = 64 // isz
    while P > 1 and P * c * isz * nbuf > (8 << 20):  # keep the panel buffers within a few MB
        P //= 2
    return P


cdef inline void *_panel_alloc(bint need, size_t nbytes, int *perr) noexcept nogil:
    """A thread's panel buffers: ``nbytes`` when some operand is strided (``need``), else NULL;
    a failed allocation sets ``perr[0]`` (the driver raises MemoryError after the region)."""
    cdef void *p = NULL
    if need:
        p = malloc(nbytes)
        if p == NULL:
            perr[0] = 1
    return p


cdef inline floating *_prow(Opnd o, Py_ssize_t i, Py_ssize_t r, Py_ssize_t c, floating *panel) noexcept nogil:
    """Row ``i`` (``r``-th of its panel) of operand ``o`` as a contiguous pointer."""
    if o.es == 1:
        return <floating *>(o.base + i * o.rs * <Py_ssize_t>sizeof(floating))
    return panel + r * c


cdef inline void _pgather(Opnd o, Py_ssize_t i0, Py_ssize_t pn, Py_ssize_t c, floating *panel) noexcept nogil:
    cdef floating *p
    if _strided(o):
        p = <floating *>o.base + i0 * o.rs
        fl_gather_panel(p, o.rs, o.es, pn, c, panel)


cdef inline void _pscatter(Opnd o, Py_ssize_t i0, Py_ssize_t pn, Py_ssize_t c, const floating *panel) noexcept nogil:
    cdef floating *p
    if _strided(o):
        p = <floating *>o.base + i0 * o.rs
        fl_scatter_panel(panel, p, o.rs, o.es, pn, c)


cdef inline char *_base2(const floating[:, :] a) noexcept nogil:
    return <char *>&a[0, 0] if a.shape[0] > 0 and a.shape[1] > 0 else NULL


# ----------------------------------------------------------------------------- few classes
# With few classes a row is too short for the row loops to vectorize (C = 10: ten-iteration
# select-max and add chains, latency bound): blocks of rows are processed in column layout
# instead, every loop running over the rows of the block (fl_ce_cols, fl_norm_cols in
# fl_math.hpp).  Rows that are adjacent in memory (row stride 1: Fortran order, e.g. the
# transpose of a C-contiguous (C, N) array) are already in that layout and are read in place,
# without the transpose (the row kernels would gather them first).  The class counts up to
# which the column kernels win were measured on AVX2 (one thread, 2.6M logits): in C order (the
# transposes cost) cross-entropy with gradient up to ~100 classes in float32 / ~48 in float64
# (5x faster at C = 10, 10x at C = 2), logsumexp ~48 / ~32, softmax and log-softmax ~32 / ~16
# (5x / 2x faster at C = 10); in Fortran order up to C * itemsize ~8 KB for all of them (7x
# faster at C = 10, ~1.2x at C = 1000).
cdef enum:
    CB_CE = 0
    CB_LSE = 1
    CB_SOFTMAX = 2
cdef Py_ssize_t[3] _CB_MAXC_F = [96, 48, 32]  # C order, float32, by CB_* kernel
cdef Py_ssize_t[3] _CB_MAXC_D = [48, 32, 16]  # C order, float64
cdef Py_ssize_t _CB_FMAX_BYTES = 8192  # Fortran order: C * itemsize at most this


cdef inline bint _use_cols(Opnd ox, Py_ssize_t c, Py_ssize_t isz, int kernel) noexcept nogil:
    if ox.rs == 1:
        return c * isz <= _CB_FMAX_BYTES
    return c <= (_CB_MAXC_F[kernel] if isz == 4 else _CB_MAXC_D[kernel])


cdef inline Py_ssize_t _cb_rows(Opnd ox, Py_ssize_t c, Py_ssize_t isz) noexcept nogil:
    """Rows per column block (measured): transposed blocks of ~1-8 KB of logits keep the
    scratch in L1 and the row streams regular; Fortran-order columns are read in runs of 128
    rows (512 B in float32), long enough for the hardware prefetchers."""
    if ox.rs == 1:
        return 128
    return (32 if isz == 4 else 16) * (2 if c > 16 else 1)


cdef _norm_cols(Opnd ox, Py_ssize_t c, Py_ssize_t n, int mode, floating *op, Py_ssize_t ors,
                Py_ssize_t ocs):
    """Log-sum-exp / softmax / log-softmax (``mode``) through ``fl_norm_cols`` over row blocks;
    the output at ``op`` with strides ``ors``, ``ocs`` (elements)."""
    cdef Py_ssize_t sb = _cb_rows(ox, c, sizeof(floating)), nblk = (n + sb - 1) // sb, ib, i0, nr
    cdef size_t nbytes = fl_cols_scratch(c, sb, sizeof(floating), 0)
    cdef const floating *xp = <const floating *>ox.base
    cdef int nt = _team(n * c)
    cdef void *raw = NULL
    cdef void *scr
    cdef int errflag = 0
    cdef int *perr = &errflag
    with nogil, parallel(num_threads=nt):
        scr = NULL
        raw = malloc(nbytes + 64)
        if raw == NULL:
            perr[0] = 1
        else:
            scr = <void *>((<uintptr_t>raw + 63) & ~(<uintptr_t>63))  # whole cache lines
            for ib in prange(nblk, schedule="static"):
                i0 = ib * sb
                nr = sb if n - i0 > sb else n - i0
                fl_norm_cols(nr, c, xp + i0 * ox.rs, ox.rs, ox.es, mode, op + i0 * ors, ors,
                               ocs, sb, scr)
        free(raw)
    if perr[0]:
        raise MemoryError("fastloss cython backend: cannot allocate a row-block buffer")


cdef _ce_cols(Opnd ox, Opnd og, Py_ssize_t c, Py_ssize_t n, const int64_t[:] target,
              const floating *w, double wsum, int64_t ignore_index, double eps, double z,
              floating cap, double[:] loss, bint loss_sum, double *lsep, Py_ssize_t lss, object gscale):
    """Hard-target cross-entropy through ``fl_ce_cols`` over blocks of ``_cb_rows`` rows;
    ``lsep`` (stride ``lss``): the row lse output, or NULL.  With ``loss_sum`` each block's row
    losses go to a scratch row of its thread and are summed there (``fl_dsum``, vectorized),
    the blocks' sums then in block order (NumPy's pairwise sum): the total is returned, the
    same for every thread count, and no N row losses are written and read back.  (A sum per
    256 rows instead of per 32-row block measured the same: 1.50-1.55 ms either way at
    262144 x 10 float32, Zen 4.)"""
    cdef Py_ssize_t sb = _cb_rows(ox, c, sizeof(floating)), nblk = (n + sb - 1) // sb, ib, i0, nr
    cdef size_t nbytes = fl_cols_scratch(c, sb, sizeof(floating), cap != 0 and gscale is not None)
    cdef double[::1] partv
    cdef double *pp = NULL
    cdef double *lrow
    part = None
    if loss_sum:
        part = partv = np.empty(nblk)  # (np.sum of the array: of the memoryview it was ~40 us)
        pp = &partv[0]
    cdef const double[:] gsv
    cdef const double *gsa = NULL
    cdef Py_ssize_t gss = 0
    if gscale is not None:
        gsv = gscale
        gsa = &gsv[0]
        gss = gsv.strides[0] // <Py_ssize_t>sizeof(double)
    cdef const int64_t *tg = &target[0]
    cdef Py_ssize_t ts = target.strides[0] // <Py_ssize_t>sizeof(int64_t)
    cdef double *lp = <double *>NULL if loss_sum else &loss[0]
    cdef Py_ssize_t ls = 1 if loss_sum else loss.strides[0] // <Py_ssize_t>sizeof(double)
    cdef const floating *xp = <const floating *>ox.base
    cdef floating *gp = <floating *>og.base
    cdef int nt = _team(n * c)
    cdef void *raw = NULL
    cdef void *scr
    cdef int errflag = 0
    cdef int *perr = &errflag
    with nogil, parallel(num_threads=nt):
        scr = NULL
        raw = malloc(nbytes + (sb * sizeof(double) if loss_sum else 0) + 64)
        if raw == NULL:
            perr[0] = 1
        else:
            scr = <void *>((<uintptr_t>raw + 63) & ~(<uintptr_t>63))  # whole cache lines
            lrow = <double *>(<char *>scr + nbytes)  # the block's row losses (loss_sum)
            for ib in prange(nblk, schedule="static"):
                i0 = ib * sb
                nr = sb if n - i0 > sb else n - i0
                fl_ce_cols(nr, c, xp + i0 * ox.rs, ox.rs, ox.es, tg + i0 * ts, ts, w, wsum,
                             ignore_index, eps, z, cap, lrow if loss_sum else lp + i0 * ls, ls,
                             lsep + i0 * lss if lsep != NULL else NULL, lss,
                             gsa + i0 * gss if gsa != NULL else NULL, gss,
                             gp + i0 * og.rs if gp != NULL else NULL, og.rs, og.es, sb, scr)
                if loss_sum:
                    pp[ib] = fl_dsum(lrow, nr)
        free(raw)
    if perr[0]:
        raise MemoryError("fastloss cython backend: cannot allocate a row-block buffer")
    return float(np.sum(part)) if loss_sum else None


# ----------------------------------------------------------------------------- row-wise
def logsumexp(const floating[:, :] x, floating[:] out):
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1], ip, i0, pn, r
    if n == 0:
        return
    cdef Py_ssize_t isz = sizeof(floating)
    cdef Opnd ox = _opnd(_base2(x), x.strides[0], x.strides[1], isz, c > 0)
    if c > 0 and _use_cols(ox, c, isz, CB_LSE):
        _norm_cols(ox, c, n, FL_NORM_LSE, &out[0], out.strides[0] // isz, 0)
        return
    cdef Opnd none = _opnd(NULL, 0, 0, isz, False)
    cdef Py_ssize_t P = _panel_rows(ox, none, none, c, isz, 1), npan = (n + P - 1) // P
    cdef bint need = _strided(ox)
    cdef int nt = _team(n * c)
    cdef floating *A = NULL
    cdef const floating *xr
    cdef double sh, m, s
    cdef int errflag = 0
    cdef int *perr = &errflag
    with nogil, parallel(num_threads=nt):
        A = <floating *>_panel_alloc(need, P * c * isz, perr)
        if not need or A != NULL:
            for ip in prange(npan, schedule="static"):
                i0 = ip * P
                pn = P if n - i0 > P else n - i0
                _pgather(ox, i0, pn, c, A)
                for r in range(pn):
                    xr = _prow(ox, i0 + r, r, c, A)
                    m = fl_max(xr, c)
                    sh = _shift(m)
                    s = fl_sumexp(xr, <floating *>NULL, c, <floating>sh, isfinite(m))
                    out[i0 + r] = <floating>(log(s) + sh)
        free(A)
    if perr[0]:
        raise MemoryError("fastloss cython backend: cannot allocate a row buffer")


cdef inline void _softmax_row(const floating *x, Py_ssize_t sx, floating *o, Py_ssize_t so,
                              Py_ssize_t c, bint logsm, floating *buf) noexcept nogil:
    cdef const floating *xr = f_row(x, sx, c, buf)
    cdef floating *oc = o if so == 1 else buf  # buf may hold xr: exp/sub write index j after reading it
    cdef double m = fl_max(xr, c), sh = _shift(m), s
    cdef bint fin = isfinite(m)
    if m == INFINITY:
        # no softmax / log-softmax for a row holding +inf: NaN throughout, as PyTorch gives
        # (SEMANTICS K4; e / s would give 0 or NaN at the finite entries depending on overflow,
        # (x - 0) - log(inf) NaN at the +inf and -inf elsewhere)
        f_fill_strided(oc, 1, c, <floating>NAN)
    elif logsm:
        # log p = (x - sh) - log s, never x - lse: lse = sh + log s rounds to sh for large
        # logits and would lose the O(1) part (see fl_sub2 in fl_math.hpp)
        s = fl_sumexp(xr, <floating *>NULL, c, <floating>sh, fin)
        fl_sub2(xr, oc, c, <floating>sh, <floating>log(s))
    else:
        s = fl_sumexp(xr, oc, c, <floating>sh, fin)  # stores e = exp(x - sh), then scales by 1/s
        fl_scale_axpy(oc, c, <floating>(1.0 / s), <const floating *>NULL, <floating>0)
    if so != 1:
        fl_scatter(oc, o, so, c)


cdef _softmax_impl(const floating[:, :] x, floating[:, :] out, bint logsm):
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1], ip, i0, pn, r
    if n == 0 or c == 0:
        return
    cdef Py_ssize_t isz = sizeof(floating)
    cdef Opnd ox = _opnd(_base2(x), x.strides[0], x.strides[1], isz, True)
    cdef Opnd oo = _opnd(<char *>&out[0, 0], out.strides[0], out.strides[1], isz, True)
    if _use_cols(ox, c, isz, CB_SOFTMAX):
        _norm_cols(ox, c, n, FL_NORM_LOGSOFTMAX if logsm else FL_NORM_SOFTMAX,
                   <floating *>oo.base, oo.rs, oo.es)
        return
    cdef Opnd none = _opnd(NULL, 0, 0, isz, False)
    cdef Py_ssize_t P = _panel_rows(ox, none, oo, c, isz, 1), npan = (n + P - 1) // P
    cdef bint need = _strided(ox) or _strided(oo)
    cdef int nt = _team(n * c)
    cdef floating *A = NULL
    cdef int errflag = 0
    cdef int *perr = &errflag
    with nogil, parallel(num_threads=nt):
        A = <floating *>_panel_alloc(need, P * c * isz, perr)
        if not need or A != NULL:
            for ip in prange(npan, schedule="static"):
                i0 = ip * P
                pn = P if n - i0 > P else n - i0
                _pgather(ox, i0, pn, c, A)
                for r in range(pn):
                    # a strided output is built in the panel, in place of its (gathered) input
                    _softmax_row(_prow(ox, i0 + r, r, c, A), 1, _prow(oo, i0 + r, r, c, A), 1, c,
                                 logsm, <floating *>NULL)
                _pscatter(oo, i0, pn, c, A)
        free(A)
    if perr[0]:
        raise MemoryError("fastloss cython backend: cannot allocate a row buffer")


def softmax(const floating[:, :] x, floating[:, :] out):
    _softmax_impl(x, out, False)


def log_softmax(const floating[:, :] x, floating[:, :] out):
    _softmax_impl(x, out, True)


cdef inline void _smb_row(const floating *g, Py_ssize_t sg, const floating *y, Py_ssize_t sy,
                          floating *o, Py_ssize_t so, Py_ssize_t c, bint logsm,
                          floating *buf) noexcept nogil:
    # buf: 2 c elements; g goes to buf[:c], y to buf[c:], a strided output is built in buf[:c]
    cdef const floating *gr = f_row(g, sg, c, buf)
    cdef const floating *yr = f_row(y, sy, c, buf + c)
    cdef floating *oc = o
    if so != 1:
        oc = buf
    if logsm:
        fl_lsmb(gr, yr, oc, c, <floating>fl_dot(gr, <const floating *>NULL, c))
    else:
        fl_smb(gr, yr, oc, c, <floating>fl_dot(gr, yr, c))
    if so != 1:
        fl_scatter(oc, o, so, c)


cdef _smb_impl(const floating[:, :] g, const floating[:, :] y, floating[:, :] out, bint logsm):
    cdef Py_ssize_t n = y.shape[0], c = y.shape[1], ip, i0, pn, r
    if n == 0 or c == 0:
        return
    cdef Py_ssize_t isz = sizeof(floating)
    cdef Opnd og = _opnd(_base2(g), g.strides[0], g.strides[1], isz, True)
    cdef Opnd oy = _opnd(_base2(y), y.strides[0], y.strides[1], isz, True)
    cdef Opnd oo = _opnd(<char *>&out[0, 0], out.strides[0], out.strides[1], isz, True)
    cdef Py_ssize_t P = _panel_rows(og, oy, oo, c, isz, 2), npan = (n + P - 1) // P
    cdef bint need = _strided(og) or _strided(oy) or _strided(oo)
    cdef int nt = _team(n * c)
    cdef floating *A = NULL  # g panel (and a strided output, built in place of g)
    cdef floating *B = NULL  # y panel
    cdef int errflag = 0
    cdef int *perr = &errflag
    with nogil, parallel(num_threads=nt):
        A = <floating *>_panel_alloc(need, 2 * P * c * isz, perr)
        B = A + P * c if A != NULL else NULL
        if not need or A != NULL:
            for ip in prange(npan, schedule="static"):
                i0 = ip * P
                pn = P if n - i0 > P else n - i0
                _pgather(og, i0, pn, c, A)
                _pgather(oy, i0, pn, c, B)
                for r in range(pn):
                    _smb_row(_prow(og, i0 + r, r, c, A), 1, _prow(oy, i0 + r, r, c, B), 1,
                             _prow(oo, i0 + r, r, c, A), 1, c, logsm, <floating *>NULL)
                _pscatter(oo, i0, pn, c, A)
        free(A)
    if perr[0]:
        raise MemoryError("fastloss cython backend: cannot allocate a row buffer")


def softmax_backward(const floating[:, :] g, const floating[:, :] y, floating[:, :] out):
    _smb_impl(g, y, out, False)


def log_softmax_backward(const floating[:, :] g, const floating[:, :] y, floating[:, :] out):
    _smb_impl(g, y, out, True)


cdef inline double _row_lse(const floating *xr, Py_ssize_t c, floating cap, floating *S) noexcept nogil:
    """The log-sum-exp of a row whose loss is not computed (an ignored row), for the lse output:
    the row kernels' max and sum of exp, of the capped logits (into ``S``) when ``cap != 0``."""
    cdef double m
    if cap != 0:
        m = fl_cap_max(xr, S, <floating *>NULL, c, cap)
        xr = S
    else:
        m = fl_max(xr, c)
    cdef double sh = _shift(m)
    cdef double s = fl_sumexp(xr, <floating *>NULL, c, <floating>sh, isfinite(m))
    if s < 2.0 and isfinite(m):  # the max dominates: its term apart (see fl_sumexp_apart)
        s = fl_sumexp_apart(xr, <const floating *>NULL, c, <floating>sh)
    return log(s) + sh


cdef inline double _ce_row(const floating *xr, Py_ssize_t c, Py_ssize_t t, const floating *w,
                           double wsum, double eps, double z, floating cap, double gs,
                           floating *gc, floating *S, double *plse) noexcept nogil:
    """One hard-target row: returns its float64 loss, writes ``gs * dloss/dx`` to ``gc`` (if not
    NULL) and the row's log-sum-exp to ``plse[0]``.  ``xr``, ``gc``: contiguous rows (``gc`` may
    be ``xr``: in place).

    ``loss = (1-eps) w_t (lse - x_t) + eps/C sum_c w_c (lse - x_c) + z lse^2`` with
    ``lse = sh + L``, ``L = log sum exp(x - sh)``, ``lse - x_c = L - (x_c - sh)``: no
    cancellation of two large numbers when the logits are large.  The smoothing sum is
    evaluated as ``wsum L - sum_c w_c (x_c - sh)`` with a term ``x_c - sh == 0`` taken as 0 (an
    infinite weight at the row max gives +inf, as the per-element sum does, not inf * 0 = NaN:
    SEMANTICS K2), and only when ``eps != 0`` (K1: with ``eps == 0`` no smoothing term is
    evaluated, so a NaN/inf weight of a class no target uses cannot leak).  With a finite row max the
    exponentials are stored into the gradient row during the sum and only rescaled afterwards
    (one exp per element); otherwise the reference's ``exp(x - lse)`` is used as it is.

    Soft cap (``cap != 0``; ``S``: a thread's row buffer of ``c`` elements): the first pass
    (``fl_cap_max``, in place of ``fl_max``) writes ``x' = cap tanh(x / cap)`` into ``S`` and the
    cap's derivative into the gradient row -- it reads the whole row of ``x`` before the
    gradient overwrites it -- and every later pass runs on ``S`` (in cache): the exponentials
    are stored into ``S``, and the gradient pass multiplies by the derivative it finds in ``gc``
    (``fl_cap_grad``).  The target's element is redone from ``S`` with the derivative saved
    before: ``((e_t a - b w_t) - gs (1-eps) w_t) d_t``, the reference's order.
    """
    cdef double xt, dt = 0.0
    cdef double m
    if cap != 0:
        m = fl_cap_max(xr, S, gc, c, cap)
        xr = S
        if gc != NULL:
            dt = gc[t]
    else:
        m = fl_max(xr, c)
    xt = xr[t]  # read before anything is written: gc may be x (in place)
    cdef double wt = w[t] if w != NULL else 1.0
    cdef bint fin = isfinite(m)
    cdef double sh = m if fin else 0.0
    cdef double lin = 0.0, s, L, lse, row, a, ec = eps / c
    cdef floating *e = gc if cap == 0 else S  # where the exponentials are stored
    cdef const floating *ws = w if eps != 0.0 else NULL
    cdef floating ca, cb
    if eps != 0.0:
        lin = fl_wsum_shift(xr, w, c, <floating>sh)
    s = fl_sumexp(xr, e if (fin and gc != NULL) else <floating *>NULL, c, <floating>sh, fin)
    if s < 2.0 and fin:
        # the max dominates the sum (a loss ~log s, small): the max's term, exactly 1, must not
        # sit in a float32 lane that rounds every later term at ulp(1) (fl_sumexp_apart); from
        # the stored exponentials when there are some
        s = fl_sumexp_apart(xr, e if gc != NULL else <floating *>NULL, c, <floating>sh)
    L = log(s)
    lse = L + sh
    plse[0] = lse
    row = (1.0 - eps) * wt * (L - (xt - sh))
    if eps != 0.0:
        row += ec * (wsum * L - lin)
    if z != 0.0:
        row += z * lse * lse
    if gc != NULL:
        # eps == 0: eps/C sum(w) is not evaluated at all (SEMANTICS K1: 0 * a NaN/inf weight of a
        # class no target uses must not leak into the gradient)
        a = (1.0 - eps) * wt + 2.0 * z * lse
        if eps != 0.0:
            a += ec * wsum
        cb = <floating>(gs * ec)
        if cap == 0:
            if fin:
                fl_scale_axpy(gc, c, <floating>(gs * a / s), ws, cb)
            else:
                fl_expaxpy(xr, gc, c, <floating>lse, <floating>(gs * a), ws, cb)
            gc[t] -= <floating>(gs * (1.0 - eps) * wt)
        elif fin:
            ca = <floating>(gs * a / s)
            fl_cap_grad(S, gc, c, ca, ws, cb)
            gc[t] = ((S[t] * ca - cb * (ws[t] if ws != NULL else <floating>1))
                     - <floating>(gs * (1.0 - eps) * wt)) * <floating>dt
        else:  # a row of only NaN (x' is finite otherwise): the exponentials from x', then d
            fl_expaxpy(S, S, c, <floating>lse, <floating>(gs * a), ws, cb)
            S[t] -= <floating>(gs * (1.0 - eps) * wt)
            fl_cap_grad(S, gc, c, <floating>1, <const floating *>NULL, <floating>0)
    return row


def cross_entropy(const floating[:, :] x, const int64_t[:] target, const floating[::1] weight,
                  bint has_weight, double wsum, int64_t ignore_index, double label_smoothing,
                  double z_loss, double softcap, double[:] loss, bint loss_sum, double[:] lse, bint has_lse,
                  floating[:, :] grad, bint has_grad, const double[:] gscale):
    """Hard-target cross-entropy rows (see ``_ce_row``); ignored rows: loss 0, gradient 0, and
    their lse (when ``has_lse``) from the same max and sum of exp.  With ``loss_sum``
    (``loss`` a dummy) the float64 total of the row losses is returned instead of the rows
    (summed in an order fixed by the shape: the same for every thread count)."""
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1], ip, i0, pn, r, i
    if n == 0:
        return 0.0 if loss_sum else None
    cdef Py_ssize_t isz = sizeof(floating)
    cdef floating cap = <floating>softcap  # rounded to the compute dtype, as the reference
    cdef Opnd ox = _opnd(_base2(x), x.strides[0], x.strides[1], isz, c > 0)
    cdef Opnd og = _opnd(_base2(grad) if has_grad else NULL, grad.strides[0] if has_grad else 0,
                         grad.strides[1] if has_grad else isz, isz, has_grad and c > 0)
    cdef const floating *w = &weight[0] if has_weight else NULL
    cdef double *lsep = &lse[0] if has_lse else NULL
    cdef Py_ssize_t lss = lse.strides[0] // <Py_ssize_t>sizeof(double) if has_lse else 0
    if c > 0 and _use_cols(ox, c, isz, CB_CE):
        return _ce_cols(ox, og, c, n, target, w, wsum, ignore_index, label_smoothing, z_loss, cap, loss,
                        loss_sum, lsep, lss, gscale if has_grad else None)
    if loss_sum:  # the row kernels write the rows (8 bytes a row against C logits), summed after
        loss = np.empty(n)
    cdef Opnd none = _opnd(NULL, 0, 0, isz, False)
    cdef Py_ssize_t P = _panel_rows(ox, none, og, c, isz, 1), npan = (n + P - 1) // P
    cdef bint need = _strided(ox) or _strided(og)
    # per thread: the x panel when an operand is strided, then the capped row (soft cap)
    cdef Py_ssize_t npanel = P * c if need else 0
    cdef Py_ssize_t nbuf = npanel + (c if cap != 0 else 0)
    cdef int nt = _team(n * c)
    cdef floating *A = NULL  # x panel (and a strided gradient, built in place of x)
    cdef floating *S = NULL  # the capped row
    cdef floating *gr
    cdef const floating *xr
    cdef double rl
    cdef int64_t t
    cdef int errflag = 0
    cdef int *perr = &errflag
    with nogil, parallel(num_threads=nt):
        A = <floating *>_panel_alloc(nbuf > 0, nbuf * isz, perr)
        S = A + npanel if cap != 0 and A != NULL else NULL
        if nbuf == 0 or A != NULL:
            for ip in prange(npan, schedule="static"):
                i0 = ip * P
                pn = P if n - i0 > P else n - i0
                _pgather(ox, i0, pn, c, A)
                for r in range(pn):
                    i = i0 + r
                    t = target[i]
                    xr = _prow(ox, i, r, c, A)
                    gr = _prow(og, i, r, c, A) if og.present else NULL
                    if t == ignore_index or t < 0 or t >= c:
                        if has_lse:  # before the gradient row (maybe x itself) is filled
                            lsep[i * lss] = _row_lse(xr, c, cap, S)
                        # a target outside [0, C): the public layer raises IndexError before
                        # calling; a direct caller gets NaN for the row instead of an
                        # out-of-bounds read
                        loss[i] = 0.0 if t == ignore_index else NAN
                        if gr != NULL:
                            f_fill_strided(gr, 1, c, <floating>0 if t == ignore_index else <floating>NAN)
                    else:
                        rl = 0.0  # assigned in the loop: thread-private (its address is passed)
                        loss[i] = _ce_row(xr, c, t, w, wsum, label_smoothing, z_loss, cap,
                                          gscale[i] if has_grad else 0.0, gr, S, &rl)
                        if has_lse:
                            lsep[i * lss] = rl
                _pscatter(og, i0, pn, c, A)
        free(A)
    if perr[0]:
        raise MemoryError("fastloss cython backend: cannot allocate a row buffer")
    return float(np.sum(loss)) if loss_sum else None


def cross_entropy_shard(const floating[:, :] x, const int64_t[:] target, const floating[::1] weight,
                        bint has_weight, double wsum, int64_t ignore_index, double label_smoothing,
                        double z_loss, double softcap, const double[:] lse, int64_t class_offset,
                        int64_t num_classes, double[:] loss, floating[:, :] grad, bint has_grad,
                        const double[:] gscale):
    """Hard-target cross-entropy over a shard of the classes: ``x`` holds the classes
    ``[class_offset, class_offset + C)`` of ``num_classes`` and ``lse`` is the given global row
    log-sum-exp.  One pass per row (``fl_ce_shard_row``: ``exp(x' - lse)``, no max, no sum of
    exps), rows in parallel; ``weight`` is the whole ``(num_classes,)`` vector (``has_weight``)
    and ``wsum`` its float64 sum (``num_classes`` without weights).  Ignored rows: loss 0 and a
    gradient of exact zeros; a target outside ``[0, num_classes)`` that is not ``ignore_index``
    (which the public layer rejects first): a NaN row, never an out-of-bounds read."""
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1], ip, i0, pn, r, i
    if n == 0:
        return
    cdef Py_ssize_t isz = sizeof(floating)
    cdef floating cap = <floating>softcap  # rounded to the compute dtype, as the reference
    cdef Opnd ox = _opnd(_base2(x), x.strides[0], x.strides[1], isz, c > 0)
    cdef Opnd og = _opnd(_base2(grad) if has_grad else NULL, grad.strides[0] if has_grad else 0,
                         grad.strides[1] if has_grad else isz, isz, has_grad and c > 0)
    cdef const floating *w = &weight[0] if has_weight else NULL
    cdef const floating *ws = w + class_offset if has_weight else NULL  # this shard's weights
    cdef double ec = label_smoothing / <double>num_classes
    cdef int first = class_offset == 0
    cdef Opnd none = _opnd(NULL, 0, 0, isz, False)
    cdef Py_ssize_t P = _panel_rows(ox, none, og, c, isz, 1), npan = (n + P - 1) // P
    # per thread: the x panel when an operand is strided (a strided gradient is built in place
    # of x there); no capped-row buffer: the pass caps each element where it reads it
    cdef bint need = _strided(ox) or _strided(og)
    cdef int nt = _team(n * c)
    cdef floating *A = NULL
    cdef floating *gr
    cdef const floating *xr
    cdef int64_t t, tl
    cdef double wt
    cdef int errflag = 0
    cdef int *perr = &errflag
    with nogil, parallel(num_threads=nt):
        A = <floating *>_panel_alloc(need, P * c * isz, perr)
        if not need or A != NULL:
            for ip in prange(npan, schedule="static"):
                i0 = ip * P
                pn = P if n - i0 > P else n - i0
                _pgather(ox, i0, pn, c, A)
                for r in range(pn):
                    i = i0 + r
                    t = target[i]
                    xr = _prow(ox, i, r, c, A)
                    gr = _prow(og, i, r, c, A) if og.present else NULL
                    if t == ignore_index or t < 0 or t >= num_classes:
                        loss[i] = 0.0 if t == ignore_index else NAN
                        if gr != NULL:
                            f_fill_strided(gr, 1, c, <floating>0 if t == ignore_index else <floating>NAN)
                    else:
                        tl = t - class_offset
                        if tl < 0 or tl >= c:
                            tl = -1  # the target lies in another shard
                        wt = w[t] if w != NULL else 1.0
                        loss[i] = fl_ce_shard_row(xr, gr, c, tl, ws, wt, wsum, label_smoothing, ec,
                                                  z_loss, cap, lse[i], first,
                                                  gscale[i] if has_grad else 0.0)
                _pscatter(og, i0, pn, c, A)
        free(A)
    if perr[0]:
        raise MemoryError("fastloss cython backend: cannot allocate a row buffer")


cdef inline double _ce_soft_row(const floating *xr, const floating *yr, Py_ssize_t c,
                                const floating *w, double eps, double z, floating cap, double gs,
                                floating *g, floating *S, double *plse) noexcept nogil:
    """One soft-target row: ``sum_c yw_c (lse - x_c) + z lse^2``, ``yw = ((1-eps) y + eps/C) w``,
    evaluated as ``sum(yw) L - sum_{yw != 0, x_c != sh} yw (x_c - sh)`` (SEMANTICS K3, K3b, see
    fl_soft_terms);
    gradient ``gs * (softmax(x) * sum(yw) + 2 z lse softmax(x) - yw)`` into ``g`` (if not NULL;
    may be ``xr``), the row's log-sum-exp into ``plse[0]``.  Soft cap (``cap != 0``): as in
    ``_ce_row``, ``x'`` into the row buffer ``S``, the cap's derivative into ``g``, which
    ``fl_soft_grad`` multiplies in."""
    cdef double m
    if cap != 0:
        m = fl_cap_max(xr, S, g, c, cap)
        xr = S
    else:
        m = fl_max(xr, c)
    cdef bint fin = isfinite(m)
    cdef double sh = m if fin else 0.0
    cdef double s = fl_sumexp(xr, <floating *>NULL, c, <floating>sh, fin)
    if s < 2.0 and fin:  # the max dominates: its term apart (see _ce_row, fl_sumexp_apart)
        s = fl_sumexp_apart(xr, <const floating *>NULL, c, <floating>sh)
    cdef double L = log(s), lse = L + sh, ysum = 0.0, row, a
    cdef double a1 = 1.0 - eps, a0 = eps / c
    cdef const floating *dc = g if cap != 0 else NULL
    plse[0] = lse
    row = fl_soft_terms(xr, yr, w, c, <floating>sh, L, a1, a0, &ysum)
    if z != 0.0:
        row += z * lse * lse
    if g != NULL:
        a = ysum + 2.0 * z * lse
        if fin:
            fl_soft_grad(xr, yr, w, g, c, <floating>sh, <floating>(a / s), <floating>a1, <floating>a0,
                         <floating>gs, 1, dc)
        else:
            fl_soft_grad(xr, yr, w, g, c, <floating>lse, <floating>a, <floating>a1, <floating>a0,
                         <floating>gs, 0, dc)
    return row


def cross_entropy_soft(const floating[:, :] x, const floating[:, :] target, const floating[::1] weight,
                       bint has_weight, double label_smoothing, double z_loss, double softcap,
                       double[:] loss, double[:] lse, bint has_lse, floating[:, :] grad,
                       bint has_grad, const double[:] gscale):
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1], ip, i0, pn, r, i
    if n == 0:
        return
    cdef Py_ssize_t isz = sizeof(floating)
    cdef floating cap = <floating>softcap
    # the soft kernels read w[j] unconditionally (vectorizable): ones when unweighted
    if not has_weight:
        weight = np.ones(max(c, 1), np.float32 if floating is float else np.float64)
    cdef const floating *w = &weight[0]
    cdef double *lsep = &lse[0] if has_lse else NULL
    cdef Py_ssize_t lss = lse.strides[0] // <Py_ssize_t>sizeof(double) if has_lse else 0
    cdef Opnd ox = _opnd(_base2(x), x.strides[0], x.strides[1], isz, c > 0)
    cdef Opnd oy = _opnd(_base2(target), target.strides[0], target.strides[1], isz, c > 0)
    cdef Opnd og = _opnd(_base2(grad) if has_grad else NULL, grad.strides[0] if has_grad else 0,
                         grad.strides[1] if has_grad else isz, isz, has_grad and c > 0)
    cdef Py_ssize_t P = _panel_rows(ox, oy, og, c, isz, 2), npan = (n + P - 1) // P
    cdef bint need = _strided(ox) or _strided(oy) or _strided(og)
    # per thread: the x and target panels when an operand is strided, then the capped row
    cdef Py_ssize_t npanel = 2 * P * c if need else 0
    cdef Py_ssize_t nbuf = npanel + (c if cap != 0 else 0)
    cdef int nt = _team(n * c)
    cdef floating *A = NULL  # x panel (and a strided gradient, built in place of x)
    cdef floating *B = NULL  # target panel
    cdef floating *S = NULL  # the capped row
    cdef double rl
    cdef int errflag = 0
    cdef int *perr = &errflag
    with nogil, parallel(num_threads=nt):
        A = <floating *>_panel_alloc(nbuf > 0, nbuf * isz, perr)
        B = A + P * c if A != NULL and need else NULL
        S = A + npanel if cap != 0 and A != NULL else NULL
        if nbuf == 0 or A != NULL:
            for ip in prange(npan, schedule="static"):
                i0 = ip * P
                pn = P if n - i0 > P else n - i0
                _pgather(ox, i0, pn, c, A)
                _pgather(oy, i0, pn, c, B)
                for r in range(pn):
                    i = i0 + r
                    rl = 0.0  # assigned in the loop: thread-private (its address is passed)
                    loss[i] = _ce_soft_row(_prow(ox, i, r, c, A), _prow(oy, i, r, c, B), c, w,
                                           label_smoothing, z_loss, cap,
                                           gscale[i] if has_grad else 0.0,
                                           _prow(og, i, r, c, A) if og.present else NULL, S, &rl)
                    if has_lse:
                        lsep[i * lss] = rl
                _pscatter(og, i0, pn, c, A)
        free(A)
    if perr[0]:
        raise MemoryError("fastloss cython backend: cannot allocate a row buffer")


# ----------------------------------------------------------------------------- elementwise
# Operand slots of the elementwise driver: inputs 0 first input, 1 target, 2 weight / var,
# 3 pos_weight, 4 grad_output; outputs 5 loss, 6 grad, 7 grad_var.
cdef enum:
    NIN = 5
    NOP = 8

cdef enum:
    K_BCE_LOGITS = 0
    K_BCE = 1
    K_KL = 2
    K_MSE = 3
    K_GNLL = 4

KIND = {"bce_with_logits": K_BCE_LOGITS, "bce": K_BCE, "kl_div": K_KL, "mse": K_MSE, "gaussian_nll": K_GNLL}


cdef double _ew_task(int kind, Py_ssize_t i, Py_ssize_t j0, Py_ssize_t nb,
                     char **base, Py_ssize_t *rs, Py_ssize_t *es, bint *present,
                     floating *bufs, const floating *ones, double gs, double p1, double p2,
                     int flag) noexcept nogil:
    """Compute elements ``[j0, j0 + nb)`` of row ``i``; return the float64 sum of their loss."""
    cdef floating *op[NOP]
    cdef bint direct[NOP]
    cdef Py_ssize_t k, s
    cdef char *p
    cdef double tot = 0.0
    cdef int bsize = FL_BLOCK
    for k in range(NOP):
        op[k] = NULL
        direct[k] = True
        if present[k]:
            p = base[k] + i * rs[k] + j0 * es[k]
            s = es[k] // <Py_ssize_t>sizeof(floating)
            if s == 1:
                op[k] = <floating *>p
            else:
                direct[k] = False
                op[k] = bufs + k * bsize
                if k < NIN:
                    fl_gather(<const floating *>p, s, op[k], nb)
        elif k == 2 or k == 3 or k == 4:
            # absent weight / grad_output: ones (exact factors); absent pos_weight: ones that
            # are never used (has_pw = 0) but keep the vectorized loop free of NULL loads
            op[k] = <floating *>ones
        elif k == 5:
            op[k] = bufs + k * bsize  # the loss is needed for the sum even when not stored
    if kind == K_BCE_LOGITS:
        tot = fl_bce_logits(nb, op[0], op[1], op[2], op[3], present[3], op[5], op[6], op[4], <floating>gs)
    elif kind == K_BCE:
        tot = fl_bce(nb, op[0], op[1], op[2], op[5], op[6], op[4], <floating>gs)
    elif kind == K_KL:
        tot = fl_kl(nb, op[0], op[1], flag, op[5], op[6], op[4], <floating>gs)
    elif kind == K_MSE:
        tot = fl_mse(nb, op[0], op[1], op[5], op[6], op[4], <floating>gs)
    else:
        tot = fl_gnll(nb, op[0], op[1], op[2], <floating>p1, <floating>p2, op[5], op[6], op[7], op[4], <floating>gs)
    for k in range(NIN, NOP):
        if present[k] and not direct[k]:
            fl_scatter(op[k], <floating *>(base[k] + i * rs[k] + j0 * es[k]),
                      es[k] // <Py_ssize_t>sizeof(floating), nb)
    return tot


cdef double _ew_run(int kind, list arrays, floating dummy, double gs, double p1, double p2,
                    int flag) except? -1.0:
    """Run an elementwise kernel over (row, block) tasks; ``arrays``: NOP entries (None = absent),
    all of shape ``(R, K)`` and of the dtype of ``floating``."""
    cdef char *base[NOP]
    cdef Py_ssize_t rs[NOP]
    cdef Py_ssize_t es[NOP]
    cdef bint present[NOP]
    cdef floating[:, :] mv
    cdef const floating[:, :] cmv
    cdef Py_ssize_t r = 0, kk = 0, k, nblk, ntask, task, i, j0, nb
    cdef int bsize = FL_BLOCK
    for k in range(NOP):
        a = arrays[k]
        present[k] = a is not None
        base[k] = NULL
        rs[k] = 0
        es[k] = 0
        if a is None:
            continue
        if k < NIN:
            cmv = a
            r, kk = cmv.shape[0], cmv.shape[1]
            if r and kk:
                base[k] = <char *>&cmv[0, 0]
            rs[k], es[k] = cmv.strides[0], cmv.strides[1]
        else:
            mv = a
            if mv.shape[0] and mv.shape[1]:
                base[k] = <char *>&mv[0, 0]
            rs[k], es[k] = mv.strides[0], mv.strides[1]
    if r == 0 or kk == 0:
        return 0.0
    nblk = (kk + bsize - 1) // bsize
    ntask = r * nblk
    sums_arr = np.empty(ntask, np.float64)  # per-task sums, added in order: thread-count independent
    cdef double[::1] sums = sums_arr
    ones_arr = np.ones(bsize, np.float32 if floating is float else np.float64)
    cdef floating[::1] ones = ones_arr
    cdef const floating *onesp = &ones[0]
    cdef int nt = _team(r * kk)
    cdef floating *bufs = NULL
    cdef int errflag = 0
    cdef int *perr = &errflag
    with nogil, parallel(num_threads=nt):
        bufs = <floating *>malloc(NOP * bsize * sizeof(floating))
        if bufs == NULL:
            perr[0] = 1
        else:
            for task in prange(ntask, schedule="static"):
                i = task // nblk
                j0 = (task - i * nblk) * bsize
                nb = kk - j0
                if nb > bsize:
                    nb = bsize
                sums[task] = _ew_task(kind, i, j0, nb, base, rs, es, present, bufs, onesp, gs, p1, p2, flag)
        free(bufs)
    if perr[0]:
        raise MemoryError("fastloss cython backend: cannot allocate block buffers")
    return float(np.sum(sums_arr))


def elementwise(int kind, list arrays, double gscale, double p1, double p2, int flag, dtype):
    """Dispatch the elementwise kernel ``kind`` on float32 or float64 operands (``dtype``)."""
    if dtype == np.float32:
        return _ew_run[float](kind, arrays, 0.0, gscale, p1, p2, flag)
    return _ew_run[double](kind, arrays, 0.0, gscale, p1, p2, flag)


# ----------------------------------------------------------------------------- test helpers
def _vexp(const floating[::1] x, floating[::1] out):
    """Elementwise polynomial exp of fl_math.hpp (for accuracy tests)."""
    if x.shape[0]:
        fl_vexp(&x[0], &out[0], x.shape[0])


def _vexpn(const floating[::1] x, floating[::1] out):
    """Elementwise fl_expn of fl_math.hpp (exp of shifted logits x <= 0; for accuracy tests)."""
    if x.shape[0]:
        fl_vexpn(&x[0], &out[0], x.shape[0])


def _vsoftcap(const floating[::1] x, floating[::1] out, floating[::1] d, double cap):
    """Elementwise soft cap of fl_math.hpp: ``out = cap tanh(x / cap)``, ``d = 1 - tanh^2``
    (for accuracy tests)."""
    if x.shape[0]:
        fl_vsoftcap(&x[0], &out[0], &d[0], x.shape[0], <floating>cap)


def _vlog(const floating[::1] x, floating[::1] out):
    """Elementwise polynomial log of fl_math.hpp (for accuracy tests)."""
    if x.shape[0]:
        fl_vlog(&x[0], &out[0], x.shape[0])


def _vlog1p(const floating[::1] x, floating[::1] out):
    """Elementwise log1p of fl_math.hpp (for accuracy tests)."""
    if x.shape[0]:
        fl_vlog1p(&x[0], &out[0], x.shape[0])
