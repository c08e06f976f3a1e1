"""``fastloss bench``: time every kernel on every backend against the NumPy baseline.

What is measured
----------------
Each *workload* is one public function (``fl.cross_entropy`` ...) in one mode -- ``fwd``
(the loss only), ``fwd+grad`` (loss and gradient in one fused call) or ``bwd`` (the
softmax/log-softmax vector-Jacobian products) -- on one shape and dtype.  Every workload is
called through the public API with ``backend=NAME``, so the numbers include argument
validation and dispatch: they are what a user gets.  For each workload and backend:

time
    Best of ``k`` timed batches after a warm-up call (the warm-up also compiles Numba
    kernels, faults in output pages, and provides the result checked against NumPy).  A
    batch repeats the call enough times to last ``min_batch`` seconds, so that the clock's
    resolution does not matter for tiny shapes.  The minimum, not the mean, is reported: on a
    shared machine noise only ever adds time.
GB/s
    ``bytes_moved / time`` with ``bytes_moved`` = every input read once plus every output
    written once (the logits, the int64 targets, the gradient, the loss).  A kernel that
    reads its input twice (max pass, then exp pass) is not credited for the second read: this
    is the traffic an ideal fused kernel needs.
speedup
    ``time(numpy) / time(backend)``.  ``numpy`` always runs, as the baseline.
memcpy share
    ``GB/s(backend) / GB/s(np.copyto)`` where the copy moves the same traffic --
    ``bytes_moved / 2`` bytes read and as many written -- in the same run, timed the same way.
    An ideal streaming kernel reaches ~100 %; cache-resident shapes measure cache bandwidth on
    both sides.  ``np.copyto`` is single threaded, so a kernel using several cores can exceed
    100 %.
alloc
    Peak of ``tracemalloc`` during one call: memory the call allocates beyond its inputs and
    preallocated outputs (NumPy temporaries, fresh result arrays).  tracemalloc sees every
    NumPy array allocation made from Python, but not C-level ``malloc`` inside a compiled
    kernel (Numba's ``np.empty`` in ``nopython`` mode, a Cython scratch buffer): those kernels
    are designed to allocate nothing per element, and the number is a lower bound for them.
check
    The backend's result (loss, gradient, ...) compared with the NumPy backend's on the same
    inputs (float32: rtol 1e-4, atol 1e-5 of the largest magnitude; float64: 1e-9 / 1e-10).
    A mismatch is printed, recorded in the JSON, and makes the command exit with status 1.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import sys
import time

import numpy as np

from . import peers
from .cases import _FULL, _QUICK, _TINY, KERNELS, Case, Kernel, _fl, compare, make_case, outputs
from .machine import _threads_info, machine_info
from .plot import plot
from .timing import _TIMINGS, Timing, _Timing, alloc_peak, measure, memcpy_time, time_calls, time_in_turns

__all__ = ["add_arguments", "run", "KERNELS", "Kernel", "make_case", "Case", "outputs", "compare", "SCHEMA",
           "machine_info", "Progress", "time_calls", "time_in_turns", "Timing"]

SCHEMA = "fastloss-bench/1"

_CPU_BACKENDS = ("numpy", "numba", "cython")


# ============================================================================ progress
class Progress:
    """A plain-text progress bar on stderr: ``[#####.....] 12/40  0:31  label``.

    Redrawn in place with a carriage return, so it is shown only on a terminal (or when
    forced); a log file would collect every frame.
    """

    def __init__(self, total: int, enabled: bool, stream=None):
        self.total, self.enabled, self.done = max(total, 1), enabled, 0
        self.stream = sys.stderr if stream is None else stream
        self.start = time.perf_counter()
        self._width = 0

    def update(self, label: str) -> None:
        """Show ``label`` as the step now running (``done`` steps finished)."""
        if not self.enabled:
            return
        cols = shutil.get_terminal_size((100, 20)).columns
        frac = self.done / self.total
        bar = "#" * int(frac * 20)
        el = int(time.perf_counter() - self.start)
        head = f"[{bar:.<20}] {self.done}/{self.total} {el // 60}:{el % 60:02d}  "
        line = (head + label)[: max(cols - 1, 20)]
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def step(self) -> None:
        self.done += 1

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()


# ============================================================================ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``fastloss bench`` to ``parser`` (the ``bench`` subcommand)."""
    parser.description = (
        "Time every kernel on every available CPU backend against the NumPy baseline, and "
        "print time, GB/s, speedup vs NumPy, share of the memory-copy bandwidth measured in "
        "the same run, and the memory each call allocates.")
    parser.add_argument("--quick", action="store_true",
                        help="smaller shapes and fewer repeats: the whole run takes under a minute")
    parser.add_argument("--backend", action="append", metavar="NAME",
                        help="backend to time (repeatable, or a comma list); default: every "
                             "available CPU backend. numpy always runs, as the baseline")
    parser.add_argument("--json", metavar="PATH", help="write machine info and every row to PATH as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG chart (speedup vs NumPy, share of "
                                                       "memcpy bandwidth) to PATH; needs matplotlib")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for the compiled backends "
                                                                 "(fl.set_num_threads)")
    parser.add_argument("--repeat", type=int, metavar="K", help="best of K timed batches (default 7, --quick 5)")
    parser.add_argument("-k", "--filter", metavar="TEXT", action="append",
                        help="only workloads with each word of TEXT as a word of their name, or its "
                             "start up to a '_' (cross_entropy does not select binary_cross_entropy; "
                             "binary selects both binary losses; repeatable)")
    parser.add_argument("--peers", action="store_true",
                        help="also time the installed peers in the same run: PyTorch eager, torch.compile "
                             "(inductor), JAX jit, SciPy, and fastloss through its adapters fastloss.torch "
                             "and fastloss.jax (loss + gradient by autograd / jax.value_and_grad)")
    parser.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                        help="progress bar on stderr: auto shows it when stderr is a terminal")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    # tiny shapes covering every kernel and mode once: for the test suite
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


