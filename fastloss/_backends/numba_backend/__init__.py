"""The ``numba`` backend: fused, parallel, SIMD CPU kernels compiled by Numba.

A package by concern: this module holds the protocol's entry points (argument types made few,
task decomposition); :mod:`._jit` the jit options, the parallel/serial twins, threads and
tasks; :mod:`._cache` the disk cache; :mod:`._rows` the row-wise kernels; :mod:`._cols` the
few-classes cross-entropy; :mod:`._elementwise` the elementwise losses; :mod:`._math` the
vectorizable exp/log; :mod:`._warmup` ahead-of-time compilation.

Implements every entry point of the backend protocol documented in
:mod:`fastloss._backends.numpy_backend`, with the same signatures and the same results (within
the accuracy contract of SPEC.md), but without temporaries and in one or two sweeps over memory.

Design
------
* **Parallelism.**  Row-wise kernels split the rows into one contiguous block per task and
  run the blocks with ``prange`` (static scheduling: equal blocks, one per thread).  Elementwise
  kernels see ``(R, K)`` arrays; their tasks are row segments of ``NUMBA_CHUNK`` elements when
  ``K`` is large (so a ``(1, 16M)`` view keeps every thread busy) and groups of whole rows
  when ``K`` is small (so a tall, thin array does not pay a task per tiny row).
* **SIMD.**  ``exp``/``log``/``log1p`` come from :mod:`._math` (polynomials plus bit
  manipulation), which LLVM vectorizes; ``math.exp`` would be a scalar libm call.  Loops are
  compiled with ``fastmath={'contract', 'arcp', 'nsz', 'reassoc', 'afn'}``: ``reassoc`` lets
  LLVM vectorize sums, and ``nnan``/``ninf`` are deliberately *not* set so that inf and NaN
  keep IEEE semantics.  A running maximum does not vectorize as a reduction without ``nnan``,
  so the row maximum keeps eight independent running maxima (``_rows._rowmax``).
* **Fused cross-entropy.**  Per row: (1) the maximum ``m`` (one read of the logits from
  memory); (2) ``e = exp(x - m)`` written into the gradient buffer while summing it in
  float64; (3) ``grad = e * (gscale * a / s) - corrections``, re-reading ``e`` from L2 (a row of
  32k float32 is 128 KiB).  The logits are read from memory once and the gradient written once,
  and ``exp`` is evaluated once per element.  Everything the loss needs from ``x`` (the target
  logit, the label-smoothing sum) is read before step (2), so ``grad`` may be ``x`` itself.
  Written in place (``grad_out=logits``; also ``softmax``/``log_softmax`` with ``out=x``),
  the kernel reads the row through the output array (a run-time ``inplace`` flag, from
  ``_same_memory``; the row helpers then get None for ``x`` and read through ``_jit._src``):
  read through ``x`` and written through ``grad``, the same memory fails the run-time overlap
  test LLVM guards each vector loop with, and the row runs the scalar loop -- 7x the time on
  2048 x 32000 float32 (hard-target cross-entropy; 5x soft targets, 7x softmax).  The flag is
  a value, not a type: no specialization more.  ``bench/asm_check.py`` checks that no
  in-place path keeps such a test.
* **Few classes (C <= 32).**  Rows that short never vectorize and their max and sum are
  latency-bound chains, so the hard-target cross-entropy takes a column-block path instead:
  blocks of 256 rows are transposed into a ``(C, 256)`` buffer and every step runs across
  rows, a few classes per pass (see ``_ce_cols_block``).  On 262144 x 10 float32 (one
  thread, forward + gradient) it takes about a quarter of the row-wise kernel's time.  The
  next block's rows are prefetched while a block is transposed (``_cols._prefetch``): the
  blocks are read in bursts, which the hardware prefetchers alone left waiting on DRAM.
* **Sharded classes** (``cross_entropy_shard``, ``_rows._k_cross_entropy_shard``).  With the
  global row lse given, a shard needs no max and no sum: one pass per row reads the logits
  and writes ``p = exp(x - lse)`` scaled into the gradient (two more short passes over the
  cached row for the label-smoothing sum and, with a cap, the capped row).  ``x - lse`` is
  taken as ``(x - hi) - lo`` with ``lse = hi + lo`` split in the dtype of ``x``
  (``_split_lse``): a float32-rounded ``lse`` would put a relative error of ``6e-8 |lse|``
  into every ``p``.  Every shard width takes this row kernel, few classes included: with no
  row max or sum there is no per-row dependency chain for a column-block path to break up
  (on 262144 x 8 float32, one thread, it still takes 1.2x the few-class unsharded kernel's
  time, 2x with smoothing and a cap: shards that narrow come from no vocabulary split).  Written in place, the row is read through the
  gradient row (``_jit._src``), never through ``x``: see ``_k_cross_entropy_shard``.
* **Stability.**  ``lse = m + log(sum(exp(x - m)))`` with ``m`` replaced by 0 when it is not
  finite: a row with ``+inf`` gives ``+inf``, a row of only ``-inf`` gives ``-inf``, never
  ``inf - inf``.  Row sums and losses are accumulated in float64.
* **Layouts.**  Every kernel indexes ``x[i, j]``, so Numba compiles a specialization for
  C-contiguous arrays (vectorized) and one for any-stride ('A') arrays (Fortran order,
  strided and broadcast views) -- never a copy.  Elementwise kernels on Fortran-ordered
  operands run on the transposes, which are C-contiguous.
* **Small calls run serially.**  Every entry kernel has a serial twin (the same Python
  function compiled without ``parallel``, see ``_kernel``); calls with fewer than
  ``NUMBA_SERIAL_MAX`` elements (:mod:`fastloss._config`), or with one thread, run it on the calling thread and never touch
  the thread pool: waking the workers costs microseconds on an idle machine and milliseconds
  on a loaded one, more than a small call computes.
* **Compilation.**  ``cache=True`` on every entry kernel and nothing is compiled at import;
  the first call of each specialization compiles it (seconds) and caches it on disk.
  :func:`warmup` compiles every specialization the public layer can reach, both twins.
  Helpers (row and block functions, the math in :mod:`._math`) are deliberately
  *not* cached: a function loaded from Numba's disk cache is linked into its callers as
  object code, which LLVM cannot inline, and the vectorizable ``exp`` would then be an
  out-of-line call that keeps every loop scalar.  They compile in memory with, and are cached
  inside, the entry kernels.  Numba itself invalidates a cached kernel only
  when the file defining it changes, so :mod:`._cache` keys the cache on the sources of every
  module the kernels compile (``_KERNEL_SOURCES``): a digest of them is kept beside the cached
  kernels, and when it differs (an edited helper, a partial upgrade) the backend's cached
  kernels are dropped at import and compiled afresh (:func:`_drop_stale_kernels`).
* **Where the cache lives.**  Numba (0.68) caches a function in the first of these
  directories that it can create and write a file in: ``NUMBA_CACHE_DIR`` (when set),
  ``__pycache__`` in this package, the user-wide ``$XDG_CACHE_HOME/numba`` (or
  ``~/.cache/numba``); it neither reads nor writes a directory it cannot write, and skips an
  unwritable ``NUMBA_CACHE_DIR`` silently.  With none of them writable (a read-only install
  for a user without a home cache) ``cache=True`` would raise at import ("no locator
  available") and the whole backend would be lost; so the search is run once at import on a
  probe function (``_cache_setup``) and, when it fails, every kernel is compiled with
  ``cache=False`` -- in memory, again in every process -- and one
  :class:`~fastloss.NumbaCacheWarning` says how to fix it (``NUMBA_CACHE_DIR`` set
  to a writable directory).  An unwritable ``NUMBA_CACHE_DIR`` that Numba skips for another
  directory gets the warning too.  :func:`cache_info` (shown by ``fastloss info``) reports it.
* **Strict subexpressions under ``reassoc``.**  ``(x - m) - log s`` (log-softmax) and
  ``log s - (x[t] - m)`` (cross-entropy) are evaluated in helpers compiled without
  ``reassoc`` (``sub_sub``, ``neg_log_p``): LLVM would otherwise rewrite them through
  ``lse = m + log s`` and lose the O(1) part next to huge logits.
* **Threads.**  :func:`set_num_threads` bounds the worker threads.  Numba's default
  ``workqueue`` threading layer is not safe for concurrent calls from several Python threads;
  this module asks for a thread-safe layer (OpenMP or TBB) unless the user chose one, and
  serializes calls if Numba still ends up on ``workqueue``.
* **Fork.**  GNU OpenMP's pool does not survive ``fork()``: in a child forked after a
  parallel call (``multiprocessing``'s ``'fork'`` start method, DataLoader-style workers)
  Numba's ``omp`` layer kills the process ("fork() called from a process already using GNU
  OpenMP, this is unsafe"), and a libgomp pool started by the ``cython`` backend would hang
  it.  In such a child (:func:`fastloss.forked_serial`, decided by an
  ``os.register_at_fork`` handler from the state of the parent) every call runs the serial
  twin of its kernel on the calling thread, :func:`get_num_threads` is 1 and
  :func:`set_num_threads` checks its argument without applying it.  Children of a process
  that never started a pool (or that uses the fork-safe TBB or workqueue layers) stay
  parallel; workers started with ``'spawn'`` or ``'forkserver'`` are always parallel.
"""
from __future__ import annotations

