"""linear_cross_entropy: values and every gradient against cross_entropy on the materialized
logits (the NumPy reference) and against PyTorch autograd in float64 (``F.linear`` +
``F.cross_entropy``, and ``F.linear_cross_entropy`` where it has the option); independence of
``chunk_size``; the memory bound (tracemalloc); errors."""
from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest

import fastloss as fl
from conftest import SIM, close, pick, rng, sizes

N, H, V = sizes((23, 6, 11), sim=(5, 3, 4))

OPTS = {
    "plain": {},
    "bias": {"_bias": True},
    "weight_ignore": {"_weight": True, "_ignore": True},
    "smoothing_z": {"label_smoothing": 0.2, "z_loss": 1e-3},
    "softcap": {"softcap": 2.0, "_bias": True},
    "all": {"_weight": True, "_ignore": True, "_bias": True, "label_smoothing": 0.1, "z_loss": 1e-3,
            "softcap": 3.0},
    "num_items": {"num_items": 17.0, "_ignore": True},
}


def _inputs(name, dtype=np.float64, seed=0, n=N, h=H, v=V):
    opts = dict(OPTS[name])
    r = rng(seed)
    x = r.standard_normal((n, h)).astype(dtype)
    W = (r.standard_normal((v, h)) * 0.8).astype(dtype)
    t = r.integers(0, v, n)
    if opts.pop("_ignore", False):
        t[::3] = -100
    if opts.pop("_weight", False):
        opts["weight"] = (r.random(v) + 0.5).astype(dtype)
    b = (r.standard_normal(v)).astype(dtype) if opts.pop("_bias", False) else None
    return x, W, b, t, opts


