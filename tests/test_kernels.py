"""Every kernel entry point of the backend protocol (:mod:`fastloss._backends._protocol`),
called directly as the public layer calls it, against the NumPy reference backend -- on every
backend under test (the ``backend`` fixture; the CUDA backend under the simulator, where its
host entry points offload).

Normalized 2-D operands (class axis last) in every memory layout (C, Fortran, strided,
reversed, stride-0 broadcast), both compute dtypes, the optional operands, gradients in place
(over the first input), loss only, per-row and scalar gradient scales, and rows of every
special kind (+-inf, NaN, huge logits).  The shapes reach each backend's code paths: few
classes (the column-block kernels), Fortran-order columns, several row blocks with a partial
last one, long rows (over the parallel/serial thresholds) and empty batches.  Under the CUDA
simulator (every GPU thread a Python thread) the shapes shrink (``pick``).

Backend-specific suites keep only what is specific: the math helpers' accuracy and
vectorization (``test_numba_math.py``, ``test_cython_build.py``), threads, the build, the
simulator's device paths (``test_cuda_sim.py``).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import fastloss as fl
from conftest import SIM, _backend_list, pick
from fastloss._backends import get as get_backend
from fastloss._backends import numpy_backend as R

DTYPES = (np.float32, np.float64)
# the heaviest loops under the simulator in float32 only (it runs the kernels' Python, where
# the dtype changes no code path; on a GPU both dtypes run)
CE_DTYPES = pick(DTYPES, (np.float32,))
# softcap: none, and a cap (3.0) that bends the test logits (normal, x 3, with inf/-inf/NaN/huge rows)
CAPS = (0.0, 3.0)


@pytest.fixture(scope="module", params=[b for b in _backend_list() if b != "numpy"])
def K(request):
    """The kernel module of each backend under test but the reference itself (as the
    ``backend`` fixture: a listed backend that is unavailable fails, never skips)."""
    st = fl.backends().get(request.param)
    if st is None or not st.available:
        pytest.fail(f"backend {request.param!r} was listed in FASTLOSS_TEST_BACKENDS but is unavailable: "
                    f"{'unknown backend' if st is None else st.reason}", pytrace=False)
    return get_backend(request.param)


def _close(got, want, dt, what, mag=1.0):
    """The reference's value at the contract's tolerance, NaN exactly where the reference's.

    ``mag`` scales the absolute tolerance where a result is a small difference of larger terms
    (the magnitude of those terms): both sides round each term once."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want)), f"{what}: NaN positions differ"
    rtol, atol = (1e-12, 1e-13) if dt == np.float64 else (2e-6, 1e-6)
    mag = np.asarray(mag, np.float64)  # >= 1: dividing keeps rtol, scales atol by mag
    with np.errstate(invalid="ignore"):  # inf vs inf is compared as equal, not as inf - inf
        np.testing.assert_allclose(got / mag, want / mag, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


def _layouts(a):
    """The same values in C order, Fortran order, a strided view and a reversed view (under
    the simulator C order and the strided view only: each call there costs ~0.1 s)."""
    yield "C", a
    if not SIM:
        yield "F", np.asfortranarray(a)
    big = np.zeros((a.shape[0] * 2, a.shape[1] * 3), a.dtype)
    big[::2, ::3] = a
    yield "strided", big[::2, ::3]
    if not SIM:
        yield "reversed", np.ascontiguousarray(a[::-1, ::-1])[::-1, ::-1]


def _writable_copy(name, xv):
    """A copy of layout ``name`` that a kernel may overwrite (in place)."""
    if name == "strided":
        big = np.zeros((xv.shape[0] * 2, xv.shape[1] * 3), xv.dtype)
        big[::2, ::3] = xv
        return big[::2, ::3]
    return xv.copy(order="K")


def _logits(n, c, dt, rng, specials=True):
    x = (rng.standard_normal((n, c)) * 3).astype(dt)
    if specials and n >= 4 and c >= 3:
        x[1, 2] = -np.inf  # a masked class
        x[2, :] = -np.inf  # a row of only -inf
        x[3, 1] = np.inf  # a row holding +inf
    return x


def _special_rows(n, c, dt, rng):
    """Logits with one row of each special kind, as far as ``n`` reaches (the reference's
    semantics are the contract)."""
    x = (rng.standard_normal((n, c)) * 3).astype(dt)
    big = 3e38 if dt == np.float32 else 1e300
    rows = {
        1: lambda r: r.fill(-np.inf),  # only -inf
        2: lambda r: r.__setitem__(0, np.inf),  # +inf with finite others
        3: lambda r: r.fill(np.inf),  # only +inf
        4: lambda r: r.__setitem__(-1, np.nan),  # NaN with a finite max
        5: lambda r: r.fill(big),  # huge equal logits: loss log C
        6: lambda r: (r.fill(-big), r.__setitem__(0, -0.99 * big)),
        7: lambda r: r.fill(800.0),  # exp(x) overflows without the shift
        8: lambda r: r.__setitem__(0, -np.inf),  # a masked class (the target of row 8)
    }
    for i, f in rows.items():
        if i < n:
            f(x[i])
    if n > 301:  # in a later row block
        x[300, :] = np.nan
        x[301, 0] = np.inf
        x[301, -1] = 1e30  # +inf max with a large finite entry: exp(x - 0) overflows
    return x


def _special_targets(n, c, rng, ignore):
    t = rng.integers(0, c, n)
    if n > 12:
        t[8] = 0  # target logit -inf -> loss +inf, finite gradient
        t[9] = ignore
        t[10:n:7] = ignore  # ignored rows all over the blocks
        t[12] = ignore
    return t


# ----------------------------------------------------------------------------- row-wise
ROW_SHAPES = pick([(5, 7), (3, 1), (4, 3000), (0, 5), (2, 5000), (37, 50)], [(5, 7), (3, 1), (0, 5), (4, 40)])


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_normalizers(K, dt, shape):
    rng = np.random.default_rng(4)
    n, c = shape
    x = _logits(n, c, dt, rng)
    for name, xv in _layouts(x):
        want = np.empty(n, dt)
        got = np.empty(n, dt)
        R.logsumexp(x, want)
        K.logsumexp(xv, got)
        _close(got, want, dt, f"logsumexp {name}")
        for fn in ("softmax", "log_softmax"):
            want = np.empty((n, c), dt)
            getattr(R, fn)(x, want)
            for order in "CF":
                got = np.empty((n, c), dt, order=order)
                getattr(K, fn)(xv, got)
                _close(got, want, dt, f"{fn} {name} out={order}")
            xi = _writable_copy(name, xv)  # in place: out is x
            getattr(K, fn)(xi, xi)
            _close(xi, want, dt, f"{fn} in place {name}")


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", pick([(5, 7), (4, 3000), (0, 3), (37, 50)], [(5, 7), (0, 3)]))
def test_softmax_backward(K, dt, shape):
    rng = np.random.default_rng(5)
    n, c = shape
    y = np.empty((n, c), dt)
    R.softmax(_logits(n, c, dt, rng, specials=False), y)
    ly = np.log(y)
    g = rng.standard_normal((n, c)).astype(dt)
    for fn, yy in (("softmax_backward", y), ("log_softmax_backward", ly)):
        want = np.empty((n, c), dt)
        getattr(R, fn)(g, yy, want)
        for (gn, gv), (yn, yv) in itertools.product(_layouts(g), _layouts(yy)):
            got = np.empty((n, c), dt)
            getattr(K, fn)(gv, yv, got)
            _close(got, want, dt, f"{fn} g={gn} y={yn}")
        gi = g.copy()  # grad in place: out is the incoming gradient
        getattr(K, fn)(gi, yy, gi)
        _close(gi, want, dt, f"{fn} in place")


# sharded classes: (rows, all classes, the shards' [start, stop) boundaries)
SHARD_CASES = pick([(37, 50, (0, 20, 50)), (600, 9, (0, 1, 5, 9)), (4, 3000, (0, 1000, 2999, 3000)), (0, 5, (0, 2, 5))],
                   [(14, 9, (0, 1, 5, 9)), (4, 40, (0, 25, 40))])


@pytest.mark.parametrize("dt", CE_DTYPES)
@pytest.mark.parametrize("n,c,cuts", SHARD_CASES)
def test_cross_entropy_shard(K, dt, n, c, cuts):
    """Every shard of the classes (one-class shards, the first, a middle and the last) against
    the reference's ``cross_entropy_shard``, given the reference's global lse of the capped
    logits: every option, special rows, both gradient scales, every layout, in place, loss only."""
    rng = np.random.default_rng(40 + c)
    x = _special_rows(n, c, dt, rng)
    w = (rng.random(c) + 0.5).astype(dt)
    gs_rows = rng.standard_normal(n)
    for ignore, weight, eps, z, cap in itertools.product((-100, 1), (None, w), (0.0, 0.1), pick((0.0, 1e-3), (1e-3,)),
                                                         CAPS):
        t = _special_targets(n, c, rng, ignore)
        lse = np.empty(n)
        with np.errstate(all="ignore"):
            R.cross_entropy(x, t, weight, ignore, eps, z, cap, np.empty(n), lse, None, 1.0)
        for a, b in zip(cuts[:-1], cuts[1:]):
            xs = np.ascontiguousarray(x[:, a:b])
            what = f"shard [{a}, {b}) of {c} ignore={ignore} weight={weight is not None} eps={eps} z={z} cap={cap}"
            want_l, want_g = np.empty(n), np.empty((n, b - a), dt)
            with np.errstate(all="ignore"):
                R.cross_entropy_shard(xs, t, weight, ignore, eps, z, cap, lse, a, c, want_l, want_g, gs_rows)
            for name, xv in _layouts(xs):
                for gs in pick((gs_rows, np.broadcast_to(0.5, (n,))), (gs_rows,)):
                    wl, wg = want_l, want_g
                    if gs is not gs_rows:
                        wl, wg = np.empty(n), np.empty((n, b - a), dt)
                        with np.errstate(all="ignore"):
                            R.cross_entropy_shard(xs, t, weight, ignore, eps, z, cap, lse, a, c, wl, wg, gs)
                    got_l, got_g = np.full(n, 7.0), np.full((n, b - a), 7, dt, order="F" if name == "F" else "C")
                    K.cross_entropy_shard(xv, t, weight, ignore, eps, z, cap, lse, a, c, got_l, got_g, gs)
                    _close(got_l, wl, dt, f"loss {name} {what}", mag=1 + np.abs(np.nan_to_num(lse)))
                    _close(got_g, wg, dt, f"grad {name} {what}")
                    assert np.all(got_g[t == ignore] == 0) and np.all(got_l[t == ignore] == 0)
                xi = _writable_copy(name, xv)
                got_l = np.zeros(2 * n)[::2]  # a strided loss output
                K.cross_entropy_shard(xi, t, weight, ignore, eps, z, cap, lse, a, c, got_l, xi, gs_rows)  # in place
                _close(got_l, want_l, dt, f"loss in place {name} {what}", mag=1 + np.abs(np.nan_to_num(lse)))
                _close(xi, want_g, dt, f"grad in place {name} {what}")
                got_l = np.full(n, 7.0)
                K.cross_entropy_shard(xv, t, weight, ignore, eps, z, cap, lse, a, c, got_l, None, 1.0)
                _close(got_l, want_l, dt, f"loss without grad {name} {what}", mag=1 + np.abs(np.nan_to_num(lse)))


@pytest.mark.parametrize("dt", CE_DTYPES)
@pytest.mark.parametrize("shape", pick([(5, 7), (3, 1), (6, 3000), (37, 50)], [(5, 7), (3, 1)]))
def test_cross_entropy_hard(K, dt, shape):
    rng = np.random.default_rng(6)
    n, c = shape
    x = _logits(n, c, dt, rng)
    t = rng.integers(0, c, n)
    t[0] = -100  # ignored
    if c >= 3 and n >= 4:
        t[1] = 2  # target logit -inf -> loss +inf, finite gradient
    w = (rng.random(c) + 0.5).astype(dt)
    for weight, eps, z, cap in itertools.product(pick((None, w, np.broadcast_to(w[:1], (c,))), (None, w)),
                                                 (0.0, 0.1), pick((0.0, 1e-3), (1e-3,)), CAPS):
        gs = rng.random(n)
        want_l, want_g, want_lse = np.empty(n), np.empty((n, c), dt), np.empty(n)
        R.cross_entropy(x, t, weight, -100, eps, z, cap, want_l, want_lse, want_g, gs)
        want_g[0] = 0  # the protocol: zeros for an ignored row
        for name, xv in _layouts(x):
            what = f"{name} weight={weight is not None} eps={eps} z={z} cap={cap}"
            got_l, got_g = np.empty(n), np.empty((n, c), dt, order="F" if name == "F" else "C")
            K.cross_entropy(xv, t, weight, -100, eps, z, cap, got_l, None, got_g, gs)
            _close(got_l, want_l, dt, "loss " + what)
            _close(got_g, want_g, dt, "grad " + what)
            xi = _writable_copy(name, xv)
            got_lse = np.zeros(2 * n)[::2]  # a strided lse output, ignored rows included
            K.cross_entropy(xi, t, weight, -100, eps, z, cap, got_l, got_lse, xi, gs)  # in place
            _close(got_l, want_l, dt, "loss in place " + what)
            _close(xi, want_g, dt, "grad in place " + what)
            _close(got_lse, want_lse, dt, "lse in place " + what)
            got_l2, got_lse = np.empty(n), np.empty(n)
            K.cross_entropy(xv, t, weight, -100, eps, z, cap, got_l2, got_lse, None, 1.0)
            _close(got_l2, want_l, dt, "loss without grad " + what)
            _close(got_lse, want_lse, dt, "lse without grad " + what)
        if n >= 4 and c >= 3 and not cap:
            assert got_l[1] == np.inf and np.isfinite(xi[1]).all()
            if eps == 0 and z == 0:
                assert np.isnan(got_l[2])  # a row of only -inf, as the reference


@pytest.mark.parametrize("dt", CE_DTYPES)
@pytest.mark.parametrize("shape", pick([(5, 7), (4, 3000), (37, 50)], [(5, 7)]))
def test_cross_entropy_soft(K, dt, shape):
    rng = np.random.default_rng(7)
    n, c = shape
    x = _logits(n, c, dt, rng)
    y = rng.random((n, c)).astype(dt)
    y /= y.sum(axis=1, keepdims=True)
    y[0, :2] = 0
    w = (rng.random(c) + 0.5).astype(dt)
    for weight, eps, z, cap in itertools.product((None, w), (0.0, 0.2), pick((0.0, 1e-3), (1e-3,)), CAPS):
        gs = np.full(n, 0.25)
        want_l, want_g, want_lse = np.empty(n), np.empty((n, c), dt), np.empty(n)
        R.cross_entropy_soft(x, y, weight, eps, z, cap, want_l, want_lse, want_g, gs)
        for (xn, xv), (yn, yv) in itertools.product(_layouts(x), _layouts(y)):
            what = f"x={xn} y={yn} weight={weight is not None} eps={eps} z={z} cap={cap}"
            got_l, got_g, got_lse = np.empty(n), np.empty((n, c), dt), np.empty(n)
            K.cross_entropy_soft(xv, yv, weight, eps, z, cap, got_l, got_lse, got_g, np.broadcast_to(0.25, (n,)))
            _close(got_l, want_l, dt, "loss " + what)
            _close(got_g, want_g, dt, "grad " + what)
            _close(got_lse, want_lse, dt, "lse " + what)
        what = f"weight={weight is not None} eps={eps} z={z} cap={cap}"
        xi = x.copy()
        K.cross_entropy_soft(xi, y, weight, eps, z, cap, got_l, None, xi, 0.25)  # in place, scalar scale
        _close(got_l, want_l, dt, "loss in place " + what)
        _close(xi, want_g, dt, "grad in place " + what)
        K.cross_entropy_soft(x, y, weight, eps, z, cap, got_l, got_lse, None, 1.0)
        _close(got_l, want_l, dt, "loss without grad " + what)
        _close(got_lse, want_lse, dt, "lse without grad " + what)


@pytest.mark.parametrize("dt", CE_DTYPES)
@pytest.mark.parametrize("n,c", pick([(0, 5), (1, 3), (5, 7), (700, 10), (9000, 10), (3000, 3), (300, 500)],
                                     [(0, 5), (1, 3), (13, 4)]))
def test_cross_entropy_total(K, dt, n, c):
    """``loss=None`` (a reduced loss): every cross-entropy entry point returns the float64 total
    of the reference's row losses, and the same gradient and lse as with rows -- the few-classes
    kernels (summing per block of rows: one block, several, a partial last one, parallel
    sizes, special rows) and the row kernels; ``None`` when the rows are asked for."""
    rng = np.random.default_rng(11)
    x = _special_rows(n, c, dt, rng) if n > 12 else _logits(n, c, dt, rng, specials=False)
    y = rng.random((n, c)).astype(dt)
    y /= np.maximum(y.sum(axis=1, keepdims=True), 1)
    w = (rng.random(c) + 0.5).astype(dt)
    gs = rng.random(n)
    for weight, eps, cap in pick([(None, 0.0, 0.0), (w, 0.1, 0.0), (None, 0.0, 3.0)], [(w, 0.1, 3.0)]):
        t = _special_targets(n, c, rng, -100)
        what = f"{n}x{c} weight={weight is not None} eps={eps} cap={cap}"
        with np.errstate(all="ignore"):
            want_l, want_lse = np.empty(n), np.empty(n)
            R.cross_entropy(x, t, weight, -100, eps, 1e-3, cap, want_l, want_lse, None, 1.0)
            ys_l = np.empty(n)
            R.cross_entropy_soft(x, y, weight, eps, 1e-3, cap, ys_l, None, None, 1.0)
            sh_l = np.empty(n)
            R.cross_entropy_shard(x, t, weight, -100, eps, 1e-3, cap, want_lse, 0, c, sh_l, None, 1.0)
        # the finite rows only: a NaN/inf row makes both totals NaN/inf, compared apart below
        fin = np.isfinite(want_l)
        for name, call, rows in (
                ("hard", lambda lo, ls, g: K.cross_entropy(x, t, weight, -100, eps, 1e-3, cap, lo, ls, g, gs), want_l),
                ("soft", lambda lo, ls, g: K.cross_entropy_soft(x, y, weight, eps, 1e-3, cap, lo, ls, g, gs), ys_l),
                ("shard", lambda lo, ls, g: K.cross_entropy_shard(x, t, weight, -100, eps, 1e-3, cap, want_lse, 0, c,
                                                                  lo, g, gs), sh_l)):
            got_rows, g_rows = np.empty(n), np.empty((n, c), dt)
            lse_rows, lse_tot = np.empty(n), np.empty(n)
            assert call(got_rows, lse_rows, g_rows) is None, f"{name} {what}: rows asked for, a total returned"
            g_tot = np.empty((n, c), dt)
            total = call(None, lse_tot, g_tot)
            assert isinstance(total, float), f"{name} {what}: {type(total).__name__} returned, not a float"
            assert np.array_equal(g_tot, g_rows, equal_nan=True), f"{name} {what}: gradient differs with loss=None"
            if name != "shard":
                assert np.array_equal(lse_tot, lse_rows, equal_nan=True), f"{name} {what}: lse differs"
            want = float(np.sum(rows))
            if name == "hard" and not fin.all():
                assert np.isnan(total) == np.isnan(want) and (np.isnan(want) or total == want), (name, what)
                rows_f = np.where(fin, rows, 0.0)  # the same total over the finite rows
                x_f, t_f = x[fin], t[fin]
                total = K.cross_entropy(x_f, t_f, weight, -100, eps, 1e-3, cap, None, None, None, 1.0)
                want = float(np.sum(rows_f))
            mag = float(np.sum(np.abs(rows[np.isfinite(rows)])))  # each row within the tolerance
            _close(total, want, dt, f"{name} total {what}", mag=max(1.0, mag))


def _large_logits(dt, c, rng):
    """Rows of large logits with O(1) differences (offsets 1e4 and near the dtype's max)."""
    big = 3e38 if dt == np.float32 else 1e300
    rows = [1e4 + rng.standard_normal(c), -1e4 + rng.standard_normal(c), np.full(c, big),
            np.r_[big, 0.97 * big, np.zeros(c - 2)], np.r_[np.full(c - 1, -big), -0.99 * big]]
    return np.array(rows).astype(dt)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("c", pick([3, 3000], [3]))
def test_large_logits_keep_the_log_term(K, dt, c):
    """log p is ``(x - m) - log s``, never ``x - lse``: ``lse = m + log s`` rounds to ``m`` for
    large logits (1e4 in float32 loses ~5e-4; at 3e38 / 1e300 the whole ``log s``).  Checked
    for log_softmax, the hard loss with label smoothing and weights, and soft targets, on
    every layout."""
    rng = np.random.default_rng(12)
    x = _large_logits(dt, c, rng)
    n = x.shape[0]
    want = np.empty_like(x)
    R.log_softmax(x, want)
    np.testing.assert_allclose(want[2], -np.log(c), rtol=1e-6)  # the reference itself
    for name, xv in _layouts(x):
        got = np.empty_like(x)
        K.log_softmax(xv, got)
        _close(got, want, dt, f"log_softmax {name}")
    t = np.arange(n) % c
    w = (rng.random(c) + 0.5).astype(dt)
    y = rng.random((n, c)).astype(dt)
    y /= y.sum(axis=1, keepdims=True)
    for weight, eps in itertools.product(pick((None, w), (w,)), (0.0, 0.1)):
        want_l, want_g = np.empty(n), np.empty_like(x)
        R.cross_entropy(x, t, weight, -100, eps, 0.0, 0.0, want_l, None, want_g, np.ones(n))
        ws_l, ws_g = np.empty(n), np.empty_like(x)
        R.cross_entropy_soft(x, y, weight, eps, 0.0, 0.0, ws_l, None, ws_g, np.ones(n))
        if weight is None and eps == 0:
            assert abs(want_l[2] - np.log(c)) < 1e-6 * np.log(c)  # equal huge logits: log C
        for name, xv in _layouts(x):
            what = f"{name} weight={weight is not None} eps={eps}"
            got_l, got_g = np.empty(n), np.empty_like(x)
            K.cross_entropy(xv, t, weight, -100, eps, 0.0, 0.0, got_l, None, got_g, np.ones(n))
            _close(got_l, want_l, dt, "hard loss " + what)
            _close(got_g, want_g, dt, "hard grad " + what)
            K.cross_entropy_soft(xv, y, weight, eps, 0.0, 0.0, got_l, None, got_g, np.ones(n))
            _close(got_l, ws_l, dt, "soft loss " + what)
            _close(got_g, ws_g, dt, "soft grad " + what)


# few classes: the column-block kernels; 600 rows = two full blocks of 256 and a partial one;
# C = 9, 10, 13, 31 end in a partial tile (float32: C % 8 = 1, 2, 5, 7; float64: C % 4 = 1, 2, 1, 3;
# every width: tests/test_numba_asm.py::test_tile_part_writes_exactly_the_partial_tile)
FEW_N = pick([600], [14])[0]


@pytest.mark.parametrize("dt", CE_DTYPES)
@pytest.mark.parametrize("c", pick([1, 2, 3, 5, 7, 8, 9, 10, 13, 16, 31, 32, 33, 47, 64, 97], [1, 5]))
def test_cross_entropy_few_classes(K, dt, c):
    """Few classes (column blocks in C order, more in Fortran order) against the reference:
    every option, every special row, per-row and scalar gradient scales, every layout, both
    gradient orders, in place and loss only (into a strided loss output)."""
    rng = np.random.default_rng(20 + c)
    n = FEW_N
    x = _special_rows(n, c, dt, rng)
    w = (rng.random(c) + 0.5).astype(dt)
    gs_rows = rng.standard_normal(n)
    gs_rows[:3] = [0.0, -1.0, 2.5]
    gs_scalar = np.broadcast_to(0.5, (n,))
    for ignore, weight, eps, z, gs, cap in itertools.product(
        pick((-100, min(1, c - 1)), (-100,)), (None, w), (0.0, 0.1), pick((0.0, 1e-3), (1e-3,)),
        pick((gs_rows, gs_scalar), (gs_rows,)), CAPS
    ):
        t = _special_targets(n, c, rng, ignore)
        what = f"c={c} ignore={ignore} weight={weight is not None} eps={eps} z={z} gs={gs.strides} cap={cap}"
        want_l, want_g, want_lse = np.empty(n), np.empty((n, c), dt), np.empty(n)
        with np.errstate(all="ignore"):
            R.cross_entropy(x, t, weight, ignore, eps, z, cap, want_l, want_lse, want_g, gs)
        want_g[t == ignore] = 0  # the protocol: exact zeros for an ignored row
        for name, xv in _layouts(x):
            for gorder in pick("CF", "F"):
                got_l, got_g = np.full(n, 7.0), np.full((n, c), 7, dt, order=gorder)
                K.cross_entropy(xv, t, weight, ignore, eps, z, cap, got_l, None, got_g, gs)
                _close(got_l, want_l, dt, f"loss {name} grad={gorder} {what}")
                _close(got_g, want_g, dt, f"grad {name} grad={gorder} {what}")
                assert np.all(got_g[t == ignore] == 0)
            xi = _writable_copy(name, xv)
            got_lse = np.full(n, 7.0)
            K.cross_entropy(xi, t, weight, ignore, eps, z, cap, got_l, got_lse, xi, gs)  # in place
            _close(got_l, want_l, dt, f"loss in place {name} {what}")
            _close(xi, want_g, dt, f"grad in place {name} {what}")
            _close(got_lse, want_lse, dt, f"lse in place {name} {what}")
            got_l2, got_lse = np.zeros(2 * n)[::2], np.zeros(2 * n)[::2]  # strided outputs
            K.cross_entropy(xv, t, weight, ignore, eps, z, cap, got_l2, got_lse, None, 1.0)
            _close(got_l2, want_l, dt, f"loss without grad {name} {what}")
            _close(got_lse, want_lse, dt, f"lse without grad {name} {what}")
        if c > 1 and n > 12 and not cap:  # target logit -inf among finite ones
            assert got_l[8] == np.inf and np.isfinite(xi[8]).all()
        if weight is None and eps == 0 and z == 0 and t[5] != ignore:  # equal huge logits
            assert abs(got_l[5] - np.log(c)) <= 1e-6 * max(1.0, np.log(c))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("c", pick([1, 2, 5, 10, 33, 64, 300, 3000], [1, 2, 5]))
def test_normalizers_column_blocks(K, dt, c):
    """logsumexp / softmax / log_softmax with few classes (or Fortran order up to 2048 / 1024
    classes) against the reference: several blocks, special rows (+inf, only -inf, NaN, huge
    logits), every layout of input and output, in place."""
    rng = np.random.default_rng(23)
    n = FEW_N
    x = _special_rows(n, c, dt, rng)
    want_lse = np.empty(n, dt)
    with np.errstate(all="ignore"):
        R.logsumexp(x, want_lse)
    for name, xv in _layouts(x):
        got = np.zeros(2 * n, dt)[::2]  # a strided output
        K.logsumexp(xv, got)
        _close(got, want_lse, dt, f"logsumexp c={c} {name}")
        for fn in ("softmax", "log_softmax"):
            want = np.empty((n, c), dt)
            with np.errstate(all="ignore"):
                getattr(R, fn)(x, want)
            for order in "CF":
                got = np.empty((n, c), dt, order=order)
                getattr(K, fn)(xv, got)
                _close(got, want, dt, f"{fn} c={c} {name} out={order}")
            xi = _writable_copy(name, xv)
            getattr(K, fn)(xi, xi)
            _close(xi, want, dt, f"{fn} in place c={c} {name}")


@pytest.mark.skipif(SIM, reason="hundreds of rows of hundreds of classes: minutes of Python threads "
                                "under the simulator (test_cross_entropy_few_classes covers the CUDA kernels)")
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("c", [300, 1000, 3000])
def test_cross_entropy_fortran_order_columns(K, dt, c):
    """Fortran-order logits (read by columns in place by the cython backend: float32 up to
    2048 classes, float64 up to 1024; the rest through gathered row panels): several blocks,
    special rows, both gradient orders, in place."""
    rng = np.random.default_rng(22)
    n = 320
    x = _special_rows(n, c, dt, rng)
    xf = np.asfortranarray(x)
    w = (rng.random(c) + 0.5).astype(dt)
    for weight, eps, z, cap in ((None, 0.0, 0.0, 0.0), (w, 0.1, 1e-3, 0.0), (w, 0.1, 1e-3, 2.0)):
        t = _special_targets(n, c, rng, -100)
        gs = rng.standard_normal(n)
        want_l, want_g = np.empty(n), np.empty((n, c), dt)
        with np.errstate(all="ignore"):
            R.cross_entropy(x, t, weight, -100, eps, z, cap, want_l, None, want_g, gs)
        want_g[t == -100] = 0
        for gorder in "FC":
            got_l, got_g = np.empty(n), np.empty((n, c), dt, order=gorder)
            K.cross_entropy(xf, t, weight, -100, eps, z, cap, got_l, None, got_g, gs)
            _close(got_l, want_l, dt, f"loss c={c} grad={gorder} eps={eps}")
            _close(got_g, want_g, dt, f"grad c={c} grad={gorder} eps={eps}")
        xi = xf.copy(order="F")
        K.cross_entropy(xi, t, weight, -100, eps, z, cap, got_l, None, xi, gs)
        _close(got_l, want_l, dt, f"loss in place c={c}")
        _close(xi, want_g, dt, f"grad in place c={c}")


# ----------------------------------------------------------------------------- elementwise
def _ew_inputs(n, c, dt, rng):
    z = (rng.standard_normal((n, c)) * 5).astype(dt)
    y = rng.random((n, c)).astype(dt)
    p = rng.random((n, c)).astype(dt)
    if n * c > 10:
        z.flat[:5] = [np.inf, -np.inf, 800, -800, np.nan]
        p.flat[:2] = [0, 1]
        y.flat[:2] = [0, 1]
    return z, y, p


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", pick([(6, 5), (1, 3000), (3000, 1), (0, 3), (7, 2100), (1, 40000)],
                                       [(3, 5), (0, 3), (1, 3)]))
