"""fastloss.dask: the losses on Dask arrays chunked along rows and/or classes, against the
same functions on the whole NumPy array with the NumPy backend in float64 (and, for the
cross-entropy, SciPy's closed form ``ref_ce``) -- never against a chunked computation.

The threaded scheduler runs the full matrix (every function and option, four chunkings:
rows, classes -- uneven, with a one-class chunk --, both, none); a ``dask.distributed``
``LocalCluster`` of two worker processes on the loopback interface runs every function once
on row- and on class-chunked input (its results travel between processes by pickle).
"""
from __future__ import annotations

import contextlib
import io
import re
import threading
from pathlib import Path

import numpy as np
import pytest

import fastloss as fl
from conftest import close, ref_ce, ref_ce_soft, rng

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
fld = pytest.importorskip("fastloss.dask")

N, K = 9, 11
# (row chunks, class chunks) of a (9, 11) array: rows only (uneven), classes only (uneven,
# with a one-class chunk), both, and one block
CHUNKS = {
    "rows": ((3, 6), (K,)),
    "classes": ((N,), (4, 1, 6)),
    "both": ((2, 7), (1, 5, 5)),
    "one": ((N,), (K,)),
}
W = np.linspace(0.25, 2.0, K)
CE_OPTS = {
    "plain": {},
    "weight": {"weight": W},
    "ignore": {"ignore_index": 3},
    "smoothing": {"label_smoothing": 0.2},
    "z_loss": {"z_loss": 0.01},
    "softcap": {"softcap": 2.5},
    "all": {"weight": W, "ignore_index": 3, "label_smoothing": 0.2, "z_loss": 0.01, "softcap": 2.5},
    "num_items": {"num_items": 17, "weight": W},
}
REDUCTIONS = ("mean", "sum", "none")


def _compute(*objs):
    return dask.compute(*objs, scheduler="threads")


def _data(seed=0, dtype=np.float64):
    r = rng(seed)
    x = (r.standard_normal((N, K)) * 2).astype(dtype)
    t = r.integers(0, K, N)
    t[1] = 3  # the ignore_index of the "ignore" options
    t[2] = K - 1  # a target in the last class chunk
    t[4] = 4  # the target of the one-class chunk of "classes"
    return x, t


def _dx(x, chunks):
    return da.from_array(x, chunks=CHUNKS[chunks] if isinstance(chunks, str) else chunks)


def _row_chunks(dx, ax):
    return tuple(c for i, c in enumerate(dx.chunks) if i != ax)


# ----------------------------------------------------------------------------- normalizers
@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("axis,keepdims", [(-1, False), (0, True), (None, False), ((0, 1), True), (1, True)])
def test_logsumexp_matches_the_whole_array(chunks, axis, keepdims):
    x, _ = _data()
    dx = _dx(x, chunks)
    got = fld.logsumexp(dx, axis=axis, keepdims=keepdims, backend="numpy")
    assert isinstance(got, da.Array)
    (g,) = _compute(got)
    ref = fl.logsumexp(x, axis=axis, keepdims=keepdims, backend="numpy")
    assert np.shape(g) == np.shape(ref) and got.dtype == np.asarray(ref).dtype
    close(g, ref)
    if axis == -1:  # chunked like the rows
        assert got.chunks == (dx.chunks[0],)


def _special(dtype=np.float64):
    """Rows with -inf entries, only -inf, a +inf, a NaN, huge values -- each straddling the
    class chunks of CHUNKS["classes"]."""
    x, _ = _data(1, dtype)
    x[0, [0, 5, 10]] = -np.inf
    x[1, :] = -np.inf
    x[2, 7] = np.inf
    x[3, 2] = np.nan
    x[4, :] = np.linspace(-3e300 if dtype == np.float64 else -3e38, 1e300 if dtype == np.float64 else 1e38, K)
    return x


