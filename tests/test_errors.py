"""Every error path: exception type, and a message that names the argument (and, for dtypes,
the dtype found and the fix); inputs are never modified, also when a call raises."""
from __future__ import annotations

import re

import numpy as np
import pytest

import fastloss as fl
from conftest import rng

X = rng(0).standard_normal((3, 4))
T = np.array([0, 3, 1])
P = rng(1).uniform(0.1, 0.9, (3, 4))
Y = rng(2).uniform(0, 1, (3, 4))


def _first_arg_calls():
    """(name of the differentiated argument, call(first_arg, backend))."""
    return [
        ("x", lambda a, b: fl.logsumexp(a, backend=b)),
        ("x", lambda a, b: fl.softmax(a, backend=b)),
        ("x", lambda a, b: fl.log_softmax(a, backend=b)),
        ("logits", lambda a, b: fl.cross_entropy(a, T, backend=b)),
        ("logits", lambda a, b: fl.binary_cross_entropy_with_logits(a, Y, backend=b)),
        ("probs", lambda a, b: fl.binary_cross_entropy(a, Y, backend=b)),
        ("input", lambda a, b: fl.kl_div(a, P, backend=b)),
        ("input", lambda a, b: fl.mse_loss(a, Y, backend=b)),
        ("input", lambda a, b: fl.gaussian_nll_loss(a, Y, P, backend=b)),
    ]


BAD_DTYPES = [np.int64, np.int32, np.bool_, np.complex128, np.uint8, object]


