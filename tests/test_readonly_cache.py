"""The numba backend on read-only installs, and Numba's disk cache (issue #16, item 12).

Numba (0.68) caches a function in the first directory, among ``NUMBA_CACHE_DIR``, the
``__pycache__`` next to the source and the user-wide ``$XDG_CACHE_HOME/numba``, that it can
create and write a file in; with none, ``cache=True`` raises at definition ("no locator
available"), which made the whole backend unavailable.  The backend must then work uncached,
say so once (``NumbaCacheWarning``), and ``fastloss info`` must show the cache directory and
that it is not writable.

The tests run as root, for whom ``chmod a-w`` prevents nothing, so "not writable" is made
with paths that cannot be directories for anybody: the package's ``__pycache__`` is a
regular file, and ``NUMBA_CACHE_DIR`` / ``XDG_CACHE_HOME`` / ``HOME`` lead through a
regular file.  Each case runs in a fresh interpreter on a copy of the package and compiles
one small kernel (``logsumexp`` of a 4x3 float64 array).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastloss as fl

pytestmark = pytest.mark.skipif(not fl.backends()["numba"].available,
                                reason="the numba backend is unavailable here")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent(
    """
    import importlib, json, warnings
    caught = []
    warnings.simplefilter("always")  # a second emission would be shown, not deduplicated
    warnings.showwarning = lambda m, c, *a, **k: caught.append([c.__name__, str(m)])
    import numpy as np
    import fastloss as fl
    st = fl.backends()["numba"]
    x = np.arange(12.0).reshape(4, 3)
    got = [fl.logsumexp(x, backend="numba").tolist() for _ in range(2)] if st.available else None
    fl.backends()
    nb = importlib.import_module("fastloss._backends.numba_backend")
    print(json.dumps(dict(file=fl.__file__, available=st.available, reason=st.reason, got=got,
                          warnings=caught, info=nb.cache_info())))
    """
)


def _want():
    x = np.arange(12.0).reshape(4, 3)
    m = x.max(axis=1)
    return m + np.log(np.exp(x - m[:, None]).sum(axis=1))


@pytest.fixture
def install(tmp_path):
    """A copy of the package (no caches) and a regular file to route paths through."""
    root = tmp_path / "site"
    shutil.copytree(os.path.join(REPO, "fastloss"), root / "fastloss",
                    ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc", "*.pyc"))
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a regular file: no directory can be created below it\n")
    return root, blocker


def _read_only(root):
    """Make the backends' ``__pycache__`` impossible to create, for root too."""
    (root / "fastloss" / "_backends" / "numba_backend" / "__pycache__").write_text("")


def _env(root, blocker, cache_dir=None):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NUMBA_", "FASTLOSS_", "PYTHON"))}
    env.update(PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1",
               XDG_CACHE_HOME=str(blocker), HOME=str(blocker))  # no user-wide cache either
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    return env


def _run(args, root, env):
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                       cwd=str(root), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _child(root, env):
    r = _run(["-c", CHILD], root, env)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["file"].startswith(str(root)), res["file"]  # the copy, not the repository
    return res


def _cache_warnings(res):
    return [m for c, m in res["warnings"] if c == "NumbaCacheWarning"]


def _check_uncached(res):
    assert res["available"], res["reason"]
    for got in res["got"]:
        np.testing.assert_allclose(got, _want(), rtol=1e-14)
    assert len(res["warnings"]) == 1, res["warnings"]
    (msg,) = _cache_warnings(res)
    assert "compiled in memory on every run" in msg and "NUMBA_CACHE_DIR" in msg, msg
    assert res["info"]["enabled"] is False and res["info"]["writable"] is False, res["info"]
    return msg


def _info(root, env):
    return _run(["-m", "fastloss", "info"], root, env).stdout


def test_read_only_install_works_uncached(install):
    root, blocker = install
    _read_only(root)
    env = _env(root, blocker)
    res = _child(root, env)
    msg = _check_uncached(res)
    pycache = os.path.join(str(root), "fastloss", "_backends", "numba_backend", "__pycache__")
    assert pycache in msg, msg  # names what was tried
    assert res["info"]["dir"] == pycache, res["info"]
    out = _info(root, env)
    line = next(ln for ln in out.splitlines() if ln.startswith("numba cache"))
    assert pycache in line and "not writable" in line, out
    assert "numba   available" in out, out


def test_read_only_numba_cache_dir_on_read_only_install(install):
    """An unusable, empty NUMBA_CACHE_DIR: uncached too, and said once."""
    root, blocker = install
    _read_only(root)
    cache_dir = blocker / "numba-cache"
    env = _env(root, blocker, cache_dir)
    res = _child(root, env)
    msg = _check_uncached(res)
    assert str(cache_dir) in msg, msg
    assert res["info"]["dir"] == str(cache_dir), res["info"]
    out = _info(root, env)
    line = next(ln for ln in out.splitlines() if ln.startswith("numba cache"))
    assert str(cache_dir) in line and "not writable" in line, out


