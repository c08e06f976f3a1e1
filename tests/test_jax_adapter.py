"""fastloss.jax against the formulas written in jax.numpy / jax.nn (optax-style), and jax's
own autodiff of those formulas: values and every VJP, eagerly, under jit and under vmap, on
every host backend. float64 runs with jax_enable_x64.
"""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import fastloss.jax as flj


# float64 arrays need x64 from the moment the cases below are built (at collection). This is
# process-wide: a test elsewhere that needs x64 off sets it in a `jax.enable_x64(False)` block
# (tests/test_bench_goals.py does); float32 inputs stay float32 either way
jax.config.update("jax_enable_x64", True)


# ----------------------------------------------------------------------------- reference formulas
def _reduce(l, reduction, denom):
    return {"none": l, "sum": jnp.sum(l), "mean": jnp.sum(l) / denom, "batchmean": jnp.sum(l) / denom}[reduction]


def ref_ce(x, t, *, weight=None, axis=-1, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    x = jnp.moveaxis(x, axis, -1)
    C = x.shape[-1]
    logp = jax.nn.log_softmax(x, -1)
    lse = jax.nn.logsumexp(x, -1)
    wv = jnp.ones(C, x.dtype) if weight is None else weight
    eps = label_smoothing
    if jnp.issubdtype(t.dtype, jnp.integer):
        keep = t != ignore_index
        tt = jnp.where(keep, t, 0)
        nll = -jnp.take_along_axis(logp, tt[..., None], -1)[..., 0] * wv[tt]
        smooth = -jnp.sum(logp * wv, -1)
        l = jnp.where(keep, (1 - eps) * nll + eps / C * smooth + z_loss * lse**2, 0.0)
        return _reduce(l, reduction, jnp.sum(jnp.where(keep, wv[tt], 0.0)))
    y = (1 - eps) * jnp.moveaxis(t, axis, -1) + eps / C
    l = -jnp.sum(wv * y * logp, -1) + z_loss * lse**2
    return _reduce(l, reduction, l.size)


def ref_bce_logits(z, y, w=None, pw=None, *, reduction="mean"):
    pwv = 1.0 if pw is None else pw
    l = (1 - y) * z + (1 + (pwv - 1) * y) * jax.nn.softplus(-z)
    return _reduce(l if w is None else l * w, reduction, l.size)


def ref_bce(p, y, w=None, *, reduction="mean"):
    l = -(y * jnp.maximum(jnp.log(p), -100.0) + (1 - y) * jnp.maximum(jnp.log1p(-p), -100.0))
    return _reduce(l if w is None else l * w, reduction, l.size)


def ref_kl(x, t, *, log_target=False, reduction="batchmean"):
    l = jnp.exp(t) * (t - x) if log_target else jax.scipy.special.xlogy(t, t) - t * x
    return _reduce(l, reduction, x.shape[0] if reduction == "batchmean" else l.size)


def ref_mse(x, t, *, reduction="mean"):
    return _reduce((x - t) ** 2, reduction, x.size)


def ref_gnll(x, t, v, *, full=False, eps=1e-6, reduction="mean"):
    v = jnp.asarray(v, x.dtype)
    if v.ndim and v.shape == x.shape[:-1]:
        v = v[..., None]
    v = jnp.maximum(v, eps)  # PyTorch 2.13's clamp (its gradient: the identity, as jnp.maximum above eps)
    l = 0.5 * (jnp.log(v) + (x - t) ** 2 / v) + (0.5 * np.log(2 * np.pi) if full else 0.0)
    return _reduce(jnp.broadcast_to(l, x.shape), reduction, x.size)


rng = np.random.default_rng(0)


def _x(*shape, scale=3.0):
    return jnp.asarray(rng.standard_normal(shape) * scale)


def _probs(*shape, axis=-1):
    return jax.nn.softmax(_x(*shape, scale=1.0), axis)


def _unit(*shape, lo=0.05, hi=0.95):
    return jnp.asarray(lo + (hi - lo) * rng.random(shape))


T6 = jnp.array([0, 4, 2, -100, 1, 3])

# (id, ours, reference, args, kwargs, differentiable argnums)
CASES = [
    ("ce", flj.cross_entropy, ref_ce, (_x(6, 5), T6), {}, (0,)),
    ("ce-weight-smooth-z-sum", flj.cross_entropy, ref_ce, (_x(6, 5), jnp.array([0, 4, 2, 2, 1, 3])),
     dict(weight=_unit(5), label_smoothing=0.2, ignore_index=2, z_loss=0.01, reduction="sum"), (0,)),
    ("ce-axis0-none", flj.cross_entropy, ref_ce, (_x(5, 3, 2), jnp.array([[0, 4], [2, 1], [3, 3]])),
     dict(axis=0, reduction="none"), (0,)),
    ("ce-soft", flj.cross_entropy, ref_ce, (_x(6, 5), _probs(6, 5)), dict(weight=_unit(5), label_smoothing=0.1), (0, 1)),
    ("ce-soft-none", flj.cross_entropy, ref_ce, (_x(4, 5), _probs(4, 5)), dict(reduction="none", z_loss=0.1), (0, 1)),
    ("bce-logits", flj.binary_cross_entropy_with_logits, ref_bce_logits, (_x(4, 5), _unit(4, 5, lo=0, hi=1)), {}, (0, 1)),
    ("bce-logits-w-none", flj.binary_cross_entropy_with_logits, ref_bce_logits,
     (_x(4, 5), _unit(4, 5, lo=0, hi=1)), dict(reduction="none"), (0, 1)),
    ("bce", flj.binary_cross_entropy, ref_bce, (_unit(4, 5), _unit(4, 5, lo=0, hi=1)), dict(reduction="sum"), (0, 1)),
    ("kl", flj.kl_div, ref_kl, (jax.nn.log_softmax(_x(4, 5)), _probs(4, 5)), {}, (0, 1)),
    ("kl-logtarget-none", flj.kl_div, ref_kl, (jax.nn.log_softmax(_x(4, 5)), jax.nn.log_softmax(_x(4, 5))),
     dict(log_target=True, reduction="none"), (0, 1)),
    ("mse", flj.mse_loss, ref_mse, (_x(4, 5), _x(4, 5)), {}, (0, 1)),
    ("mse-bcast-none", flj.mse_loss, ref_mse, (_x(4, 5), _x(5)), dict(reduction="none"), (0, 1)),
    ("gnll", flj.gaussian_nll_loss, ref_gnll, (_x(4, 5), _x(4, 5), _unit(4, 5, lo=0.5, hi=2)), {}, (0, 1, 2)),
    ("gnll-rowvar-full-none", flj.gaussian_nll_loss, ref_gnll, (_x(4, 5), _x(4, 5), _unit(4, lo=0.5, hi=2)),
     dict(full=True, reduction="none"), (0, 1, 2)),
    ("gnll-scalarvar-sum", flj.gaussian_nll_loss, ref_gnll, (_x(4, 5), _x(4, 5), 0.7), dict(reduction="sum"), (0, 1)),
    ("logsumexp", flj.logsumexp, lambda x, **k: jax.nn.logsumexp(x, **k), (_x(4, 5),), dict(axis=1), (0,)),
    ("logsumexp-tuple-keepdims", flj.logsumexp, lambda x, axis, keepdims: jax.nn.logsumexp(x, axis, keepdims=keepdims),
     (_x(3, 4, 2),), dict(axis=(0, 2), keepdims=True), (0,)),
    ("softmax", flj.softmax, jax.nn.softmax, (_x(4, 5),), dict(axis=0), (0,)),
    ("log_softmax", flj.log_softmax, jax.nn.log_softmax, (_x(3, 4, 2),), dict(axis=1), (0,)),
]
IDS = [c[0] for c in CASES]


def _vjps(fn, args, diff, ct=None):
    def f(*d):
        a = list(args)
        for i, v in zip(diff, d):
            a[i] = v
        return fn(*a)

    out, vjp = jax.vjp(f, *[args[i] for i in diff])
    ct = jnp.asarray(rng.standard_normal(out.shape), out.dtype) if ct is None else ct
    return out, vjp(ct), ct


@pytest.fixture(scope="module", params=["buffer_callback", "pure_callback"])
def callback(request):
    """Both host paths: buffer_callback (CPU arrays in place, the default) and pure_callback
    (what other devices and older JAX versions use). Module-scoped, so pytest groups the tests
    by path and JAX's trace caches are cleared only when the path changes."""
    if request.param == "buffer_callback" and flj._buffer_callback is None:  # pragma: no cover
        pytest.skip("this JAX has no jax.experimental.buffer_callback")
    default = flj.USE_BUFFER_CALLBACK
    flj.USE_BUFFER_CALLBACK = request.param == "buffer_callback"
    jax.clear_caches()  # traces made with the other path
    yield request.param
    flj.USE_BUFFER_CALLBACK = default
    jax.clear_caches()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_values_and_vjps_match_jax_formulas(backend, case, callback):
    _, ours, ref, args, kw, diff = case
    out, grads, ct = _vjps(lambda *a: ours(*a, backend=backend, **kw), args, diff)
    ref_out, ref_grads, _ = _vjps(lambda *a: ref(*a, **kw), args, diff, ct)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-13)
    for i, a, b in zip(diff, grads, ref_grads):
        assert a.shape == b.shape, f"VJP of argument {i}"
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=f"VJP of argument {i}")


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("ce", "ce-soft", "bce-logits", "gnll", "softmax",
                                                               "logsumexp")], ids=lambda c: c[0])
