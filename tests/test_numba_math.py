"""Tests of the Numba backend's own pieces: the vectorizable math helpers (accuracy, specials,
vectorization), threads and concurrent calls, and the serial/parallel twins of the kernels.

Every kernel entry point against the NumPy reference (every layout, option and special row)
is ``tests/test_kernels.py``, on every backend.
"""
from __future__ import annotations

import re
import threading

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from fastloss._backends import numba_backend as nb  # noqa: E402
from fastloss._backends import numpy_backend as ref  # noqa: E402
from fastloss._backends.numba_backend import _elementwise as nbe  # noqa: E402
from fastloss._backends.numba_backend import _jit as nbj  # noqa: E402
from fastloss._backends.numba_backend import _math as nm  # noqa: E402
from fastloss._backends.numba_backend import _rows as nbr  # noqa: E402

_FM = {"contract", "arcp", "nsz", "reassoc", "afn"}


# ----------------------------------------------------------------------------- math helpers
# The helpers are called from a loop compiled with the same fast-math flags as the kernels,
# so these tests also check that the callers' ``reassoc`` does not leak into the helpers.
@numba.njit(fastmath=_FM, error_model="numpy")
def _map_exp(x, o):
    for i in range(x.size):
        o[i] = nm.vexp(x[i])


@numba.njit(fastmath=_FM, error_model="numpy")
def _map_log(x, o):
    for i in range(x.size):
        o[i] = nm.vlog(x[i])


@numba.njit(fastmath=_FM, error_model="numpy")
def _map_log1p(x, o):
    for i in range(x.size):
        o[i] = nm.vlog1p(x[i])


@numba.njit(fastmath=_FM, error_model="numpy")
def _map_softplus(x, o):
    for i in range(x.size):
        o[i] = nm.vsoftplus(x[i])


def _apply(f, x):
    o = np.empty_like(x)
    f(x, o)
    return o


def _max_ulp(got, exact, dt):
    """Max error in units of the last place of ``dt`` (exact: a longdouble reference)."""
    exact = np.asarray(exact, dtype=np.longdouble)
    with np.errstate(over="ignore"):
        rounded = exact.astype(dt)
    ok = np.isfinite(rounded)
    with np.errstate(over="ignore"):
        sp = np.spacing(np.abs(rounded[ok])).astype(np.longdouble)
    ulp = np.maximum(sp,
                     np.longdouble(np.finfo(dt).smallest_subnormal))
    return float(np.max(np.abs(got[ok].astype(np.longdouble) - exact[ok]) / ulp))


DTYPES = [np.float32, np.float64]


def _same(a, b):
    """Bitwise-equal values, NaN == NaN."""
    return np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("dt", DTYPES)
def test_exp_accuracy_full_range(dt):
    fi = np.finfo(dt)
    rng = np.random.default_rng(1)
    lo, hi = np.log(float(fi.smallest_subnormal)) - 2, np.log(float(fi.max)) + 2
    x = np.concatenate([rng.uniform(lo, hi, 400_000), rng.normal(0, 2, 100_000),
                        rng.uniform(-1e-6, 1e-6, 1000)]).astype(dt)
    got = _apply(_map_exp, x)
    exact = np.exp(x.astype(np.longdouble))
    assert _max_ulp(got, exact, dt) <= 2.5
    # overflow / underflow boundaries and subnormal results are as NumPy's correctly-rounded-ish exp
    with np.errstate(over="ignore", under="ignore"):
        npx = np.exp(x)
    assert np.array_equal(np.isinf(got), np.isinf(npx))
    assert np.array_equal(got == 0, npx == 0) or _max_ulp(got, exact, dt) <= 2.5


@pytest.mark.parametrize("dt", DTYPES)
def test_exp_specials(dt):
    fi = np.finfo(dt)
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, float(fi.max), -float(fi.max),
                  float(np.log(fi.max)) * 1.01, float(np.log(fi.smallest_subnormal)) - 1.0],
                 dtype=dt)
    got = _apply(_map_exp, x)
    assert _same(got, np.array([1, 1, np.inf, 0, np.nan, np.inf, 0, np.inf, 0], dtype=dt))
    # subnormal results: gradual underflow, not flushed to zero
    xs = np.array([np.log(float(fi.tiny)) - 3.0], dtype=dt)
    r = _apply(_map_exp, xs)[0]
    assert 0 < r < fi.tiny
    assert abs(float(r) - float(np.exp(np.longdouble(xs[0])))) <= float(fi.smallest_subnormal)


