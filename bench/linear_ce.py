"""Fused linear + cross-entropy: time and peak memory of ``fl.linear_cross_entropy`` against
the three matrix products alone and the PyTorch ways of computing the same loss and gradients.

Goals (large-vocabulary issue; float32, 2 threads, one run): time <= 1.10x the three matrix
products alone (``h @ W.T``, ``g @ W``, ``g.T @ h`` on the same shapes, same BLAS) -- the
cross-entropy hidden inside the BLAS time -- and faster than every PyTorch peer; extra memory
beyond the inputs and the gradients <= 1/16 of the N x V logits.

Candidates (each in a fresh process, so that its peak RSS is its own):

* ``products numpy`` / ``products torch``: the three products alone with NumPy's BLAS
  (OpenBLAS) / PyTorch's, into preallocated outputs (an N x V logits buffer included);
* ``fastloss <backend>``: ``fl.linear_cross_entropy(h, W, t, return_grad=True)`` on NumPy
  arrays (NumPy's BLAS); ``fastloss <backend> torch-blas``: the same on PyTorch CPU tensors
  (PyTorch's BLAS, as :mod:`fastloss.torch` runs it);
* ``fastloss.torch``: the adapter's ``linear_cross_entropy`` and ``loss.backward()``;
* ``torch eager``: ``F.cross_entropy(F.linear(h, W), t)`` and ``backward()``;
  ``torch.compile``: the same function compiled (inductor); ``F.linear_cross_entropy``:
  PyTorch 2.13's own, default options.

Each candidate: inputs built (seeded), one untimed warm-up call, then ``--reps`` timed calls
(best and median reported); peak RSS (``VmHWM``, reset after the warm-up by writing 5 to
``/proc/self/clear_refs``) minus the RSS after the warm-up with its outputs freed (the inputs,
the libraries, compiled code), and the tracemalloc peak of one call (NumPy's allocations;
PyTorch's allocator is invisible to it).  "extra" = that peak minus the gradients' bytes
(``d_input`` + ``d_linear_weight``, which every call allocates).

Usage::

    python bench/linear_ce.py                       # 4096x512x32000 and 1024x512x128256
    python bench/linear_ce.py --shapes 1024x256x32000 --reps 2 --json out.json
    python bench/linear_ce.py --interleaved 5       # times only, candidates in turns in one process
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CANDIDATES = ("products numpy", "products torch", "fastloss numba", "fastloss cython", "fastloss numba torch-blas",
              "fastloss.torch", "torch eager", "torch.compile", "F.linear_cross_entropy")


def _rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _noop():
    pass


def _free_grads(*tensors):
    """The torch candidates' gradients are freed before each call (each call allocates its own)."""
    for t in tensors:
        t.grad = None


def _inputs(shape, threads, torch_needed):
    import numpy as np

    import fastloss as fl

    fl.set_num_threads(threads)
    N, H, V = shape
    r = np.random.default_rng(0)
    h = r.standard_normal((N, H), dtype=np.float32)
    W = (r.standard_normal((V, H), dtype=np.float32) * (1.0 / np.sqrt(H))).astype(np.float32)
    t = r.integers(0, V, N)
    torch = None
    if torch_needed:
        import torch

        torch.set_num_threads(threads)
    return h, W, t, torch


def _needs_torch(name):
    return "torch" in name or name.startswith("F.")


