"""fastloss.torch against torch.nn.functional: values and every gradient, on every host backend.

The references are PyTorch's own functions in float64 with torch.autograd (and
``torch.autograd.gradcheck``'s finite differences), never fastloss. Low-precision inputs
(float32, float16, bfloat16) are compared with float64 PyTorch on the same rounded values
within the SPEC's tolerances (float32: 2e-6 relative on the loss, 1e-6 absolute on O(1)
gradients; float16/bfloat16: one rounding of the result).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastloss as fl
import fastloss.torch as flt

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _z_ref(x, t, z, ignore_index=-100, reduction="mean", weight=None, label_smoothing=0.0):
    """PyTorch's cross-entropy plus PaLM's z-loss written out: z * lse**2 per non-ignored row,
    "mean" over the cross-entropy's own denominator."""
    ce = F.cross_entropy(x, t, weight, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    keep = (t != ignore_index).to(x.dtype)
    zl = z * torch.logsumexp(x, 1) ** 2 * keep
    if reduction == "none":
        return ce + zl
    if reduction == "sum":
        return (ce + zl).sum()
    den = (weight[t.clamp(min=0)] * keep).sum() if weight is not None else keep.sum()
    return (ce + zl).sum() / den


# Each case: (id, ours, reference, make) where make(gen) -> (args, kwargs, differentiable positions).
def _x(g, *shape, scale=3.0):
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def _probs(g, *shape, dim=1):
    # moderate probabilities: d/dt (t log t) has curvature 1/t, which finite differences
    # near t = 0 cannot follow
    return torch.softmax(_x(g, *shape, scale=1.0), dim)


def _unit(g, *shape, lo=0.05, hi=0.95):
    return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=F64)


T6 = torch.tensor([0, 4, 2, -100, 1, 3])
T7 = torch.tensor([0, 8, 2, -100, 1, 3, 8])  # 9 classes (linear_cross_entropy's V)


def _cap(x, s):
    """Gemma 2's logit soft cap, written out."""
    return s * torch.tanh(x / s)


def _lin_ref(h, W, t, b=None, **k):
    """linear_cross_entropy by hand: F.linear, then F.cross_entropy over the rows (every index
    of ``h`` but the last)."""
    z = F.linear(h, W, b)
    if h.dim() <= 2:
        return F.cross_entropy(z, t, **k)
    out = F.cross_entropy(z.reshape(-1, z.shape[-1]), t.reshape(-1), **k)
    return out.reshape(t.shape) if k.get("reduction") == "none" else out


def _lin_ours(**fixed):
    def f(h, W, t, b=None, **k):
        return flt.linear_cross_entropy(h, W, t, linear_bias=b, **fixed, **k)
    return f