def _materialized(x, W, b, t, reduction, go, opts, backend="numpy"):
    """The same loss and gradients through cross_entropy on the full logits (the reference)."""
    z = x.astype(np.float64) @ W.astype(np.float64).T + (0 if b is None else b.astype(np.float64))
    o = {k: (np.asarray(v, np.float64) if k == "weight" else v) for k, v in opts.items()}
    loss, g = fl.cross_entropy(z, t, reduction=reduction, return_grad=True, grad_output=go, backend=backend, **o)
    return loss, g @ W.astype(np.float64), g.T @ x.astype(np.float64), g.sum(axis=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", pick(OPTS, ["plain", "all"]))
def test_against_materialized_logits(backend, case, reduction):
    if case == "num_items" and reduction != "mean":
        return  # num_items belongs to "mean" (an error otherwise: test_errors)
    x, W, b, t, opts = _inputs(case)
    go = rng(3).standard_normal(N) if reduction == "none" else 0.7
    for chunk in pick([None, 1, 5, N], [2]):
        loss, grads = fl.linear_cross_entropy(x, W, t, linear_bias=b, reduction=reduction, return_grad=True,
                                              grad_output=go, chunk_size=chunk, backend=backend, **opts)
        want = _materialized(x, W, b, t, reduction, go, opts)
        assert len(grads) == (3 if b is not None else 2)
        close(loss, want[0], err_msg=f"loss chunk={chunk}")
        for got, w, name in zip(grads, want[1:], ("d_input", "d_linear_weight", "d_linear_bias")):
            close(got, w, kind="grad", err_msg=f"{name} chunk={chunk}")
        assert grads[0].shape == x.shape and grads[1].shape == W.shape
        if "_ignore" in OPTS[case]:
            assert np.all(grads[0][::3] == 0), "ignored rows get a zero d_input"
        loss_only = fl.linear_cross_entropy(x, W, t, linear_bias=b, reduction=reduction, chunk_size=chunk,
                                            backend=backend, **opts)
        close(loss_only, want[0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", pick(OPTS, ["all"]))
def test_class_chunks_against_materialized_logits(backend, case, reduction, monkeypatch):
    """Classes chunked too (``_config.LINEAR_CLASS_CHUNK``, what a huge vocabulary gets): the
    loss and every gradient as on the materialized logits, with a narrower last class chunk,
    one class per chunk, and several row chunks (d_linear_weight accumulated across them)."""
    import fastloss._config as cfg

    if case == "num_items" and reduction != "mean":
        return
    x, W, b, t, opts = _inputs(case, seed=7)
    go = rng(8).standard_normal(N) if reduction == "none" else 0.7
    want = _materialized(x, W, b, t, reduction, go, opts)
    for classes, chunk in pick([(V - 2, None), (1, 4), (3, 2), (V, N)], [(3, 2)]):
        monkeypatch.setattr(cfg, "LINEAR_CLASS_CHUNK", classes)
        loss, grads = fl.linear_cross_entropy(x, W, t, linear_bias=b, reduction=reduction, return_grad=True,
                                              grad_output=go, chunk_size=chunk, backend=backend, **opts)
        msg = f"classes={classes} chunk={chunk}"
        close(loss, want[0], err_msg="loss " + msg)
        for got, w, name in zip(grads, want[1:], ("d_input", "d_linear_weight", "d_linear_bias")):
            close(got, w, kind="grad", err_msg=f"{name} {msg}")
        if "_ignore" in OPTS[case]:
            assert np.all(grads[0][::3] == 0), "ignored rows get a zero d_input"
        loss_only = fl.linear_cross_entropy(x, W, t, linear_bias=b, reduction=reduction, chunk_size=chunk,
                                            grad_output=go, backend=backend, **opts)
        close(loss_only, want[0], err_msg="loss only " + msg)


def test_huge_vocabularies_chunk_the_classes():
    """The default chunks: whole rows while a row chunk holds LINEAR_MIN_ROWS rows, else
    LINEAR_CLASS_ROWS rows by the classes that the same memory holds; a chunk_size given keeps
    whole rows."""
    import fastloss._config as cfg
    from fastloss._api import linear

    rows, classes = linear._chunks(4096, 32000, 512, 4, None)
    assert classes == 32000 and rows >= cfg.LINEAR_MIN_ROWS
    assert rows * 32000 * 4 <= 4096 * 32000 * 4 / 16
    rows, classes = linear._chunks(1024, 128256, 512, 4, None)
    assert rows == min(1024, cfg.LINEAR_CLASS_ROWS) and classes < 128256
    budget = linear._budget(1024, 128256, 512, 4)
    assert rows * (classes + 2 * 512) * 4 <= budget <= 1024 * 128256 * 4 / 16
    assert linear._chunks(1024, 128256, 512, 4, 64) == (64, 128256)
    assert linear._chunks(10, 128256, 512, 4, None) == (10, 128256)  # few rows: whole rows


@pytest.mark.parametrize("case", pick(["plain", "all", "bias", "smoothing_z"], ["all"]))
def test_against_pytorch_float64(backend, case):
    """Every gradient against PyTorch autograd in float64: ``F.linear`` + ``F.cross_entropy``
    (+ z-loss and the cap written out in torch), and PyTorch's own ``F.linear_cross_entropy``
    where the options are its own."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, W, b, t, opts = _inputs(case, seed=1)
    loss, grads = fl.linear_cross_entropy(x, W, t, linear_bias=b, return_grad=True, backend=backend, **opts)
    xt, Wt = torch.tensor(x, requires_grad=True), torch.tensor(W, requires_grad=True)
    bt = None if b is None else torch.tensor(b, requires_grad=True)
    tt = torch.tensor(t)
    z = F.linear(xt, Wt, bt)
    cap = opts.get("softcap")
    if cap:
        z = cap * torch.tanh(z / cap)
    wt = None if opts.get("weight") is None else torch.tensor(opts["weight"])
    eps = opts.get("label_smoothing", 0.0)
    ref = F.cross_entropy(z, tt, weight=wt, label_smoothing=eps, reduction="sum")
    keep = tt != -100
    ref = ref + opts.get("z_loss", 0.0) * (torch.logsumexp(z, 1)[keep] ** 2).sum()
    denom = wt[tt[keep]].sum() if wt is not None else keep.sum()
    ref = ref / denom
    ref.backward()
    close(loss, ref.item())
    close(grads[0], xt.grad.numpy(), kind="grad")
    close(grads[1], Wt.grad.numpy(), kind="grad")
    if b is not None:
        close(grads[2], bt.grad.numpy(), kind="grad")
    if not cap and not opts.get("z_loss") and hasattr(F, "linear_cross_entropy"):
        xt.grad = Wt.grad = None
        ref2 = F.linear_cross_entropy(xt, Wt, tt, linear_bias=bt, weight=wt, label_smoothing=eps)
        close(loss, ref2.item())


@pytest.mark.skipif(SIM, reason="a 4000-class float32 problem: minutes of Python threads under the simulator")
def test_chunk_size_independence_float32(backend):
    """float32: the chunking changes nothing beyond float32 accumulation error (the BLAS
    products and the float64 sum of row losses)."""
    r = rng(4)
    n, h, v = 200, 48, 4000
    x = r.standard_normal((n, h)).astype(np.float32)
    W = (r.standard_normal((v, h)) * 0.2).astype(np.float32)
    t = r.integers(0, v, n)
    t[::5] = -100
    base = fl.linear_cross_entropy(x, W, t, return_grad=True, chunk_size=n, backend=backend, softcap=20.0)
    for chunk in (1, 7, 64):
        got = fl.linear_cross_entropy(x, W, t, return_grad=True, chunk_size=chunk, backend=backend, softcap=20.0)
        close(got[0], base[0], np.float32)
        np.testing.assert_allclose(got[1][0], base[1][0], atol=2e-6, rtol=0)
        np.testing.assert_allclose(got[1][1], base[1][1], atol=2e-6, rtol=0)


@pytest.mark.skipif(SIM, reason="host threads: not the CUDA simulator")
@pytest.mark.parametrize("class_chunks", [False, True])
def test_kernel_threads_change_no_result(backend, class_chunks, monkeypatch):
    """``_config.LINEAR_CE_THREADS`` (the kernels between the BLAS products capped at one
    thread, the default) against no cap: bitwise the same loss and gradients, whole-row and
    class chunks, with the kernels' parallel paths in use (rows x classes above their serial
    thresholds)."""
    x, W, _, t, _ = _inputs("plain", n=600, h=16, v=1200)
    if class_chunks:  # 600 x 500 logits per chunk
        monkeypatch.setattr(fl._config, "LINEAR_CLASS_CHUNK", 500)
    res = []
    for cap in (None, 1):
        monkeypatch.setattr(fl._config, "LINEAR_CE_THREADS", cap)
        res.append(fl.linear_cross_entropy(x, W, t, label_smoothing=0.1, return_grad=True, backend=backend,
                                           chunk_size=None if class_chunks else 600))
    (l0, (dh0, dw0)), (l1, (dh1, dw1)) = res
    assert np.asarray(l0).tobytes() == np.asarray(l1).tobytes()
    assert dh0.tobytes() == dh1.tobytes() and dw0.tobytes() == dw1.tobytes()


@pytest.mark.parametrize("which", ["numpy", "torch"])
def test_numpy_arrays_on_either_blas(which, monkeypatch):
    """NumPy arrays on NumPy's BLAS and on PyTorch's (``_config.LINEAR_BLAS``): every gradient
    against cross_entropy on the materialized logits (the NumPy reference), several chunks (of
    whole rows, and of classes too), a negatively strided weight (kept on NumPy's BLAS: torch.from_numpy refuses it)."""
    import fastloss._config as cfg
    from fastloss._api import linear

    monkeypatch.setattr(cfg, "LINEAR_BLAS", which)
    monkeypatch.setattr(linear, "_ACC_ROWS", 4)  # NumPy's accumulation in blocks, a short last one
    x, W, b, t, opts = _inputs("all")
    want, want_g = fl.cross_entropy(x @ W.T + b, t, return_grad=True, backend="numpy", **opts)
    for Wv, classes in itertools.product((W, np.asfortranarray(W), np.flipud(np.flipud(W).copy())), (None, 4)):
        monkeypatch.setattr(cfg, "LINEAR_CLASS_CHUNK", classes)  # whole rows; classes chunked too
        loss, (dh, dW, db) = fl.linear_cross_entropy(x, Wv, t, linear_bias=b, return_grad=True, chunk_size=4, **opts)
        close(loss, want)
        close(dh, want_g @ W, kind="grad")
        close(dW, want_g.T @ x, kind="grad")
        close(db, want_g.sum(axis=0), kind="grad")
    expect = linear._TorchBlas if which == "torch" else linear._NumpyBlas
    assert isinstance(linear._blas(False, x, W), expect)
    assert isinstance(linear._blas(False, x, np.flipud(W)), linear._NumpyBlas)  # a negative stride


def test_nd_input_float16_and_all_ignored(backend):
    r = rng(5)
    x = r.standard_normal((2, 3, H)).astype(np.float16)
    W = (r.standard_normal((V, H)) * 0.5).astype(np.float16)
    t = r.integers(0, V, (2, 3))
    loss, (dh, dW) = fl.linear_cross_entropy(x, W, t, reduction="none", return_grad=True, grad_output=np.ones((2, 3)),
                                             backend=backend)
    assert loss.shape == (2, 3) and loss.dtype == np.float16 and dh.dtype == np.float16 and dW.dtype == np.float16
    want = _materialized(x.reshape(6, H).astype(np.float32), W.astype(np.float32), None, t.reshape(6), "none",
                         np.ones(6), {})
    close(loss.reshape(6), want[0], np.float16)
    close(dh.reshape(6, H), want[1], np.float16)
    close(dW, want[2], np.float16)
    t[:] = -100
    loss, (dh, dW) = fl.linear_cross_entropy(x.astype(np.float32), W.astype(np.float32), t, return_grad=True,
                                             backend=backend)
    assert loss == 0 and not dh.any() and not dW.any()


@pytest.mark.skipif(SIM, reason="the memory bound is a host property (numpy buffers); not a simulator test")
@pytest.mark.parametrize("shape", [(4096, 64, 16000), (1024, 64, 64000)], ids=["row_chunks", "class_chunks"])
def test_peak_memory_is_a_fraction_of_the_logits(backend, shape):
    """Extra memory beyond the inputs and gradients stays under 1/16 of the N x V logits
    (tracemalloc sees NumPy's allocations): 4096 x 64 x 16000 float32 (chunks of whole rows) and
    1024 x 64 x 64000 (chunks of classes too), logits 262 MB.  The
    NumPy reference's kernel makes about six chunk-sized temporaries per chunk (its array
    expressions), with chunks of 1/16 of the logits: half of the logits for it."""
    from fastloss._api import linear

    r = rng(6)
    n, h, v = shape
    assert (linear._chunks(n, v, h, 4, None)[1] < v) == (n == 1024)
    x = r.standard_normal((n, h)).astype(np.float32)
    W = (r.standard_normal((v, h)) * 0.1).astype(np.float32)
    t = r.integers(0, v, n)
    t[::10] = -100
    fl.linear_cross_entropy(x[:64], W, t[:64], return_grad=True, backend=backend)  # compile, warm up
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        loss, (dh, dW) = fl.linear_cross_entropy(x, W, t, return_grad=True, backend=backend)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    outputs = dh.nbytes + dW.nbytes
    logits = n * v * 4
    bound = logits / (2 if backend == "numpy" else 16)
    assert peak - outputs <= bound, f"extra {(peak - outputs) / 2**20:.1f} MB for {logits / 2**20:.0f} MB of logits"
    close(loss, fl.cross_entropy(x @ W.T, t, backend="numpy"), np.float32)


def test_errors(backend):
    x, W, b, t, _ = _inputs("plain")
    cases = [
        (dict(linear_weight=W[:, :-1]), ValueError, r"linear_weight: expected shape \(V, \d+\)"),
        (dict(linear_weight=W.astype(np.float32)), TypeError, "linear_weight: expected the dtype of input"),
        (dict(linear_bias=np.zeros(V + 1)), ValueError, "linear_bias: expected shape"),
        (dict(target=t[:-1]), ValueError, "target: expected shape"),
        (dict(target=np.zeros((N, V))), TypeError, "target: expected integer class indices"),
        (dict(target=np.full(N, V)), IndexError, "target: expected class indices in"),
        (dict(chunk_size=0), ValueError, "chunk_size: expected a positive number of rows"),
        (dict(softcap=-1.0), ValueError, "softcap: expected a finite number > 0"),
        (dict(num_items=3, reduction="sum"), ValueError, "num_items: expected None with reduction="),
        (dict(weight=np.ones(V - 1)), ValueError, "weight: expected a 1-D array of"),
    ]
    for kw, exc, msg in cases:
        args = dict(input=x, linear_weight=W, target=t)
        args.update({k: v for k, v in kw.items() if k in args})
        opts = {k: v for k, v in kw.items() if k not in args}
        with pytest.raises(exc, match=msg):
            fl.linear_cross_entropy(args["input"], args["linear_weight"], args["target"], backend=backend, **opts)


def test_torch_cpu_tensors_use_torch_blas(backend, monkeypatch):
    """PyTorch CPU tensors: the products run on PyTorch's BLAS (the caller's library), with
    the same results as NumPy's."""
    torch = pytest.importorskip("torch")
    from fastloss._api import linear

    used = []
    real = linear._TorchBlas.mm
    monkeypatch.setattr(linear._TorchBlas, "mm", lambda self, a, b, out: (used.append(1), real(self, a, b, out)))
    x, W, b, t, opts = _inputs("all", seed=7)
    want = fl.linear_cross_entropy(x, W, t, linear_bias=b, return_grad=True, chunk_size=4, backend=backend, **opts)
    got = fl.linear_cross_entropy(torch.tensor(x), torch.tensor(W), torch.tensor(t), linear_bias=torch.tensor(b),
                                  return_grad=True, chunk_size=4, backend=backend, **opts)
    assert used, "torch tensors went through NumPy's BLAS"
    close(got[0], want[0])
    for g, w in zip(got[1], want[1]):
        close(g, w, kind="grad")


def test_bench_script_times_candidates_in_turns():
    """``bench/linear_ce.py --interleaved``: every candidate timed in one process in turns,
    its ratio to the products of its BLAS and the goal lines printed (a tiny shape; the
    fresh-process mode shares the same candidate builder)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "linear_ce.py"
    p = subprocess.run([sys.executable, str(script), "--shapes", "64x16x300", "--interleaved", "2",
                        "--only", "products numpy,fastloss numba,fastloss cython", "--threads", "1"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "medians of 2 rounds" in lines[0]
    for name in ("products numpy", "fastloss numba", "fastloss cython"):
        row = next(ln for ln in lines if f" {name} " in ln and "median" in ln)
        assert "unavailable" not in row and "x products" in row
        assert any(ln.startswith(f"  goal 64x16x300 {name}: time ") for ln in lines) or name.startswith("products")
