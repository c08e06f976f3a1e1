"""Streamed cross-entropy: ``fastloss.dask`` on a LocalCluster over logits on disk that are
larger than the workers' memory, against the same chunks read and computed by hand.

The logits, ``N x C`` float32 (default 4 GB: 32768 x 32768), are written once as a stack of
``.npy`` files (``dask.array.to_npy_stack``, one file per chunk of ``--chunk-rows`` rows) and
read back with ``dask.array.from_npy_stack(mmap_mode=None)``: every task ``np.load``s its own
chunk -- nothing is pickled but the file name.  Candidates, each timed once on the same files:

* ``fastloss.dask (LocalCluster)``: ``fastloss.dask.cross_entropy(x, t)`` (``"mean"``) on a
  ``dask.distributed.LocalCluster`` of ``--workers`` worker processes with one thread each and
  ``memory_limit=--memory-limit`` (default 2 x 1 GB, on 127.0.0.1), the default backend;
  timed from ``compute`` to the result (the cluster is started and every worker's kernels
  compiled before); ``--class-chunk`` also splits the classes (the sharded path);
* ``by hand, numpy backend``: a loop over the files: ``np.load``, then
  ``fastloss.cross_entropy(chunk, t_chunk, backend="numpy", reduction="sum")``, summed in
  float64 and divided by the number of rows (the same mean);
* ``by hand, <default backend>``: the same loop with the default backend (its kernels
  compiled before the clock starts).

The table gives GB (logits bytes), seconds, GB/s and whether the loss equals the Dask one
(within the spec's float32 tolerance, 2e-6 relative).  The files are written just before the
runs, so on a machine with more RAM than ``--size-gb`` they are read from the page cache:
the numbers then measure the compute and the scheduling, not the disk.

Usage::

    python bench/dask_stream.py                      # 4 GB, the files removed at the end
    python bench/dask_stream.py --size-gb 0.5 --keep --dir /scratch/fl
"""
from __future__ import annotations


import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

from fastloss._cli import _cpu_model  # the model name `fastloss info` prints


def write_logits(path, n, c, chunk_rows, seed):
    """The logits as a stack of .npy files (one per row chunk), written chunk by chunk."""
    import dask
    import dask.array as da

    x = da.random.default_rng(seed).standard_normal((n, c), chunks=(chunk_rows, c), dtype=np.float32)
    with dask.config.set(scheduler="threads", num_workers=2):  # a few chunks in memory at once
        da.to_npy_stack(path, x, axis=0)


def by_hand(path, t, chunks, backend):
    """The mean cross-entropy from the files, one ``np.load`` and one reduction="sum" call per chunk."""
    import fastloss as fl

    total, start = 0.0, 0
    for i, rows in enumerate(chunks):
        x = np.load(os.path.join(path, f"{i}.npy"))
        total += float(fl.cross_entropy(x, t[start:start + rows], reduction="sum", backend=backend))
        start += rows
    return total / start


def warm_up(sharded):
    """Compile (or load from Numba's disk cache) the kernels a worker will run: the float32
    cross-entropy, and for class chunks the float64 log-sum-exp and sharded cross-entropy (the
    sharded path reads float32 blocks as float64)."""
    import dask.array as da

    import fastloss as fl
    import fastloss.dask as fld

    float(fl.cross_entropy(np.zeros((2, 8), np.float32), np.zeros(2, np.int64)))
    if sharded:  # class chunks of a row block are strided views: the kernels' "A" layout
        x = da.from_array(np.zeros((4, 16), np.float32), chunks=(2, 8))
        fld.cross_entropy(x, np.zeros(4, np.int64)).compute(scheduler="sync")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=4.0, help="logits size in GB (float32), default 4")
    p.add_argument("--classes", type=int, default=32768, help="classes C, default 32768")
    p.add_argument("--chunk-rows", type=int, default=512, help="rows per chunk/file, default 512 (64 MB at C=32768)")
    p.add_argument("--class-chunk", type=int, default=None,
                   help="also split the classes into chunks of this size for the Dask run (default: one)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit", default="1GB", help="per worker, default 1GB")
    p.add_argument("--dir", default=None, help="where to write the data (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the data files")
    args = p.parse_args(argv)

    import dask.array as da
    from distributed import Client, LocalCluster

    import fastloss as fl
    import fastloss.dask as fld

    c = args.classes
    n = max(1, int(args.size_gb * 1e9 / (4 * c)))
    gb = n * c * 4 / 1e9
    need = n * c * 4 * 1.05
    root = args.dir or tempfile.mkdtemp(prefix="fastloss-dask-stream-")
    path = os.path.join(root, "logits")
    free = shutil.disk_usage(root).free
    if free < need:
        sys.exit(f"--dir: {root} has {free / 1e9:.1f} GB free, the data needs {need / 1e9:.1f} GB")
    t = np.random.default_rng(1).integers(0, c, n)
    default = fl.get_backend()
    if default == "auto":
        default = fl._dispatch.resolve(None).__name__.rsplit(".", 1)[-1].replace("_backend", "")
    print(f"CPU: {_cpu_model()} ({os.cpu_count()} logical CPUs); Python {platform.python_version()}, "
          f"fastloss {fl.__version__}, default backend {default}")
    print(f"logits: {n} x {c} float32 = {gb:.2f} GB in {path} ({-(-n // args.chunk_rows)} .npy chunks of "
          f"{args.chunk_rows} rows); workers: {args.workers} processes x 1 thread, memory_limit={args.memory_limit}")
    rows = []
    try:
        t0 = time.perf_counter()
        write_logits(path, n, c, args.chunk_rows, seed=0)
        print(f"written in {time.perf_counter() - t0:.1f} s")
        with LocalCluster(n_workers=args.workers, processes=True, threads_per_worker=1, host="127.0.0.1",
                          dashboard_address=None, memory_limit=args.memory_limit) as cluster, Client(cluster) as client:
            # every worker compiles (or loads from the disk cache) its kernels before the clock starts
            client.run(warm_up, bool(args.class_chunk))
            x = da.from_npy_stack(path, mmap_mode=None)
            label = "fastloss.dask (LocalCluster)"
            if args.class_chunk:
                x = x.rechunk({1: args.class_chunk})
                label += f", class chunks of {args.class_chunk}"
            loss = fld.cross_entropy(x, t)
            t0 = time.perf_counter()
            ref = float(loss.compute())
            rows.append((label, time.perf_counter() - t0, ref))
            chunks = x.chunks[0]
        for backend in ("numpy", default):
            float(fl.cross_entropy(np.zeros((2, 8), np.float32), np.zeros(2, np.int64), backend=backend))  # compiled
            t0 = time.perf_counter()
            v = by_hand(path, t, chunks, backend)
            rows.append((f"by hand, {backend} backend", time.perf_counter() - t0, v))
    finally:
        if args.keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
            if args.dir is None:
                shutil.rmtree(root, ignore_errors=True)
    print()
    print(f"{'candidate':48} {'GB':>6} {'seconds':>8} {'GB/s':>6}  {'loss':>12}  equal")
    for name, sec, v in rows:
        same = abs(v - ref) <= 2e-6 * abs(ref)
        print(f"{name:48} {gb:6.2f} {sec:8.2f} {gb / sec:6.2f}  {v:12.7f}  {'yes' if same else 'NO'}")
    return 0 if all(abs(v - ref) <= 2e-6 * abs(ref) for _, _, v in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
