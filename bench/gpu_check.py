"""Check and time the ``cuda`` backend on a real GPU (finishes in well under 5 minutes).

1. Verifies every kernel entry point (offload path) and a few device-array paths of the public API against
   the ``numpy`` reference on small random inputs (float32 and float64), and bfloat16
   device arrays (torch.bfloat16 tensors) through the public API, and the fused linear +
   cross-entropy with every argument on the device (Numba device arrays: fastloss's GEMM
   kernel; PyTorch CUDA tensors: cuBLAS).
2. Times, with CUDA events on device-resident data (no host transfers):
   cross-entropy forward+gradient 16384x32768 and 4096x131072 float32, the class-sharded
   cross-entropy kernel (one pass, the global lse given) against the unsharded one on the
   same 4096x32000 float32 logits, and logsumexp and
   bce_with_logits forward+gradient on 256M float32 elements; each as GB/s of its
   compulsory traffic next to a device-to-device copy of the same bytes, and -- when PyTorch
   with CUDA is installed -- next to torch.nn.functional forward+backward (and the first
   cross-entropy shape once more with torch.bfloat16 logits, against torch in bfloat16);
   with PyTorch, linear_cross_entropy 4096x512x32000 on CUDA tensors against the three matrix
   products alone and F.linear + F.cross_entropy, time and peak allocated memory.

Usage: ``python bench/gpu_check.py [--quick]`` (``--quick`` quarters the big shapes).

``NUMBA_ENABLE_CUDASIM=1 python bench/gpu_check.py --sim`` runs the same code under Numba's
CUDA simulator on tiny shapes (seconds): the checks are real, the timings meaningless (wall
clock of the simulator).  The test suite does this so that the script cannot rot between GPU
sessions (tests/test_cuda_sim.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from numba import cuda  # noqa: E402

import fastloss as fl  # noqa: E402
from fastloss import _validate  # noqa: E402
from fastloss._backends import _cuda_arrays as D  # noqa: E402
from fastloss._backends import cuda_backend as C  # noqa: E402
from fastloss._backends import numpy_backend as R  # noqa: E402
from fastloss import _bench  # noqa: E402
from fastloss._bench.timing import time_calls  # noqa: E402

NOTES: list[str] = []  # lines printed after the timing table
BF16 = _validate._BF16  # ml_dtypes.bfloat16 (None without ml_dtypes)
# bfloat16 results: both paths compute in float32 and round once, so one bfloat16 ulp
TOL = {np.float32: dict(rtol=2e-6, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-12), BF16: dict(rtol=8e-3, atol=1e-6)}


def _torch_cuda():
    """``torch`` when PyTorch with a usable CUDA device is installed, else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _bf16_device():
    """(to_device, to_host) for bfloat16 device arrays: torch.bfloat16 CUDA tensors on a GPU,
    ml_dtypes.bfloat16 simulator arrays in the dry run; None where neither exists (Numba's
    own device arrays cannot hold bfloat16)."""
    if BF16 is None:
        return None
    if D._simulated():
        return cuda.to_device, lambda d: d.copy_to_host()
    torch = _torch_cuda()
    if torch is None:
        return None
    return (lambda a: torch.from_numpy(a.astype(np.float32)).cuda().to(torch.bfloat16),
            lambda d: d.float().cpu().numpy().astype(BF16))