def test_jit_value_and_grad_and_vmap(backend, case, callback):
    _, ours, ref, args, kw, diff = case

    def scalar(f):
        return lambda *a: jnp.sum(f(*a, **kw))

    ours_s = scalar(lambda *a, **k: ours(*a, backend=backend, **k))
    ref_s = scalar(ref)
    v, g = jax.jit(jax.value_and_grad(ours_s, argnums=diff))(*args)
    rv, rg = jax.value_and_grad(ref_s, argnums=diff)(*args)
    np.testing.assert_allclose(v, rv, rtol=1e-12)
    for a, b in zip(g, rg):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    # vmap over a batch of first arguments: per-element losses and gradients
    xb = jnp.stack([args[0], args[0] * 0.5 + 0.1])
    in_axes = (0,) + (None,) * (len(args) - 1)
    vb = jax.jit(jax.vmap(jax.value_and_grad(ours_s), in_axes=in_axes))(xb, *args[1:])
    rb = jax.vmap(jax.value_and_grad(ref_s), in_axes=in_axes)(xb, *args[1:])
    np.testing.assert_allclose(vb[0], rb[0], rtol=1e-12)
    np.testing.assert_allclose(vb[1], rb[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype, rtol, atol", [(jnp.float32, 2e-6, 1e-6), (jnp.float16, 2e-3, 2e-3),
                                               (jnp.bfloat16, 1.6e-2, 1.6e-2)], ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("ce", "ce-soft", "bce-logits", "kl", "mse", "gnll",
                                                               "log_softmax")], ids=lambda c: c[0])
