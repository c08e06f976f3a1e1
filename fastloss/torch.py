r"""PyTorch adapter: the fastloss losses as drop-in ``torch.nn.functional`` functions and
``torch.nn`` modules, differentiable, and traceable by ``torch.compile(fullgraph=True)``.

>>> import torch, fastloss.torch as flt
>>> logits = torch.randn(8, 5, requires_grad=True)
>>> loss = flt.cross_entropy(logits, torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]))
>>> loss.backward()          # logits.grad: softmax minus one-hot, from the fused forward pass

How it works
------------
Every loss is one ``torch.library.custom_op`` (namespace ``fastloss``) whose forward runs the
fused fastloss kernel -- loss *and* gradient in one pass over the data -- and saves the
gradient; the registered backward only scales it by the upstream gradient (and, with the
upstream gradient a CPU scalar 1, as after ``loss.backward()``, hands it over as is: no
second pass). When no argument requires grad (or grad mode is off) the forward computes the
loss alone. Each op has a fake implementation (shapes and dtypes only), so
``torch.compile(fullgraph=True)`` traces it without a graph break.

* CPU tensors reach the host backends (``numba``, ``cython``, ``numpy``) as zero-copy NumPy
  views, contiguous or not; ``torch.bfloat16`` ones as ``ml_dtypes.bfloat16`` views (computed
  in float32, like float16). CUDA tensors go to the ``cuda`` backend, on the current stream.
* The class dimension is PyTorch's: dim 1 of ``(N, C, d1, ...)``, dim 0 of an unbatched ``(C,)``.
* Results are tensors on the input's device in PyTorch's dtypes (the loss in the input's
  dtype, as ``torch.nn.functional`` returns it).
* Gradients: every argument PyTorch differentiates -- the input; a target that requires grad
  (probability targets of ``cross_entropy``, the targets of the other losses); ``var``; the
  ``weight`` of probability-target ``cross_entropy`` and of ``mse_loss``. The input's (and
  ``var``'s) gradient comes from the fused pass; the rarer target and weight gradients are
  formed in the backward from their closed forms. Where PyTorch refuses a derivative (the
  ``weight`` of index-target ``cross_entropy`` and of the BCE losses, ``pos_weight``), so does
  this module, with the same ``RuntimeError`` before anything is computed.
* Double backward (``create_graph=True`` and a second ``grad``) raises a ``RuntimeError``: the
  saved gradient is not itself differentiable.
* Arguments on a device other than the input's raise ``ValueError`` naming them, before
  anything is computed; so do other bad arguments (fastloss's own checks, whose messages name
  the core function's arguments: ``logits`` or ``probs`` for ``input``).

Differences from ``torch.nn.functional``, by design: the deprecated ``size_average`` and
``reduce`` are not accepted, and the parameters after ``weight`` (after ``target`` where there
is no ``weight``) are keyword-only, so a positional call written for the deprecated order
fails loudly instead of binding wrongly. With ``"mean"`` and every target ignored the loss is
0 and the gradient 0 (PyTorch: NaN), as everywhere in fastloss. fastloss extras are
keyword-only: ``z_loss`` and ``backend``.  (``softcap``, ``num_items``, ``return_lse`` and
``linear_cross_entropy`` come with the large-vocabulary functions of the core API.)
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from . import _api as _fl
from ._validate import _BF16

__all__ = [
    "cross_entropy",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy",
    "kl_div",
    "mse_loss",
    "gaussian_nll_loss",
    "logsumexp",
    "softmax",
    "log_softmax",
    "CrossEntropyLoss",
    "BCEWithLogitsLoss",
    "BCELoss",
    "KLDivLoss",
    "MSELoss",
    "GaussianNLLLoss",
]

_NO_GRAD = (0,)  # the shape of the placeholder an op returns for a gradient nobody asked for


# ----------------------------------------------------------------------------- tensors <-> arrays
def _arr(t: Optional[Tensor]):
    """A tensor as the core API takes it: a zero-copy NumPy view of a CPU tensor (bfloat16 as
    ``ml_dtypes.bfloat16``), the tensor itself on a GPU (the core's device path)."""
    if t is None:
        return None
    if not t.is_cpu:
        return t.detach()
    if t.dtype is torch.bfloat16:
        if _BF16 is None:  # pragma: no cover - ml_dtypes is installed with the torch extra
            raise TypeError("input: bfloat16 tensors need the ml_dtypes package (pip install ml_dtypes)")
        return t.detach().view(torch.int16).numpy().view(_BF16)
    return t.detach().numpy()


def _tensor(a, like: Tensor) -> Tensor:
    """A core result as a tensor on ``like``'s device: arrays zero-copy, a scalar loss in
    ``like``'s dtype (PyTorch's loss dtype)."""
    if isinstance(a, Tensor):
        return a
    if isinstance(a, np.generic) and like.is_cpu:  # a NumPy scalar: a 0-d array, then as one
        a = np.asarray(a)
    if isinstance(a, np.ndarray):
        if _BF16 is not None and a.dtype == _BF16:
            t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a)
        if not like.is_cpu:
            t = t.to(like.device)
        return t if (a.ndim or t.dtype is like.dtype) else t.to(like.dtype)
    return torch.tensor(float(a), dtype=like.dtype, device=like.device)