def test_elementwise(K, dt, shape):
    """Each elementwise kernel: the float64 sum, the loss and every gradient output against
    the reference, for every layout of the differentiated input, with and without each
    optional operand (weights and the upstream gradient as arrays and stride-0 broadcasts)."""
    rng = np.random.default_rng(8)
    n, c = shape
    z, y, p = _ew_inputs(n, c, dt, rng)
    w = np.broadcast_to((rng.random(c) + 0.5).astype(dt), (n, c))
    pw = np.broadcast_to((rng.random(c) * 3).astype(dt), (n, c))
    gout = rng.standard_normal((n, c)).astype(dt)
    var = np.broadcast_to(rng.random((n, 1)).astype(dt), (n, c)).copy()
    if n * c > 10:
        var.flat[5:7] = [0.0, np.nan]

    def both(fn, args_ref, args_got, what, loss_mag=1.0):
        with np.errstate(all="ignore"):
            outs_r = [np.zeros((n, c), dt) for _ in range(3)]  # an unused output stays 0
            outs_k = [np.zeros((n, c), dt) for _ in range(3)]
            sr = fn(R, *args_ref, outs_r)
            sk = fn(K, *args_got, outs_k)
        _close(sk, sr, dt, what + " sum", np.sum(loss_mag))
        for k, (a, b) in enumerate(zip(outs_k, outs_r)):
            _close(a, b, dt, f"{what} output {k}", loss_mag if k == 0 else 1.0)

    def bcel_terms(weight, pos):
        """|(1-y) z| + |c softplus(-z)|: the loss (1-y) z + c softplus(-z) is their difference
        for z < 0 (in float32 both sides round terms ~75x a 0.1 loss at z = -10)."""
        zz, yy = z.astype(np.float64), y.astype(np.float64)
        cc = 1.0 if pos is None else 1.0 + (pos - 1.0) * yy
        with np.errstate(all="ignore"):
            t = np.abs((1 - yy) * zz) + np.abs(cc) * (np.maximum(-zz, 0) + np.log1p(np.exp(-np.abs(zz))))
            t = t * (1.0 if weight is None else weight)
        return np.where(np.isfinite(t), np.maximum(t, 1.0), 1.0)

    for (name, zv), weight, pos, go in itertools.product(_layouts(z), (None, w), (None, pw),
                                                         pick((None, gout), (gout,))):
        what = f"bce_with_logits {name} w={weight is not None} pw={pos is not None} gout={go is not None}"
        both(lambda m, zz, o: m.bce_with_logits(zz, y, weight, pos, o[0], o[1], 0.3, go), (z,), (zv,), what,
             bcel_terms(weight, pos))
    for name, pv in _layouts(p):
        for weight in (None, w):
            both(lambda m, pp, o: m.bce(pp, y, weight, o[0], o[1], 0.5, gout), (p,), (pv,), f"bce {name}")
    with np.errstate(divide="ignore"):
        logp = np.log(p)  # log(0) = -inf: a zero target probability, given as a log-target
    for (name, zv), (lt, tt) in itertools.product(_layouts(z), ((False, p), (True, logp))):
        both(lambda m, xx, o: m.kl_div(xx, tt, lt, o[0], o[1], 0.5, None), (z,), (zv,), f"kl_div {lt} {name}")
    for name, zv in _layouts(z):
        both(lambda m, xx, o: m.mse(xx, y, o[0], o[1], 0.5, gout), (z,), (zv,), f"mse {name}")
    for full in (False, True):
        both(lambda m, xx, o: m.gaussian_nll(xx, y, var, full, 1e-6, o[0], o[1], o[2], 0.5, gout), (z,),
             (np.asfortranarray(z),), f"gnll {full}")
        vb = np.broadcast_to(var[:, :1], (n, c))
        both(lambda m, xx, o: m.gaussian_nll(xx, y, vb, full, 1e-6, o[0], o[1], o[2], 0.5, None), (z,), (z,),
             "gnll var broadcast")


