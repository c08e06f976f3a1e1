"""The command line (`fastloss info`, `fastloss warmup`) and `fl.warmup`, in process and as a
console entry point; `fastloss bench` has its own end-to-end tests in test_bench_cli.py."""
import os
import subprocess
import sys

import pytest

import fastloss as fl
from fastloss import _cli


def test_info_lists_every_backend_with_reasons(capsys):
    assert _cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"fastloss {fl.__version__}" in out
    for name, st in fl.backends().items():
        assert name in out
        if not st.available:
            assert st.reason in out and st.install in out
    assert "threads" in out and "GPUs" in out
    assert "auto (host arrays -> " in out or "default" in out


def test_info_as_module_subprocess():
    r = subprocess.run([sys.executable, "-m", "fastloss", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "backends:" in r.stdout and "numpy   available" in r.stdout


def test_no_command_prints_the_help(capsys):
    # bare `fastloss` says what it can do (not argparse's "arguments are required")
    assert _cli.main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("info", "bench", "warmup", "--version"):
        assert cmd in out, out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        _cli.main(["frobnicate"])
    assert e.value.code == 2


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        _cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastloss {fl.__version__}"


@pytest.mark.parametrize("cmd", ["info", "bench", "warmup"])
def test_every_command_has_a_description(cmd, capsys):
    with pytest.raises(SystemExit):
        _cli.main([cmd, "--help"])
    out = capsys.readouterr().out
    usage, _, rest = out.partition("\n\n")
    assert rest and not rest.startswith("options:"), out  # a paragraph before the options


def test_info_shows_the_extension_build_not_cython(capsys):
    # Cython is a build-time tool: info shows how the extension was built, not whether the
    # Cython package happens to be installed beside it
    from fastloss._backends import cython_backend

    assert _cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "Cython" not in out
    assert f"cython ext   {cython_backend.build_info()}" in out


def test_warmup_numpy_has_nothing_to_compile(capsys):
    assert _cli.main(["warmup", "--backend", "numpy"]) == 0
    assert "nothing to compile" in capsys.readouterr().out


def test_warmup_unknown_backend_raises():
    with pytest.raises(fl.BackendUnavailable, match="bogus"):
        fl.warmup(["bogus"])


def test_warmup_default_skips_unavailable_backends(monkeypatch):
    # every backend reported unavailable -> nothing warmed, no error
    from fastloss._dispatch import _reg as reg

    def unavailable(name):
        raise fl.BackendUnavailable(name)

    monkeypatch.setattr(reg, "get", unavailable)
    assert fl.warmup() == {}


def test_warmup_calls_each_backends_hook(monkeypatch, capsys):
    from fastloss._dispatch import _reg as reg

    calls = []

    class Fake:
        @staticmethod
        def warmup(**opts):
            calls.append("fake")

    monkeypatch.setattr(reg, "get", lambda name: Fake if name == "numba" else object())
    done = fl.warmup(verbose=True)
    assert calls == ["fake"] and list(done) == ["numba"] and done["numba"] >= 0
    assert "numba: compiled in" in capsys.readouterr().out


def test_warmup_passes_dtype_and_layout_selection(monkeypatch):
    from fastloss._dispatch import _reg as reg

    seen = []

    class Fake:
        @staticmethod
        def warmup(**opts):
            seen.append(opts)

    monkeypatch.setattr(reg, "get", lambda name: Fake if name == "numba" else object())
    fl.warmup(dtypes=["float32"], layouts="C", processes=1)
    assert seen == [{"dtypes": ("float32",), "layouts": ("C",), "processes": 1}]
    assert _cli.main(["warmup", "--dtype", "float64", "--layout", "A", "--layout", "C", "--jobs", "3"]) == 0
    assert seen[-1] == {"dtypes": ("float64",), "layouts": ("A", "C"), "processes": 3}
    fl.warmup()  # default: one process per usable core
    assert seen[-1]["processes"] == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="processes"):
        fl.warmup(processes=0)
    with pytest.raises(ValueError, match="dtypes"):
        fl.warmup(dtypes=["float16"])
    with pytest.raises(ValueError, match="layouts"):
        fl.warmup(layouts=[])


def test_numba_warmup_subset_compiles_only_that_subset(monkeypatch):
    """A float32 / C-order warm-up asks for float32, C-contiguous specializations only, of
    both twins of every kernel.  The kernel calls are recorded, not run: compiling them here
    would take minutes (the next test runs every job of the full warm-up, as Python)."""
    import importlib

    if fl.backends()["numba"].available is False:
        pytest.skip("numba unavailable")
    numba = pytest.importorskip("numba")
    nb = importlib.import_module("fastloss._backends.numba_backend")
    jit = importlib.import_module("fastloss._backends.numba_backend._jit")
    seen = []
    monkeypatch.setattr(jit, "_call_jit", lambda kern, work, *args: seen.append(
        (jit._force_mode, getattr(kern, "py_func", kern).__name__, [numba.typeof(a) for a in args])) or 0.0)
    calls = []
    n = nb.warmup(dtypes=("float32",), layouts=("C",), progress=lambda d, t, label: calls.append(label))
    assert n == len(calls) == len(seen) > 0
    assert all("float32" in c and " C" in c and "float64" not in c for c in calls)
    assert [m for m, _, _ in seen].count("serial") == [m for m, _, _ in seen].count("parallel") == n // 2
    for _, name, types in seen:
        arrays = [t for t in types if isinstance(t, numba.types.Array) and t.ndim == 2]
        # float32 throughout; the operands C-contiguous (an optional weight arrives as a
        # stride-0 broadcast view, 'A', as the public layer passes it)
        assert arrays and all(t.dtype == numba.float32 for t in arrays), (name, types)
        assert types[0].layout == "C", (name, types)
    assert {name for _, name, _ in seen} >= {"_k_logsumexp", "_k_cross_entropy", "_k_cross_entropy_small",
                                             "_k_bce_with_logits", "_k_gaussian_nll", "_k_kl_div_log"}


def test_every_warmup_job_is_a_valid_kernel_call():
    """The full warm-up (every dtype and layout, both twins) run with the kernels as Python
    (NUMBA_DISABLE_JIT=1, seconds instead of minutes of compiling): every job is a call the
    kernels accept."""
    if fl.backends()["numba"].available is False:
        pytest.skip("numba unavailable")
    code = ("from fastloss._backends.numba_backend import warmup; "
            "print(warmup(dtypes=('float32', 'float64'), layouts=('C', 'A')))")
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert int(r.stdout.split()[-1]) > 100


def test_numba_warmup_in_processes_fills_the_disk_cache(tmp_path):
    """``processes=2``: spawned workers compile (a subset of the jobs: log-sum-exp and MSE,
    float32, C order) into the shared disk cache; a later process then loads every one of
    those kernels from the cache (cache hits, no compilation)."""
    if fl.backends()["numba"].available is False:
        pytest.skip("numba unavailable")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("NUMBA_DISABLE_JIT", None)

    def last_two_ints(code):  # run ``code`` in a fresh process; the two numbers it prints last
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        return tuple(map(int, r.stdout.split()[-2:]))

    fill = ("import fastloss._backends.numba_backend._warmup as w\n"
            "import fastloss._backends.numba_backend as nb\n"
            "sel = [j for j in w._jobs(('float32',), ('C',)) if j[1] in (nb.logsumexp, nb.mse)]\n"
            "print(w._in_processes(sel, 2, None), len(sel))\n")
    total, n = last_two_ints(fill)
    assert total == 2 * n > 0
    check = ("import numpy as np, fastloss as fl\n"
             "from fastloss._backends.numba_backend import _jit, _rows, _elementwise\n"
             "x = np.full((3, 40), 0.5, np.float32)\n"
             "for mode in ('serial', 'parallel'):\n"
             "    _jit._force_mode = mode\n"
             "    fl.logsumexp(x, backend='numba'); fl.mse_loss(x, x, backend='numba', return_grad=True)\n"
             "ks = [_rows._k_logsumexp, _jit._SERIAL['_k_logsumexp'], _elementwise._k_mse, _jit._SERIAL['_k_mse']]\n"
             "print(sum(sum(k.stats.cache_hits.values()) for k in ks), sum(sum(k.stats.cache_misses.values()) for k in ks))\n")
    hits, misses = last_two_ints(check)
    assert (hits, misses) == (4, 0)
