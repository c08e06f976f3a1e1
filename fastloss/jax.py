r"""JAX adapter: the fastloss functions for JAX arrays, differentiable and usable under
``jax.jit``, ``jax.grad`` / ``jax.value_and_grad`` and ``jax.vmap``.

>>> import jax, jax.numpy as jnp, fastloss.jax as flj
>>> logits, labels = jnp.zeros((4, 10)), jnp.array([1, 2, 3, 4])
>>> loss, grad = jax.jit(jax.value_and_grad(flj.cross_entropy))(logits, labels)

How it works
------------
Each loss is a :func:`jax.custom_vjp` whose forward rule runs the fused fastloss kernel --
loss *and* gradient in one pass -- on the host through a JAX callback, and keeps the gradient
as the residual; the backward rule only scales it by the cotangent (under ``jit`` XLA drops
the scaling by ``value_and_grad``'s constant 1). The primal (no differentiation) computes
the loss alone.

* **Devices.** The kernels run on the host backends (``numba``, ``cython``, ``numpy``; the
  ``backend`` argument chooses as in :mod:`fastloss`). On the CPU the callback is
  :func:`jax.experimental.buffer_callback.buffer_callback` (chosen per platform with
  :func:`jax.lax.platform_dependent`): the kernel reads JAX's input buffers in place and
  writes the loss and the gradient straight into XLA's output buffers -- no copy either way.
  Arrays on another device (a GPU, a TPU) work too, through :func:`jax.pure_callback`, which
  copies them to the host and the results back: correct, and as slow as two transfers -- for
  device data, use the framework's own losses or ``fastloss`` with CuPy or PyTorch CUDA
  tensors (the ``cuda`` backend).
* **dtypes.** float32 and float64 (with ``jax_enable_x64``) natively; float16 and bfloat16
  computed in float32. Results have the input's dtype (JAX's convention; the core API returns
  reduced losses in the compute dtype).
* **Gradients.** The first argument's (and ``var``'s) come from the fused pass. Floating
  targets are differentiable too, from their closed forms in the backward rule (under
  ``jit``, XLA drops them when nobody uses them). ``weight`` and ``pos_weight`` get zero
  cotangents: they are not differentiated, as in PyTorch. Integer class indices have none.
* **vmap.** The callback runs once per batch element (``vmap_method="sequential"``): correct
  for every reduction, but a vmapped call costs as many kernel launches as the batch.
* ``softmax_backward`` and ``log_softmax_backward`` are not exported: in JAX they are what
  ``jax.grad`` / ``jax.vjp`` of :func:`softmax` / :func:`log_softmax` compute (their VJP rules
  run those fused kernels).
* Parameters are the core's, minus ``return_grad``, ``grad_output``, ``grad_out`` and ``out``:
  JAX's autodiff asks for gradients, and JAX arrays are immutable.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import _api as _fl

__all__ = [
    "logsumexp",
    "softmax",
    "log_softmax",
    "cross_entropy",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy",
    "kl_div",
    "mse_loss",
    "gaussian_nll_loss",
]


def _spec(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


try:  # JAX >= 0.7
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # pragma: no cover - older JAX: pure_callback on every platform
    _buffer_callback = None

# Whether CPU arrays go through ``buffer_callback`` (in place) rather than ``pure_callback``;
# a switch for the tests, which run both paths.
USE_BUFFER_CALLBACK = _buffer_callback is not None


def _callback(host, specs, *args, host_into=None):
    """``host(*numpy arrays)`` on the host, its results of ``specs``, once per vmapped element.

    On the CPU through :func:`jax.experimental.buffer_callback.buffer_callback`: the kernels
    read JAX's own input buffers and write into XLA's output buffers -- ``host_into(outs,
    *arrays)`` where given (``outs`` NumPy views of the outputs, shaped like ``specs``: a loss
    kernel writes its gradient straight into them), else ``host``'s results copied in. Through
    :func:`jax.pure_callback` (elsewhere, or on an older JAX) JAX copies every input to a
    NumPy array and every result back: on a 2-core AMD EPYC this copying ran at ~2 GB/s, 128 ms
    for the 262 MB logits of a 2048 x 32000 cross-entropy, 3x the kernel itself."""

    def elsewhere(*a):
        return jax.pure_callback(host, specs, *a, vmap_method="sequential")

    if not USE_BUFFER_CALLBACK:
        return elsewhere(*args)

    def fill(ctx, outs, *bufs):
        del ctx  # the CPU's execution context: nothing to synchronize with
        arrays = [np.asarray(b) for b in bufs]
        outs = jax.tree_util.tree_map(np.asarray, outs)
        if host_into is not None:
            host_into(outs, *arrays)
            return
        for o, r in zip(jax.tree_util.tree_leaves(outs), jax.tree_util.tree_leaves(host(*arrays)), strict=True):
            np.copyto(o, r)

    on_cpu = _buffer_callback(fill, specs, vmap_method="sequential")
    return jax.lax.platform_dependent(*args, cpu=on_cpu, default=elsewhere)


def _as(a, dtype):
    return np.asarray(a).astype(dtype, copy=False)


def _reduced_shape(shape, reduction, unreduced):
    return () if reduction != "none" else tuple(unreduced)


def _factor(g, reduction, denom):
    """d(reduced loss)/d(unreduced term) times the cotangent ``g``."""
    if reduction == "none":
        return g
    if reduction in ("mean", "batchmean"):
        return g / denom if denom else g * 0
    return g


# ----------------------------------------------------------------------------- normalizers
def logsumexp(x, axis=-1, keepdims=False, *, backend=None):
    r"""``log(sum(exp(x)))`` along ``axis`` (an int, a tuple, or None for all), max-shifted;
    ``+inf`` in a row gives ``+inf``, a row of ``-inf`` gives ``-inf`` (see
    :func:`fastloss.logsumexp`). Differentiable: the gradient is the softmax."""
    return _lse_fn(axis if not isinstance(axis, list) else tuple(axis), bool(keepdims), backend)(x)


@functools.lru_cache(maxsize=None)
def _lse_fn(axis, keepdims, backend):
    def run(x):
        axes = range(x.ndim) if axis is None else ((axis,) if isinstance(axis, int) else axis)
        axes = {a % x.ndim for a in axes} if x.ndim else set()
        out_shape = tuple(1 if i in axes else s for i, s in enumerate(x.shape)) if keepdims else \
            tuple(s for i, s in enumerate(x.shape) if i not in axes)
        return _callback(lambda a: _as(_fl.logsumexp(a, axis=axis, keepdims=keepdims, backend=backend), x.dtype),
                         _spec(out_shape, x.dtype), x)

    @jax.custom_vjp
    def f(x):
        return run(x)

    def fwd(x):
        out = run(x)
        return out, (x, out)

    def bwd(res, g):
        x, out = res
        if not keepdims:
            axes = range(x.ndim) if axis is None else ((axis,) if isinstance(axis, int) else axis)
            axes = sorted(a % x.ndim for a in axes)
            g, out = jnp.expand_dims(g, axes), jnp.expand_dims(out, axes)
        return (jnp.exp(x - out) * g,)

    f.defvjp(fwd, bwd)
    return f


def softmax(x, axis=-1, *, backend=None):
    r"""Softmax along ``axis``: ``exp(x - m) / sum(exp(x - m))``, ``m`` the max (see
    :func:`fastloss.softmax`); its VJP is fastloss's fused ``y * (g - sum(g y))``."""
    return _softmax_fn(int(axis), False, backend)(x)