@pytest.mark.parametrize("bad", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("which", range(9))
def test_type_error_first_argument(backend, which, bad):
    name, call = _first_arg_calls()[which]
    a = np.ones((3, 4), dtype=bad)
    if np.dtype(bad) == np.bool_:
        a = np.ones((3, 4), bool)
    with pytest.raises(TypeError) as ei:
        call(a, backend)
    msg = str(ei.value)
    assert name in msg, f"message should name the argument {name!r}: {msg}"
    assert np.dtype(bad).name in msg, f"message should name the dtype found: {msg}"
    assert ".astype(np.float" in msg or "dtype=np.float" in msg, f"message should give the fix (.astype(np.float32)): {msg}"


@pytest.mark.parametrize("call,name", [
    (lambda b: fl.mse_loss(X, np.ones((3, 4), np.complex64), backend=b), "target"),
    (lambda b: fl.kl_div(X, np.ones((3, 4), np.int64), backend=b), "target"),
    (lambda b: fl.binary_cross_entropy_with_logits(X, Y, weight=np.ones(4, np.complex128), backend=b), "weight"),
    (lambda b: fl.binary_cross_entropy_with_logits(X, Y, pos_weight=np.ones(4, object), backend=b), "pos_weight"),
    (lambda b: fl.cross_entropy(X, T, weight=np.ones(4, np.complex64), backend=b), "weight"),
    (lambda b: fl.gaussian_nll_loss(X, Y, np.ones((3, 4), np.complex128), backend=b), "var"),
    (lambda b: fl.softmax_backward(np.ones((3, 4), np.int64), P, backend=b), "grad"),
    (lambda b: fl.log_softmax_backward(X, np.ones((3, 4), bool), backend=b), "y"),
], ids=["mse-target", "kl-target", "bce-weight", "bce-pos_weight", "ce-weight", "gnll-var", "smb-grad", "lsmb-y"])
def test_type_error_other_arguments(backend, call, name):
    with pytest.raises(TypeError, match=name):
        call(backend)


def test_ce_target_dtype(backend):
    # floating target shaped like the logits without the class axis is not a class index:
    # the message says how to make it one
    with pytest.raises(ValueError, match=r"target: .*class indices must be integers: .*target\.astype\(np\.int64\)"):
        fl.cross_entropy(X, T.astype(np.float64), backend=backend)
    with pytest.raises(TypeError, match=r"target: .*found dtype complex64; convert it with target\.astype\(np\.int64\)"):
        fl.cross_entropy(X, T.astype(np.complex64), backend=backend)


def test_ce_transposed_logits_say_which_axis(backend):
    # logits (C, N) with N targets: the target fits, the class axis does not -- the message
    # (naming target, the argument that disagrees) points at axis=0
    with pytest.raises(ValueError, match=r"target: expected class indices of shape \(4,\).*found \(3,\); "
                                         r"it fits logits of shape \(4, 3\) with the classes along axis 0: pass axis=0"):
        fl.cross_entropy(np.ascontiguousarray(X.T), T, backend=backend)
    # a target that fits no axis gets no hint
    with pytest.raises(ValueError) as ei:
        fl.cross_entropy(X, np.array([0, 1]), backend=backend)
    assert "fits" not in str(ei.value), ei.value


# ----------------------------------------------------------------------------- ValueError
VALUE_ERRORS = {
    "ce-target-shape": (lambda b: fl.cross_entropy(X, np.array([0, 1]), backend=b), "target"),
    "ce-soft-target-shape": (lambda b: fl.cross_entropy(X, np.ones((3, 5)) / 5, backend=b), "target"),
    "ce-weight-shape": (lambda b: fl.cross_entropy(X, T, weight=np.ones(3), backend=b), "weight"),
    "ce-reduction": (lambda b: fl.cross_entropy(X, T, reduction="avg", backend=b), "reduction"),
    "ce-label_smoothing-high": (lambda b: fl.cross_entropy(X, T, label_smoothing=1.5, backend=b), "label_smoothing"),
    "ce-label_smoothing-neg": (lambda b: fl.cross_entropy(X, T, label_smoothing=-0.1, backend=b), "label_smoothing"),
    "ce-axis": (lambda b: fl.cross_entropy(X, T, axis=2, backend=b), "axis"),
    "lse-axis": (lambda b: fl.logsumexp(X, axis=5, backend=b), "axis"),
    "softmax-out-shape": (lambda b: fl.softmax(X, out=np.empty((4, 3)), backend=b), "out"),
    "softmax-out-dtype": (lambda b: fl.softmax(X, out=np.empty((3, 4), np.float32), backend=b), "out"),
    "smb-shape": (lambda b: fl.softmax_backward(X, np.ones((3, 5)), backend=b), ""),
    "bce-shape": (lambda b: fl.binary_cross_entropy_with_logits(X, np.ones((3, 5)), backend=b), "target"),
    "bce-reduction": (lambda b: fl.binary_cross_entropy_with_logits(X, Y, reduction="batchmean", backend=b), "reduction"),
    "bce-pos_weight-shape": (lambda b: fl.binary_cross_entropy_with_logits(X, Y, pos_weight=np.ones(3), backend=b), "pos_weight"),
    "bce-weight-shape": (lambda b: fl.binary_cross_entropy_with_logits(X, Y, weight=np.ones(5), backend=b), "weight"),
    "bce-probs-high": (lambda b: fl.binary_cross_entropy(P + 1, Y, backend=b), "probs"),
    "bce-probs-neg": (lambda b: fl.binary_cross_entropy(P - 1, Y, backend=b), "probs"),
    "kl-reduction": (lambda b: fl.kl_div(X, P, reduction="avg", backend=b), "reduction"),
    "kl-shape": (lambda b: fl.kl_div(X, np.ones((4, 3)), backend=b), "target"),
    "mse-shape": (lambda b: fl.mse_loss(X, np.ones((5,)), backend=b), "target"),
    "mse-reduction": (lambda b: fl.mse_loss(X, Y, reduction="batchmean", backend=b), "reduction"),
    "gnll-neg-var": (lambda b: fl.gaussian_nll_loss(X, Y, -P, backend=b), "var"),
    "gnll-neg-float-var": (lambda b: fl.gaussian_nll_loss(X, Y, -1.0, backend=b), "var"),
    "gnll-var-shape": (lambda b: fl.gaussian_nll_loss(X, Y, np.ones((2, 4)), backend=b), "var"),
    "gnll-reduction": (lambda b: fl.gaussian_nll_loss(X, Y, P, reduction="batchmean", backend=b), "reduction"),
    "grad_out-shape": (lambda b: fl.cross_entropy(X, T, return_grad=True, grad_out=np.empty((3, 5)), backend=b), "grad_out"),
    "grad_out-dtype": (lambda b: fl.cross_entropy(X, T, return_grad=True, grad_out=np.empty((3, 4), np.float32), backend=b), "grad_out"),
    "grad_out-no-return_grad": (lambda b: fl.cross_entropy(X, T, grad_out=np.empty((3, 4)), backend=b), "grad_out"),
    "mse-grad_out-shape": (lambda b: fl.mse_loss(X, Y, return_grad=True, grad_out=np.empty((4, 3)), backend=b), "grad_out"),
    "bce-grad_out-no-return_grad": (lambda b: fl.binary_cross_entropy(P, Y, grad_out=np.empty((3, 4)), backend=b), "grad_out"),
    "kl-grad_out-dtype": (lambda b: fl.kl_div(X, P, return_grad=True, grad_out=np.empty((3, 4), np.float16), backend=b), "grad_out"),
    "grad_output-shape-none": (lambda b: fl.cross_entropy(X, T, reduction="none", return_grad=True, grad_output=np.ones(4), backend=b), "grad_output"),
    "grad_output-array-mean": (lambda b: fl.mse_loss(X, Y, return_grad=True, grad_output=np.ones((3, 4)), backend=b), "grad_output"),
    "grad_output-shape-elementwise": (lambda b: fl.mse_loss(X, Y, reduction="none", return_grad=True, grad_output=np.ones((3, 5)), backend=b), "grad_output"),
}


@pytest.mark.parametrize("case", list(VALUE_ERRORS))
def test_value_errors(backend, case):
    call, name = VALUE_ERRORS[case]
    with pytest.raises(ValueError) as ei:
        call(backend)
    if name:
        assert name in str(ei.value), f"message should name {name!r}: {ei.value}"


def test_value_error_messages_say_expected_and_found(backend):
    with pytest.raises(ValueError) as ei:
        fl.cross_entropy(X, T, reduction="avg", backend=backend)
    msg = str(ei.value)
    assert "avg" in msg and "mean" in msg and "sum" in msg and "none" in msg, msg
    with pytest.raises(ValueError) as ei:
        fl.cross_entropy(X, T, label_smoothing=1.5, backend=backend)
    assert "1.5" in str(ei.value), ei.value
    with pytest.raises(ValueError) as ei:
        fl.cross_entropy(X, T, return_grad=True, grad_out=np.empty((3, 5)), backend=backend)
    assert "(3, 5)" in str(ei.value) and "(3, 4)" in str(ei.value), ei.value


# ----------------------------------------------------------------------------- IndexError
@pytest.mark.parametrize("bad,pos", [(4, 1), (-1, 2), (-7, 0), (100, 2)])
def test_index_error_names_value_and_position(backend, bad, pos):
    t = T.copy()
    t[pos] = bad
    with pytest.raises(IndexError) as ei:
        fl.cross_entropy(X, t, backend=backend)
    msg = str(ei.value)
    assert "target" in msg, msg
    assert str(bad) in msg, f"message should name the value {bad}: {msg}"
    assert re.search(rf"\b{pos}\b", msg.replace(str(bad), "")), f"message should name the position {pos}: {msg}"


def test_index_error_axis1_position(backend):
    x = rng(3).standard_normal((2, 4, 3))
    t = np.zeros((2, 3), np.int64)
    t[1, 2] = 9
    with pytest.raises(IndexError) as ei:
        fl.cross_entropy(x, t, axis=1, backend=backend)
    msg = str(ei.value)
    assert "9" in msg and ("(1, 2)" in msg or "[1, 2]" in msg or "1, 2" in msg), msg


def test_ignore_index_is_not_an_index_error(backend):
    t = np.array([-1, 0, 2])
    loss = fl.cross_entropy(X, t, ignore_index=-1, backend=backend)
    assert np.isfinite(loss)


# ----------------------------------------------------------------------------- backends
def test_unknown_backend_lists_known():
    with pytest.raises(fl.BackendUnavailable) as ei:
        fl.logsumexp(X, backend="tensorflow")
    msg = str(ei.value)
    assert "tensorflow" in msg
    for known in ("numpy", "numba", "cython", "cuda"):
        assert known in msg, msg
    assert isinstance(ei.value, RuntimeError)
    with pytest.raises(fl.BackendUnavailable):
        fl.set_backend("tensorflow")
    with pytest.raises(fl.BackendUnavailable):
        with fl.use_backend("tensorflow"):
            pass


def test_unavailable_backend_says_why():
    for name, st in fl.backends().items():
        if not st.available:
            with pytest.raises(fl.BackendUnavailable) as ei:
                fl.logsumexp(X, backend=name)
            assert name in str(ei.value) and st.reason.split(":")[0] in str(ei.value)


# ----------------------------------------------------------------------------- nothing modified
def _snap(*arrays):
    return [a.copy() for a in arrays]


def _same(before, after):
    return all(np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after))


