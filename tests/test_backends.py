"""Backend selection (set_backend / use_backend / FASTLOSS_BACKEND), the backends() report,
set_num_threads, the public namespace, and that importing fastloss compiles nothing."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy.special import logsumexp as sp_lse

import fastloss as fl
from conftest import sizes

npb = importlib.import_module("fastloss._backends.numpy_backend")

PUBLIC = ["logsumexp", "softmax", "log_softmax", "softmax_backward", "log_softmax_backward", "cross_entropy",
          "binary_cross_entropy_with_logits", "binary_cross_entropy", "kl_div", "mse_loss", "gaussian_nll_loss",
          "backends", "set_backend", "use_backend", "set_num_threads", "BackendUnavailable"]
LOSSES = PUBLIC[:11]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    e = dict(os.environ)
    e.pop("FASTLOSS_BACKEND", None)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=e,
                          cwd=REPO, timeout=300)


def test_public_namespace():
    for name in PUBLIC:
        assert hasattr(fl, name), name
        assert name in fl.__all__, name
    assert issubclass(fl.BackendUnavailable, RuntimeError)


@pytest.mark.parametrize("name", LOSSES)
def test_docstrings(name):
    doc = getattr(fl, name).__doc__ or ""
    assert "Parameters" in doc and "Returns" in doc and "Examples" in doc, f"{name}: numpydoc sections missing"
    assert ">>>" in doc, f"{name}: no example"


def test_fl_backends_is_the_function_and_shadows_no_subpackage():
    """The kernel sets live in the private ``fastloss._backends``: ``fastloss.backends`` is only
    the report function, whether or not a backend module was imported."""
    import importlib.util

    importlib.import_module("fastloss._backends.numpy_backend")
    assert callable(fl.backends) and importlib.util.find_spec("fastloss.backends") is None
    from fastloss import backends

    assert backends is fl.backends and isinstance(backends(), dict)


def test_backends_report():
    rep = fl.backends()
    assert set(rep) >= {"numpy", "numba", "cython", "cuda"}
    assert rep["numpy"].available
    for name, st in rep.items():
        assert isinstance(st.available, bool)
        if st.available:
            assert st.reason == ""
        else:
            assert st.reason, f"{name} unavailable without a reason"


class _Spy:
    def __init__(self, monkeypatch, module, fname):
        self.calls = 0
        orig = getattr(module, fname)

        def wrapper(*a, **k):
            self.calls += 1
            return orig(*a, **k)

        monkeypatch.setattr(module, fname, wrapper)


def test_set_backend_and_use_backend(monkeypatch):
    x = np.random.default_rng(0).standard_normal((3, 4))
    spy = _Spy(monkeypatch, npb, "logsumexp")
    other = [n for n, st in fl.backends().items() if st.available and n not in ("numpy", "cuda")]
    try:
        fl.set_backend("numpy")
        np.testing.assert_allclose(fl.logsumexp(x), sp_lse(x, axis=-1), rtol=1e-12)
        assert spy.calls == 1, "set_backend('numpy') did not route the call to the numpy backend"
        if other:
            with fl.use_backend(other[0]):
                fl.logsumexp(x)
                assert spy.calls == 1, f"use_backend({other[0]!r}) still used numpy"
            fl.logsumexp(x)
            assert spy.calls == 2, "use_backend did not restore the previous backend"
        with fl.use_backend("numpy"):
            fl.logsumexp(x)
        assert spy.calls == (3 if other else 2)
        # an explicit backend= wins over the default
        if other:
            fl.logsumexp(x, backend=other[0])
            assert spy.calls == 3
        # the context manager restores the default even when the body raises
        fl.set_backend("auto")
        with pytest.raises(KeyError):
            with fl.use_backend("numpy"):
                raise KeyError
        before = spy.calls
        fl.logsumexp(x)
        assert spy.calls == before + (0 if other else 1)  # auto prefers a compiled backend when there is one
    finally:
        fl.set_backend("auto")


def test_set_backend_unknown_keeps_default():
    fl.set_backend("numpy")
    try:
        with pytest.raises(fl.BackendUnavailable):
            fl.set_backend("bogus")
        x = np.ones((2, 3))
        np.testing.assert_allclose(fl.logsumexp(x), np.log(3) + 1)
    finally:
        fl.set_backend("auto")


def test_env_backend_numpy():
    r = _run("""
        import importlib, numpy as np, fastloss as fl; nb = importlib.import_module("fastloss._backends.numpy_backend")
        calls = []
        orig = nb.cross_entropy
        nb.cross_entropy = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
        fl.cross_entropy(np.zeros((2, 3)), np.array([0, 1]))
        print("CALLS", len(calls))
    """, FASTLOSS_BACKEND="numpy")
    assert r.returncode == 0, r.stderr
    assert "CALLS 1" in r.stdout, r.stdout + r.stderr


def test_env_backend_bogus():
    r = _run("""
        import numpy as np
        try:
            import fastloss as fl
            fl.logsumexp(np.zeros((2, 3)))
        except Exception as e:
            print("RAISED", type(e).__name__, e)
        else:
            print("NO ERROR")
    """, FASTLOSS_BACKEND="bogus")
    assert "RAISED BackendUnavailable" in r.stdout and "bogus" in r.stdout, r.stdout + r.stderr


def test_import_compiles_nothing():
    r = _run("""
        import sys
        import fastloss
        import fastloss as fl
        print("NUMBA_IMPORTED", "numba" in sys.modules)
        print("CUDA_IMPORTED", any(m.startswith("numba.cuda") for m in sys.modules))
        # ml_dtypes (bfloat16) costs ~0.4 s to import: loaded when a bfloat16 array shows up
        print("ML_DTYPES_IMPORTED", "ml_dtypes" in sys.modules)
        import numpy as np
        print("LSE", fl.logsumexp(np.zeros((1, 4)), backend="numpy")[0], "ml_dtypes" in sys.modules)
    """)
    assert r.returncode == 0, r.stderr
    assert "NUMBA_IMPORTED False" in r.stdout, "import fastloss imported numba: " + r.stdout
    assert "CUDA_IMPORTED False" in r.stdout
    assert "ML_DTYPES_IMPORTED False" in r.stdout and "LSE 1.386294361119890" in r.stdout, r.stdout
    assert r.stdout.strip().endswith("False"), "a float64 call imported ml_dtypes: " + r.stdout


def test_bfloat16_is_recognised_once_ml_dtypes_is_loaded():
    """The lazy bfloat16 lookup: an ml_dtypes array is computed in float32 (its first use
    imports nothing new: ml_dtypes made the array), and a look-alike dtype named bfloat16 is
    not mistaken for it."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from fastloss import _validate as V

    x = np.array([[0.5, 1.5, -2.0]], dtype=ml_dtypes.bfloat16)
    assert V.float_dtype_or_raise(x.dtype, "x") == np.float32
    assert V._BF16 == np.dtype(ml_dtypes.bfloat16)
    got = fl.logsumexp(x, backend="numpy")
    assert np.allclose(np.asarray(got, np.float64), np.log(np.exp([0.5, 1.5, -2.0]).sum()), rtol=1e-2)
    with pytest.raises(TypeError, match="expected a floating array"):
        V.float_dtype_or_raise(np.dtype([("bfloat16", "i2")]), "x")


