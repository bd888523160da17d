"""Space patched distillation (SPD): per-patch spatial relation maps of the student's features against the teacher's.

BiDM (Zheng et al., "BiDM: Pushing the Limit of Quantization for Diffusion Models", NeurIPS 2024, arXiv:2412.05926,
Sec. 3.3, Eq. 13-16). A tapped feature ``F (B, C, H, W)`` is cut into ``p x p`` spatial patches of ``h = H // p``
rows and ``w = W // p`` columns::

    P_ij = F[:, :, i h : (i + 1) h, j w : (j + 1) w]                  (B, C, h, w)     (Eq. 13)
    A_ij = P_ij P_ij^T          (over the last axis: a per-channel Gram matrix of rows, (B, C, h, h))      (Eq. 14)
    Â_ij = A_ij / ||A_ij||_F    (one norm per patch, over the whole batched tensor)                        (Eq. 15)
    L_m  = (1 / p^2) sum_ij || Â_ij^T - Â_ij^S ||_F                  (block m)                              (Eq. 16)
    L    = (1 / M) sum_m L_m                                          (over the M tapped blocks)

with ``^S`` the student's features and ``^T`` the teacher's; the caller multiplies ``L`` by the config's weight.
The normalisation makes each patch's term invariant to a positive scale of the features.

Conventions of the reference code that we follow: the Frobenius normalisation is global per patch (over batch,
channels and both spatial axes, not per sample or channel); the per-patch distance is the norm itself, not its
square; ``H`` and ``W`` are floored to multiples of ``p`` (the remainder rows and columns at the bottom and right are
dropped), and a feature smaller than ``p`` (``h == 0`` or ``w == 0``) contributes 0 while still counting in the mean
over blocks; ``lambda = 1e-2`` for LDMs, as the code and the paper's Appendix A (the main text says 4).

Token features ``(B, N, D)`` with ``N`` a perfect square are folded to ``(B, D, sqrt(N), sqrt(N))`` (tokens row-major
on the grid). Everything is computed in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from qat.checks import at_least
from qat.losses.base import LossConfig, LossInputs, register_loss
from qat.losses.feature import FeatureTerm

__all__ = ["SpacePatchedDistillationConfig", "SpacePatchedDistillation", "as_grid", "patch_relations",
           "spd_block_loss"]


@dataclass
class SpacePatchedDistillationConfig(LossConfig):
    """Config of :class:`SpacePatchedDistillation`.

    Args:
        weight: ``lambda`` (BiDM's code and Appendix A: 1e-2 for LDMs).
        patches: ``p``, patches per side (``p x p`` patches per feature map).
        taps: module-name patterns of the compared features (e.g. ``["down_blocks.*", "mid_block", "up_blocks.*"]``).
    """

    name: ClassVar[str] = "spd"
    weight: float = 1e-2
    patches: int = 4
    taps: list[str] = field(default_factory=list)

    def problems(self) -> list[tuple[str, str]]:
        return super().problems() + at_least("patches", self.patches, 1)


def as_grid(feature: Tensor, tap: str) -> Tensor:
    """``(B, C, H, W)``: ``feature`` as it is, or ``(B, N, D)`` tokens folded to ``(B, D, sqrt(N), sqrt(N))``.

    Raises:
        ValueError: tokens whose count is not a perfect square, or a feature of another rank.
    """
    if feature.dim() == 4:
        return feature
    if feature.dim() == 3:
        b, n, d = feature.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"spd: tap {tap!r} gave tokens of shape {tuple(feature.shape)}, whose count {n} is not "
                             "a perfect square, so they cannot be folded to a square spatial grid")
        return feature.transpose(1, 2).reshape(b, d, side, side)
    raise ValueError(f"spd: tap {tap!r} gave a feature of shape {tuple(feature.shape)}; expected (B, C, H, W) maps or "
                     "(B, N, D) tokens")


def patch_relations(feature: Tensor, patches: int) -> Tensor:
    """``Â (p, p, B, C, h, h)``: every patch's relation map divided by its Frobenius norm (0 for a zero map).

    ``feature`` is ``(B, C, H, W)`` with ``H, W >= p``; the remainder beyond ``p * (H // p)`` rows and
    ``p * (W // p)`` columns is dropped.
    """
    p = patches
    b, c, height, width = feature.shape
    h, w = height // p, width // p
    x = feature[..., :p * h, :p * w].reshape(b, c, p, h, p, w).permute(2, 4, 0, 1, 3, 5)  # (p, p, B, C, h, w)
    a = x @ x.transpose(-1, -2)  # (p, p, B, C, h, h)
    norm = torch.linalg.vector_norm(a.flatten(2), dim=-1)[..., None, None, None, None]
    tiny = torch.finfo(a.dtype).tiny
    return torch.where(norm > 0, a / norm.clamp_min(tiny), torch.zeros((), dtype=a.dtype, device=a.device))


def spd_block_loss(student: Tensor, teacher: Tensor, patches: int) -> Tensor:
    """``L_m``: the mean over the ``p x p`` patches of ``||Â^T - Â^S||_F`` for ``(B, C, H, W)`` features (a scalar,
    float32; 0 when the maps are smaller than ``p``)."""
    student, teacher = student.float(), teacher.float()
    if student.shape[-2] < patches or student.shape[-1] < patches:
        return student.flatten()[:0].sum()  # 0 on the student's graph and device (never NaN)
    diff = patch_relations(teacher, patches) - patch_relations(student, patches)
    return torch.linalg.vector_norm(diff.flatten(2), dim=-1).mean()


@register_loss(SpacePatchedDistillationConfig)
class SpacePatchedDistillation(FeatureTerm):
    """SPD (see the module docstring): a scalar, the mean over tapped blocks of the patched relation distance."""

    config: SpacePatchedDistillationConfig

    def forward(self, inputs: LossInputs) -> Tensor:
        names = self.tapped_names(inputs)
        terms = []
        for n in names:
            student = as_grid(inputs.student_features[n], n)
            teacher = as_grid(inputs.teacher_features[n].detach(), n)
            if student.shape != teacher.shape:
                raise ValueError(f"spd: tap {n!r} gave student features {tuple(student.shape)} and teacher features "
                                 f"{tuple(teacher.shape)}")
            terms.append(spd_block_loss(student, teacher, self.config.patches))
        return torch.stack(terms).mean()
