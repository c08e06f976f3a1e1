"""Quick tests of the goal report machinery (``bench/goals.py`` and ``bench/test_goals.py``).

``bench/`` does not run in CI; these keep its goal evaluation, its workloads, the start-up
probes and the pytest-benchmark hooks from rotting, on tiny shapes (a few seconds).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastloss as fl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import goals  # noqa: E402


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _compiled():
    st = fl.backends()
    return [b for b in goals.COMPILED if st[b].available]


# ----------------------------------------------------------------------------- goal evaluation
def _times(numba=1.0, cython=1.2, jax=2.0, memcpy=0.6, numpy=10.0, tc=3.0):
    t = {"memcpy": memcpy, "numpy": numpy, "numba": numba, "cython": cython, "jax": jax, "torch.compile": tc}
    return {k: v for k, v in t.items() if v is not None}


def _line(lines, **kw):
    hits = [g for g in lines if all(g[k] == v for k, v in kw.items())]
    assert len(hits) == 1, (kw, hits)
    return hits[0]


def test_evaluate_verdicts_follow_the_goals():
    times = {("ce_2048x32000", "float32"): _times(numba=1.0, memcpy=0.6, jax=2.0, cython=1.6, tc=0.9),
             ("ce_8192x1000", "float32"): _times(numba=1.15, memcpy=1.0, cython=1.0, jax=None),
             ("bce_16M", "float64"): _times(numba=1.0, numpy=3.9, cython=0.5, jax=None, tc=None)}
    lines = goals.evaluate(times)
    ce = dict(workload="ce_2048x32000", dtype="float32")
    g = _line(lines, measure="best backend time / memcpy", **ce)
    assert g["issue"] == "speed" and g["backend"] == "numba"  # the faster backend
    assert g["value"] == pytest.approx(1.0 / 0.6) and g["met"] is False and g["verdict"] == "NOT MET"  # 1.67 > 1.2
    assert g["target"] == "<= 1.20x"
    nc = _line(lines, measure="time / cython time", **ce)
    assert nc["backend"] == "numba" and nc["value"] == pytest.approx(1.0 / 1.6) and nc["met"] is True
    # each backend against each peer
    assert _line(lines, measure="time / JAX jit", backend="numba", **ce)["value"] == pytest.approx(0.5)
    assert _line(lines, measure="time / JAX jit", backend="cython", **ce)["met"] is True  # 1.6 < 2.0
    tc = _line(lines, measure="time / torch.compile", backend="numba", **ce)
    assert tc["value"] == pytest.approx(1.0 / 0.9) and tc["met"] is False
    # limits are inclusive where the goal says "<=": exactly 1.15x cython, exactly 1.5x memcpy (cython best)
    ce8 = dict(workload="ce_8192x1000", dtype="float32")
    assert _line(lines, measure="time / cython time", **ce8)["met"] is True
    bm = _line(lines, measure="best backend time / memcpy", **ce8)
    assert bm["backend"] == "cython" and bm["value"] == pytest.approx(1.0) and bm["met"] is True
    assert _line(lines, measure="time / JAX jit", backend="numba", **ce8)["verdict"].startswith("not measured")
    # float64 has only numba vs cython
    b64 = [g for g in lines if g["workload"] == "bce_16M"]
    assert [(g["measure"], g["met"]) for g in b64] == [("time / cython time", False)]  # 2x > 1.15x
    # workloads not measured have no lines
    assert not [g for g in lines if g["workload"] in ("lse_2048x32000", "ce_262144x10")]
    s = goals.summarize(lines)
    assert s["total"] == len(lines) and s["met"] + s["not_met"] + s["not_measured"] == s["total"]
    text = goals.format_goals(lines)
    assert "speed goals" in text and "NOT MET" in text
    assert f"{s['met']} of {s['total']} goals met" in text


def test_evaluate_missing_implementations_and_reduced_shapes():
    times = {("ce_2048x32000", "float32"): _times(cython=None, jax=None)}
    lines = goals.evaluate(times, not_run={"jax": "JAX is not installed"})
    jx = _line(lines, measure="time / JAX jit", backend="numba")
    assert jx["met"] is None and jx["value"] is None and "JAX is not installed" in jx["verdict"]
    assert _line(lines, measure="time / cython time")["verdict"].startswith("not measured")
    red = goals.evaluate(times, reduced=True)
    assert all(g["met"] is None for g in red)
    assert _line(red, measure="best backend time / memcpy")["verdict"] == "n/a (reduced shapes)"
    assert _line(red, measure="best backend time / memcpy")["value"] == pytest.approx(1.0 / 0.6)


def test_evaluate_startup_lines():
    startup = {"import": {"median": 0.15, "best": 0.1, "runs": [0.15]},
               "first_call_auto": {"median": 0.6, "best": 0.4, "runs": [0.6], "backend": "numba"},
               "first_call_cython": {"median": 0.004, "best": 0.003, "runs": [0.004], "backend": "cython"},
               "warmup": {"seconds": 130.0, "dtypes": ["float32", "float64"], "layouts": ["C"], "cache_files": 9}}
    lines = goals.evaluate({}, startup)
    assert [(g["issue"], g["met"]) for g in lines] == [("start-up", True), ("start-up", False),
                                                        ("start-up", True), ("start-up", False)]
    assert "auto -> numba" in lines[1]["measure"]
    assert lines[2]["shown"] == "4.00 ms" and lines[2]["target"] == "< 10.00 ms"
    assert lines[3]["shown"] == "130 s" and lines[3]["target"] == "< 120 s"
    assert "warmup: 130.0 s" in goals.format_startup({"warmup": startup["warmup"]})
    failed = goals.evaluate({}, {"import": {"error": "boom"}, "first_call_auto": {"error": "boom"}},
                            not_run={"cython": "unavailable: not built"})
    assert all(g["met"] is None for g in failed)
    assert "not built" in failed[-1]["verdict"] and "boom" in failed[0]["verdict"]


def test_workload_selection():
    keys = lambda names: [w.key for w in goals.select(names)]  # noqa: E731
    assert keys([]) == [w.key for w in goals.WORKLOADS]
    assert keys(["ce"]) == ["ce_2048x32000", "ce_8192x1000", "ce_262144x10"]  # not bce: a family name
    assert keys(["bce"]) == ["bce_16M"]
    assert keys(["2048x32000"]) == ["ce_2048x32000", "lse_2048x32000"]
    assert keys(["logsumexp", "262144"]) == ["ce_262144x10", "lse_2048x32000"]
    assert goals.BY_KEY["bce_16M"].name() == "bce_with_logits fwd+grad 16M"
    assert goals.BY_KEY["bce_16M"].name((1 << 16,)) == "bce_with_logits fwd+grad 64K"


# ----------------------------------------------------------------------------- measuring
@pytest.mark.parametrize("key", [w.key for w in goals.WORKLOADS])
def test_cases_agree_with_the_numpy_backend(key):
    """Each workload on a tiny shape (the same class count as its reduced shape): memcpy, the
    numpy backend and every compiled backend run, agree, and are timed."""
    w = goals.BY_KEY[key]
    shape = (4, w.reduced[1]) if len(w.reduced) == 2 else (1000,)
    case = goals.build_case(w, "float32", shape)
    assert case.logits.shape == shape and case.logits.dtype == np.float32
    res = goals.measure_case(case, _compiled(), reps=1, jax=False)
    assert set(res["times"]) == {"memcpy", "numpy", *_compiled()}
    for impl, c in res["checks"].items():
        assert c["ok"], (impl, c)
    for t in res["times"].values():
        assert t["best"] > 0 and t["median"] >= t["best"] and t["reps"] >= 1
    assert res["times"]["numpy"]["reps"] == 2  # at least 2 numpy calls


def test_backends_are_timed_in_turns_and_peers_after():
    """measure_case: memcpy, the numpy backend and the compiled backends warmed up and checked
    first, then timed in turns (the numpy backend in the first max(2, reps // 2) rounds), the
    peers after in blocks; the log in that order, a failing backend logged in its place."""
    case = goals.build_case(goals.BY_KEY["ce_8192x1000"], "float64", (8, 50))
    real, seq = case.call, []

    def call(be):
        seq.append(be)
        if be == "broken":
            raise RuntimeError("no kernel")
        return real("numpy")

    case.call = call
    logged = []
    res = goals.measure_case(case, ["numba", "broken", "cython"], reps=4, jax=False,
                             log=lambda impl, t, c: logged.append((impl, t is not None, c["ok"])))
    # warm-ups (numba, cython: one call each, checked), then 4 rounds in turns
    assert seq[:4] == ["numpy", "numba", "broken", "cython"]
    assert seq[4:] == ["numpy", "numba", "cython"] * 2 + ["numba", "cython"] * 2
    assert logged == [("memcpy", True, True), ("numpy", True, True), ("numba", True, True),
                      ("broken", False, False), ("cython", True, True)]
    assert res["times"]["numpy"]["reps"] == 2 and res["times"]["numba"]["reps"] == 4
    assert "broken" not in res["times"] and res["checks"]["broken"]["error"] == "RuntimeError: no kernel"
    assert all(t["first"] > 0 for t in res["times"].values())


def test_a_wrong_implementation_is_flagged(monkeypatch):
    case = goals.build_case(goals.BY_KEY["ce_8192x1000"], "float64", (8, 1000))
    real = case.call

    def call(be):
        if be != "numba":
            return real(be)
        loss, grad = real("numpy")
        return loss * 1.01, grad

    case.call = call
    res = goals.measure_case(case, ["numba"], reps=1, jax=False)
    assert res["checks"]["numpy"]["ok"] and not res["checks"]["numba"]["ok"]
    assert res["checks"]["numba"]["max_err"] == pytest.approx(0.01, rel=1e-3)


def test_jax_peer_agrees():
    pytest.importorskip("jax")
    for key, shape in (("ce_2048x32000", (4, 100)), ("lse_2048x32000", (4, 100)), ("bce_16M", (512,))):
        case = goals.build_case(goals.BY_KEY[key], "float32", shape)
        res = goals.measure_case(case, [], reps=1, jax=True)
        assert res["checks"]["jax"]["ok"], (key, res["checks"]["jax"])
    # float64 is refused while JAX computes in float32 -- set here, as another test module
    # (tests/test_jax_adapter.py) switches x64 on for the whole session
    import jax

    f64 = goals.build_case(goals.WORKLOADS[0], "float64", (2, 10))
    with jax.enable_x64(False):
        with pytest.raises(goals.Unavailable, match="float32"):
            goals.jax_callable(f64)
    with jax.enable_x64(True):
        goals.jax_callable(f64)()


def test_torch_compile_peer_agrees():
    """The torch.compile peer on one tiny workload (inductor builds C++ with gcc: one compile)."""
    pytest.importorskip("torch")
    case = goals.build_case(goals.BY_KEY["ce_8192x1000"], "float32", (4, 100))
    res = goals.measure_case(case, [], reps=1, peers=["torch.compile"])
    assert res["checks"]["torch.compile"]["ok"], res["checks"]["torch.compile"]
    assert res["times"]["torch.compile"]["best"] > 0
    with pytest.raises(goals.Unavailable, match="float32"):
        goals.peer_callable(goals.build_case(goals.WORKLOADS[0], "float64", (2, 10)), "torch.compile")


def test_startup_probes_in_fresh_processes():
    imp = goals.time_import(runs=1)
    assert 0 < imp["median"] == imp["best"] and imp["numpy"] <= imp["median"]
    assert imp["imported_numba"] is False  # importing fastloss loads no backend
    fc = goals.time_first_call("numpy", runs=1, shape=(8, 5), warm_cache=False)
    assert fc["backend"] == "numpy" and fc["finite"] and fc["median"] > 0 and fc["second"] > 0
    assert "cache_warming_run" not in fc


def test_goals_cli_tiny(tmp_path, capsys):
    js = tmp_path / "g.json"
    rc = goals.main(["--tiny", "--no-peers", "--dtype", "float32", "ce_8192x1000", "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "speed goals" in out and "n/a (reduced shapes)" in out
    doc = json.loads(js.read_text())
    assert doc["schema"] == goals.SCHEMA and doc["tiny"] is True and doc["startup"] is None
    assert doc["not_run"]["jax"] == "--no-jax" and doc["not_run"]["torch.compile"] == "--no-torch"
    (m,) = doc["measurements"]
    assert m["workload"] == "ce_8192x1000" and m["shape"] == [128, 1000] and m["dtype"] == "float32"
    assert set(m["times"]) == {"memcpy", "numpy", *_compiled()}
    assert all(g["met"] is None for g in doc["goals"]) and doc["goals"]
    assert doc["threads"]["fastloss"] == fl.get_num_threads()


def test_pytest_goal_suite_reports_a_goal_table(tmp_path):
    """bench/test_goals.py on one reduced workload with timings on: the conftest hooks print the
    goal table and put the ratios in the benchmarks' extra_info (and the JSON files)."""
    pytest.importorskip("pytest_benchmark")
    bj, gj = tmp_path / "bench.json", tmp_path / "goals.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/test_goals.py", "-q", "-p", "no:cacheprovider",
         "--goal-shapes", "reduced", "--dtypes", "float32", "--impls", "numba,cython",
         "-k", "ce_8192x1000", "--benchmark-max-time", "0.01", "--benchmark-min-rounds", "1",
         "--benchmark-json", str(bj), "--goals-json", str(gj)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "fastloss goals" in out and "speed goals" in out and "reduced shapes" in out
    infos = {b["extra_info"]["impl"]: b["extra_info"] for b in json.loads(bj.read_text())["benchmarks"]}
    assert set(infos) == {"memcpy", "numpy", *_compiled()}
    for impl in _compiled():
        assert infos[impl]["goal ratios"]["time / memcpy"] > 0
        assert infos[impl]["goal ratios"]["speedup vs numpy"] > 0
        # the peers did not run (--impls): their lines are "not measured", the others n/a
        assert infos[impl]["goals"] and all(g["verdict"] == "n/a (reduced shapes)" or
                                            g["verdict"].startswith("not measured") for g in infos[impl]["goals"])
    if set(_compiled()) == {"numba", "cython"}:
        assert infos["numba"]["goal ratios"]["time / cython"] > 0
    doc = json.loads(gj.read_text())
    assert doc["reduced_shapes"] is True and doc["goals"]


def test_adapter_goal_script_measures_every_goal(tmp_path):
    """bench/adapters.py on tiny shapes (no torch.compile: inductor's C++ build is minutes): every
    implementation checked against the NumPy backend and timed, and a verdict per goal -- the
    torch.compile one reported as not measured."""
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    out = tmp_path / "adapters.json"
    proc = subprocess.run([sys.executable, "bench/adapters.py", "--tiny", "--no-compile", "--reps", "2",
                           "--json", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads(out.read_text())
    for key in ("ce fastloss.torch", "ce torch", "ce fastloss.jax", "ce jax", "bce fastloss.torch", "bce torch",
                "overhead raw fl.cross_entropy", "overhead fastloss.torch", "overhead no-op autograd.Function",
                "overhead bare autograd.Function"):
        assert res["times"][key] > 0, key
    goals_ = {g["goal"]: g for g in res["goals"]}
    assert len(goals_) == 5
    assert goals_["fastloss.torch CE 2048x32000 vs torch.compile"]["met"] is None
    assert all(g["met"] in (True, False) for name, g in goals_.items() if "torch.compile" not in name)
    assert res["backend"] in ("numba", "cython", "numpy")
    assert "adapter overhead, CE 64x10 fwd+bwd" in proc.stdout