@pytest.mark.parametrize("dt", DTYPES)
def test_log_accuracy_full_range(dt):
    fi = np.finfo(dt)
    rng = np.random.default_rng(2)
    lo, hi = np.log(float(fi.smallest_subnormal)), np.log(float(fi.max))
    x = np.concatenate([np.exp(rng.uniform(lo, hi, 400_000)), rng.uniform(0.5, 2.0, 100_000),
                        1 + rng.uniform(-1e-5, 1e-5, 1000)]).astype(dt)
    x = x[(x > 0) & np.isfinite(x)]
    got = _apply(_map_log, x)
    assert _max_ulp(got, np.log(x.astype(np.longdouble)), dt) <= 1.5


@pytest.mark.parametrize("dt", DTYPES)
def test_log_specials(dt):
    fi = np.finfo(dt)
    x = np.array([0.0, -0.0, -1.0, np.inf, -np.inf, np.nan, 1.0, fi.smallest_subnormal, fi.max],
                 dtype=dt)
    got = _apply(_map_log, x)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = np.log(x.astype(np.longdouble)).astype(dt)
    assert _same(got[:7], want[:7])
    assert _max_ulp(got[7:], np.log(x[7:].astype(np.longdouble)), dt) <= 1.0


@pytest.mark.parametrize("dt", DTYPES)
def test_log1p_and_softplus(dt):
    fi = np.finfo(dt)
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.uniform(-1, 5, 200_000),
                        np.exp(rng.uniform(np.log(float(fi.tiny)), 3, 200_000))]).astype(dt)
    x = x[x > -1]
    assert _max_ulp(_apply(_map_log1p, x), np.log1p(x.astype(np.longdouble)), dt) <= 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        sp = np.array([-1.0, np.inf, np.nan, 0.0], dtype=dt)
        assert _same(_apply(_map_log1p, sp), np.log1p(sp))
    z = np.concatenate([rng.uniform(-150, 150, 200_000), rng.normal(0, 1, 10_000),
                        [fi.max, -fi.max, np.inf, -np.inf, 0.0]]).astype(dt)
    got = _apply(_map_softplus, z)
    zl = z.astype(np.longdouble)
    with np.errstate(over="ignore", invalid="ignore"):
        exact = np.maximum(zl, 0) + np.log1p(np.exp(-np.abs(zl)))
    assert _max_ulp(got, exact, dt) <= 3.0
    assert _same(got[-3:], np.array([np.inf, 0.0, np.log(2)], dtype=dt))
    assert np.isnan(_apply(_map_softplus, np.array([np.nan], dtype=dt))[0])


@numba.njit(fastmath=_FM, error_model="numpy")
def _map_log1p_unit_recip(x, o, r):
    for i in range(x.size):
        o[i], r[i] = nm.vlog1p_unit_recip(x[i])


@pytest.mark.parametrize("dt", DTYPES)
def test_log1p_on_the_unit_interval(dt):
    """``vlog1p_unit_recip`` (BCE with logits' softplus, on ``e = exp(-|z|)`` in [0, 1]): within
    2 ulp of log1p over [0, 1] -- tiny, subnormal and 1 included -- and ``1 / (1 + x)``
    within 1.5 ulp (1 + x is rounded before the division); 0 gives exactly (0, 1), NaN NaN."""
    fi = np.finfo(dt)
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.uniform(0, 1, 300_000), np.exp(rng.uniform(np.log(float(fi.smallest_subnormal)), 0,
                                                                       100_000)),
                        [0.0, 1.0, float(fi.smallest_subnormal), float(fi.tiny), float(fi.eps)]]).astype(dt)
    o, r = np.empty_like(x), np.empty_like(x)
    _map_log1p_unit_recip(x, o, r)
    xl = x.astype(np.longdouble)
    assert _max_ulp(o, np.log1p(xl), dt) <= 2.0
    assert _max_ulp(r, 1 / (1 + xl), dt) <= 1.5
    s = np.array([0.0, np.nan], dtype=dt)
    o, r = np.empty_like(s), np.empty_like(s)
    _map_log1p_unit_recip(s, o, r)
    assert o[0] == 0.0 and r[0] == 1.0 and np.isnan(o[1]) and np.isnan(r[1])


