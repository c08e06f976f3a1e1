"""The goals of the framework adapters (fastloss.torch, fastloss.jax), measured in one run.

=================================================================  ===============================
``fastloss.torch.cross_entropy`` forward + backward, 2048x32000    >= 5x faster than
                                                                   ``F.cross_entropy`` eager, >= 3x
                                                                   faster than ``torch.compile``d
``fastloss.torch.binary_cross_entropy_with_logits``, 16M elements  >= 3x faster than eager
adapter overhead over the raw fastloss call, 64x10 fwd+bwd         <= 25 us
``jax.jit(jax.value_and_grad(fastloss.jax.cross_entropy))``,       >= 3x faster than the same of
2048x32000                                                         the ``jax.nn`` formula
=================================================================  ===============================

float32, the library's threads (PyTorch's set to the same number), CPU. Every implementation
is timed with :func:`fastloss._bench.time_calls` (a warm-up call -- compilation, tracing --
then the best of ``--reps`` timed calls) in the same process, on the same arrays, with the
forms of :mod:`fastloss._bench.peers` (the pytest-benchmark suite's and ``fastloss bench
--peers``'s): the loss and ``torch.autograd.grad`` of it (what ``loss.backward()`` computes),
and ``jax.block_until_ready(jit(value_and_grad(f))(...))``. Each result is checked against
fastloss's NumPy backend before it is timed.

The overhead is ``best(fastloss.torch forward + backward) - best(fl.cross_entropy(x, t,
return_grad=True))`` at 64x10, with, for scale, a no-op ``torch.autograd.Function``'s forward +
backward (PyTorch's own floor for any Python autograd function), a bare Function around the
raw call (zero-copy views in, the saved gradient out: the floor of any adapter built this way)
and ``F.cross_entropy``'s.

Usage::

    python bench/adapters.py [--reps 10] [--threads N] [--backend NAME] [--json FILE] [--no-compile] [--no-jax]
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import fastloss as fl
from fastloss import _bench
from fastloss._bench import peers

SHAPES = {"ce": (2048, 32000), "bce": (4096, 4096), "overhead": (64, 10)}
TINY = {"ce": (64, 500), "bce": (64, 64), "overhead": (64, 10)}


def _backend_name():
    from fastloss._dispatch import resolve

    return resolve(None).NAME  # what "auto" (or the set backend) runs on this machine


def _best(fn, reps, warmup=True):
    return _bench.time_calls(fn, reps, min_reps=reps, warmup=warmup).best


def _check(case, ref, fn):
    """``fn()`` against ``ref`` (the NumPy backend's outputs); the call is also the warm-up."""
    ok, err = _bench.compare(ref, _bench.outputs(fn()), case.dtype)
    if not ok:
        raise AssertionError(f"{case.function}: result differs from the numpy backend's (max error {err:.3g})")


def _impls(case, names):
    out = {}
    for name in names:
        try:
            out[name] = peers.peer_callable(name, case.function, "fwd+grad", case.inputs, case.dtype)
        except peers.Unavailable as e:
            print(f"  {name}: not run ({e})")
    return out


def measure(reps=10, shapes=SHAPES, compile_=True, jax=True, log=print) -> dict:
    import torch

    torch.set_num_threads(fl.get_num_threads())
    rng = np.random.default_rng(0)
    res = {"threads": fl.get_num_threads(), "torch": torch.__version__, "times": {}}
    t = res["times"]

    torch_names = ["fastloss.torch", "torch"] + (["torch.compile"] if compile_ else [])
    for key, fn in (("ce", "cross_entropy"), ("bce", "binary_cross_entropy_with_logits")):
        case = _bench.make_case(fn, "fwd+grad", shapes[key], np.float32, rng, reuse=False)
        names = torch_names + (["fastloss.jax", "jax"] if (jax and key == "ce") else [])
        ref = _bench.outputs(case.call("numpy"))  # once per workload: NumPy takes ~0.3 s at 2048x32000
        for name, call in _impls(case, names).items():
            _check(case, ref, call)
            t[f"{key} {name}"] = _best(call, reps, warmup=False)
            log(f"  {fn} {'x'.join(map(str, shapes[key]))} {name:15s} {t[f'{key} {name}'] * 1e3:9.2f} ms")

    # the adapter's overhead at a tiny shape, and the floors it sits on
    case = _bench.make_case("cross_entropy", "fwd+grad", shapes["overhead"], np.float32, rng, reuse=False)
    x, tg = case.inputs.values()
    small = {"raw fl.cross_entropy": lambda: fl.cross_entropy(x, tg, return_grad=True)}
    small.update(_impls(case, ["fastloss.torch", "torch"]))

    class Noop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a.new_zeros(())

        @staticmethod
        def backward(ctx, g):
            return g.expand(ctx_shape)

    class Bare(torch.autograd.Function):  # the least any autograd.Function around the raw call does
        @staticmethod
        def forward(ctx, a, b):
            loss, g = fl.cross_entropy(a.detach().numpy(), b.numpy(), return_grad=True)
            g = torch.from_numpy(g)
            ctx.mark_non_differentiable(g)
            ctx.set_materialize_grads(False)
            ctx.save_for_backward(g)
            return torch.from_numpy(np.asarray(loss)), g

        @staticmethod
        def backward(ctx, g, _):
            return ctx.saved_tensors[0] * g, None

    xt = torch.from_numpy(x).requires_grad_(True)
    tt = torch.from_numpy(tg)
    ctx_shape = xt.shape
    small["no-op autograd.Function"] = lambda: torch.autograd.grad(Noop.apply(xt), xt)
    small["bare autograd.Function"] = lambda: torch.autograd.grad(Bare.apply(xt, tt)[0], xt)
    for name, call in small.items():
        t[f"overhead {name}"] = min(_best(call, max(reps, 200)) for _ in range(5))
        log(f"  cross_entropy {'x'.join(map(str, shapes['overhead']))} {name:24s} {t[f'overhead {name}'] * 1e6:8.1f} us")
    return res


def goals(res) -> list:
    t = res["times"]

    def ratio(a, b):
        return t[b] / t[a] if a in t and b in t else None

    over = (t["overhead fastloss.torch"] - t["overhead raw fl.cross_entropy"]) * 1e6
    rows = [
        ("fastloss.torch CE 2048x32000 vs F.cross_entropy eager", ratio("ce fastloss.torch", "ce torch"), ">=", 5.0, "x"),
        ("fastloss.torch CE 2048x32000 vs torch.compile", ratio("ce fastloss.torch", "ce torch.compile"), ">=", 3.0, "x"),
        ("fastloss.torch BCE-logits 16M vs eager", ratio("bce fastloss.torch", "bce torch"), ">=", 3.0, "x"),
        ("adapter overhead, CE 64x10 fwd+bwd", over, "<=", 25.0, " us"),
        ("fastloss.jax CE 2048x32000 vs the jax.nn formula (jit, value_and_grad)", ratio("ce fastloss.jax", "ce jax"),
         ">=", 3.0, "x"),
    ]
    out = []
    for name, value, op, goal, unit in rows:
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        out.append({"goal": name, "value": value, "target": f"{op} {goal:g}{unit.strip()}", "unit": unit.strip(),
                    "met": met})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--backend", help="the host backend fastloss (and so the adapters) runs on (default: auto)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (inductor compiles for ~1 min)")
    ap.add_argument("--no-jax", action="store_true")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # small shapes: the test suite's
    args = ap.parse_args(argv)
    if args.threads:
        fl.set_num_threads(args.threads)
    if args.backend:
        fl.set_backend(args.backend)
    info = _bench.machine_info()
    print(f"fastloss adapters: {info['cpu_model']}, {info['cpus_usable']} usable cores, threads={fl.get_num_threads()}, "
          f"backend={_backend_name()}")
    res = measure(args.reps, TINY if args.tiny else SHAPES, not args.no_compile, not args.no_jax)
    res["backend"] = _backend_name()
    res["goals"] = goals(res)
    res["machine"] = info
    print()
    for g in res["goals"]:
        v = "-" if g["value"] is None else f"{g['value']:.2f}{'' if g['unit'] == 'x' else ' '}{g['unit']}"
        verdict = "not measured" if g["met"] is None else ("met" if g["met"] else "NOT MET")
        print(f"{g['goal']:72s} {v:>10s}  (goal {g['target']})  {verdict}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