@pytest.mark.parametrize("chunks", ["classes", "both", "rows"])
@pytest.mark.parametrize("fn", ["logsumexp", "softmax", "log_softmax"])
def test_normalizers_special_values_match_the_core(chunks, fn):
    """inf / NaN rules across class chunks: a row of only -inf, one holding +inf, a NaN, and
    values near the dtype's max give exactly what the core functions give."""
    x = _special()
    with np.errstate(all="ignore"):
        ref = getattr(fl, fn)(x, axis=1, backend="numpy")
    (got,) = _compute(getattr(fld, fn)(_dx(x, chunks), axis=1, backend="numpy"))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    close(got, ref)


@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_and_log_softmax_match_and_keep_the_chunks(chunks, fn, axis):
    x, _ = _data(2)
    dx = _dx(x, chunks)
    got = getattr(fld, fn)(dx, axis=axis, backend="numpy")
    assert got.chunks == dx.chunks and got.dtype == x.dtype
    close(_compute(got)[0], getattr(fl, fn)(x, axis=axis, backend="numpy"), kind="grad")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("fn", ["logsumexp", "softmax", "log_softmax"])
def test_normalizers_low_precision_class_chunked(dtype, fn):
    """float32/float16 class chunks: within the spec's tolerance of the float64 result,
    including a confident row (softmax near 1, lse far from 0)."""
    x, _ = _data(3, np.float64)
    x[0, 4] = 40.0
    xl = x.astype(dtype)
    got = getattr(fld, fn)(_dx(xl, "both"), axis=1, backend="numpy")
    (g,) = _compute(got)
    assert g.dtype == dtype
    ref = getattr(fl, fn)(xl.astype(np.float64), axis=1, backend="numpy")
    close(g, ref, dtype, kind="loss" if fn != "softmax" else "grad")


# ----------------------------------------------------------------------------- cross-entropy
def _ce_both(x, t, dx, opts, reduction, backend="numpy", **kw):
    ref = fl.cross_entropy(x, t, reduction=reduction, return_grad=True, return_lse=True, backend="numpy",
                           **opts, **kw)
    got = fld.cross_entropy(dx, t, reduction=reduction, return_grad=True, return_lse=True, backend=backend,
                            **opts, **kw)
    return ref, got


@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("opt,reduction", [(o, r) for o in CE_OPTS for r in REDUCTIONS
                                           if r == "mean" or "num_items" not in CE_OPTS[o]])
def test_cross_entropy_matches_the_whole_array(chunks, opt, reduction):
    opts = CE_OPTS[opt]
    x, t = _data()
    dx = _dx(x, chunks)
    ref, got = _ce_both(x, t, dx, opts, reduction)
    loss, grad, lse = got
    assert grad.chunks == dx.chunks and grad.dtype == x.dtype
    assert lse.chunks == (dx.chunks[0],)
    if reduction == "none":
        assert loss.chunks == (dx.chunks[0],)
    else:
        assert loss.ndim == 0 and loss.dtype == np.float64
    vals = _compute(loss, grad, lse)
    for g, r, kind in zip(vals, ref, ("loss", "grad", "loss")):
        close(g, r, kind=kind, err_msg=kind)
    if "softcap" not in opts:  # and the closed form (SciPy), independently of fastloss
        o = {k: v for k, v in opts.items() if k != "num_items"}
        want = ref_ce(x, t, reduction=reduction if "num_items" not in opts else "sum", **o)
        close(vals[0], want / (opts["num_items"] if "num_items" in opts else 1))


@pytest.mark.parametrize("chunks", ["classes", "both"])
def test_cross_entropy_on_every_backend(backend, chunks):
    """The sharded kernels of the backend under test, through the Dask graph."""
    x, t = _data(4)
    dx = _dx(x, chunks)
    for red in REDUCTIONS:
        ref, got = _ce_both(x, t, dx, CE_OPTS["all"], red, backend=backend)
        for g, r, kind in zip(_compute(*got), ref, ("loss", "grad", "loss")):
            close(g, r, kind=kind, err_msg=f"{red} {kind}")