def test_inputs_never_modified(backend):
    x = rng(4).standard_normal((3, 4))
    t = np.array([0, -100, 2])
    w = rng(5).uniform(0.5, 2, 4)
    y = rng(6).dirichlet(np.ones(4), 3)
    z = rng(7).uniform(0, 1, (3, 4))
    var = rng(8).uniform(0.5, 2, (3, 1))
    go = rng(9).standard_normal(3)
    arrays = [x, t, w, y, z, var, go]
    before = _snap(*arrays)
    fl.cross_entropy(x, t, weight=w, label_smoothing=0.1, z_loss=0.1, reduction="none", return_grad=True,
                     grad_output=go, backend=backend)
    fl.cross_entropy(x, y, weight=w, return_grad=True, backend=backend)
    fl.binary_cross_entropy_with_logits(x, z, weight=w, pos_weight=w, return_grad=True, backend=backend)
    fl.binary_cross_entropy(z, y, weight=w, return_grad=True, backend=backend)
    fl.kl_div(x, y, return_grad=True, backend=backend)
    fl.mse_loss(x, z, return_grad=True, backend=backend)
    fl.gaussian_nll_loss(x, z, var, return_grad=True, backend=backend)
    fl.softmax_backward(x, y, backend=backend)
    fl.log_softmax_backward(x, y, backend=backend)
    assert _same(before, arrays)


