"""Low-rank representation mimicking (LRM): tapped features compared in a fixed low-rank space of the teacher's.

BinaryDM (Zheng et al., ICLR 2025, arXiv:2404.05662, Sec. 3.3, Eq. 10-12): for every tapped block ``i`` with ``C_i``
channels, the teacher's features give the channel covariance ``Cov_i`` over all samples and positions, whose
eigenvectors in descending order of eigenvalue, truncated to ``k_i = max(1, round(C_i / K))``, form
``E_i (C_i, k_i)``. Student and teacher features are projected onto them and compared::

    R_i = F_i E_i     (F_i: the features as rows of C_i channels, (N, C_i) -> (N, k_i))
    L   = (1 / M) sum_i mean( (R_i^S - R_i^T)^2 )                                     (M tapped blocks)

``E_i`` is computed once and then frozen (the paper's Table 16: refreshing it is worse). Channels are axis 1 of
``(B, C, ...)`` convolution features and the last axis of ``(B, N, C)`` token features.

Fitting: :meth:`LowRankMimicking.observe` accumulates the statistics of teacher features (e.g. a method's
calibration batches) and :meth:`LowRankMimicking.fit_` computes the bases; a term never fitted fits itself on the
first training batch's teacher features, as the paper. The bases are buffers of the term (saved in the trainer's
checkpoints, so a resumed run keeps them) and are broadcast from rank 0 at the first step of a data-parallel run, so
that every process projects onto the same space.

Deviations from the reference code: the covariance is over channels, as the paper (the code's ``pca_lowrank`` runs
over the last axis of NCHW tensors, the image width); the statistics may cover more than one batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from qat.checks import at_least
from qat.losses.base import LossConfig, LossInputs, register_loss
from qat.losses.feature import FeatureTerm

__all__ = ["LowRankMimickingConfig", "LowRankMimicking", "channel_rows", "principal_directions", "project"]


@dataclass
class LowRankMimickingConfig(LossConfig):
    """Config of :class:`LowRankMimicking`.

    Args:
        weight: ``lambda`` (BinaryDM: 1e-4 next to the epsilon loss).
        taps: module-name patterns of the compared features (BinaryDM: every block output,
            :func:`qat.families.block_outputs`).
        rank_divisor: ``K``: each block keeps ``round(C / K)`` directions (BinaryDM: 4).
    """

    name: ClassVar[str] = "lrm"
    weight: float = 1e-4
    taps: list[str] = field(default_factory=list)
    rank_divisor: int = 4

    def problems(self) -> list[tuple[str, str]]:
        return super().problems() + at_least("rank_divisor", self.rank_divisor, 1)


def channel_rows(feature: Tensor) -> Tensor:
    """``(N, C)``: one row of channels per sample and position (axis 1 of ``(B, C, ...)`` with 4 or more dims, the
    last axis of ``(B, N, C)`` tokens or ``(B, C)`` vectors)."""
    if feature.dim() >= 4:
        feature = feature.movedim(1, -1)
    return feature.reshape(-1, feature.shape[-1])


def project(feature: Tensor, basis: Tensor) -> Tensor:
    """``E^T f`` at every sample and position: ``(B, k, ...)`` for ``(B, C, ...)`` with 4 or more dims, ``(..., k)``
    for tokens or vectors; the same numbers as ``channel_rows(feature) @ basis``, computed as one batched matrix
    product on the feature as it lies (no channels-last copy of an activation-sized tensor)."""
    if feature.dim() >= 4:
        return (basis.t() @ feature.flatten(2)).unflatten(2, feature.shape[2:])
    return feature @ basis


def principal_directions(cov: Tensor, k: int) -> Tensor:
    """The ``k`` leading eigenvectors of a symmetric ``(C, C)`` matrix as columns ``(C, k)``, eigenvalues
    descending; each column's largest-magnitude entry is made positive (a deterministic sign)."""
    _, vectors = torch.linalg.eigh(cov.double())
    top = vectors.flip(-1)[:, :k]
    rows = top.abs().argmax(0)
    signs = torch.sign(top[rows, torch.arange(k, device=top.device)])
    return top * torch.where(signs == 0, 1.0, signs)


