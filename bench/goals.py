"""The speed goals of the compiled CPU backends, as ratios measured in one run.

For each goal workload: the best time of each backend through the public API (gradients into a
reused ``grad_out``), the NumPy backend, and ``np.copyto`` of the same logits into a
preallocated array (memcpy).  Prints ``time``, ``x memcpy`` (lower is better) and ``x numpy``
(speedup, higher is better) next to the goal of the numba issue.

Usage::

    python bench/goals.py                   # numba and cython, float32 and float64
    python bench/goals.py --backend cython --dtype float32 ce
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import fastloss as fl


def best(f, reps):
    f()  # warm-up: JIT compile / cache load, page faults of fresh outputs
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def workloads(dt, rng):
    def ce(n, c):
        x = rng.normal(0, 2, (n, c)).astype(dt)
        t = rng.integers(0, c, n)
        g = np.empty_like(x)
        return x, lambda be: fl.cross_entropy(x, t, return_grad=True, grad_out=g, backend=be)

    def lse(n, c):
        x = rng.normal(0, 2, (n, c)).astype(dt)
        return x, lambda be: fl.logsumexp(x, backend=be)

    def bce(n):
        z = rng.normal(0, 3, n).astype(dt)
        y = rng.random(n).astype(dt)
        g = np.empty_like(z)
        return z, lambda be: fl.binary_cross_entropy_with_logits(z, y, return_grad=True, grad_out=g, backend=be)

    return [
        ("cross_entropy fwd+grad 2048x32000", lambda: ce(2048, 32000), 2.0, 6),
        ("cross_entropy fwd+grad 8192x1000", lambda: ce(8192, 1000), 2.0, 7),
        ("cross_entropy fwd+grad 262144x10", lambda: ce(262144, 10), 4.0, 5),
        ("logsumexp 2048x32000", lambda: lse(2048, 32000), 1.0, 8),
        ("bce_with_logits fwd+grad 16M", lambda: bce(1 << 24), 2.5, 10),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", action="append", help="backend(s) to time (default: numba and cython, if available)")
    ap.add_argument("--dtype", action="append", choices=["float32", "float64"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("names", nargs="*", help="substrings selecting workloads")
    a = ap.parse_args(argv)
    avail = {n for n, s in fl.backends().items() if s.available}
    bes = [b for b in (a.backend or ["numba", "cython"]) if b in avail]
    rng = np.random.default_rng(0)
    print(f"threads={fl.get_num_threads()}  backends={bes}")
    for dn in a.dtype or ["float32", "float64"]:
        dt = np.dtype(dn)
        for name, make, g_mem, g_np in workloads(dt, rng):
            if a.names and not any(s in name for s in a.names):
                continue
            x, call = make()
            dst = np.empty_like(x)
            t_mem = best(lambda: np.copyto(dst, x), a.reps)
            t_np = best(lambda: call("numpy"), max(2, a.reps // 2))
            goal = f"goal <= {g_mem}x memcpy, >= {g_np}x numpy" if dt == np.float32 else "goal >= 4x numpy"
            for be in bes:
                t = best(lambda: call(be), a.reps)
                print(f"{dn:8s} {name:36s} {be:7s} {t * 1e3:8.2f} ms   memcpy {t_mem * 1e3:7.2f} ms   "
                      f"numpy {t_np * 1e3:8.1f} ms   {t / t_mem:5.2f}x memcpy  {t_np / t:6.1f}x numpy   ({goal})",
                      flush=True)


if __name__ == "__main__":
    main()