def _class_dim(x: Tensor) -> int:
    return 1 if x.dim() >= 2 else 0


def _need_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _check_args(input, **others):
    """Tensors where PyTorch takes tensors, all on the input's device (checked before any work)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input: expected a torch.Tensor, found {type(input).__name__}")
    for name, t in others.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, found {type(t).__name__}")
        if t.device != input.device:
            raise ValueError(f"{name}: expected a tensor on {input.device} (the input's device), found one on {t.device}")


def _not_differentiable(fname, **named):
    """PyTorch's own refusal, raised up front: these arguments have no derivative there."""
    for name, t in named.items():
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"The function '{fname}' is not differentiable with respect to argument '{name}'. "
                f"This input cannot have requires_grad True."
            )


def _upstream_is_one(g: Tensor) -> bool:
    """Whether the upstream gradient is the scalar 1 (``loss.backward()``), so the saved gradient
    can be handed over as is. Read on CPU only (a GPU value would cost a sync) and never while
    compiling (the value is data)."""
    return (type(g) is Tensor and g.is_cpu and g.dim() == 0 and not torch.compiler.is_compiling()
            and g.item() == 1.0)


def _scaled(saved: Tensor, g: Tensor, row_dim: Optional[int] = None) -> Tensor:
    """``saved * g``: ``g`` a scalar, or (``reduction="none"``) shaped like the unreduced loss,
    which is ``saved``'s shape without ``row_dim`` for row-wise losses."""
    if _upstream_is_one(g):
        return saved
    if g.dim() and row_dim is not None:
        g = g.unsqueeze(row_dim)
    return saved * g


def _factor(g: Tensor, reduction: str, denom: float, row_dim: Optional[int] = None) -> Tensor:
    """d(reduced loss)/d(unreduced term) times the upstream gradient: ``g/denom``, ``g`` or the
    array ``g`` (unsqueezed at ``row_dim`` for row-wise losses)."""
    if reduction == "none":
        return g.unsqueeze(row_dim) if (row_dim is not None and g.dim()) else g
    if reduction in ("mean", "batchmean"):
        return g / denom if denom else g * 0  # an empty mean is 0, with a zero gradient
    return g


def once_differentiable(backward):
    """Run a backward without recording it; under ``create_graph=True`` its results carry a
    node that raises on a second differentiation (as ``torch.autograd.function.once_differentiable``
    does, but also when the upstream gradient itself does not require grad: the saved gradient
    depends on the inputs, and a silently constant first derivative would be wrong). An absent
    upstream gradient of the loss (the ops do not materialize absent gradients as zeros, see
    :func:`_keep_grad`) gives absent, i.e. zero, gradients."""
    import functools

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if grads[0] is None:  # no upstream gradient reached the loss (not materialized): a zero one
            return (None,) * len(ctx.needs_input_grad)
        if not torch.is_grad_enabled():  # a plain backward (no create_graph): nothing to guard
            return backward(ctx, *grads)
        with torch.no_grad():
            outs = backward(ctx, *grads)
        if torch.compiler.is_compiling():
            return outs
        err = torch._C._functions.DelayedError(
            b"fastloss.torch: double backward is not supported (the gradient saved by the fused forward pass "
            b"is not itself differentiable)", len(outs))

        def alias(v):
            if isinstance(v, Tensor) and v.is_floating_point():
                v = v.detach()
                v.requires_grad_(True)
            return v

        res = err(*[alias(v) for v in outs])
        return res if isinstance(res, tuple) else (res,)

    return wrapper


