"""The public functions of fastloss.

Each function is written once, for host and device data alike, against the array adaptor
of its call (:mod:`fastloss._arrays`: NumPy arrays, or the CUDA backend's device arrays).  It
validates everything once (nothing is written before validation passed), normalizes its
arrays to the 2-D views the kernels take (``xp.layout``), computes the reduction factors, and
calls one kernel entry point of one backend (see :mod:`fastloss._backends._protocol` for the
kernel protocol).  Every user-facing message is built here or in :mod:`fastloss._validate`.
"""
from __future__ import annotations

from .cross_entropy import cross_entropy
from .elementwise import binary_cross_entropy, binary_cross_entropy_with_logits, gaussian_nll_loss, kl_div, mse_loss
from .linear import linear_cross_entropy
from .normalizers import log_softmax, log_softmax_backward, logsumexp, softmax, softmax_backward

__all__ = [
    "logsumexp",
    "softmax",
    "log_softmax",
    "softmax_backward",
    "log_softmax_backward",
    "cross_entropy",
    "linear_cross_entropy",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy",
    "kl_div",
    "mse_loss",
    "gaussian_nll_loss",
]
