"""numba against cython on the cross-entropy goal shapes, interleaved in one process: the two
backends in turn for ``--rounds`` rounds, medians, gradients into a reused ``grad_out``.

``bench/goals.py`` times each implementation in a block of calls of its own; on a shared VM a
block can fall into a noisy minute and move one ratio by 20-50 %.  Taking turns, both
backends see the same minutes.

Usage::

    python bench/interleaved.py                       # float32, 2048x32000 8192x1000 262144x10
    python bench/interleaved.py --dtype float64 --threads 1 --softcap 30
"""
from __future__ import annotations

import argparse

import numpy as np

import fastloss as fl
from fastloss._bench import time_in_turns


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="2048x32000,8192x1000,262144x10")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=None, help="fl.set_num_threads (default: every core)")
    ap.add_argument("--softcap", type=float, default=None)
    a = ap.parse_args()
    if a.threads:
        fl.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    print(f"# numba vs cython, interleaved: {a.dtype}, threads {fl.get_num_threads()}, softcap {a.softcap}, "
          f"medians of {a.rounds}")
    for s in a.shapes.split(","):
        n, c = (int(v) for v in s.split("x"))
        x = rng.standard_normal((n, c)).astype(a.dtype)
        t = rng.integers(0, c, n)
        g = np.empty_like(x)
        calls = {b: (lambda b=b: fl.cross_entropy(x, t, softcap=a.softcap, return_grad=True, grad_out=g, backend=b))
                 for b in ("numba", "cython")}
        for call in calls.values():  # warm-up (compiles or loads the cache)
            call()
        med = {b: tm.median for b, tm in time_in_turns(calls, a.rounds).items()}
        print(f"  {s:12s} numba {med['numba'] * 1e3:8.2f} ms  cython {med['cython'] * 1e3:8.2f} ms  "
              f"numba/cython {med['numba'] / med['cython']:.2f}x")


if __name__ == "__main__":
    main()