def test_read_only_numba_cache_dir_is_not_skipped_silently(install):
    """Numba skips an unwritable NUMBA_CACHE_DIR for the package's __pycache__ without a
    word; fastloss warns once, and the kernels are cached there."""
    root, blocker = install
    cache_dir = blocker / "numba-cache"
    env = _env(root, blocker, cache_dir)
    res = _child(root, env)
    assert res["available"], res["reason"]
    for got in res["got"]:
        np.testing.assert_allclose(got, _want(), rtol=1e-14)
    assert len(res["warnings"]) == 1, res["warnings"]
    (msg,) = _cache_warnings(res)
    assert str(cache_dir) in msg and "not writable" in msg, msg
    pycache = os.path.join(str(root), "fastloss", "_backends", "numba_backend", "__pycache__")
    assert res["info"]["enabled"] and res["info"]["dir"] == pycache, res["info"]
    assert any(f.endswith(".nbi") for f in os.listdir(pycache))
    line = next(ln for ln in _info(root, env).splitlines() if ln.startswith("numba cache"))
    assert pycache in line and "(writable" in line and str(cache_dir) in line, line


def test_writable_numba_cache_dir_fixes_a_read_only_install(install, tmp_path):
    """The fix the warning suggests: no warning, and the kernels land in NUMBA_CACHE_DIR."""
    root, blocker = install
    _read_only(root)
    cache_dir = tmp_path / "numba-cache"
    env = _env(root, blocker, cache_dir)
    res = _child(root, env)
    assert res["available"], res["reason"]
    for got in res["got"]:
        np.testing.assert_allclose(got, _want(), rtol=1e-14)
    assert _cache_warnings(res) == [], res["warnings"]
    assert res["info"]["enabled"] and res["info"]["dir"].startswith(str(cache_dir)), res["info"]
    assert any(f.endswith(".nbi") for _, _, files in os.walk(cache_dir) for f in files)
    line = next(ln for ln in _info(root, env).splitlines() if ln.startswith("numba cache"))
    assert str(cache_dir) in line and "(writable)" in line, line


def test_cache_is_keyed_on_every_kernel_source(install, tmp_path):
    """Numba invalidates a cached kernel only when the file defining it changes; an edit of a
    helper module the kernel inlines (``_math``) must not be served the old machine
    code.  Here ``exp64`` and ``expn64`` are made to return 2: the next process must compute
    with them."""
    root, blocker = install
    cache_dir = tmp_path / "numba-cache"
    env = _env(root, blocker, cache_dir)
    res = _child(root, env)
    for got in res["got"]:
        np.testing.assert_allclose(got, _want(), rtol=1e-14)

    def index_files():
        return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
                for d, _, files in os.walk(cache_dir) for f in files if f.endswith(".nbi")}

    cached = index_files()
    assert cached
    # a process with unchanged sources keeps (and uses) the cached kernels
    _child(root, env)
    assert index_files() == cached

    math_py = root / "fastloss" / "_backends" / "numba_backend" / "_math.py"
    src = math_py.read_text()
    for fn in ("exp64", "expn64"):
        assert src.count(f"def {fn}(x):\n") == 1
        src = src.replace(f"def {fn}(x):\n", f"def {fn}(x):\n    return x * 0.0 + 2.0\n")
    math_py.write_text(src)
    res = _child(root, env)
    x = np.arange(12.0).reshape(4, 3)
    edited = x.max(axis=1) + np.log(2.0 * 3)  # every exp is 2 now
    for got in res["got"]:
        np.testing.assert_allclose(got, edited, rtol=1e-14)
    assert res["warnings"] == [], res["warnings"]


CHILD_STATS = textwrap.dedent(
    """
    import json
    import numpy as np
    import fastloss as fl
    from fastloss._backends.numba_backend import _jit
    x = np.linspace(-2.0, 2.0, 12).reshape(4, 3)
    y = np.abs(np.sin(x))
    fl.logsumexp(x, backend="numba")
    fl.binary_cross_entropy_with_logits(x, y, return_grad=True, backend="numba")
    fl.kl_div(x, y, log_target=True, return_grad=True, backend="numba")
    fl.mse_loss(x, y, reduction="none", backend="numba")
    used = {n: d for n, d in _jit._SERIAL.items() if d.signatures}
    print(json.dumps({n: [sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values())]
                      for n, d in used.items()}))
    """
)


def test_a_second_process_compiles_nothing(install, tmp_path):
    """Every kernel a process compiled is loaded from the disk cache by the next one --
    the generated elementwise kernels too (Numba keys a cached closure on a pickle of its
    cells, which differs in every process: generated kernels must not be closures)."""
    root, blocker = install
    env = _env(root, blocker, tmp_path / "numba-cache")
    first = json.loads(_run(["-c", CHILD_STATS], root, env).stdout.strip().splitlines()[-1])
    assert {"_k_logsumexp", "_k_bce_with_logits", "_k_kl_div_log", "_k_mse"} <= set(first), first
    assert all(miss >= 1 for _, miss in first.values()), first  # compiled: nothing was cached yet
    second = json.loads(_run(["-c", CHILD_STATS], root, env).stdout.strip().splitlines()[-1])
    assert set(second) == set(first)
    assert all(miss == 0 and hit >= 1 for hit, miss in second.values()), second


def test_every_helper_module_of_the_kernels_is_in_the_cache_key():
    """The modules whose Numba functions the numba backend's modules use are those its cache
    key reads."""
    import importlib
    import pkgutil

    pkg = importlib.import_module("fastloss._backends.numba_backend")
    cache = importlib.import_module("fastloss._backends.numba_backend._cache")
    used = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for obj in vars(mod).values():
            if hasattr(obj, "py_func"):  # a Numba dispatcher, compiled into the kernels
                used.add(obj.py_func.__module__.rsplit(".", 1)[1])
    assert used <= set(cache._KERNEL_MODULES), (used, cache._KERNEL_MODULES)
    assert {"_math", "_rows", "_cols", "_elementwise"} <= used
