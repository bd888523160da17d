"""Attention-map distillation: the KL or TopKLD between the teacher's and the student's attention probabilities.

For a tapped attention module with ``H`` heads, queries ``Q (N, L_q, H d)`` and keys ``K (N, L_k, H d)`` (the outputs
of its query and key projections, split into heads ``Q_h, K_h (N, L, d)``)::

    P_h = softmax(Q_h K_h^T / (sqrt(d) tau), dim=-1)                  (N, L_q, L_k): one distribution over keys
    L_attn = (1 / (H |I|)) sum_h sum_{i in I} D(P_h^T[i] || P_h^S[i])                                         (1)

with ``D`` the plain KL (``topk = 0``) or TopKLD (:func:`qat.losses.relation.topk_kl`, Eq. 2 there: the teacher's
top-``K`` keys of each row and the rest, each with its direction), averaged over the tapped modules, one value per
row of the batch. ``I`` is every query row, or ``max_queries`` rows evenly spaced over the sequence when it is longer
(the distributions keep every key). The maps are built ``chunk`` rows at a time under activation checkpointing.

TopKLD ("Dissecting bit-level scaling laws in quantizing vision generative models", Ding et al., arXiv:2501.06218)
distils token logits of autoregressive models; applying it to the attention probabilities of a diffusion model is
DiffQAT's reading, not the paper's. The logits are recomputed from the tapped projections (the attention itself runs
fused in ``scaled_dot_product_attention``, which returns no probabilities): they are the model's own attention
logits for attention without query/key normalisation or rotary embeddings (the UNets, DiT, PixArt). For models that
normalise queries and keys (Wan, CogVideoX), tap the norms instead (``query: norm_q``, ``key: norm_k``); rotary
embeddings, applied inside the attention processor, are not reproduced, so those maps are the content part of the
logits. A student that quantizes the attention's inputs is compared before that quantization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from qat.checks import ConfigProblems
from qat.losses.base import LossInputs, register_loss
from qat.losses.feature import FeatureTerm
from qat.losses.relation import DivergenceConfig, TopKLDSpec, row_divergence
from qat.prepare import match

__all__ = ["attention_logits", "attention_divergence", "AttentionKLConfig", "AttentionKL"]


def _heads(x: Tensor, heads: int) -> Tensor:
    """``(N, L, H d)`` projections -> ``(N, H, L, d)`` (a view, in the projection's dtype)."""
    if x.dim() != 3 or x.shape[-1] % heads:
        raise ValueError(f"attention projections must be (N, L, heads * head_dim) with {heads} heads, got shape "
                         f"{list(x.shape)}")
    n, length, width = x.shape
    return x.reshape(n, length, heads, width // heads).transpose(1, 2)


def _query_rows(length: int, max_queries: int | None) -> Tensor | None:
    """Indices of ``max_queries`` rows evenly spaced over ``length`` (None: every row)."""
    if max_queries is None or length <= max_queries:
        return None
    return torch.linspace(0, length - 1, max_queries).round().long()


def attention_logits(query: Tensor, key: Tensor, heads: int, tau: float = 1.0) -> Tensor:
    """``Q_h K_h^T / (sqrt(d) tau)`` of Eq. (1), ``(N, H, L_q, L_k)`` (small inputs; the loss builds it in chunks)."""
    q, k = _heads(query, heads).float(), _heads(key, heads).float()
    return q @ k.transpose(-1, -2) / (math.sqrt(q.shape[-1]) * tau)


def attention_divergence(query_s: Tensor, key_s: Tensor, query_t: Tensor, key_t: Tensor, heads: int,
                         tau: float = 1.0, spec: TopKLDSpec | None = None, max_queries: int | None = None,
                         chunk: int = 256) -> Tensor:
    """Eq. (1) for one attention module, ``(N,)``: the mean over heads and query rows of the row divergences
    (``spec`` None: the plain KL)."""
    q_s, k_s, q_t, k_t = (_heads(x, heads) for x in (query_s, key_s, query_t.detach(), key_t.detach()))
    rows = _query_rows(q_s.shape[2], max_queries)
    if rows is not None:
        rows = rows.to(q_s.device)
        q_s, q_t = q_s[:, :, rows], q_t[:, :, rows]
    scaled_tau = tau * math.sqrt(q_s.shape[-1])  # the attention's own 1 / sqrt(d), folded into the temperature
    return row_divergence(q_s, k_s, q_t, k_t, scaled_tau, spec or TopKLDSpec(), chunk).mean(1)


@dataclass
class AttentionKLConfig(DivergenceConfig):
    """Config of :class:`AttentionKL` (``losses.attention_kl``); the divergence settings are
    :class:`qat.losses.relation.DivergenceConfig`'s (``topk > 0``: TopKLD).

    Args:
        taps: module-name patterns of attention modules (e.g. ``["*.attn1"]``: the self-attentions of a diffusers
            UNet or transformer; a cross-attention over one token has a trivial map).
        query / key: the names of the modules inside each tapped attention whose outputs are the queries and keys
            (``to_q`` / ``to_k``; ``norm_q`` / ``norm_k`` for attention that normalises them).
        heads: the number of heads; None reads each attention module's ``heads`` attribute (diffusers).
        max_queries: query rows compared per head, evenly spaced (None: every row).
    """

    name: ClassVar[str] = "attention_kl"
    taps: list[str] = field(default_factory=list)
    query: str = "to_q"
    key: str = "to_k"
    heads: int | None = None
    max_queries: int | None = 1024

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        if self.heads is not None and self.heads < 1:
            out.append(("heads", f"must be >= 1 or null, got {self.heads}"))
        if self.max_queries is not None and self.max_queries < 1:
            out.append(("max_queries", f"must be >= 1 or null, got {self.max_queries}"))
        for key in ("query", "key"):
            if not getattr(self, key):
                out.append((key, "must name the projection module inside each tapped attention (e.g. to_q)"))
        return out


@register_loss(AttentionKLConfig)
class AttentionKL(FeatureTerm):
    """Eq. (1) averaged over the tapped attention modules, one value per row of the batch."""

    config: AttentionKLConfig

    def __init__(self, config: AttentionKLConfig) -> None:
        super().__init__(config)
        self._head_counts: dict[str, int] = {}

    def taps(self) -> list[str]:
        c = self.config
        return [f"{p}.{c.query}" for p in c.taps] + [f"{p}.{c.key}" for p in c.taps]

    def _attention_names(self, inputs: LossInputs) -> list[str]:
        """The tapped attention modules whose query and key projections both ran in this step."""
        c = self.config
        suffix = f".{c.query}"
        out = sorted(n[:-len(suffix)] for n in inputs.teacher_features
                     if n.endswith(suffix) and any(match(n[:-len(suffix)], p) for p in c.taps))
        needed = [f"{m}.{name}" for m in out for name in (c.query, c.key)]
        missing = [n for n in needed if n not in inputs.student_features or n not in inputs.teacher_features]
        if not out or missing:
            raise ValueError(f"{self.name}: taps {c.taps} gave no attention module whose "
                             f"{c.query!r} and {c.key!r} outputs both models produced (missing: "
                             f"{missing[:3]}); are they attention modules with these projections?")
        return out

    def _heads_of(self, student: nn.Module | None, module: str) -> int:
        if self.config.heads is not None:
            return self.config.heads
        if module not in self._head_counts:
            heads = getattr(student.get_submodule(module), "heads", None) if student is not None else None
            if not isinstance(heads, int):
                raise ConfigProblems([("heads", f"module {module!r} has no integer 'heads' attribute: set the "
                                                "number of heads")])
            self._head_counts[module] = heads
        return self._head_counts[module]

    def forward(self, inputs: LossInputs) -> Tensor:
        c = self.config
        spec = c.spec()
        values = []
        for m in self._attention_names(inputs):
            q, k = f"{m}.{c.query}", f"{m}.{c.key}"
            values.append(attention_divergence(inputs.student_features[q], inputs.student_features[k],
                                               inputs.teacher_features[q], inputs.teacher_features[k],
                                               self._heads_of(inputs.student, m), c.tau, spec, c.max_queries,
                                               c.chunk))
        return torch.stack(values).mean(0)

