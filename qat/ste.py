"""Straight-through estimators: the only place in DiffQAT where a gradient is replaced.

Every estimator here is a named function with its own gradient test in ``tests/qat/test_ste.py``. Quantizers
call these functions instead of writing ``(x.round() - x).detach() + x`` inline, so that the gradient rule of
the whole library can be read (and changed) in one file.

References:
    Bengio et al., "Estimating or Propagating Gradients Through Stochastic Neurons", arXiv:1308.3432 (STE).
    Esser et al., "Learned Step Size Quantization", ICLR 2020, arXiv:1902.08153 (gradient scale).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["round_ste", "grad_scale", "sign_ste"]


def round_ste(x: Tensor) -> Tensor:
    """Round to the nearest integer in the forward pass, identity in the backward pass.

    forward: ``round(x)`` (ties to even, as ``torch.round``); backward: ``d round_ste(x) / dx = 1``.
    """
    return x + (torch.round(x) - x).detach()


def grad_scale(x: Tensor, scale: float | Tensor) -> Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by ``scale`` in the backward pass.

    LSQ uses it on the step size with ``scale = 1 / sqrt(N * Q_p)`` (Esser et al. 2020, Sec. 2.2), where ``N`` is
    the number of elements that share one step and ``Q_p`` the largest positive integer level.
    """
    y = x * scale
    # ``x.detach() + (y - y.detach())`` is exactly ``x`` in floating point; ``(x - y).detach() + y`` can be 1 ulp off.
    return x.detach() + (y - y.detach())


def sign_ste(x: Tensor) -> Tensor:
    """``sign(x)`` mapped to {-1, +1} (0 goes to +1) forward; clipped identity backward.

    backward: ``d sign_ste(x) / dx = 1 if |x| <= 1 else 0`` (the hard-tanh STE of BinaryConnect / BNN).
    Used by the binarizers of BinaryDM and BiDM.
    """
    forward = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    clipped = x.clamp(-1.0, 1.0)
    return clipped + (forward - clipped).detach()