def test_nothing_written_when_call_raises(backend):
    x = rng(10).standard_normal((3, 4))
    t = np.array([0, 7, 2])  # bad index
    before = x.copy()
    with pytest.raises(IndexError):
        fl.cross_entropy(x, t, return_grad=True, grad_out=x, backend=backend)  # in-place buffer
    assert np.array_equal(x, before), "in-place logits buffer was touched before the IndexError"
    buf = np.full((3, 4), 5.0)
    with pytest.raises(IndexError):
        fl.cross_entropy(x, t, return_grad=True, grad_out=buf, backend=backend)
    assert np.all(buf == 5.0)
    # the bad index is in the last row: a row-by-row kernel would already have written rows 0-1
    t2 = np.array([0, 1, 4])
    with pytest.raises(IndexError):
        fl.cross_entropy(x, t2, return_grad=True, grad_out=x, backend=backend)
    assert np.array_equal(x, before)
    p = rng(11).uniform(0, 1, (3, 4))
    p[2, 3] = 1.5
    pb = p.copy()
    with pytest.raises(ValueError):
        fl.binary_cross_entropy(p, p * 0, return_grad=True, grad_out=p, backend=backend)
    assert np.array_equal(p, pb)
    with pytest.raises(ValueError):
        fl.gaussian_nll_loss(x, x, -np.ones((3, 4)), return_grad=True, backend=backend)
    assert np.array_equal(x, before)
    with pytest.raises(ValueError):
        fl.cross_entropy(x, np.array([0, 1, 2]), label_smoothing=2.0, return_grad=True, grad_out=x, backend=backend)
    assert np.array_equal(x, before)
    out = np.full((3, 4), 5.0)
    with pytest.raises(ValueError):
        fl.mse_loss(x, x, reduction="none", return_grad=True, grad_output=np.ones(5), grad_out=out, backend=backend)
    assert np.all(out == 5.0)
