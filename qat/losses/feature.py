"""Feature distillation: the student's tapped intermediate features against the teacher's.

    L = (1 / M) sum_m mean( (F_m^S - F_m^T)^2 )                     (over the M tapped modules)

the plain feature-MSE baseline that BinaryDM's low-rank mimicking and BiDM's patch distillation refine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from qat.checks import ConfigProblems
from qat.losses.base import LossConfig, LossInputs, LossTerm, register_loss
from qat.prepare import match

__all__ = ["FeatureTerm", "FeatureMSEConfig", "FeatureMSE"]


class FeatureTerm(LossTerm):
    """Base of the terms over tapped features: ``config.taps`` (module-name patterns) are required when the term is
    on, tapped on both models, and paired by name (:meth:`tapped_names`)."""

    def __init__(self, config: LossConfig) -> None:
        super().__init__(config)
        if config.weight > 0 and not config.taps:
            raise ConfigProblems([("taps", "needs at least one module-name pattern (e.g. ['mid_block']) when "
                                           "weight > 0")])

    def taps(self) -> list[str]:
        return list(self.config.taps)

    def matching(self, features: dict[str, Tensor]) -> list[str]:
        """The names of ``features`` matched by the taps, sorted."""
        return sorted(n for n in features if any(match(n, p) for p in self.config.taps))

    def tapped_names(self, inputs: LossInputs, also: Callable[[str], bool] = lambda name: True) -> list[str]:
        """The teacher's tapped features, each also held by the student (and passing ``also``).

        Raises:
            ValueError: no tapped feature, or one the student (or ``also``) lacks.
        """
        names = self.matching(inputs.teacher_features)
        missing = [n for n in names if n not in inputs.student_features or not also(n)]
        if not names or missing:
            raise ValueError(f"{self.name}: taps {self.config.taps} gave no teacher feature, or features the student "
                             f"lacks (or the term has no state for: {missing[:3]}); are the taps attached to both "
                             "models?")
        return names


@dataclass
class FeatureMSEConfig(LossConfig):
    """Config of :class:`FeatureMSE`.

    Args:
        taps: module-name patterns of the features compared (e.g. ``["mid_block", "up_blocks.*.resnets.*"]``).
    """

    name: ClassVar[str] = "feature_mse"
    taps: list[str] = field(default_factory=list)


@register_loss(FeatureMSEConfig)
class FeatureMSE(FeatureTerm):
    """Mean over tapped modules of the elementwise MSE between student and teacher features (a scalar)."""

    config: FeatureMSEConfig

    def forward(self, inputs: LossInputs) -> Tensor:
        names = self.tapped_names(inputs)
        terms = [(inputs.student_features[n].float() - inputs.teacher_features[n].float()).pow(2).mean()
                 for n in names]
        return torch.stack(terms).mean()
