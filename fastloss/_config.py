"""The tunables of every backend (block sizes, thresholds, launch shapes), in one place.

Two kinds, and the difference matters:

* **Read at each call** (``NUMBA_SERIAL_MAX``, ``NUMBA_SMALL_C``, ``NUMBA_CHUNK``, ``CUDA_*``):
  the Python side of a backend reads them when it decides how to run a call, so a test (or a
  user measuring) may patch them at any time, e.g. ``monkeypatch.setattr(fastloss._config,
  "NUMBA_SMALL_C", 0)``.  They change how work is split, never a result beyond float
  rounding of the reductions.
* **Compiled into the kernels** (``NUMBA_SUM_BLOCK``, ``NUMBA_LOSS_BLOCK``,
  ``NUMBA_COL_ROWS``): Numba freezes a global's value into the machine code it caches, so
  patching one at run time does nothing to kernels already compiled and would be cached
  under the old key; edit this file instead -- its source is part of the Numba disk cache's
  key (``numba_backend/_cache.py``), so the kernels recompile.  The Cython kernels' block
  (``FL_BLOCK`` in ``kernels/fl_math.hpp``) and the CUDA kernels' shared scratch
  (``MAX_THREADS`` in ``_backends/_cuda_kernels.py``) are compile-time constants of their
  languages and stay there.
"""
from __future__ import annotations

# ----------------------------------------------------------------------------- numba, read at each call
# Work (elements) below which a call runs the serial twin of its kernel on the calling thread:
# waking the worker threads costs microseconds on an idle machine but milliseconds on a loaded
# one (the OpenMP workers spin, or wait for a core), far more than such a call computes.
NUMBA_SERIAL_MAX = 1 << 16
# Class counts up to this take the few-classes column-block cross-entropy (numba_backend/_cols.py).
NUMBA_SMALL_C = 32
# Elements per elementwise task: big enough to amortize a task, small enough for L1/L2.
NUMBA_CHUNK = 16384

# ----------------------------------------------------------------------------- linear_cross_entropy, read at each call
# The BLAS of linear_cross_entropy's products for NumPy arrays: "auto" or "numpy" (NumPy's, the
# caller's library) or "torch" (PyTorch's; imports it).  PyTorch tensors always use PyTorch's.
LINEAR_BLAS = "auto"
# Huge vocabularies: when the default row chunk (1/16 of the N x V logits) would hold fewer than
# LINEAR_MIN_ROWS rows, the classes are chunked too -- chunks of LINEAR_CLASS_ROWS rows by as
# many classes as the same memory holds, two passes over the class chunks (the first for the
# rows' log-sum-exp, the second for the loss and the gradient: the logits are formed twice, four
# products instead of three, but each on BLAS-sized operands, and d_linear_weight is written
# once per row chunk instead of once per few dozen rows).  LINEAR_CLASS_CHUNK forces classes
# per chunk (None: chosen as above); a chunk_size given by the caller keeps whole rows.
# Measured (H = 512, float32, numba, 2 threads, AMD EPYC Zen 4), time / the three products:
# row chunks of 57 rows (1024 x 128256) 2.41x, class chunks 1.72x; 87 rows (1536 x 96000) 1.95x
# vs 1.69x; 115 rows (2048 x 64000) 1.46x vs 1.56x; 230 rows (4096 x 32000) 1.28x vs 1.56x.
# Class chunks of 512 or 1024 rows: 1.72x at 1024 x 128256; of 1024 or 2048: 1.56x or 1.67x at the others.
LINEAR_MIN_ROWS = 112
# Threads of the cross-entropy kernels inside linear_cross_entropy on the host (None: fastloss's
# thread count, fl.set_num_threads).  One, because they alternate with the BLAS products: an
# OpenMP team keeps spinning for milliseconds after each parallel region (libgomp's default
# GOMP_SPINCOUNT), on the cores the BLAS threads want next, and the BLAS's own threads spin on
# ours -- while the kernels are a few percent of the products' time.  Measured (numba, NumPy's
# BLAS, float32, 2 threads, Zen 4; time / the three products, one process each):
# 1024 x 256 x 32000: 2.09-2.51x on two threads, 1.44x on one; 4096 x 512 x 32000: 1.08-1.11x vs
# 1.00x; 1024 x 512 x 128256: 1.31x vs 1.18x.  (OMP_WAIT_POLICY=passive for the whole process
# gives the same there, but costs every small call ~50 us of waking the team.)  On many cores
# (not measured here) the trade is closer: the one-thread kernels cost ~(1 - 1/T) of their
# single-core time (~70 ms at 4096 x 32000 float32), the spinning some milliseconds per chunk
# whatever T is; set None to compare.
LINEAR_CE_THREADS = 1
LINEAR_CLASS_ROWS = 1024
LINEAR_CLASS_CHUNK = None