@numba.njit(fastmath=_FM, error_model="numpy")
def _map_softcap(x, cap, inv, o, d):
    for i in range(x.size):
        o[i], d[i] = nm.vsoftcap(x[i], cap, inv)


@pytest.mark.parametrize("cap", [30.0, 1.0, 0.5])
@pytest.mark.parametrize("dt", DTYPES)
def test_softcap_accuracy(dt, cap):
    """``vsoftcap(x, cap, 1/cap) = (cap tanh(x/cap), 1 - tanh(x/cap)**2)`` within a few ulp of
    each result for every x: tiny |x| << cap included, where ``(1 - e) / (1 + e)`` from an exp
    cancels (the numba backend's earlier form: 4e-7 absolute at x ~ 1e-3, cap 30 -- ~1.6e7 ulp
    of the result).  The derivative ``~4 e^{-2|u|}`` (``u = x / cap``) turns the roundings of
    ``1 / cap`` and of ``-2|x| / cap`` (~1 ulp of the argument together) into a relative error
    of ~2|u| ulp, which no formula working in the dtype avoids: its bound grows with ``|u|``.  (``x`` near the smallest normal is left out: ``-2|x|/cap`` is subnormal there, and
    a result of 1e-38 a few ulp more off.)"""
    fi = np.finfo(dt)
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(0, s, 40_000) for s in (1e-30, 1e-6, 1e-3, 0.1, 1.0, 8.0, 100.0)]
                       + [[0.0, -0.0, float(fi.max), -float(fi.max)]]).astype(dt)
    capd = dt(cap)
    inv = dt(1.0) / capd
    o, d = np.empty_like(x), np.empty_like(x)
    _map_softcap(x, capd, inv, o, d)
    xl = x.astype(np.longdouble)
    u = xl / np.longdouble(capd)
    assert _max_ulp(o, np.longdouble(capd) * np.tanh(u), dt) <= 6.0
    with np.errstate(over="ignore"):
        dex = 1 / np.cosh(u) ** 2
    au = np.abs(u)
    # below e^-87 (float32) / e^-708 the derivative is flushed to 0 (the clamp that keeps 2^k a
    # normal number): an absolute error under 4 e^-87 = 7e-38, checked apart
    lo = 87.0 if dt == np.float32 else 708.0
    ok = 2 * au < lo - 1
    assert np.all(d[~ok] >= 0) and np.all(d[~ok] <= 4 * np.exp(-(lo - 1)))
    err = np.abs(d[ok].astype(np.longdouble) - dex[ok]) / np.spacing(dex[ok].astype(dt)).astype(np.longdouble)
    assert np.all(err <= 6.0 + 4.0 * au[ok]), float(np.max(err - 4.0 * au[ok]))
    assert np.array_equal(np.signbit(o[x == 0]), np.signbit(x[x == 0]))  # -0.0 keeps its sign
    s = np.array([np.inf, -np.inf, np.nan], dtype=dt)
    o, d = np.empty_like(s), np.empty_like(s)
    _map_softcap(s, capd, inv, o, d)
    assert o[0] == capd and o[1] == -capd and d[0] == 0.0 and d[1] == 0.0
    assert np.isnan(o[2]) and np.isnan(d[2])


# ----------------------------------------------------------------------------- vectorization
def _packed_ops(disp):
    asm = "\n".join(disp.inspect_asm(sig) for sig in disp.signatures)
    return len(re.findall(r"\bv(?:fmadd|fmsub|fnmadd|mul|add|sub|max|blendv)\w*p[sd]\s[^\n]*[yz]mm", asm))