class _UsageError(Exception):
    pass


def _select_backends(fl, requested) -> tuple[list, dict]:
    statuses = fl.backends()
    if not requested:
        names = [n for n in _CPU_BACKENDS if n in statuses and statuses[n].available]
        skipped = {n: statuses[n].reason for n in _CPU_BACKENDS if n in statuses and not statuses[n].available}
    else:
        names, skipped = [], {}
        for item in requested:
            for n in (s.strip() for s in item.split(",")):
                if not n or n in names:
                    continue
                if n not in statuses:
                    raise _UsageError(f"--backend: expected one of {', '.join(statuses)}, found {n!r}")
                st = statuses[n]
                if not st.available:
                    raise _UsageError(f"--backend: backend {n!r} is unavailable: {st.reason}. "
                                      f"To install it: {st.install}")
                names.append(n)
    names = ["numpy"] + [n for n in names if n != "numpy"]
    return names, skipped


def _matches(text, label):
    """Whether ``--filter TEXT`` selects the workload ``label``: each word of TEXT is a word
    of the label or its start up to a ``_`` (so ``cross_entropy`` selects ``cross_entropy``
    but not ``binary_cross_entropy``, ``binary`` selects both binary losses, ``fwd`` selects
    ``fwd`` but not ``fwd+grad``)."""
    words = label.split()
    return all(any(w == t or w.startswith(t + "_") for w in words) for t in text.split())


def _workloads(args):
    base = _TINY if args.tiny else _QUICK if args.quick else _FULL
    out = []
    for fn, mode, shape, dt, reuse in base:
        label = f"{fn} {mode} {'x'.join(map(str, shape))} {dt.name}"
        if not reuse and mode == "fwd+grad":
            label += " (new grad)"
        if args.filter and not any(_matches(f, label) for f in args.filter):
            continue
        out.append((label, fn, mode, shape, dt, reuse))
    return out


def _fmt_time(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.3f} s"


def _fmt_bytes(n):
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _fmt(v, spec):
    return "-" if v is None else spec.format(v)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _table(rows) -> str:
    head = ("workload", "copy GB/s", "backend", "time", "GB/s", "vs numpy", "memcpy", "alloc", "alloc/np", "check")
    lines, prev = [], None
    for r in rows:
        first = r["workload"] != prev
        prev = r["workload"]
        check = ("ok" if r["ok"] else f"ERROR {r['error']}" if r["error"] else f"MISMATCH {r['max_err']:.1e}")
        lines.append((
            r["workload"] if first else "", f"{r['memcpy_gbps']:.3g}" if first else "", r["backend"],
            _fmt_time(r["seconds"]), _fmt(r["gbps"], "{:.3g}"), _fmt(r["speedup_vs_numpy"], "{:.2f}x"),
            _fmt(r["memcpy_share"] and 100 * r["memcpy_share"], "{:.0f}%"), _fmt_bytes(r["alloc_bytes"]),
            _fmt(r["alloc_vs_numpy"], "{:.2f}x"), check[:120]))
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    left = {0, 2, 9}

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [fmt(head), fmt(["-" * w for w in widths])]
    for i, l in enumerate(lines):
        if l[0] and i:
            out.append("")
        out.append(fmt(l))
    return "\n".join(out)