# ----------------------------------------------------------------------------- numba, compiled in
# Row sums of exp: blocks of this many terms are summed in the compute dtype (8 float32 lanes
# per ymm instead of 4 float64 ones; each lane adds <= 64 terms in [0, 1], relative error
# ~1e-7 at worst), and the block sums are added in float64.
NUMBA_SUM_BLOCK = 512
# Elementwise loss sums: blocks of this many terms, each block's float32 losses summed in a
# second pass in float64 (a float64 accumulator in a float32 loss loop makes LLVM give up on
# vectorizing the whole loop -- measured 0.15 G el/s instead of ~1 G el/s for BCE -- and a
# float32 block sum was 3.1e-6 off on 300 equal terms); float64 losses sum in the loop.  1024:
# at 256 the second pass cost BCE-with-logits 16M float32 ~10 % (its per-block reduction),
# at 1024 within noise of the float32 sums (Zen 4, 2 threads).
NUMBA_LOSS_BLOCK = 1024
# Rows per block of the few-classes cross-entropy for float32 logits; float64 blocks have half as
# many rows (the same bytes): its (C, rows) buffers stay in L1/L2.
# Measured (numba, float32 / float64 262144 x 10 and float32 131072 x 30, 1 and 2 threads, Zen 4,
# the two sizes compiled side by side and timed in turns): 256 rows 6-9 % faster than 128 in
# every case; 64 and 32 slower still (32: 1.65x the time at 128).  Numba's fixed cost per
# block -- the run-time overlap checks LLVM puts before each of the block's ~15 vector loops,
# ~0.5 us a block at 32 rows -- is what small blocks pay; the Cython kernel, whose loops need
# no such checks, is fastest at 32.  512 rows (2026-12-07, Zen 4, 1 and 2 threads, each size in
# its own process and cache, in turns): float32 262144 x 10 3-6 % faster on one thread, the same
# on two; float64 262144 x 10 7-17 % slower and float32 87381 x 30 8-13 % slower (their (C, rows)
# buffers outgrow L1) -- a size per dtype and C would gain a few percent on one shape.
# Since the kernel prefetches its gradient rows (numba_backend/_cols.py; 2026-12-07, Zen 4, in
# turns, 2 threads, every size and dtype compiled side by side): float32 262144 x 10 256 rows
# best (128: 1.06x the time, 512: 1.05x); float64 262144 x 10 128 rows 0.90-0.93x the time at 256
# (512: 1.11-1.15x), 87381 x 30 0.82x -- hence half the rows for float64.
NUMBA_COL_ROWS = 256

# ----------------------------------------------------------------------------- cuda launch shapes, read at each call
# Threads per block of the 1-D and 2-D elementwise/copy/check kernels, and the most blocks of
# each (few blocks: few per-block float64 partial sums to add on the host).
CUDA_THREADS_PER_BLOCK = 256
CUDA_FLAT_MAX_BLOCKS = 1024
CUDA_GRID2_MAX_BLOCKS = 4096
# Row kernels: threads per row (a power of two from CUDA_ROW_MIN_THREADS up to
# CUDA_ROW_MAX_THREADS, enough to cover the class count) and threads per block (several
# short rows share one).
CUDA_ROW_MIN_THREADS = 32
CUDA_ROW_MAX_THREADS = 1024
CUDA_ROW_BLOCK_THREADS = 256
CUDA_ROW_MAX_BLOCKS = 1 << 20
# Under the CUDA simulator every GPU thread is a Python thread: tiny launches keep it usable.
CUDA_SIM_THREADS_PER_BLOCK = 16
CUDA_SIM_MAX_BLOCKS = 4
CUDA_SIM_ROW_MAX_THREADS = 16
