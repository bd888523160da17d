"""Feature distillation: the student's tapped intermediate features against the teacher's.

    L = (1 / M) sum_m mean( (F_m^S - F_m^T)^2 )                     (over the M tapped modules)

the plain feature-MSE baseline that BinaryDM's low-rank mimicking and BiDM's patch distillation refine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from qat.checks import ConfigProblems
from qat.losses.base import LossConfig, LossInputs, LossTerm, register_loss
from qat.prepare import match

__all__ = ["FeatureMSEConfig", "FeatureMSE"]


@dataclass
class FeatureMSEConfig(LossConfig):
    """Config of :class:`FeatureMSE`.

    Args:
        taps: module-name patterns of the features compared (e.g. ``["mid_block", "up_blocks.*.resnets.*"]``).
    """

    name: ClassVar[str] = "feature_mse"
    taps: list[str] = field(default_factory=list)


@register_loss(FeatureMSEConfig)
class FeatureMSE(LossTerm):
    """Mean over tapped modules of the elementwise MSE between student and teacher features (a scalar)."""

    config: FeatureMSEConfig

    def __init__(self, config: FeatureMSEConfig) -> None:
        super().__init__(config)
        if config.weight > 0 and not config.taps:
            raise ConfigProblems([("taps", "needs at least one module-name pattern (e.g. ['mid_block']) when "
                                           "weight > 0")])

    def taps(self) -> list[str]:
        return list(self.config.taps)

    def forward(self, inputs: LossInputs) -> Tensor:
        names = sorted(n for n in inputs.teacher_features if any(match(n, p) for p in self.config.taps))
        missing = [n for n in names if n not in inputs.student_features]
        if not names or missing:
            raise ValueError(f"feature_mse: taps {self.config.taps} gave no teacher feature, or features the student "
                             f"lacks ({missing[:3]}); are the taps attached to both models?")
        terms = [(inputs.student_features[n].float() - inputs.teacher_features[n].float()).pow(2).mean()
                 for n in names]
        return torch.stack(terms).mean()