import functools

import numpy as np

from ... import _config as cfg
from . import _jit
from ._cache import cache_info
from ._jit import NAME, _call, _nblocks, _tasks, get_num_threads, numba, set_num_threads

__all__ = [
    "NAME", "unavailable_reason", "set_num_threads", "get_num_threads", "warmup", "cache_info",
    "logsumexp", "softmax", "log_softmax", "softmax_backward", "log_softmax_backward",
    "cross_entropy", "cross_entropy_shard", "cross_entropy_soft", "bce_with_logits", "bce", "kl_div", "mse",
    "gaussian_nll",
]

if numba is not None:  # without numba only the reason below is asked for
    from ._cols import _SB as _COL_ROWS  # rows per block of the column-block kernel (float32)
    from ._cols import _block_rows
    from ._cols import _k_cross_entropy_small
    from ._elementwise import _k_bce, _k_bce_with_logits, _k_gaussian_nll, _k_kl_div, _k_kl_div_log, _k_mse
    from ._rows import (_k_cross_entropy, _k_cross_entropy_shard, _k_cross_entropy_soft, _k_log_softmax,
                        _k_logsumexp, _k_softmax, _k_softmax_backward)
from ._warmup import warmup  # noqa: E402


def unavailable_reason() -> str:
    """``""`` when Numba imports, else why this backend cannot be used."""
    return _jit._IMPORT_ERROR