@pytest.mark.parametrize("dt", DTYPES)
def test_elementwise_optional_outputs_and_in_place(K, dt):
    rng = np.random.default_rng(9)
    z, y, _ = _ew_inputs(*pick([(40, 300)], [(3, 5)])[0], dt, rng)
    with np.errstate(all="ignore"):
        lr, gr = np.empty_like(z), np.empty_like(z)
        sr = R.bce_with_logits(z, y, None, None, lr, gr, 0.5, None)
        s1 = K.bce_with_logits(z, y, None, None, None, None, 0.5, None)
        _close(s1, sr, dt, "sum only")
        zi = z.copy()
        s2 = K.bce_with_logits(zi, y, None, None, None, zi, 0.5, None)
        _close(s2, sr, dt, "sum in place")
        _close(zi, gr, dt, "grad in place")
        zf = np.asfortranarray(z)
        K.bce_with_logits(zf, y, None, None, None, zf, 0.5, None)
        _close(zf, gr, dt, "grad in place, Fortran order")
        gvr = np.empty_like(z)
        R.gaussian_nll(z, y, np.abs(y), False, 1e-6, lr, None, gvr, 1.0, None)
        gv = np.empty_like(z)
        K.gaussian_nll(z, y, np.abs(y), False, 1e-6, None, None, gv, 1.0, None)
        _close(gv, gvr, dt, "grad_var only")


