"""Differential tests against PyTorch: every public function and option, on every backend.

Hypothesis draws shapes, memory layouts (C order, Fortran order, permuted, strided and
negative-stride views, a class axis that is not the last one), dtypes (float64, float32,
float16) and extreme values (logits up to +-1e4, float32 values up to +-3e38, float64 up
to +-1e300, -inf masks, +inf, NaN, probabilities of exactly 0 and 1).  The reference is always
PyTorch in float64 on the *same* values (those of the dtype under test), with
``torch.autograd`` for every gradient -- never fastloss itself.

Tolerances follow the SPEC's accuracy contract (and ``conftest.close``, which does every
comparison): float64 1e-10 relative; float32 2e-6 relative on losses and 1e-6 absolute on
O(1) gradients; float16 results (computed in float32, rounded once) within a float16
rounding.  Absolute terms are scaled to the magnitudes involved (upstream gradient, class
weights, the number of classes, the size of the values subtracted).  Where fastloss
deliberately differs from PyTorch (README, "Semantics: where fastloss and PyTorch differ"),
the test asserts fastloss's documented value instead:

1. ``cross_entropy`` "mean" with every target ignored or a summed target weight of 0: 0.0 and
   a zero gradient (PyTorch: NaN).
2. A row holding ``+inf`` at a non-target class (probability targets: at a class without
   target mass, with mass elsewhere), without label smoothing: loss ``+inf``, the limit, and
   a NaN gradient (PyTorch: NaN loss).  With label smoothing the row is NaN, as in PyTorch.
3. Probability targets: a class with logit ``-inf`` and zero target mass contributes 0
   (PyTorch: NaN); a NaN or ``+inf`` logit still makes the row NaN when the row's mass is 0.
4. ``kl_div``: the term is 0 where the target is 0 (log-target ``-inf``).
5. float32 rows whose spread exceeds FLT_MAX are never drawn.
6. ``binary_cross_entropy`` lets NaN probabilities/targets through (PyTorch raises): the
   reference is PyTorch's on the other elements, NaN on those.

Generated around (not asserted either way):

* non-finite logits in ignored rows, and ignored rows next to an inf/NaN class weight:
  PyTorch's gradient of such a row is NaN (``0 * nan``, ``0 * inf``), fastloss's is 0 (a
  documented divergence that ``test_fixed_extremes`` asserts: ``ce_ignored_rows``);
* weights and upstream gradients that are nonzero but below 1e-3 (in float32 they underflow,
  and ``inf * 0`` is NaN where the float64 reference has ``inf``);
* logits beyond [-1, 1] next to an infinite class weight with smoothing (``inf`` times a
  ``-log p`` that rounds to 0 is NaN, in PyTorch too, depending on summation order);
* float32 terms beyond FLT_MAX whose float64 mean is finite: the term is ``inf`` in float32,
  so the reduced loss is ``inf`` (as in float32 PyTorch; README): ``test_fixed_extremes``
  asserts that (``f32_overflow_*``), deterministically;
* outputs (``out``, ``grad_out``) in non-native byte order, which fastloss refuses (inputs in
  non-native byte order are drawn).

Runs on the ``backend`` fixture's backends; under the CUDA simulator (``SIM``) with tiny
shapes and few examples.  Reproducible: ``derandomize=True``, no example database.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

# torch is in the "test" extra: without it this module fails to import rather than skipping
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402

import fastloss as fl  # noqa: E402
from conftest import SIM, close  # noqa: E402

F64 = torch.float64


def _settings(n):
    return settings(
        max_examples=max(2, n // 10) if SIM else n,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# ============================================================================= strategies
DTYPES = st.sampled_from([np.float64, np.float32, np.float16]).map(np.dtype)
# small dims, now and then an empty one or a longer one (row blocks, tile remainders)
DIM = st.integers(1, 3) if SIM else st.one_of(st.integers(1, 4), st.integers(1, 4), st.sampled_from([0, 7, 9, 11]))
CLASSES = st.integers(1, 3) if SIM else st.one_of(st.integers(1, 9), st.sampled_from([10, 17, 33, 40]))
ELEMS = st.integers(1, 3) if SIM else st.one_of(st.integers(1, 5), st.integers(1, 5), st.sampled_from([0, 8, 13, 300]))


def _cdt(dtype):
    """Compute dtype: float16 is computed in float32."""
    return np.dtype(np.float32) if np.dtype(dtype) == np.float16 else np.dtype(dtype)


@st.composite
def layouts(draw, ndim):
    """A memory layout: (axis order of the buffer, step of each axis, non-native byte order)."""
    kind = draw(st.sampled_from(["C", "F", "view"]))
    swap = draw(st.sampled_from([False] * 7 + [True]))
    if kind == "C" or ndim == 0:
        return tuple(range(ndim)), (1,) * ndim, swap
    if kind == "F":
        return tuple(reversed(range(ndim))), (1,) * ndim, swap
    perm = tuple(draw(st.permutations(range(ndim))))
    steps = tuple(draw(st.lists(st.sampled_from([1, 2, -1, -2]), min_size=ndim, max_size=ndim)))
    return perm, steps, swap


def native(spec):
    """``spec`` in native byte order: outputs (``out``, ``grad_out``) must have the exact dtype."""
    return spec[0], spec[1], False


def writable_in_place(a):
    """An input that may double as its own output (native byte order)."""
    return a.dtype.isnative


def lay_out(a, spec):
    """A copy of ``a`` with the memory layout ``spec`` (padding between elements is NaN/0)."""
    a = np.asarray(a)
    perm, steps, swap = spec
    dt = a.dtype.newbyteorder("S") if swap and a.dtype.itemsize > 1 else a.dtype
    if a.ndim == 0:
        return a.astype(dt)
    fill = np.nan if a.dtype.kind == "f" else 0
    buf = np.full([abs(steps[p]) * a.shape[p] for p in perm], fill, dt)
    v = buf.transpose(np.argsort(perm))[tuple(slice(None, None, s) for s in steps)]
    v[...] = a
    assert v.shape == a.shape
    return v


def _finite(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


# positive weights: 0 or at least 1e-3 (a subnormal weight only measures subnormal arithmetic)
WEIGHTS = st.sampled_from([0.0, 0.5, 1.0, 2.0]) | _finite(1e-3, 3)
# upstream gradients likewise: 0 or |go| >= 1e-3 (a tiny one underflows the compute dtype, and
# then inf * 0 = NaN where the float64 reference has inf)
GO_ELEMS = st.sampled_from([1.0, -0.5, 0.0, 3.0]) | _finite(1e-3, 4) | _finite(-4, -1e-3)


def value_range(draw, dtype, mode):
    """(lo, hi) of the finite values for a value mode (the spread stays below the dtype's max)."""
    if mode == "huge":
        top = 3.0e38 if dtype == np.float32 else 1e300
        return draw(st.sampled_from([(-0.53 * top, 0.53 * top), (0.47 * top, top), (-top, -0.47 * top)]))
    s = 1e4 if mode == "big" else draw(st.sampled_from([1.0, 20.0]))
    return -s, s


def draw_values(draw, shape, dtype, lo, hi):
    """Finite float64 values of ``shape`` that are exactly representable in ``dtype``."""
    a = draw(arrays(np.float64, shape, elements=_finite(lo, hi)))
    return a.astype(dtype).astype(np.float64)


def draw_positions(draw, size, max_size):
    if size == 0:
        return []
    return draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=max_size, unique=True))


def value_modes(dtype, specials=True):
    modes = ["normal", "normal", "big"]
    if dtype != np.float16:
        modes.append("huge")
    if specials:
        modes += ["masked", "inf", "nan"]
    return st.sampled_from(modes)