CASES = [
    ("ce", flt.cross_entropy, F.cross_entropy, lambda g: ((_x(g, 6, 5), T6), {}, (0,))),
    ("ce-sum", flt.cross_entropy, F.cross_entropy, lambda g: ((_x(g, 6, 5), T6), dict(reduction="sum"), (0,))),
    ("ce-none", flt.cross_entropy, F.cross_entropy, lambda g: ((_x(g, 6, 5), T6), dict(reduction="none"), (0,))),
    ("ce-weight-smooth", flt.cross_entropy, F.cross_entropy,
     lambda g: ((_x(g, 6, 5), torch.tensor([0, 4, 2, 2, 1, 3]), _unit(g, 5)), dict(label_smoothing=0.2, ignore_index=2),
                (0,))),
    ("ce-nd", flt.cross_entropy, F.cross_entropy,
     lambda g: ((_x(g, 3, 4, 2, 2), torch.randint(0, 4, (3, 2, 2), generator=g)), dict(reduction="none"), (0,))),
    ("ce-unbatched", flt.cross_entropy, F.cross_entropy, lambda g: ((_x(g, 7), torch.tensor(3)), {}, (0,))),
    ("ce-soft", flt.cross_entropy, F.cross_entropy,
     lambda g: ((_x(g, 6, 5), _probs(g, 6, 5), _unit(g, 5)), dict(label_smoothing=0.1), (0, 1, 2))),
    ("ce-soft-none", flt.cross_entropy, F.cross_entropy,
     lambda g: ((_x(g, 2, 5, 3), _probs(g, 2, 5, 3)), dict(reduction="none"), (0, 1))),
    ("ce-zloss", lambda x, t, **k: flt.cross_entropy(x, t, z_loss=1e-2, **k), lambda x, t, **k: _z_ref(x, t, 1e-2, **k),
     lambda g: ((_x(g, 6, 5), T6), {}, (0,))),
    ("ce-zloss-none", lambda x, t, **k: flt.cross_entropy(x, t, z_loss=0.5, **k),
     lambda x, t, **k: _z_ref(x, t, 0.5, **k), lambda g: ((_x(g, 6, 5), T6), dict(reduction="none"), (0,))),
    ("ce-softcap", lambda x, t, w, **k: flt.cross_entropy(x, t, w, softcap=4.0, **k),
     lambda x, t, w, **k: F.cross_entropy(_cap(x, 4.0), t, w, **k),
     lambda g: ((_x(g, 6, 5), T6, _unit(g, 5)), dict(label_smoothing=0.1), (0,))),
    ("ce-softcap-zloss-none", lambda x, t, **k: flt.cross_entropy(x, t, softcap=2.0, z_loss=0.1, **k),
     lambda x, t, **k: _z_ref(_cap(x, 2.0), t, 0.1, **k), lambda g: ((_x(g, 6, 5), T6), dict(reduction="none"), (0,))),
    ("ce-soft-softcap", lambda x, y, w, **k: flt.cross_entropy(x, y, w, softcap=3.0, **k),
     lambda x, y, w, **k: F.cross_entropy(_cap(x, 3.0), y, w, **k),
     lambda g: ((_x(g, 6, 5), _probs(g, 6, 5), _unit(g, 5)), dict(label_smoothing=0.1), (0, 1, 2))),
    ("ce-num-items", lambda x, t, w, **k: flt.cross_entropy(x, t, w, num_items=7.5, **k),
     lambda x, t, w, **k: F.cross_entropy(x, t, w, reduction="sum", **k) / 7.5,
     lambda g: ((_x(g, 6, 5), T6, _unit(g, 5)), {}, (0,))),
    ("ce-soft-num-items", lambda x, y, w, **k: flt.cross_entropy(x, y, w, num_items=2.5, **k),
     lambda x, y, w, **k: F.cross_entropy(x, y, w, reduction="sum", **k) / 2.5,
     lambda g: ((_x(g, 6, 5), _probs(g, 6, 5), _unit(g, 5)), {}, (0, 1, 2))),
    ("lce", _lin_ours(chunk_size=2), _lin_ref,
     lambda g: ((_x(g, 7, 4, scale=1.0), _x(g, 9, 4, scale=1.0), T7, _x(g, 9, scale=1.0)),
                dict(weight=_unit(g, 9), label_smoothing=0.1), (0, 1, 3))),
    ("lce-sum-ignore", _lin_ours(), _lin_ref,
     lambda g: ((_x(g, 7, 4, scale=1.0), _x(g, 9, 4, scale=1.0), torch.tensor([0, 8, 2, 2, 1, 3, 8])),
                dict(reduction="sum", ignore_index=2), (0, 1))),
    ("lce-none", _lin_ours(chunk_size=3), _lin_ref,
     lambda g: ((_x(g, 7, 4, scale=1.0), _x(g, 9, 4, scale=1.0), T7, _x(g, 9, scale=1.0)),
                dict(reduction="none", weight=_unit(g, 9), label_smoothing=0.2), (0, 1, 3))),
    ("lce-softcap-zloss", _lin_ours(softcap=2.0, z_loss=0.05, chunk_size=4),
     lambda h, W, t, b, **k: _z_ref(_cap(F.linear(h, W, b), 2.0), t, 0.05, **k),
     lambda g: ((_x(g, 7, 4, scale=1.0), _x(g, 9, 4), T7, _x(g, 9, scale=1.0)), dict(label_smoothing=0.1),
                (0, 1, 3))),
    ("lce-num-items", _lin_ours(num_items=4.5),
     lambda h, W, t, **k: F.cross_entropy(F.linear(h, W), t, reduction="sum", **k) / 4.5,
     lambda g: ((_x(g, 7, 4, scale=1.0), _x(g, 9, 4, scale=1.0), T7), {}, (0, 1))),
    ("lce-unbatched", _lin_ours(), _lin_ref,
     lambda g: ((_x(g, 4, scale=1.0), _x(g, 9, 4, scale=1.0), torch.tensor(5), _x(g, 9, scale=1.0)), {}, (0, 1, 3))),
    ("lce-rows-3d-none", _lin_ours(chunk_size=4), _lin_ref,
     lambda g: ((_x(g, 2, 3, 4, scale=1.0), _x(g, 9, 4, scale=1.0), T6.reshape(2, 3).clamp(max=8)),
                dict(reduction="none"), (0, 1))),
    ("bce-logits", flt.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits,
     lambda g: ((_x(g, 4, 5), _unit(g, 4, 5, lo=0, hi=1)), {}, (0, 1))),
    ("bce-logits-w", flt.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits,
     lambda g: ((_x(g, 4, 5), _unit(g, 4, 5, lo=0, hi=1), _unit(g, 4, 5)),
                dict(pos_weight=_unit(g, 5, lo=0.5, hi=3), reduction="none"), (0, 1))),
    ("bce", flt.binary_cross_entropy, F.binary_cross_entropy,
     lambda g: ((_unit(g, 4, 5), _unit(g, 4, 5, lo=0, hi=1), _unit(g, 4, 5)), dict(reduction="sum"), (0, 1))),
    ("bce-none", flt.binary_cross_entropy, F.binary_cross_entropy,
     lambda g: ((_unit(g, 3, 4), _unit(g, 3, 4, lo=0, hi=1)), dict(reduction="none"), (0, 1))),
    ("kl-mean", flt.kl_div, F.kl_div, lambda g: ((torch.log_softmax(_x(g, 4, 5), 1), _probs(g, 4, 5)), {}, (0, 1))),
    ("kl-batchmean", flt.kl_div, F.kl_div,
     lambda g: ((torch.log_softmax(_x(g, 4, 5), 1), _probs(g, 4, 5)), dict(reduction="batchmean"), (0, 1))),
    ("kl-logtarget-none", flt.kl_div, F.kl_div,
     lambda g: ((torch.log_softmax(_x(g, 4, 5), 1), torch.log_softmax(_x(g, 4, 5), 1)),
                dict(log_target=True, reduction="none"), (0, 1))),
    ("mse", flt.mse_loss, F.mse_loss, lambda g: ((_x(g, 4, 5), _x(g, 4, 5)), {}, (0, 1))),
    ("mse-none", flt.mse_loss, F.mse_loss, lambda g: ((_x(g, 4, 5), _x(g, 4, 5)), dict(reduction="none"), (0, 1))),
    ("mse-weight", flt.mse_loss, F.mse_loss,
     lambda g: ((_x(g, 4, 5), _x(g, 4, 5)), dict(weight=_unit(g, 4, 5)), (0, 1))),
    ("gnll", flt.gaussian_nll_loss, F.gaussian_nll_loss,
     lambda g: ((_x(g, 4, 5), _x(g, 4, 5), _unit(g, 4, 5, lo=0.5, hi=2)), {}, (0, 1, 2))),
    ("gnll-rowvar-full-none", flt.gaussian_nll_loss, F.gaussian_nll_loss,
     lambda g: ((_x(g, 4, 5), _x(g, 4, 5), _unit(g, 4, lo=0.5, hi=2)), dict(full=True, reduction="none"), (0, 1, 2))),
    ("gnll-bcast-sum", flt.gaussian_nll_loss, F.gaussian_nll_loss,
     lambda g: ((_x(g, 4, 5), _x(g, 4, 5), _unit(g, 4, 1, lo=0.5, hi=2)), dict(reduction="sum"), (0, 1, 2))),
    ("gnll-floatvar", lambda x, t, **k: flt.gaussian_nll_loss(x, t, 0.7, **k),
     lambda x, t, **k: F.gaussian_nll_loss(x, t, torch.full_like(x, 0.7), **k), lambda g: ((_x(g, 4, 5), _x(g, 4, 5)), {}, (0, 1))),
    ("logsumexp", flt.logsumexp, torch.logsumexp, lambda g: ((_x(g, 4, 5), 1), {}, (0,))),
    ("logsumexp-tuple-keepdim", flt.logsumexp, torch.logsumexp,
     lambda g: ((_x(g, 3, 4, 2), (0, 2)), dict(keepdim=True), (0,))),
    ("softmax", flt.softmax, torch.softmax, lambda g: ((_x(g, 4, 5), 1), {}, (0,))),
    ("softmax-dim0", flt.softmax, torch.softmax, lambda g: ((_x(g, 4, 5), 0), {}, (0,))),
    ("log_softmax", flt.log_softmax, torch.log_softmax, lambda g: ((_x(g, 3, 4, 2), 1), {}, (0,))),
]
IDS = [c[0] for c in CASES]


