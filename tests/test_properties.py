"""Hypothesis properties: shift invariance, normalization, logsumexp bounds, and the identity
between 2-class cross-entropy and BCE-with-logits on the logit difference."""
from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.special import logsumexp as sp_lse

import fastloss as fl
from conftest import SIM

MAXN, MAXC = (3, 4) if SIM else (6, 9)
finite = st.floats(-60, 60, allow_nan=False, allow_infinity=False, width=64)
shapes = st.tuples(st.integers(1, MAXN), st.integers(1, MAXC))
mats = shapes.flatmap(lambda s: arrays(np.float64, s, elements=finite))
shifts = st.floats(-1e3, 1e3, allow_nan=False, width=64)


@given(x=mats, c=shifts)
def test_softmax_shift_invariant(backend, x, c):
    s0 = fl.softmax(x, backend=backend)
    s1 = fl.softmax(x + c, backend=backend)
    # x + c is rounded: |error| <= ulp(|x| + |c|), which moves softmax by at most that much
    np.testing.assert_allclose(s1, s0, rtol=1e-9, atol=1e-14 * (60 + abs(c)))
    l0 = fl.log_softmax(x, backend=backend)
    l1 = fl.log_softmax(x + c, backend=backend)
    np.testing.assert_allclose(l1, l0, rtol=1e-9, atol=1e-14 * (60 + abs(c)))


@given(x=mats, c=shifts, data=st.data())
def test_cross_entropy_shift_invariant(backend, x, c, data):
    n, k = x.shape
    t = np.array(data.draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)))
    l0, g0 = fl.cross_entropy(x, t, reduction="none", return_grad=True, grad_output=np.ones(n), backend=backend)
    l1, g1 = fl.cross_entropy(x + c, t, reduction="none", return_grad=True, grad_output=np.ones(n), backend=backend)
    np.testing.assert_allclose(l1, l0, rtol=1e-9, atol=1e-14 * (60 + abs(c)))
    np.testing.assert_allclose(g1, g0, rtol=1e-9, atol=1e-14 * (60 + abs(c)))


@given(x=mats)
def test_softmax_rows_sum_to_one(backend, x):
    for dt, tol in ((np.float64, 1e-13), (np.float32, 1e-6)):
        s = fl.softmax(x.astype(dt), backend=backend)
        assert np.all(s >= 0) and np.all(s <= 1)
        np.testing.assert_allclose(s.sum(axis=-1, dtype=np.float64), 1.0, rtol=0, atol=tol * x.shape[1])
        ls = fl.log_softmax(x.astype(dt), backend=backend)
        assert np.all(ls <= 1e-6)
        np.testing.assert_allclose(np.exp(ls.astype(np.float64)).sum(axis=-1), 1.0, rtol=0, atol=5 * tol * x.shape[1])


@given(x=mats)
def test_logsumexp_bounds(backend, x):
    lse = fl.logsumexp(x, backend=backend)
    m = x.max(axis=-1)
    assert np.all(lse >= m)
    assert np.all(lse <= m + np.log(x.shape[1]) + 1e-12)
    np.testing.assert_allclose(lse, sp_lse(x, axis=-1), rtol=1e-12, atol=1e-13)
    lse32 = fl.logsumexp(x.astype(np.float32), backend=backend)
    assert np.all(lse32 >= x.astype(np.float32).max(axis=-1))


@given(z=arrays(np.float64, st.integers(1, 12), elements=st.floats(-30, 30, width=64)),
       data=st.data(), soft=st.booleans())
def test_two_class_ce_equals_bce_with_logits(backend, z, data, soft):
    n = z.shape[0]
    base = np.array(data.draw(st.lists(st.floats(-5, 5, width=64), min_size=n, max_size=n)))
    logits = np.stack([base, base + z], axis=1)  # logit difference z
    if soft:
        y = np.array(data.draw(st.lists(st.floats(0, 1, width=64), min_size=n, max_size=n)))
        target = np.stack([1 - y, y], axis=1)
    else:
        y = np.array(data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
        target = y
    ce, gce = fl.cross_entropy(logits, target, reduction="none", return_grad=True, grad_output=np.ones(n),
                               backend=backend)
    bce, gb = fl.binary_cross_entropy_with_logits(z, y.astype(np.float64), reduction="none", return_grad=True,
                                                  grad_output=np.ones(n), backend=backend)
    np.testing.assert_allclose(ce, bce, rtol=1e-10, atol=1e-12)
    # dCE/dlogit_1 = dBCE/dz, dCE/dlogit_0 = -dBCE/dz
    np.testing.assert_allclose(gce[:, 1], gb, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gce[:, 0], -gb, rtol=1e-9, atol=1e-12)
