"""Relation distillation (MPQ-DM's TRD) and the top-K balanced KL (TopKLD), as functions and one loss term.

Relation maps (MPQ-DM, Feng et al., AAAI 2025, arXiv:2412.11549, Sec. 3.3): for features ``F (C, P)`` of one sample
(``P`` positions: pixels of a ``(C, H, W)`` map or tokens of an ``(L, C)`` sequence)::

    F_hat[:, i] = F[:, i] / ||F[:, i]||_2            A = F_hat^T F_hat  (P x P cosine similarities)
    R = softmax(A / tau, dim=-1)                      (one distribution over positions per query position)
    L_TRD = (1 / P) sum_i D(R_T[i] || R_S[i])                                                                  (1)

with ``D`` the KL divergence (MPQ-DM) or TopKLD below. Time smoothing (MPQ-DM: the features averaged over the
last ``N = 2`` denoising steps) averages the teacher's features of the sample's current and previous trajectory step,

    F_T <- (F_T(x_t, t) + F_T(x_t', t')) / 2       (t' the previous, noisier step of the same trajectory)       (3)

and uses the current step alone at a trajectory's first step. The previous step comes with every batch, online (the
step before on the walked trajectories) and cached (stored with each sample), and the trainer runs the teacher on it
(one more no-grad teacher call per step); the student's features are the current step's, with their graph.

MPQ-DM sums over positions and samples and weights by 100; this term averages over query positions (the weight does
not depend on the resolution) and returns one value per row of the batch. Unlike MPQ-DM's released code, which
detaches both features, the student's features keep their graph, so the term trains the student. ``max_positions``
average-pools larger maps first, and the ``P x P`` maps are built ``chunk`` query rows at a time under activation
checkpointing, so that memory stays ``O(chunk P)``.

TopKLD ("Dissecting bit-level scaling laws in quantizing vision generative models", Ding et al.,
arXiv:2501.06218; the paper gives no formula, this is DiffQAT's reading of its text): with ``S`` the teacher's
top-``K`` entries of a distribution and ``p|S`` a distribution renormalised on ``S``::

    TopKLD(p_T, p_S) = alpha D_e(p_T|S, p_S|S) + (1 - alpha) D_i(p_T|U, p_S|U)                                 (2)

the "explicit" knowledge (the teacher's top ``K``) and the "implicit" knowledge (``U``: every entry, or only the tail
outside ``S``), each with its direction: forward ``KL(p_T || p_S)`` (mean-covering) or reverse ``KL(p_S || p_T)``
(mode-seeking). With ``K`` = every entry and both directions forward it is the plain KL. Its use on relation maps
(and on any softmax inside a diffusion model) is DiffQAT's, not the paper's (which applies it to token logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from qat.checks import one_of
from qat.losses.base import LossInputs, register_loss
from qat.losses.feature import FeatureMSEConfig, FeatureTerm

__all__ = ["TopKLDSpec", "topk_kl", "row_divergence", "relation_logits", "relation_divergence", "DivergenceConfig",
           "RelationConfig", "Relation"]

DIRECTIONS = ("forward", "reverse")
IMPLICIT_SCOPES = ("full", "tail")


@dataclass(frozen=True)
class TopKLDSpec:
    """Eq. (2)'s settings: ``k`` (0: plain forward KL), ``alpha``, the two directions and the implicit scope."""

    k: int = 0
    alpha: float = 0.5
    explicit: str = "reverse"
    implicit: str = "forward"
    implicit_scope: str = "full"


def _kl(log_p: Tensor, log_q: Tensor, mask: Tensor | None = None) -> Tensor:
    """``sum_j p_j (log p_j - log q_j)`` over the last dim, over the entries of ``mask`` only (outside it the
    renormalised log-probabilities are ``-inf``: replaced by 0 first, so that no NaN reaches the gradients)."""
    if mask is not None:
        log_p, log_q = torch.where(mask, log_p, 0.0), torch.where(mask, log_q, 0.0)
    terms = log_p.exp() * (log_p - log_q)
    if mask is not None:
        terms = torch.where(mask, terms, 0.0)
    return terms.sum(-1)


def _renormalised(logits: Tensor, mask: Tensor) -> Tensor:
    """``log p|mask``: log-softmax over the entries of ``mask`` only (``-inf`` elsewhere)."""
    return torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)


def _divergence(log_t: Tensor, log_s: Tensor, direction: str, mask: Tensor | None = None) -> Tensor:
    return _kl(log_t, log_s, mask) if direction == "forward" else _kl(log_s, log_t, mask)


