"""The README's training example runs and prints what the README says it prints."""
import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _example():
    text = README.read_text()
    section = text[text.index("## A training step"):]
    code, output = re.findall(r"```(?:python)?\n(.*?)```", section, re.S)[:2]
    return code, output.strip()


def _numbers(line):
    m = re.fullmatch(r"loss (\d+\.\d+), accuracy (\d+\.\d+)%", line)
    assert m, line
    return float(m.group(1)), float(m.group(2))


def test_training_example_prints_the_documented_output(backend):
    import fastloss as fl

    code, documented = _example()
    out = io.StringIO()
    with fl.use_backend(backend), contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    loss, acc = _numbers(out.getvalue().strip())
    want_loss, want_acc = _numbers(documented)
    # float32 BLAS (X @ W) may round differently on another CPU: the printed digits, within a step
    assert loss == pytest.approx(want_loss, abs=0.002) and acc == pytest.approx(want_acc, abs=0.2), \
        (out.getvalue(), documented)
