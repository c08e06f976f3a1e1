"""Scaling of :func:`fastloss.distributed.cross_entropy` with the number of processes on this machine.

The vocab-parallel loss, forward + ``backward()``, on ``P`` processes of one ``gloo`` group on
127.0.0.1 (``torch.multiprocessing`` spawn), the classes split evenly (the first ranks get
one more class when ``P`` does not divide them). Each rank builds only its own block of the
logits (seeded; the values do not change the work) and the whole target (the same on every
rank).  A step is timed on every rank between two barriers and the slowest rank's time counts
(the step ends when the last rank has its gradient): ``all_reduce(MAX)`` of the per-rank times,
after the timing.  One untimed warm-up step (kernel compilation, first-touch of the buffers),
then ``--reps`` steps; the median and the best are reported, with the speed-up of the median
against ``P = 1`` (a group of one: the same code, its collectives trivial).  A last row times
``fastloss.torch.cross_entropy`` on the full logits in the parent process, without any group.

Threads: each process sets ``torch.set_num_threads`` and ``fastloss.set_num_threads`` to
``--threads`` (default: the usable cores divided by ``P``, at least 1), so that ``P`` processes
do not oversubscribe the cores.  On a machine with fewer cores than processes the ranks share
cores and the speed-up is bounded by the cores, not by the method.

Usage::

    python bench/distributed_scaling.py                      # 4096 x 32000 float32, P = 1, 2, 4
    python bench/distributed_scaling.py --rows 1024 --classes 8000 --procs 1,2 --reps 3
    python bench/distributed_scaling.py --json out.json
"""
from __future__ import annotations


import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

from fastloss._cli import _cpu_model  # the model name `fastloss info` prints


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _blocks(V: int, P: int):
    """``[start, stop)`` of each rank's classes: an even split, the remainder to the first ranks."""
    q, r = divmod(V, P)
    starts = [i * q + min(i, r) for i in range(P + 1)]
    return list(zip(starts[:-1], starts[1:]))


def _rank(rank, P, port, args, out_path):
    import torch
    import torch.distributed as dist

    import fastloss as fl
    import fastloss.distributed as fld

    torch.set_num_threads(args.threads_per_proc)
    fl.set_num_threads(args.threads_per_proc)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=P)
    try:
        dt = getattr(torch, args.dtype)
        a, b = _blocks(args.classes, P)[rank]
        g = torch.Generator().manual_seed(1000 + rank)
        shard = (torch.randn(args.rows, b - a, generator=g) * 2).to(dt).requires_grad_()
        t = torch.randint(0, args.classes, (args.rows,), generator=torch.Generator().manual_seed(0))

        def step():
            shard.grad = None
            loss = fld.cross_entropy(shard, t, class_offset=a, num_classes=args.classes, backend=args.backend)
            loss.backward()
            return loss

        loss = step()  # warm-up: kernels compiled or loaded, buffers touched
        times = []
        for _ in range(args.reps):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            dist.barrier()  # the step ends when the slowest rank is done
            times.append(time.perf_counter() - t0)
        slowest = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"times": slowest.tolist(), "loss": float(loss.detach())}, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(P: int, args) -> dict:
    """Spawn ``P`` ranks, wait (``--timeout``; killed beyond it), return rank 0's record."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rank0.json")
        ctx = mp.start_processes(_rank, args=(P, _free_port(), args, out), nprocs=P, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + args.timeout
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{P} processes did not finish within {args.timeout} s (killed)")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join(5)
        with open(out) as f:
            return json.load(f)


def run_single(args) -> dict:
    """``fastloss.torch.cross_entropy`` on the full logits in this process, no group."""
    import torch

    import fastloss as fl
    import fastloss.torch as flt

    threads = max(1, _cores()) if args.threads is None else args.threads
    torch.set_num_threads(threads)
    fl.set_num_threads(threads)
    x = (torch.randn(args.rows, args.classes, generator=torch.Generator().manual_seed(1000)) * 2)
    x = x.to(getattr(torch, args.dtype)).requires_grad_()
    t = torch.randint(0, args.classes, (args.rows,), generator=torch.Generator().manual_seed(0))
    times, loss = [], None
    for i in range(args.reps + 1):
        x.grad = None
        t0 = time.perf_counter()
        loss = flt.cross_entropy(x, t, backend=args.backend)
        loss.backward()
        if i:  # the first call is the warm-up
            times.append(time.perf_counter() - t0)
    return {"times": times, "loss": float(loss.detach()), "threads": threads}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--classes", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--procs", default="1,2,4", help="comma-separated process counts (default 1,2,4)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None,
                   help="torch and fastloss threads per process (default: usable cores // P, at least 1)")
    p.add_argument("--backend", default=None, help="fastloss backend (default: auto)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per process count before killing it")
    p.add_argument("--no-single", action="store_true", help="skip the no-group fastloss.torch row")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    procs = [int(v) for v in args.procs.split(",") if v.strip()]
    cores = _cores()
    print(f"CPU: {_cpu_model()}, {cores} usable cores; {args.rows} rows x {args.classes} classes {args.dtype}, "
          f"forward + backward, median of {args.reps} (slowest rank per step)")
    print(f"{'procs':>5} {'threads/proc':>12} {'median ms':>10} {'best ms':>9} {'speed-up':>9}")
    rows, base = [], None
    for P in procs:
        args.threads_per_proc = args.threads or max(1, cores // P)
        rec = run_world(P, args)
        med, best = statistics.median(rec["times"]) * 1e3, min(rec["times"]) * 1e3
        base = med if base is None else base
        rows.append({"procs": P, "threads_per_proc": args.threads_per_proc, "median_ms": med, "best_ms": best,
                     "speedup_vs_first": base / med, "loss": rec["loss"]})
        print(f"{P:>5} {args.threads_per_proc:>12} {med:>10.1f} {best:>9.1f} {base / med:>8.2f}x", flush=True)
    single = None
    if not args.no_single:
        s = run_single(args)
        med, best = statistics.median(s["times"]) * 1e3, min(s["times"]) * 1e3
        single = {"threads": s["threads"], "median_ms": med, "best_ms": best, "loss": s["loss"]}
        print(f"fastloss.torch, full logits, no group, {s['threads']} threads: median {med:.1f} ms, best {best:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": _cpu_model(), "cores": cores, "rows": args.rows, "classes": args.classes,
                       "dtype": args.dtype, "reps": args.reps, "backend": args.backend, "worlds": rows,
                       "single": single}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