# ----------------------------------------------------------------------------- verification
def verify(shapes=((64, 1000), (8, 262_144)), ew=(256, 1000), dc=(50, 40)) -> list[tuple[str, str, float, bool]]:
    rng = np.random.default_rng(0)
    rows = []

    def rec(name, dt, a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        err = float(np.nanmax(np.abs(a - b) / (np.abs(a) + 1))) if a.size else 0.0
        ok = np.allclose(a, b, equal_nan=True, **TOL[dt])
        rows.append((name, np.dtype(dt).name, err, bool(ok)))

    for dt in (np.float32, np.float64):
        for n, c in shapes:
            x = (rng.standard_normal((n, c)) * 3).astype(dt)
            x[0, 5] = -np.inf
            a, b = np.empty(n, dt), np.empty(n, dt)
            R.logsumexp(x, a)
            C.logsumexp(x, b)
            rec(f"logsumexp C={c}", dt, a, b)
            for f in ("softmax", "log_softmax"):
                a, b = np.empty_like(x), np.empty_like(x)
                getattr(R, f)(x, a)
                getattr(C, f)(x, b)
                rec(f"{f} C={c}", dt, a, b)
            g = rng.standard_normal(x.shape).astype(dt)
            y = np.empty_like(x)
            R.softmax(x, y)
            for f in ("softmax_backward", "log_softmax_backward"):
                a, b = np.empty_like(x), np.empty_like(x)
                getattr(R, f)(g, y, a)
                getattr(C, f)(g, y, b)
                rec(f"{f} C={c}", dt, a, b)
            t = rng.integers(0, c, n)
            t[1] = -100
            w = rng.random(c).astype(dt)
            gs = np.full(n, 1.0)  # O(1)-scaled gradients
            la, lb = np.empty(n), np.empty(n)
            ga, gb = np.empty_like(x), x.copy()
            R.cross_entropy(x, t, w, -100, 0.1, 1e-4, 0.0, la, None, ga, gs)
            C.cross_entropy(gb, t, w, -100, 0.1, 1e-4, 0.0, lb, None, gb, gs)  # in place
            rec(f"cross_entropy loss C={c}", dt, la, lb)
            rec(f"cross_entropy grad C={c}", dt, ga, gb)
            # soft cap (Gemma 2's 30 on logits x 10) and the row lse, ignored row included
            xs = x * dt(10)
            ea, eb = np.empty(n), np.zeros(2 * n)[::2]
            gb = xs.copy()
            R.cross_entropy(xs, t, w, -100, 0.1, 1e-4, 30.0, la, ea, ga, gs)
            C.cross_entropy(gb, t, w, -100, 0.1, 1e-4, 30.0, lb, eb, gb, gs)  # in place
            rec(f"cross_entropy softcap loss+lse C={c}", dt, np.r_[la, ea], np.r_[lb, eb])
            rec(f"cross_entropy softcap grad C={c}", dt, ga, gb)
            p = rng.random(x.shape).astype(dt)
            p /= p.sum(1, keepdims=True)
            R.cross_entropy_soft(x, p, None, 0.0, 0.0, 0.0, la, None, ga, gs)
            C.cross_entropy_soft(x, p, None, 0.0, 0.0, 0.0, lb, None, gb, gs)
            rec(f"cross_entropy_soft C={c}", dt, np.r_[la, ga.ravel()], np.r_[lb, gb.ravel()])
            R.cross_entropy_soft(xs, p, w, 0.1, 1e-4, 30.0, la, ea, ga, gs)
            C.cross_entropy_soft(xs, p, w, 0.1, 1e-4, 30.0, lb, eb, gb, gs)
            rec(f"cross_entropy_soft softcap C={c}", dt, np.r_[la, ea, ga.ravel()], np.r_[lb, eb, gb.ravel()])
            # class-sharded (two shards, the first one in place), given the reference's global
            # float64 lse of the capped rows: each shard against the reference's shard, and
            # the shares' sum and the gradients side by side against the unsharded reference
            ea = np.empty(n)
            R.cross_entropy(xs, t, w, -100, 0.1, 1e-4, 30.0, la, ea, ga, gs)
            shares, parts = [], []
            for lo, hi in ((0, c // 3), (c // 3, c)):
                xk = np.ascontiguousarray(xs[:, lo:hi])
                sa, sb = np.empty(n), np.empty(n)
                gka, gkb = np.empty_like(xk), (xk.copy() if lo == 0 else np.empty_like(xk))
                R.cross_entropy_shard(xk, t, w, -100, 0.1, 1e-4, 30.0, ea, lo, c, sa, gka, gs)
                C.cross_entropy_shard(gkb if lo == 0 else xk, t, w, -100, 0.1, 1e-4, 30.0, ea, lo, c, sb, gkb, gs)
                rec(f"cross_entropy_shard [{lo},{hi}) C={c}", dt, np.r_[sa, gka.ravel()], np.r_[sb, gkb.ravel()])
                shares.append(sb)
                parts.append(gkb)
            rec(f"cross_entropy_shard shards = unsharded C={c}", dt, np.r_[la, ga.ravel()],
                np.r_[shares[0] + shares[1], np.concatenate(parts, axis=1).ravel()])
        z = (rng.standard_normal(ew) * 20).astype(dt)
        yv = rng.random(z.shape).astype(dt)
        pv = rng.random(z.shape).astype(dt)
        w = np.broadcast_to(rng.random(ew[1]).astype(dt), z.shape)
        go = rng.random(z.shape).astype(dt)
        var = np.abs(rng.standard_normal(z.shape)).astype(dt)
        cases = [
            ("bce_with_logits", (z, yv, w, w)),
            ("bce", (pv, yv, w)),
            ("kl_div", (z, yv, False)),
            ("kl_div", (z, np.log(yv), True)),
            ("mse", (z, yv)),
        ]
        for name, args in cases:
            la, lb, ga, gb = (np.empty_like(z) for _ in range(4))
            sa = getattr(R, name)(*args, la, ga, 0.5, go)
            sb = getattr(C, name)(*args, lb, gb, 0.5, go)
            rec(name, dt, np.r_[sa, la.ravel(), ga.ravel()], np.r_[sb, lb.ravel(), gb.ravel()])
        o = [np.empty_like(z) for _ in range(6)]
        sa = R.gaussian_nll(z, yv, var, True, 1e-6, o[0], o[1], o[2], 0.5, None)
        sb = C.gaussian_nll(z, yv, var, True, 1e-6, o[3], o[4], o[5], 0.5, None)
        rec("gaussian_nll", dt, np.r_[sa, o[0].ravel(), o[1].ravel(), o[2].ravel()],
            np.r_[sb, o[3].ravel(), o[4].ravel(), o[5].ravel()])
        # Numba device arrays through the public API, class axis 0
        x = rng.standard_normal(dc).astype(dt)
        t = rng.integers(0, dc[0], dc[1])
        lv, g = fl.cross_entropy(cuda.to_device(x), cuda.to_device(t), axis=0, return_grad=True)
        la, ga = np.empty(dc[1]), np.empty(dc[::-1], dt)
        R.cross_entropy(np.ascontiguousarray(x.T), t, None, -100, 0.0, 0.0, 0.0, la, None, ga, np.full(dc[1], 1 / dc[1]))
        rec("device cross_entropy axis=0", dt, np.r_[la.mean(), ga.T.ravel()],
            np.r_[lv, g.copy_to_host().ravel()])
        # the same, class-sharded through the public device path (device lse): the shards'
        # summed loss and side-by-side gradients against the unsharded numpy backend
        x64 = x.astype(np.float64)
        m = x64.max(axis=0)
        lse = m + np.log(np.exp(x64 - m).sum(axis=0))
        dl = cuda.to_device(lse)
        cut = dc[0] // 2
        l0, g0 = fl.cross_entropy(cuda.to_device(np.ascontiguousarray(x[:cut])), cuda.to_device(t), axis=0,
                                  lse=dl, class_offset=0, num_classes=dc[0], return_grad=True)
        l1, g1 = fl.cross_entropy(cuda.to_device(np.ascontiguousarray(x[cut:])), cuda.to_device(t), axis=0,
                                  lse=dl, class_offset=cut, num_classes=dc[0], return_grad=True)
        hl, hg = fl.cross_entropy(x, t, axis=0, return_grad=True, backend="numpy")
        rec("device cross_entropy sharded axis=0", dt, np.r_[hl, hg.ravel()],
            np.r_[float(l0) + float(l1), np.concatenate([g0.copy_to_host(), g1.copy_to_host()]).ravel()])
    # bfloat16 device arrays through the public API (computed in float32, answered in bfloat16)
    # against the numpy backend on the same bfloat16 values
    bf = _bf16_device()
    if bf is not None:
        to_dev, to_host = bf
        x = (rng.standard_normal(dc) * 3).astype(BF16)
        t = rng.integers(0, dc[1], dc[0])
        lv, g = fl.cross_entropy(to_dev(x), t, return_grad=True)
        hl, hg = fl.cross_entropy(x, t, return_grad=True, backend="numpy")
        rec("device cross_entropy", BF16, np.r_[hl, hg.astype(np.float64).ravel()],
            np.r_[lv, to_host(g).astype(np.float64).ravel()])
        for f in ("softmax", "log_softmax", "logsumexp"):
            rec(f"device {f}", BF16, getattr(fl, f)(x, backend="numpy").astype(np.float64),
                to_host(getattr(fl, f)(to_dev(x))).astype(np.float64))
    else:
        print("bfloat16 device checks skipped: they need ml_dtypes and PyTorch with CUDA")
    # fused linear + cross-entropy with every argument on the device, in float64 (the products'
    # summation order differs; float64 keeps the comparison tight): Numba device arrays (the
    # loop's own GEMM kernel) and PyTorch CUDA tensors (cuBLAS), against the host NumPy path;
    # ignored rows (gathered and scattered back), a bias, label smoothing, several chunks
    n, h, v = (dc[0] + 3, 4, dc[1] + 4)
    x = rng.standard_normal((n, h))
    W = rng.standard_normal((v, h)) * 0.5
    b = rng.standard_normal(v)
    t = rng.integers(0, v, n)
    t[::4] = -100
    kw = dict(label_smoothing=0.1, return_grad=True, chunk_size=max(2, n // 3))
    hl, hg = fl.linear_cross_entropy(x, W, t, linear_bias=b, backend="numpy", **kw)
    want = np.r_[hl, np.concatenate([g.ravel() for g in hg])]
    dl, dg = fl.linear_cross_entropy(cuda.to_device(x), cuda.to_device(W), cuda.to_device(t),
                                     linear_bias=cuda.to_device(b), **kw)
    rec("device linear_cross_entropy (GEMM kernel)", np.float64, want,
        np.r_[dl, np.concatenate([g.copy_to_host().ravel() for g in dg])])
    torch = _torch_cuda()
    if torch is not None:
        tl, tg = fl.linear_cross_entropy(*(torch.from_numpy(a).cuda() for a in (x, W, t)),
                                         linear_bias=torch.from_numpy(b).cuda(), **kw)
        rec("device linear_cross_entropy (torch cuBLAS)", np.float64, want,
            np.r_[float(tl), np.concatenate([g.cpu().numpy().ravel() for g in tg])])
    return rows


# ----------------------------------------------------------------------------- timing
def _event_batch(fn, number):
    """Seconds of ``number`` calls of ``fn`` on the default stream, between two CUDA events."""
    e0, e1 = cuda.event(), cuda.event()
    e0.record()
    for _ in range(number):
        fn()
    e1.record()
    e1.synchronize()
    return e0.elapsed_time(e1) / 1e3


def _time(fn, reps=5):
    """Median milliseconds of ``fn`` (which launches on the default stream): the benchmarks'
    one timer (:func:`fastloss._bench.time_calls`) reading CUDA events.

    Under the simulator (events record no time) the wall clock of one simulated call instead.
    """
    if D._simulated():  # the simulator is slow, synchronous, and its times mean nothing
        return time_calls(fn, 1).median * 1e3
    return time_calls(fn, reps, batch=_event_batch).median * 1e3


def _copy_ms(nbytes):
    src = cuda.device_array(nbytes // 4, np.float32)
    dst = cuda.device_array(nbytes // 4, np.float32)
    return _time(lambda: dst.copy_to_device(src))  # both freed on return


def _device_inputs(function, mode, shape, seed):
    """The float32 inputs of ``fastloss bench``'s workload (:func:`fastloss._bench.make_case`:
    one set of cases for every benchmark), copied to the device."""
    case = _bench.make_case(function, mode, shape, np.float32, np.random.default_rng(seed), reuse=False)
    return [cuda.to_device(a) for a in case.inputs.values()]


def bench(quick: bool, sim: bool = False):
    rows = []
    torch = _torch_cuda()
    if torch is not None:
        import torch.nn.functional as F
    s = cuda.default_stream()
    scale = 4 if quick else 1
    ce_shapes = ((4, 16),) if sim else ((16384 // scale, 32768), (4096 // scale, 131072))
    for n, c in ce_shapes:
        x, t = _device_inputs("cross_entropy", "fwd+grad", (n, c), seed=1)
        loss = cuda.device_array(n, np.float64)
        grad = cuda.device_array((n, c), np.float32)
        gs = cuda.to_device(np.full(n, 1.0 / n))
        ms = _time(lambda: C._d_cross_entropy(x, t, None, float(c), -100, 0.0, 0.0, 0.0, loss, None, grad, gs, s))
        nbytes = 2 * n * c * 4  # read the logits once, write the gradient once
        tms = None
        if torch is not None:
            tx = torch.as_tensor(x, device="cuda").requires_grad_(True)
            tt = torch.as_tensor(t, device="cuda")

            def tstep():
                tx.grad = None
                F.cross_entropy(tx, tt).backward()

            tms = _time(tstep)
        rows.append((f"cross_entropy fwd+grad {n}x{c} f32", ms, nbytes, _copy_ms(nbytes // 2), tms))
        if c == ce_shapes[0][1]:
            # the same with a soft cap (the capped kernel: tanh and its derivative in the same
            # passes) and the row lse; torch: softcap * tanh(x / softcap), then the loss
            lse = cuda.device_array(n, np.float64)
            cms = _time(lambda: C._d_cross_entropy(x, t, None, float(c), -100, 0.0, 0.0, 30.0, loss, lse, grad, gs, s))
            ctms = None
            if torch is not None:
                def ctstep():
                    tx.grad = None
                    F.cross_entropy(30.0 * torch.tanh(tx / 30.0), tt).backward()

                ctms = _time(ctstep)
            rows.append((f"cross_entropy softcap+lse fwd+grad {n}x{c} f32", cms, nbytes, _copy_ms(nbytes // 2), ctms))
        if torch is not None and BF16 is not None and c == ce_shapes[0][1]:
            # torch.bfloat16 logits through the public device path (bfloat16 is staged
            # through float32 copies: Numba kernels have no bfloat16 type)
            bx = torch.as_tensor(x, device="cuda").to(torch.bfloat16).requires_grad_(True)
            bt = torch.as_tensor(t, device="cuda")
            gb = torch.empty_like(bx)
            ms = _time(lambda: fl.cross_entropy(bx, bt, return_grad=True, grad_out=gb))

            def bstep():
                bx.grad = None
                F.cross_entropy(bx, bt).backward()

            rows.append((f"cross_entropy fwd+grad {n}x{c} bf16", ms, n * c * 4, _copy_ms(n * c * 2), _time(bstep)))
            del bx, gb
        x = grad = None  # free this shape's device buffers before the next one's
    # class-sharded cross-entropy: the shard kernel (one pass: p = exp(x - lse) with the global
    # lse given) against the unsharded kernel (max, sum of exps, gradient) on the same logits,
    # here one shard holding every class, so both move the same compulsory bytes
    n, c = (4, 16) if sim else (4096 // scale, 32000)
    x, t = _device_inputs("cross_entropy", "fwd+grad", (n, c), seed=2)
    loss = cuda.device_array(n, np.float64)
    lse = cuda.device_array(n, np.float64)
    grad = cuda.device_array((n, c), np.float32)
    gs = cuda.to_device(np.full(n, 1.0 / n))
    C._d_cross_entropy(x, t, None, float(c), -100, 0.0, 0.0, 0.0, loss, lse, None, None, s)  # the global lse
    nbytes = 2 * n * c * 4
    ums = _time(lambda: C._d_cross_entropy(x, t, None, float(c), -100, 0.0, 0.0, 0.0, loss, None, grad, gs, s))
    sms = _time(lambda: C._d_cross_entropy_shard(x, t, None, 0.0, -100, 0.0, 0.0, 0.0, lse, 0, c, loss, grad, gs, s))
    cms = _time(lambda: C._d_cross_entropy_shard(x, t, None, 0.0, -100, 0.0, 0.0, 30.0, lse, 0, c, loss, grad, gs, s))
    copy_ms = _copy_ms(nbytes // 2)
    rows.append((f"cross_entropy fwd+grad {n}x{c} f32", ums, nbytes, copy_ms, None))
    rows.append((f"ce_shard fwd+grad {n}x{c} f32", sms, nbytes, copy_ms, None))
    rows.append((f"ce_shard softcap fwd+grad {n}x{c} f32", cms, nbytes, copy_ms, None))
    NOTES.append(f"cross_entropy_shard / cross_entropy time on {n}x{c} f32 (lse given vs computed): "
                 f"{sms / ums:.2f}")
    x = grad = None
    m = 256 if sim else (256 << 20) // scale
    c = 64 if sim else 32768
    n = m // c
    (x,) = _device_inputs("logsumexp", "fwd", (n, c), seed=3)
    out = cuda.device_array(n, np.float32)
    ms = _time(lambda: C._d_row_lse(x, out, None, 0, s))
    tms = None
    if torch is not None:
        tx = torch.as_tensor(x, device="cuda")
        tms = _time(lambda: torch.logsumexp(tx, dim=-1))
    rows.append((f"logsumexp {n}x{c} f32 ({m >> 20}M el)", ms, m * 4, _copy_ms(m * 4 // 2), tms))
    x, y = _device_inputs("binary_cross_entropy_with_logits", "fwd+grad", (n, c), seed=4)
    g = cuda.device_array((n, c), np.float32)
    ms = _time(lambda: C._d_elementwise("bce_with_logits", x, y, None, None, 0, 0.0, None, g, None,
                                         1.0 / m, None, s))
    nbytes = 3 * m * 4  # read logits and targets, write the gradient
    if torch is not None:
        tx = torch.as_tensor(x, device="cuda").requires_grad_(True)
        ty = torch.as_tensor(y, device="cuda")

        def tstep():
            tx.grad = None
            F.binary_cross_entropy_with_logits(tx, ty).backward()

        tms = _time(tstep)
    rows.append((f"bce_with_logits fwd+grad {m >> 20}M el f32", ms, nbytes, _copy_ms(nbytes // 2), tms))
    if torch is not None and not sim:
        _bench_linear(torch, (4096 // scale, 512, 32000))
    return rows


def _bench_linear(torch, shape):
    """fastloss.linear_cross_entropy on PyTorch CUDA tensors (cuBLAS products) against the three
    matrix products alone and F.linear + F.cross_entropy, with the peak of allocated memory
    beyond the inputs (the goal: within 1.2x the products' time, at most 1/16 of the logits)."""
    import torch.nn.functional as F

    n, h, v = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, h, device="cuda", generator=g)
    W = torch.randn(v, h, device="cuda", generator=g) * 0.05
    t = torch.randint(0, v, (n,), device="cuda", generator=g)

    def products():
        z = x @ W.T
        return z @ W, z.T @ x

    def fused():
        return fl.linear_cross_entropy(x, W, t, return_grad=True)

    xr, Wr = x.clone().requires_grad_(True), W.clone().requires_grad_(True)

    def eager():
        xr.grad = Wr.grad = None
        F.cross_entropy(F.linear(xr, Wr), t).backward()

    logits_bytes = n * v * 4
    res = {}
    for name, fn in (("products", products), ("fastloss", fused), ("eager", eager)):
        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        res[name] = (_time(fn), torch.cuda.max_memory_allocated() - base)
    pms = res["products"][0]
    for name, (ms, peak) in res.items():  # (notes, not table rows: a GEMM has no copy-speed yardstick)
        NOTES.append(f"linear_cross_entropy {n}x{h}x{v}: {name} {ms:.2f} ms = {ms / pms:.2f}x the products, "
                     f"peak extra memory {peak / 2**20:.0f} MiB ({peak / logits_bytes:.3f} of the logits)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sim", action="store_true",
                    help="under NUMBA_ENABLE_CUDASIM=1: tiny shapes, real checks, meaningless timings")
    args = ap.parse_args(argv)
    why = C.unavailable_reason()
    if args.sim and not D._simulated():
        print("--sim needs the CUDA simulator: set NUMBA_ENABLE_CUDASIM=1 before starting Python")
        return 2
    if why or (D._simulated() and not args.sim):
        print(f"needs a real GPU: {why or 'the CUDA simulator is on (use --sim for a dry run)'}")
        return 2
    if args.sim:
        print("CUDA simulator dry run: tiny shapes; the checks are real, the timings are not GPU timings")
    name = getattr(cuda.get_current_device(), "name", "CUDA simulator")
    print(f"device: {name.decode() if isinstance(name, bytes) else name}")
    t0 = time.time()
    ver = verify(((4, 12), (2, 70)), ew=(6, 40), dc=(7, 5)) if args.sim else verify()
    print(f"\n{'check':44s} {'dtype':8s} {'max rel err':>12s}  ok")
    for name, dt, err, ok in ver:
        print(f"{name:44s} {dt:8s} {err:12.3e}  {'yes' if ok else 'NO'}")
    print(f"verification: {sum(r[3] for r in ver)}/{len(ver)} passed in {time.time() - t0:.1f} s")
    rows = bench(args.quick, args.sim)
    print(f"\n{'kernel':44s} {'ms':>8s} {'GB/s':>8s} {'copy GB/s':>10s} {'% copy':>7s} {'torch ms':>9s} {'vs torch':>9s}")
    for name, ms, nbytes, copy_ms, tms in rows:
        gbs = nbytes / ms / 1e6
        cgbs = nbytes / copy_ms / 1e6
        tcol = f"{tms:9.3f} {tms / ms:8.2f}x" if tms else f"{'-':>9s} {'-':>9s}"
        print(f"{name:44s} {ms:8.3f} {gbs:8.0f} {cgbs:10.0f} {100 * gbs / cgbs:6.0f}% {tcol}")
    for line in NOTES:
        print(line)
    print(f"\ntotal {time.time() - t0:.1f} s")
    return 0 if all(r[3] for r in ver) else 1


if __name__ == "__main__":
    sys.exit(main())