@pytest.mark.parametrize("axis,chunks", [(1, ((2, 2), (3, 4), (1, 2))), (0, ((1, 3), (7,), (2, 1))),
                                         (-1, ((4,), (2, 5), (1, 1, 1)))])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_nd_class_axis(axis, chunks, reduction):
    """(4, 7, 3) logits with the classes at ``axis``, split along it and the other axes."""
    r = rng(5)
    x = r.standard_normal((4, 7, 3)) * 2
    ax = axis % 3
    rows = tuple(s for i, s in enumerate(x.shape) if i != ax)
    t = r.integers(0, x.shape[ax], rows)
    dx = da.from_array(x, chunks=chunks)
    opts = {"label_smoothing": 0.1, "z_loss": 0.01, "weight": np.linspace(0.5, 1.5, x.shape[ax])}
    ref, got = _ce_both(x, t, dx, opts, reduction, axis=axis)
    assert got[1].chunks == dx.chunks and got[2].chunks == _row_chunks(dx, ax)
    for g, r_, kind in zip(_compute(*got), ref, ("loss", "grad", "loss")):
        close(g, r_, kind=kind, err_msg=kind)
    close(_compute(got[0])[0], ref_ce(x, t, axis=axis, reduction=reduction, **opts))


@pytest.mark.parametrize("chunks", ["classes", "both"])
def test_cross_entropy_float32_confident_rows_within_spec(chunks):
    """float32, class-chunked, confident predictions (loss ~5e-4, lse ~30): the first
    chunk's lse terms and the target chunk's -x_t nearly cancel, yet loss and gradient stay
    within the spec's float32 tolerance of the float64 result.  (Adding shares rounded to
    float32, or a float32-rounded global lse, misses it by 100x.)"""
    r = rng(6)
    x = (r.standard_normal((N, K)) * 3).astype(np.float32)
    t = r.integers(0, K, N)
    x[np.arange(N), t] += 15.0
    x += 10.0  # lse ~ 30, loss ~ 5e-4 (shift invariant)
    x64 = x.astype(np.float64)
    for red in ("mean", "sum"):
        loss, grad = _compute(*fld.cross_entropy(_dx(x, chunks), t, reduction=red, return_grad=True,
                                                 backend="numpy"))
        ref, rgrad = fl.cross_entropy(x64, t, reduction=red, return_grad=True, backend="numpy")
        assert loss.dtype == np.float32 and grad.dtype == np.float32
        assert ref < (1e-3 if red == "mean" else N * 1e-3)  # confident: the loss far below |lse|
        close(loss, ref, np.float32)
        close(grad * (N if red == "mean" else 1), rgrad * (N if red == "mean" else 1), np.float32, kind="grad")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("chunks", ["rows", "both"])
def test_cross_entropy_low_precision_dtypes(dtype, chunks):
    x, t = _data(7)
    xl = x.astype(dtype)
    opts = CE_OPTS["all"]
    for red in REDUCTIONS:
        loss, grad, lse = _compute(*fld.cross_entropy(_dx(xl, chunks), t, reduction=red, return_grad=True,
                                                      return_lse=True, backend="numpy", **opts))
        ref = fl.cross_entropy(xl.astype(np.float64), t, reduction=red, return_grad=True, return_lse=True,
                               backend="numpy", **opts)
        cdt = np.float32
        assert grad.dtype == dtype and lse.dtype == cdt
        assert loss.dtype == (dtype if red == "none" else cdt)
        close(loss, ref[0], dtype if red == "none" else cdt)
        close(grad, ref[1], dtype, kind="grad")
        close(lse, ref[2], cdt)


