"""Shared fixtures and independent reference helpers for the fastloss test matrix.

Every numerical test compares fastloss with something that is *not* fastloss: SciPy,
closed forms written out in the test, 4th-order central finite differences in float64, or
(for the compiled backends) the float64 result of the NumPy reference backend.

Backend matrix
--------------
Tests that take the ``backend`` fixture run once per backend:

* ``FASTLOSS_TEST_BACKENDS=numba,cython`` (comma separated) selects the backends explicitly;
  a backend listed there that is unavailable makes its tests **fail** (never skip), so a CI
  job that was meant to test a backend cannot pass silently without it.
* otherwise every backend that :func:`fastloss.backends` reports available, except ``cuda``
  (which runs under the Numba CUDA simulator in its own process:
  ``NUMBA_ENABLE_CUDASIM=1 FASTLOSS_TEST_BACKENDS=cuda pytest tests``).

Under the simulator (``NUMBA_ENABLE_CUDASIM=1``) every thread is a Python thread, so shapes
go through :func:`sizes`, which shrinks them.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "") not in ("", "0")

# hypothesis: no deadline (first calls compile kernels), modest example counts
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "fastloss",
        deadline=None,
        max_examples=10 if SIM else 30,
        suppress_health_check=[HealthCheck.too_slow],
        print_blob=True,
    )
    settings.load_profile("fastloss")
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass


# ----------------------------------------------------------------------------- backends
def _explicit_backends():
    env = os.environ.get("FASTLOSS_TEST_BACKENDS", "").strip()
    if not env:
        return None
    return [b.strip() for b in env.split(",") if b.strip()]


def _default_backends():
    import fastloss as fl

    return [name for name, st in fl.backends().items() if st.available and name != "cuda"]


def _backend_list():
    explicit = _explicit_backends()
    return explicit if explicit is not None else _default_backends()


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", _backend_list(), indirect=True, scope="session")


@pytest.fixture(scope="session")
def backend(request):
    """Name of the backend under test; fails (not skips) when the backend is unavailable."""
    import fastloss as fl

    name = request.param
    st = fl.backends().get(name)
    if st is None or not st.available:
        why = "unknown backend" if st is None else st.reason
        pytest.fail(
            f"backend {name!r} was listed in FASTLOSS_TEST_BACKENDS but is unavailable: {why}",
            pytrace=False,
        )
    return name


def pytest_report_header(config):
    try:
        return f"fastloss backends under test: {_backend_list()} (cuda simulator: {SIM})"
    except Exception as exc:  # pragma: no cover - fastloss not importable
        return f"fastloss backends under test: unknown ({exc!r})"


# ----------------------------------------------------------------------------- shapes
def sizes(shape, sim=None):
    """``shape`` normally; under the CUDA simulator ``sim`` (default: every dim capped at 3).

    Zero-sized dims are kept (empty-batch tests stay empty)."""
    shape = tuple(shape)
    if not SIM:
        return shape
    if sim is not None:
        return tuple(sim)
    return tuple(min(d, 3) for d in shape)


def pick(full, sim):
    """The parameter list ``full`` normally; the smaller ``sim`` under the CUDA simulator,
    where each call costs ~0.1 s and finite differences multiply calls by 4 x size."""
    return list(sim) if SIM else list(full)


def rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- tolerances
def close(actual, expected, dtype=np.float64, *, kind="loss", rtol=None, atol=None, err_msg=""):
    """Assert agreement within the SPEC's accuracy contract for ``dtype``.

    float64: 1e-12 relative.  float32/float16-as-float32: 2e-6 relative on losses, 1e-6
    absolute on O(1) gradients/probabilities.  float16 results are compared at float16
    resolution.  NaN must match NaN and infinities must match exactly.
    """
    dtype = np.dtype(dtype)
    if rtol is None or atol is None:
        if dtype == np.float64:
            r, a = 1e-12, (1e-14 if kind == "loss" else 1e-13)
        elif dtype == np.float16:
            r, a = 2e-3, 2e-3
        else:
            r, a = (2e-6, 1e-7) if kind == "loss" else (2e-6, 1e-6)
        rtol = r if rtol is None else rtol
        atol = a if atol is None else atol
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True, err_msg=err_msg)


# ----------------------------------------------------------------------------- finite differences
def fd_grad(f, x, h=1e-3):
    """4th-order central finite differences of the scalar float64 function ``f`` at ``x``.

    ``(-f(x+2h) + 8 f(x+h) - 8 f(x-h) + f(x-2h)) / (12 h)`` per element; error O(h^4) +
    O(eps/h), about 1e-11 for O(1) functions with h = 1e-3.
    """
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        def at(d):
            xx = x.copy()
            xx[idx] += d
            return float(f(xx))

        g[idx] = (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)
    return g


def scalarize(loss, grad_output):
    """The scalar whose gradient a VJP with ``grad_output`` computes: ``sum(grad_output * loss)``."""
    go = 1.0 if grad_output is None else np.asarray(grad_output, dtype=np.float64)
    return float(np.sum(go * np.asarray(loss, dtype=np.float64)))


def check_grad(loss_fn, grad, x, *, grad_output=None, h=1e-3, rtol=1e-7, atol=1e-8):
    """Compare an analytic gradient with finite differences of ``sum(grad_output * loss_fn(x))``."""
    fd = fd_grad(lambda xx: scalarize(loss_fn(xx), grad_output), x, h)
    scale = max(1.0, float(np.max(np.abs(fd))) if fd.size else 1.0)
    np.testing.assert_allclose(np.asarray(grad, dtype=np.float64), fd, rtol=rtol, atol=atol * scale)


# ----------------------------------------------------------------------------- references
def ref_ce(x, t, *, axis=-1, weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
           reduction="mean"):
    """PyTorch's ``F.cross_entropy`` (hard targets) + PaLM z-loss, in float64, via SciPy.

    Mean divides by the summed weight of the non-ignored targets (0.0 when there are none).
    """
    from scipy.special import log_softmax, logsumexp

    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    c = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, c)
    t2 = np.asarray(t).reshape(-1).astype(np.int64)
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    keep = t2 != ignore_index
    tt = np.where(keep, t2, 0)
    with np.errstate(invalid="ignore"):
        logp = log_softmax(x2, axis=1) if x2.size else x2.copy()
        lse = logsumexp(x2, axis=1) if x2.size else np.zeros(x2.shape[0])
        nll = -logp[np.arange(x2.shape[0]), tt] * w[tt]
        row = (1 - label_smoothing) * nll
        if label_smoothing:
            row = row + label_smoothing / c * np.sum(-logp * w, axis=1)
        if z_loss:
            row = row + z_loss * lse ** 2
    row = np.where(keep, row, 0.0)
    if reduction == "none":
        return row.reshape(lead)
    if reduction == "sum":
        return row.sum()
    denom = w[tt][keep].sum()
    return row.sum() / denom if denom else 0.0


def ref_ce_soft(x, y, *, axis=-1, weight=None, label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    """PyTorch's ``F.cross_entropy`` with class-probability targets (+ z-loss), float64."""
    from scipy.special import log_softmax, logsumexp

    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    y = np.moveaxis(np.asarray(y, np.float64), axis, -1)
    c = x.shape[-1]
    if label_smoothing:
        y = (1 - label_smoothing) * y + label_smoothing / c
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    row = -np.sum(w * y * log_softmax(x, axis=-1), axis=-1) + z_loss * logsumexp(x, axis=-1) ** 2
    return reduce(row, reduction)