def log_softmax(x, axis=-1, *, backend=None):
    r"""Log-softmax along ``axis``: ``x - lse(x)`` (see :func:`fastloss.log_softmax`); its VJP
    is fastloss's fused ``g - exp(y) sum(g)``."""
    return _softmax_fn(int(axis), True, backend)(x)


@functools.lru_cache(maxsize=None)
def _softmax_fn(axis, log, backend):
    fwd_k = _fl.log_softmax if log else _fl.softmax
    bwd_k = _fl.log_softmax_backward if log else _fl.softmax_backward

    @jax.custom_vjp
    def f(x):
        return _callback(lambda a: fwd_k(a, axis=axis, backend=backend), _spec(x.shape, x.dtype), x)

    def fwd(x):
        y = f(x)
        return y, y

    def bwd(y, g):
        return (_callback(lambda gg, yy: bwd_k(gg, yy, axis=axis, backend=backend), _spec(y.shape, y.dtype),
                          g.astype(y.dtype), y),)

    f.defvjp(fwd, bwd)
    return f


# ----------------------------------------------------------------------------- losses
def _fused(core, grads_of, loss_shape, scale_rows_at=None, target_grad=None):
    """A custom-VJP loss over array arguments (None for an absent optional one).

    ``core(*arrays, return_grad=...)`` runs the fastloss function (its static parameters bound);
    it returns the loss, and with ``return_grad`` the gradients of the arguments ``grads_of``
    (the first; and ``var`` for the Gaussian NLL). ``loss_shape(args)`` is the loss's shape.
    With ``reduction="none"`` the cotangent has the loss's shape: for a row-wise loss it is
    broadcast along the class axis ``scale_rows_at``. ``target_grad(args, g)`` is the
    cotangent of argument 1 (a floating target) from its closed form."""

    def call(args, need_grad):
        idx = [i for i, a in enumerate(args) if a is not None]
        dtypes = [args[0].dtype] + [args[i].dtype for i in grads_of]

        def full(arrays):  # the present arrays back at their positions, None for absent ones
            out = [None] * len(args)
            for i, a in zip(idx, arrays):
                out[i] = a
            return out

        def host(*arrays):
            r = core(*full(arrays), return_grad=need_grad)
            if not need_grad:
                return _as(r, dtypes[0])
            loss, g = r
            g = g if isinstance(g, tuple) else (g,)
            return _as(loss, dtypes[0]), tuple(_as(a, dtypes[1 + k]) for k, a in enumerate(g))

        def host_into(outs, *arrays):  # one gradient, written by the kernel into XLA's buffer
            loss_out, (grad_out,) = outs
            loss, _ = core(*full(arrays), return_grad=True, grad_out=grad_out)
            np.copyto(loss_out, _as(loss, dtypes[0]))

        loss = _spec(loss_shape(args), args[0].dtype)
        specs = (loss, tuple(_spec(args[i].shape, args[i].dtype) for i in grads_of)) if need_grad else loss
        # the loss alone, or two gradients (the Gaussian NLL's): host's results copied in
        in_place = host_into if (need_grad and grads_of == (0,)) else None
        return _callback(host, specs, *[args[i] for i in idx], host_into=in_place)

    @jax.custom_vjp
    def f(*args):
        return call(args, False)

    def fwd(*args):
        loss, grads = call(args, True)
        return loss, (grads, args)

    def bwd(res, g):
        grads, args = res
        if g.ndim and scale_rows_at is not None:  # reduction="none": one cotangent per row
            g = jnp.expand_dims(g, scale_rows_at % args[0].ndim)
        cot = [None] * len(args)
        for k, i in enumerate(grads_of):
            cot[i] = (grads[k] * g).astype(args[i].dtype)
        if target_grad is not None and jnp.issubdtype(args[1].dtype, jnp.floating):
            cot[1] = _sum_to(target_grad(args, g), args[1].shape).astype(args[1].dtype)
        for i, a in enumerate(args):  # zero cotangents: weights (not differentiated), integer targets
            if cot[i] is None and a is not None:
                cot[i] = (jnp.zeros(a.shape, a.dtype) if jnp.issubdtype(a.dtype, jnp.inexact)
                          else np.zeros(a.shape, dtype=jax.dtypes.float0))
        return tuple(cot)

    f.defvjp(fwd, bwd)
    return f