def _prepare(make, dtype=F64, seed=0):
    """The case's args in ``dtype`` (floating ones), the differentiable ones requiring grad."""
    args, kw, diff = make(_gen(seed))
    args = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    kw = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    for i in diff:
        args[i] = args[i].detach().requires_grad_(True)
    return args, kw, diff


def _upstream(out, seed=1):
    return torch.randn(out.shape, generator=_gen(seed), dtype=F64).to(out.dtype) if out.dim() else torch.ones((), dtype=out.dtype)


def _grads(fn, args, kw, diff, go=None):
    out = fn(*args, **kw)
    go = _upstream(out) if go is None else go
    return out, torch.autograd.grad(out, [args[i] for i in diff], go), go


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float64_values_and_gradients_match_pytorch(backend, case):
    _, ours, ref, make = case
    args, kw, diff = _prepare(make)
    out, gs, go = _grads(lambda *a, **k: ours(*a, backend=backend, **k), args, kw, diff)
    ref_out, ref_gs, _ = _grads(ref, args, kw, diff, go)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-13)
    for i, a, b in zip(diff, gs, ref_gs):
        assert a.shape == b.shape and a.dtype == b.dtype, f"gradient of argument {i}"
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"gradient of argument {i}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradcheck(backend, case):
    """Every gradient against finite differences (float64), upstream gradients included."""
    _, ours, _, make = case
    args, kw, diff = _prepare(make)

    def f(*d):
        a = list(args)
        for i, v in zip(diff, d):
            a[i] = v
        return ours(*a, backend=backend, **kw)

    assert torch.autograd.gradcheck(f, [args[i] for i in diff], eps=1e-6, atol=1e-6, rtol=1e-5)


TOL = {torch.float32: (2e-6, 1e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_low_precision_against_float64_pytorch(backend, case, dtype):
    """Results in the input dtype (PyTorch's), equal to float64 PyTorch on the same rounded
    values within one rounding of the result dtype."""
    _, ours, ref, make = case
    args, kw, diff = _prepare(make, dtype)
    out, gs, go = _grads(lambda *a, **k: ours(*a, backend=backend, **k), args, kw, diff)
    assert out.dtype == dtype and all(g.dtype == dtype for g in gs)
    a64, kw64, _ = _prepare(lambda g: ([a.detach().double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                        else a for a in args], {k: v.double() if isinstance(v, torch.Tensor) else v
                                                                for k, v in kw.items()}, diff), F64)
    ref_out, ref_gs, _ = _grads(ref, a64, kw64, diff, go.double())
    rtol, atol = TOL[dtype]
    scale = max(1.0, float(ref_out.abs().max()))  # losses of O(10) are compared at their own scale
    torch.testing.assert_close(out.double(), ref_out, rtol=rtol, atol=atol * scale)
    for i, a, b in zip(diff, gs, ref_gs):
        gscale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol * gscale, msg=f"gradient of argument {i}")


@pytest.mark.parametrize("layout", ["transposed", "strided", "sliced"])
def test_non_contiguous_inputs(backend, layout):
    g = _gen(3)
    base = _x(g, 10, 12)
    x = {"transposed": base.t()[:, :8], "strided": base[::2, ::3], "sliced": base[2:7, 1:9]}[layout]
    assert not x.is_contiguous()
    x = x.detach().requires_grad_(True)
    t = torch.randint(0, x.shape[1], (x.shape[0],), generator=g)
    y = torch.rand(x.shape, generator=g, dtype=F64)
    for ours, ref, tgt in [(flt.cross_entropy, F.cross_entropy, t),
                           (flt.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, y),
                           (flt.mse_loss, F.mse_loss, y)]:
        a, (ga,), _ = _grads(lambda *a: ours(*a, backend=backend), [x, tgt], {}, (0,))
        b, (gb,), _ = _grads(ref, [x, tgt], {}, (0,))
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


def test_cpu_tensors_reach_the_kernels_without_copies():
    base = torch.randn(6, 8)
    for t in (base, base.t(), base[::2, 1:5], base.bfloat16()):
        a = flt._arr(t)
        assert a.ctypes.data == t.data_ptr()
        assert a.strides == tuple(s * t.element_size() for s in t.stride())


def test_no_gradient_is_computed_when_none_is_needed(monkeypatch):
    seen = []
    real = flt._fl.cross_entropy

    def spy(*a, **k):
        seen.append(k["return_grad"])
        return real(*a, **k)

    monkeypatch.setattr(flt._fl, "cross_entropy", spy)
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    flt.cross_entropy(x, t)
    flt.cross_entropy(x.requires_grad_(), t)
    with torch.no_grad():
        flt.cross_entropy(x, t)
    assert seen == [False, True, False]


def test_the_upstream_one_hands_over_the_saved_gradient():
    """After loss.backward() the input's .grad is the array the fused pass wrote (no second
    pass), and a second backward through a retained graph gives the same gradient again."""
    x = torch.randn(5, 4, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 0])
    loss = flt.cross_entropy(x, t)
    loss.backward(retain_graph=True)
    g1 = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * g1)
    ref = torch.autograd.grad(F.cross_entropy(x, t), x)[0]
    torch.testing.assert_close(g1, ref)