def test_low_precision_results_in_the_input_dtype(backend, case, dtype, rtol, atol):
    _, ours, ref, args, kw, diff = case
    low = [a.astype(dtype) if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating) else a for a in args]
    kw_low = {k: v.astype(dtype) if isinstance(v, jax.Array) else v for k, v in kw.items()}
    out, grads, ct = _vjps(lambda *a: ours(*a, backend=backend, **kw_low), low, diff)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    up = [a.astype(jnp.float64) if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating) else a for a in low]
    kw_up = {k: v.astype(jnp.float64) if isinstance(v, jax.Array) else v for k, v in kw_low.items()}
    ref_out, ref_grads, _ = _vjps(lambda *a: ref(*a, **kw_up), up, diff, ct.astype(jnp.float64))
    scale = max(1.0, float(jnp.max(jnp.abs(ref_out))))
    np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, rtol=rtol, atol=atol * scale)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=atol * max(1.0, float(jnp.max(jnp.abs(b)))))


@pytest.mark.parametrize("use_buffers", [True, False], ids=["buffer_callback", "pure_callback"])
def test_cpu_arrays_are_read_and_written_in_place(monkeypatch, use_buffers):
    """Under jit on the CPU the kernel reads JAX's own logits buffer and writes the gradient
    straight into XLA's output buffer (no copy either way); pure_callback hands it copies."""
    if use_buffers and flj._buffer_callback is None:  # pragma: no cover
        pytest.skip("this JAX has no jax.experimental.buffer_callback")
    seen = {}
    real = flj._fl.cross_entropy

    def spy(x, t, **k):
        seen["x"], seen["grad_out"] = np.asarray(x).ctypes.data, k.get("grad_out")
        return real(x, t, **k)

    monkeypatch.setattr(flj._fl, "cross_entropy", spy)
    monkeypatch.setattr(flj, "USE_BUFFER_CALLBACK", use_buffers)
    jax.clear_caches()
    x, t = _x(64, 50).astype(jnp.float32), jnp.asarray(rng.integers(0, 50, 64))
    loss, g = jax.jit(jax.value_and_grad(flj.cross_entropy))(x, t)
    assert (seen["x"] == x.unsafe_buffer_pointer()) is use_buffers
    assert (seen["grad_out"] is not None) is use_buffers
    ref = jax.grad(lambda z: ref_ce(z, t))(x)
    np.testing.assert_allclose(g, ref, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(loss, ref_ce(x, t), rtol=2e-6)
    jax.clear_caches()


def test_weights_and_integer_targets_get_zero_cotangents():
    x, w = _x(6, 5), _unit(5)
    gw = jax.grad(lambda w: flj.cross_entropy(x, T6, weight=w))(w)
    assert np.all(np.asarray(gw) == 0)
    g = jax.grad(lambda x: flj.cross_entropy(x, T6))(x)
    assert g.shape == x.shape


def test_primal_computes_no_gradient(monkeypatch):
    import fastloss.jax as mod

    seen = []
    real = mod._fl.cross_entropy
    monkeypatch.setattr(mod._fl, "cross_entropy", lambda *a, **k: (seen.append(k["return_grad"]), real(*a, **k))[1])
    mod._ce_fn.cache_clear()
    x = _x(3, 4)
    t = jnp.array([0, 1, 2])
    flj.cross_entropy(x, t).block_until_ready()
    jax.grad(flj.cross_entropy)(x, t).block_until_ready()
    assert seen == [False, True]
    mod._ce_fn.cache_clear()


def test_errors_reach_the_caller():
    with pytest.raises(Exception, match="target: expected class indices"):
        flj.cross_entropy(_x(3, 4), jnp.array([0, 9, 1])).block_until_ready()


def test_import_fastloss_jax_leaves_torch_alone():
    import subprocess
    import sys

    code = "import sys, fastloss.jax; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.gpu
@pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()) if jax.devices() else True,
                    reason="needs a JAX GPU device")
def test_gpu_arrays_are_computed_on_the_host_and_answered_on_the_device():  # pragma: no cover - GPU only
    x = jax.device_put(_x(6, 5), jax.devices("gpu")[0])
    loss, g = jax.jit(jax.value_and_grad(flj.cross_entropy))(x, T6)
    assert g.devices() == x.devices()
    np.testing.assert_allclose(loss, ref_ce(np.asarray(x), T6), rtol=1e-12)
