"""The one peer table of the benchmarks: every fastloss function written the idiomatic way
in PyTorch (eager and ``torch.compile``), JAX (``jit``) and SciPy, and through fastloss's own
framework adapters, as zero-argument callables on a workload's inputs.

``fastloss bench``'s cases (:mod:`.cases`), ``bench/goals.py`` and the pytest-benchmark suite
(``bench/benchlib.py``) all take their peers from here, so a fix to a peer (a numerically
better form, a missing argument) reaches every report at once.  Nothing here imports a
framework until a peer is asked for; a peer that cannot run raises :class:`Unavailable`
saying why.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np


class Unavailable(Exception):
    """An implementation that cannot run here; the message says why."""


# the functions each peer has a form of (the others have no idiomatic counterpart there).
# "torch.compile" is the torch form compiled by inductor; "fastloss.torch" and "fastloss.jax"
# are fastloss through its framework adapters, timed like the framework forms they replace
# (a loss and its gradient by autograd / jax.value_and_grad), so the adapters' overhead shows.
_TORCH_LOSSES = frozenset({"logsumexp", "softmax", "log_softmax", "cross_entropy", "binary_cross_entropy_with_logits",
                           "binary_cross_entropy", "kl_div", "mse_loss", "gaussian_nll_loss"})
# linear_cross_entropy: the frameworks' idiomatic form is the linear layer then the
# cross-entropy (the logits materialized); fastloss.jax has no fused linear form
_LIN = "linear_cross_entropy"
PEER_FUNCTIONS = {
    "scipy": frozenset({"logsumexp", "softmax", "log_softmax"}),
    "torch": _TORCH_LOSSES | {"softmax_backward", "log_softmax_backward", _LIN},
    "torch.compile": _TORCH_LOSSES | {_LIN},
    "jax": _TORCH_LOSSES | {_LIN},
    "fastloss.torch": _TORCH_LOSSES | {_LIN},
    "fastloss.jax": _TORCH_LOSSES,
}
PEERS = tuple(PEER_FUNCTIONS)

# the inputs a fwd+grad peer differentiates (positions), where it is not the first alone
_WRT = {"gaussian_nll_loss": (0, 2), _LIN: (0, 1)}


def _need(peer, function):
    if function not in PEER_FUNCTIONS[peer]:
        raise Unavailable(f"{peer} has no form of {function}")


def jax_losses(jax):
    """The JAX form of every fastloss function (``jax.nn`` and the optax forms), keyed by the
    fastloss function name."""
    jnp = jax.numpy

    def cross_entropy(x, t):  # the idiomatic mean softmax cross-entropy with integer targets
        logp = jax.nn.log_softmax(x, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, t[:, None], axis=-1))

    def bce_with_logits(z, y):  # optax.sigmoid_binary_cross_entropy's form
        # (not max(z, 0) - z y + log1p(exp(-|z|)): JAX differentiates max and abs at a tie
        # as 0 and 0.5/sign 0, which gives -y instead of 1/2 - y where a logit is exactly 0)
        return jnp.mean(-(y * jax.nn.log_sigmoid(z) + (1 - y) * jax.nn.log_sigmoid(-z)))

    def bce(p, y):
        return jnp.mean(-(y * jnp.maximum(jnp.log(p), -100) + (1 - y) * jnp.maximum(jnp.log1p(-p), -100)))

    def kl(x, t):
        return jnp.sum(jnp.where(t > 0, t * (jnp.log(jnp.where(t > 0, t, 1)) - x), 0)) / x.shape[0]

    def mse(x, t):
        return jnp.mean((x - t) ** 2)

    def gnll(x, t, v):
        v = jnp.maximum(v, 1e-6)
        return jnp.mean(0.5 * (jnp.log(v) + (x - t) ** 2 / v))

    return {
        "logsumexp": lambda x: jax.nn.logsumexp(x, axis=-1),
        "softmax": lambda x: jax.nn.softmax(x, axis=-1),
        "log_softmax": lambda x: jax.nn.log_softmax(x, axis=-1),
        "cross_entropy": cross_entropy,
        "binary_cross_entropy_with_logits": bce_with_logits,
        "binary_cross_entropy": bce,
        "kl_div": kl,
        "mse_loss": mse,
        "gaussian_nll_loss": gnll,
        _LIN: lambda h, W, t: cross_entropy(h @ W.T, t),
    }


def fastloss_jax_losses():
    """fastloss.jax's functions in the call forms of :func:`jax_losses`."""
    import fastloss.jax as flj

    return {
        "logsumexp": lambda x: flj.logsumexp(x, axis=-1),
        "softmax": lambda x: flj.softmax(x, axis=-1),
        "log_softmax": lambda x: flj.log_softmax(x, axis=-1),
        "cross_entropy": flj.cross_entropy,
        "binary_cross_entropy_with_logits": flj.binary_cross_entropy_with_logits,
        "binary_cross_entropy": flj.binary_cross_entropy,
        "kl_div": flj.kl_div,  # "batchmean", as the JAX form
        "mse_loss": flj.mse_loss,
        "gaussian_nll_loss": flj.gaussian_nll_loss,
    }