@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("ce", "ce-weight-smooth", "bce-logits", "bce", "kl-mean",
                                                               "mse", "gnll")], ids=lambda c: c[0])
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss")  # F.kl_div's, the reference
def test_backward_after_a_scalar_loss_touches_no_input_sized_tensor(case):
    """With the upstream 1 of ``loss.backward()`` the backward only hands over the gradient the
    fused forward saved: no operator runs on a tensor of the input's shape -- neither a rescale
    nor autograd's zero-filling of the saved-gradient outputs' absent gradients (which at
    2048 x 32000 cost 60-80 ms per backward before the ops stopped materializing them)."""
    name, fn, _, make = case
    args, kw, _ = _prepare(make, dtype=torch.float32)
    x = args[0].detach().requires_grad_(True)
    args = [x] + [a.detach() if isinstance(a, torch.Tensor) else a for a in args[1:]]
    loss = fn(*args, **kw)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        (g,) = torch.autograd.grad(loss, x)
    touched = [e.name for e in prof.events() if any(list(s) == list(x.shape) for s in e.input_shapes)]
    assert not touched, (name, touched)
    ref = torch.autograd.grad(case[2](*args, **kw), x)[0]
    torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)

MODULES = [
    (flt.CrossEntropyLoss, torch.nn.CrossEntropyLoss, dict(weight=torch.rand(5, dtype=F64) + 0.5, label_smoothing=0.1,
                                                            ignore_index=1), "index"),
    (flt.CrossEntropyLoss, torch.nn.CrossEntropyLoss, dict(reduction="sum"), "probs"),
    (flt.BCEWithLogitsLoss, torch.nn.BCEWithLogitsLoss, dict(weight=torch.rand(6, 5, dtype=F64),
                                                              pos_weight=torch.rand(5, dtype=F64) + 0.5), "unit"),
    (flt.BCELoss, torch.nn.BCELoss, dict(reduction="none"), "unit"),
    (flt.KLDivLoss, torch.nn.KLDivLoss, dict(reduction="batchmean"), "probs"),
    (flt.KLDivLoss, torch.nn.KLDivLoss, dict(log_target=True), "logprobs"),
    (flt.MSELoss, torch.nn.MSELoss, dict(reduction="sum"), "real"),
    (flt.GaussianNLLLoss, torch.nn.GaussianNLLLoss, dict(full=True, eps=1e-3), "var"),
]


@pytest.mark.parametrize("ours, ref, kw, kind", MODULES, ids=lambda v: getattr(v, "__name__", None))
def test_modules_match_torch_nn(ours, ref, kw, kind):
    g = _gen(5)
    x = (_unit(g, 6, 5) if ours is flt.BCELoss else torch.log_softmax(_x(g, 6, 5), 1) if ours is flt.KLDivLoss
         else _x(g, 6, 5)).requires_grad_(True)
    tgt = {"index": torch.tensor([0, 1, 2, 3, 4, 1]), "probs": _probs(g, 6, 5), "unit": _unit(g, 6, 5, lo=0, hi=1),
           "logprobs": torch.log_softmax(_x(g, 6, 5), 1), "real": _x(g, 6, 5), "var": _x(g, 6, 5)}[kind]
    extra = (_unit(g, 6, 1, lo=1e-4, hi=2),) if kind == "var" else ()
    a_mod, b_mod = ours(**kw), ref(**kw)
    a, (ga,), go = _grads(a_mod, [x, tgt, *extra], {}, (0,))
    b, (gb,), _ = _grads(b_mod, [x, tgt, *extra], {}, (0,), go)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)
    if "weight" in kw:  # a buffer, as in torch.nn: it moves with the module and is in its state
        assert "weight" in dict(a_mod.named_buffers()) and "weight" in a_mod.state_dict()


def test_training_loop_matches_torch_nn_functional():
    """A few SGD steps of an MLP classifier: the same parameters as with F.cross_entropy."""
    def run(loss_fn):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 7))
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        g = _gen(11)
        data = torch.randn(64, 20, generator=g)
        labels = torch.randint(0, 7, (64,), generator=g)
        losses = []
        for step in range(8):
            opt.zero_grad()
            loss = loss_fn(model(data), labels)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, [p.detach().clone() for p in model.parameters()]

    ours_l, ours_p = run(lambda x, t: flt.cross_entropy(x, t, label_smoothing=0.05))
    ref_l, ref_p = run(lambda x, t: F.cross_entropy(x, t, label_smoothing=0.05))
    np.testing.assert_allclose(ours_l, ref_l, rtol=1e-5)
    assert ours_l[-1] < 0.7 * ours_l[0]  # it trained
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph_has_no_graph_break():
    """Every op traced by torch.compile (inductor on the CPU) in one graph, forward and backward
    equal to eager."""
    def step(x, t, y, v):
        return (flt.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-3)
                + flt.binary_cross_entropy_with_logits(x, y, pos_weight=y[0] + 0.5)
                + flt.binary_cross_entropy(torch.sigmoid(x), y)
                + flt.kl_div(flt.log_softmax(x, 1), y, reduction="batchmean")
                + flt.mse_loss(x, y) + flt.gaussian_nll_loss(x, y, v)
                + flt.logsumexp(x, 1).mean() + flt.softmax(x, 1)[:, 0].sum())

    g = _gen(2)
    x = torch.randn(16, 10, generator=g, requires_grad=True)
    t = torch.randint(0, 10, (16,), generator=g)
    y = torch.rand(16, 10, generator=g)
    v = torch.rand(16, 1, generator=g) + 0.5
    explanation = torch._dynamo.explain(step)(x, t, y, v)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(step, fullgraph=True)
    a = compiled(x, t, y, v)
    (ga,) = torch.autograd.grad(a, x)
    b = step(x, t, y, v)
    (gb,) = torch.autograd.grad(b, x)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-6)