@pytest.mark.parametrize("chunks", ["rows", "both"])
def test_cross_entropy_grad_output(chunks):
    x, t = _data(8)
    dx = _dx(x, chunks)
    opts = {"weight": W, "label_smoothing": 0.1}
    for red in ("mean", "sum"):
        for go in (2.5, da.from_array(np.float64(-0.5))):
            got = fld.cross_entropy(dx, t, reduction=red, return_grad=True, grad_output=go, backend="numpy", **opts)
            ref = fl.cross_entropy(x, t, reduction=red, return_grad=True, grad_output=float(np.asarray(go)),
                                   backend="numpy", **opts)
            close(_compute(got[1])[0], ref[1], kind="grad")
    gout = rng(9).standard_normal(N)
    # a Dask grad_output chunked unlike the rows, and a NumPy one
    for g in (da.from_array(gout, chunks=4), gout):
        got = fld.cross_entropy(dx, t, reduction="none", return_grad=True, grad_output=g, backend="numpy", **opts)
        ref = fl.cross_entropy(x, t, reduction="none", return_grad=True, grad_output=gout, backend="numpy", **opts)
        assert got[1].chunks == dx.chunks
        close(_compute(got[1])[0], ref[1], kind="grad")


@pytest.mark.parametrize("chunks", ["rows", "both"])
def test_cross_entropy_nothing_to_average_gives_zero(chunks):
    """"mean" with every target ignored, or with a summed target weight of 0: loss 0 and a
    zero gradient (the core functions' rule), though the rows' own terms are not 0."""
    x, t = _data(10)
    w = np.where(np.isin(np.arange(K), t), 0.0, 1.0)  # the weight of every used class is 0
    for tt, opts in ((np.full(N, -100), {}), (t, {"weight": w, "label_smoothing": 0.1})):
        loss, grad = _compute(*fld.cross_entropy(_dx(x, chunks), tt, return_grad=True, backend="numpy", **opts))
        assert float(loss) == 0.0 and not grad.any()
        assert float(fl.cross_entropy(x, tt, reduction="sum", backend="numpy", **opts)) != 0.0 or not opts