@numba.njit(**nbj._JIT)
def _compile_helpers(x, g):
    m = x[0].max()
    o = nbr._sumexp(x, 0, x.shape[1], m, True)
    o += nbr._sumexp_store(x, 0, x.shape[1], m, True, g)
    r, k = x.shape
    nl = np.empty((r, 0), x.dtype)  # no losses wanted
    o += nbe._bcel_block(x, x, None, None, 0, 0.0, nl, g, None, 1.0, None, 0, r, 0, k)
    o += nbe._mse_block(x, x, None, None, 0, 0.0, nl, g, None, 1.0, None, 0, r, 0, k)
    o += nbe._kl_block(x, np.abs(x), None, None, 0, 0.0, nl, g, None, 1.0, None, 0, r, 0, k)
    o += nbe._kl_log_block(x, x, None, None, 0, 0.0, nl, g, None, 1.0, None, 0, r, 0, k)
    return o


@pytest.mark.parametrize("dt", DTYPES)
def test_hot_kernels_are_vectorized(dt):
    """The compiled hot loops use packed ymm/zmm arithmetic (SIMD), not scalar libm calls."""
    rng = np.random.default_rng(8)
    x = rng.normal(0, 1, (4, 64)).astype(dt)
    t = rng.integers(0, 64, 4).astype(np.int64)
    # The entry kernels may come from the disk cache, which does not compile the (uncached)
    # helpers in this process: compile them here through an uncached caller.
    _compile_helpers(x, np.zeros_like(x))
    # (the row maximum, _rowmax, is not in this list: LLVM keeps it scalar -- see its docstring)
    # (_mse_block is a few arithmetic ops per element: a handful of packed ops is the whole
    # loop; before its loss sum was blocked in the compute dtype it had none)
    # (KL: both formulas, the exp of log-targets and the log of targets, vectorized -- a branch
    # on log_target or a log inside a select kept it scalar, 5x slower)
    # (the elementwise blocks are one loop, _make_ew_block, around each loss's element function)
    for disp, least in ((nbr._sumexp, 8), (nbr._sumexp_store, 8), (nbe._bcel_block, 8),
                        (nbe._mse_block, 3), (nbe._kl_block, 8), (nbe._kl_log_block, 8)):
        assert disp.signatures, disp
        assert _packed_ops(disp) >= least, disp.py_func.__name__
    # the exp inside the cross-entropy row is inlined (no call to a libm exp)
    asm = "\n".join(nbr._sumexp.inspect_asm(s) for s in nbr._sumexp.signatures)
    assert "exp" not in " ".join(re.findall(r"call\w*\s+\S+", asm))


# ----------------------------------------------------------------------------- threads
def test_set_num_threads_and_concurrent_calls():
    nmax = numba.config.NUMBA_NUM_THREADS
    with pytest.raises(ValueError):
        nb.set_num_threads(0)
    rng = np.random.default_rng(9)
    x = rng.normal(0, 2, (256, 700)).astype(np.float32)
    t = rng.integers(0, 700, 256).astype(np.int64)
    want_l, want_g = np.zeros(256), np.zeros_like(x)
    nb.cross_entropy(x, t, None, -100, 0.0, 0.0, 0.0, want_l, None, want_g, 1.0)
    want_s = nb.bce_with_logits(x, np.abs(np.tanh(x)), None, None, None, None, 1.0, None)
    errors = []

    def worker(seed):
        try:
            for _ in range(20):
                l, g = np.zeros(256), np.zeros_like(x)
                nb.cross_entropy(x, t, None, -100, 0.0, 0.0, 0.0, l, None, g, 1.0)
                s = nb.bce_with_logits(x, np.abs(np.tanh(x)), None, None, None, None, 1.0, None)
                if not (np.array_equal(l, want_l) and np.array_equal(g, want_g) and abs(s - want_s) <= 1e-9 * abs(want_s)):
                    errors.append(seed)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    try:
        nb.set_num_threads(1)
        assert nb.get_num_threads() == 1
        ths = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        nb.set_num_threads(nmax)
        ths = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
    finally:
        nb.set_num_threads(nmax)
    assert not errors, errors
    assert numba.threading_layer() in ("omp", "tbb") or nbj._serialize


