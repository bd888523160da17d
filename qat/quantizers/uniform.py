"""Uniform affine quantizer with a fixed (calibrated, not learned) step and zero-point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from qat.quantizers.affine import AffineConfig, AffineQuantizer
from qat.quantizers.base import register_quantizer

__all__ = ["UniformConfig", "UniformQuantizer"]


@dataclass
class UniformConfig(AffineConfig):
    """Config of :class:`UniformQuantizer`; all fields are those of :class:`AffineConfig`."""

    name: ClassVar[str] = "uniform"


@register_quantizer(UniformConfig)
class UniformQuantizer(AffineQuantizer):
    """Eq. (1) of :mod:`qat.quantizers.affine` with ``step`` and ``zero_point`` as buffers.

    The step and zero-point come from :meth:`initialize_` (min-max or MSE search) and receive no gradient; the
    input gets the STE gradient ``1`` inside the clipping range and ``0`` outside. This is the static PTQ
    quantizer, e.g. EfficientDM's frozen W8A8 first/last layers.
    """

    def __init__(self, config: UniformConfig, num_channels: int | None = None, channel_axis: int = 0,
                 group_count: int | None = None) -> None:
        super().__init__(config, num_channels, channel_axis, group_count)
        self.register_buffer("step", torch.ones(self.param_shape))
        self.register_buffer("zero_point", torch.zeros(self.param_shape))

    def _step_zero(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.step, self.zero_point

    def _write_init(self, step: Tensor, zero_point: Tensor) -> None:
        self.step.copy_(step)
        self.zero_point.copy_(zero_point)
