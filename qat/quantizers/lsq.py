"""LSQ and LSQ+: a learned step size, and optionally a learned offset.

Esser et al., "Learned Step Size Quantization", ICLR 2020, arXiv:1902.08153.
Bhalgat et al., "LSQ+: Improving low-bit quantization through learnable offsets and better initialization",
CVPR Workshops 2020, arXiv:2004.09576.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from qat.quantizers.affine import AffineConfig, AffineQuantizer
from qat.quantizers.base import register_quantizer
from qat.ste import grad_scale

__all__ = ["LSQConfig", "LSQQuantizer"]


@dataclass
class LSQConfig(AffineConfig):
    """Config of :class:`LSQQuantizer`.

    Args:
        learn_offset: LSQ+: the zero-point is a trained parameter (asymmetric schemes only). Without it an
            asymmetric zero-point stays at its initial value.
        grad_scale: multiply the step's gradient by ``g = 1 / sqrt(N * q_max)`` (LSQ Sec. 2.2), ``N`` the number of
            elements that share one step in the current input. EfficientDM does not use it (off by default).
    """

    name: ClassVar[str] = "lsq"
    learn_offset: bool = False
    grad_scale: bool = False

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        if self.learn_offset and self.symmetric:
            out.append(("learn_offset", "needs an asymmetric quantizer (symmetric=False): the zero-point is 0"))
        return out


@register_quantizer(LSQConfig)
class LSQQuantizer(AffineQuantizer):
    """Eq. (1) of :mod:`qat.quantizers.affine` with a learned step ``s`` (``nn.Parameter`` of shape ``param_shape``).

    The zero-point is an ``nn.Parameter`` with ``learn_offset`` (LSQ+), a buffer otherwise. Its forward value is
    always rounded (STE), so the trained model stays an integer-zero-point model that can be deployed as is.
    Steps are clamped to at least 1e-8 in the forward pass.
    """

    def __init__(self, config: LSQConfig, num_channels: int | None = None, channel_axis: int = 0,
                 group_count: int | None = None) -> None:
        super().__init__(config, num_channels, channel_axis, group_count)
        self.step = nn.Parameter(torch.ones(self.param_shape))
        if config.learn_offset:
            self.zero_point = nn.Parameter(torch.zeros(self.param_shape))
        else:
            self.register_buffer("zero_point", torch.zeros(self.param_shape))

    def _scaled(self, step: Tensor, x: Tensor) -> Tensor:
        """Applies the LSQ gradient scale if configured; ``N = x.numel() / step.numel()``."""
        step = step.clamp_min(1e-8)
        if not self.config.grad_scale:
            return step
        n = max(x.numel() // max(step.numel(), 1), 1)
        return grad_scale(step, 1.0 / math.sqrt(n * self.q_max))

    def _step_zero(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._scaled(self.step, x), self.zero_point

    @torch.no_grad()
    def _write_init(self, step: Tensor, zero_point: Tensor) -> None:
        self.step.copy_(step)
        self.zero_point.copy_(zero_point)
