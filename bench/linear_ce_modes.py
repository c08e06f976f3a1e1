"""linear_cross_entropy's two chunkings against each other, in one process: chunks of whole
rows (the only mode below ``_config.LINEAR_MIN_ROWS`` rows per chunk before the class chunks)
and chunks of rows by classes (two passes), each as time / the three matrix products alone
(``h @ W.T``, ``g @ W``, ``g.T @ h`` into preallocated outputs, NumPy's BLAS), interleaved,
best of ``--reps``.  What sets ``_config.LINEAR_MIN_ROWS``.  Also the default chunks with the
kernels on fastloss's thread count instead of ``_config.LINEAR_CE_THREADS`` (one): what sets
that.

Usage::

    python bench/linear_ce_modes.py                              # 4 shapes, numba, NumPy's BLAS
    python bench/linear_ce_modes.py --shapes 1024x512x128256 --rows 512,1024 --blas torch
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import fastloss as fl
from fastloss import _config
from fastloss._api import linear


def run(shape, backend, rows_list, reps, blas):
    N, H, V = shape
    rng = np.random.default_rng(0)
    h = rng.standard_normal((N, H), dtype=np.float32)
    W = (rng.standard_normal((V, H)) * 0.05).astype(np.float32)
    t = rng.integers(0, V, N)
    z, dh, dW = np.empty((N, V), np.float32), np.empty((N, H), np.float32), np.empty((V, H), np.float32)

    def products():
        np.matmul(h, W.T, out=z)
        np.matmul(z, W, out=dh)
        np.matmul(z.T, h, out=dW)

    def call(min_rows=None, classes=None, rows=None, ce_threads=_config.LINEAR_CE_THREADS):
        saved = (_config.LINEAR_MIN_ROWS, _config.LINEAR_CLASS_CHUNK, _config.LINEAR_CLASS_ROWS, _config.LINEAR_BLAS,
                 _config.LINEAR_CE_THREADS)
        try:
            if min_rows is not None:
                _config.LINEAR_MIN_ROWS = min_rows
            if classes is not None:
                _config.LINEAR_CLASS_CHUNK, _config.LINEAR_CLASS_ROWS = classes, rows
            _config.LINEAR_BLAS = blas
            _config.LINEAR_CE_THREADS = ce_threads
            fl.linear_cross_entropy(h, W, t, return_grad=True, backend=backend)
        finally:
            (_config.LINEAR_MIN_ROWS, _config.LINEAR_CLASS_CHUNK, _config.LINEAR_CLASS_ROWS,
             _config.LINEAR_BLAS, _config.LINEAR_CE_THREADS) = saved

    whole = linear._default_chunk(N, V, H, 4)
    cands = {"products": products, f"whole rows ({min(whole, N)} per chunk)": lambda: call(min_rows=0)}
    budget = linear._budget(N, V, H, 4)
    for rows in rows_list:
        rows = min(rows, N)
        classes = (budget - 2 * rows * H * 4) // (rows * 4)
        if 0 < classes < V:
            cands[f"class chunks {rows} x {classes}"] = (lambda r=rows, c=classes: call(classes=c, rows=r))
    cands[f"default, kernels on {fl.get_num_threads()} threads"] = lambda: call(ce_threads=None)
    print(f"{N}x{H}x{V}: the default chunks {linear._chunks(N, V, H, 4, None)} (rows, classes)")
    for f in cands.values():  # warm-up (compiles)
        f()
    best = dict.fromkeys(cands, float("inf"))
    for _ in range(reps):
        for k, f in cands.items():
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    for k, v in best.items():
        print(f"  {k:34s} best {v:7.3f} s  {v / best['products']:.2f}x the products")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1024x512x128256,1536x512x96000,2048x512x64000,4096x512x32000")
    ap.add_argument("--rows", default="1024", help="rows per class chunk, comma-separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--blas", default="numpy", choices=["numpy", "torch"])
    a = ap.parse_args()
    rows = [int(r) for r in a.rows.split(",")]
    for s in a.shapes.split(","):
        run(tuple(int(v) for v in s.split("x")), a.backend, rows, a.reps, a.blas)


if __name__ == "__main__":
    main()
