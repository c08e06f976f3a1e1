"""``fastloss.distributed.cross_entropy`` on real ``torch.distributed`` groups: gloo on
127.0.0.1, 2 and 4 spawned processes, each holding a block of the classes.

Every rank's loss and the ranks' gradient slices (from autograd ``.backward()``), put side
by side along the class dimension, must equal the single-process result on the full logits:
PyTorch's own float64 autograd (``F.cross_entropy``, with the z-loss written out as
``z * logsumexp(x)**2`` and the softcap as ``s * tanh(x / s)``) and ``fastloss.torch`` on the
NumPy reference backend -- never a sharded computation.

Cost: one spawn per world size (each child imports torch, ~2-4 s), every case and every
backend under test run in a loop inside it; the children write their results to a pickle in
``tmp_path`` and the parent asserts. The parent joins with a deadline and kills the children
on timeout; nothing is left running.
"""
from __future__ import annotations

import os
import pickle
import socket
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

K = 11  # classes in all
W = np.linspace(0.25, 2.0, K)
II = 3  # the ignore_index of the options that ignore rows
OPTS = {
    "plain": {},
    "weight": {"weight": W},
    "ignore": {"ignore_index": II},
    "smoothing": {"label_smoothing": 0.2},
    "z_loss": {"z_loss": 0.01},
    "softcap": {"softcap": 2.5},
    "num_items": {"num_items": 17.0, "weight": W, "ignore_index": II},
    "all": {"weight": W, "ignore_index": II, "label_smoothing": 0.2, "z_loss": 0.01, "softcap": 2.5},
}
# [start, stop) cuts of the classes, and which block each rank holds (a permutation: the rank
# holding class 0 need not be rank 0); one-class blocks at both ends, uneven blocks
LAYOUTS = {
    2: {"uneven": ((0, 4, K), (0, 1)), "swapped": ((0, 10, K), (1, 0))},
    4: {"uneven": ((0, 1, 6, 10, K), (0, 1, 2, 3)), "shuffled": ((0, 2, 3, 9, K), (2, 0, 3, 1))},
}
TIMEOUT = 150  # seconds for a whole spawn (its slowest part is importing torch in every child)


def _cases(P):
    """Name -> spec of every case a world of ``P`` ranks runs (the same list in parent and children)."""
    cases = {}
    lay = list(LAYOUTS[P])
    for i, (name, opts) in enumerate(OPTS.items()):
        for red in ("mean", "sum", "none"):
            if name == "num_items" and red != "mean":
                continue
            cases[f"{name}-{red}"] = dict(kind="2d", opts=name, red=red, dtype="float64", layout=lay[i % 2])
    for red in ("mean", "none"):
        cases[f"all-float32-{red}"] = dict(kind="2d", opts="all", red=red, dtype="float32", layout=lay[0])
    for name in ("plain", "all"):
        for red in ("mean", "none"):
            cases[f"3d-{name}-{red}"] = dict(kind="3d", opts=name, red=red, dtype="float64", layout=lay[1])
    cases["unbatched"] = dict(kind="1d", opts="weight", red="mean", dtype="float64", layout=lay[0])
    for red in ("mean", "none"):
        cases[f"neginf-target-{red}"] = dict(kind="2d", opts="plain", red=red, dtype="float64", layout=lay[0],
                                             special="neginf")
    cases["masked-shard-all"] = dict(kind="2d", opts="all", red="mean", dtype="float64", layout=lay[0],
                                     special="masked")
    cases["masked-shard-plain"] = dict(kind="2d", opts="plain", red="sum", dtype="float64", layout=lay[0],
                                       special="masked")
    cases["strided-all-none"] = dict(kind="2d", opts="all", red="none", dtype="float64", layout=lay[1],
                                     special="strided")
    cases["all-ignored-mean"] = dict(kind="2d", opts="all", red="mean", dtype="float64", layout=lay[1],
                                     special="ignored")
    for c in cases.values():
        c.setdefault("special", None)
    return cases