def _register(name, impl, fake, setup=None, backward=None):
    """``impl`` as the custom op ``fastloss::name`` (its fake and autograd registered) and as a
    callable that runs it.

    Under ``torch.compile`` the callable calls the op, which the compiler traces through its
    fake. In eager mode it runs the same ``impl``, ``setup`` and ``backward`` through an
    :class:`torch.autograd.Function` instead: PyTorch 2.13's dispatcher costs a Python custom
    op ~250 us per call (measured at 64 x 10 on the development machine), more than the
    kernel of a small loss, and the Function ~10 us.
    """
    opdef = torch.library.custom_op(f"fastloss::{name}", mutates_args=())(impl)
    opdef.register_fake(fake)
    if backward is None:
        def call(*args):
            return opdef(*args) if torch.compiler.is_compiling() else impl(*args)
    else:
        opdef.register_autograd(backward, setup_context=setup)
        def forward(ctx, *args):  # ctx-style: Function.apply binds a setup_context-style forward's
            out = impl(*args)      # signature with inspect on every call (~60 us)
            setup(ctx, args, out)
            return out

        fn = type(f"_{name}_function", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward),
        })

        def call(*args):
            return opdef(*args) if torch.compiler.is_compiling() else fn.apply(*args)

    call.op = opdef
    call.__name__ = call.__qualname__ = f"_{name}_op"
    return call


def _keep_grad(ctx, *grads):
    """Setup for an op whose outputs after the loss are the gradients of its fused pass: they
    are not differentiable, and their (absent) upstream gradients must not be materialized as
    zeros -- autograd's default, which at 2048 x 32000 would fill 262 MB per backward."""
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)


def _fake_loss(input: Tensor, reduction: str, unreduced_shape) -> Tensor:
    return input.new_empty(() if reduction != "none" else tuple(unreduced_shape))


def _fake_grad(t: Tensor, need_grad: bool) -> Tensor:
    return torch.empty_like(t) if need_grad else t.new_empty(_NO_GRAD)


# ----------------------------------------------------------------------------- cross-entropy
def _cross_entropy_impl(
    input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, label_smoothing: float,
    z_loss: float, reduction: str, need_grad: bool, backend: Optional[str],
) -> tuple[Tensor, Tensor]:
    r = _fl.cross_entropy(
        _arr(input), _arr(target), axis=_class_dim(input), weight=_arr(weight), ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction, return_grad=need_grad, backend=backend,
    )
    if need_grad:
        return _tensor(r[0], input), _tensor(r[1], input)
    return _tensor(r, input), input.new_empty(_NO_GRAD)


def _cross_entropy_fake(input, target, weight, ignore_index, label_smoothing, z_loss, reduction, need_grad, backend):
    rows = [s for i, s in enumerate(input.shape) if i != _class_dim(input)]
    return _fake_loss(input, reduction, rows), _fake_grad(input, need_grad)


def _ce_setup(ctx, inputs, output):
    input, target, weight, _, eps, _, reduction, _, _ = inputs
    ctx.reduction, ctx.eps, ctx.dim = reduction, eps, _class_dim(input)
    soft = target.is_floating_point()
    ctx.extra = soft and (target.requires_grad or (weight is not None and weight.requires_grad))
    # the inputs are kept only for the (rare) target/weight gradients of probability targets
    _keep_grad(ctx, output[1])
    ctx.save_for_backward(output[1], *((input, target, weight) if ctx.extra else ()))


@once_differentiable
def _ce_backward(ctx, g, _g_grad):
    d_input = d_target = d_weight = None
    if ctx.needs_input_grad[0]:
        d_input = _scaled(ctx.saved_tensors[0], g, ctx.dim)
    if ctx.extra:
        _, x, y, w = ctx.saved_tensors
        dim = ctx.dim
        C = x.shape[dim]
        n_rows = x.numel() // C if C else 0
        f = _factor(g, ctx.reduction, n_rows, dim)
        nlogp = -torch.log_softmax(x.to(torch.promote_types(x.dtype, torch.float32)), dim)  # lse - x
        wv = None
        if w is not None:
            shape = [1] * x.dim()
            shape[dim] = C
            wv = w.reshape(shape)
        if ctx.needs_input_grad[1]:
            d = (1.0 - ctx.eps) * nlogp * f
            d_target = (d * wv if wv is not None else d).to(y.dtype)
        if w is not None and ctx.needs_input_grad[2]:
            ys = (1.0 - ctx.eps) * y + ctx.eps / C
            red = [i for i in range(x.dim()) if i != dim]
            d_weight = (ys * nlogp * f).sum(dim=red).to(w.dtype)
    return d_input, d_target, d_weight, None, None, None, None, None, None


_cross_entropy_op = _register("cross_entropy", _cross_entropy_impl, _cross_entropy_fake, _ce_setup, _ce_backward)


