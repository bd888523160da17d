"""Output distillation: the student's prediction against the teacher's on the same ``(x_t, t, c)``.

    L = || eps_s(x_t, t, c) - eps_T(x_t, t, c) ||^2                 (EfficientDM Eq. 7, mean over elements)

with ``eps`` the CFG-combined prediction ``eps_u + w (eps_c - eps_u)`` (``target: cfg``, as EfficientDM) or both
branches supervised separately (``target: branches``: ``(||eps_c - eps_c^T||^2 + ||eps_u - eps_u^T||^2) / 2``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from qat.checks import one_of
from qat.losses.base import LossConfig, LossInputs, LossTerm, register_loss
from qat.sampling import cfg_combine

__all__ = ["OutputMSEConfig", "OutputMSE"]


@dataclass
class OutputMSEConfig(LossConfig):
    """Config of :class:`OutputMSE`.

    Args:
        target: ``cfg`` (the MSE of the CFG-combined predictions) or ``branches`` (each branch, averaged).
    """

    name: ClassVar[str] = "output_mse"
    target: str = "cfg"

    def problems(self) -> list[tuple[str, str]]:
        return super().problems() + one_of("target", self.target, ("cfg", "branches"))


def _per_sample(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).pow(2).flatten(1).mean(1)


@register_loss(OutputMSEConfig)
class OutputMSE(LossTerm):
    """Per-sample MSE ``(B,)`` between the student's and the teacher's predictions (see the module docstring)."""

    config: OutputMSEConfig

    def forward(self, inputs: LossInputs) -> Tensor:
        if not inputs.guided:
            return _per_sample(inputs.student_out, inputs.teacher_out)
        eps_u, eps_c = inputs.student_out.chunk(2)
        ref_u, ref_c = inputs.teacher_out.chunk(2)
        if self.config.target == "cfg":
            w = inputs.guidance
            return _per_sample(cfg_combine(eps_u, eps_c, w), cfg_combine(ref_u, ref_c, w))
        return 0.5 * (_per_sample(eps_c, ref_c) + _per_sample(eps_u, ref_u))