def _run_one(case, call, ref, timing, t_copy) -> dict:
    """Warm up ``call`` (a backend's or a peer's), check it against ``ref`` (NumPy's outputs;
    None for NumPy itself), time it, trace its allocations."""
    t0 = time.perf_counter()
    got = outputs(call())  # warm-up: compiles, faults pages in; its result is checked
    first = time.perf_counter() - t0
    ok, max_err = (True, 0.0) if ref is None else compare(ref, got, case.dtype)
    sec, reps, number = measure(call, timing)
    return {
        "seconds": sec, "repeats": reps, "number": number, "gbps": case.nbytes / sec / 1e9,
        "memcpy_share": t_copy / sec, "alloc_bytes": alloc_peak(call),
        "ok": ok, "max_err": max_err, "first_call_seconds": first, "_outputs": got,
    }


def _row(header, name, call, case, ref, base, timing, t_copy) -> dict:
    """The row of ``name`` (a backend or a peer) running ``call`` on ``case``: the workload's
    ``header`` fields and the measurement, or the error it raised (reported in the table; the
    run goes on). The NumPy row keeps its outputs under ``_outputs``: the reference of the rows
    after it."""
    row = {**header, "backend": name, "error": None}
    try:
        row.update(_run_one(case, call, ref, timing, t_copy))
    except Exception as exc:  # report it, keep benchmarking the others
        row.update(seconds=None, repeats=0, number=0, gbps=None, memcpy_share=None, alloc_bytes=None, ok=False,
                   max_err=None, first_call_seconds=None, error=f"{type(exc).__name__}: {exc}")
    base = row if name == "numpy" else base
    row["speedup_vs_numpy"] = _ratio(base and base["seconds"], row["seconds"])
    row["alloc_vs_numpy"] = _ratio(row["alloc_bytes"], base and base["alloc_bytes"])
    return row