@pytest.mark.parametrize("chunks", ["rows", "one"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_probability_targets_row_chunked(chunks, reduction):
    x, _ = _data(11)
    y = rng(12).dirichlet(np.ones(K), N)
    opts = {"weight": W, "label_smoothing": 0.1, "z_loss": 0.01}
    got = fld.cross_entropy(_dx(x, chunks), da.from_array(y, chunks=(5, 4)), reduction=reduction, return_grad=True,
                            backend="numpy", **opts)
    ref = fl.cross_entropy(x, y, reduction=reduction, return_grad=True, backend="numpy", **opts)
    loss, grad = _compute(*got)
    close(loss, ref[0])
    close(loss, ref_ce_soft(x, y, reduction=reduction, **opts))
    close(grad, ref[1], kind="grad")


def test_cross_entropy_probability_targets_class_chunked_is_a_clear_error():
    x, _ = _data()
    y = np.full((N, K), 1.0 / K)
    with pytest.raises(ValueError, match=r"target: .*class probabilities.*rechunk"):
        fld.cross_entropy(_dx(x, "classes"), y)


@pytest.mark.parametrize("chunks", ["rows", "both"])
def test_cross_entropy_out_of_range_index_names_its_global_position(chunks):
    x, t = _data()
    t[7] = K  # in the second row chunk of "rows" and "both"
    loss = fld.cross_entropy(_dx(x, chunks), t, backend="numpy")  # building the graph reads no value
    with pytest.raises(IndexError, match=rf"target: expected class indices in \[0, {K}\).*found {K} at position \(7,\)"):
        _compute(loss)


def test_cross_entropy_return_lse_alone_and_loss_alone():
    x, t = _data(13)
    dx = _dx(x, "both")
    loss, lse = _compute(*fld.cross_entropy(dx, t, softcap=2.0, return_lse=True, backend="numpy"))
    ref = fl.cross_entropy(x, t, softcap=2.0, return_lse=True, backend="numpy")
    close(loss, ref[0])
    close(lse, ref[1])
    close(_compute(fld.cross_entropy(dx, t, backend="numpy"))[0], ref_ce(x, t))


def test_cross_entropy_default_backend_is_fixed_when_the_graph_is_built(monkeypatch):
    """``backend=None`` sends the caller's current default (``use_backend``) with the tasks,
    and every block runs one kernel call per block, even with the loss and the gradient both
    computed."""
    import fastloss._api as api

    seen = []
    lock = threading.Lock()
    real = api.cross_entropy

    def spy(*a, **kw):
        with lock:
            seen.append(kw.get("backend"))
        return real(*a, **kw)

    monkeypatch.setattr(api, "cross_entropy", spy)
    x, t = _data(14)
    dx = _dx(x, "both")
    with fl.use_backend("numpy"):
        loss, grad = fld.cross_entropy(dx, t, return_grad=True)
    _compute(loss, grad)
    assert seen == ["numpy"] * dx.npartitions


def test_graph_building_computes_nothing():
    """Building any result reads no block: logits whose blocks raise when computed."""
    def boom(b):
        raise RuntimeError("a block was computed")

    x = da.zeros((N, K), chunks=CHUNKS["both"]).map_blocks(boom, dtype=np.float64)
    t = np.zeros(N, np.int64)
    outs = [
        fld.logsumexp(x), fld.softmax(x), fld.log_softmax(x),
        *fld.cross_entropy(x, t, return_grad=True, return_lse=True, weight=W, softcap=1.0),
        *fld.binary_cross_entropy_with_logits(x, x, return_grad=True), *fld.kl_div(x, x, return_grad=True),
        *fld.mse_loss(x, x, return_grad=True),
    ]
    assert all(isinstance(o, da.Array) for o in outs)
    with pytest.raises(RuntimeError, match="a block was computed"):
        _compute(outs[3])


# ----------------------------------------------------------------------------- elementwise losses
def _ew_cases():
    r = rng(15)
    y = r.uniform(size=(N, K))
    y[0, :3] = 0.0  # kl_div's 0 * log 0 terms (log-target -inf)
    with np.errstate(divide="ignore"):
        logy = np.log(y)
    cases = {
        "bce": ("binary_cross_entropy_with_logits", (y,), {}),
        "bce_weights": ("binary_cross_entropy_with_logits", (y,),
                        {"weight": r.uniform(size=(N, 1)), "pos_weight": r.uniform(0.5, 2.0, K)}),
        "bce_full_weight": ("binary_cross_entropy_with_logits", (y,), {"weight": r.uniform(size=(N, K))}),
        "kl": ("kl_div", (y,), {}),
        "kl_log_target": ("kl_div", (logy,), {"log_target": True}),
        "kl_broadcast": ("kl_div", (y[0],), {}),
        "mse": ("mse_loss", (y,), {}),
        "mse_broadcast": ("mse_loss", (y[:, :1],), {}),
    }
    return cases


EW = _ew_cases()


@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("case", list(EW))
def test_elementwise_losses_match_the_whole_array(chunks, case):
    fn, args, opts = EW[case]
    x, _ = _data(16)
    if fn == "kl_div":
        x = fl.log_softmax(x, backend="numpy")
    dx = _dx(x, chunks)
    reds = REDUCTIONS + (("batchmean",) if fn == "kl_div" else ())
    for red in reds:
        got = getattr(fld, fn)(dx, *args, reduction=red, return_grad=True, backend="numpy", **opts)
        ref = getattr(fl, fn)(x, *args, reduction=red, return_grad=True, backend="numpy", **opts)
        assert got[1].chunks == dx.chunks
        if red == "none":
            assert got[0].chunks == dx.chunks
        loss, grad = _compute(*got)
        close(loss, ref[0], err_msg=red)
        close(grad, ref[1], kind="grad", err_msg=red)


@pytest.mark.parametrize("fn", ["binary_cross_entropy_with_logits", "kl_div", "mse_loss"])
def test_elementwise_grad_output_and_float32(fn):
    x, _ = _data(17, np.float32)
    y = rng(18).uniform(size=(N, K)).astype(np.float32)
    dx = _dx(x, "both")
    gout = rng(19).standard_normal((N, K))
    got = getattr(fld, fn)(dx, y, reduction="none", return_grad=True, grad_output=da.from_array(gout, chunks=5),
                           backend="numpy")
    ref = getattr(fl, fn)(x.astype(np.float64), y, reduction="none", return_grad=True, grad_output=gout,
                          backend="numpy")
    loss, grad = _compute(*got)
    assert loss.dtype == np.float32 and grad.dtype == np.float32
    # element losses: those of the float32 kernel on the whole array (a float32 element loss
    # of the core itself can be 4e-6 off the float64 one where its two terms cancel)
    close(loss, getattr(fl, fn)(x, y, reduction="none", backend="numpy"), np.float32)
    close(grad, ref[1], np.float32, kind="grad")
    loss, grad = _compute(*getattr(fld, fn)(dx, y, reduction="sum", return_grad=True, grad_output=0.5,
                                            backend="numpy"))
    ref = getattr(fl, fn)(x.astype(np.float64), y, reduction="sum", return_grad=True, grad_output=0.5,
                          backend="numpy")
    assert loss.dtype == np.float32
    close(loss, ref[0], np.float32)
    close(grad, ref[1], np.float32, kind="grad")


# ----------------------------------------------------------------------------- errors
def _x():
    return _dx(_data()[0], "both")


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda: fld.softmax(_x(), out=np.empty((N, K))), ValueError, r"^out: expected None"),
    (lambda: fld.log_softmax(_x(), axis=2), ValueError, r"^axis: expected an integer in \[-2, 2\)"),
    (lambda: fld.logsumexp(_x().astype(np.int64)), TypeError, r"^x: expected a floating array.*int64"),
    (lambda: fld.cross_entropy(_x(), np.zeros(N, int), grad_out=np.empty((N, K))), ValueError, r"^grad_out: expected None"),
    (lambda: fld.cross_entropy(_x(), np.zeros(N, int), lse=np.zeros(N)), ValueError, r"^lse: expected None"),
    (lambda: fld.cross_entropy(_x(), np.zeros(N, int), class_offset=3), ValueError, r"^class_offset: expected None"),
    (lambda: fld.cross_entropy(_x(), np.zeros(N, int), num_classes=K), ValueError, r"^num_classes: expected None"),
    (lambda: fld.cross_entropy(_x(), np.zeros(N - 1, int)), ValueError, r"^target: expected class indices of shape \(9,\)"),
    (lambda: fld.cross_entropy(_x(), np.zeros(N, complex)), TypeError, r"^target: expected integer class indices"),
    (lambda: fld.cross_entropy(_x(), np.zeros(N, int), weight=np.ones(K - 1)), ValueError, r"^weight: expected a 1-D array of 11"),
    (lambda: fld.cross_entropy(_x(), np.zeros(N, int), reduction="avg"), ValueError, r"^reduction: expected one of"),
    (lambda: fld.cross_entropy(_x(), np.zeros(N, int), label_smoothing=2.0), ValueError, r"^label_smoothing: expected"),
    (lambda: fld.cross_entropy(_x(), np.zeros(N, int), num_items=5, reduction="sum"), ValueError, r"^num_items: expected None"),
    (lambda: fld.cross_entropy(_x(), np.zeros(N, int), grad_output=np.ones(N)), ValueError, r"^grad_output: expected a scalar"),
    (lambda: fld.cross_entropy(_x(), np.zeros(N, int), reduction="none", grad_output=np.ones(N + 1)), ValueError,
     r"^grad_output: expected a shape broadcastable to the unreduced loss shape"),
    (lambda: fld.cross_entropy(_x(), np.zeros(N, int), backend="nope"), fl.BackendUnavailable, r"backend: expected one of"),
    (lambda: fld.cross_entropy(_x().compute_chunk_sizes()[_x()[:, 0] > 0], np.zeros(N, int)), ValueError, r"^logits: expected a Dask array of known chunk sizes"),
    (lambda: fld.binary_cross_entropy_with_logits(_x(), np.ones((N, K - 1))), ValueError, r"^target: expected the shape of the input"),
    (lambda: fld.binary_cross_entropy_with_logits(_x(), np.ones((N, K)), pos_weight=np.ones(3)), ValueError, r"^pos_weight: expected one weight per class"),
    (lambda: fld.binary_cross_entropy_with_logits(_x(), np.ones((N, K)), weight=np.ones((2, K))), ValueError, r"^weight: expected a shape broadcastable"),
    (lambda: fld.kl_div(_x(), np.ones((N, K)), reduction="mean_all"), ValueError, r"^reduction: expected one of 'batchmean'"),
    (lambda: fld.mse_loss(_x(), np.ones((2, N, K))), ValueError, r"^target: expected a shape broadcastable"),
    (lambda: fld.mse_loss(_x(), np.ones((N, K)), grad_out=np.ones((N, K))), ValueError, r"^grad_out: expected None"),
])
def test_errors_name_the_argument_when_the_graph_is_built(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


# ----------------------------------------------------------------------------- dask.distributed
@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1", dashboard_address=None))
        yield stack.enter_context(distributed.Client(cluster))


def test_every_function_on_a_local_cluster(client):
    """Rows- and class-chunked input, every function, on two worker processes: the same
    values as the whole array (one ``client.compute`` for all of them)."""
    x, t = _data(20)
    y = rng(21).uniform(size=(N, K))
    lp = fl.log_softmax(x, backend="numpy")
    opts = {"weight": W, "ignore_index": 3, "label_smoothing": 0.1, "z_loss": 0.01, "softcap": 3.0}
    lazy, ref = [], []
    for chunks in ("rows", "both"):
        dx = _dx(x, chunks)
        lazy += [fld.logsumexp(dx, axis=1, backend="numpy"), fld.softmax(dx, backend="numpy"),
                 fld.log_softmax(dx, backend="numpy"),
                 *fld.cross_entropy(dx, t, return_grad=True, backend="numpy", **opts),
                 *fld.cross_entropy(dx, t, reduction="none", return_grad=True, backend="numpy", **opts),
                 *fld.binary_cross_entropy_with_logits(dx, y, pos_weight=W, return_grad=True, backend="numpy"),
                 *fld.kl_div(_dx(lp, chunks), y, return_grad=True, backend="numpy"),
                 *fld.mse_loss(dx, y, reduction="sum", return_grad=True, backend="numpy")]
        ref += [fl.logsumexp(x, axis=1, backend="numpy"), fl.softmax(x, backend="numpy"),
                fl.log_softmax(x, backend="numpy"),
                *fl.cross_entropy(x, t, return_grad=True, backend="numpy", **opts),
                *fl.cross_entropy(x, t, reduction="none", return_grad=True, backend="numpy", **opts),
                *fl.binary_cross_entropy_with_logits(x, y, pos_weight=W, return_grad=True, backend="numpy"),
                *fl.kl_div(lp, y, return_grad=True, backend="numpy"),
                *fl.mse_loss(x, y, reduction="sum", return_grad=True, backend="numpy")]
    got = client.gather(client.compute(lazy))
    assert len(got) == len(ref) == 26
    for i, (g, r) in enumerate(zip(got, ref)):
        close(g, r, kind="grad", err_msg=f"result {i}")


# ----------------------------------------------------------------------------- README
def test_readme_dask_example_runs():
    """The README's ``fastloss.dask`` example runs as written (its own asserts compare with
    the whole-array result) and prints what the README says."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("### `fastloss.dask`"):text.index("## Semantics")]
    code, output = re.findall(r"```(?:python)?\n(.*?)```", section, re.S)[:2]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue().strip() == output.strip()
