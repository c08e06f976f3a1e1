"""The backend protocol: the kernel entry points every backend module provides.

A backend is a module (``numpy_backend``, ``numba_backend``, ``cython_backend``,
``cuda_backend``) with the functions of :class:`KernelSet`, under exactly these names and
parameter names, plus ``NAME`` and ``unavailable_reason()``.  The public layer
(:mod:`fastloss._api`) calls nothing else of a backend, and it has already validated and
normalized every argument:

* floating arrays are float32 or float64 (float16/bfloat16 were cast to float32), and every
  floating operand of one call has the same dtype (the *compute dtype*);
* row-wise kernels see 2-D arrays ``(N, C)`` with the class axis last; elementwise kernels see
  2-D arrays ``(R, K)`` of one common shape.  Arrays may have any strides (Fortran order,
  strided views, and stride-0 broadcast views for ``weight``, ``pos_weight``, ``var`` and
  ``gout``); ``N``/``R`` may be 0;
* outputs are preallocated; a gradient output may be the first input itself (in place), so a
  kernel must read an element (and everything it needs of its row) before writing it;
* class indices are int64 and either in ``[0, C)`` or equal to ``ignore_index``.

The NumPy backend is the reference implementation of every entry point; the others are
tested against it (``tests/test_backends.py`` checks each available backend against this
protocol).  :func:`check` is what the registry runs when it loads a backend.
"""
from __future__ import annotations

import inspect
from typing import Optional, Protocol, runtime_checkable

import numpy as np

__all__ = ["KernelSet", "ENTRY_POINTS", "OPTIONAL_HOOKS", "check"]

Array = np.ndarray
Scale = object  # a Python float, or a float64 (N,) array (cross-entropy row scales)