# ============================================================================= entry points
# Every distinct tuple of argument types is one more compiled specialization (seconds of
# LLVM each, twice with the serial twin), and Numba's array type holds the layout and the
# read-only flag: a C-contiguous array, the same values in a stride-0 broadcast view and a
# writable copy are three specializations of every kernel they reach.  The entry points
# therefore hand the kernels few types: every input as a read-only view (a kernel never
# writes its inputs; the flag changes no machine code) and every 1-D operand (class
# weights, targets, per-row losses) C-contiguous -- copying C or N values costs nothing
# next to the N x C pass.  The cross-entropies' gradient scales always arrive as arrays (a
# scalar scale broadcast over the rows), and so do the class weights of the hard-target and
# sharded ones (ones for no weight): one type instead of four per kernel -- `fastloss warmup`
# (float32 + float64, C order, 2 processes, Zen 5) compiled 169 kernels in 144 s instead of 233
# in 199 s with the soft-target weights merged too (taken back, see cross_entropy_soft).  (Not for the elementwise
# losses: there a missing operand saves a load and a multiply per element.)
def _ro(a):
    """``a`` as a read-only view (``None`` stays ``None``): one type for every input."""
    if a is None or not a.flags.writeable:
        return a
    v = a.view()
    v.flags.writeable = False
    return v


def _vec(a, dtype=None):
    """A 1-D operand C-contiguous and read-only (a copy only when it is strided)."""
    if a is None:
        return None
    return _ro(np.ascontiguousarray(a, dtype=dtype))


_NO_ROWS = np.empty(0)  # a per-row output not wanted: (0,), the same kernel type as a wanted one


def _rows_out(loss, run, lse=None, n=0):
    """Run ``run(loss_buf, lse_buf)`` on C-contiguous per-row output buffers and copy them
    into ``loss`` / ``lse`` where those are strided; an ``lse`` not wanted (None) is
    ``_NO_ROWS``.  A ``loss`` of None (a reduced loss, see the protocol) is a buffer of ``n``
    rows, and their float64 total is returned (NumPy's pairwise sum: a fixed order)."""
    bufs = [o if o is None or o.flags.c_contiguous else np.empty(o.shape, o.dtype) for o in (loss, lse)]
    if loss is None:
        bufs[0] = np.empty(n, np.float64)
    run(bufs[0], _NO_ROWS if bufs[1] is None else bufs[1])
    for o, b in zip((loss, lse), bufs):
        if o is not None and b is not o:
            o[...] = b
    return float(np.sum(bufs[0])) if loss is None else None


