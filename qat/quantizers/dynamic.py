"""Per-token dynamic activation quantization with learnable clipping per timestep group (QVGen's activations).

For each token ``x_j`` (the vector of channels at one position: a row of a linear layer's ``(..., C)`` input, a
pixel of a conv's ``(B, C, H, W)`` input) and the group ``g(t)`` of the sample's timestep ``t``::

    hi_j = sigmoid(u_g) * max(max_c x_jc, 0),    lo_j = sigmoid(l_g) * min(min_c x_jc, 0)                      (1)
    s_j = (hi_j - lo_j) / (2^b - 1),             z_j = -lo_j / s_j
    Q(x_jc) = s_j (clip(round(x_jc / s_j) + round(z_j), 0, 2^b - 1) - round(z_j))
    g(t) = min(floor(t G / T), G - 1)                                                                          (2)

with ``G`` groups (``clip_groups``) of the training timestep range ``[0, T)`` (``num_train_timesteps``), one pair of
clipping logits ``(l_g, u_g)`` per group (a ``(G, 2)`` parameter), initialised so that both ratios start at
``clip_init``. ``round`` takes the straight-through gradient; the step receives LSQ's gradient
(:func:`qat.ste.fake_quantize_ste`) and passes it on to the logits and, through the per-token extremes, to ``x``.

Paper: Y. Huang, R. Gong, J. Liu, Y. Ding, C. Lv, H. Qin, J. Zhang, "QVGen: Pushing the Limit of Quantized Video
Generative Models", ICLR 2026, arXiv:2505.11497 (the code's ``LearnableClippedDynamicQuantizer``; the learnable clip
is OmniQuant's LWC applied to activations). Deviations: the range always contains 0 (so the zero-point is an
integer of the code range, deployable as is); the group is Eq. (2) of the timestep value in training and sampling
alike (the code used ``t mod G`` in training and a per-call countdown in sampling, which disagree).

Nothing is data-dependent: the quantizer is ready when built (``initialized`` is set by ``__init__``). It is
:class:`qat.timestep.TimestepAware`: set the timestep before each call (``qat.timestep``); with one group none is
needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from qat.quantizers.base import Quantizer, QuantizerConfig, register_quantizer
from qat.ste import fake_quantize_ste
from qat.timestep import TimestepCall

__all__ = ["DynamicTokenConfig", "DynamicTokenQuantizer", "timestep_group"]


@dataclass
class DynamicTokenConfig(QuantizerConfig):
    """Config of :class:`DynamicTokenQuantizer`.

    Args:
        n_bits: code bits (2..8), unsigned codes ``[0, 2^b - 1]`` with a per-token zero-point.
        clip_groups: ``G``, timestep groups with their own clipping ratios (QVGen: 50).
        clip_init: initial clipping ratio of every group, in (0, 1) (QVGen: 0.95).
        num_train_timesteps: ``T`` of Eq. (2), the training range of timestep values (1000 for DDPM, DDIM and the
            flow-matching transformers of diffusers).
    """

    name: ClassVar[str] = "dynamic_token"
    bits_range: ClassVar[tuple[int, int]] = (2, 8)
    n_bits: int = 4
    clip_groups: int = 50
    clip_init: float = 0.95
    num_train_timesteps: int = 1000

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        if self.clip_groups < 1:
            out.append(("clip_groups", f"must be >= 1, got {self.clip_groups}"))
        if not 0.0 < self.clip_init < 1.0:
            out.append(("clip_init", f"must be in (0, 1) (a sigmoid value), got {self.clip_init}"))
        if self.num_train_timesteps < 1:
            out.append(("num_train_timesteps", f"must be >= 1, got {self.num_train_timesteps}"))
        return out


def timestep_group(t: Tensor, groups: int, num_train_timesteps: int) -> Tensor:
    """Eq. (2): the group index (long, shape of ``t``) of timestep values ``t``; values outside ``[0, T)`` are
    clamped to the first or last group."""
    g = torch.floor(t.float() * groups / num_train_timesteps).long()
    return g.clamp(0, groups - 1)


@register_quantizer(DynamicTokenConfig)
class DynamicTokenQuantizer(Quantizer):
    """Eq. (1) on activations whose channels lie along ``channel_axis`` (1 for conv inputs, -1 for linear inputs).

    ``clip_logits`` has shape ``(G, 2)``: column 0 the lower (``l_g``), column 1 the upper (``u_g``) logit. A
    per-sample timestep ``(B,)`` selects one group per sample (the input's first dimension is the batch).

    Args:
        config: the config.
        num_channels: unused (the parameters do not depend on the width).
        channel_axis: the axis of the channels.
        group_count: unused.
    """

    config: DynamicTokenConfig

    def __init__(self, config: DynamicTokenConfig, num_channels: int | None = None, channel_axis: int = -1,
                 group_count: int | None = None) -> None:
        super().__init__(config)
        self.channel_axis = channel_axis
        self.q_min, self.q_max = 0, 2**config.n_bits - 1
        logit = math.log(config.clip_init / (1.0 - config.clip_init))
        self.clip_logits = nn.Parameter(torch.full((config.clip_groups, 2), logit))
        self._group: Tensor | None = None
        self._group_reused: Tensor | None = None  # a reuse=True call writes its groups into this one (kept on clear)
        self.mark_initialized()  # nothing to learn from data: the ranges are per call, the ratios start at clip_init

    # -- TimestepAware -----------------------------------------------------------------------------------------------
    def set_timestep(self, t: Tensor, call: TimestepCall | None = None) -> None:
        """Selects the group of timestep values ``t`` (``()`` or ``(B,)``) for the next forwards.

        The group tensor is computed once per ``call`` for all quantizers with the same groups (``call.memo``); with
        ``call.reuse`` it is written into the tensor of the previous call, so that a model compiled with CUDA graphs,
        which reads module tensors from fixed addresses, replays its graphs instead of recording them again.
        """
        c = self.config
        key = ("dynamic_token_group", c.clip_groups, c.num_train_timesteps)
        memo = call.memo if call is not None else {}
        if key not in memo:
            group = timestep_group(torch.as_tensor(t).to(self.clip_logits.device), c.clip_groups,
                                   c.num_train_timesteps)
            memo[key] = self._in_place(group) if call is not None and call.reuse else group
        self._group = memo[key]

    def _in_place(self, group: Tensor) -> Tensor:
        """``group`` copied into the tensor this quantizer held last time (the first of its groups in a call)."""
        old = self._group_reused
        if old is not None and old.shape == group.shape and old.dtype == group.dtype and old.device == group.device:
            return old.copy_(group)
        self._group_reused = group
        return group

    def clear_timestep(self) -> None:
        self._group = None

    # -- forward -----------------------------------------------------------------------------------------------------
    def ratios(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(sigmoid(l_g), sigmoid(u_g))`` for input ``x``, shaped to broadcast against its per-token extremes."""
        if self._group is None:
            if self.config.clip_groups > 1:
                raise RuntimeError(f"{type(self).__name__} has {self.config.clip_groups} timestep groups but no "
                                   "timestep is set: wrap the model call in qat.timestep(model, t)")
            group = torch.zeros((), dtype=torch.long, device=self.clip_logits.device)
        else:
            group = self._group
        ratio = torch.sigmoid(self.clip_logits[group].float())  # (2,) or (B, 2)
        shape = [1] * x.dim()
        if ratio.dim() == 2:
            b = ratio.shape[0]
            if x.shape[0] != b:  # a layer that folds frames or heads into the batch, sample-major: (B k, ...)
                if x.shape[0] % b:
                    raise ValueError(f"{b} timesteps set for an input of batch {x.shape[0]}")
                ratio = ratio.repeat_interleave(x.shape[0] // b, dim=0)
            shape[0] = x.shape[0]
        return ratio[..., 0].reshape(shape), ratio[..., 1].reshape(shape)

    def step_zero(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token ``(s_j, z_j)`` of Eq. (1) (unrounded zero-point), shaped like ``x`` with the channel axis 1."""
        lo_ratio, hi_ratio = self.ratios(x)
        xf = x.float()
        hi = xf.amax(dim=self.channel_axis, keepdim=True).clamp_min(0) * hi_ratio
        lo = xf.amin(dim=self.channel_axis, keepdim=True).clamp_max(0) * lo_ratio
        step = ((hi - lo) / (self.q_max - self.q_min)).clamp_min(1e-8)
        return step, self.q_min - lo / step

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantizes ``x`` (any shape with ``channel_axis``); returns ``x.dtype``; identity when disabled."""
        if not self.enabled:
            return x
        self.check_ready()
        step, zero = self.step_zero(x)
        return fake_quantize_ste(x, step, zero, self.q_min, self.q_max)

    def initialize_(self, x: Tensor) -> None:
        """Nothing depends on data; marks the quantizer ready (kept for the calibration contract)."""
        self.mark_initialized()

    def extra_repr(self) -> str:
        c = self.config
        return (f"n_bits={c.n_bits}, per-token asym, clip_groups={c.clip_groups}, channel_axis={self.channel_axis}, "
                f"enabled={self.enabled}")