def topk_kl(teacher_logits: Tensor, student_logits: Tensor, spec: TopKLDSpec = TopKLDSpec()) -> Tensor:
    """Eq. (2) over the last dimension of logits ``(..., V)``; returns ``(...)``. ``spec.k = 0`` or ``k >= V`` with
    both directions forward gives ``KL(softmax(t) || softmax(s))``."""
    v = teacher_logits.shape[-1]
    if spec.k <= 0:
        return _kl(torch.log_softmax(teacher_logits, -1), torch.log_softmax(student_logits, -1))
    k = min(spec.k, v)
    top = teacher_logits.topk(k, dim=-1).indices
    head = torch.zeros_like(teacher_logits, dtype=torch.bool).scatter_(-1, top, True)
    explicit = _divergence(_renormalised(teacher_logits, head), _renormalised(student_logits, head), spec.explicit,
                           head)
    if spec.implicit_scope == "full":
        implicit = _divergence(torch.log_softmax(teacher_logits, -1), torch.log_softmax(student_logits, -1),
                               spec.implicit)
    elif k == v:  # no tail
        implicit = torch.zeros_like(explicit)
    else:
        tail = ~head
        implicit = _divergence(_renormalised(teacher_logits, tail), _renormalised(student_logits, tail),
                               spec.implicit, tail)
    return spec.alpha * explicit + (1.0 - spec.alpha) * implicit


def _positions(features: Tensor, max_positions: int | None) -> Tensor:
    """``(N, P, C)`` unit vectors per position from ``(N, C, *spatial)`` maps (conv) or ``(N, L, C)`` tokens,
    average-pooled to at most ``max_positions`` positions (maps: a square-ish grid; tokens: groups of neighbours)."""
    f = features.float()
    if f.dim() >= 4:  # (N, C, H, W[, ...]) -> pool the spatial grid
        spatial = f.shape[2:]
        p = math.prod(spatial)
        if max_positions is not None and p > max_positions and f.dim() == 4:
            scale = math.sqrt(max_positions / p)
            size = (max(1, int(spatial[0] * scale)), max(1, int(spatial[1] * scale)))
            f = F.adaptive_avg_pool2d(f, size)
        f = f.flatten(2).transpose(1, 2)
    elif f.dim() == 3:  # (N, L, C) tokens
        if max_positions is not None and f.shape[1] > max_positions:
            f = F.adaptive_avg_pool1d(f.transpose(1, 2), max_positions).transpose(1, 2)
    else:
        raise ValueError(f"relation maps need (N, C, H, W) or (N, L, C) features, got shape {list(features.shape)}")
    return F.normalize(f, dim=-1, eps=1e-8)


def relation_logits(features: Tensor, tau: float = 1.0, max_positions: int | None = None) -> Tensor:
    """``A / tau`` of Eq. (1), ``(N, P, P)`` (small inputs; the loss builds them chunk by chunk)."""
    u = _positions(features, max_positions)
    return u @ u.transpose(1, 2) / tau


def _chunk_divergence(q_t: Tensor, k_t: Tensor, q_s: Tensor, k_s: Tensor, tau: float, spec: TopKLDSpec) -> Tensor:
    # float32 here, inside the checkpointed chunk: half-precision features are kept as they are, not as copies
    logits_t = q_t.float() @ k_t.float().transpose(-1, -2) / tau
    return topk_kl(logits_t, q_s.float() @ k_s.float().transpose(-1, -2) / tau, spec).sum(-1)


def row_divergence(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, tau: float = 1.0,
                   spec: TopKLDSpec = TopKLDSpec(), chunk: int = 256) -> Tensor:
    """The mean over rows ``i`` of ``D(softmax(q_t k_t^T / tau)[i] || softmax(q_s k_s^T / tau)[i])`` for queries
    ``(..., R, d)`` and keys ``(..., P, d)``, returning ``(...)``: the logits are built in float32 ``chunk`` rows
    at a time, each chunk recomputed in backward when the student needs gradients, so that memory stays
    ``O(chunk P)``."""
    if q_s.shape != q_t.shape or k_s.shape != k_t.shape:
        raise ValueError(f"student and teacher features differ in shape: {list(q_s.shape)}, {list(k_s.shape)} vs "
                         f"{list(q_t.shape)}, {list(k_t.shape)}")
    q_t, k_t = q_t.detach(), k_t.detach()
    total = q_s.new_zeros(q_s.shape[:-2])
    rows = q_s.shape[-2]
    grad = torch.is_grad_enabled() and (q_s.requires_grad or k_s.requires_grad)
    for start in range(0, rows, chunk):
        part = slice(start, start + chunk)
        args = (q_t[..., part, :], k_t, q_s[..., part, :], k_s, tau, spec)
        total = total + (checkpoint(_chunk_divergence, *args, use_reentrant=False) if grad
                         else _chunk_divergence(*args))
    return total / rows