def _build(name, h, W, t, torch):
    """Candidate ``name`` on these inputs: ``(fn, reset, held)`` -- the call, what to do
    before each call (free the torch gradients), the bytes it holds across calls -- or
    ``(None, error, 0)``."""
    import numpy as np

    import fastloss as fl

    N, H = h.shape
    V = W.shape[0]
    reset = _noop
    held = 0  # buffers a candidate holds across calls (the products' N x V logits)
    if name == "products numpy":
        z = np.empty((N, V), np.float32)
        dh, dW = np.empty((N, H), np.float32), np.empty((V, H), np.float32)
        held = z.nbytes + dh.nbytes + dW.nbytes

        def fn():
            np.matmul(h, W.T, out=z)
            np.matmul(z, W, out=dh)
            np.matmul(z.T, h, out=dW)
    elif name == "products torch":
        ht, Wt = torch.from_numpy(h), torch.from_numpy(W)
        z = torch.empty((N, V))
        dh, dW = torch.empty((N, H)), torch.empty((V, H))
        held = (N * V + N * H + V * H) * 4

        def fn():
            torch.matmul(ht, Wt.T, out=z)
            torch.matmul(z, Wt, out=dh)
            torch.matmul(z.T, ht, out=dW)
    elif name.startswith("fastloss ") and name != "fastloss.torch":
        be = name.split()[1]
        args = (torch.from_numpy(h), torch.from_numpy(W), torch.from_numpy(t)) if name.endswith("torch-blas") else (h, W, t)

        def fn():
            return fl.linear_cross_entropy(*args, return_grad=True, backend=be)
    else:
        import torch.nn.functional as F

        ht = torch.from_numpy(h).requires_grad_(True)
        Wt = torch.from_numpy(W).requires_grad_(True)
        tt = torch.from_numpy(t)
        if name == "fastloss.torch":
            import fastloss.torch as flt

            f = getattr(flt, "linear_cross_entropy", None)
            if f is None:
                return None, "fastloss.torch has no linear_cross_entropy", 0
        elif name == "torch eager":
            def f(a, b, c):
                return F.cross_entropy(F.linear(a, b), c)
        elif name == "torch.compile":
            f = torch.compile(lambda a, b, c: F.cross_entropy(F.linear(a, b), c))
        else:
            f = F.linear_cross_entropy

        reset = lambda: _free_grads(ht, Wt)  # noqa: E731

        def fn():
            reset()
            f(ht, Wt, tt).backward()
    return fn, reset, held


