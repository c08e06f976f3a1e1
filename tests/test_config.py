"""The tunables of fastloss._config: the ones read at each call can be patched and change how
the work is split, never the result (compared with the NumPy reference backend); the ones
compiled into the Numba kernels are part of the Numba disk cache's key."""
from __future__ import annotations

import os

import numpy as np
import pytest

import fastloss as fl
from fastloss import _config

numba = pytest.importorskip("numba")


@pytest.fixture
def numba_backend():
    st = fl.backends()["numba"]
    if not st.available:
        pytest.fail(f"numba imports but its backend is unavailable: {st.reason}")
    return "numba"


def _ce(backend, x, t, **kw):
    return fl.cross_entropy(x, t, return_grad=True, backend=backend, **kw)


@pytest.mark.parametrize("small_c", [0, 64])
def test_numba_small_class_threshold_picks_the_path_not_the_result(monkeypatch, numba_backend, small_c):
    """C = 5 runs the column-block kernel by default; NUMBA_SMALL_C = 0 sends it to the row
    kernel, 64 keeps it there for C = 40 too: every path gives the reference's values."""
    r = np.random.default_rng(0)
    for c in (5, 40):
        x = r.standard_normal((300, c))
        t = r.integers(0, c, 300)
        t[::7] = -100
        ref_l, ref_g = _ce("numpy", x, t, label_smoothing=0.1)
        monkeypatch.setattr(_config, "NUMBA_SMALL_C", small_c)
        l, g = _ce(numba_backend, x, t, label_smoothing=0.1)
        np.testing.assert_allclose(l, ref_l, rtol=1e-12)
        np.testing.assert_allclose(g, ref_g, rtol=1e-12, atol=1e-15)


def test_numba_serial_threshold_and_chunk(monkeypatch, numba_backend):
    """NUMBA_SERIAL_MAX = 0 sends even a tiny call to the parallel kernel (the parallel twin),
    and a small NUMBA_CHUNK splits an elementwise array into many tasks."""
    r = np.random.default_rng(1)
    x, y = r.standard_normal((40, 50)), r.random((40, 50))
    ref = fl.binary_cross_entropy_with_logits(x, y, return_grad=True, backend="numpy")
    monkeypatch.setattr(_config, "NUMBA_SERIAL_MAX", 0)
    for chunk in (7, 16384):
        monkeypatch.setattr(_config, "NUMBA_CHUNK", chunk)
        got = fl.binary_cross_entropy_with_logits(x, y, return_grad=True, backend=numba_backend)
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-12)
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-12, atol=1e-16)
    t = r.integers(0, 50, 40)
    ref_ce = _ce("numpy", x, t)
    got = _ce(numba_backend, x, t)
    np.testing.assert_allclose(got[0], ref_ce[0], rtol=1e-12)
    np.testing.assert_allclose(got[1], ref_ce[1], rtol=1e-12, atol=1e-16)


def test_compiled_tunables_are_in_the_numba_cache_key():
    """Numba freezes a global into cached machine code: the file holding the compiled-in
    tunables is hashed into the cache's key with the kernel modules."""
    from fastloss._backends.numba_backend import _cache

    here = os.path.dirname(os.path.abspath(_cache.__file__))
    paths = [os.path.join(here, s) for s in _cache._KERNEL_SOURCES]
    assert any(os.path.samefile(p, _config.__file__) for p in paths)
    from fastloss._backends.numba_backend import _cols, _jit

    assert (_jit._SUMBLK, _jit._EBLK, _cols._SB) == (
        _config.NUMBA_SUM_BLOCK, _config.NUMBA_LOSS_BLOCK, _config.NUMBA_COL_ROWS)