@runtime_checkable
class KernelSet(Protocol):
    """The kernel entry points of a backend (a module satisfies it structurally)."""

    NAME: str

    # ------------------------------------------------------------------ row-wise kernels
    def logsumexp(self, x: Array, out: Array) -> None:
        """``out[i] = log(sum_j exp(x[i, j]))`` (``out`` is ``(N,)`` of the compute dtype)."""

    def softmax(self, x: Array, out: Array) -> None:
        """Row softmax of ``x`` into ``out`` (which may be ``x``)."""

    def log_softmax(self, x: Array, out: Array) -> None:
        """Row log-softmax of ``x`` into ``out`` (which may be ``x``)."""

    def softmax_backward(self, g: Array, y: Array, out: Array) -> None:
        """``out = y * (g - sum(g * y))`` per row, ``y`` the softmax output."""

    def log_softmax_backward(self, g: Array, y: Array, out: Array) -> None:
        """``out = g - exp(y) * sum(g)`` per row, ``y`` the log-softmax output."""

    def cross_entropy(self, x: Array, target: Array, weight: Optional[Array], ignore_index: int,
                      label_smoothing: float, z_loss: float, softcap: float, loss: Optional[Array],
                      lse: Optional[Array], grad: Optional[Array], gscale: Scale) -> Optional[float]:
        """Hard targets.  ``weight`` is ``(C,)`` or None.  With ``softcap > 0`` every logit is
        first replaced by ``x' = softcap * tanh(x / softcap)`` (``softcap == 0``: no cap,
        ``x' = x``), and everything below is of ``x'``.  Writes the unreduced float64 row loss
        ``loss[i] = (1-eps) w[t] (lse - x'[t]) + eps/C sum_c w[c] (lse - x'[c]) + z lse**2``
        (``0`` for an ignored row); when ``lse`` is not None, the float64 row log-sum-exp of
        ``x'`` into ``lse[i]`` (ignored rows included); and when ``grad`` is not None,
        ``grad[i] = gscale[i] * d loss[i] / d x[i]`` -- through the cap, whose derivative is
        ``1 - tanh(x / softcap)**2`` -- with exact zeros for an ignored row, even one holding
        inf/NaN.  The cap is applied in the same passes over the row (no N x C temporary).

        ``loss`` None (a reduced loss): no row is written, and the float64 total of the row
        losses is returned instead -- added in an order fixed by the shape (blocks of rows at
        fixed offsets, then the blocks in order), so it is bitwise the same for every thread
        count and every call; a backend may sum inside its kernels (the few-classes kernels
        of numba and cython do: no N row losses written and read back).  With ``loss`` given:
        None."""

    def cross_entropy_shard(self, x: Array, target: Array, weight: Optional[Array], ignore_index: int,
                            label_smoothing: float, z_loss: float, softcap: float, lse: Array,
                            class_offset: int, num_classes: int, loss: Optional[Array], grad: Optional[Array],
                            gscale: Scale) -> Optional[float]:
        """Hard targets, classes sharded: ``x`` ``(N, C)`` holds the classes
        ``[class_offset, class_offset + C)`` of ``K = num_classes``; ``target`` ``(N,)`` int64
        holds global class indices in ``[0, K)`` or ``ignore_index``; ``weight`` is the whole
        ``(K,)`` vector or None; ``lse`` ``(N,)`` float64 is the given global row log-sum-exp of
        the (capped) logits, read only.  One pass over the shard, no max or sum of exps.
        Writes the shard's additive share of the row loss (0 for an ignored row)::

            loss[i] = [first] ((1-eps) w[t] + eps/K sum_k w[k]) lse + [first] z lse**2
                      - [t in shard] (1-eps) w[t] x'[t - class_offset]
                      - eps/K sum_{c in shard} w[class_offset + c] x'[c]

        (``first``: ``class_offset == 0``), and when ``grad`` is not None the shard's slice of
        the unsharded gradient, ``grad[i, c] = gscale[i] (p[c] A - eps/K w[class_offset + c]
        - [c = t - class_offset] (1-eps) w[t]) d x'/d x`` with ``p[c] = exp(x'[c] - lse)`` and
        ``A = (1-eps) w[t] + eps/K sum_k w[k] + 2 z lse`` (the eps terms only with ``eps != 0``),
        exact zeros for an ignored row.  ``softcap`` and ``loss`` None (the total returned) as in
        :meth:`cross_entropy`."""

    def cross_entropy_soft(self, x: Array, target: Array, weight: Optional[Array], label_smoothing: float,
                           z_loss: float, softcap: float, loss: Optional[Array], lse: Optional[Array],
                           grad: Optional[Array], gscale: Scale) -> Optional[float]:
        """Probability targets ``(N, C)``: ``loss[i] = sum_c w[c] y'[c] (lse - x'[c]) + z lse**2``
        with ``y' = (1-eps) y + eps/C``; ``softcap``, ``lse``, ``grad`` and ``loss`` None as in
        :meth:`cross_entropy`."""

    # ------------------------------------------------------------------ elementwise kernels
    # Each returns the float64 sum over all elements of the (weighted) elementwise loss,
    # writes the elementwise loss into ``loss`` when it is not None, and when ``grad`` is not
    # None writes ``grad = gscale * gout * d loss / d input`` (``gout`` None means 1).
    def bce_with_logits(self, z: Array, y: Array, weight: Optional[Array], pos_weight: Optional[Array],
                        loss: Optional[Array], grad: Optional[Array], gscale: float,
                        gout: Optional[Array]) -> float:
        """Binary cross-entropy on logits."""

    def bce(self, p: Array, y: Array, weight: Optional[Array], loss: Optional[Array], grad: Optional[Array],
            gscale: float, gout: Optional[Array]) -> float:
        """Binary cross-entropy on probabilities (log clamped at -100, PyTorch's gradient guard)."""

    def kl_div(self, x: Array, t: Array, log_target: bool, loss: Optional[Array], grad: Optional[Array],
               gscale: float, gout: Optional[Array]) -> float:
        """Pointwise KL divergence ``t (log t - x)`` (0 where ``t == 0``)."""

    def mse(self, x: Array, t: Array, loss: Optional[Array], grad: Optional[Array], gscale: float,
            gout: Optional[Array]) -> float:
        """Squared error ``(x - t)**2``."""

    def gaussian_nll(self, x: Array, t: Array, var: Array, full: bool, eps: float, loss: Optional[Array],
                     grad: Optional[Array], grad_var: Optional[Array], gscale: float,
                     gout: Optional[Array]) -> float:
        """Gaussian NLL; ``var`` is the unclamped (broadcast) variance; ``grad_var`` is a
        full-size output that the public layer sums back to the shape of ``var``."""


def _parameters(sig):
    return [p for p in sig.parameters if p != "self"]


# name -> parameter names, read off KernelSet (the one place they are written)
ENTRY_POINTS = {
    name: _parameters(inspect.signature(member))
    for name, member in vars(KernelSet).items()
    if inspect.isfunction(member) and not name.startswith("_")
}
OPTIONAL_HOOKS = ("set_num_threads", "get_num_threads", "warmup", "cache_info")


def check(module) -> list:
    """What ``module`` lacks or gets wrong of the protocol: ``[]`` when it conforms.

    Every entry point must be callable with exactly the protocol's parameter names, in
    order (the public layer passes them positionally; the names are what a reader greps);
    a function taking ``*args`` (a wrapper forwarding them) is accepted as it is.
    """
    problems = []
    if not isinstance(getattr(module, "NAME", None), str):
        problems.append("NAME: missing or not a str")
    for name, params in ENTRY_POINTS.items():
        fn = getattr(module, name, None)
        if not callable(fn):
            problems.append(f"{name}: missing")
            continue
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
            problems.append(f"{name}: no inspectable signature")
            continue
        if any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values()):
            continue  # a wrapper (spy, profiler) forwarding *args: its target is what counts
        got = _parameters(sig)
        if got != params:
            problems.append(f"{name}: parameters {got}, expected {params}")
    return problems