def cross_entropy(
    input: Tensor, target: Tensor, weight: Optional[Tensor] = None, *, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0, backend: Optional[str] = None,
) -> Tensor:
    r"""Softmax cross-entropy, as :func:`torch.nn.functional.cross_entropy` (class dim 1, or 0
    for an unbatched ``(C,)`` input), fused with its gradient; see
    :func:`fastloss.cross_entropy` for the formula, the stability trick and the options.

    ``target``: class indices ``(N, d1, ...)`` (any integer dtype), or class probabilities
    shaped like ``input`` (which may require grad). ``z_loss`` adds PaLM's ``z * lse**2`` per
    non-ignored row. Differentiable in ``input``; in ``target`` and ``weight`` for probability
    targets (as in PyTorch). Returns the loss as a tensor in ``input``'s dtype.

    Examples
    --------
    >>> import torch, fastloss.torch as flt
    >>> x = torch.zeros(2, 4, requires_grad=True)
    >>> loss = flt.cross_entropy(x, torch.tensor([0, 3]))
    >>> round(loss.item(), 6)  # log(4)
    1.386294
    >>> loss.backward(); x.grad[0]
    tensor([-0.3750,  0.1250,  0.1250,  0.1250])
    """
    _check_args(input, target=target, weight=weight)
    if not target.is_floating_point():
        _not_differentiable("nll_loss_forward", weight=weight)
    need = _need_grad(input, target, weight)
    loss, _ = _cross_entropy_op(input, target, weight, int(ignore_index), float(label_smoothing), float(z_loss),
                                reduction, need, backend)
    return loss


# ----------------------------------------------------------------------------- elementwise losses
# One op per loss, returning (loss, d_input); the targets' closed-form derivatives (per
# unreduced element) are formed in the backward only when a target requires grad.

def _elementwise_backward(ctx, g, target_grad):
    """Scale the saved d_input by ``g``; the target's gradient from its closed form."""
    d_input = d_target = None
    if ctx.needs_input_grad[0]:
        d_input = _scaled(ctx.saved_tensors[0], g)
    if ctx.needs_input_grad[1]:
        y = ctx.saved_tensors[2]
        d = target_grad(ctx, *ctx.saved_tensors[1:]) * _factor(g, ctx.reduction, ctx.denom)
        d_target = d.sum_to_size(y.shape).to(y.dtype)
    return d_input, d_target


def _elementwise_setup(ctx, inputs, output, reduction, denom, keep):
    ctx.reduction, ctx.denom = reduction, denom
    _keep_grad(ctx, output[1])
    ctx.save_for_backward(output[1], *(keep if inputs[1].requires_grad else ()))


def _bce_logits_impl(
    input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor], reduction: str,
    need_grad: bool, backend: Optional[str],
) -> tuple[Tensor, Tensor]:
    r = _fl.binary_cross_entropy_with_logits(
        _arr(input), _arr(target), weight=_arr(weight), pos_weight=_arr(pos_weight), reduction=reduction,
        return_grad=need_grad, backend=backend,
    )
    return _pair(r, input, need_grad)


def _pair(r, input, need_grad):
    if need_grad:
        return _tensor(r[0], input), _tensor(r[1], input)
    return _tensor(r, input), input.new_empty(_NO_GRAD)


def _bce_logits_fake(input, target, weight, pos_weight, reduction, need_grad, backend):
    return _fake_loss(input, reduction, input.shape), _fake_grad(input, need_grad)


def _bce_logits_target_grad(ctx, x, y, w, pw):
    # d/dy of w*[(1-y) z + (1 + (pw-1) y) softplus(-z)]  =  w*[(pw-1) softplus(-z) - z]
    sp = torch.nn.functional.softplus(-x)
    d = (pw - 1) * sp - x if pw is not None else -x
    return d * w if w is not None else d


def _bce_logits_setup(ctx, inputs, output):
    input, target, weight, pos_weight, reduction, _, _ = inputs
    ctx.has_w, ctx.has_pw = weight is not None, pos_weight is not None
    keep = (input, target) + ((weight,) if ctx.has_w else ()) + ((pos_weight,) if ctx.has_pw else ())
    _elementwise_setup(ctx, inputs, output, reduction, input.numel(), keep)


@once_differentiable
def _bce_logits_backward(ctx, g, _g_grad):
    def tgrad(ctx, x, y, *rest):
        rest = list(rest)
        w = rest.pop(0) if ctx.has_w else None
        pw = rest.pop(0) if ctx.has_pw else None
        return _bce_logits_target_grad(ctx, x, y, w, pw)

    return (*_elementwise_backward(ctx, g, tgrad), None, None, None, None, None)


_bce_logits_op = _register("binary_cross_entropy_with_logits", _bce_logits_impl, _bce_logits_fake, _bce_logits_setup, _bce_logits_backward)