@st.composite
def grad_outs(draw, reduction, shape, dtype):
    """``grad_output``: None, a scalar, or (reduction="none") an array of the loss's shape."""
    kinds = ["none", "scalar"] + (["array", "array"] if reduction == "none" else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return None
    if kind == "scalar":
        return draw(GO_ELEMS)
    g = draw(arrays(np.float64, shape, elements=GO_ELEMS))
    return g.astype(draw(st.sampled_from([np.float64, dtype])))


# ============================================================================= checking
# (rtol, atol) by result dtype and kind: the SPEC's contract (conftest.close); float16 results
# are float32 results rounded once to float16, so within half a float16 ulp (2**-11 relative)
TOL = {
    ("float64", "loss"): (1e-10, 1e-14), ("float64", "grad"): (1e-10, 1e-13),
    ("float32", "loss"): (2e-6, 1e-7), ("float32", "grad"): (2e-6, 1e-6),
    ("float16", "loss"): (5e-4, 1e-7), ("float16", "grad"): (5e-4, 1e-6),
}
F16_FLOOR = 2.0 ** -25  # half the float16 subnormal spacing
K_EPS = 4  # roundings of the compute dtype allowed per unit of ``mag``


def fin(a):
    """|a| with non-finite entries as 0 (magnitudes for tolerances)."""
    a = np.abs(np.asarray(a, np.float64))
    return np.where(np.isfinite(a), a, 0.0)


def fmax(a):
    """The largest finite |a| (0 for none)."""
    return float(np.max(fin(a), initial=0.0))


def check(actual, expected, *, cdt, kind="loss", unit=1.0, mag=0.0, what=""):
    """Assert ``actual`` (fastloss) matches ``expected`` (PyTorch, float64).

    The allowed error is ``rtol*|expected| + atol*unit + K_EPS*eps(cdt)*mag`` elementwise:
    ``unit`` scales the contract's absolute term to the size of an O(1) quantity here (the
    upstream gradient, weights), ``mag`` the size of the values that rounding in the compute
    dtype acts on.  A reference beyond the result dtype's range is the infinity it rounds to.
    NaN must match NaN, infinities must match exactly (``close``)."""
    a = np.asarray(actual)
    out_dt = a.dtype
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape}, expected {e.shape}"
    rtol, atol = TOL[(out_dt.name, kind)]
    with np.errstate(over="ignore", invalid="ignore"):
        e_r = e.astype(out_dt).astype(np.float64)
    e = np.where(np.isfinite(e) & np.isinf(e_r), e_r, e)
    u = np.asarray(unit, np.float64) + K_EPS * np.finfo(cdt).eps * np.asarray(mag, np.float64) / atol
    # results in the compute dtype's subnormal range have absolute, not relative, precision;
    # float16 results are float32 results rounded once more
    floor = np.finfo(cdt).tiny + (F16_FLOOR if out_dt == np.float16 else 0.0)
    u = u + floor / atol
    u = np.maximum(np.where(np.isfinite(u), u, 0.0), 1e-300)
    a64 = a.astype(np.float64)
    with np.errstate(all="ignore"):
        an, en = a64 / u, e / u
    msg = f"{what}\nfastloss: {np.array2string(a64, precision=17, threshold=60)}\n" \
          f"torch:    {np.array2string(e, precision=17, threshold=60)}"
    close(an, en, rtol=rtol, atol=atol, err_msg=msg)


def check_scalar_type(loss, cdt):
    assert isinstance(loss, np.floating) and loss.dtype == cdt, f"loss {loss!r}: expected a NumPy {cdt} scalar"


def t64(a, grad=False):
    t = torch.tensor(np.asarray(a, np.float64), dtype=F64)
    return t.requires_grad_() if grad else t


def vjp(out, inputs, go):
    """d(sum(go * out))/d(inputs) by torch.autograd (zeros where an input is unused)."""
    go_t = torch.as_tensor(np.asarray(1.0 if go is None else go, np.float64), dtype=F64)
    s = (out * go_t).sum()
    gs = torch.autograd.grad(s, inputs, allow_unused=True)
    return [np.zeros(tuple(i.shape)) if g is None else g.detach().numpy() for g, i in zip(gs, inputs)]


def _go_abs(go, shape):
    return np.broadcast_to(fin(1.0 if go is None else go), shape)