def test_ops_are_registered_custom_ops():
    for name in ["cross_entropy", "binary_cross_entropy_with_logits", "binary_cross_entropy", "kl_div", "mse_loss",
                 "gaussian_nll_loss", "logsumexp", "softmax", "softmax_backward", "linear_cross_entropy",
                 "linear_cross_entropy_backward"]:
        assert hasattr(torch.ops.fastloss, name)
    x = torch.randn(4, 3)
    t = torch.tensor([0, 1, 2, 0])
    # input, target, weight, ignore_index, label_smoothing, z_loss, softcap, num_items, reduction, need_grad,
    # return_lse, backend
    loss, grad, lse = torch.ops.fastloss.cross_entropy(x, t, None, -100, 0.0, 0.0, None, None, "mean", True, True, None)
    torch.testing.assert_close(grad, torch.autograd.grad(F.cross_entropy(x.requires_grad_(), t), x)[0])
    torch.testing.assert_close(lse, torch.logsumexp(x.detach(), 1))
    torch.library.opcheck(torch.ops.fastloss.cross_entropy.default,
                          (torch.randn(4, 3, requires_grad=True), t, None, -100, 0.0, 0.0, 2.0, None, "mean", True, True,
                           None))
    # input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing, z_loss, softcap, num_items,
    # reduction, chunk_size, return_grad, backend
    h, W, b = (torch.randn(4, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True),
               torch.randn(3, requires_grad=True))
    for red, fused, bias in [("mean", True, b), ("sum", True, None), ("none", False, b)]:
        torch.library.opcheck(torch.ops.fastloss.linear_cross_entropy.default,
                              (h, W, t, bias, None, -100, 0.1, 0.0, None, None, red, 2, fused, None))


# ----------------------------------------------------------------------------- large vocabularies
def _lce_data(seed=0, N=9, H=6, V=11, dtype=F64):
    """Hidden states, a linear layer's weight and bias (all requiring grad) and class targets
    with two ignored rows."""
    g = _gen(seed)
    h = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_(True)
    W = (torch.randn(V, H, generator=g, dtype=dtype) * 0.5).requires_grad_(True)
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=g)
    t[2] = t[N - 2] = -100
    return h, W, b, t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunked", [False, True], ids=["torch-reference", "torch-chunked"])
@pytest.mark.filterwarnings("error:linear_cross_entropy")  # PyTorch's chunked path really runs
def test_linear_cross_entropy_matches_torch_linear_cross_entropy(backend, reduction, chunked):
    """Against PyTorch's own F.linear_cross_entropy (its reference path, options=None, and its
    chunked one), with a bias, class weights, ignore_index and label_smoothing: the loss and the
    gradients of input, linear_weight and linear_bias, through the same ``options``."""
    h, W, b, t = _lce_data()
    t[t == -100] = 3
    w = torch.rand(11, generator=_gen(9), dtype=F64) + 0.5
    # PyTorch's chunked path takes no label_smoothing (it warns and falls back to the reference)
    kw = dict(linear_bias=b, weight=w, ignore_index=3, label_smoothing=0.0 if chunked else 0.15, reduction=reduction)
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=4) if chunked else None
    out, gs, go = _grads(lambda *a: flt.linear_cross_entropy(*a, options=opts, backend=backend, **kw), [h, W, t], {},
                         (0, 1))
    gb = torch.autograd.grad(flt.linear_cross_entropy(h, W, t, options=opts, backend=backend, **kw), b, go)
    ref, ref_gs, _ = _grads(lambda *a: F.linear_cross_entropy(*a, options=opts, **kw), [h, W, t], {}, (0, 1), go)
    ref_gb = torch.autograd.grad(F.linear_cross_entropy(h, W, t, options=opts, **kw), b, go)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)
    for a, r in zip(gs + gb, ref_gs + ref_gb):
        assert a.shape == r.shape and a.dtype == r.dtype
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_defaults_are_pytorchs():
    """ignore_index=None is -100 (PyTorch's mapping), reduction "mean"; probability targets
    take PyTorch's reference path (F.linear, then the fused cross-entropy)."""
    h, W, b, t = _lce_data(1)
    torch.testing.assert_close(flt.linear_cross_entropy(h, W, t, ignore_index=None), F.linear_cross_entropy(h, W, t),
                               rtol=1e-12, atol=1e-13)
    y = _probs(_gen(2), 9, 11)
    a, ga, go = _grads(lambda h, W, b: flt.linear_cross_entropy(h, W, y, linear_bias=b, label_smoothing=0.1,
                                                                reduction="none"), [h, W, b], {}, (0, 1, 2))
    r, gr, _ = _grads(lambda h, W, b: F.linear_cross_entropy(h, W, y, linear_bias=b, label_smoothing=0.1,
                                                             reduction="none"), [h, W, b], {}, (0, 1, 2), go)
    torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-13)
    for x, z in zip(ga, gr):
        torch.testing.assert_close(x, z, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_options_set_the_chunk(monkeypatch):
    seen = []
    real = flt._fl.linear_cross_entropy

    def spy(*a, **k):
        seen.append(k["chunk_size"])
        return real(*a, **k)

    monkeypatch.setattr(flt._fl, "linear_cross_entropy", spy)
    h, W, _, t = _lce_data()
    Opts = torch.nn.LinearCrossEntropyOptions
    flt.linear_cross_entropy(h, W, t, options=Opts(batch_chunk_size=3))
    flt.linear_cross_entropy(h, W, t, options=Opts())  # no batch_chunk_size: fastloss's default chunk
    flt.linear_cross_entropy(h, W, t, chunk_size=5)
    assert seen == [3, None, 5]
    with pytest.raises(ValueError, match="chunk_size: 2 disagrees with options.batch_chunk_size=3"):
        flt.linear_cross_entropy(h, W, t, options=Opts(batch_chunk_size=3), chunk_size=2)
    with pytest.raises(TypeError, match="options: expected None or a torch.nn.LinearCrossEntropyOptions"):
        flt.linear_cross_entropy(h, W, t, options={"batch_chunk_size": 3})


def test_linear_cross_entropy_saves_its_gradients_and_scales_them():
    """"mean"/"sum": the three gradients come from the forward pass; loss.backward() hands them
    over (no operator touches a tensor shaped like input or linear_weight), a scaled upstream
    gradient scales them, and a retained graph gives them again."""
    h, W, b, t = _lce_data(3, N=10, H=7, V=13)
    h, W, b = (v.detach().float().requires_grad_(True) for v in (h, W, b))
    loss = flt.linear_cross_entropy(h, W, t, linear_bias=b)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        g1 = torch.autograd.grad(loss, (h, W, b), retain_graph=True)
    touched = [e.name for e in prof.events() if any(list(s) in ([10, 7], [13, 7]) for s in e.input_shapes)]
    assert not touched, touched
    (3.0 * loss).backward()
    ref = torch.autograd.grad(F.linear_cross_entropy(h, W, t, linear_bias=b), (h, W, b))
    for v, a, r in zip((h, W, b), g1, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v.grad, 3 * r, rtol=1e-5, atol=1e-6)


def test_num_items_makes_micro_batches_add_up_to_the_full_batch(backend):
    """Gradient accumulation: micro-batches with num_items = the full batch's kept-token count
    sum to the full batch's mean loss and gradients (linear_cross_entropy and cross_entropy)."""
    h, W, b, t = _lce_data(5, N=12)
    n = int((t != -100).sum())
    splits = [(0, 5), (5, 6), (6, 12)]

    def check(fn, params):
        full = fn(h, t)
        g_full = torch.autograd.grad(full, params)
        total = sum(fn(h[i:j], t[i:j], num_items=n) for i, j in splits)
        g_micro = torch.autograd.grad(total, params)
        torch.testing.assert_close(total, full, rtol=1e-12, atol=1e-13)
        for a, r in zip(g_micro, g_full):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)

    check(lambda x, y, **k: flt.linear_cross_entropy(x, W, y, linear_bias=b, label_smoothing=0.1, backend=backend,
                                                     **k), (h, W, b))
    check(lambda x, y, **k: flt.cross_entropy(F.linear(x, W, b), y, z_loss=1e-2, backend=backend, **k), (h, W, b))
    mod = flt.CrossEntropyLoss(backend=backend)  # the module's forward takes the step's num_items
    check(lambda x, y, **k: mod(F.linear(x, W, b), y, **k), (h, W, b))