def run(args) -> int:
    """Run the benchmark described by the parsed ``args``; print the table; return the exit status.

    0: every backend agreed with NumPy; 1: some result mismatched (the table says which);
    2: a usage error (unknown or unavailable backend, matplotlib missing for ``--plot``).
    """
    fl = _fl()
    err = sys.stderr
    try:
        backends, skipped = _select_backends(fl, getattr(args, "backend", None))
        if args.threads is not None and args.threads < 1:
            raise _UsageError(f"--threads: expected a positive integer, found {args.threads}")
        if args.repeat is not None and args.repeat < 1:
            raise _UsageError(f"--repeat: expected a positive integer, found {args.repeat}")
        if args.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise _UsageError("--plot needs matplotlib: pip install matplotlib (or: pip install \"fastloss[bench]\")")
        workloads = _workloads(args)
        if not workloads:
            raise _UsageError(f"--filter: no workload name matches any of {args.filter}")
    except _UsageError as e:
        print(f"fastloss bench: error: {e}", file=err)
        return 2

    if args.threads is not None:
        fl.set_num_threads(args.threads)
    timing = _TIMINGS["tiny" if args.tiny else "quick" if args.quick else "full"]
    if args.repeat is not None:
        timing = _Timing(args.repeat, min(timing.min_repeat, args.repeat), timing.min_batch,
                         timing.budget if args.repeat <= timing.repeat else math.inf)
    show = args.progress == "always" or (args.progress == "auto" and err.isatty())
    peer_names = [p for p in peers.PEERS if getattr(args, "peers", False)]
    not_run = {}  # peer -> why it did not run (the first reason met)
    progress = Progress(len(workloads) * (len(backends) + len(peer_names) + 2), show, err)
    rng = np.random.default_rng(args.seed)
    rows, t_start = [], time.perf_counter()

    try:
        for label, fn, mode, shape, dt, reuse in workloads:
            progress.update(f"{label}: preparing inputs")
            case = make_case(fn, mode, shape, dt, rng, reuse)
            progress.step()
            progress.update(f"{label}: np.copyto baseline")
            t_copy = memcpy_time(case.nbytes, timing)
            progress.step()
            header = {"workload": label, "function": fn, "mode": mode, "shape": list(shape), "dtype": dt.name,
                      "note": case.note, "bytes_moved": case.nbytes, "memcpy_seconds": t_copy,
                      "memcpy_gbps": case.nbytes / t_copy / 1e9}
            ref = base = None
            for b in backends:
                progress.update(f"{label}: {b}")
                row = _row(header, b, (lambda c=case.call, b=b: c(b)), case, ref, base, timing, t_copy)
                if b == "numpy":
                    base = row
                    ref = row.pop("_outputs", None)
                row.pop("_outputs", None)
                rows.append(row)
                progress.step()
            if case.yardstick is not None:  # e.g. the matrix products of a linear layer, not checked
                yname, ycall = case.yardstick
                progress.update(f"{label}: {yname}")
                row = _row(header, yname, ycall, case, None, base, timing, t_copy)
                row.pop("_outputs", None)
                rows.append(row)
            for p in peer_names:
                progress.update(f"{label}: {p}")
                try:
                    call = peers.peer_callable(p, case.function, case.mode, case.inputs, case.dtype)
                except peers.Unavailable as e:  # no form of this workload, or not installed
                    not_run.setdefault(p, str(e))
                else:
                    row = _row(header, p, call, case, ref, base, timing, t_copy)
                    row.pop("_outputs", None)
                    rows.append(row)
                progress.step()
            del case, ref
            gc.collect()
    finally:
        progress.close()

    elapsed = time.perf_counter() - t_start
    info = machine_info()
    threads = _threads_info(fl)
    threads["requested"] = args.threads
    print(f"fastloss bench ({'tiny' if args.tiny else 'quick' if args.quick else 'full'}): "
          f"{info['cpu_model']}, {info['cpus_usable']} usable cores, threads={threads.get('fastloss', threads.get('numba', '?'))}; "
          f"numpy {info['numpy']}, numba {info['numba']}")
    print("time: best of k after warm-up | GB/s: inputs read + outputs written once | copy GB/s: np.copyto "
          "moving the same bytes | memcpy: GB/s / copy GB/s | alloc: tracemalloc peak of one call\n"
          "gradients go to a reused grad_out (softmax: out=) except rows marked (new grad)")
    if any(r["backend"] == "products" for r in rows):
        print("linear_cross_entropy (N x H x V): 'products' is the three matrix products alone on NumPy's BLAS "
              "(no cross-entropy, logits preallocated): the goal is fastloss within 1.10x of it")
    if "cuda" in backends:
        print("cuda: NumPy inputs are offloaded, so its times include the host<->device copies")
    if peer_names:
        print("peers (--peers): the framework's own form of each workload, in the same run; fastloss.torch / "
              "fastloss.jax: fastloss through its adapters, with the gradient by autograd / jax.value_and_grad")
    peers_run = [p for p in peer_names if any(r["backend"] == p for r in rows)]
    skipped = {**skipped, **{p: why for p, why in not_run.items() if p not in peers_run}}
    if skipped:
        print("not run: " + "; ".join(f"{n} ({why})" for n, why in skipped.items()))
    print()
    print(_table(rows))
    firsts = {b: sum(r["first_call_seconds"] or 0.0 for r in rows if r["backend"] == b)
              for b in list(backends) + peers_run}
    print(f"\n{len(rows)} measurements in {elapsed:.1f} s; first calls (JIT compile or cache load, page "
          "faults): " + ", ".join(f"{b} {t:.1f} s" for b, t in firsts.items()))
    if firsts.get("numba", 0.0) > 10.0:
        print("(most of the numba first-call time is JIT compilation; `fastloss warmup` compiles and caches "
              "every kernel once, and later runs load them from the cache)")
    bad = [r for r in rows if not r["ok"]]
    if bad:
        print(f"FAILED (an error, or a result that disagrees with numpy) in {len(bad)} row(s):", file=err)
        for r in bad:
            print(f"  {r['workload']} [{r['backend']}]: " +
                  (r["error"] or f"max relative error {r['max_err']:.3g} vs numpy"), file=err)

    if args.json:
        doc = {
            "schema": SCHEMA,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "mode": "tiny" if args.tiny else "quick" if args.quick else "full",
            "elapsed_seconds": elapsed,
            "machine": info,
            "threads": threads,
            "backends": list(backends),
            "peers": peers_run,
            "not_run": skipped,
            "method": {
                "time": f"best of up to {timing.repeat} batches after one warm-up call; gc disabled",
                "bytes_moved": "every input read once + every output written once",
                "memcpy": "np.copyto moving the same total bytes (half read, half written), same timing",
                "alloc": "tracemalloc peak during one call (NumPy/Python allocations; C mallocs "
                         "inside compiled kernels are not traced)",
            },
            "rows": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                     for r in rows],
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, info, threads, args.plot)
        print(f"wrote {args.plot}")
    return 1 if bad else 0