def binary_cross_entropy_with_logits(
    input: Tensor, target: Tensor, weight: Optional[Tensor] = None, *, reduction: str = "mean",
    pos_weight: Optional[Tensor] = None, backend: Optional[str] = None,
) -> Tensor:
    r"""Binary cross-entropy on logits, as :func:`torch.nn.functional.binary_cross_entropy_with_logits`,
    fused with its gradient; stable for any logit: ``(1-y) z + (1 + (p_w-1) y) softplus(-z)`` with
    ``softplus(-z) = max(-z, 0) + log1p(exp(-|z|))`` (see :func:`fastloss.binary_cross_entropy_with_logits`).
    Differentiable in ``input`` and ``target``; ``weight`` and ``pos_weight`` are not (as in PyTorch).
    """
    _check_args(input, target=target, weight=weight, pos_weight=pos_weight)
    _not_differentiable("binary_cross_entropy_with_logits", weight=weight, pos_weight=pos_weight)
    need = _need_grad(input, target)
    return _bce_logits_op(input, target, weight, pos_weight, reduction, need, backend)[0]


def _bce_impl(
    input: Tensor, target: Tensor, weight: Optional[Tensor], reduction: str, need_grad: bool, backend: Optional[str],
) -> tuple[Tensor, Tensor]:
    r = _fl.binary_cross_entropy(_arr(input), _arr(target), weight=_arr(weight), reduction=reduction,
                                 return_grad=need_grad, backend=backend)
    return _pair(r, input, need_grad)


def _bce_fake(input, target, weight, reduction, need_grad, backend):
    return _fake_loss(input, reduction, input.shape), _fake_grad(input, need_grad)


def _bce_setup(ctx, inputs, output):
    input, target, weight, reduction, _, _ = inputs
    ctx.has_w = weight is not None
    _elementwise_setup(ctx, inputs, output, reduction, input.numel(),
                       (input, target) + ((weight,) if ctx.has_w else ()))


@once_differentiable
def _bce_backward(ctx, g, _g_grad):
    def tgrad(ctx, p, y, *w):
        # d/dy of -w*[y max(log p, -100) + (1-y) max(log(1-p), -100)] (PyTorch's clamp)
        d = torch.clamp(torch.log1p(-p), min=-100) - torch.clamp(torch.log(p), min=-100)
        return d * w[0] if w else d

    return (*_elementwise_backward(ctx, g, tgrad), None, None, None, None)


_bce_op = _register("binary_cross_entropy", _bce_impl, _bce_fake, _bce_setup, _bce_backward)