def _sum_to(a, shape):
    """``a`` summed over the dimensions that ``shape`` broadcasts (the target's shape)."""
    shape = tuple(shape)
    a = jnp.broadcast_to(a, jnp.broadcast_shapes(a.shape, shape))
    lead = a.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, s in enumerate(shape) if s == 1 and a.shape[i + lead] != 1)
    return (jnp.sum(a, axis=axes) if axes else a).reshape(shape)


def _same_shape(args):
    return tuple(args[0].shape)


def _scalar_or(shape_fn, reduction):
    return (lambda args: ()) if reduction != "none" else shape_fn


def _mean_denominator(x, reduction, batch=False):
    if reduction == "batchmean" or (batch and reduction == "mean"):
        return x.shape[0] if x.ndim else 1
    return x.size


@functools.lru_cache(maxsize=None)
def _ce_fn(axis, ignore_index, label_smoothing, z_loss, reduction, backend):
    def core(x, t, w, return_grad, grad_out=None):
        return _fl.cross_entropy(x, t, axis=axis, weight=w, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                 z_loss=z_loss, reduction=reduction, return_grad=return_grad, grad_out=grad_out,
                                 backend=backend)

    def rows(args):
        ax = axis % args[0].ndim
        return tuple(s for i, s in enumerate(args[0].shape) if i != ax)

    def target_grad(args, g):
        # probability targets: d/dy_c of sum_c w_c y'_c (lse - x_c), y' = (1-eps) y + eps/C
        x, _, w = args
        ax = axis % x.ndim
        C = x.shape[ax]
        nlogp = -jax.nn.log_softmax(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=ax)
        d = (1.0 - label_smoothing) * nlogp * _factor(g, reduction, x.size // C if C else 0)
        if w is not None:
            d = d * jnp.expand_dims(w, [i for i in range(x.ndim) if i != ax])
        return d

    return _fused(core, (0,), _scalar_or(rows, reduction), axis, target_grad)


def cross_entropy(logits, target, *, axis=-1, weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                  reduction="mean", backend=None):
    r"""Softmax cross-entropy (class indices or class probabilities) with the class axis at
    ``axis``, as :func:`fastloss.cross_entropy` (PyTorch's semantics plus ``z_loss``; see there
    for the formula and the stability trick). Differentiable in ``logits`` (the fused gradient)
    and in probability targets; ``weight`` gets a zero cotangent."""
    f = _ce_fn(int(axis), int(ignore_index), float(label_smoothing), float(z_loss), reduction, backend)
    return f(logits, target, weight)


@functools.lru_cache(maxsize=None)
def _bce_logits_fn(reduction, backend):
    def core(x, y, w, pw, return_grad, grad_out=None):
        return _fl.binary_cross_entropy_with_logits(x, y, weight=w, pos_weight=pw, reduction=reduction,
                                                    return_grad=return_grad, grad_out=grad_out, backend=backend)

    def target_grad(args, g):  # d/dy of w [(1-y) z + (1 + (pw-1) y) softplus(-z)]
        x, _, w, pw = args
        d = -x if pw is None else (pw - 1) * jax.nn.softplus(-x) - x
        d = d if w is None else d * w
        return d * _factor(g, reduction, x.size)

    return _fused(core, (0,), _scalar_or(_same_shape, reduction), None, target_grad)


def binary_cross_entropy_with_logits(logits, target, *, weight=None, pos_weight=None, reduction="mean", backend=None):
    r"""Binary cross-entropy on logits, as :func:`fastloss.binary_cross_entropy_with_logits`:
    ``(1-y) z + (1 + (p_w-1) y) softplus(-z)``, stable for any logit. Differentiable in
    ``logits`` and ``target``; ``weight`` and ``pos_weight`` get zero cotangents."""
    return _bce_logits_fn(reduction, backend)(logits, target, weight, pos_weight)


@functools.lru_cache(maxsize=None)
def _bce_fn(reduction, backend):
    def core(p, y, w, return_grad, grad_out=None):
        return _fl.binary_cross_entropy(p, y, weight=w, reduction=reduction, return_grad=return_grad, grad_out=grad_out,
                                        backend=backend)

    def target_grad(args, g):  # d/dy of -w [y max(log p, -100) + (1-y) max(log(1-p), -100)]
        p, _, w = args
        d = jnp.maximum(jnp.log1p(-p), -100.0) - jnp.maximum(jnp.log(p), -100.0)
        d = d if w is None else d * w
        return d * _factor(g, reduction, p.size)

    return _fused(core, (0,), _scalar_or(_same_shape, reduction), None, target_grad)


def binary_cross_entropy(probs, target, *, weight=None, reduction="mean", backend=None):
    r"""Binary cross-entropy on probabilities, as :func:`fastloss.binary_cross_entropy` (PyTorch's
    clamp of each log term at -100 and its gradient). Differentiable in ``probs`` and ``target``."""
    return _bce_fn(reduction, backend)(probs, target, weight)


@functools.lru_cache(maxsize=None)
def _kl_fn(log_target, reduction, backend):
    def core(x, t, return_grad, grad_out=None):
        return _fl.kl_div(x, t, log_target=log_target, reduction=reduction, return_grad=return_grad, grad_out=grad_out,
                          backend=backend)

    def target_grad(args, g):
        x, t = args
        if log_target:  # d/dt of e^t (t - x)
            d = jnp.exp(t) * (t - x + 1)
        else:  # d/dt of t (log t - x), the term 0 where t = 0
            d = jnp.where(t > 0, jnp.log(jnp.where(t > 0, t, 1)) + 1 - x, 0)
        return d * _factor(g, reduction, _mean_denominator(x, reduction))

    return _fused(core, (0,), _scalar_or(_same_shape, reduction), None, target_grad)


def kl_div(input, target, *, log_target=False, reduction="batchmean", backend=None):
    r"""KL divergence with log-probability ``input``, as :func:`fastloss.kl_div` (default
    ``"batchmean"``, the true KL divergence per sample). Differentiable in both arguments."""
    return _kl_fn(bool(log_target), reduction, backend)(input, target)


@functools.lru_cache(maxsize=None)
def _mse_fn(reduction, backend):
    def core(x, t, return_grad, grad_out=None):
        return _fl.mse_loss(x, t, reduction=reduction, return_grad=return_grad, grad_out=grad_out, backend=backend)

    def target_grad(args, g):  # d/dy (x - y)^2 = -2 (x - y)
        x, t = args
        return -2.0 * (x - t) * _factor(g, reduction, x.size)

    return _fused(core, (0,), _scalar_or(_same_shape, reduction), None, target_grad)


def mse_loss(input, target, *, reduction="mean", backend=None):
    r"""Mean squared error, as :func:`fastloss.mse_loss`. Differentiable in both arguments."""
    return _mse_fn(reduction, backend)(input, target)


@functools.lru_cache(maxsize=None)
def _gnll_fn(full, eps, reduction, backend):
    def core(x, t, v, return_grad):  # two gradients (input, var): copied into XLA's buffers
        return _fl.gaussian_nll_loss(x, t, v, full=full, eps=eps, reduction=reduction, return_grad=return_grad,
                                     backend=backend)

    def target_grad(args, g):  # d/dy = -d/dx = -(x - y) / max(var, eps)
        x, t, v = args
        return -(x - t) / jnp.maximum(v, eps) * _factor(g, reduction, x.size)

    return _fused(core, (0, 2), _scalar_or(_same_shape, reduction), None, target_grad)


def gaussian_nll_loss(input, target, var, *, full=False, eps=1e-6, reduction="mean", backend=None):
    r"""Gaussian negative log-likelihood, as :func:`fastloss.gaussian_nll_loss` (PyTorch 2.13's
    clamp of ``var`` at ``eps``). ``var``: a float (not differentiated), or an array of the
    input's shape, that shape without its last dimension, or the same rank with size-1
    dimensions. Differentiable in ``input``, ``target`` and an array ``var`` (broadcast to the
    input's shape before the fused pass; JAX sums its cotangent back)."""
    x = jnp.asarray(input)
    v = jnp.asarray(var, dtype=x.dtype) if not hasattr(var, "shape") else var
    if v.ndim and v.shape != x.shape:
        if x.ndim and v.shape == x.shape[:-1]:
            v = v[..., None]
        if len(v.shape) == x.ndim and all(a in (1, b) for a, b in zip(v.shape, x.shape)):
            v = jnp.broadcast_to(v, x.shape)
        # any other shape: the core's check names it
    elif not v.ndim:
        v = jnp.broadcast_to(v, x.shape)
    return _gnll_fn(bool(full), float(eps), reduction, backend)(x, target, v)
