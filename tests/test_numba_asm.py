"""The numba backend's hot kernels in machine code: no gather/scatter, masked move or
compress/expand instruction, and no hot loop that LLVM left scalar -- for the host CPU and,
compiled but never run, for an AVX2 (``znver3``) and an AVX-512 (``znver5``) target.

``bench/asm_check.py`` does the work, in a process of its own per target (Numba reads its
target CPU at import) with a cache directory of its own (no machine code for another CPU may
land in the package's cache).  Not timed.  Why it matters: a Numba index it cannot prove
non-negative kept the negative-index wrap-around inside the row loops, which LLVM vectorized
with ``vgatherqps``/``vscatterqps`` for AVX-512 -- the default backend's cross-entropy ran 3x
slower than the Cython one on Zen 5 -- and a load under a condition became AVX2's
``vmaskmovps``, microcoded on AMD.  And a gradient written in place over the logits: read
through ``x`` and written through ``grad``, the same memory failed LLVM's run-time overlap test
and every row ran the scalar loop (7x the time); the in-place variants are checked for that.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import asm_check  # noqa: E402

# (NUMBA_CPU_NAME or None for the host, the widest vector width its hot loops must reach):
# LLVM vectorizes at 512 bits for Zen 4/5 and at 256 for AVX2 CPUs
TARGETS = [(None, None), ("znver3", 256), ("znver5", 512)]


def _run(cpu, tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    env.pop("NUMBA_DISABLE_JIT", None)
    if cpu is not None:
        env.update(NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES="")  # the named CPU's own features
    out = tmp_path / "asm.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "asm_check.py"), "--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), p.stdout + p.stderr
    return p, json.loads(out.read_text())


@pytest.mark.parametrize("cpu,bits", TARGETS, ids=["host", "znver3-avx2", "znver5-avx512"])
def test_hot_kernels_machine_code(cpu, bits, tmp_path):
    p, res = _run(cpu, tmp_path)
    if cpu is not None:
        assert res["cpu"] == cpu
    report = res["report"]
    # every entry kernel of the backend is there, both twins, both dtypes
    entries = {r["entry"] for r in report}
    assert {"_k_cross_entropy", "_k_cross_entropy_small", "_k_cross_entropy_shard", "_k_cross_entropy_soft",
            "_k_logsumexp", "_k_softmax", "_k_log_softmax", "_k_softmax_backward", "_k_bce_with_logits",
            "_k_mse"} <= entries
    assert len(report) >= 2 * 2 * 25
    bad = [r for r in report if r["slow"] or r["scalar_loops"] or not r["vector_bits"] or r["aliased_tests"]]
    assert not bad, p.stdout
    # the in-place variants are there, each with its output given the input's memory ...
    inplace = [r for r in report if "in place" in r["kernel"]]
    assert {r["entry"] for r in inplace} >= {"_k_cross_entropy", "_k_cross_entropy_small", "_k_cross_entropy_shard",
                                             "_k_cross_entropy_soft", "_k_softmax", "_k_log_softmax"}
    assert all(r["same_memory"] for r in inplace), [r["kernel"] for r in inplace if not r["same_memory"]]
    # ... and the overlap analysis sees the logits/gradient tests of the separate-buffer path:
    # were the in-place path to read through x again, it would be reported
    for r in report:
        if r["kernel"].startswith("cross_entropy mean float32"):
            assert ["grad", "x"] in r["overlap_tests"], (r["kernel"], r["overlap_tests"])
    if bits is not None:
        widths = {r["vector_bits"] for r in report}
        assert max(widths) == bits, p.stdout
    assert p.returncode == 0, p.stdout + p.stderr


# ----------------------------------------------------------------------------- the checker
# It must be able to fail: fed loops of the shapes it is meant to catch, it reports them.
def _compile(src, name, *args):
    import numba

    ns = {"np": __import__("numpy")}
    exec(src, ns)
    f = numba.njit(fastmath={"contract", "arcp", "nsz", "reassoc", "afn"}, error_model="numpy")(ns[name])
    f(*args)
    sig = f.signatures[0]
    return f.inspect_asm(sig), f.inspect_llvm(sig)


def test_checker_sees_gathers_and_scatters_from_signed_block_indices():
    import numpy as np

    src = """
def k(x, out, j0, j1):
    s = 0.0
    for j in range(j0, j1):          # j0 not provably >= 0: wrap-around per element
        out[0, j] = x[0, j] * 2.0
        s += x[0, j]
    return s
"""
    x = np.ones((2, 4096), np.float32)
    asm, ir = _compile(src, "k", x, np.zeros_like(x), 3, 4000)
    from numba.core import codegen

    if "+avx512f" in codegen.JITCPUCodegen("t")._get_host_cpu_features():
        assert asm_check.SLOW.search(asm), "expected gathers/scatters on an AVX-512 host"
    loops = asm_check._loops(ir)
    # on AVX2 hosts LLVM keeps such a loop scalar instead: either way the checker objects
    assert asm_check.SLOW.search(asm) or any(kind == "scalar" for _, kind, *_ in loops)


def test_checker_sees_a_scalar_loop_and_accepts_vector_ones():
    import numpy as np

    scalar = """