# ----------------------------------------------------------------------------- serial twins
@pytest.mark.parametrize("dt", DTYPES)
def test_serial_and_parallel_twins_agree_and_huge_logits(dt):
    """Both twins of the kernels give the reference values, huge logits included (the loss is
    ``log s - (x[t] - m)``, which ``reassoc`` must not turn into ``lse - x[t]``)."""
    a, b = (3e38, 2.9e38) if dt == np.float32 else (1e300, 0.9e300)
    rng = np.random.default_rng(11)
    cases = [np.array([[a, b, 0], [a, b, 0], [a, a, a]], dt),  # few classes: small-C path
             np.concatenate([np.array([[a, a, a]], dt), np.full((1, 40), a, dt)], 1)]
    try:
        for x in cases:
            n, c = x.shape
            t = np.arange(n) % c
            want_l, want_g, want_ls = np.zeros(n), np.zeros_like(x), np.zeros_like(x)
            ref.cross_entropy(x, t, None, -100, 0.0, 0.0, 0.0, want_l, None, want_g, np.ones(n))
            ref.log_softmax(x, want_ls)
            for mode in ("serial", "parallel"):
                nbj._force_mode = mode
                l, g, ls = np.zeros(n), np.zeros_like(x), np.zeros_like(x)
                nb.cross_entropy(x, t, None, -100, 0.0, 0.0, 0.0, l, None, g, np.ones(n))
                nb.log_softmax(x, ls)
                np.testing.assert_allclose(l, want_l, rtol=1e-6, atol=1e-6, err_msg=mode)
                np.testing.assert_allclose(g, want_g, atol=1e-6, err_msg=mode)
                np.testing.assert_allclose(ls, want_ls, rtol=1e-6, atol=1e-6, err_msg=mode)
    finally:
        nbj._force_mode = None


# ----------------------------------------------------------------------------- exp of x <= 0
@numba.njit(fastmath=_FM, error_model="numpy")
def _map_expn(x, o):
    for i in range(x.size):
        o[i] = nm.vexpn(x[i])


@pytest.mark.parametrize("dt", DTYPES)
def test_expn_accuracy_nonpositive_range(dt):
    """exp for x <= 0 (one scaling factor): ~1 ulp down to the subnormal results."""
    fi = np.finfo(dt)
    rng = np.random.default_rng(11)
    lo = np.log(float(fi.smallest_subnormal)) - 2
    x = np.concatenate([rng.uniform(lo, 0, 400_000), -np.abs(rng.normal(0, 2, 100_000)),
                        -rng.uniform(0, 1e-6, 1000)]).astype(dt)
    got = _apply(_map_expn, x)
    exact = np.exp(x.astype(np.longdouble))
    assert _max_ulp(got, exact, dt) <= 2.5
    # it agrees with the general exp to within an ulp everywhere, and exactly at most points
    gen = _apply(_map_exp, x)
    assert _max_ulp(got, gen.astype(np.longdouble), dt) <= 1.0
    assert np.mean(got == gen) > 0.99


@pytest.mark.parametrize("dt", DTYPES)
def test_expn_specials(dt):
    fi = np.finfo(dt)
    x = np.array([0.0, -0.0, -np.inf, np.nan, -float(fi.max), float(np.log(fi.smallest_subnormal)) - 1.0,
                  np.inf], dtype=dt)
    got = _apply(_map_expn, x)
    assert _same(got, np.array([1, 1, 0, np.nan, 0, 0, np.inf], dtype=dt))
    xs = np.array([np.log(float(fi.tiny)) - 3.0, np.log(float(fi.tiny)) - 10.0], dtype=dt)
    r = _apply(_map_expn, xs)
    assert np.all((0 < r) & (r < fi.tiny))  # gradual underflow, not flushed to zero
    assert np.all(np.abs(r.astype(np.longdouble) - np.exp(xs.astype(np.longdouble)))
                  <= np.longdouble(fi.smallest_subnormal))


def test_expn_vectorizes():
    x = np.linspace(-50, 0, 64, dtype=np.float32)
    _apply(_map_expn, x)
    asm = _map_expn.inspect_asm(_map_expn.signatures[0])
    assert re.search(r"vfmadd\w+\s+%ymm", asm) or re.search(r"vfmadd\w+\s+%zmm", asm), "expn loop not vectorized"