# ============================================================================= normalizers
@st.composite
def normalizer_cases(draw, tuple_axis=False):
    dtype = draw(DTYPES)
    ndim = draw(st.integers(0 if tuple_axis else 1, 3))
    shape = tuple(draw(st.lists(DIM, min_size=ndim, max_size=ndim)))
    mode = draw(value_modes(dtype))
    lo, hi = value_range(draw, dtype, "normal" if mode in ("masked", "inf", "nan") else mode)
    x = draw_values(draw, shape, dtype, lo, hi)
    flat = x.reshape(-1)
    if mode in ("masked", "inf", "nan"):
        pos = draw_positions(draw, flat.size, max(1, flat.size // 2 if mode == "masked" else 2))
        flat[pos] = {"masked": -np.inf, "inf": np.inf, "nan": np.nan}[mode]
        if mode == "inf" and draw(st.booleans()):  # +inf next to -inf
            flat[draw_positions(draw, flat.size, 2)] = -np.inf
    if tuple_axis:
        axis = draw(st.sampled_from(["int", "int", "tuple", "none"] if ndim else ["none"]))
        if axis == "none":
            axis = None
        elif axis == "tuple":
            axis = tuple(draw(st.lists(st.integers(-ndim, ndim - 1), min_size=1, max_size=ndim,
                                       unique_by=lambda a: a % ndim)))
        else:
            axis = draw(st.integers(-ndim, ndim - 1))
    else:
        axis = draw(st.integers(-ndim, ndim - 1))
    return dtype, x, axis, draw(layouts(ndim)), mode


@_settings(60)
@given(case=normalizer_cases(tuple_axis=True), keepdims=st.booleans())
def test_logsumexp(backend, case, keepdims):
    dtype, x, axis, lay, mode = case
    xin = lay_out(x.astype(dtype), lay)
    dims = tuple(range(x.ndim)) if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    want = torch.logsumexp(t64(x), dim=dims, keepdim=keepdims).numpy()
    got = fl.logsumexp(xin, axis=axis, keepdims=keepdims, backend=backend)
    cdt = _cdt(dtype)
    if np.ndim(got) == 0 and not isinstance(got, np.ndarray):
        check_scalar_type(got, cdt)
    else:
        assert got.dtype == dtype
    size = math.prod(x.shape[d] for d in dims)
    check(got, want, cdt=cdt, mag=fmax(x) + size + 1, what="logsumexp")


@st.composite
def out_arg(draw, x_in, dtype):
    kind = draw(st.sampled_from(["none", "none", "fresh", "inplace"]))
    if kind == "none":
        return None
    if kind == "inplace" and writable_in_place(x_in):
        return x_in
    return lay_out(np.full(x_in.shape, np.nan, dtype), native(draw(layouts(x_in.ndim))))


@_settings(60)
@given(case=normalizer_cases(), log=st.booleans(), data=st.data())
def test_softmax_log_softmax(backend, case, log, data):
    dtype, x, axis, lay, mode = case
    cdt = _cdt(dtype)
    xin = lay_out(x.astype(dtype), lay)
    out = data.draw(out_arg(xin, dtype))
    X = t64(x)
    want = (torch.log_softmax if log else torch.softmax)(X, dim=axis).numpy()
    fn = fl.log_softmax if log else fl.softmax
    got = fn(xin, axis=axis, out=out, backend=backend)
    if out is not None:
        assert got is out
    assert got.dtype == dtype and got.shape == x.shape
    with np.errstate(invalid="ignore"):
        spread = fin(x - np.max(np.where(np.isnan(x), -np.inf, x), axis=axis, keepdims=True)) if x.size else x
    c = x.shape[axis]
    if log:  # x - lse: absolute error ~ eps * (|x - max| + C)
        check(got, want, cdt=cdt, kind="grad", mag=spread + c + 1, what="log_softmax")
    else:  # probabilities: relative error ~ eps * (|x - max| + C)
        check(got, want, cdt=cdt, kind="grad", mag=fin(want) * (spread + c + 1), what="softmax")


@_settings(50)
@given(case=normalizer_cases(), log=st.booleans(), data=st.data())
def test_softmax_backward(backend, case, log, data):
    """The VJPs, given y = (log_)softmax(x): PyTorch's autograd in float64 (y is then PyTorch's
    float64 output), and for float32/float16 y PyTorch's backward formula on the rounded y."""
    dtype, x, axis, lay, mode = case
    cdt = _cdt(dtype)
    X = t64(x, grad=True)
    Y = (torch.log_softmax if log else torch.softmax)(X, dim=axis)
    y = Y.detach().numpy().astype(dtype)
    gdt = data.draw(st.sampled_from([dtype, np.dtype(np.float64)]))
    glo, ghi = data.draw(st.sampled_from([(-1.0, 1.0), (-3.0, 3.0), (-1e3, 1e3)]))
    g = draw_values(data.draw, x.shape, gdt, glo, ghi)
    if x.size and data.draw(st.booleans()):
        g.reshape(-1)[data.draw(st.integers(0, x.size - 1))] = data.draw(st.sampled_from([0.0, np.nan]))
    G = t64(g)
    if dtype == np.float64:
        want = torch.autograd.grad(Y, X, G)[0].numpy()
    else:
        bw = torch._log_softmax_backward_data if log else torch._softmax_backward_data
        want = bw(G, t64(y), axis % x.ndim, F64).numpy()
    fn = fl.log_softmax_backward if log else fl.softmax_backward
    got = fn(lay_out(g.astype(gdt), data.draw(layouts(x.ndim))), lay_out(y, lay), axis=axis, backend=backend)
    assert got.dtype == dtype and got.shape == x.shape
    yv = y.astype(np.float64)
    if log:  # g - exp(y) * sum(g)
        ey = fin(np.exp(yv))
        sg = np.sum(fin(g), axis=axis, keepdims=True)
        unit = fin(g) + ey * sg
        mag = ey * sg * (fin(yv) + 1)
    else:  # y * (g - sum(g * y))
        sgy = np.sum(fin(g) * fin(yv), axis=axis, keepdims=True)
        unit = fin(yv) * (fin(g) + sgy)
        mag = unit * (x.shape[axis] + 1)
    check(got, want, cdt=cdt, kind="grad", unit=unit, mag=mag, what=f"{'log_' if log else ''}softmax_backward")


# ============================================================================= cross-entropy
@st.composite
def ce_cases(draw):
    dtype = draw(DTYPES)
    ndim = draw(st.integers(1, 3))
    axis = draw(st.integers(0, ndim - 1))
    C = draw(CLASSES)
    row_shape = tuple(draw(st.lists(DIM, min_size=ndim - 1, max_size=ndim - 1)))
    N = math.prod(row_shape)
    soft = draw(st.booleans())
    mode = draw(value_modes(dtype))
    lo, hi = value_range(draw, dtype, "normal" if mode in ("masked", "inf", "nan") else mode)
    x2 = draw_values(draw, (N, C), dtype, lo, hi)  # rows in the order of row_shape
    opts = {}
    ii = -100
    # class weights: none, positive, with zeros, or one unused class of weight inf/NaN
    wkinds = ["none", "none", "pos"]
    if mode in ("normal", "big", "huge"):
        wkinds.append("zeros")
        if not soft and C > 1 and mode != "huge":
            wkinds.append("special")
    wkind = draw(st.sampled_from(wkinds))
    w = None
    special = None
    if wkind != "none":
        w = draw(arrays(np.float64, C, elements=st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0]) | _finite(0.05, 4)))
        if wkind == "zeros":
            w[draw_positions(draw, C, C)] = 0.0
        elif wkind == "special":
            special = draw(st.integers(0, C - 1))
            w[special] = draw(st.sampled_from([np.inf, np.nan]))
            # logits in [-1, 1]: with an infinite weight a -log p that rounds to 0 (p within an
            # ulp of 1) turns inf into NaN, in PyTorch as well, depending on summation order
            x2 = np.clip(x2, -1.0, 1.0)
        opts["weight"] = w
    if soft:
        y2 = draw(arrays(np.float64, (N, C), elements=st.sampled_from([0.0, 1.0]) | _finite(0, 1)))
        for r in range(N):
            kind = draw(st.sampled_from(["prob", "prob", "raw", "zero", "onehot"]))
            if kind == "prob" and y2[r].sum() > 0:
                y2[r] /= y2[r].sum()
            elif kind == "zero":
                y2[r] = 0.0
            elif kind == "onehot":
                y2[r] = 0.0
                y2[r, draw(st.integers(0, C - 1))] = 1.0
        y2 = y2.astype(dtype).astype(np.float64)
        keep = np.ones(N, bool)
    else:
        if special is not None:  # the special-weight class is never a target
            t2 = np.array(draw(st.lists(st.integers(0, C - 2), min_size=N, max_size=N)), np.int64)
            t2[t2 >= special] += 1
        else:
            t2 = np.array(draw(st.lists(st.integers(0, C - 1), min_size=N, max_size=N)), np.int64)
        ii = draw(st.sampled_from([-100, -100, -1, 0, C - 1, 7]))
        if special is not None and 0 <= ii < C:
            ii = -100
        if ii != -100 or draw(st.booleans()):
            opts["ignore_index"] = ii
        # (not with an inf/NaN class weight: PyTorch's gradient of an ignored row is then
        # 0 * inf = NaN, fastloss's 0 -- the ignored-row divergence of the module docstring)
        if N and special is None and draw(st.booleans()):
            t2[draw_positions(draw, N, N)] = ii
        keep = t2 != ii
    # extremes, only in rows that count (ignored rows stay finite, see the module docstring)
    if mode in ("masked", "inf", "nan") and keep.any():
        rows = np.flatnonzero(keep)
        cells = [(rows[i // C], i % C) for i in draw_positions(draw, rows.size * C,
                                                               max(1, rows.size * C // 2) if mode == "masked" else 2)]
        val = {"masked": -np.inf, "inf": np.inf, "nan": np.nan}[mode]
        for r, c in cells:
            x2[r, c] = val
        if mode == "masked" and draw(st.booleans()):  # a row of only -inf
            x2[rows[draw(st.integers(0, rows.size - 1))]] = -np.inf
    eps = draw(st.sampled_from([0.0, 0.0, 0.1, 1.0]) | _finite(0, 1))
    if eps or draw(st.booleans()):
        opts["label_smoothing"] = eps
    z = 0.0 if mode == "huge" else draw(st.sampled_from([0.0, 0.0, 1e-4, 0.5]) | _finite(0, 1))
    if z or draw(st.booleans()):
        opts["z_loss"] = z
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    go = draw(grad_outs(reduction, row_shape, dtype))
    return dict(dtype=dtype, axis=axis, C=C, row_shape=row_shape, soft=soft, mode=mode, x2=x2,
                y2=y2 if soft else None, t2=None if soft else t2, ii=ii, w=w, eps=eps, z=z,
                opts=opts, reduction=reduction, go=go, keep=keep)


def _nd(a2, row_shape, axis):
    """(N, C) rows -> the N-d array with the class axis at ``axis``."""
    return np.moveaxis(a2.reshape(row_shape + a2.shape[1:]), -1, axis)


def ref_cross_entropy(case):
    """(loss, grad as (N, C) rows, loss_mag, grad_unit) from F.cross_entropy + a torch z-loss."""
    dtype, axis, C, row_shape = case["dtype"], case["axis"], case["C"], case["row_shape"]
    soft, x2, eps, z, red, go = case["soft"], case["x2"], case["eps"], case["z"], case["reduction"], case["go"]
    cdt = _cdt(dtype)
    N = x2.shape[0]
    w = None if case["w"] is None else case["w"].astype(cdt).astype(np.float64)
    keep = case["keep"]
    ndim = len(row_shape) + 1
    cd = 1 if ndim >= 2 else 0
    finite_rows = ~np.isnan(x2).any(axis=1)

    # rows where fastloss documents the limit instead of PyTorch's NaN
    inf_row = np.zeros(N, bool)
    xr = x2.copy()
    if soft:
        ys = (1 - eps) * case["y2"] + eps / C
        mass = ys.sum(axis=1)
        pinf = np.isposinf(x2)
        inf_row = finite_rows & pinf.any(axis=1) & ~(pinf & (ys > 0)).any(axis=1) & (mass > 0)
        # -inf logit with zero target mass: the 0 * inf term is 0 -> -1e300 gives that limit
        some_finite = np.isfinite(x2).any(axis=1)
        patch = np.isneginf(x2) & (ys == 0) & some_finite[:, None] & finite_rows[:, None] & ~pinf.any(axis=1)[:, None]
        xr[patch] = -1e300
    else:
        t = case["t2"]
        tt = np.where(keep, t, 0)
        xt = x2[np.arange(N), tt]
        nontarget_inf = np.isposinf(x2) & (np.arange(C)[None, :] != tt[:, None])
        # (with smoothing every class's -log p counts: inf - inf, NaN as in PyTorch)
        inf_row = keep & finite_rows & nontarget_inf.any(axis=1) & ~np.isposinf(xt) & (eps == 0)
    xr[inf_row] = 0.0  # compared by value below, not through torch

    X = t64(_nd(xr, row_shape, axis), grad=True)
    Xm = X.movedim(axis, 1) if ndim >= 2 else X
    W = None if w is None else t64(w)
    kw = dict(weight=W, label_smoothing=eps)
    if soft:
        T = t64(_nd(case["y2"], row_shape, axis))
        T = T.movedim(axis, 1) if ndim >= 2 else T
        keep_t = torch.ones(row_shape, dtype=torch.bool)
        denom = float(N)
    else:
        T = torch.tensor(case["t2"].reshape(row_shape), dtype=torch.long)
        kw["ignore_index"] = case["ii"]
        keep_t = torch.tensor(keep.reshape(row_shape))
        if w is None:
            denom = float(keep.sum())
        else:
            denom = float(np.sum(w[case["t2"][keep]]))
    rows = F.cross_entropy(Xm, T, reduction="none", **kw)
    if z:
        lse = torch.logsumexp(Xm, dim=cd)
        rows = rows + torch.where(keep_t, z * lse ** 2, torch.zeros((), dtype=F64))
    if red != "none" and not any(inf_row) and N and denom != 0:
        # self-check of this reference: its reduction is F.cross_entropy's own
        own = F.cross_entropy(Xm, T, reduction=red, **kw).item()
        mine = rows.sum().item() if red == "sum" else rows.sum().item() / denom
        if not z and np.isfinite(own):
            assert np.isclose(mine, own, rtol=1e-12, atol=1e-300), (mine, own)
    if red == "none":
        total = rows
    elif red == "sum":
        total = rows.sum()
    else:
        total = rows.sum() / denom
    rows_np = rows.detach().numpy().reshape(-1).copy()
    rows_np[inf_row] = np.inf
    go_rows = _go_abs(go, row_shape).reshape(-1)
    mean_zero = red == "mean" and denom == 0  # divergence 1: loss 0, zero gradient
    if red == "none":
        loss = rows_np.reshape(row_shape)
    elif mean_zero:
        loss = 0.0
    else:
        loss = np.sum(rows_np) if red == "sum" else np.sum(rows_np) / denom
    grad = np.moveaxis(vjp(total, [X], go)[0], axis, -1).reshape(N, C)  # rows x classes
    grad[inf_row] = np.nan  # documented: loss +inf, gradient NaN
    if mean_zero:
        grad = np.zeros_like(grad)
    # magnitudes: every term of a row is >= 0 and at most (its class weight) * (lse - x_c)
    wsc = 1.0 if w is None else fmax(w)
    ysum = ((1 - eps) * case["y2"] + eps / C).sum(axis=1) if soft else np.full(N, 1.0)
    with np.errstate(invalid="ignore", over="ignore"):
        lse_r = fin(torch.logsumexp(t64(xr), dim=1).numpy()) if N else np.zeros(0)
    row_mag = wsc * (ysum + 1) * (C + 1) + 2 * z * (lse_r + 1) * (lse_r + C + 1)
    dn = 1.0 if red != "mean" or denom == 0 else abs(denom)
    scale = go_rows / dn
    gunit = scale * (wsc * (ysum + 1) + 2 * z * (lse_r + 1))
    if red == "none":
        loss_mag = row_mag
    else:
        loss_mag = float(np.sum(scale * (fin(rows_np) + row_mag)))
    return loss, grad, loss_mag, gunit


@_settings(160)
@given(case=ce_cases(), data=st.data())
def test_cross_entropy(backend, case, data):
    dtype, axis, row_shape, C = case["dtype"], case["axis"], case["row_shape"], case["C"]
    cdt = _cdt(dtype)
    ndim = len(row_shape) + 1
    x = _nd(case["x2"], row_shape, axis)
    xin = lay_out(x.astype(dtype), data.draw(layouts(ndim), label="logits layout"))
    if case["soft"]:
        tin = lay_out(_nd(case["y2"], row_shape, axis).astype(dtype), data.draw(layouts(ndim)))
    else:
        signed = [np.int64, np.int32, np.int16] + ([np.int8] if C <= 127 else [])
        unsigned = [np.uint8, np.uint32, np.uint64] if case["t2"].min(initial=0) >= 0 and C <= 255 else []
        tdt = data.draw(st.sampled_from(signed + unsigned))
        tin = lay_out(case["t2"].reshape(row_shape).astype(tdt), data.draw(layouts(ndim - 1)))
    ax = axis if data.draw(st.booleans()) else axis - ndim
    return_grad = data.draw(st.sampled_from([True, True, True, False]))
    gmode = data.draw(st.sampled_from(["none", "none", "fresh", "inplace"])) if return_grad else "none"
    grad_out = None
    if gmode == "fresh":
        grad_out = lay_out(np.full(x.shape, np.nan, dtype), native(data.draw(layouts(ndim))))
    elif gmode == "inplace" and writable_in_place(xin):
        grad_out = xin
    kwargs = dict(case["opts"], axis=ax, reduction=case["reduction"])
    if case["go"] is not None:
        kwargs["grad_output"] = case["go"]
    note(f"kwargs={kwargs} grad_out={gmode} x.dtype={dtype} x.strides={xin.strides}")

    loss_w, grad_w, loss_mag, gunit = ref_cross_entropy(case)
    res = fl.cross_entropy(xin, tin, return_grad=return_grad, grad_out=grad_out, backend=backend, **kwargs)
    loss, grad = res if return_grad else (res, None)
    if case["reduction"] == "none":
        assert loss.dtype == dtype
        check(loss, loss_w, cdt=cdt, mag=loss_mag.reshape(row_shape), what="cross_entropy loss (rows)")
    else:
        check_scalar_type(loss, cdt)
        check(loss, loss_w, cdt=cdt, mag=loss_mag, what="cross_entropy loss")
    if not return_grad:
        return
    if grad_out is not None:
        assert grad is grad_out
    assert grad.dtype == dtype and grad.shape == x.shape
    g2 = np.moveaxis(grad, axis, -1).reshape(-1, C)
    u2 = np.asarray(gunit).reshape(-1, 1)
    check(g2, grad_w, cdt=cdt, kind="grad", unit=u2, mag=u2 * (C + 1), what="cross_entropy grad (rows x classes)")


# ============================================================================= elementwise losses
@st.composite
def ew_base(draw, specials=True):
    dtype = draw(DTYPES)
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(ELEMS if ndim == 1 else DIM, min_size=ndim, max_size=ndim)))
    mode = draw(value_modes(dtype, specials))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    return dtype, shape, mode, reduction


@st.composite
def bcast_shape(draw, shape):
    """A shape broadcastable to ``shape`` without enlarging it."""
    kind = draw(st.sampled_from(["same", "same", "last", "ones"]))
    if kind == "same" or not shape:
        return shape
    if kind == "last":
        return shape[-draw(st.integers(1, len(shape))):]
    return tuple(1 if draw(st.booleans()) else s for s in shape)


def _inject(draw, a, mode):
    flat = a.reshape(-1)
    if mode in ("masked", "inf", "nan") and flat.size:
        pos = draw_positions(draw, flat.size, 2)
        flat[pos] = {"masked": -np.inf, "inf": draw(st.sampled_from([np.inf, -np.inf])), "nan": np.nan}[mode]
    return a


@st.composite
def grad_out_arg(draw, shape, dtype, x_in, return_grad):
    if not return_grad:
        return None, "none"
    kind = draw(st.sampled_from(["none", "none", "fresh", "inplace"]))
    if kind == "fresh":
        return lay_out(np.full(shape, np.nan, dtype), native(draw(layouts(len(shape))))), kind
    if kind == "inplace" and writable_in_place(x_in):
        return x_in, kind
    return None, kind


def _reduce_ref(l, reduction, denom):
    if reduction == "none":
        return l
    return l.sum() / denom if reduction in ("mean", "batchmean") else l.sum()


def _check_ew(got, return_grad, dtype, shape, reduction, loss_t, grad_w, *, loss_mag, gunit, gmag, what,
              grad_out=None):
    """Compare an elementwise loss (and its gradient) with the torch values."""
    cdt = _cdt(dtype)
    loss, grad = got if return_grad else (got, None)
    lw = loss_t.detach().numpy()
    if reduction == "none":
        assert loss.dtype == dtype and loss.shape == shape
        check(loss, lw, cdt=cdt, mag=loss_mag, what=f"{what} loss")
    else:
        check_scalar_type(loss, cdt)
        check(loss, lw, cdt=cdt, mag=loss_mag, what=f"{what} loss")
    if return_grad:
        if grad_out is not None:
            assert grad is grad_out
        assert grad.dtype == dtype and grad.shape == shape
        check(grad, grad_w, cdt=cdt, kind="grad", unit=gunit, mag=gmag, what=f"{what} grad")


def _denom(reduction, shape):
    """The divisor of a reduced loss, for tolerances (1 for an empty mean)."""
    if reduction != "mean":
        return 1.0
    n = math.prod(shape)
    return float(n) if n else 1.0


@_settings(70)
@given(base=ew_base(), data=st.data())
def test_binary_cross_entropy_with_logits(backend, base, data):
    dtype, shape, mode, reduction = base
    draw = data.draw
    cdt = _cdt(dtype)
    lo, hi = value_range(draw, dtype, "normal" if mode in ("masked", "inf", "nan") else mode)
    if mode == "huge" and dtype == np.float32:
        lo, hi = lo / 20, hi / 20  # every weighted term stays below FLT_MAX (see test_fixed_extremes)
    z = _inject(draw, draw_values(draw, shape, dtype, lo, hi), mode)
    y = draw(arrays(np.float64, shape, elements=st.sampled_from([0.0, 1.0, 0.5]) | _finite(0, 1)))
    y = y.astype(dtype).astype(np.float64)
    kw = {}
    w = pw = None
    if draw(st.booleans()):
        w = draw(arrays(np.float64, draw(bcast_shape(shape)), elements=WEIGHTS))
        kw["weight"] = w
        w = w.astype(cdt).astype(np.float64)
    if draw(st.booleans()):
        pshape = draw(st.sampled_from([(), (1,), (shape[-1],), shape] if shape else [()]))
        pw = draw(arrays(np.float64, pshape, elements=st.sampled_from([1.0, 0.5, 0.0]) | _finite(1e-3, 5)))
        kw["pos_weight"] = pw
        pw = pw.astype(cdt).astype(np.float64)
    go = draw(grad_outs(reduction, shape, dtype))
    return_grad = draw(st.sampled_from([True, True, False]))
    zin = lay_out(z.astype(dtype), draw(layouts(len(shape))))
    grad_out, gmode = draw(grad_out_arg(shape, dtype, zin, return_grad))
    note(f"kw={kw} grad_out={gmode} go={go}")
    Z = t64(z, grad=True)
    lt = F.binary_cross_entropy_with_logits(Z, t64(y), weight=None if w is None else t64(w),
                                            pos_weight=None if pw is None else t64(pw), reduction=reduction)
    gw = vjp(lt, [Z], go)[0]
    got = fl.binary_cross_entropy_with_logits(
        zin, lay_out(y.astype(dtype), draw(layouts(len(shape)))), reduction=reduction, return_grad=return_grad,
        grad_output=go, grad_out=grad_out, backend=backend, **kw)
    denom = _denom(reduction, shape)
    wa = np.broadcast_to(fin(1.0 if w is None else w), shape)
    pa = np.broadcast_to(fin(1.0 if pw is None else pw), shape)
    ga = _go_abs(go, shape)
    elem_mag = wa * (1 + pa) * (fin(z) + 1)  # (1-y) z + (1 + (pw-1) y) softplus(-z) cancels at |z|
    loss_mag = elem_mag if reduction == "none" else float(np.sum(ga * elem_mag)) / denom
    gunit = ga * wa * (1 + pa) / denom
    _check_ew(got, return_grad, dtype, shape, reduction, lt, gw, loss_mag=loss_mag, gunit=gunit, gmag=gunit,
              what="binary_cross_entropy_with_logits", grad_out=grad_out)


@_settings(60)
@given(base=ew_base(specials=False), data=st.data())
def test_binary_cross_entropy(backend, base, data):
    dtype, shape, _, reduction = base
    draw = data.draw
    cdt = _cdt(dtype)
    near = [1e-3, 1 - 1e-3, 1e-7, 1 - 1e-7, 2.0 ** -24, 1 - 2.0 ** -24, 1 - 2.0 ** -11, 1e-30]
    p = draw(arrays(np.float64, shape, elements=st.sampled_from([0.0, 1.0, 0.5] + near) | _finite(0, 1)))
    p = np.clip(p.astype(dtype).astype(np.float64), 0, 1)
    y = draw(arrays(np.float64, shape, elements=st.sampled_from([0.0, 1.0]) | _finite(0, 1)))
    y = y.astype(dtype).astype(np.float64)
    if p.size and draw(st.integers(0, 4)) == 0:  # NaN propagates
        (p if draw(st.booleans()) else y).reshape(-1)[draw(st.integers(0, p.size - 1))] = np.nan
    kw = {}
    w = None
    if draw(st.booleans()):
        w = draw(arrays(np.float64, draw(bcast_shape(shape)), elements=WEIGHTS))
        kw["weight"] = w
        w = w.astype(cdt).astype(np.float64)
    go = draw(grad_outs(reduction, shape, dtype))
    return_grad = draw(st.sampled_from([True, True, False]))
    pin = lay_out(p.astype(dtype), draw(layouts(len(shape))))
    grad_out, gmode = draw(grad_out_arg(shape, dtype, pin, return_grad))
    note(f"kw={kw} grad_out={gmode} go={go}")
    # PyTorch refuses NaN probabilities and targets; fastloss lets NaN propagate (documented):
    # the reference is PyTorch's on the other elements, NaN on those
    nanm = np.isnan(p) | np.isnan(y)
    P = t64(np.where(nanm, 0.5, p), grad=True)
    terms = F.binary_cross_entropy(P, t64(np.where(nanm, 0.5, y)), weight=None if w is None else t64(w),
                                   reduction="none")
    terms = torch.where(torch.tensor(nanm), torch.full((), np.nan, dtype=F64), terms)
    lt = _reduce_ref(terms, reduction, float(p.size))
    if not nanm.any() and reduction != "none":  # self-check of the reference
        own = F.binary_cross_entropy(P, t64(y), weight=None if w is None else t64(w), reduction=reduction)
        assert torch.allclose(own, lt, rtol=1e-12, atol=0, equal_nan=True)
    gw = vjp(lt, [P], go)[0]
    gw[nanm] = np.nan
    got = fl.binary_cross_entropy(pin, lay_out(y.astype(dtype), draw(layouts(len(shape)))), reduction=reduction,
                                  return_grad=return_grad, grad_output=go, grad_out=grad_out, backend=backend, **kw)
    denom = _denom(reduction, shape)
    wa = np.broadcast_to(fin(1.0 if w is None else w), shape)
    ga = _go_abs(go, shape)
    # p and y are exact, both log terms are >= 0 and p - y, p (1 - p) are formed exactly or with
    # one rounding: relative accuracy everywhere, on an O(weight) absolute floor
    loss_mag = wa if reduction == "none" else float(np.sum(ga * wa)) / denom
    gunit = ga * wa / denom
    _check_ew(got, return_grad, dtype, shape, reduction, lt, gw, loss_mag=loss_mag, gunit=gunit, gmag=gunit,
              what="binary_cross_entropy", grad_out=grad_out)


@pytest.mark.parametrize("bad", [1.5, -0.25])
def test_binary_cross_entropy_target_outside_unit_interval(backend, bad):
    """PyTorch raises ("all elements of target should be between 0 and 1"); fastloss: ValueError."""
    p = np.array([0.5, 0.25])
    y = np.array([0.0, bad])
    with pytest.raises(RuntimeError):
        F.binary_cross_entropy(t64(p), t64(y))
    with pytest.raises(ValueError):
        fl.binary_cross_entropy(p, y, backend=backend)
    with pytest.raises(ValueError):
        fl.binary_cross_entropy(p, y, return_grad=True, backend=backend)


@_settings(60)
@given(base=ew_base(), log_target=st.booleans(), data=st.data())
def test_kl_div(backend, base, log_target, data):
    dtype, shape, mode, reduction = base
    draw = data.draw
    cdt = _cdt(dtype)
    reduction = draw(st.sampled_from([reduction, "batchmean", "default"]))
    lo, hi = value_range(draw, dtype, "normal" if mode in ("masked", "inf", "nan") else mode)
    if mode == "huge" and dtype == np.float32:
        lo, hi = lo / 8, hi / 8  # every term t (log t - x) or e^t (t - x) stays below FLT_MAX (t <= 3, e^t <= e^2)
    x = _inject(draw, draw_values(draw, shape, dtype, lo, hi), mode)
    tshape = draw(bcast_shape(shape))
    if log_target:
        t = draw_values(draw, tshape, dtype, -20, 2)
        if t.size:
            t.reshape(-1)[draw_positions(draw, t.size, t.size)] = draw(st.sampled_from([-np.inf, 0.0]))
    else:
        t = draw(arrays(np.float64, tshape, elements=st.sampled_from([0.0, 1.0, 1e-30]) | _finite(0, 3)))
        t = t.astype(dtype).astype(np.float64)
    if t.size and mode == "nan" and draw(st.booleans()):
        t.reshape(-1)[0] = np.nan
    red = "batchmean" if reduction == "default" else reduction
    go = draw(grad_outs("none" if red == "none" else "mean", shape, dtype))
    return_grad = draw(st.sampled_from([True, True, False]))
    xin = lay_out(x.astype(dtype), draw(layouts(len(shape))))
    grad_out, gmode = draw(grad_out_arg(shape, dtype, xin, return_grad))
    note(f"reduction={reduction} grad_out={gmode} go={go}")
    X = t64(x, grad=True)
    T = t64(t).expand(shape)
    terms = F.kl_div(X, T, reduction="none", log_target=log_target)
    zero = torch.isneginf(T) if log_target else (T == 0)
    terms = torch.where(zero, torch.zeros((), dtype=F64), terms)  # divergence 4
    if red == "batchmean":
        denom = float(shape[0]) if shape else 1.0
    elif red == "mean":
        denom = float(math.prod(shape))
    else:
        denom = 1.0
    lt = _reduce_ref(terms, red, denom)
    if red in ("mean", "sum", "batchmean") and not (torch.isnan(terms).any() or not math.prod(shape)):
        with warnings.catch_warnings():  # PyTorch's note on "mean"
            warnings.simplefilter("ignore", UserWarning)
            own = F.kl_div(X, T, reduction=red, log_target=log_target)  # self-check of the reference
        if not zero.any():
            assert torch.allclose(own, lt, rtol=1e-12, atol=0, equal_nan=True)
    gw = vjp(lt, [X], go)[0]
    kw = {} if reduction == "default" else {"reduction": reduction}
    got = fl.kl_div(xin, lay_out(t.astype(dtype), draw(layouts(len(tshape)))), log_target=log_target,
                    return_grad=return_grad, grad_output=go, grad_out=grad_out, backend=backend, **kw)
    tb = np.broadcast_to(t, shape)
    with np.errstate(all="ignore"):
        tv = fin(np.exp(tb)) if log_target else fin(tb)
        elem = tv * (fin(np.log(tv)) + fin(x) + fin(tb) + 1)
    ga = _go_abs(go, shape)
    dn = denom if denom else 1.0
    loss_mag = elem if red == "none" else float(np.sum(ga * elem)) / dn
    gunit = ga * tv / dn
    _check_ew(got, return_grad, dtype, shape, red, lt, gw, loss_mag=loss_mag, gunit=gunit, gmag=gunit * 0,
              what=f"kl_div(log_target={log_target})", grad_out=grad_out)


@_settings(60)
@given(base=ew_base(), data=st.data())
def test_mse_loss(backend, base, data):
    dtype, shape, mode, reduction = base
    draw = data.draw
    cdt = _cdt(dtype)
    if mode == "huge":  # |x - t| <= 1.6e38: no intermediate 2 (x - t) overflows in float32
        top = 8e37 if dtype == np.float32 else 4e299
        lo, hi = -top, top
    elif mode == "big" and dtype == np.float32 and draw(st.booleans()):
        lo, hi = -9e18, 9e18  # squares up to 3.2e38: float32 partial sums overflow, the mean does not
    else:
        lo, hi = value_range(draw, dtype, "normal" if mode in ("masked", "inf", "nan") else mode)
    x = _inject(draw, draw_values(draw, shape, dtype, lo, hi), mode)
    tshape = draw(bcast_shape(shape))
    t = draw_values(draw, tshape, dtype, lo, hi)
    go = draw(grad_outs(reduction, shape, dtype))
    return_grad = draw(st.sampled_from([True, True, False]))
    xin = lay_out(x.astype(dtype), draw(layouts(len(shape))))
    grad_out, gmode = draw(grad_out_arg(shape, dtype, xin, return_grad))
    note(f"tshape={tshape} grad_out={gmode} go={go}")
    X = t64(x, grad=True)
    lt = F.mse_loss(X, t64(t).expand(shape), reduction=reduction)
    gw = vjp(lt, [X], go)[0]
    got = fl.mse_loss(xin, lay_out(t.astype(dtype), draw(layouts(len(tshape)))), reduction=reduction,
                      return_grad=return_grad, grad_output=go, grad_out=grad_out, backend=backend)
    denom = _denom(reduction, shape)
    ga = _go_abs(go, shape)
    with np.errstate(all="ignore"):
        elem = fin((x - np.broadcast_to(t, shape)) ** 2)
    loss_mag = elem if reduction == "none" else float(np.sum(ga * elem)) / denom
    gunit = ga / denom
    _check_ew(got, return_grad, dtype, shape, reduction, lt, gw, loss_mag=loss_mag, gunit=gunit, gmag=gunit,
              what="mse_loss", grad_out=grad_out)


@_settings(70)
@given(base=ew_base(specials=False), data=st.data())
def test_gaussian_nll_loss(backend, base, data):
    dtype, shape, mode, reduction = base
    draw = data.draw
    cdt = _cdt(dtype)
    lo, hi = value_range(draw, dtype, "normal" if mode == "huge" else mode)
    x = draw_values(draw, shape, dtype, lo, hi)
    tshape = draw(bcast_shape(shape))
    t = draw_values(draw, tshape, dtype, lo, hi)
    if x.size and draw(st.integers(0, 5)) == 0:
        x.reshape(-1)[draw(st.integers(0, x.size - 1))] = np.nan
    vkinds = ["float", "same", "same", "ones"] + (["fewer"] if shape else [])
    vkind = draw(st.sampled_from(vkinds))
    velems = st.sampled_from([0.0, 1.0, 1e-8, 1e-6, 0.5]) | _finite(1e-4, 10)
    if vkind == "float":
        var = float(np.float64(draw(velems)).astype(cdt))
        vshape = ()
        var_np = np.float64(var)
    else:
        if vkind == "same":
            vshape = shape
        elif vkind == "fewer":
            vshape = shape[:-1]
        else:
            vshape = tuple(1 if draw(st.booleans()) else s for s in shape)
        var_np = draw(arrays(np.float64, vshape, elements=velems)).astype(dtype).astype(np.float64)
        var = lay_out(var_np.astype(dtype), draw(layouts(len(vshape))))
    full = draw(st.booleans())
    eps = draw(st.sampled_from([None, None, 1e-6, 0.0, 1e-3, 0.25]))
    kw = {"full": full}
    if eps is not None:
        kw["eps"] = eps
    eps_v = 1e-6 if eps is None else eps
    go = draw(grad_outs(reduction, shape, dtype))
    return_grad = draw(st.sampled_from([True, True, False]))
    note(f"var={vkind}{vshape} kw={kw} go={go}")
    X = t64(x, grad=True)
    V = t64(var_np, grad=True)
    if vkind == "fewer":
        Vin = V  # PyTorch's own homoscedastic case (unsqueezed)
    else:
        Vin = V.expand(shape)  # PyTorch accepts one size-1 dimension only: broadcast explicitly
    lt = F.gaussian_nll_loss(X, t64(t).expand(shape), Vin, full=full, eps=eps_v, reduction=reduction)
    gx, gv = vjp(lt, [X, V], go)
    got = fl.gaussian_nll_loss(lay_out(x.astype(dtype), draw(layouts(len(shape)))),
                               lay_out(t.astype(dtype), draw(layouts(len(tshape)))), var, reduction=reduction,
                               return_grad=return_grad, grad_output=go, backend=backend, **kw)
    denom = _denom(reduction, shape)
    ga = _go_abs(go, shape)
    vb = np.maximum(np.broadcast_to(var_np[..., None] if vkind == "fewer" else var_np, shape), eps_v)
    d = x - np.broadcast_to(t, shape)
    with np.errstate(all="ignore"):
        elem = 0.5 * (fin(np.log(vb)) + fin(d * d / vb)) + 1
        dvar = 0.5 * (fin(1 / vb) + fin(d * d / vb ** 2))
        gxu = ga / denom * fin((fin(x) + fin(np.broadcast_to(t, shape)) + 1) / vb)
    loss_mag = elem if reduction == "none" else float(np.sum(ga * elem)) / denom
    loss, grads = got if return_grad else (got, None)
    _check_ew(loss, False, dtype, shape, reduction, lt, None, loss_mag=loss_mag, gunit=None, gmag=None,
              what="gaussian_nll_loss")
    if not return_grad:
        return
    d_in, d_var = grads
    assert d_in.dtype == dtype and d_in.shape == shape
    check(d_in, gx, cdt=cdt, kind="grad", unit=ga / denom, mag=gxu, what="gaussian_nll_loss d_input")
    # d_var: summed over the dimensions var is broadcast along
    vu = ga / denom * dvar
    if vkind == "float":
        check_scalar_type(d_var, cdt)
        vu = np.sum(vu)
    else:
        assert isinstance(d_var, np.ndarray) and d_var.dtype == dtype and d_var.shape == vshape
        if vkind == "fewer":
            vu = vu.sum(axis=-1)
        else:
            red_axes = tuple(i for i, (a, b) in enumerate(zip(vshape, shape)) if a == 1 and b != 1)
            vu = vu.sum(axis=red_axes).reshape(vshape) if red_axes else vu
    check(d_var, gv, cdt=cdt, kind="grad", unit=vu, mag=vu, what="gaussian_nll_loss d_var")


# ============================================================================= fixed extremes
# Deterministic cases at the edges Hypothesis reaches only by chance: each is compared with
# PyTorch (float64 autograd) or, where fastloss documents a deliberate divergence, with the
# documented value.
def _torch_ce(x, target, **kw):
    """PyTorch's cross-entropy of 2-D logits (float64) and its gradient (autograd)."""
    X = t64(x, grad=True)
    T = t64(target) if np.asarray(target).dtype.kind == "f" else torch.tensor(np.asarray(target), dtype=torch.long)
    if kw.get("weight") is not None:
        kw["weight"] = t64(kw["weight"])
    loss = F.cross_entropy(X, T, **kw)
    return loss.detach().numpy(), vjp(loss, [X], None)[0]


def _xt_ce_inf_nontarget(backend):
    """Divergence 2: +inf at a non-target class -> loss +inf without label smoothing; with
    smoothing NaN, PyTorch's value (the smoothing term of the +inf class is inf - inf)."""
    x = np.array([[0.0, np.inf, 1.0], [1.0, 2.0, 3.0]])
    t = np.array([0, 2])
    for eps in (0.0, 0.1, 1.0):
        loss = fl.cross_entropy(x, t, label_smoothing=eps, reduction="none", backend=backend)
        want_l = _torch_ce(x, t, label_smoothing=eps, reduction="none")[0]
        if eps == 0:
            assert np.isnan(want_l[0])  # PyTorch's NaN, where fastloss gives the limit
            want_l[0] = np.inf
        check(loss, want_l, cdt=np.dtype(np.float64),
              what=f"cross_entropy(+inf at a non-target class, label_smoothing={eps})")
    # soft targets: +inf at a class of zero target mass (no smoothing)
    y = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    loss = fl.cross_entropy(x, y, reduction="none", backend=backend)
    check(loss, np.array([np.inf, _torch_ce(x[1:], y[1:], reduction="none")[0][0]]), cdt=np.dtype(np.float64),
          what="cross_entropy(soft, +inf at a zero-mass class)")


def _xt_ce_special_weights(backend):
    """Class weights inf/NaN of a class no target uses: PyTorch's values (finite without smoothing)."""
    x = np.array([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    t = np.array([0, 1])
    for wk in (np.nan, np.inf):
        w = np.array([1.0, 2.0, wk])
        for eps in (0.0, 0.1):
            want_l, want_g = _torch_ce(x, t, weight=w, label_smoothing=eps)
            loss, grad = fl.cross_entropy(x, t, weight=w, label_smoothing=eps, return_grad=True, backend=backend)
            what = f"cross_entropy(weight={w}, label_smoothing={eps})"
            check(loss, want_l, cdt=np.dtype(np.float64), what=what + " loss")
            check(grad, want_g, cdt=np.dtype(np.float64), kind="grad", unit=3.0, what=what + " grad")


def _xt_ce_masks(backend):
    """-inf at the target (loss +inf, PyTorch's finite gradient); every target ignored
    (divergence 1: 0 and a zero gradient); soft -inf at a zero-mass class (divergence 3: 0);
    soft zero-mass row holding NaN or +inf (NaN)."""
    x = np.array([[-np.inf, 0.0, 1.0], [0.5, -np.inf, 2.0]])
    t = np.array([0, 2])
    want_l, want_g = _torch_ce(x, t, reduction="sum")
    loss, grad = fl.cross_entropy(x, t, reduction="sum", return_grad=True, backend=backend)
    check(loss, want_l, cdt=np.dtype(np.float64), what="cross_entropy(-inf target) loss")
    check(grad, want_g, cdt=np.dtype(np.float64), kind="grad", what="cross_entropy(-inf target) grad")
    loss, grad = fl.cross_entropy(x, np.array([-100, -100]), return_grad=True, backend=backend)
    check(loss, 0.0, cdt=np.dtype(np.float64), what="cross_entropy(all ignored) loss")
    check(grad, np.zeros_like(x), cdt=np.dtype(np.float64), kind="grad", what="cross_entropy(all ignored) grad")
    y = np.array([[0.0, 0.25, 0.75], [0.5, 0.0, 0.5]])
    loss, grad = fl.cross_entropy(x, y, reduction="none", return_grad=True, grad_output=np.ones(2), backend=backend)
    want_l, want_g = _torch_ce(np.where(np.isneginf(x), -1e300, x), y, reduction="none")
    check(loss, want_l, cdt=np.dtype(np.float64), what="cross_entropy(soft, -inf at zero mass) loss")
    check(grad, want_g, cdt=np.dtype(np.float64), kind="grad", what="cross_entropy(soft, -inf at zero mass) grad")
    for bad in (np.nan, np.inf):
        xb = np.array([[0.0, bad, 1.0], [1.0, 2.0, 3.0]])
        yb = np.array([[0.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
        loss = fl.cross_entropy(xb, yb, reduction="none", backend=backend)
        check(loss, np.array([np.nan, _torch_ce(xb[1:], yb[1:], reduction="none")[0][0]]), cdt=np.dtype(np.float64),
              what=f"cross_entropy(soft, zero-mass row holding {bad})")


def _xt_ce_ignored_rows(backend):
    """An ignored row: loss 0 and gradient 0 even when it holds NaN/inf logits or its class
    weight is inf/NaN (PyTorch: a NaN gradient there, 0 * inf); the kept rows are PyTorch's."""
    x = np.array([[np.nan, 1.0, np.inf], [1.0, 2.0, 3.0], [-np.inf, np.inf, 0.0], [0.5, -1.0, 2.0]])
    t = np.array([-100, 1, -100, 2])
    kept = t != -100
    for eps in (0.0, 0.1):
        loss, grad = fl.cross_entropy(x, t, label_smoothing=eps, reduction="sum", return_grad=True, backend=backend)
        want_l, want_g = _torch_ce(x[kept], t[kept], label_smoothing=eps, reduction="sum")
        want = np.zeros_like(x)
        want[kept] = want_g
        check(loss, want_l, cdt=np.dtype(np.float64), what=f"cross_entropy(ignored non-finite rows, eps={eps}) loss")
        check(grad, want, cdt=np.dtype(np.float64), kind="grad", what=f"cross_entropy(ignored rows, eps={eps}) grad")
    xf = np.array([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]])
    for wk in (np.inf, np.nan):
        w = np.array([wk, 1.0, 2.0])
        tw = np.array([0, 2])  # row 0's target has the non-finite weight: ignored below
        loss, grad = fl.cross_entropy(xf, tw, weight=w, ignore_index=0, reduction="sum", return_grad=True,
                                      backend=backend)
        want_l, want_g = _torch_ce(xf[1:], tw[1:], weight=w, reduction="sum")
        check(loss, want_l, cdt=np.dtype(np.float64), what=f"cross_entropy(ignored row, weight {wk}) loss")
        check(grad, np.vstack([np.zeros(3), want_g]), cdt=np.dtype(np.float64), kind="grad", unit=2.0,
              what=f"cross_entropy(ignored row, weight {wk}) grad")


def _xt_softmax_posinf(backend):
    """A row holding +inf: softmax and log_softmax are all NaN, as in PyTorch; other rows exact."""
    x = np.array([[np.inf, 0.0, 1.0], [0.0, 1.0, 2.0], [np.inf, -np.inf, 0.0]])
    for dt in (np.float64, np.float32):
        for name in ("softmax", "log_softmax"):
            got = getattr(fl, name)(x.astype(dt), backend=backend)
            want = getattr(torch, name)(t64(x), dim=-1).numpy()
            check(got, want, cdt=np.dtype(dt), kind="grad", mag=4.0, what=f"{name}(+inf row, {np.dtype(dt)})")


def _xt_bce_clamped_grad(backend):
    """p(1-p) below the clamp: PyTorch's gradient (its float64 kernel clamps at float32(1e-12))."""
    p = np.array([0.0, 1.0, 1e-13, 0.5])
    y = np.array([1.0, 0.0, 0.5, 1.0])
    P = t64(p, grad=True)
    lt = F.binary_cross_entropy(P, t64(y), reduction="sum")
    loss, grad = fl.binary_cross_entropy(p, y, reduction="sum", return_grad=True, backend=backend)
    check(loss, lt.detach().numpy(), cdt=np.dtype(np.float64), what="binary_cross_entropy(p at 0/1) loss")
    check(grad, vjp(lt, [P], None)[0], cdt=np.dtype(np.float64), kind="grad",
          what="binary_cross_entropy(p at 0/1) grad")


# float32 elementwise losses with one term beyond FLT_MAX while the float64 mean is not: the
# term is computed in float32 (the SPEC's native float32), so it is inf and so is the reduced
# loss -- PyTorch's float32 value (README, "Semantics").  The same values in float64 give the
# finite mean of PyTorch's float64.
def _f32_overflow(backend, name, torch_fn, args, **kw):
    def torch_value(conv, arrays, kw):
        tkw = {k: conv(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
        return torch_fn(*[conv(a) for a in arrays], **tkw).item()

    want32 = torch_value(torch.from_numpy, args, kw)
    assert np.isinf(want32), want32  # the case really overflows float32
    got = getattr(fl, name)(*args, backend=backend, **kw)
    check_scalar_type(got, np.dtype(np.float32))
    assert got == want32, f"{name}(float32, a term beyond FLT_MAX): {got!r}, PyTorch float32 {want32!r}"
    a64 = [a.astype(np.float64) for a in args]
    kw64 = {k: v.astype(np.float64) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    want64 = torch_value(t64, a64, kw64)
    assert np.isfinite(want64), want64
    check(getattr(fl, name)(*a64, backend=backend, **kw64), want64, cdt=np.dtype(np.float64),
          what=f"{name}(the same values in float64)")


def _xt_f32_overflow_bce_logits(backend):
    z = np.array([-7e37, 0.0], np.float32)  # the first term: 5 * 7e37 = 3.5e38 > FLT_MAX
    _f32_overflow(backend, "binary_cross_entropy_with_logits", F.binary_cross_entropy_with_logits,
                  [z, np.ones(2, np.float32)], pos_weight=np.array([5.0], np.float32))


def _xt_f32_overflow_mse(backend):
    x = np.array([1.9e19, 0.0, 0.0, 0.0], np.float32)  # (1.9e19)**2 = 3.6e38 > FLT_MAX
    _f32_overflow(backend, "mse_loss", F.mse_loss, [x, np.zeros(4, np.float32)])


def _xt_f32_overflow_kl(backend):
    x = np.array([1.2e38, 0.0], np.float32)  # 3 * (log 3 - 1.2e38) = -3.6e38 < -FLT_MAX
    t = np.array([3.0, 3.0], np.float32)
    _f32_overflow(backend, "kl_div", F.kl_div, [x, t], reduction="sum")
    x = np.array([5e37, 0.0], np.float32)  # e**2 * (2 - 5e37) = -3.7e38
    lt = np.array([2.0, 2.0], np.float32)
    _f32_overflow(backend, "kl_div", F.kl_div, [x, lt], reduction="sum", log_target=True)


def _xt_gnll_transposed(backend):
    """3-D transposed (non-contiguous) input, target and var: d_input and d_var as PyTorch."""
    r = np.random.default_rng(7)
    x = r.standard_normal((2, 3, 4)).transpose(2, 0, 1)
    t = r.standard_normal((4, 2, 3))
    v = (r.random((2, 3, 4)) + 0.1).transpose(2, 0, 1)
    X, V = t64(x, grad=True), t64(v, grad=True)
    lt = F.gaussian_nll_loss(X, t64(t), V, reduction="sum")
    gx, gv = vjp(lt, [X, V], None)
    loss, (dx, dv) = fl.gaussian_nll_loss(x, t, v, reduction="sum", return_grad=True, backend=backend)
    check(loss, lt.detach().numpy(), cdt=np.dtype(np.float64), mag=30.0, what="gaussian_nll_loss(3-D transposed) loss")
    check(dx, gx, cdt=np.dtype(np.float64), kind="grad", unit=10.0, what="gaussian_nll_loss(3-D transposed) d_input")
    check(dv, gv, cdt=np.dtype(np.float64), kind="grad", unit=100.0, what="gaussian_nll_loss(3-D transposed) d_var")


def _xt_kl_zero_target(backend):
    """Divergence 4: the term is 0 where the target is 0 (log-target -inf), even at input -inf."""
    x = np.array([[-np.inf, -1.0], [-2.0, -0.5]])
    t = np.array([[0.0, 1.0], [0.25, 0.75]])
    X = t64(x, grad=True)
    terms = torch.where(t64(t) == 0, torch.zeros((), dtype=F64), F.kl_div(X, t64(t), reduction="none"))
    lt = terms.sum() / 2
    loss, grad = fl.kl_div(x, t, return_grad=True, backend=backend)
    check(loss, lt.detach().numpy(), cdt=np.dtype(np.float64), what="kl_div(target 0 at input -inf) loss")
    check(grad, vjp(lt, [X], None)[0], cdt=np.dtype(np.float64), kind="grad", what="kl_div(target 0) grad")
    with np.errstate(divide="ignore"):
        lg = np.log(t)
    loss = fl.kl_div(x, lg, log_target=True, backend=backend)
    check(loss, lt.detach().numpy(), cdt=np.dtype(np.float64), what="kl_div(log_target -inf at input -inf) loss")


EXTREMES = {f.__name__[4:]: f for f in (
    _xt_ce_inf_nontarget, _xt_ce_special_weights, _xt_ce_masks, _xt_ce_ignored_rows, _xt_softmax_posinf, _xt_bce_clamped_grad,
    _xt_f32_overflow_bce_logits, _xt_f32_overflow_mse, _xt_f32_overflow_kl, _xt_gnll_transposed,
    _xt_kl_zero_target)}


@pytest.mark.parametrize("case", list(EXTREMES))
def test_fixed_extremes(backend, case):
    EXTREMES[case](backend)