def binary_cross_entropy(
    input: Tensor, target: Tensor, weight: Optional[Tensor] = None, *, reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    r"""Binary cross-entropy on probabilities, as :func:`torch.nn.functional.binary_cross_entropy`:
    each log term clamped at -100, PyTorch's gradient ``(p - y) / max(p (1-p), 1e-12)``; see
    :func:`fastloss.binary_cross_entropy`. Differentiable in ``input`` and ``target``."""
    _check_args(input, target=target, weight=weight)
    _not_differentiable("binary_cross_entropy", weight=weight)
    need = _need_grad(input, target)
    return _bce_op(input, target, weight, reduction, need, backend)[0]


def _kl_impl(
    input: Tensor, target: Tensor, reduction: str, log_target: bool, need_grad: bool, backend: Optional[str],
) -> tuple[Tensor, Tensor]:
    r = _fl.kl_div(_arr(input), _arr(target), log_target=log_target, reduction=reduction, return_grad=need_grad,
                   backend=backend)
    return _pair(r, input, need_grad)


def _kl_fake(input, target, reduction, log_target, need_grad, backend):
    return _fake_loss(input, reduction, input.shape), _fake_grad(input, need_grad)


def _kl_setup(ctx, inputs, output):
    input, target, reduction, log_target, _, _ = inputs
    ctx.log_target = log_target
    denom = (input.shape[0] if input.dim() else 1) if reduction == "batchmean" else input.numel()
    _elementwise_setup(ctx, inputs, output, reduction, denom, (input, target))


@once_differentiable
def _kl_backward(ctx, g, _g_grad):
    def tgrad(ctx, x, t):
        if ctx.log_target:  # d/dt of e^t (t - x)
            return torch.exp(t) * (t - x + 1)
        return torch.where(t > 0, torch.log(t) + 1 - x, torch.zeros_like(t))  # d/dt of t (log t - x)

    return (*_elementwise_backward(ctx, g, tgrad), None, None, None, None)


_kl_op = _register("kl_div", _kl_impl, _kl_fake, _kl_setup, _kl_backward)


def kl_div(
    input: Tensor, target: Tensor, *, reduction: str = "mean", log_target: bool = False, backend: Optional[str] = None,
) -> Tensor:
    r"""KL divergence with log-probability ``input``, as :func:`torch.nn.functional.kl_div`
    (PyTorch's default ``reduction="mean"``, the mean over every element; ``"batchmean"`` is the
    true KL divergence per sample); see :func:`fastloss.kl_div`. Differentiable in ``input``
    and ``target``."""
    _check_args(input, target=target)
    need = _need_grad(input, target)
    return _kl_op(input, target, reduction, bool(log_target), need, backend)[0]


def _mse_impl(input: Tensor, target: Tensor, reduction: str, need_grad: bool, backend: Optional[str]) -> tuple[Tensor, Tensor]:
    r = _fl.mse_loss(_arr(input), _arr(target), reduction=reduction, return_grad=need_grad, backend=backend)
    return _pair(r, input, need_grad)


def _mse_fake(input, target, reduction, need_grad, backend):
    return _fake_loss(input, reduction, input.shape), _fake_grad(input, need_grad)


def _mse_setup(ctx, inputs, output):
    ctx.reduction = inputs[2]
    ctx.target_shape = inputs[1].shape
    _keep_grad(ctx, output[1])
    ctx.save_for_backward(output[1])


@once_differentiable
def _mse_backward(ctx, g, _g_grad):
    d_input = _scaled(ctx.saved_tensors[0], g)
    d_target = None
    if ctx.needs_input_grad[1]:  # d/dy (x - y)^2 = -d/dx
        d_target = (-d_input).sum_to_size(ctx.target_shape)
    return (d_input if ctx.needs_input_grad[0] else None), d_target, None, None, None


_mse_op = _register("mse_loss", _mse_impl, _mse_fake, _mse_setup, _mse_backward)


def mse_loss(
    input: Tensor, target: Tensor, *, reduction: str = "mean", weight: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    r"""Mean squared error, as :func:`torch.nn.functional.mse_loss` (PyTorch 2.13, with its
    elementwise ``weight``: ``sum(w (x - y)^2) / sum(w)`` for ``"mean"``); see
    :func:`fastloss.mse_loss`. Differentiable in ``input``, ``target`` and ``weight``.

    Without ``weight`` the loss and its gradient come from one fused pass. With ``weight``
    (shaped like ``input``, as PyTorch requires) the fused pass gives the squared errors and
    ``2 w (x - y)``; the weighted reduction is then formed with PyTorch ops.
    """
    _check_args(input, target=target, weight=weight)
    if weight is None:
        return _mse_op(input, target, reduction, _need_grad(input, target), backend)[0]
    if weight.shape != input.shape:
        raise ValueError(f"weight: expected the input's shape {tuple(input.shape)}, found {tuple(weight.shape)}")
    se = _mse_op(input, target, "none", _need_grad(input, target), backend)[0]  # d se/dx through the fused op
    wse = se * weight
    if reduction == "none":
        return wse
    if reduction == "sum":
        return wse.sum()
    if reduction == "mean":
        return wse.sum() / weight.sum()
    raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', found {reduction!r}")


def _gnll_impl(
    input: Tensor, target: Tensor, var: Tensor, full: bool, eps: float, reduction: str, need_grad: bool,
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    v = float(var) if var.dim() == 0 else _arr(var)  # a 0-d var is a scalar variance
    r = _fl.gaussian_nll_loss(_arr(input), _arr(target), v, full=full, eps=eps, reduction=reduction,
                              return_grad=need_grad, backend=backend)
    if not need_grad:
        return _tensor(r, input), input.new_empty(_NO_GRAD), var.new_empty(_NO_GRAD)
    loss, (dx, dv) = r
    dv = _tensor(dv, var)
    return _tensor(loss, input), _tensor(dx, input), dv.reshape(var.shape)


def _gnll_fake(input, target, var, full, eps, reduction, need_grad, backend):
    return _fake_loss(input, reduction, input.shape), _fake_grad(input, need_grad), _fake_grad(var, need_grad)


def _gnll_setup(ctx, inputs, output):
    ctx.reduction = inputs[5]
    ctx.target_shape = inputs[1].shape
    _keep_grad(ctx, output[1], output[2])
    ctx.save_for_backward(output[1], output[2])


@once_differentiable
def _gnll_backward(ctx, g, _g1, _g2):
    dx, dv = ctx.saved_tensors
    d_input = _scaled(dx, g) if (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]) else None
    d_target = (-d_input).sum_to_size(ctx.target_shape) if ctx.needs_input_grad[1] else None
    d_var = _scaled(dv, g) if ctx.needs_input_grad[2] else None
    return (d_input if ctx.needs_input_grad[0] else None), d_target, d_var, None, None, None, None, None


_gnll_op = _register("gaussian_nll_loss", _gnll_impl, _gnll_fake, _gnll_setup, _gnll_backward)


def gaussian_nll_loss(
    input: Tensor, target: Tensor, var, full: bool = False, eps: float = 1e-6, reduction: str = "mean", *,
    backend: Optional[str] = None,
) -> Tensor:
    r"""Gaussian negative log-likelihood, as :func:`torch.nn.functional.gaussian_nll_loss`
    (PyTorch 2.13: ``var`` clamped at ``eps``, its gradient taken as if the clamp were the
    identity); see :func:`fastloss.gaussian_nll_loss`. ``var``: a float, or a tensor of the
    input's shape, that shape without its last dimension, or the same rank with size-1
    dimensions. Differentiable in ``input``, ``target`` and ``var``.

    With ``reduction="none"`` and a broadcast ``var``, ``var`` enters the fused pass expanded
    to the input's shape (a view), and its gradient is summed back in the backward, where the
    upstream gradient is known.
    """
    _check_args(input, target=target, var=var if isinstance(var, Tensor) else None)
    if not isinstance(var, Tensor):
        var = torch.tensor(float(var), dtype=input.dtype, device=input.device)
    v = var
    if reduction == "none" and var.shape != input.shape:
        v = var.unsqueeze(-1) if (input.dim() and var.shape == input.shape[:-1]) else var
        try:
            v = v.expand(input.shape)
        except RuntimeError:
            v = var  # not broadcastable: the core's check names the shapes
    need = _need_grad(input, target, var)
    return _gnll_op(input, target, v, bool(full), float(eps), reduction, need, backend)[0]


# ----------------------------------------------------------------------------- normalizers
def _softmax_impl(input: Tensor, dim: int, log: bool, backend: Optional[str]) -> Tensor:
    f = _fl.log_softmax if log else _fl.softmax
    return _tensor(f(_arr(input), axis=dim, backend=backend), input)


def _softmax_fake(input, dim, log, backend):
    return torch.empty_like(input)


def _softmax_backward_impl(grad: Tensor, y: Tensor, dim: int, log: bool, backend: Optional[str]) -> Tensor:
    f = _fl.log_softmax_backward if log else _fl.softmax_backward
    return _tensor(f(_arr(grad), _arr(y), axis=dim, backend=backend), y)


def _softmax_backward_fake(grad, y, dim, log, backend):
    return torch.empty_like(y)


_softmax_backward_op = _register("softmax_backward", _softmax_backward_impl, _softmax_backward_fake)


def _softmax_setup(ctx, inputs, output):
    ctx.dim, ctx.log, ctx.backend = inputs[1], inputs[2], inputs[3]
    ctx.save_for_backward(output)


@once_differentiable
def _softmax_grad(ctx, g):
    (y,) = ctx.saved_tensors
    return _softmax_backward_op(g.to(y.dtype), y, ctx.dim, ctx.log, ctx.backend), None, None, None


_softmax_op = _register("softmax", _softmax_impl, _softmax_fake, _softmax_setup, _softmax_grad)


def _softmax_like(input, dim, dtype, log, backend):
    _check_args(input)
    if dim is None:
        raise TypeError("dim: expected the class dimension (an int); PyTorch's implicit choice is deprecated")
    if dtype is not None:
        input = input.to(dtype)
    return _softmax_op(input, int(dim), log, backend)


def softmax(input: Tensor, dim: int, *, dtype: Optional[torch.dtype] = None, backend: Optional[str] = None) -> Tensor:
    r"""Softmax along ``dim``, as :func:`torch.softmax`: ``exp(x - m) / sum(exp(x - m))`` with
    ``m`` the max (see :func:`fastloss.softmax`); its backward is fastloss's fused
    ``y * (g - sum(g y))``. ``dim`` is required (PyTorch's implicit dim is deprecated)."""
    return _softmax_like(input, dim, dtype, False, backend)


def log_softmax(input: Tensor, dim: int, *, dtype: Optional[torch.dtype] = None, backend: Optional[str] = None) -> Tensor:
    r"""Log-softmax along ``dim``, as :func:`torch.log_softmax`: ``x - lse(x)`` (see
    :func:`fastloss.log_softmax`); its backward is fastloss's fused ``g - exp(y) sum(g)``."""
    return _softmax_like(input, dim, dtype, True, backend)


def _logsumexp_impl(input: Tensor, dim: Sequence[int], keepdim: bool, backend: Optional[str]) -> Tensor:
    r = _fl.logsumexp(_arr(input), axis=tuple(dim), keepdims=keepdim, backend=backend)
    return _tensor(np.asarray(r, dtype=_arr(input).dtype) if not isinstance(r, (np.ndarray, Tensor)) else r, input)


def _logsumexp_fake(input, dim, keepdim, backend):
    dims = {d % input.dim() for d in dim} if input.dim() else set()
    shape = [1 if i in dims else s for i, s in enumerate(input.shape)] if keepdim else \
        [s for i, s in enumerate(input.shape) if i not in dims]
    return input.new_empty(shape)


def _lse_setup(ctx, inputs, output):
    input, dim, keepdim, backend = inputs
    ctx.dims = sorted({d % input.dim() for d in dim}) if input.dim() else []
    ctx.keepdim, ctx.backend = keepdim, backend
    ctx.save_for_backward(input, output)


@once_differentiable
def _lse_backward(ctx, g):
    x, out = ctx.saved_tensors
    if not ctx.keepdim:
        for d in ctx.dims:
            g, out = g.unsqueeze(d), out.unsqueeze(d)
    if len(ctx.dims) == 1:  # d lse / dx = softmax(x): the fused kernel, then the upstream scale
        p = _softmax_op(x, ctx.dims[0], False, ctx.backend)
    else:
        p = torch.exp(x - out)
    return p * g, None, None, None


_logsumexp_op = _register("logsumexp", _logsumexp_impl, _logsumexp_fake, _lse_setup, _lse_backward)


def logsumexp(input: Tensor, dim, keepdim: bool = False, *, backend: Optional[str] = None) -> Tensor:
    r"""``log(sum(exp(x)))`` over ``dim`` (an int or a tuple), as :func:`torch.logsumexp`;
    max-shifted, ``+inf`` in a row gives ``+inf`` and a row of ``-inf`` gives ``-inf`` (see
    :func:`fastloss.logsumexp`). Its gradient is the softmax over ``dim``."""
    _check_args(input)
    dims = [int(d) for d in dim] if isinstance(dim, (tuple, list)) else [int(dim)]
    return _logsumexp_op(input, dims, bool(keepdim), backend)


# ----------------------------------------------------------------------------- modules
class _Loss(torch.nn.Module):
    def __init__(self, reduction: str = "mean", backend: Optional[str] = None):
        super().__init__()
        self.reduction = reduction
        self.backend = backend

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}" + (f", backend={self.backend!r}" if self.backend else "")


class CrossEntropyLoss(_Loss):
    """:class:`torch.nn.CrossEntropyLoss` on :func:`cross_entropy` (``weight`` a buffer, so it
    follows ``.to(device)``); extras ``z_loss`` and ``backend``."""

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0, backend: Optional[str] = None):
        super().__init__(reduction, backend)
        self.register_buffer("weight", weight)
        self.ignore_index, self.label_smoothing, self.z_loss = ignore_index, label_smoothing, z_loss

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing, z_loss=self.z_loss, backend=self.backend)