def k(x, out):
    acc = 1.0
    for j in range(x.shape[0]):      # a float64 recurrence through a division: not vectorizable
        acc = acc / (x[j] + acc)
        out[j] = acc
    return acc
"""
    vector = """
def k(x, out):
    for j in range(x.shape[0]):
        out[j] = x[j] * 3.0 + 1.0
    return 0.0
"""
    x = np.full(1000, 0.5)
    _, ir = _compile(scalar, "k", x, np.zeros_like(x))
    kinds = [k for _, k, *_ in asm_check._loops(ir)]
    assert "scalar" in kinds and "vector" not in kinds
    _, ir = _compile(vector, "k", x, np.zeros_like(x))
    kinds = [k for _, k, *_ in asm_check._loops(ir)]
    assert "vector" in kinds and "scalar" not in kinds


def test_checker_sees_an_overlap_test_between_arguments_given_the_same_memory():
    """A kernel with a run-time ``inplace`` flag, compiled with the flag as a literal (as
    ``asm_check`` compiles the backend's): read through ``x`` the loop is guarded by an
    ``x``/``g`` overlap test, read through ``g`` (the in-place path) by none."""
    import numba
    import numpy as np

    src = """
def k(x, g, inplace):
    if inplace:
        for j in range(g.shape[0]):
            g[j] = g[j] * 3.0 + 1.0
    else:
        for j in range(g.shape[0]):
            g[j] = x[j] * 3.0 + 1.0
    return 0.0
"""
    ns = {}
    exec(src, ns)
    f = numba.njit(fastmath={"contract", "arcp", "nsz", "reassoc", "afn"}, error_model="numpy")(ns["k"])
    x = np.full(1000, 0.5)
    g = np.zeros(1000)
    for flag, expected in ((False, {("g", "x")}), (True, set())):
        sig = asm_check._signature(f, (x, g, flag))
        f.compile(sig)
        ir = f.inspect_llvm(sig)
        assert asm_check._overlap_tests(ir, "k") == expected, flag
    # the same memory (of 2-D operands) is recognized, and only for a written operand
    g2 = np.zeros((4, 250))
    assert asm_check._same_memory_args(f, (g2, g2, True)) == {("g", "x")}
    assert asm_check._same_memory_args(f, (g2, g2.copy(), True)) == set()
    ro = g2.view()
    ro.flags.writeable = False
    assert asm_check._same_memory_args(f, (ro, ro, True)) == set()


def test_prefetch_hint_compiles_to_prefetch_instructions_and_never_faults():
    """``_cols._prefetch`` (the few-class kernel asks for its next block with it): a read hint
    and a write hint become prefetch instructions, and an address outside the array -- past
    its end, as the last block's hint may be -- is allowed (a prefetch never faults)."""
    import numba
    import numpy as np

    from fastloss._backends.numba_backend import _cols

    @numba.njit
    def k(x, t, i, off):
        _cols._prefetch(x, i, off, False)
        _cols._prefetch(x, i, off, True)
        _cols._prefetch(t, i, 0, False)  # a 1-D array (the targets)
        return x[0, 0] + t[0]

    x = np.ones((4, 8), np.float32)
    t = np.zeros(4, np.int64)
    assert k(x, t, 4, 1 << 20) == 1.0  # far past the end: no fault
    asm = k.inspect_asm(k.signatures[0])
    assert asm.count("prefetcht1") >= 2  # read, locality 2: kept in L2 and up
    assert "prefetchw" in asm or asm.count("prefetcht1") >= 3
    assert _cols._prefetch(x, 0, 0, False) is None  # the plain-Python twin: a no-op


def test_tile_part_writes_exactly_the_partial_tile():
    """``_cols._tile_part`` (the last ``C % W`` classes of the few-class kernel's transposes):
    compiled, it writes what its plain-Python twin (NumPy slicing) writes -- the last ``m``
    columns of the ``W x W`` source tile into the last ``m`` rows of the destination tile
    (transpose in), or the last ``m`` source rows into the last ``m`` destination columns
    (transpose out) -- and nothing else, for every ``m`` (0 and ``W``: nothing), float32
    (W = 8) and float64 (W = 4), at offsets inside larger arrays."""
    import numba
    import numpy as np

    from fastloss._backends.numba_backend import _cols

    @numba.njit
    def cols(src, i, j, dst, p, q, m):
        _cols._tile_part(src, i, j, dst, p, q, m, False)

    @numba.njit
    def rows(src, i, j, dst, p, q, m):
        _cols._tile_part(src, i, j, dst, p, q, m, True)

    rng = np.random.default_rng(5)
    for dt, w in ((np.float32, 8), (np.float64, 4)):
        src = rng.standard_normal((w + 5, w + 3)).astype(dt)
        for m in range(w + 1):
            for f in (cols, rows):
                got, want = np.full((w + 4, w + 6), -7.0, dt), np.full((w + 4, w + 6), -7.0, dt)
                f(src, 3, 2, got, 1, 4, m)
                f.py_func(src, 3, 2, want, 1, 4, m)
                assert np.array_equal(got, want), (np.dtype(dt).name, m, f.__name__)
                assert np.count_nonzero(want != -7.0) == (w * m if 0 < m < w else 0)