def jax_callable(function, mode, inputs, dtype, impl="jax") -> Callable[[], Any]:
    """``jax.jit`` of ``function``'s JAX form (``value_and_grad`` for ``"fwd+grad"``) on
    ``inputs`` (a dict of arrays, in the fastloss call's order), not yet compiled; with
    ``impl="fastloss.jax"`` the same of fastloss.jax's function.

    float64 needs ``jax_enable_x64`` (JAX computes in float32 otherwise; switching it on
    process-wide would change every other JAX user here); without it, int64 targets are
    narrowed to int32 here rather than by JAX with a warning."""
    _need(impl, function)
    try:
        import jax
    except ImportError:
        raise Unavailable("JAX is not installed") from None
    x64 = bool(jax.config.read("jax_enable_x64"))
    if np.dtype(dtype) == np.float64 and not x64:
        raise Unavailable("JAX computes in float32 unless jax_enable_x64 is set")
    f = (jax_losses(jax) if impl == "jax" else fastloss_jax_losses())[function]
    if mode == "fwd+grad":
        f = jax.value_and_grad(f, argnums=_WRT.get(function, 0))
    f = jax.jit(f)
    args = [jax.device_put(a.astype(np.int32) if a.dtype == np.int64 and not x64 else a) for a in inputs.values()]
    return lambda: jax.block_until_ready(f(*args))


def torch_callable(function, mode, inputs, impl="torch") -> Callable[[], Any]:
    """``function``'s ``torch.nn.functional`` form on zero-copy tensors of ``inputs``; for
    ``"fwd+grad"`` the loss and ``torch.autograd.grad`` of it (returned, not accumulated).
    ``impl="torch.compile"`` compiles that form with inductor (``dynamic=False``: one shape);
    ``impl="fastloss.torch"`` calls fastloss.torch's function instead (the adapter's
    forward + backward)."""
    _need(impl, function)
    try:
        import torch
    except ImportError:
        raise Unavailable("PyTorch is not installed") from None
    T = [torch.from_numpy(a) for a in inputs.values()]
    if function in ("softmax_backward", "log_softmax_backward"):
        g, y = T
        bwd = torch._softmax_backward_data if function == "softmax_backward" else torch._log_softmax_backward_data
        return lambda: bwd(g, y, -1, y.dtype)
    if impl == "fastloss.torch":
        import fastloss.torch as ns

        lse = ns.logsumexp
    else:
        ns, lse = torch.nn.functional, torch.logsumexp
    loss = {
        "logsumexp": lambda x: lse(x, -1),
        "softmax": lambda x: ns.softmax(x, -1),
        "log_softmax": lambda x: ns.log_softmax(x, -1),
        "cross_entropy": ns.cross_entropy,
        "binary_cross_entropy_with_logits": ns.binary_cross_entropy_with_logits,
        "binary_cross_entropy": ns.binary_cross_entropy,
        "kl_div": lambda x, t: ns.kl_div(x, t, reduction="batchmean"),
        "mse_loss": ns.mse_loss,
        "gaussian_nll_loss": ns.gaussian_nll_loss,
        _LIN: (ns.linear_cross_entropy if impl == "fastloss.torch"
               else lambda h, W, t: ns.cross_entropy(ns.linear(h, W), t)),
    }[function]
    if impl == "torch.compile":
        loss = torch.compile(loss, dynamic=False)
    if mode == "fwd":  # no input requires grad: fastloss.torch computes the loss alone
        return lambda: loss(*T)
    wrt = _WRT.get(function, (0,))
    T = [t.detach().requires_grad_(i in wrt) for i, t in enumerate(T)]
    leaves = [T[i] for i in wrt]

    def fwd_grad():
        value = loss(*T)
        grads = torch.autograd.grad(value, leaves)
        return value.detach(), grads[0] if len(grads) == 1 else tuple(grads)

    return fwd_grad


def scipy_callable(function, mode, inputs) -> Callable[[], Any]:
    """``scipy.special``'s form of a normalizer on ``inputs``."""
    _need("scipy", function)
    try:
        import scipy.special as sp
    except ImportError:
        raise Unavailable("SciPy is not installed") from None
    x = inputs["x"]
    f = {"logsumexp": sp.logsumexp, "softmax": sp.softmax, "log_softmax": sp.log_softmax}[function]
    return lambda: f(x, axis=-1)


def peer_callable(peer, function, mode, inputs, dtype) -> Callable[[], Any]:
    """The callable of ``peer`` (one of :data:`PEERS`) for one workload."""
    if peer in ("jax", "fastloss.jax"):
        return jax_callable(function, mode, inputs, dtype, peer)
    if peer in ("torch", "torch.compile", "fastloss.torch"):
        return torch_callable(function, mode, inputs, peer)
    if peer == "scipy":
        return scipy_callable(function, mode, inputs)
    raise ValueError(f"peer: expected one of {PEERS}, found {peer!r}")