def _data(case):
    """The full float64 logits and the target of a case (deterministic: parent and children agree)."""
    r = np.random.default_rng(7)
    if case["kind"] == "1d":
        return r.standard_normal(K) * 2, np.array(8)
    if case["kind"] == "3d":
        return r.standard_normal((3, K, 4)) * 2, r.integers(0, K, (3, 4))
    x, t = r.standard_normal((9, K)) * 2, r.integers(0, K, 9)
    t[1], t[2], t[4] = II, K - 1, 0  # an ignored row (with ignore_index=3), targets in the end blocks
    if case["special"] == "neginf":
        t[0] = 5
        x[0, 5] = -np.inf  # loss +inf, no NaN in the gradient
    elif case["special"] == "masked":
        x[5, :6] = -np.inf  # row 5: the first blocks all -inf (their lse is -inf)
        x[6, 2:] = -np.inf  # row 6: only classes 0, 1 live
        t[5], t[6] = 8, 1
    elif case["special"] == "ignored":
        t[:] = II
    return x, t


def _opts(case):
    o = dict(OPTS[case["opts"]])
    if "weight" in o:
        o["weight"] = torch.tensor(o["weight"], dtype=getattr(torch, case["dtype"]))
    return o


def _upstream(case, rows):
    """The upstream gradient the backward is called with: rows for "none", a scalar otherwise."""
    if case["red"] == "none":
        return torch.tensor(np.random.default_rng(3).uniform(0.5, 1.5, rows), dtype=getattr(torch, case["dtype"]))
    return torch.tensor(0.75 if case["red"] == "sum" else 1.0, dtype=getattr(torch, case["dtype"]))


def _dim(x):
    return 1 if x.ndim >= 2 else 0


# ----------------------------------------------------------------------------- the children
def _run_case(fld, case, P, pos, backend, group=None, **over):
    """This rank's loss, gradient slice and lse of a case (``pos``: its place in the group)."""
    cuts, order = LAYOUTS[P][case["layout"]]
    blk = order[pos]
    a, b = cuts[blk], cuts[blk + 1]
    x, t = _data(case)
    dt = getattr(torch, case["dtype"])
    block = np.take(x, range(a, b), axis=_dim(x))
    if case["special"] == "strided":  # a non-contiguous shard: the transposed view of a leaf
        leaf = torch.tensor(block.T.copy(), dtype=dt).requires_grad_()
        xs = leaf.T
    else:
        leaf = xs = torch.tensor(block, dtype=dt).requires_grad_()
    kw = dict(class_offset=a, num_classes=K, reduction=case["red"], return_lse=True, backend=backend,
              group=group, **_opts(case))
    kw.update(over)
    loss, lse = fld.cross_entropy(xs, torch.tensor(t), **kw)
    loss.backward(_upstream(case, t.shape))
    grad = leaf.grad.T if leaf is not xs else leaf.grad
    return {"loss": loss.detach().numpy().copy(), "dtype": str(loss.dtype), "grad": grad.numpy().copy(),
            "lse": lse.numpy().copy(), "lse_dtype": str(lse.dtype), "block": blk, "requires_grad": loss.requires_grad}


def _attempt(fn):
    try:
        return fn()
    except Exception as e:  # recorded for the parent, which asserts what each rank raised
        return {"error": type(e).__name__, "message": str(e)}


def _errors(fld, P, rank, backend):
    """Calls that are wrong on one rank or disagree between ranks: every rank must raise (none may
    hang in a collective), each what the parent expects."""
    case = dict(kind="2d", opts="plain", red="mean", dtype="float64", layout=list(LAYOUTS[P])[0], special=None)
    last = rank == P - 1
    x, t = _data(case)
    cuts, order = LAYOUTS[P][case["layout"]]
    a, b = cuts[order[rank]], cuts[order[rank] + 1]
    xs, tt = torch.tensor(x[:, a:b]), torch.tensor(t)
    call = lambda **kw: _attempt(lambda: float(fld.cross_entropy(  # noqa: E731
        kw.pop("x", xs), kw.pop("t", tt), **{"class_offset": a, "num_classes": K, "backend": backend, **kw})))
    t_odd = tt.clone()
    t_odd[0] = (t_odd[0] + 1) % K
    return {
        "gap": call(num_classes=K + 1),  # every rank agrees, but [0, K) does not cover [0, K + 1)
        "overlap": call(class_offset=max(a - 1, 0) if last else a),  # the last block starts one early
        "num_classes": call(num_classes=K + 1 if rank == 0 else K),
        "target": call(t=t_odd if last else tt),
        "smoothing": call(label_smoothing=0.1 if last else 0.0),
        "weight": call(weight=torch.tensor(W * (2.0 if last else 1.0))),
        "local-dtype": call(x=xs.long() if last else xs),  # only the last rank's call is bad in itself
        "local-option": call(reduction="avg" if last else "mean"),
        "index": call(t=torch.full_like(tt, K)),  # out of range on every rank
        "probabilities": call(t=torch.softmax(torch.tensor(x), 1)),
        "weight-grad": call(weight=torch.tensor(W, requires_grad=True)),
        "after": call(),  # the collectives are still in step after all of the above
    }


