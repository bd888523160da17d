"""Regularisers on the student's own quantizer parameters.

``basis_l1``: the penalty of BinaryDM's evolvable-basis binarizer (Zheng et al., ICLR 2025, arXiv:2404.05662,
Sec. 3.2, Eq. 6) on the scales of every basis beyond the first, which drives the multi-basis binarizer towards a
single basis before the second is dropped::

    L = (1 / N) sum_{layers} sum_{k >= 1, active} mean_c |s_k|

``N`` is the number of binary weight quantizers (the paper's number of binarized layers), the inner mean runs over
output channels (the paper writes one scale per layer). Deviation: the paper penalises ``s_II`` itself; the absolute
value makes it an L1 penalty, which cannot be lowered by driving a scale negative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from qat.losses.base import LossConfig, LossInputs, LossTerm, register_loss
from qat.quantizers.binary import BinaryQuantizer

__all__ = ["BasisL1Config", "BasisL1"]


@dataclass
class BasisL1Config(LossConfig):
    """Config of :class:`BasisL1`.

    Args:
        weight: ``tau`` (BinaryDM: 9e-2).
    """

    name: ClassVar[str] = "basis_l1"
    weight: float = 9e-2


def binary_weight_quantizers(model: nn.Module) -> list[BinaryQuantizer]:
    """The binary quantizers of ``model``'s layer weights (``*.weight_quantizer``), in module order."""
    return [m for n, m in model.named_modules()
            if isinstance(m, BinaryQuantizer) and n.rsplit(".", 1)[-1] == "weight_quantizer"]


@register_loss(BasisL1Config)
class BasisL1(LossTerm):
    """The scalar penalty of the module docstring; 0 once no quantizer has a second active basis."""

    config: BasisL1Config

    def __init__(self, config: BasisL1Config) -> None:
        super().__init__(config)
        # the student's id, not the student: a module attribute would become a child of this term
        self._student: int | None = None
        self._quantizers: list[BinaryQuantizer] = []

    def forward(self, inputs: LossInputs) -> Tensor:
        if inputs.student is None:
            raise ValueError("basis_l1 reads the student's scales: LossInputs.student is None")
        if id(inputs.student) != self._student:  # walked once per student, not every step
            self._student, self._quantizers = id(inputs.student), binary_weight_quantizers(inputs.student)
        if not self._quantizers:
            raise ValueError("basis_l1: the student has no binary weight quantizer")
        terms = [q.scale[1:q.num_active].abs().reshape(q.num_active - 1, -1).mean(1).sum()
                 for q in self._quantizers if q.num_active > 1]
        if not terms:
            return inputs.student_out.new_zeros(())
        return torch.stack(terms).sum() / len(self._quantizers)