def _gscale_rows(gscale, n, block=0):
    """A row scale as ``(1.0, per-row float64 operand)``: a scalar too (broadcast into a
    copy of N floats), so that the scalar scales of ``"mean"``/``"sum"`` and the per-row
    ones of ``"none"`` share one compiled kernel (``gs = 1.0 * s`` is ``s`` exactly).

    With ``block`` (the column-block kernel, which reads its scales through
    ``_cols._gscale_block``), a scalar is ``(s, block ones)`` instead -- ``gs = s * 1.0``, the
    same numbers -- without the copy: at 262144 rows it was 43 us of a 1.7 ms call (Zen 4),
    and 2 MB more for the kernel to read."""
    g = np.asarray(gscale, dtype=np.float64)
    if block and g.ndim == 0:
        return float(g), _ones(block, np.dtype(np.float64))
    return 1.0, _vec(np.broadcast_to(g, (n,)))


@functools.lru_cache(maxsize=16)
def _ones(c, dtype):
    a = np.ones(c, dtype)
    a.flags.writeable = False
    return a


def _class_weights(weight, c, dtype):
    """Class weights as one operand type: a missing weight as ones, read-only and cached --
    exactly the unweighted result (every use multiplies by a weight or sums them), so
    weighted and unweighted calls share one compiled kernel."""
    return _vec(weight) if weight is not None else _ones(c, np.dtype(dtype))


def _same_memory(a, b):
    """Whether ``b`` is ``a`` in memory: the same first element and the same strides (a
    gradient written in place, over the logits)."""
    return (b is not None and a.shape == b.shape and a.strides == b.strides
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])


def _elementwise_layout(first, *arrays):
    """Transpose every operand when the first is Fortran-ordered (the kernels prefer C rows).

    The kernels are elementwise, so any consistent permutation of the axes is valid.
    """
    if first.ndim == 2 and not first.flags.c_contiguous and first.flags.f_contiguous:
        return tuple(None if a is None else a.T for a in (first,) + arrays)
    return (first,) + arrays


def logsumexp(x, out):
    if x.shape[0] == 0:
        return
    _rows_out(out, lambda o, _: _call(_k_logsumexp, x.size, _ro(x), o, _nblocks(x.shape[0], x.size)))


def softmax(x, out):
    if x.size == 0:
        return
    _call(_k_softmax, x.size, _ro(x), out, _same_memory(x, out), _nblocks(x.shape[0], x.size))


def log_softmax(x, out):
    if x.size == 0:
        return
    _call(_k_log_softmax, x.size, _ro(x), out, _same_memory(x, out), _nblocks(x.shape[0], x.size))


def softmax_backward(g, y, out):
    if y.size == 0:
        return
    _call(_k_softmax_backward, y.size, _ro(g), _ro(y), out, False, _nblocks(y.shape[0], y.size))


def log_softmax_backward(g, y, out):
    if y.size == 0:
        return
    _call(_k_softmax_backward, y.size, _ro(g), _ro(y), out, True, _nblocks(y.shape[0], y.size))


