"""The workloads of ``fastloss bench`` (and of the pytest-benchmark suite in ``bench/``):
their inputs (:func:`make_case`), the workload sets, and the check of a result against the
NumPy backend's."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass
class Case:
    """One workload's inputs, ready to call.

    ``call(backend)`` runs the public function on ``backend`` and returns its result;
    ``inputs`` holds the arrays (for peers such as PyTorch); ``nbytes`` is the traffic an ideal
    kernel needs: every input read once plus every output written once.
    """

    function: str
    mode: str
    shape: tuple
    dtype: np.dtype
    inputs: dict
    nbytes: int
    call: Callable[[str], Any]
    note: str = ""
    # a yardstick timed next to the backends (no fastloss in it), e.g. the matrix products a
    # fused linear + cross-entropy cannot avoid: ``(name, callable)``
    yardstick: Any = None


@dataclass(frozen=True)
class Kernel:
    function: str  # the public name, fl.<function>
    kind: str  # "rowwise" (N, C) with classes last, or "elementwise" (R, K)
    modes: tuple  # subset of ("fwd", "fwd+grad", "bwd")
    build: Callable = field(repr=False)


def _fl():
    import fastloss

    return fastloss


def _normal(rng, shape, dt, scale=1.0):
    x = rng.standard_normal(shape, dtype=dt)
    if scale != 1.0:
        x *= dt.type(scale)
    return x


def _uniform(rng, shape, dt, lo=0.0, hi=1.0):
    u = rng.random(shape, dtype=dt)
    if (lo, hi) != (0.0, 1.0):
        u *= dt.type(hi - lo)
        u += dt.type(lo)
    return u


def _row_softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e


# Each builder: (rng, shape, dtype, mode, reuse) -> Case.  ``reuse`` passes a preallocated
# ``grad_out`` / ``out`` buffer, as a training loop would (the fast path: a fresh 262 MB
# gradient costs page faults on every call).
def _b_logsumexp(rng, shape, dt, mode, reuse):
    x = _normal(rng, shape, dt, 3.0)
    fl = _fl()
    return Case("logsumexp", mode, shape, dt, {"x": x}, x.nbytes + shape[0] * dt.itemsize,
                lambda b: fl.logsumexp(x, backend=b))


def _b_softmax_like(name):
    def build(rng, shape, dt, mode, reuse):
        x = _normal(rng, shape, dt, 3.0)
        out = np.empty_like(x) if reuse else None
        f = getattr(_fl(), name)
        return Case(name, mode, shape, dt, {"x": x}, 2 * x.nbytes,
                    lambda b: f(x, out=out, backend=b), "out= reused" if reuse else "")

    return build


def _b_softmax_backward(name):
    def build(rng, shape, dt, mode, reuse):
        x = _normal(rng, shape, dt, 3.0)
        y = _row_softmax(x) if name == "softmax_backward" else x - np.log(np.exp(x).sum(1, keepdims=True))
        g = _normal(rng, shape, dt)
        f = getattr(_fl(), name)
        return Case(name, mode, shape, dt, {"grad": g, "y": y}, 3 * x.nbytes, lambda b: f(g, y, backend=b))

    return build


def _loss_case(name, mode, shape, dt, inputs, reuse, n_grad_outputs=1, grad_out_ok=True):
    """A loss called as ``fl.<name>(*inputs)`` with ``return_grad`` for ``fwd+grad``."""
    f = getattr(_fl(), name)
    args = tuple(inputs.values())
    first = args[0]
    nbytes = sum(a.nbytes for a in args) + dt.itemsize  # + the scalar loss
    note = ""
    if mode == "fwd":
        call = lambda b: f(*args, backend=b)  # noqa: E731
    else:
        nbytes += n_grad_outputs * first.nbytes
        if reuse and grad_out_ok:
            gout = np.empty_like(first)
            note = "grad_out reused"
            call = lambda b: f(*args, return_grad=True, grad_out=gout, backend=b)  # noqa: E731
        else:
            call = lambda b: f(*args, return_grad=True, backend=b)  # noqa: E731
    return Case(name, mode, shape, dt, inputs, nbytes, call, note)


def _b_cross_entropy(rng, shape, dt, mode, reuse):
    x = _normal(rng, shape, dt, 3.0)
    t = rng.integers(0, shape[1], shape[0], dtype=np.int64)
    return _loss_case("cross_entropy", mode, shape, dt, {"logits": x, "target": t}, reuse)


def _b_bce_logits(rng, shape, dt, mode, reuse):
    z = _normal(rng, shape, dt, 3.0)
    y = (rng.random(shape, dtype=dt) < 0.5).astype(dt)
    return _loss_case("binary_cross_entropy_with_logits", mode, shape, dt, {"logits": z, "target": y}, reuse)


def _b_bce(rng, shape, dt, mode, reuse):
    p = _uniform(rng, shape, dt, 0.01, 0.99)
    y = _uniform(rng, shape, dt)
    return _loss_case("binary_cross_entropy", mode, shape, dt, {"probs": p, "target": y}, reuse)


def _b_kl_div(rng, shape, dt, mode, reuse):
    x = np.log(_row_softmax(_normal(rng, shape, dt)))
    t = _row_softmax(_normal(rng, shape, dt))
    return _loss_case("kl_div", mode, shape, dt, {"input": x, "target": t}, reuse)


def _b_mse(rng, shape, dt, mode, reuse):
    return _loss_case("mse_loss", mode, shape, dt,
                      {"input": _normal(rng, shape, dt), "target": _normal(rng, shape, dt)}, reuse)


def _b_gaussian_nll(rng, shape, dt, mode, reuse):
    inputs = {"input": _normal(rng, shape, dt), "target": _normal(rng, shape, dt),
              "var": _uniform(rng, shape, dt, 0.5, 1.5)}
    # the gradient is the pair (d_input, d_var); gaussian_nll_loss takes no grad_out
    return _loss_case("gaussian_nll_loss", mode, shape, dt, inputs, reuse, n_grad_outputs=2, grad_out_ok=False)


def _b_linear_ce(rng, shape, dt, mode, reuse):
    """``fl.linear_cross_entropy`` on ``(N, H, V)``: hidden states ``(N, H)``, a weight
    ``(V, H)``, ``N`` targets; loss and both gradients.  Its yardstick: the three matrix
    products alone (``h @ W.T``, ``g @ W``, ``g.T @ h``) on NumPy's BLAS into preallocated
    outputs -- the work no fused kernel avoids (the logits are never held by fastloss)."""
    n, h, v = shape
    x = _normal(rng, (n, h), dt)
    W = _normal(rng, (v, h), dt, 0.05)
    t = rng.integers(0, v, n, dtype=np.int64)
    fl = _fl()
    nbytes = 2 * (x.nbytes + W.nbytes) + t.nbytes + dt.itemsize  # inputs read, gradients written
    z, dh, dW = np.empty((n, v), dt), np.empty_like(x), np.empty_like(W)

    def products():
        np.matmul(x, W.T, out=z)
        np.matmul(z, W, out=dh)
        np.matmul(z.T, x, out=dW)

    return Case("linear_cross_entropy", mode, shape, dt, {"input": x, "linear_weight": W, "target": t}, nbytes,
                lambda b: fl.linear_cross_entropy(x, W, t, return_grad=True, backend=b),
                "time vs products: the 3 matrix products alone", ("products", products))


KERNELS: dict[str, Kernel] = {k.function: k for k in (
    Kernel("logsumexp", "rowwise", ("fwd",), _b_logsumexp),
    Kernel("softmax", "rowwise", ("fwd",), _b_softmax_like("softmax")),
    Kernel("log_softmax", "rowwise", ("fwd",), _b_softmax_like("log_softmax")),
    Kernel("softmax_backward", "rowwise", ("bwd",), _b_softmax_backward("softmax_backward")),
    Kernel("log_softmax_backward", "rowwise", ("bwd",), _b_softmax_backward("log_softmax_backward")),
    Kernel("cross_entropy", "rowwise", ("fwd", "fwd+grad"), _b_cross_entropy),
    Kernel("binary_cross_entropy_with_logits", "elementwise", ("fwd", "fwd+grad"), _b_bce_logits),
    Kernel("binary_cross_entropy", "elementwise", ("fwd", "fwd+grad"), _b_bce),
    Kernel("kl_div", "elementwise", ("fwd", "fwd+grad"), _b_kl_div),
    Kernel("mse_loss", "elementwise", ("fwd", "fwd+grad"), _b_mse),
    Kernel("gaussian_nll_loss", "elementwise", ("fwd", "fwd+grad"), _b_gaussian_nll),
    # (N, H, V): the fused linear layer + cross-entropy of a large vocabulary
    Kernel("linear_cross_entropy", "linear", ("fwd+grad",), _b_linear_ce),
)}


def make_case(function, mode, shape, dtype, rng=None, reuse=True) -> Case:
    """Build the inputs of one workload (also used by the pytest-benchmark suite in ``bench/``)."""
    k = KERNELS[function]
    if mode not in k.modes:
        raise ValueError(f"mode: expected one of {k.modes} for {function}, found {mode!r}")
    rng = np.random.default_rng(0) if rng is None else rng
    return k.build(rng, tuple(shape), np.dtype(dtype), mode, reuse)


# ============================================================================ checking
def outputs(result) -> list:
    """Flatten a result (scalar, array, ``(loss, grad)``, ``(loss, (d_in, d_var))``) into a
    list of NumPy array copies, so that a later call writing the same ``grad_out`` buffer
    cannot change what was recorded."""
    if isinstance(result, (tuple, list)):
        return [a for r in result for a in outputs(r)]
    return [np.array(result, copy=True)]


def compare(ref: list, got: list, dtype) -> tuple[bool, float]:
    """Compare flattened results; return ``(ok, max_err)`` with ``max_err`` the largest
    absolute difference relative to the largest reference magnitude of that output.

    float32 passes within rtol 1e-4 plus 1e-5 of the output's largest magnitude, float64 within
    1e-9 plus 1e-10: loose enough for a different (correct) summation order or exp, tight
    enough that a wrong kernel cannot pass.  Non-finite entries must match exactly.
    """
    rtol, atol = (1e-4, 1e-5) if np.dtype(dtype) == np.float32 else (1e-9, 1e-10)
    if len(ref) != len(got):
        return False, math.inf
    worst, ok = 0.0, True
    for r, g in zip(ref, got):
        r = np.asarray(r, dtype=np.float64)
        g = np.asarray(g, dtype=np.float64)
        if r.shape != g.shape:
            return False, math.inf
        fin = np.isfinite(r)
        if not np.array_equal(fin, np.isfinite(g)) or not np.array_equal(r[~fin], g[~fin], equal_nan=True):
            return False, math.inf
        if not fin.any():
            continue
        rf, gf = r[fin], g[fin]
        scale = float(np.max(np.abs(rf))) or 1.0
        diff = np.abs(gf - rf)
        worst = max(worst, float(np.max(diff)) / scale)
        ok &= bool(np.all(diff <= rtol * np.abs(rf) + atol * scale))
    return ok, worst


# ============================================================================ workload sets
f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
CE, LSE = "cross_entropy", "logsumexp"
BCEL, BCE = "binary_cross_entropy_with_logits", "binary_cross_entropy"
LIN = "linear_cross_entropy"

# (function, mode, shape, dtype, reuse)
_FULL = [
    (CE, "fwd+grad", (2048, 32000), f32, True),  # an LLM vocabulary, the headline workload
    (CE, "fwd+grad", (2048, 32000), f32, False),  # the same allocating a fresh gradient
    (CE, "fwd", (2048, 32000), f32, True),
    (CE, "fwd+grad", (8192, 1000), f32, True),
    (CE, "fwd+grad", (262144, 10), f32, True),
    (CE, "fwd+grad", (8192, 1000), f64, True),
    (LSE, "fwd", (2048, 32000), f32, True),
    (LSE, "fwd", (8192, 1000), f64, True),
    ("softmax", "fwd", (8192, 1000), f32, True),
    ("log_softmax", "fwd", (8192, 1000), f32, True),
    ("softmax", "fwd", (8192, 1000), f64, True),
    ("softmax_backward", "bwd", (8192, 1000), f32, True),
    ("log_softmax_backward", "bwd", (8192, 1000), f32, True),
    (BCEL, "fwd+grad", (4096, 4096), f32, True),  # 16M elements
    (BCEL, "fwd", (4096, 4096), f32, True),
    (BCEL, "fwd+grad", (2048, 2048), f64, True),
    (BCE, "fwd+grad", (2048, 2048), f32, True),
    ("kl_div", "fwd+grad", (2048, 2048), f32, True),
    ("mse_loss", "fwd+grad", (4096, 4096), f32, True),
    ("mse_loss", "fwd+grad", (2048, 2048), f64, True),
    ("gaussian_nll_loss", "fwd+grad", (2048, 2048), f32, True),
    (LIN, "fwd+grad", (4096, 512, 32000), f32, True),  # the large-vocabulary goal shape
    (LIN, "fwd+grad", (1024, 512, 128256), f32, True),  # a 128k vocabulary
]

_QUICK = [
    (CE, "fwd+grad", (512, 32000), f32, True),
    (CE, "fwd+grad", (4096, 1000), f32, True),
    (CE, "fwd+grad", (65536, 10), f32, True),
    (CE, "fwd+grad", (2048, 1000), f64, True),
    (LSE, "fwd", (512, 32000), f32, True),
    ("softmax", "fwd", (4096, 1000), f32, True),
    ("log_softmax", "fwd", (4096, 1000), f32, True),
    (BCEL, "fwd+grad", (2048, 2048), f32, True),
    (BCE, "fwd+grad", (1024, 1024), f32, True),
    ("kl_div", "fwd+grad", (1024, 1024), f32, True),
    ("mse_loss", "fwd+grad", (2048, 2048), f32, True),
    ("mse_loss", "fwd+grad", (1024, 1024), f64, True),
    ("gaussian_nll_loss", "fwd+grad", (1024, 1024), f32, True),
    (LIN, "fwd+grad", (1024, 256, 32000), f32, True),
]

# every kernel and mode once, on shapes small enough for a test suite
_TINY_SHAPE = {"rowwise": (16, 50), "elementwise": (24, 40), "linear": (16, 8, 50)}
_TINY = [(fn, mode, _TINY_SHAPE[k.kind], f32, True)
         for fn, k in KERNELS.items() for mode in k.modes] + [
    (CE, "fwd+grad", (16, 50), f64, True),
    (CE, "fwd+grad", (16, 50), f32, False),
    (BCEL, "fwd+grad", (24, 40), f64, True),
]
