"""Class-sharded cross_entropy (``lse=``, ``class_offset=``, ``num_classes=``) through the public
API on every backend: the shards' losses add up to the unsharded loss and their gradients
concatenate to the unsharded gradient -- against the SciPy closed form (``ref_ce``) and the
NumPy backend's unsharded float64 result, never against a sharded computation.

The global lse is built the way a user (and ``fastloss.distributed`` / ``fastloss.dask``)
builds it: each shard's own row lse of its (capped) logits, combined with ``fl.logsumexp``.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastloss as fl
from conftest import SIM, close, pick, ref_ce, rng
from fastloss._api.cross_entropy import row_lse

K = 11 if not SIM else 5
# [start, stop) boundaries of the shards: two uneven shards, one-class shards at both ends
SPLITS = pick([(0, 4, K), (0, 1, 6, K - 1, K), (0, K)], [(0, 2, K), (0, 1, K - 1, K)])
W = np.linspace(0.25, 2.0, K)
OPTS = {
    "plain": {},
    "weight": {"weight": W},
    "ignore": {"ignore_index": 3},
    "smoothing": {"label_smoothing": 0.2},
    "z_loss": {"z_loss": 0.01},
    "softcap": {"softcap": 2.5},
    "all": {"weight": W, "ignore_index": 3, "label_smoothing": 0.2, "z_loss": 0.01, "softcap": 2.5},
    "num_items": {"num_items": 17, "weight": W},
}


def _data(n=9, dtype=np.float64, seed=0, axis_len=None):
    r = rng(seed)
    x = (r.standard_normal((n, K)) * 2).astype(dtype)
    t = r.integers(0, K, n)
    t[1] = 3  # the ignore_index of the "ignore" option sets
    t[2] = K - 1  # a target in the last shard
    t[4] = 0
    return x, t


def _opts(name, dtype):
    o = dict(OPTS[name])
    if "weight" in o:
        o["weight"] = o["weight"].astype(dtype)
    return o


def _global_lse(shards, axis, backend, softcap=None):
    """``fl.logsumexp`` over the shards' own float64 row lse values of their capped logits."""
    own = [row_lse(xs, axis=axis, softcap=softcap, backend=backend) for xs in shards]
    return fl.logsumexp(np.stack(own), axis=0, backend=backend)


