"""End-to-end tests of ``fastloss bench`` (on tiny shapes) and of the pytest-benchmark suite."""
from __future__ import annotations

import argparse
import io
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fastloss as fl
from fastloss import _bench, _cli

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _available_cpu():
    st = fl.backends()
    return [n for n in ("numpy", "numba", "cython") if st[n].available]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real ``python -m fastloss bench --tiny --json --plot`` run, shared by the tests below."""
    d = tmp_path_factory.mktemp("bench")
    js, png = d / "bench.json", d / "bench.png"
    proc = subprocess.run(
        [sys.executable, "-m", "fastloss", "bench", "--tiny", "--json", str(js), "--plot", str(png)],
        cwd=d, env=_env(), capture_output=True, text=True, timeout=600)
    return proc, js, png


def test_tiny_run_succeeds_and_prints_a_table(tiny_run):
    proc, _, _ = tiny_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for col in ("workload", "backend", "time", "GB/s", "vs numpy", "memcpy", "alloc", "check"):
        assert col in out
    for fn in _bench.KERNELS:
        assert fn in out
    assert "MISMATCH" not in out
    # stderr is a pipe, not a terminal: no progress bar frames in it
    assert "\r" not in proc.stderr


def test_tiny_json_schema_and_numbers(tiny_run):
    proc, js, _ = tiny_run
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(js.read_text())
    assert doc["schema"] == _bench.SCHEMA
    assert doc["mode"] == "tiny"
    m = doc["machine"]
    for key in ("cpu_model", "cpu_count", "cpus_usable", "numpy", "numba", "python", "platform", "fastloss"):
        assert key in m
    assert m["numpy"] == np.__version__
    assert m["cpu_count"] >= 1 and m["cpus_usable"] >= 1
    assert "requested" in doc["threads"]
    backends = doc["backends"]
    assert backends[0] == "numpy"
    assert set(backends) == set(_available_cpu())
    rows = doc["rows"]
    # every kernel and mode, on every backend
    seen = {(r["function"], r["mode"], r["backend"]) for r in rows}
    for fn, k in _bench.KERNELS.items():
        for mode in k.modes:
            for b in backends:
                assert (fn, mode, b) in seen
    keys = {"workload", "function", "mode", "shape", "dtype", "note", "backend", "bytes_moved", "seconds",
            "repeats", "number", "gbps", "memcpy_seconds", "memcpy_gbps", "memcpy_share", "alloc_bytes",
            "speedup_vs_numpy", "alloc_vs_numpy", "ok", "max_err", "first_call_seconds", "error"}
    for r in rows:
        assert keys <= set(r), keys - set(r)
        assert r["ok"] is True and r["error"] is None
        assert r["dtype"] in ("float32", "float64")
        for k in ("seconds", "gbps", "memcpy_seconds", "memcpy_gbps", "memcpy_share", "speedup_vs_numpy"):
            assert isinstance(r[k], float) and r[k] > 0 and np.isfinite(r[k]), (k, r)
        assert isinstance(r["bytes_moved"], int) and r["bytes_moved"] > 0
        assert r["repeats"] >= 1 and r["number"] >= 1
        assert isinstance(r["alloc_bytes"], int) and r["alloc_bytes"] >= 0
        assert r["gbps"] == pytest.approx(r["bytes_moved"] / r["seconds"] / 1e9)
        if r["backend"] == "numpy":
            assert r["speedup_vs_numpy"] == 1.0
    # the byte count of the fused cross-entropy: logits read + int64 targets + gradient + loss
    ce = next(r for r in rows if r["workload"] == "cross_entropy fwd+grad 16x50 float32")
    assert ce["bytes_moved"] == 16 * 50 * 4 * 2 + 16 * 8 + 4
    assert ce["note"] == "grad_out reused"
    # the fused linear + cross-entropy has its yardstick row, the three matrix products alone
    lin = [r for r in rows if r["function"] == "linear_cross_entropy"]
    assert {r["backend"] for r in lin} == set(backends) | {"products"}
    assert lin[0]["shape"] == [16, 8, 50] and lin[0]["bytes_moved"] == 2 * (16 * 8 + 50 * 8) * 4 + 16 * 8 + 4
    # a NumPy call that allocates its result is seen by tracemalloc
    sb = next(r for r in rows if r["function"] == "softmax_backward" and r["backend"] == "numpy")
    assert sb["alloc_bytes"] >= 16 * 50 * 4


def test_tiny_png(tiny_run):
    proc, _, png = tiny_run
    assert proc.returncode == 0, proc.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 300
    assert len(data) > 20_000  # a chart with text and bars, not an empty canvas


def _main(argv, capsys):
    rc = _cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_backend_option_and_filter(tmp_path, capsys):
    js = tmp_path / "b.json"
    rc, out, err = _main(["bench", "--tiny", "--backend", "numpy", "-k", "logsumexp", "--json", str(js),
                          "--progress", "never"], capsys)
    assert rc == 0, err
    doc = json.loads(js.read_text())
    assert doc["backends"] == ["numpy"]
    assert {r["function"] for r in doc["rows"]} == {"logsumexp"}
    assert "\r" not in err


@pytest.mark.parametrize("name", ["numba", "cython"])
def test_numpy_is_always_the_baseline(name, tmp_path, capsys):
    if not fl.backends()[name].available:
        pytest.skip(f"{name} unavailable")
    js = tmp_path / "b.json"
    rc, _, err = _main(["bench", "--tiny", "--backend", name, "-k", "cross_entropy fwd+grad 16x50 float32",
                        "--json", str(js), "--threads", "1"], capsys)
    assert rc == 0, err
    doc = json.loads(js.read_text())
    assert doc["backends"] == ["numpy", name]
    assert doc["threads"]["requested"] == 1
    assert {r["backend"] for r in doc["rows"]} == {"numpy", name}


def test_comma_list_of_backends(capsys):
    avail = _available_cpu()
    rc, out, err = _main(["bench", "--tiny", "--backend", ",".join(reversed(avail)), "-k", "mse_loss fwd "], capsys)
    assert rc == 0, err
    for b in avail:
        assert b in out


def test_unknown_backend_is_a_usage_error(capsys):
    rc, out, err = _main(["bench", "--tiny", "--backend", "nope"], capsys)
    assert rc == 2
    assert "--backend" in err and "'nope'" in err and "numpy" in err


def test_unavailable_backend_says_why_and_how(capsys):
    missing = [n for n, st in fl.backends().items() if not st.available]
    if not missing:
        pytest.skip("every backend is available here")
    rc, out, err = _main(["bench", "--tiny", "--backend", missing[0]], capsys)
    assert rc == 2
    assert "unavailable" in err and "install" in err.lower()


def test_filter_selects_whole_words():
    # "cross_entropy" is not a substring match: binary_cross_entropy stays out
    rows = _bench_labels(["-k", "cross_entropy"])
    assert rows and all(lb.split()[0] == "cross_entropy" for lb in rows), rows
    binary = _bench_labels(["-k", "binary"])
    assert {lb.split()[0] for lb in binary} == {"binary_cross_entropy", "binary_cross_entropy_with_logits"}
    assert all(lb.split()[1] == "fwd" for lb in _bench_labels(["-k", "fwd"]))


def _bench_labels(filter_args):
    parser = argparse.ArgumentParser()
    _bench.add_arguments(parser)
    return [w[0] for w in _bench._workloads(parser.parse_args(["--tiny", *filter_args]))]


def test_filter_matching_nothing_is_a_usage_error(capsys):
    rc, _, err = _main(["bench", "--tiny", "-k", "no such workload"], capsys)
    assert rc == 2 and "--filter" in err


@pytest.mark.parametrize("opt", [["--threads", "0"], ["--repeat", "0"]])
def test_nonpositive_counts_are_usage_errors(opt, capsys):
    rc, _, err = _main(["bench", "--tiny", *opt], capsys)
    assert rc == 2 and opt[0] in err


def test_forced_progress_bar(capsys):
    rc, _, err = _main(["bench", "--tiny", "--backend", "numpy", "-k", "kl_div fwd ", "--progress", "always"],
                       capsys)
    assert rc == 0
    assert "\r[" in err and "kl_div" in err
    assert err.endswith("\r")  # the bar is cleared at the end, the table is on stdout


def test_progress_bar_rendering():
    s = io.StringIO()
    p = _bench.Progress(4, True, s)
    p.update("first")
    p.step()
    p.step()
    p.update("second")
    p.close()
    frames = s.getvalue().split("\r")
    assert any(f.startswith("[..........") and "0/4" in f and "first" in f for f in frames)
    assert any(f.startswith("[##########") and "2/4" in f and "second" in f for f in frames)
    q = io.StringIO()
    off = _bench.Progress(4, False, q)
    off.update("x")
    off.close()
    assert q.getvalue() == ""


def test_a_wrong_backend_is_reported_and_fails(monkeypatch, capsys, tmp_path):
    """A backend whose result disagrees with NumPy is flagged in the table and the JSON, and the
    command exits with status 1 (here a fake 'wrong' backend: NumPy's loss plus 1%)."""
    real_make = _bench.make_case

    def make_case(*a, **k):
        case = real_make(*a, **k)
        call = case.call

        def wrong_or_right(b):
            if b != "wrong":
                return call(b)
            loss, grad = call("numpy")
            return loss * 1.01, grad

        case.call = wrong_or_right
        return case

    monkeypatch.setattr(_bench, "make_case", make_case)
    monkeypatch.setattr(_bench, "_select_backends", lambda fl, req: (["numpy", "wrong"], {}))
    js = tmp_path / "b.json"
    rc, out, err = _main(["bench", "--tiny", "-k", "mse_loss fwd+grad 24x40", "--json", str(js)], capsys)
    assert rc == 1
    assert "MISMATCH" in out and "wrong" in err
    rows = json.loads(js.read_text())["rows"]
    assert [r["ok"] for r in rows] == [True, False]
    assert rows[1]["max_err"] == pytest.approx(0.01, rel=1e-3)


def test_a_failing_backend_is_reported_and_the_run_goes_on(monkeypatch, capsys, tmp_path):
    real_make = _bench.make_case

    def make_case(*a, **k):
        case = real_make(*a, **k)
        call = case.call

        def boom(b):
            if b == "boom":
                raise RuntimeError("kernel exploded")
            return call(b)

        case.call = boom
        return case

    monkeypatch.setattr(_bench, "make_case", make_case)
    monkeypatch.setattr(_bench, "_select_backends", lambda fl, req: (["numpy", "boom"], {}))
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    rc, out, err = _main(["bench", "--tiny", "-k", "logsumexp", "-k", "kl_div fwd ", "--json", str(js),
                          "--plot", str(png)], capsys)
    assert rc == 1
    assert "ERROR RuntimeError: kernel exploded" in out
    assert "kernel exploded" in err
    rows = json.loads(js.read_text())["rows"]
    assert [(r["backend"], r["ok"]) for r in rows] == [("numpy", True), ("boom", False)] * 2
    assert all(r["seconds"] is None and r["speedup_vs_numpy"] is None for r in rows if r["backend"] == "boom")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_compare():
    ref = [np.float32(2.0), np.array([[1.0, -np.inf], [0.5, np.nan]], np.float32)]
    assert _bench.compare(ref, [np.float32(2.0 + 1e-6), ref[1].copy()], np.float32) == (True, pytest.approx(5e-7, rel=0.1))
    assert not _bench.compare(ref, [np.float32(2.01), ref[1]], np.float32)[0]
    assert not _bench.compare(ref, [ref[0], np.array([[1.0, 0.0], [0.5, np.nan]], np.float32)], np.float32)[0]
    assert not _bench.compare(ref, [ref[0], np.zeros((2, 3), np.float32)], np.float32)[0]
    assert not _bench.compare(ref, ref[:1], np.float32)[0]
    # float64 is held to a tighter tolerance
    assert _bench.compare([np.float64(1.0)], [np.float64(1.0 + 1e-6)], np.float32)[0]
    assert not _bench.compare([np.float64(1.0)], [np.float64(1.0 + 1e-6)], np.float64)[0]


def test_make_case_byte_counts():
    c = _bench.make_case("gaussian_nll_loss", "fwd+grad", (8, 5), "float64")
    assert c.nbytes == 8 * 5 * 8 * (3 + 2) + 8  # input, target, var read; d_input, d_var written
    loss, (gi, gv) = c.call("numpy")
    assert gi.shape == gv.shape == (8, 5)
    c = _bench.make_case("softmax", "fwd", (8, 5), "float32")
    assert c.nbytes == 2 * 8 * 5 * 4 and c.note == "out= reused"
    with pytest.raises(ValueError, match="mode"):
        _bench.make_case("softmax", "fwd+grad", (8, 5), "float32")


def test_pytest_benchmark_suite_runs_as_tests():
    """The pytest-benchmark suite with --benchmark-disable: each float32 case runs once and
    checks its result against the NumPy backend (so a wrong kernel fails here; float64 kernels
    are the test matrix's)."""
    pytest.importorskip("pytest_benchmark")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "-q", "--benchmark-disable", "-k", "small",
         "--dtypes", "float32", "-p", "no:cacheprovider",
         # every implementation but torch.compile (inductor compiles each case for seconds;
         # test_peers_option_times_the_framework_forms runs it)
         "--impls", ",".join(i for i in benchlib_impls() if i != "torch.compile")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "failed" not in proc.stdout and "error" not in proc.stdout.lower(), tail


def benchlib_impls():
    from fastloss._bench import peers

    return ("numpy", "numba", "cython") + peers.PEERS


def test_peers_option_times_the_framework_forms(tmp_path, capsys):
    """--peers adds PyTorch eager, torch.compile, JAX jit and the fastloss adapters to the same
    table, each checked against the NumPy backend like the backends are."""
    js = tmp_path / "p.json"
    rc, out, err = _main(["bench", "--tiny", "--peers", "--backend", "numpy", "-k", "cross_entropy fwd+grad float32",
                          "--json", str(js)], capsys)
    assert rc == 0, err
    doc = json.loads(js.read_text())
    rows = doc["rows"]
    got = {(r["workload"], r["backend"]) for r in rows if r["ok"]}
    for w in ("cross_entropy fwd+grad 16x50 float32", "cross_entropy fwd+grad 16x50 float32 (new grad)"):
        for impl in ("numpy", "torch", "torch.compile", "jax", "fastloss.torch", "fastloss.jax"):
            assert (w, impl) in got, (w, impl)
    assert "scipy" in out and "not run" in out  # scipy has no cross-entropy: said, not an error
    assert set(doc["peers"]) >= {"torch", "torch.compile", "jax", "fastloss.torch", "fastloss.jax"}


def test_the_one_timer_batches_short_calls_and_stops_on_its_budget():
    """fastloss bench, bench/goals.py and bench/gpu_check.py time through _bench.time_calls."""
    calls = []
    t = _bench.time_calls(lambda: calls.append(1), 3, min_batch=0.002)
    assert t.number > 1 and t.reps == 3 and 0 < t.best <= t.median
    assert len(calls) == 1 + 1 + 3 * t.number  # warm-up, calibration, the batches
    # the budget ends timing after min_reps batches
    slow = _bench.time_calls(lambda: sum(range(20000)), 1000, min_reps=2, budget=0.0, warmup=False)
    assert slow.reps == 2 and slow.first == 0.0


def test_turns_interleave_the_calls_and_time_each_one():
    """_bench.time_in_turns: round after round, one call of each callable in order (fewer
    rounds where asked), each call's time its own -- a slow stretch that one callable's calls
    fall into shows in its median, not in the others'."""
    seq = []

    def make(name, sleep):
        def fn():
            seq.append(name)
            time.sleep(sleep)
        return fn

    got = _bench.time_in_turns({"a": make("a", 0.002), "b": make("b", 0.0), "c": make("c", 0.0)}, 4, rounds={"c": 2})
    assert seq == ["a", "b", "c", "a", "b", "c", "a", "b", "a", "b"]
    assert (got["a"].reps, got["b"].reps, got["c"].reps) == (4, 4, 2)
    assert got["a"].best >= 0.002 and got["b"].median < 0.002 <= got["a"].median
    assert all(t.number == 1 and t.first == 0.0 and 0 < t.best <= t.median for t in got.values())
    assert got["a"].cpu_per_wall < 0.5  # sleeping: little CPU time over its own wall time


def test_the_one_timer_takes_a_device_clock():
    """A GPU benchmark passes ``batch``: its seconds are what is reported, per call."""
    seen = []

    def batch(fn, number):
        for _ in range(number):
            fn()
        seen.append(number)
        return 0.25 * number + (0.5 if len(seen) == 3 else 0.0)  # one slow batch

    t = _bench.time_calls(lambda: None, 4, batch=batch)
    assert seen == [1] * 5  # the warm-up, then 4 single-call batches
    assert t.first == 0.25 and t.best == 0.25 and t.median == 0.25 and t.number == 1