def _worker(rank, P, port, outdir, backends):
    """One rank, for each backend: the error cases first (so that the regular cases after them
    show the collectives stayed in step), every case, then (4 ranks) two subgroups; results
    pickled for the parent."""
    torch.set_num_threads(1)  # 2 cores shared by up to 4 processes
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=P)
    try:
        import fastloss as fl
        import fastloss.distributed as fld

        fl.set_num_threads(1)
        out = {}
        for backend in backends:
            out[backend, "errors"] = _errors(fld, P, rank, backend)
            for name, case in _cases(P).items():
                out[backend, name] = _attempt(lambda: _run_case(fld, case, P, rank, backend))
            if P == 4:  # two disjoint subgroups at once, each with its own case (every rank creates both)
                groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
                mine, pos = groups[rank % 2], rank // 2
                case = _cases(2)["all-none" if rank % 2 else "weight-sum"]
                out[backend, "subgroup"] = _attempt(lambda: _run_case(fld, case, 2, pos, backend, group=mine))
                for g in groups:
                    dist.destroy_process_group(g)
        with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(out, f)
        # Every rank done with every collective before any tears its group down: a rank that
        # destroyed the gloo group (and exited) while its peer was still in the last collective's
        # teardown once killed that peer with "terminate called without an active exception"
        # (std::terminate from gloo's pair threads; the rank's results were already written).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(P, outdir, backends):
    """Run ``P`` ranks to completion within ``TIMEOUT`` (killed otherwise); their pickled results."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(P, _free_port(), str(outdir), backends), nprocs=P, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {P} ranks did not finish within {TIMEOUT} s (killed)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(5)
        assert not any(p.is_alive() for p in ctx.processes), "a rank outlived the test"
    out = []
    for r in range(P):
        with open(os.path.join(outdir, f"rank{r}.pkl"), "rb") as f:
            out.append(pickle.load(f))
    return out


_RESULTS: dict = {}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """``results(P)``: the per-rank results of the spawn of ``P`` ranks (run once per module)."""
    from conftest import _backend_list

    def get(P):
        if P not in _RESULTS:
            _RESULTS[P] = _spawn(P, tmp_path_factory.mktemp(f"world{P}"), _backend_list())
        return _RESULTS[P]

    yield get
    _RESULTS.clear()


# ----------------------------------------------------------------------------- references
def _torch_ref(x, t, case, dt):
    """PyTorch float64 autograd on the full logits: loss, gradient (for the case's upstream) and lse."""
    o = OPTS[case["opts"]]
    xr = torch.tensor(np.asarray(x, dtype=dt).astype(np.float64), requires_grad=True)
    tt = torch.tensor(t)
    dim = _dim(x)
    xc = o["softcap"] * torch.tanh(xr / o["softcap"]) if "softcap" in o else xr
    w = torch.tensor(np.asarray(o["weight"], dtype=dt).astype(np.float64)) if "weight" in o else None
    ii = o.get("ignore_index", -100)
    rows = F.cross_entropy(xc, tt, weight=w, ignore_index=ii, label_smoothing=o.get("label_smoothing", 0.0),
                           reduction="none")
    kept = tt != ii
    lse = torch.logsumexp(xc, dim)
    if "z_loss" in o:
        rows = rows + o["z_loss"] * torch.where(kept, lse, 0.0) ** 2
    if case["red"] == "none":
        loss = rows
    elif case["red"] == "sum":
        loss = rows.sum()
    else:
        wt = w[torch.where(kept, tt, 0)] if w is not None else torch.ones(tt.shape, dtype=torch.float64)
        denom = o.get("num_items", float((wt * kept).sum()))
        loss = rows.sum() / denom if denom else rows.sum() * 0.0
    loss.backward(_upstream(case, t.shape).double())
    return loss.detach().numpy(), xr.grad.numpy(), lse.detach().numpy()


def _fastloss_ref(x, t, case, dt):
    """``fastloss.torch.cross_entropy`` on the full logits, on the NumPy reference backend."""
    import fastloss.torch as flt

    xr = torch.tensor(np.asarray(x, dtype=dt).astype(np.float64), requires_grad=True)
    o = dict(_opts(case))
    if "weight" in o:
        o["weight"] = o["weight"].double()
    loss = flt.cross_entropy(xr, torch.tensor(t), reduction=case["red"], backend="numpy", **o)
    loss.backward(_upstream(case, t.shape).double())
    return loss.detach().numpy(), xr.grad.numpy()


def _assemble(per_rank, P):
    """The ranks' gradient slices side by side, in class order; the losses (one per rank)."""
    for r in per_rank:
        assert "error" not in r, r
    blocks = sorted(per_rank, key=lambda r: r["block"])
    assert [r["block"] for r in blocks] == list(range(P))
    dim = _dim(blocks[0]["grad"])
    return [r["loss"] for r in per_rank], np.concatenate([r["grad"] for r in blocks], axis=dim)


def _check(per_rank, case, P):
    losses, grad = _assemble(per_rank, P)
    x, t = _data(case)
    dt = np.dtype(case["dtype"])
    f64 = dt == np.float64
    rtol, atol_g = (1e-12, 1e-13) if f64 else (2e-6, 1e-6)
    want, want_grad, want_lse = _torch_ref(x, t, case, dt)
    fl_loss, fl_grad = _fastloss_ref(x, t, case, dt)
    for r, loss in zip(per_rank, losses):
        assert r["dtype"] == f"torch.{case['dtype']}" and r["lse_dtype"] == r["dtype"] and r["requires_grad"]
        np.testing.assert_array_equal(loss, losses[0])  # the same loss on every rank
        np.testing.assert_array_equal(r["lse"], per_rank[0]["lse"])
    for ref, what in ((want, "PyTorch"), (fl_loss, "fastloss.torch")):
        np.testing.assert_allclose(losses[0], np.asarray(ref, dt), rtol=rtol, atol=1e-14 if f64 else 1e-7,
                                   err_msg=f"loss vs {what}")
    for ref, what in ((want_grad, "PyTorch"), (fl_grad, "fastloss.torch")):
        np.testing.assert_allclose(grad, ref, rtol=rtol, atol=atol_g, err_msg=f"gradient vs {what}")
    assert not np.isnan(grad).any()
    np.testing.assert_allclose(per_rank[0]["lse"], want_lse, rtol=rtol, atol=0, err_msg="lse")


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("P", [2, 4])
@pytest.mark.parametrize("name", list(_cases(2)))
def test_matches_the_unsharded_loss_and_gradient(results, backend, P, name):
    per_rank = [res[backend, name] for res in results(P)]
    _check(per_rank, _cases(P)[name], P)


def test_the_references_see_what_the_cases_promise():
    """The special cases are what their names say (so a passing comparison means something)."""
    cases = _cases(2)
    x, t = _data(cases["neginf-target-mean"])
    want, grad, _ = _torch_ref(x, t, cases["neginf-target-none"], np.float64)
    assert np.isinf(want[0]) and np.isfinite(want[1:]).all() and np.isfinite(grad).all()
    x, _ = _data(cases["masked-shard-all"])
    assert np.isneginf(x[5, :6]).all() and np.isneginf(x[6, 2:]).all()
    want, grad, _ = _torch_ref(*_data(cases["all-ignored-mean"]), cases["all-ignored-mean"], np.float64)
    assert want == 0 and not grad.any()
    for P, lays in LAYOUTS.items():  # every layout tiles [0, K) and has a one-class block
        for cuts, order in lays.values():
            assert cuts[0] == 0 and cuts[-1] == K and sorted(order) == list(range(P)) and len(cuts) == P + 1
    assert any(b - a == 1 for a, b in zip(LAYOUTS[4]["uneven"][0], LAYOUTS[4]["uneven"][0][1:]))


def test_softcap_matches_capped_logits_in_pytorch(results, backend):
    """Softcap: the spawned result equals F.cross_entropy of s * tanh(x / s) in float64, which
    _torch_ref forms; here also checked against a hand-written float64 closed form."""
    case = _cases(2)["softcap-sum"]
    losses, grad = _assemble([res[backend, "softcap-sum"] for res in results(2)], 2)
    x, t = _data(case)
    s = OPTS["softcap"]["softcap"]
    xc = s * np.tanh(x / s)
    lse = np.log(np.exp(xc).sum(1))
    np.testing.assert_allclose(losses[0], np.sum(lse - xc[np.arange(len(t)), t]), rtol=1e-12)
    p = np.exp(xc - lse[:, None])
    p[np.arange(len(t)), t] -= 1
    np.testing.assert_allclose(grad, 0.75 * p * (1 - np.tanh(x / s) ** 2), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["weight-sum", "all-none"])
def test_two_subgroups_at_once(results, backend, name):
    """Ranks {0, 2} and {1, 3} of a world of 4: each subgroup computes its own case, and gets
    exactly the unsharded result of its two ranks' blocks."""
    res = results(4)
    members = [0, 2] if name == "weight-sum" else [1, 3]
    _check([res[r][backend, "subgroup"] for r in members], _cases(2)[name], 2)


def _expect(per_rank, kind, fragment, *, own=None):
    """Every rank raised; ``own`` maps ranks to (kind, fragment) that raise their own error."""
    own = own or {}
    for r, res in enumerate(per_rank):
        k, frag = own.get(r, (kind, fragment))
        assert res.get("error") == k and frag in res["message"], (r, res)


@pytest.mark.parametrize("P", [2, 4])
def test_errors_are_raised_on_every_rank(results, backend, P):
    err = [res[backend, "errors"] for res in results(P)]
    e = lambda key: [r[key] for r in err]  # noqa: E731
    last = P - 1
    _expect(e("gap"), "ValueError", f"class_offset: expected the ranks' shards [class_offset, class_offset + "
                                    f"C_local) to tile [0, num_classes) = [0, {K + 1}) exactly")
    _expect(e("overlap"), "ValueError", "to tile [0, num_classes) = [0, 11) exactly (no gap, no overlap), found rank 0")
    _expect(e("num_classes"), "ValueError", "num_classes: expected the same value on every rank of the group")
    _expect(e("target"), "ValueError", f"target: expected the same (global) class indices on every rank of the "
                                       f"group, found rank 0 and rank {last} disagreeing")
    _expect(e("smoothing"), "ValueError", "label_smoothing: expected the same value on every rank")
    _expect(e("weight"), "ValueError", "weight: expected the same whole (num_classes,) vector")
    others = ("ValueError", f"group: rank {last} of the group rejected its arguments")
    _expect(e("local-dtype"), *others, own={last: ("TypeError", "logits: expected a floating array")})
    _expect(e("local-option"), *others, own={last: ("ValueError", "reduction")})
    _expect(e("index"), "IndexError", f"{K}")
    _expect(e("probabilities"), "ValueError", "target: expected integer class indices")
    _expect(e("weight-grad"), "RuntimeError", "not differentiable with respect to argument 'weight'")
    x, t = _data(dict(kind="2d", special=None))
    want = F.cross_entropy(torch.tensor(x), torch.tensor(t)).item()
    for res in e("after"):
        assert res == pytest.approx(want, rel=1e-12), res


def test_overlap_message_lists_every_rank(results, backend):
    msg = results(2)[0][backend, "errors"]["overlap"]["message"]
    assert "rank 0: [0, 4), rank 1: [3, 10)" in msg, msg


def test_needs_an_initialized_process_group():
    import fastloss.distributed as fld

    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="group: expected an initialized torch.distributed process group"):
        fld.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), class_offset=0, num_classes=3)
