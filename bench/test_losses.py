"""Benchmarks of the losses, forward only and fused forward + gradient.

Cross-entropy, BCE (with logits and on probabilities), KL divergence, MSE, Gaussian NLL, and the
fused linear + cross-entropy (against the three matrix products alone, its yardstick); the
gradient is written into a reused ``grad_out`` buffer, as in a training loop.  Peers: PyTorch
(autograd) and JAX (``jit(value_and_grad)``) where installed.  See ``conftest.py``.
"""
import benchlib

KERNELS = ["cross_entropy", "binary_cross_entropy_with_logits", "binary_cross_entropy", "kl_div",
           "mse_loss", "gaussian_nll_loss", "linear_cross_entropy"]


def test_loss(benchmark, spec):
    benchlib.run(benchmark, spec)