class BCEWithLogitsLoss(_Loss):
    """:class:`torch.nn.BCEWithLogitsLoss` on :func:`binary_cross_entropy_with_logits`."""

    def __init__(self, weight: Optional[Tensor] = None, reduction: str = "mean", pos_weight: Optional[Tensor] = None,
                 *, backend: Optional[str] = None):
        super().__init__(reduction, backend)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return binary_cross_entropy_with_logits(input, target, self.weight, reduction=self.reduction,
                                                pos_weight=self.pos_weight, backend=self.backend)


class BCELoss(_Loss):
    """:class:`torch.nn.BCELoss` on :func:`binary_cross_entropy`."""

    def __init__(self, weight: Optional[Tensor] = None, reduction: str = "mean", *, backend: Optional[str] = None):
        super().__init__(reduction, backend)
        self.register_buffer("weight", weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return binary_cross_entropy(input, target, self.weight, reduction=self.reduction, backend=self.backend)


class KLDivLoss(_Loss):
    """:class:`torch.nn.KLDivLoss` on :func:`kl_div` (PyTorch's default ``reduction="mean"``)."""

    def __init__(self, reduction: str = "mean", log_target: bool = False, *, backend: Optional[str] = None):
        super().__init__(reduction, backend)
        self.log_target = log_target

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return kl_div(input, target, reduction=self.reduction, log_target=self.log_target, backend=self.backend)


class MSELoss(_Loss):
    """:class:`torch.nn.MSELoss` on :func:`mse_loss`."""

    def __init__(self, reduction: str = "mean", *, backend: Optional[str] = None):
        super().__init__(reduction, backend)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return mse_loss(input, target, reduction=self.reduction, backend=self.backend)


class GaussianNLLLoss(_Loss):
    """:class:`torch.nn.GaussianNLLLoss` on :func:`gaussian_nll_loss`."""

    def __init__(self, *, full: bool = False, eps: float = 1e-6, reduction: str = "mean",
                 backend: Optional[str] = None):
        super().__init__(reduction, backend)
        self.full, self.eps = full, eps

    def forward(self, input: Tensor, target: Tensor, var) -> Tensor:
        return gaussian_nll_loss(input, target, var, full=self.full, eps=self.eps, reduction=self.reduction,
                                 backend=self.backend)
