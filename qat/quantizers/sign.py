"""Sign activation quantizer: 1-bit activations ``sign(x + tau)`` with a learnable per-channel threshold.

    Q(x) = sign(x + tau),    sign(0) = +1,    values in {-1, +1}                                              (1)

``tau`` (``threshold``) is ReActNet's RSign shift (Liu et al., ECCV 2020, arXiv:2003.03488, Eq. 2), one per input
channel, initialised to 0, as BiDM's activation binarizer (Zheng et al., "BiDM: Pushing the Limit of Quantization
for Diffusion Models", NeurIPS 2024, arXiv:2412.05926, Sec. 3.2; dossier Sec. 2.2). Gradient: Bi-Real Net's
ApproxSign (:func:`qat.ste.approx_sign_ste`, BiDM's choice) or the clipped straight-through estimator
(:func:`qat.ste.sign_ste`, XNOR-Net / BNN); ``threshold=False`` gives plain ``sign(x)`` (the XNOR baseline).

The magnitude the sign discards is restored by the layer, not here: BiDM's convolutions multiply their output by a
scaling map computed from the raw input (:class:`qat.nn.binary.XnorConv2d`).

Nothing is data-dependent: the quantizer is ready when built (``initialized`` is set by ``__init__``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from qat.checks import one_of
from qat.quantizers.base import Quantizer, QuantizerConfig, register_quantizer
from qat.ste import approx_sign_ste, sign_ste

__all__ = ["SignActConfig", "SignActQuantizer"]

GRADIENTS = ("approx_sign", "clipped")


@dataclass
class SignActConfig(QuantizerConfig):
    """Config of :class:`SignActQuantizer`.

    Args:
        n_bits: always 1.
        threshold: a learnable per-channel threshold ``tau`` (RSign); False: ``sign(x)``.
        gradient: ``approx_sign`` (Bi-Real's ``2 - 2|x|`` on ``|x| < 1``) or ``clipped`` (1 on ``|x| <= 1``).
    """

    name: ClassVar[str] = "sign_act"
    bits_range: ClassVar[tuple[int, int]] = (1, 1)
    n_bits: int = 1
    threshold: bool = True
    gradient: str = "approx_sign"

    def problems(self) -> list[tuple[str, str]]:
        return super().problems() + one_of("gradient", self.gradient, GRADIENTS)


@register_quantizer(SignActConfig)
class SignActQuantizer(Quantizer):
    """Eq. (1) on activations whose channels lie along ``channel_axis`` (1 for conv inputs ``(B, C, H, W)``,
    -1 for linear inputs ``(..., C)``); ``threshold`` has shape ``(C,)``.

    Args:
        config: the sign config.
        num_channels: the input channels ``C`` (needed with ``threshold``).
        channel_axis: the axis of the channels.
        group_count: unused.
    """

    config: SignActConfig

    def __init__(self, config: SignActConfig, num_channels: int | None = None, channel_axis: int = 1,
                 group_count: int | None = None) -> None:
        super().__init__(config)
        if config.threshold and num_channels is None:
            raise ValueError("a sign quantizer with a threshold needs num_channels")
        self.channel_axis = channel_axis
        if config.threshold:
            self.threshold = nn.Parameter(torch.zeros(num_channels))
        else:
            self.threshold = None
        self.mark_initialized()  # nothing to learn from data: tau starts at 0 (ReActNet, BiDM's code)

    def forward(self, x: Tensor) -> Tensor:
        """``sign(x + tau)`` in ``x.dtype`` (identity when disabled)."""
        if not self.enabled:
            return x
        if self.threshold is not None:
            shape = [1] * x.dim()
            shape[self.channel_axis] = self.threshold.shape[0]
            x = x + self.threshold.reshape(shape).to(x.dtype)
        return approx_sign_ste(x) if self.config.gradient == "approx_sign" else sign_ste(x)

    def initialize_(self, x: Tensor) -> None:
        """Nothing depends on data; marks the quantizer ready (kept for the calibration contract)."""
        self.mark_initialized()

    def extra_repr(self) -> str:
        return f"threshold={self.threshold is not None}, gradient={self.config.gradient}, enabled={self.enabled}"