# ----------------------------------------------------------------------------- accuracy at scale
@pytest.mark.slow
@pytest.mark.skipif(SIM, reason="262,144 classes: hours of Python threads under the simulator")
@pytest.mark.parametrize("dt", DTYPES)
def test_cross_entropy_262144_classes(K, dt):
    """float32 loss within 2e-6 relative (gradient 1e-6 absolute when scaled to O(1)), float64
    within 1e-12, against a longdouble computation on the same input values; logsumexp too."""
    rng = np.random.default_rng(10)
    n, c = 3, 262_144
    x = (rng.standard_normal((n, c)) * 4 + 50).astype(dt)  # large offset: tests the shift
    t = rng.integers(0, c, n)
    loss, grad = np.empty(n), np.empty((n, c), dt)
    K.cross_entropy(x, t, None, -100, 0.1, 1e-4, 0.0, loss, None, grad, np.ones(n))
    xl = x.astype(np.longdouble)
    m = xl.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(xl - m).sum(axis=1))
    ref = 0.9 * (lse - xl[np.arange(n), t]) + 0.1 / c * (lse[:, None] - xl).sum(axis=1) + 1e-4 * lse**2
    rtol = 2e-6 if dt == np.float32 else 1e-12
    np.testing.assert_allclose(loss, ref.astype(np.float64), rtol=rtol)
    p = np.exp(xl - lse[:, None])
    gref = p * (1 + 2e-4 * lse[:, None]) - 0.1 / c
    gref[np.arange(n), t] -= 0.9
    # gradient errors relative to its largest entry (the gradient scaled to O(1))
    tol = 1e-6 if dt == np.float32 else 1e-12
    gref = gref.astype(np.float64)
    np.testing.assert_allclose(grad, gref, rtol=0, atol=tol * np.abs(gref).max())
    out = np.empty(n, dt)
    K.logsumexp(x, out)
    np.testing.assert_allclose(out, lse.astype(np.float64), rtol=rtol)