def _key(name: str) -> str:
    return name.replace(".", "-")


@register_loss(LowRankMimickingConfig)
class LowRankMimicking(FeatureTerm):
    """LRM (see the module docstring): a scalar, the mean over tapped blocks of the projected features' MSE."""

    config: LowRankMimickingConfig

    def __init__(self, config: LowRankMimickingConfig) -> None:
        super().__init__(config)
        # one (C, k) buffer per tapped module ("." in module names stored as "-")
        self.bases = nn.Module()
        self.register_buffer("fitted", torch.tensor(False))
        self._is_fitted: bool | None = False  # the buffer's value, read once per load (no GPU sync per step)
        # name -> [sum of x x^T, sum of x, rows], float64; never saved (only the fitted bases are)
        self._stats: dict[str, list[Any]] = {}
        self._synced = False

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any, **kwargs: Any) -> None:
        # a checkpoint restores bases that this (fresh) term has not fitted: create them first, on its device
        head = prefix + "bases."
        for key, value in state_dict.items():
            if key.startswith(head) and "." not in key[len(head):]:
                buf = torch.empty(value.shape, dtype=value.dtype, device=self.fitted.device)
                self.bases.register_buffer(key[len(head):], buf)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._is_fitted = None

    @property
    def is_fitted(self) -> bool:
        """Whether the bases exist (computed, or loaded from a checkpoint)."""
        if self._is_fitted is None:
            self._is_fitted = bool(self.fitted)
        return self._is_fitted

    def basis(self, name: str) -> Tensor:
        """``E (C, k)`` of the tapped module ``name``."""
        return getattr(self.bases, _key(name))

    @torch.no_grad()
    def observe(self, features: dict[str, Tensor]) -> None:
        """Adds teacher features (tapped module name -> tensor) matching the taps to the channel statistics."""
        for name in self.matching(features):
            x = channel_rows(features[name].detach()).double()
            stats = self._stats.setdefault(name, [0.0, 0.0, 0])
            stats[0] = stats[0] + x.t() @ x
            stats[1] = stats[1] + x.sum(0)
            stats[2] += x.shape[0]

    @torch.no_grad()
    def fit_(self) -> None:
        """Computes every basis from the observed statistics (centred channel covariance) and marks the term
        fitted; the statistics are dropped."""
        if not self._stats:
            raise RuntimeError(f"lrm: no teacher feature matched the taps {self.config.taps}; observe() features "
                               "first")
        for name, (xx, xsum, n) in self._stats.items():
            mean = xsum / n
            cov = xx / n - torch.outer(mean, mean)
            c = cov.shape[0]
            k = max(1, round(c / self.config.rank_divisor))
            self.bases.register_buffer(_key(name), principal_directions(cov, k).float().to(self.fitted.device))
        self._stats = {}
        self.fitted.fill_(True)
        self._is_fitted = True

    @torch.no_grad()
    def _sync(self) -> None:
        """Every process takes rank 0's bases (once per process; a no-op outside a multi-process run)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for _, buf in sorted(self.bases.named_buffers()):
                dist.broadcast(buf, src=0)
        self._synced = True

    def forward(self, inputs: LossInputs) -> Tensor:
        if not self.is_fitted:
            self.observe(inputs.teacher_features)
            self.fit_()
        if not self._synced:
            self._sync()
        names = self.tapped_names(inputs, also=lambda name: hasattr(self.bases, _key(name)))
        terms = []
        for n in names:
            diff = inputs.student_features[n].float() - inputs.teacher_features[n].float()
            terms.append(project(diff, self.basis(n)).pow(2).mean())
        return torch.stack(terms).mean()
