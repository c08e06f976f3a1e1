"""Where the numba backend's kernels are cached on disk, and keeping that cache honest.

See the package docstring ("Compilation", "Where the cache lives").
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings

from .. import NumbaCacheWarning

try:
    import numba
    from numba import njit
except Exception:  # pragma: no cover - the package reports numba's absence
    numba = njit = None

def _cache_probe(a):  # never called: Numba's cache-directory search is run on it at import
    return a


def _dir_problem(path) -> str:
    """``""`` if a file can be written in directory ``path``, else why not -- checked as Numba
    checks it (create the directory if missing, write a temporary file), not with
    ``os.access``, which cannot tell whether a missing directory could be created and may
    disagree with ACLs, quotas or network filesystems."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return ""


def _cache_candidates():
    """The directories Numba (0.68) tries for this file, in its order: ``[(label, dir)]``."""
    out = []
    if numba.config.CACHE_DIR:
        out.append(("NUMBA_CACHE_DIR", os.path.abspath(numba.config.CACHE_DIR)))
    out.append(("next to the package",
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")))
    try:
        from numba.misc.appdirs import AppDirs

        out.append(("user-wide", AppDirs(appname="numba", appauthor=False).user_cache_dir))
    except Exception:  # pragma: no cover - a Numba that moved its appdirs
        pass
    return out


# Every module of this package whose code the cached kernels contain (the kernels' own modules
# and the helpers they inline): the cache is keyed on their sources (_drop_stale_kernels)
_KERNEL_MODULES = ("_jit", "_math", "_rows", "_cols", "_elementwise")
# ... and the tunables compiled into them (fastloss/_config.py), relative to this directory
_KERNEL_SOURCES = tuple(m + ".py" for m in _KERNEL_MODULES) + (os.path.join("..", "..", "_config.py"),)
_STAMP = "numba_backend.sources.sha256"


def _sources_digest() -> str:
    h = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in _KERNEL_SOURCES:
        with open(os.path.join(here, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()


def _drop_stale_kernels(cache_dir: str) -> bool:
    """Delete this module's cached kernels in ``cache_dir`` unless they were compiled from
    the current sources of every module in :data:`_KERNEL_SOURCES`; returns whether any were.

    Numba checks only the stamp of the file defining a kernel; a kernel inlines helpers of
    other modules (:mod:`._math`), whose edit would otherwise be served the old machine
    code.  The digest of the sources is written beside the kernels (atomically) once they
    are dropped.  Best effort: an unreadable source or a file another process removed first
    is no error (the kernels then compile as usual).
    """
    try:
        digest = _sources_digest()
    except OSError:  # pragma: no cover - sources not on disk (zipimport): nothing to compare
        return False
    stamp = os.path.join(cache_dir, _STAMP)
    try:
        with open(stamp) as f:
            if f.read().strip() == digest:
                return False
    except OSError:
        pass
    prefixes = tuple(m + "." for m in _KERNEL_MODULES)
    dropped = False
    for entry in os.listdir(cache_dir):
        if entry.startswith(prefixes) and entry.endswith((".nbi", ".nbc")):
            try:
                os.remove(os.path.join(cache_dir, entry))
                dropped = True
            except OSError:
                pass
    try:
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=_STAMP + ".")
        with os.fdopen(fd, "w") as f:
            f.write(digest + "\n")
        os.replace(tmp, stamp)
    except OSError:  # pragma: no cover - checked writable just before
        pass
    return dropped


def _cache_setup() -> dict:
    """Decide whether this module's kernels can be cached on disk; warn (once) if not.

    Runs Numba's own search (``cache=True`` on :func:`_cache_probe`, a function of this file,
    so exactly the locators, ``NUMBA_CACHE_LOCATOR_CLASSES`` included, that the kernels would
    get), then writes a file in the directory found, as saving will (Numba checks that for
    every locator but the zip-archive one).  Returns :func:`cache_info`'s dictionary.
    """
    info = dict(enabled=False, dir="", writable=False, note="")
    if numba.config.DISABLE_JIT:
        info["note"] = "NUMBA_DISABLE_JIT=1: nothing is compiled"
        return info
    try:
        disp = njit(cache=True)(_cache_probe)
        found = str(getattr(getattr(disp, "_cache", None), "cache_path", "") or "")
        problem = _dir_problem(found) if found else ""
        if problem:  # a locator that does not check (zip archives), or a race
            problem = f"{found} (Numba's choice: {problem})"
    except RuntimeError as exc:  # "cannot cache function ...: no locator available for file ..."
        found, problem = "", str(exc)
    env_dir = os.path.abspath(numba.config.CACHE_DIR) if numba.config.CACHE_DIR else ""
    if not problem:
        info.update(enabled=True, dir=found, writable=True)
        _drop_stale_kernels(found)
        if (env_dir and found and not getattr(numba.config, "CACHE_LOCATOR_CLASSES", "")
                and not os.path.abspath(found).startswith(env_dir.rstrip(os.sep) + os.sep)):
            # Numba skipped the directory the user asked for, without a word
            why = _dir_problem(env_dir) or "no file can be written there"
            info["note"] = f"NUMBA_CACHE_DIR={numba.config.CACHE_DIR} is ignored: not writable ({why})"
            warnings.warn(
                f"fastloss: NUMBA_CACHE_DIR={numba.config.CACHE_DIR!r} is not writable ({why}). "
                "Numba neither reads nor writes a cache directory it cannot write: it caches "
                f"the numba backend's kernels in {found} instead. Point NUMBA_CACHE_DIR at a "
                "writable directory, or unset it.",
                NumbaCacheWarning, stacklevel=2)
        return info
    cands = _cache_candidates()
    tried = "; ".join(f"{d} ({label}: {_dir_problem(d) or 'writable now'})" for label, d in cands)
    if problem and "no locator available" not in problem:  # e.g. NUMBA_CACHE_LOCATOR_CLASSES
        tried = f"{problem}; {tried}"
    info["dir"] = found or cands[0][1]
    info["note"] = f"tried {tried}" if tried else problem
    warnings.warn(
        "fastloss: Numba has no writable cache directory for the numba backend's kernels, so "
        "they are compiled in memory on every run (seconds per kernel at its first use in "
        f"each process). Tried: {tried or problem}. To cache them, set NUMBA_CACHE_DIR to a "
        "writable directory (e.g. export NUMBA_CACHE_DIR=/var/tmp/numba-cache) before "
        "starting Python.",
        NumbaCacheWarning, stacklevel=2)
    return info


_INFO = {}


def setup(import_error: str = "") -> dict:
    """Run :func:`_cache_setup` (once per process, at import) and keep its answer for
    :func:`cache_info`."""
    _INFO.clear()
    if numba is None:  # pragma: no cover
        _INFO.update(enabled=False, dir="", writable=False, note=import_error)
    else:
        _INFO.update(_cache_setup())
    return dict(_INFO)


def cache_info() -> dict:
    """Where Numba caches this backend's compiled kernels.

    Returns
    -------
    dict
        ``enabled`` (bool): kernels are cached on disk (else compiled in memory in every
        process); ``dir`` (str): the cache directory in use, or when there is none the one
        Numba would try first (``NUMBA_CACHE_DIR``, else ``__pycache__`` next to this
        file); ``writable`` (bool); ``note`` (str): what was tried, or why
        ``NUMBA_CACHE_DIR`` is ignored ("" when nothing is to be said).
    """
    return dict(_INFO)

