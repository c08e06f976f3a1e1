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


def _adapter_examples():
    text = README.read_text()
    section = text[text.index("## In PyTorch and JAX"):text.index("## Semantics")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.mark.parametrize("which", ["torch", "jax"])
def test_adapter_training_loops_run_and_learn(which):
    """The README's PyTorch and JAX loops run as written and bring the loss well below log(10)."""
    code = [c for c in _adapter_examples() if f"import fastloss.{which}" in c]
    assert len(code) == 1
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code[0], str(README), "exec"), {})
    m = re.fullmatch(rf"{which}: loss (\d+\.\d+)", out.getvalue().strip())
    assert m, out.getvalue()
    assert float(m.group(1)) < 0.8 * 2.302585  # log(10): the loss of a uniform guess