@pytest.mark.parametrize("softcap", [None, 2.5])
def test_return_lse_is_the_row_logsumexp_of_the_capped_logits(backend, softcap):
    g = _gen(4)
    x = _x(g, 3, 5, 2).requires_grad_(True)  # (N, C, d): classes on dim 1
    t = torch.randint(0, 5, (3, 2), generator=g)
    t[0, 1] = -100
    for red in ("none", "mean"):
        xc = x if softcap is None else _cap(x, softcap)
        loss, lse = flt.cross_entropy(x, t, softcap=softcap, reduction=red, return_lse=True, backend=backend)
        assert lse.shape == t.shape and lse.dtype == F64 and not lse.requires_grad
        torch.testing.assert_close(lse, torch.logsumexp(xc, 1).detach(), rtol=1e-12, atol=1e-13)  # ignored row too
        ref = F.cross_entropy(xc, t, reduction=red)
        go = _upstream(ref)
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(torch.autograd.grad(loss, x, go)[0], torch.autograd.grad(ref, x, go)[0],
                                   rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # the loss-only pass answers it too
        _, lse = flt.cross_entropy(x, t, softcap=softcap, return_lse=True, backend=backend)
    torch.testing.assert_close(lse, torch.logsumexp(xc, 1).detach(), rtol=1e-12, atol=1e-13)
    # float16/bfloat16: the loss in the input's dtype, the lse in the compute dtype (float32)
    for dt in (torch.bfloat16, torch.float16):
        xl = x.detach()[:, :, 0].to(dt)
        loss, lse = flt.cross_entropy(xl, t[:, 1].clamp(min=0), softcap=softcap, return_lse=True, backend=backend)
        assert loss.dtype == dt and lse.dtype == torch.float32 and lse.shape == (3,)
        xr = xl.double() if softcap is None else _cap(xl.double(), softcap)
        torch.testing.assert_close(lse.double(), torch.logsumexp(xr, 1), rtol=2e-6, atol=2e-6)
        loss, lse = flt.cross_entropy(xl[0], torch.tensor(1), return_lse=True, backend=backend)  # unbatched: 0-d
        assert lse.shape == () and lse.dtype == torch.float32
        torch.testing.assert_close(lse.double(), torch.logsumexp(xl[0].double(), 0), rtol=2e-6, atol=2e-6)
    mod = flt.CrossEntropyLoss(softcap=softcap, return_lse=True, backend=backend)
    loss, lse = mod(x, t)
    torch.testing.assert_close(lse, torch.logsumexp(xc, 1).detach(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_linear_cross_entropy_loss_module_matches_torch_nn(bias):
    """The module has torch.nn.LinearCrossEntropyLoss's parameters, names and initialization
    (its linear layer is ``linear``, a torch.nn.Linear; ``weight`` is the class-weight buffer):
    the same state_dict keys and values for the same seed, the same loss and gradients."""
    w = torch.rand(11, generator=_gen(3), dtype=F64) + 0.5
    kw = dict(bias=bias, dtype=F64, weight=w, label_smoothing=0.1, reduction="sum")
    torch.manual_seed(7)
    ours = flt.LinearCrossEntropyLoss(6, 11, **kw)
    torch.manual_seed(7)
    ref = torch.nn.LinearCrossEntropyLoss(6, 11, **kw)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert p.dtype == F64 and torch.equal(p, q), n
    assert ours.linear.weight.shape == (11, 6) and isinstance(ours.linear.weight, torch.nn.Parameter)
    assert float(ours.linear.weight.detach().abs().max()) <= 6 ** -0.5  # torch.nn.Linear's U(-1/sqrt(H), 1/sqrt(H))
    if bias:
        assert ours.linear.bias.shape == (11,) and float(ours.linear.bias.detach().abs().max()) <= 6 ** -0.5
    else:
        assert ours.linear.bias is None
    assert torch.equal(ours.weight, w) and "weight" in dict(ours.named_buffers())
    h, _, _, t = _lce_data(6, N=9, H=6, V=11)
    hr = h.detach().clone().requires_grad_(True)
    a, r = ours(h, t), ref(hr, t)
    a.backward()
    r.backward()
    torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(h.grad, hr.grad, rtol=1e-10, atol=1e-12)
    for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=n)
    ours.load_state_dict(ref.state_dict())  # the states interchange
    ours2 = flt.LinearCrossEntropyLoss(6, 11, bias=True, softcap=3.0, z_loss=1e-3, chunk_size=2, dtype=F64)
    ours2(h, t, num_items=4.0).backward()  # the extras reach the function
    with pytest.raises(ValueError, match=r"out_features: only \(\) is supported"):
        flt.LinearCrossEntropyLoss(6, 11, out_features=(2,))
    with pytest.raises(RuntimeError, match=r"expected weight shape to be \(11,\)"):
        flt.LinearCrossEntropyLoss(6, 11, weight=torch.ones(10))
    with pytest.raises(TypeError, match="options: expected None or a torch.nn.LinearCrossEntropyOptions"):
        flt.LinearCrossEntropyLoss(6, 11, options="chunked")


def test_torch_compile_fullgraph_linear_cross_entropy():
    """linear_cross_entropy ("mean" with a bias and every option; "none", whose backward is its
    own op) and cross_entropy's softcap/return_lse traced in one graph; forward and backward
    equal to eager."""
    def step(h, W, b, t):
        loss, lse = flt.cross_entropy(F.linear(h, W, b), t, softcap=5.0, num_items=9.0, return_lse=True)
        return (flt.linear_cross_entropy(h, W, t, linear_bias=b, label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                                         chunk_size=4)
                + 0.5 * flt.linear_cross_entropy(h, W, t, reduction="none").sum() + loss + 1e-3 * lse.sum())

    h, W, b, t = _lce_data(8, dtype=torch.float32)
    explanation = torch._dynamo.explain(step)(h, W, b, t)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    a = torch.compile(step, fullgraph=True)(h, W, b, t)
    ga = torch.autograd.grad(a, (h, W, b))
    e = step(h, W, b, t)
    ge = torch.autograd.grad(e, (h, W, b))
    torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    for x, y in zip(ga, ge):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- errors
def test_double_backward_raises():
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    for loss in (flt.cross_entropy(x, torch.tensor([0, 1, 2, 0])), flt.mse_loss(x, torch.zeros(4, 3, dtype=F64)),
                 flt.softmax(x, 1).sum()):
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            g.pow(2).sum().backward()
    W = torch.randn(5, 3, dtype=F64, requires_grad=True)
    for red in ("mean", "none"):
        loss = flt.linear_cross_entropy(x, W, torch.tensor([0, 1, 4, -100]), reduction=red).sum()
        gx, gW = torch.autograd.grad(loss, (x, W), create_graph=True)
        for g in (gx, gW):
            with pytest.raises(RuntimeError, match="double backward"):
                g.pow(2).sum().backward(retain_graph=True)


def test_arguments_on_another_device_raise_before_any_work():
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"weight: expected a tensor on cpu \(the input's device\), found one on meta"):
        flt.cross_entropy(x, torch.tensor([0, 1, 2, 0]), torch.ones(3, device="meta"))
    with pytest.raises(ValueError, match="target: expected a tensor on cpu"):
        flt.mse_loss(x, torch.zeros(4, 3, device="meta"))
    with pytest.raises(TypeError, match="target: expected a torch.Tensor, found ndarray"):
        flt.mse_loss(x, np.zeros((4, 3), np.float32))
    assert x.grad is None


@pytest.mark.parametrize("call", [
    lambda x, w: flt.cross_entropy(x, torch.tensor([0, 1, 2, 0]), w),
    lambda x, w: flt.binary_cross_entropy_with_logits(x, torch.zeros(4, 3), w.expand(4, 3)),
    lambda x, w: flt.binary_cross_entropy_with_logits(x, torch.zeros(4, 3), pos_weight=w),
    lambda x, w: flt.binary_cross_entropy(torch.sigmoid(x), torch.zeros(4, 3), w.expand(4, 3)),
    lambda x, w: flt.linear_cross_entropy(x, torch.randn(3, 3), torch.tensor([0, 1, 2, 0]), weight=w),
])
def test_weights_pytorch_does_not_differentiate_are_refused_like_pytorch(call):
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="is not differentiable with respect to argument"):
        call(x, w)
    with torch.no_grad():
        call(x, w)  # nothing to differentiate: fine


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(IndexError, match="target: expected class indices in"):
        flt.cross_entropy(x, torch.tensor([0, 1, 5, 0]))
    with pytest.raises(ValueError, match="reduction"):
        flt.mse_loss(x, torch.zeros(4, 3), reduction="avg")
    with pytest.raises(TypeError, match="dim"):
        flt.softmax(x, None)
    with pytest.raises(ValueError, match="num_items: expected None with reduction='sum'"):
        flt.cross_entropy(x, torch.tensor([0, 1, 2, 0]), reduction="sum", num_items=4)
    with pytest.raises(ValueError, match="softcap"):
        flt.cross_entropy(x, torch.tensor([0, 1, 2, 0]), softcap=0.0)
    W = torch.randn(5, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"linear_weight: expected shape \(V, H\).*K-dimensional"):
        flt.linear_cross_entropy(x, W.reshape(5, 1, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"linear_weight: expected shape \(V, 3\)"):
        flt.linear_cross_entropy(x, W.t(), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(IndexError, match="target: expected class indices in"):
        flt.linear_cross_entropy(x, W, torch.tensor([0, 1, 5, 0]))
    meta = [torch.empty(4, 3, device="meta"), torch.empty(5, 3, device="meta"), torch.zeros(4, dtype=torch.long,
                                                                                           device="meta")]
    with pytest.raises(TypeError, match="linear_cross_entropy takes CPU or CUDA tensors, found one on meta"):
        flt.linear_cross_entropy(*meta)
    assert x.grad is None and W.grad is None
    with pytest.raises(TypeError):  # the deprecated positional order is refused, not misbound
        flt.cross_entropy(x, torch.tensor([0, 1, 2, 0]), None, None, -100)


# ----------------------------------------------------------------------------- the core API given tensors
def test_core_api_names_fastloss_torch_for_tensors_that_require_grad():
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(TypeError, match=r"logits: .*requires grad.*fastloss\.torch"):
        fl.cross_entropy(x, np.array([0, 1, 2, 0]))


def test_core_api_takes_bfloat16_tensors():
    x = torch.randn(4, 3).bfloat16()
    t = np.array([0, 1, 2, 0])
    ref = F.cross_entropy(x.double(), torch.from_numpy(t))
    assert abs(float(fl.cross_entropy(x, t)) - ref.item()) < 2e-6 * max(1, abs(ref.item()))
    assert str(fl.softmax(x).dtype) == "bfloat16"


@pytest.mark.parametrize("as_numpy", [True, False], ids=["numpy-view", "tensor"])
def test_core_api_writes_are_visible_to_autograd(as_numpy):
    """grad_out given as a tensor (or its .numpy() view) bumps the tensor's version counter, so a
    graph that saved the tensor raises instead of silently using the overwritten values."""
    y = torch.randn(4, 3, requires_grad=True)
    z = y * 1.0
    w = z.sin()  # saves z
    buf = z.detach()
    v0 = z._version
    fl.cross_entropy(buf, np.array([0, 1, 2, 0]), return_grad=True, grad_out=buf.numpy() if as_numpy else buf)
    assert z._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        w.sum().backward()
    out = torch.empty(4, 3)
    res = fl.softmax(np.ones((4, 3), np.float32), out=out.numpy() if as_numpy else out)
    assert out._version == 1 and torch.allclose(out, torch.full((4, 3), 1 / 3))
    assert isinstance(res, np.ndarray)


def test_import_fastloss_imports_no_framework():
    import subprocess
    import sys

    code = "import sys, fastloss; print([m for m in ('torch', 'jax') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------- CUDA (when a GPU is lent)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and PyTorch with CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("ce", "ce-soft", "bce-logits", "mse", "gnll", "softmax")],
                         ids=lambda c: c[0])
def test_cuda_tensors_run_on_the_cuda_backend(case):
    _, ours, ref, make = case
    args, kw, diff = _prepare(make)
    cuda = [a.detach().cuda().requires_grad_(i in diff) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    out, gs, go = _grads(ours, cuda, kw, diff)
    assert out.device.type == "cuda" and all(g.device.type == "cuda" for g in gs)
    ref_out, ref_gs, _ = _grads(ref, args, {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()},
                                diff, go.cpu())
    torch.testing.assert_close(out.cpu(), ref_out, rtol=1e-10, atol=1e-12)
    for a, b in zip(gs, ref_gs):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@needs_cuda
def test_cuda_softcap_return_lse_and_linear_cross_entropy():
    g = _gen(12)
    x = _x(g, 6, 5)
    t = T6
    xc = x.cuda().requires_grad_(True)
    loss, lse = flt.cross_entropy(xc, t.cuda(), softcap=2.0, return_lse=True)
    assert lse.device.type == "cuda" and lse.dtype == F64 and not lse.requires_grad
    (gx,) = torch.autograd.grad(loss, xc)
    xr = x.clone().requires_grad_(True)
    ref = F.cross_entropy(_cap(xr, 2.0), t)
    torch.testing.assert_close(loss.cpu(), ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse.cpu(), torch.logsumexp(_cap(x, 2.0), 1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx.cpu(), torch.autograd.grad(ref, xr)[0], rtol=1e-10, atol=1e-12)
    # linear_cross_entropy on CUDA tensors: the loop on the device, the products on cuBLAS;
    # loss and every gradient against PyTorch autograd in float64 on the CPU
    h, W, b = (torch.randn(*s, dtype=F64, generator=g) for s in ((9, 3), (5, 3), (5,)))
    tt = torch.tensor([0, 1, 2, 0, -100, 4, 3, 1, 2])
    leaves = [a.cuda().requires_grad_(True) for a in (h, W, b)]
    loss = flt.linear_cross_entropy(leaves[0], leaves[1], tt.cuda(), linear_bias=leaves[2], label_smoothing=0.1,
                                    chunk_size=4)
    loss.backward()
    refs = [a.clone().requires_grad_(True) for a in (h, W, b)]
    ref = F.cross_entropy(F.linear(*refs), tt, label_smoothing=0.1)
    ref.backward()
    assert loss.device.type == "cuda"
    torch.testing.assert_close(loss.detach().cpu(), ref.detach(), rtol=1e-10, atol=1e-12)
    for a, r in zip(leaves, refs):
        assert a.grad.device.type == "cuda"
        torch.testing.assert_close(a.grad.cpu(), r.grad, rtol=1e-10, atol=1e-12)