def relation_divergence(student: Tensor, teacher: Tensor, tau: float = 1.0, spec: TopKLDSpec = TopKLDSpec(),
                        max_positions: int | None = None, chunk: int = 256) -> Tensor:
    """Eq. (1) per sample, ``(N,)``: the mean over query positions of ``D(R_T[i] || R_S[i])``
    (:func:`row_divergence` with the unit vectors as both queries and keys)."""
    u_s, u_t = _positions(student, max_positions), _positions(teacher.detach(), max_positions)
    return row_divergence(u_s, u_s, u_t, u_t, tau, spec, chunk)


@dataclass
class DivergenceConfig(FeatureMSEConfig):
    """The settings shared by the terms that compare softmax distributions row by row (``relation``,
    ``attention_kl``).

    Args:
        tau: temperature of the logits.
        chunk: rows per chunk of the logits.
        topk: 0 for the plain KL ``KL(p_T || p_S)``; ``K > 0`` for TopKLD (Eq. 2) on each row.
        alpha / explicit / implicit / implicit_scope: TopKLD's settings (``topk > 0``).
    """

    tau: float = 1.0
    chunk: int = 256
    topk: int = 0
    alpha: float = 0.5
    explicit: str = "reverse"
    implicit: str = "forward"
    implicit_scope: str = "full"

    def spec(self) -> TopKLDSpec:
        return TopKLDSpec(self.topk, self.alpha, self.explicit, self.implicit, self.implicit_scope)

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        if self.tau <= 0:
            out.append(("tau", f"must be > 0, got {self.tau}"))
        if self.chunk < 1:
            out.append(("chunk", f"must be >= 1, got {self.chunk}"))
        if self.topk < 0:
            out.append(("topk", f"must be >= 0, got {self.topk}"))
        if not 0.0 <= self.alpha <= 1.0:
            out.append(("alpha", f"must be in [0, 1], got {self.alpha}"))
        out += one_of("explicit", self.explicit, DIRECTIONS) + one_of("implicit", self.implicit, DIRECTIONS)
        return out + one_of("implicit_scope", self.implicit_scope, IMPLICIT_SCOPES)


@dataclass
class RelationConfig(DivergenceConfig):
    """Config of :class:`Relation` (``losses.relation``); the divergence settings are :class:`DivergenceConfig`'s.

    Args:
        taps: module-name patterns of the compared features (MPQ-DM: the output before the last projection, e.g.
            ``conv_norm_out`` of a diffusers UNet or ``norm_out`` of a transformer).
        tau: relation temperature (MPQ-DM: 1).
        max_positions: average-pool maps with more positions to about this many (None: never).
        smoothing_steps: ``N``, trajectory steps averaged in the teacher's features (Eq. 3): 1 (none) or 2 (the
            sample's previous step too, MPQ-DM's N = 2).
    """

    name: ClassVar[str] = "relation"
    taps: list[str] = field(default_factory=lambda: ["conv_norm_out"])
    max_positions: int | None = 1024
    smoothing_steps: int = 1

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        if self.max_positions is not None and self.max_positions < 1:
            out.append(("max_positions", f"must be >= 1 or null, got {self.max_positions}"))
        if self.smoothing_steps not in (1, 2):
            out.append(("smoothing_steps", f"must be 1 or 2 (the current and the previous trajectory step), got "
                                           f"{self.smoothing_steps}"))
        return out


@register_loss(RelationConfig)
class Relation(FeatureTerm):
    """Eq. (1) averaged over the tapped modules, one value per row of the batch (see the module docstring)."""

    config: RelationConfig

    def previous_taps(self) -> list[str]:
        return self.taps() if self.config.smoothing_steps > 1 else []

    def target(self, inputs: LossInputs, name: str) -> Tensor:
        """The teacher's features of ``name``, averaged with those of the previous step of the same trajectory
        (Eq. 3) where the config asks for it and the sample has one."""
        current = inputs.teacher_features[name]
        if self.config.smoothing_steps == 1:
            return current
        previous, valid = inputs.previous_teacher_features.get(name), inputs.previous_valid
        if previous is None or valid is None:
            raise ValueError(f"{self.name}: smoothing_steps=2 needs the teacher's features of {name!r} on the "
                             "previous trajectory step (LossInputs.previous_teacher_features)")
        rows = valid.repeat(current.shape[0] // valid.shape[0])  # [uncond; cond] rows share a sample's mask
        mask = rows.reshape(-1, *([1] * (current.dim() - 1)))
        return torch.where(mask, (current.float() + previous.float()) / 2, current.float())

    def forward(self, inputs: LossInputs) -> Tensor:
        c = self.config
        spec = c.spec()
        names = self.tapped_names(inputs)
        values = [relation_divergence(inputs.student_features[n], self.target(inputs, n), c.tau, spec,
                                      c.max_positions, c.chunk) for n in names]
        return torch.stack(values).mean(0)
