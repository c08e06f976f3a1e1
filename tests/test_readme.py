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


def test_large_vocabulary_example_runs_and_prints_the_documented_output(backend):
    """The README's large-vocabulary example: its own asserts (micro-batches with num_items add
    up to the batch; the same numbers as the materialized logits) and its printed loss."""
    import fastloss as fl

    text = README.read_text()
    section = text[text.index("## Large vocabularies"):text.index("## Semantics")]
    code, output = re.findall(r"```(?:python)?\n(.*?)```", section, re.S)[:2]
    out = io.StringIO()
    with fl.use_backend(backend), contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    pat = r"loss (\d+\.\d+), (\d+) MB of logits never allocated"
    got, want = re.fullmatch(pat, out.getvalue().strip()), re.fullmatch(pat, output.strip())
    assert got and want, (out.getvalue(), output)
    assert float(got.group(1)) == pytest.approx(float(want.group(1)), abs=2e-4) and got.group(2) == want.group(2)