def run_one(name, shape, reps, threads):
    """Measure one candidate in this process; return a dict."""
    N, H, V = shape
    h, W, t, torch = _inputs(shape, threads, _needs_torch(name))
    grads_bytes = (N * H + V * H) * 4
    tm_peak = None
    fn, reset, held = _build(name, h, W, t, torch)
    if fn is None:
        return {"name": name, "error": reset}

    out = fn()  # warm-up: compilation, page faults
    check = None
    if name.startswith("fastloss ") and name != "fastloss.torch":
        check = float(out[0])
    del out
    reset()  # every timed call allocates its gradients
    import gc

    gc.collect()
    base = _rss("VmRSS")  # the inputs, the libraries and their compiled code; no gradients
    can_reset = _reset_peak()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t0)
        del res
    peak = _rss("VmHWM") - base + held if can_reset else None
    if name.startswith("fastloss ") or name == "products numpy":
        import tracemalloc

        tracemalloc.start()
        tracemalloc.reset_peak()
        t0m = tracemalloc.get_traced_memory()[0]
        fn()
        tm_peak = tracemalloc.get_traced_memory()[1] - t0m
        tracemalloc.stop()
    times.sort()
    return {"name": name, "best_s": times[0], "median_s": times[len(times) // 2], "peak_rss_over_inputs": peak,
            "extra_bytes": None if peak is None else peak - grads_bytes, "tracemalloc_peak": tm_peak,
            "logits_bytes": N * V * 4, "loss": check}


def run_interleaved(shape, names, rounds, threads):
    """Time the candidates in one process, taking turns for ``rounds`` rounds (no memory
    figures: a shared process has one peak RSS).  On a shared VM a candidate timed in a
    process of its own can fall into a noisy minute and move its ratio by 20-50 %; in turns,
    every candidate sees the same minutes.  Returns rows like run_one's (median and best)."""
    import gc

    h, W, t, torch = _inputs(shape, threads, any(_needs_torch(n) for n in names))
    fns, rows = {}, []
    for name in names:
        fn, reset, _ = _build(name, h, W, t, torch)
        if fn is None:
            rows.append({"name": name, "error": reset})
            continue
        fn()  # warm-up: compilation, page faults
        reset()
        fns[name] = (fn, reset)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, reset) in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            res = fn()
            times[name].append(time.perf_counter() - t0)
            del res
            reset()
    for name, ts in times.items():
        ts.sort()
        rows.append({"name": name, "best_s": ts[0], "median_s": ts[len(ts) // 2], "peak_rss_over_inputs": None,
                     "extra_bytes": None, "tracemalloc_peak": None, "logits_bytes": shape[0] * shape[2] * 4})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x512x32000,1024x512x128256")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated candidates (default: all)")
    ap.add_argument("--json", default="")
    ap.add_argument("--interleaved", type=int, default=0, metavar="ROUNDS",
                    help="time the candidates in one process, in turns, for ROUNDS rounds (medians; no memory)")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: name|NxHxV
    a = ap.parse_args(argv)
    if a.one:
        name, shp = a.one.split("|")
        print(json.dumps(run_one(name, tuple(int(v) for v in shp.split("x")), a.reps, a.threads)))
        return 0
    from fastloss._bench.machine import machine_info

    info = machine_info()
    cands = [c for c in CANDIDATES if not a.only or c in a.only.split(",")]
    results = {}
    if a.interleaved:
        print(f"# {info.get('cpu_model', '?')} | threads {a.threads} | float32 | interleaved in one process, "
              f"medians of {a.interleaved} rounds")
        for shp in a.shapes.split(","):
            rows = run_interleaved(tuple(int(v) for v in shp.split("x")), cands, a.interleaved, a.threads)
            for r in rows:
                print(_fmt(shp, r, rows, key="median_s"), flush=True)
            results[shp] = rows
            _goals(shp, rows, key="median_s")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"machine": info, "threads": a.threads, "interleaved_rounds": a.interleaved,
                           "results": results}, f, indent=1)
        return 0
    print(f"# {info.get('cpu_model', '?')} | threads {a.threads} | float32 | best of {a.reps}")
    for shp in a.shapes.split(","):
        rows = []
        for name in cands:
            p = subprocess.run([sys.executable, __file__, "--one", f"{name}|{shp}", "--reps", str(a.reps),
                                "--threads", str(a.threads)], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONWARNINGS="ignore"))
            try:
                row = json.loads(p.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                row = {"name": name, "error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
            rows.append(row)
            print(_fmt(shp, row, rows), flush=True)
        results[shp] = rows
        _goals(shp, rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": info, "threads": a.threads, "reps": a.reps, "results": results}, f, indent=1)
    return 0


def _by(rows, name):
    return next((r for r in rows if r["name"] == name and "error" not in r), None)


def _fmt(shp, r, rows, key="best_s"):
    """One candidate's line; ``key``: the time its ratio to the products uses (best of the
    fresh-process runs; the median when interleaved)."""
    if "error" in r:
        return f"{shp:>18} {r['name']:<26} unavailable: {r['error']}"
    mb = (lambda v: "n/a" if v is None else f"{v / 2**20:7.1f} MB")
    prod = _by(rows, "products torch" if ("torch" in r["name"] and r["name"] != "products numpy") else "products numpy")
    ratio = f"{r[key] / prod[key]:5.2f}x products" if prod else ""
    return (f"{shp:>18} {r['name']:<26} best {r['best_s']:7.3f} s  median {r['median_s']:7.3f} s  {ratio:>16}  "
            f"peak RSS over inputs {mb(r['peak_rss_over_inputs'])}  extra {mb(r['extra_bytes'])}  "
            f"tracemalloc {mb(r['tracemalloc_peak'])}")


def _goals(shp, rows, key="best_s"):
    N, H, V = (int(v) for v in shp.split("x"))
    bound = N * V * 4 / 16
    peers = [r for r in rows if r["name"] in ("torch eager", "torch.compile", "F.linear_cross_entropy") and "error" not in r]
    best_peer = min((r[key] for r in peers), default=None)
    for r in rows:
        if not r["name"].startswith("fastloss") or "error" in r:
            continue
        torchy = "torch" in r["name"]
        prod = _by(rows, "products torch" if torchy else "products numpy")
        lines = []
        if prod:
            q = r[key] / prod[key]
            lines.append(f"time {q:.2f}x the products ({'torch' if torchy else 'numpy'} BLAS) {'met' if q <= 1.10 else 'NOT MET'} (<= 1.10)")
        if best_peer:
            lines.append(f"vs fastest PyTorch peer {r[key] / best_peer:.2f}x {'met' if r[key] < best_peer else 'NOT MET'}")
        if r["extra_bytes"] is not None:
            lines.append(f"extra {r['extra_bytes'] / 2**20:.1f} MB vs bound {bound / 2**20:.1f} MB "
                         f"{'met' if r['extra_bytes'] <= bound else 'NOT MET'}")
        print(f"  goal {shp} {r['name']}: " + "; ".join(lines))


if __name__ == "__main__":
    sys.exit(main())
