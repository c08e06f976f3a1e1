"""Benchmarks of the normalizers: log-sum-exp, softmax, log-softmax and their backward passes.

Peers: SciPy (``scipy.special``) and PyTorch / JAX where installed.  See ``conftest.py``.
"""
import benchlib

KERNELS = ["logsumexp", "softmax", "log_softmax", "softmax_backward", "log_softmax_backward"]


def test_normalizer(benchmark, spec):
    benchlib.run(benchmark, spec)
