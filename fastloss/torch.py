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
  ``weight`` of probability-target ``cross_entropy`` and of ``mse_loss``; ``linear_weight``
  and ``linear_bias`` of ``linear_cross_entropy``. The input's (and ``var``'s,
  ``linear_weight``'s, ``linear_bias``'s) gradient comes from the fused pass; the rarer target
  and weight gradients are formed in the backward from their closed forms. Where PyTorch
  refuses a derivative (the ``weight`` of index-target ``cross_entropy``, of
  ``linear_cross_entropy`` and of the BCE losses, ``pos_weight``), so does this module, with
  the same ``RuntimeError`` before anything is computed.
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
keyword-only: ``z_loss``, ``softcap``, ``num_items``, ``return_lse`` (``cross_entropy``:
``(loss, lse)``, the lse not differentiable) and ``backend``; ``linear_cross_entropy`` also
takes ``chunk_size``.

Large vocabularies: :func:`linear_cross_entropy` (and :class:`LinearCrossEntropyLoss`) never
hold the N x V logits; its gradients for ``input``, ``linear_weight`` and ``linear_bias`` come
from the chunked forward pass (with ``reduction="none"``, from one chunked pass in the
backward, which knows the upstream rows). The products run on PyTorch's BLAS for CPU
tensors and on cuBLAS for CUDA tensors.
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
    "linear_cross_entropy",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
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
def _lse_dtype(input: Tensor) -> torch.dtype:
    """The core's compute dtype, which ``return_lse`` answers in (float32 for float16/bfloat16)."""
    return torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype


def _lse_tensor(a, input: Tensor) -> Tensor:
    """The core's row log-sum-exps as a tensor on ``input``'s device, in the dtype the core
    gave (no rounding to the input's dtype, even for a 0-d result)."""
    if isinstance(a, Tensor):
        return a
    t = torch.from_numpy(np.asarray(a))
    return t if input.is_cpu else t.to(input.device)


