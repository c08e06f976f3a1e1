"""How many machine-code specializations the numba backend compiles -- ``fastloss warmup``'s
time and every first call's.  Compiled in a fresh process with an empty Numba cache (a
kernel loaded from the cache compiles no helper, and would show nothing):

* a row helper is compiled once per argument type, and the logits arrive read-only: a capped
  row (the kernels' writable scratch) and the logits written in place are read through
  ``_jit._readonly``, so neither adds a specialization of the read-only helpers;
* an elementwise block function is compiled once per driver type, not once per twin (the
  parallel twin's ``prange`` index is unsigned: taken as it comes, it made a ``float64`` row
  bound and a second block specialization).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")

_CODE = r"""
import json
import numpy as np
import fastloss as fl
from fastloss._backends.numba_backend import _elementwise, _jit, _rows

rng = np.random.default_rng(0)
x = rng.standard_normal((5, 40))
t = rng.integers(0, 40, 5)
y = np.full((5, 40), 1 / 40)
for mode in ("serial", "parallel"):
    _jit._force_mode = mode
    for cap in (None, 3.0):
        fl.cross_entropy(x, t, softcap=cap, backend="numba")
        fl.cross_entropy(x, t, softcap=cap, return_grad=True, backend="numba")
        fl.cross_entropy(x, y, softcap=cap, return_grad=True, backend="numba")
        xi = x.copy()
        fl.cross_entropy(xi, t, softcap=cap, return_grad=True, grad_out=xi, backend="numba")
    a = rng.standard_normal((3, 7))
    fl.mse_loss(a, a, backend="numba")
    fl.mse_loss(a, a, return_grad=True, backend="numba")
_jit._force_mode = None
sigs = lambda d: [[str(a) for a in s] for s in d.signatures]
print(json.dumps({
    "rowmax": sigs(_rows._rowmax), "sumexp": sigs(_rows._sumexp), "ce_row": sigs(_rows._ce_row),
    "ce_soft_row": sigs(_rows._ce_soft_row), "mse_block": sigs(_elementwise._mse_block),
    "mse_kernel": sigs(_elementwise._k_mse), "mse_serial": sigs(_jit._SERIAL["_k_mse"]),
}))
"""


def test_helpers_compile_once_per_type(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    # the read-only helpers: the read-only logits only (a capped row, in place: the same type)
    for name in ("rowmax", "sumexp"):
        assert len(got[name]) == 1 and got[name][0][0].startswith("readonly array(float64"), got[name]
    # the row functions: the logits read-only, or None in place (they write the gradient through
    # grad then); never a writable scratch row, never a literal row index
    for name in ("ce_row", "ce_soft_row"):
        firsts = {s[0] for s in got[name]}
        assert firsts <= {"readonly array(float64, 2d, C)", "none"}, got[name]
        assert not any("Literal" in a for s in got[name] for a in s), got[name]
    # one block specialization per driver type (both twins share them)
    assert len(got["mse_kernel"]) == len(got["mse_serial"]) == 2
    assert len(got["mse_block"]) == 2, got["mse_block"]
    assert all(s[-4:] == ["int64"] * 4 for s in got["mse_block"]), got["mse_block"]