def _sharded(x, t, cuts, backend, axis=-1, **opts):
    """Loss (summed shares) and gradient (concatenated slices) of the sharded computation."""
    ax = axis % x.ndim
    sl = lambda a, b: x[(slice(None),) * ax + (slice(a, b),)]  # noqa: E731 -- views, not copies
    shards = [sl(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    lse = _global_lse(shards, axis, backend, opts.get("softcap"))
    losses, grads = [], []
    for xs, a in zip(shards, cuts[:-1]):
        loss, g = fl.cross_entropy(xs, t, axis=axis, lse=lse, class_offset=a, num_classes=K, return_grad=True,
                                   backend=backend, **opts)
        losses.append(np.asarray(loss, np.float64))
        grads.append(g)
    return sum(losses), np.concatenate(grads, axis=ax), lse


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(OPTS))
@pytest.mark.parametrize("cuts", SPLITS)
def test_shards_add_up(backend, case, reduction, dtype, cuts):
    x, t = _data(dtype=dtype)
    opts = _opts(case, dtype)
    if reduction != "mean":
        opts.pop("num_items", None)
    go = rng(5).standard_normal(len(t)) if reduction == "none" else 0.7
    loss, grad, lse = _sharded(x, t, cuts, backend, reduction=reduction, grad_output=go, **opts)
    x64 = x.astype(np.float64)
    want, want_g = fl.cross_entropy(x64, t, reduction=reduction, grad_output=go, return_grad=True, backend="numpy",
                                    **{k: (v.astype(np.float64) if k == "weight" else v) for k, v in opts.items()})
    close(loss, want, dtype, err_msg=f"loss {case} {reduction} {cuts}")
    close(grad, want_g, dtype, kind="grad", err_msg=f"grad {case} {reduction} {cuts}")
    assert grad.dtype == x.dtype and grad.shape == x.shape
    assert np.asarray(fl.cross_entropy(x[:, :2], t, lse=lse, num_classes=K, reduction=reduction,
                                       backend=backend)).dtype == np.float64  # shares are float64
    if case in ("plain", "weight", "ignore", "smoothing", "z_loss"):  # the closed form (SciPy), fastloss nowhere
        o64 = {k: (np.asarray(v, np.float64) if k == "weight" else v) for k, v in opts.items()}
        close(loss, ref_ce(x64, t, reduction=reduction, **o64), dtype, err_msg=f"closed form {case} {reduction}")
    if case == "plain":  # the lse each shard was given is the full row's
        close(lse, fl.logsumexp(x64, axis=-1, backend="numpy"), dtype)


@pytest.mark.parametrize("cuts", SPLITS)
def test_class_axis_1_and_layouts(backend, cuts):
    """(N, C, d) with the classes on axis 1, shards as strided views, a Fortran-order copy."""
    r = rng(3)
    x = r.standard_normal((4, K, 3))
    t = r.integers(0, K, (4, 3))
    t[0, 0] = -100
    opts = dict(weight=W, label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    loss, grad, lse = _sharded(x, t, cuts, backend, axis=1, reduction="none", **opts)
    want, want_g = fl.cross_entropy(x, t, axis=1, reduction="none", return_grad=True, backend="numpy", **opts)
    close(loss, want)
    close(grad, want_g, kind="grad")
    assert lse.shape == (4, 3)
    xf = np.asfortranarray(x)
    loss, grad, _ = _sharded(xf, t, cuts, backend, axis=1, **opts)
    want, want_g = fl.cross_entropy(x, t, axis=1, return_grad=True, backend="numpy", **opts)
    close(loss, want)
    close(grad, want_g, kind="grad")


def test_in_place_grad_out_and_return_lse(backend):
    """``grad_out`` over the shard itself (in place), and ``return_lse`` handing back the given lse."""
    x, t = _data()
    cuts = (0, 3, K)
    want, want_g = fl.cross_entropy(x, t, weight=W, label_smoothing=0.1, return_grad=True, backend="numpy")
    lse = fl.logsumexp(x, axis=-1, backend="numpy")
    total, parts = 0.0, []
    for a, b in zip(cuts[:-1], cuts[1:]):
        xs = np.array(x[:, a:b])
        loss, g, lse_back = fl.cross_entropy(xs, t, weight=W, label_smoothing=0.1, lse=lse, class_offset=a,
                                             num_classes=K, return_grad=True, return_lse=True, grad_out=xs,
                                             backend=backend)
        assert g is xs or np.shares_memory(g, xs)
        np.testing.assert_array_equal(lse_back, lse)
        assert not np.shares_memory(lse_back, lse)
        total += loss
        parts.append(xs)
    close(total, want)
    close(np.concatenate(parts, axis=1), want_g, kind="grad")


def test_extremes(backend):
    """A -inf target logit (infinite loss, finite gradient), a NaN in one shard (NaN row in
    every shard's share of it, through the lse), every row ignored (0, zero gradient)."""
    x, t = _data()
    x[0, t[0]] = -np.inf
    x[5, K - 1] = np.nan
    cuts = (0, 4, K)
    loss, grad, _ = _sharded(x, t, cuts, backend, reduction="none")
    want, want_g = fl.cross_entropy(x, t, reduction="none", return_grad=True, backend="numpy")
    assert loss[0] == np.inf and np.isfinite(grad[0]).all()
    assert np.isnan(loss[5]) and np.isnan(want[5])
    close(np.delete(loss, 5), np.delete(want, 5))
    close(np.delete(grad, 5, axis=0), np.delete(want_g, 5, axis=0), kind="grad")
    tt = np.full_like(t, -100)
    loss, grad, _ = _sharded(x, tt, cuts, backend, reduction="sum")
    assert loss == 0 and np.all(grad == 0)
    loss, grad, _ = _sharded(x, tt, cuts, backend, reduction="mean")
    np.testing.assert_array_equal(loss, fl.cross_entropy(x, tt, backend="numpy"))  # as unsharded
    assert np.all(grad == 0)


def test_float32_lse_of_large_logits(backend):
    """float32 logits around 1e4: the shards' float64 lse (``row_lse``) and float64 shares
    recover the unsharded loss to float32 accuracy (a float32 lse would be off by ulp(1e4))."""
    x, t = _data(dtype=np.float32)
    x += np.float32(1e4)
    loss, grad, _ = _sharded(x, t, (0, 3, K), backend)
    want, want_g = fl.cross_entropy(x.astype(np.float64), t, return_grad=True, backend="numpy")
    close(loss, want, np.float32)  # the float64 lse and float64 shares: no float32 rounding of 1e4
    close(grad, want_g, np.float32, kind="grad")


# ----------------------------------------------------------------------------- errors
def _bad(match, **kw):
    x, t = _data()
    g = np.full_like(x[:, :4], 7.0)
    args = dict(lse=np.zeros(len(t)), class_offset=0, num_classes=K)
    args.update(kw)
    with pytest.raises((ValueError, TypeError, IndexError), match=match):
        fl.cross_entropy(x[:, :4], args.pop("target", t), return_grad=True, grad_out=g, **args)
    assert np.all(g == 7.0)  # nothing is written on bad input


@pytest.mark.parametrize("kw,match", [
    ({"lse": None, "class_offset": 4}, "lse: expected the global row log-sum-exp"),
    ({"lse": None, "class_offset": 0}, "lse: expected the global row log-sum-exp"),
    ({"class_offset": 4, "num_classes": None}, "num_classes: expected the number of classes"),
    ({"class_offset": 8}, r"num_classes: expected at least class_offset \+ C = 8 \+ 4 = 12"),
    ({"num_classes": 3}, "num_classes: expected at least"),
    ({"class_offset": -1}, "class_offset: expected an integer >= 0"),
    ({"class_offset": 1.5}, "class_offset"),
    ({"num_classes": "11"}, "num_classes"),
    ({"lse": np.zeros(5)}, "lse"),
    ({"weight": np.ones(4)}, "weight"),
    ({"target": np.full(9, K)}, "target"),
    ({"target": np.full((9, 4), 0.25)}, "lse: expected None with probability targets"),
])
def test_errors(kw, match):
    _bad(match, **kw)


def test_num_classes_alone_is_a_shard():
    """``num_classes`` with offset 0 and a global lse: the first shard of a larger vocabulary."""
    x, t = _data()
    t = np.minimum(t, 3)
    lse = fl.logsumexp(x, axis=-1)
    a = fl.cross_entropy(x[:, :4], t, lse=lse, num_classes=K, reduction="sum")
    b = fl.cross_entropy(x[:, 4:], t, lse=lse, class_offset=4, num_classes=K, reduction="sum")
    close(a + b, fl.cross_entropy(x, t, reduction="sum", backend="numpy"))