def _cross_entropy_impl(
    input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, label_smoothing: float,
    z_loss: float, softcap: Optional[float], num_items: Optional[float], reduction: str, need_grad: bool,
    return_lse: bool, backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    r = _fl.cross_entropy(
        _arr(input), _arr(target), axis=_class_dim(input), weight=_arr(weight), ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, num_items=num_items, reduction=reduction,
        return_grad=need_grad, return_lse=return_lse, backend=backend,
    )
    r = r if isinstance(r, tuple) else (r,)
    loss = _tensor(r[0], input)
    grad = _tensor(r[1], input) if need_grad else input.new_empty(_NO_GRAD)
    lse = _lse_tensor(r[-1], input) if return_lse else input.new_empty(_NO_GRAD)
    return loss, grad, lse


def _cross_entropy_fake(input, target, weight, ignore_index, label_smoothing, z_loss, softcap, num_items, reduction,
                        need_grad, return_lse, backend):
    rows = [s for i, s in enumerate(input.shape) if i != _class_dim(input)]
    lse = input.new_empty(rows, dtype=_lse_dtype(input)) if return_lse else input.new_empty(_NO_GRAD)
    return _fake_loss(input, reduction, rows), _fake_grad(input, need_grad), lse


def _ce_setup(ctx, inputs, output):
    input, target, weight, _, eps, _, cap, nitems, reduction, _, _, _ = inputs
    ctx.reduction, ctx.eps, ctx.dim, ctx.cap, ctx.nitems = reduction, eps, _class_dim(input), cap, nitems
    soft = target.is_floating_point()
    ctx.extra = soft and (target.requires_grad or (weight is not None and weight.requires_grad))
    # the inputs are kept only for the (rare) target/weight gradients of probability targets
    _keep_grad(ctx, output[1], output[2])  # the gradient and the lse: neither is differentiable
    ctx.save_for_backward(output[1], *((input, target, weight) if ctx.extra else ()))


@once_differentiable
def _ce_backward(ctx, g, _g_grad, _g_lse):
    d_input = d_target = d_weight = None
    if ctx.needs_input_grad[0]:
        d_input = _scaled(ctx.saved_tensors[0], g, ctx.dim)
    if ctx.extra:
        _, x, y, w = ctx.saved_tensors
        dim = ctx.dim
        C = x.shape[dim]
        n_rows = x.numel() // C if C else 0
        f = _factor(g, ctx.reduction, ctx.nitems if ctx.nitems is not None else n_rows, dim)
        xc = x.to(torch.promote_types(x.dtype, torch.float32))
        if ctx.cap:  # the loss is of the capped logits (the z-loss term does not depend on y or w)
            xc = ctx.cap * torch.tanh(xc / ctx.cap)
        nlogp = -torch.log_softmax(xc, dim)  # lse - x
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
    return (d_input, d_target, d_weight) + (None,) * 9


_cross_entropy_op = _register("cross_entropy", _cross_entropy_impl, _cross_entropy_fake, _ce_setup, _ce_backward)


def _opt_float(v) -> Optional[float]:
    return None if v is None else float(v)


def cross_entropy(
    input: Tensor, target: Tensor, weight: Optional[Tensor] = None, *, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
    num_items: Optional[float] = None, return_lse: bool = False, backend: Optional[str] = None,
):
    r"""Softmax cross-entropy, as :func:`torch.nn.functional.cross_entropy` (class dim 1, or 0
    for an unbatched ``(C,)`` input), fused with its gradient; see
    :func:`fastloss.cross_entropy` for the formula, the stability trick and the options.

    ``target``: class indices ``(N, d1, ...)`` (any integer dtype), or class probabilities
    shaped like ``input`` (which may require grad). Differentiable in ``input``; in ``target``
    and ``weight`` for probability targets (as in PyTorch). Returns the loss as a tensor in
    ``input``'s dtype.

    fastloss extras (keyword-only; see :func:`fastloss.cross_entropy`):

    * ``z_loss``: PaLM's ``z * lse**2`` per non-ignored row.
    * ``softcap``: Gemma 2's cap, the loss of ``softcap * tanh(input / softcap)``; the
      gradient flows through the cap (fused, no capped copy of the logits).
    * ``num_items``: the denominator of ``"mean"`` (instead of the summed weight of the
      non-ignored targets), e.g. the global token count over gradient-accumulation
      micro-batches, whose summed losses and gradients then equal the full batch's.
    * ``return_lse``: return ``(loss, lse)``, ``lse`` each row's log-sum-exp of the (capped)
      logits from the same pass, shaped like the unreduced loss, in float32 for
      float16/bfloat16 input (else the input's dtype), ignored rows included. ``lse`` is not
      differentiable: it does not require grad, and no gradient flows through it (use
      :func:`logsumexp` where one should).

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
    loss, _, lse = _cross_entropy_op(input, target, weight, int(ignore_index), float(label_smoothing), float(z_loss),
                                     _opt_float(softcap), _opt_float(num_items), reduction, need, bool(return_lse),
                                     backend)
    return (loss, lse) if return_lse else loss


# ----------------------------------------------------------------------------- fused linear + cross-entropy
def _det(t: Optional[Tensor]) -> Optional[Tensor]:
    """A tensor as :func:`fastloss.linear_cross_entropy` takes it: the tensor itself, detached
    (the core then runs the products on PyTorch's BLAS -- cuBLAS for CUDA tensors -- on views
    of the same memory)."""
    return None if t is None else t.detach()


def _linear_ce_impl(
    input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Optional[Tensor], weight: Optional[Tensor],
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float], num_items: Optional[float],
    reduction: str, chunk_size: Optional[int], return_grad: bool, backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r = _fl.linear_cross_entropy(
        _det(input), _det(linear_weight), _det(target), linear_bias=_det(linear_bias), weight=_det(weight),
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        num_items=num_items, reduction=reduction, return_grad=return_grad, chunk_size=chunk_size, backend=backend,
    )
    none = input.new_empty(_NO_GRAD)
    if not return_grad:
        return _tensor(r, input), none, none.clone(), none.clone()
    loss, grads = r
    db = _tensor(grads[2], linear_bias) if linear_bias is not None else none
    return _tensor(loss, input), _tensor(grads[0], input), _tensor(grads[1], linear_weight), db


def _linear_ce_fake(input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing, z_loss, softcap,
                    num_items, reduction, chunk_size, return_grad, backend):
    db = _fake_grad(linear_bias, return_grad) if linear_bias is not None else input.new_empty(_NO_GRAD)
    return (_fake_loss(input, reduction, input.shape[:-1]), _fake_grad(input, return_grad),
            _fake_grad(linear_weight, return_grad), db)


def _linear_ce_grad_impl(
    grad_output: Tensor, input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Optional[Tensor],
    weight: Optional[Tensor], ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float],
    chunk_size: Optional[int], backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of ``reduction="none"`` for the upstream rows ``grad_output``: one more
    fused pass (the weight's gradient sums the rows, so it cannot be rescaled afterwards)."""
    _, grads = _fl.linear_cross_entropy(
        _det(input), _det(linear_weight), _det(target), linear_bias=_det(linear_bias), weight=_det(weight),
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        reduction="none", return_grad=True, grad_output=_det(grad_output), chunk_size=chunk_size, backend=backend,
    )
    db = _tensor(grads[2], linear_bias) if linear_bias is not None else input.new_empty(_NO_GRAD)
    return _tensor(grads[0], input), _tensor(grads[1], linear_weight), db


def _linear_ce_grad_fake(grad_output, input, linear_weight, target, linear_bias, weight, ignore_index,
                         label_smoothing, z_loss, softcap, chunk_size, backend):
    db = torch.empty_like(linear_bias) if linear_bias is not None else input.new_empty(_NO_GRAD)
    return torch.empty_like(input), torch.empty_like(linear_weight), db


_linear_ce_grad_op = _register("linear_cross_entropy_backward", _linear_ce_grad_impl, _linear_ce_grad_fake)


def _linear_ce_setup(ctx, inputs, output):
    input, W, target, b, w, ii, eps, zl, cap, _, reduction, chunk, _, backend = inputs
    ctx.reduction = reduction
    _keep_grad(ctx, *output[1:])
    if reduction == "none":  # the gradients come from a pass in the backward, with the upstream rows
        ctx.opts = (ii, eps, zl, cap, chunk, backend)
        ctx.has_b, ctx.has_w = b is not None, w is not None
        ctx.save_for_backward(input, W, target, *((b,) if b is not None else ()), *((w,) if w is not None else ()))
    else:
        ctx.save_for_backward(*output[1:])


@once_differentiable
def _linear_ce_backward(ctx, g, _g1, _g2, _g3):
    need = ctx.needs_input_grad
    if ctx.reduction == "none":
        saved = list(ctx.saved_tensors)
        input, W, target = saved[:3]
        b = saved[3] if ctx.has_b else None
        w = saved[-1] if ctx.has_w else None
        # through the dispatcher when traced (a fake or functional upstream gradient, also outside
        # dynamo, as AOTAutograd's own tracing): the impl runs on real CPU tensors only
        op = _linear_ce_grad_op if type(g) is Tensor else _linear_ce_grad_op.op
        dh, dW, db = op(g, input, W, target, b, w, *ctx.opts)
    else:
        dh, dW, db = (_scaled(s, g) if n else None for s, n in zip(ctx.saved_tensors, (need[0], need[1], need[3])))
    return (dh if need[0] else None, dW if need[1] else None, None, db if need[3] else None) + (None,) * 10


_linear_ce_op = _register("linear_cross_entropy", _linear_ce_impl, _linear_ce_fake, _linear_ce_setup,
                          _linear_ce_backward)


def _chunk_from_options(options, chunk_size: Optional[int]) -> Optional[int]:
    """``chunk_size`` with PyTorch's ``options`` (a :class:`torch.nn.LinearCrossEntropyOptions`)
    mapped: its ``batch_chunk_size`` is the rows per chunk; its other fields (the chunking
    heuristic, the accumulation policy and dtype, ``allow_retain_graph``) have no counterpart
    here and are ignored: fastloss always chunks, multiplies float16/bfloat16 in float32, and
    allows a second backward through a retained graph."""
    if options is None:
        return chunk_size
    cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if cls is None or not isinstance(options, cls):
        raise TypeError(f"options: expected None or a torch.nn.LinearCrossEntropyOptions, found "
                        f"{type(options).__name__}")
    bcs = options.batch_chunk_size
    if bcs is None:
        return chunk_size
    if chunk_size is not None and int(chunk_size) != bcs:
        raise ValueError(f"chunk_size: {chunk_size} disagrees with options.batch_chunk_size={bcs}; give one of them")
    return bcs


def linear_cross_entropy(
    input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None, reduction: str = "mean", ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0, options=None, z_loss: float = 0.0, softcap: Optional[float] = None,
    num_items: Optional[float] = None, chunk_size: Optional[int] = None, backend: Optional[str] = None,
) -> Tensor:
    r"""Cross-entropy of a linear layer's output, as :func:`torch.nn.functional.linear_cross_entropy`
    (``cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)``), without ever
    holding the N x V logits: :func:`fastloss.linear_cross_entropy` processes the rows in
    chunks (logits by PyTorch's BLAS, the fused cross-entropy kernel writing their gradient in
    place, two more products for the input's and the weight's gradients).

    Differentiable in ``input``, ``linear_weight`` and ``linear_bias``: with ``"mean"`` or
    ``"sum"`` the three gradients come from the forward pass and the backward only scales
    them by the upstream scalar; with ``"none"`` the forward computes the loss alone and the
    backward one fused pass with the upstream rows (``linear_weight``'s gradient sums over the
    rows, so it cannot be rescaled afterwards). The class ``weight`` is not differentiable
    (as in PyTorch, for class-index targets).

    Parameters are PyTorch's: ``input`` ``(H,)`` or ``(N, H)`` -- or any ``(..., H)``, the rows
    being every index but the last -- ``linear_weight`` ``(V, H)`` (``torch.nn.Linear.weight``),
    ``target`` class indices shaped like ``input`` without its last dimension, ``linear_bias``
    ``(V,)``; ``ignore_index=None`` means ``-100``. ``options`` (a
    :class:`torch.nn.LinearCrossEntropyOptions`): its ``batch_chunk_size`` sets the rows per
    chunk; its other fields are ignored (fastloss always chunks, multiplies float16/bfloat16 in
    float32, and keeps its saved gradients, so ``retain_graph=True`` always works).
    fastloss extras, keyword-only: ``z_loss``, ``softcap``, ``num_items`` (as in
    :func:`cross_entropy`), ``chunk_size`` (rows per chunk; default: a chunk's logits take
    1/16 of the N x V logits, within 8-64 MB) and ``backend`` (of each chunk's cross-entropy).

    Class-probability targets (floating, shaped like the logits) are PyTorch's reference path:
    the logits are formed with :func:`torch.nn.functional.linear` and go to :func:`cross_entropy`
    (all N x V of them). K-dimensional losses (a ``linear_weight`` of more than 2 dimensions)
    are not supported (``ValueError``). CPU tensors run the products on PyTorch's BLAS, CUDA
    tensors on cuBLAS (the whole chunk loop on the device, the ``cuda`` backend); tensors on
    other devices raise ``TypeError``.

    Examples
    --------
    >>> import torch, fastloss.torch as flt
    >>> h = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    >>> W = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    >>> t = torch.tensor([1, 2, 3, -100, 5, 9])
    >>> loss = flt.linear_cross_entropy(h, W, t)
    >>> bool(torch.isclose(loss, torch.nn.functional.cross_entropy(h @ W.T, t)))
    True
    >>> loss.backward(); h.grad.shape, W.grad.shape
    (torch.Size([6, 4]), torch.Size([10, 4]))
    """
    _check_args(input, linear_weight=linear_weight, target=target, linear_bias=linear_bias, weight=weight)
    ii = -100 if ignore_index is None else int(ignore_index)
    chunk = _chunk_from_options(options, chunk_size)
    if linear_weight.dim() != 2:
        raise ValueError(f"linear_weight: expected shape (V, H) (the layout of torch.nn.Linear.weight), found "
                         f"{tuple(linear_weight.shape)}; K-dimensional losses (out_features) are not supported")
    if not (input.is_cpu or input.is_cuda):
        raise TypeError(f"input: fastloss.torch.linear_cross_entropy takes CPU or CUDA tensors, found one on "
                        f"{input.device}")
    if target.is_floating_point():  # class probabilities: PyTorch's reference path, on the fused cross-entropy
        logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
        return cross_entropy(logits, target, weight, ignore_index=ii, reduction=reduction,
                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, num_items=num_items,
                             backend=backend)
    _not_differentiable("nll_loss_forward", weight=weight)
    need = _need_grad(input, linear_weight, linear_bias)
    fused = need and reduction != "none"
    return _linear_ce_op(input, linear_weight, target, linear_bias, weight, ii, float(label_smoothing), float(z_loss),
                         _opt_float(softcap), _opt_float(num_items), reduction,
                         None if chunk is None else int(chunk), fused, backend)[0]


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
    follows ``.to(device)``); extras ``z_loss``, ``softcap``, ``num_items``, ``return_lse``
    (``forward`` then returns ``(loss, lse)``) and ``backend``. ``forward``'s keyword
    ``num_items``, when given, replaces the constructor's for that call (the token count of
    the current step)."""

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap: Optional[float] = None,
                 num_items: Optional[float] = None, return_lse: bool = False, backend: Optional[str] = None):
        super().__init__(reduction, backend)
        self.register_buffer("weight", weight)
        self.ignore_index, self.label_smoothing, self.z_loss = ignore_index, label_smoothing, z_loss
        self.softcap, self.num_items, self.return_lse = softcap, num_items, return_lse

    def forward(self, input: Tensor, target: Tensor, *, num_items: Optional[float] = None):
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                             num_items=self.num_items if num_items is None else num_items,
                             return_lse=self.return_lse, backend=self.backend)


class LinearCrossEntropyLoss(_Loss):
    """:class:`torch.nn.LinearCrossEntropyLoss` on :func:`linear_cross_entropy`, with its
    constructor parameters and attribute names: the linear layer is ``self.linear`` (a
    :class:`torch.nn.Linear` ``in_features -> num_classes``, initialized as PyTorch's, so its
    parameters are ``linear.weight`` ``(V, H)`` and ``linear.bias`` ``(V,)`` when
    ``bias=True``), and ``weight`` is the class-weight buffer -- the same ``state_dict`` keys as
    PyTorch's module, whose states load into this one and back.  ``out_features`` must be
    ``()`` (K-dimensional losses are not supported: ``ValueError``).  Extras, keyword-only:
    ``z_loss``, ``softcap``, ``num_items``, ``chunk_size`` and ``backend`` (``forward``'s
    ``num_items``, when given, replaces the constructor's for that call)."""

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple = (), bias: bool = False,
                 device=None, dtype=None, reduction: str = "mean", weight: Optional[Tensor] = None,
                 ignore_index: Optional[int] = None, label_smoothing: float = 0.0, options=None,
                 z_loss: float = 0.0, softcap: Optional[float] = None, num_items: Optional[float] = None,
                 chunk_size: Optional[int] = None, backend: Optional[str] = None):
        if tuple(out_features) != ():
            raise ValueError(f"out_features: only () is supported (K-dimensional losses are not), found {out_features!r}")
        if weight is not None and weight.shape != (num_classes,):  # PyTorch's checks and messages
            raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        _chunk_from_options(options, chunk_size)  # a bad options (or a disagreeing chunk_size) fails here
        super().__init__(reduction, backend)
        self.register_buffer("weight", weight)
        self.num_classes, self.out_features = num_classes, ()
        self.ignore_index, self.label_smoothing, self.options = ignore_index, label_smoothing, options
        self.z_loss, self.softcap, self.num_items, self.chunk_size = z_loss, softcap, num_items, chunk_size
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)

    def forward(self, input: Tensor, target: Tensor, *, num_items: Optional[float] = None) -> Tensor:
        return linear_cross_entropy(
            input, self.linear.weight, target, linear_bias=self.linear.bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            options=self.options, z_loss=self.z_loss, softcap=self.softcap,
            num_items=self.num_items if num_items is None else num_items, chunk_size=self.chunk_size,
            backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"bias={self.linear.bias is not None}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}"
                + (f", backend={self.backend!r}" if self.backend else ""))


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