def reduce(l, reduction, batch=None):
    l = np.asarray(l, np.float64)
    if reduction == "none":
        return l
    if reduction == "sum":
        return l.sum()
    if reduction == "batchmean":
        return l.sum() / batch
    return l.mean()


def ref_bce_with_logits(z, y, *, weight=None, pos_weight=None, reduction="mean"):
    """``-(pw*y*log(sigmoid(z)) + (1-y)*log(1-sigmoid(z)))*w`` via ``scipy.special.log_expit``."""
    from scipy.special import log_expit

    z = np.asarray(z, np.float64)
    y = np.asarray(y, np.float64)
    pw = 1.0 if pos_weight is None else np.asarray(pos_weight, np.float64)
    l = -(pw * y * log_expit(z) + (1 - y) * log_expit(-z))
    if weight is not None:
        l = l * np.asarray(weight, np.float64)
    return reduce(l, reduction)


def ref_bce(p, y, *, weight=None, reduction="mean"):
    """PyTorch's BCE: each log term clamped at -100."""
    p = np.asarray(p, np.float64)
    y = np.asarray(y, np.float64)
    with np.errstate(divide="ignore"):
        l = -(y * np.maximum(np.log(p), -100) + (1 - y) * np.maximum(np.log(1 - p), -100))
    if weight is not None:
        l = l * np.asarray(weight, np.float64)
    return reduce(l, reduction)


def ref_kl(x, t, *, log_target=False, reduction="batchmean"):
    from scipy.special import xlogy

    x = np.asarray(x, np.float64)
    t = np.asarray(t, np.float64)
    if log_target:
        with np.errstate(invalid="ignore"):
            l = np.where(np.isneginf(t), 0.0, np.exp(t) * (t - x))
    else:
        l = np.where(t == 0, 0.0, xlogy(t, t) - t * x)
    return reduce(l, reduction, batch=x.shape[0] if x.ndim else 1)


def ref_mse(x, t, *, reduction="mean"):
    d = np.asarray(x, np.float64) - np.asarray(t, np.float64)
    return reduce(d * d, reduction)


def ref_gnll(x, t, var, *, full=False, eps=1e-6, reduction="mean"):
    x = np.asarray(x, np.float64)
    t = np.asarray(t, np.float64)
    v = np.asarray(var, np.float64)
    if v.ndim == x.ndim - 1 and v.ndim > 0 and v.shape == x.shape[:-1]:
        v = v[..., None]
    v = np.maximum(v, eps)
    l = 0.5 * (np.log(v) + (x - t) ** 2 / v)
    if full:
        l = l + 0.5 * np.log(2 * np.pi)
    return reduce(np.broadcast_to(l, np.broadcast_shapes(x.shape, v.shape)), reduction)