def cross_entropy(x, target, weight, ignore_index, label_smoothing, z_loss, softcap, loss, lse, grad, gscale):
    n, c = x.shape
    if n == 0:
        return 0.0 if loss is None else None
    sumw = float(c) if weight is None else float(np.sum(weight, dtype=np.float64))
    small = c <= cfg.NUMBA_SMALL_C
    gsc, gsa = _gscale_rows(gscale if grad is not None else 1.0, n, _COL_ROWS if small else 0)
    args = (_ro(x), _vec(target, np.int64), _class_weights(weight, c, x.dtype), sumw, int(ignore_index),
            float(label_smoothing),
            float(z_loss), float(softcap))
    nb = _nblocks(n, x.size)
    if small:
        # few classes: the column-block kernel, in any layout (it transposes blocks of rows
        # itself).  It needs no in-place flag: its vector loops read its scratch blocks, never
        # x and grad together, so LLVM's overlap tests pass in place too.  A reduced loss is
        # summed per block in the kernel (see _k_cross_entropy_small): at 262144 x 10 float32
        # the N row losses' write and read back were ~90 us of a ~1.6 ms call (Zen 4)
        sums = loss is None
        out = np.empty(-(-n // _block_rows(x)), np.float64) if sums else loss  # block sums, or rows
        _rows_out(out, lambda lo, ls: _call(_k_cross_entropy_small, x.size, *args, lo, ls, grad, gsc, gsa, sums,
                                            nb), lse)
        return float(np.sum(out)) if sums else None
    return _rows_out(loss, lambda lo, ls: _call(_k_cross_entropy, x.size, *args, lo, ls, grad, gsc, gsa,
                                                _same_memory(x, grad), nb), lse, n)


def cross_entropy_shard(x, target, weight, ignore_index, label_smoothing, z_loss, softcap, lse, class_offset,
                        num_classes, loss, grad, gscale):
    """One shard of the classes, given the global row lse (see the protocol): one pass per row.

    Every shard width takes the row kernel, few classes included: with no row max and no row
    sum there is no per-row dependency chain for the column-block path to break up."""
    n, c = x.shape
    if n == 0:
        return 0.0 if loss is None else None
    off, nk = int(class_offset), int(num_classes)
    sumw = float(nk) if weight is None else float(np.sum(weight, dtype=np.float64))
    gsc, gsa = _gscale_rows(gscale if grad is not None else 1.0, n)
    wk = _class_weights(weight, nk, x.dtype)
    ws = wk[off:off + c]  # this shard's class weights
    args = (_ro(x), _vec(target, np.int64), wk, _vec(ws), sumw, int(ignore_index), float(label_smoothing),
            float(z_loss), float(softcap), _vec(lse, np.float64), off, nk)
    return _rows_out(loss, lambda lo, _: _call(_k_cross_entropy_shard, x.size, *args, lo, grad, gsc, gsa,
                                               _same_memory(x, grad), _nblocks(n, x.size)), None, n)


def cross_entropy_soft(x, target, weight, label_smoothing, z_loss, softcap, loss, lse, grad, gscale):
    n, c = x.shape
    if n == 0:
        return 0.0 if loss is None else None
    gsc, gsa = _gscale_rows(gscale if grad is not None else 1.0, n)
    # a missing weight as ones: one kernel type for both (exact: every use multiplies by it)
    args = (_ro(x), _ro(target), _class_weights(weight, c, x.dtype), float(label_smoothing), float(z_loss),
            float(softcap))
    return _rows_out(loss, lambda lo, ls: _call(_k_cross_entropy_soft, x.size, *args, lo, ls, grad, gsc, gsa,
                                                _same_memory(x, grad), _nblocks(n, x.size)), lse, n)


def _run_elementwise(kern, a, b, p, q, c1, c2, loss, grad, grad2, gscale, gout):
    """Run elementwise kernel ``kern`` (one signature for every loss, see ``_make_driver``)."""
    if a.size == 0:
        return 0.0
    a, b, p, q, loss, grad, grad2, gout = _elementwise_layout(a, b, p, q, loss, grad, grad2, gout)
    if loss is None:  # losses not wanted: an (R, 0) array, the same kernel type (see _make_ew_block)
        loss = np.empty((a.shape[0], 0), a.dtype)
    gs = float(gscale)  # a scalar (the protocol): a per-element scale arrives as gout
    ntask, ck, rpt = _tasks(*a.shape)
    part = np.empty(ntask)  # each task's float64 total, added below in a fixed order
    _call(kern, a.size, _ro(a), _ro(b), _ro(p), _ro(q), c1, c2, loss, grad, grad2, gs, _ro(gout), part, ck, rpt)
    return float(np.sum(part))


def bce_with_logits(z, y, weight, pos_weight, loss, grad, gscale, gout):
    return _run_elementwise(_k_bce_with_logits, z, y, weight, pos_weight, 0, 0.0, loss, grad, None, gscale,
                            gout)


def bce(p, y, weight, loss, grad, gscale, gout):
    return _run_elementwise(_k_bce, p, y, weight, None, 0, 0.0, loss, grad, None, gscale, gout)


def kl_div(x, t, log_target, loss, grad, gscale, gout):
    return _run_elementwise(_k_kl_div_log if log_target else _k_kl_div, x, t, None, None, 0, 0.0, loss, grad,
                            None, gscale, gout)


def mse(x, t, loss, grad, gscale, gout):
    return _run_elementwise(_k_mse, x, t, None, None, 0, 0.0, loss, grad, None, gscale, gout)


def gaussian_nll(x, t, var, full, eps, loss, grad, grad_var, gscale, gout):
    return _run_elementwise(_k_gaussian_nll, x, t, var, None, bool(full), float(eps), loss, grad, grad_var, gscale,
                            gout)