def test_disable_numba_env():
    r = _run("""
        import numpy as np, fastloss as fl
        st = fl.backends()["numba"]
        print("AVAILABLE", st.available, "REASON", st.reason)
        print("LSE", fl.logsumexp(np.zeros((1, 4)))[0])
    """, FASTLOSS_DISABLE_NUMBA="1")
    assert r.returncode == 0, r.stderr
    assert "AVAILABLE False" in r.stdout and "FASTLOSS_DISABLE_NUMBA" in r.stdout, r.stdout
    assert "LSE 1.38629436" in r.stdout, r.stdout


def test_set_num_threads(backend):
    n, c = sizes((64, 33))
    x = np.random.default_rng(1).standard_normal((n, c))
    t = np.random.default_rng(2).integers(0, c, n)
    want = fl.cross_entropy(x, t, backend="numpy")
    try:
        fl.set_num_threads(1)
        if backend == "numba":
            import numba

            assert numba.get_num_threads() == 1
        np.testing.assert_allclose(fl.cross_entropy(x, t, backend=backend), want, rtol=1e-12)
    finally:
        fl.set_num_threads(os.cpu_count() or 1)
    np.testing.assert_allclose(fl.cross_entropy(x, t, backend=backend), want, rtol=1e-12)
    with pytest.raises(ValueError):
        fl.set_num_threads(0)


def test_env_num_threads():
    r = _run("""
        import numpy as np, fastloss as fl
        fl.cross_entropy(np.zeros((4, 3)), np.array([0, 1, 2, 0]), backend="numba")
        import numba
        print("THREADS", numba.get_num_threads())
    """, FASTLOSS_NUM_THREADS="1")
    if "BackendUnavailable" in r.stderr:
        pytest.skip("numba backend unavailable")
    assert "THREADS 1" in r.stdout, r.stdout + r.stderr


# ----------------------------------------------------------------------------- protocol
def test_every_backend_module_conforms_to_the_protocol():
    """Every backend module that imports here (cuda's does without a GPU) has every entry
    point of the protocol, with its parameter names in order."""
    from fastloss._backends import KNOWN, _protocol

    assert {"logsumexp", "cross_entropy", "cross_entropy_soft", "gaussian_nll"} <= set(_protocol.ENTRY_POINTS)
    checked = []
    for name, (modname, _) in KNOWN.items():
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue  # numba / numba-cuda not installed: nothing to check
        assert _protocol.check(mod) == [], name
        checked.append(name)
    assert {"numpy", "numba", "cython"} <= set(checked) or not fl.backends()["numba"].available


def test_the_protocol_check_names_what_is_wrong():
    import types

    from fastloss._backends import _protocol, numpy_backend

    bad = types.ModuleType("bad")
    for name in _protocol.ENTRY_POINTS:
        setattr(bad, name, getattr(numpy_backend, name))
    bad.NAME = "bad"
    del bad.mse
    bad.kl_div = lambda x, t, loss, grad, gscale, gout: 0.0  # log_target missing
    problems = _protocol.check(bad)
    assert "mse: missing" in problems, problems
    assert any(p.startswith("kl_div: parameters ['x', 't', 'loss'") for p in problems), problems
    assert len(problems) == 2, problems


def test_a_backend_breaking_the_protocol_is_unavailable_with_the_reason(monkeypatch):
    import sys
    import types

    reg = importlib.import_module("fastloss._backends")
    numpy_backend = importlib.import_module("fastloss._backends.numpy_backend")
    broken = types.ModuleType("fastloss_test_broken_backend")
    for name in dir(numpy_backend):
        setattr(broken, name, getattr(numpy_backend, name))
    del broken.softmax
    monkeypatch.setitem(sys.modules, "fastloss_test_broken_backend", broken)
    monkeypatch.setitem(reg.KNOWN, "broken", ("fastloss_test_broken_backend", "fix the module"))
    monkeypatch.setattr(reg, "_failed", {})
    with pytest.raises(fl.BackendUnavailable, match=r"breaks the backend protocol \(softmax: missing\)"):
        reg.get("broken")
