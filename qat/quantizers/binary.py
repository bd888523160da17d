"""Binary quantizer: 1-bit codes with learnable per-channel scales and one or more residual bases.

With ``K`` bases (``num_bases``) and scales ``s_k`` (one per channel, or one per tensor)::

    r_0 = x,    b_k = sign(r_k),    r_{k+1} = r_k - s_k b_k,    Q(x) = sum_{k<K} s_k b_k                    (1)

``K = 1`` is XNOR-Net's ``s sign(x)`` (Rastegari et al., ECCV 2016, arXiv:1603.05279), ``K = 2`` the multi-basis
binarizer of BinaryDM (Zheng et al., ICLR 2025, arXiv:2404.05662, Eq. 5: ``s_I sign(w) + s_II sign(w - s_I
sign(w))``). ``sign`` maps 0 to +1. Initialisation (:meth:`BinaryQuantizer.initialize_`) is the l1 mean of each
residual, ``s_k = mean |r_k|`` per channel, as XNOR-Net and BinaryDM's code.

Gradients: (1) runs as one autograd node, :func:`qat.ste.binarize_ste`: ``sign`` has the gradient of
:func:`qat.ste.sign_ste` (the clipped straight-through estimator, 1 where ``|r_k| <= 1``), and (1) is differentiated
as written, so ``dQ/ds_k = b_k - sum_{j>k} s_j [|r_j| <= 1] b_k``; for
``K = 2`` that is BinaryDM's Eq. 7-8: ``dQ/ds_I = sign(w) (1 - s_II [|r_1| <= 1])``, ``dQ/ds_II = sign(r_1)``.

Active bases: a schedule may switch the last bases off (BinaryDM's evolvable-basis binarizer trains two bases and
ends with one): :meth:`BinaryQuantizer.set_active_bases_` sets the ``active_bases`` buffer (saved in every state
dict, so a resumed or reloaded student keeps its count) and the sum in (1) stops after that many bases;
:meth:`BinaryQuantizer.collapse_` then drops the inactive scales for good (before export).

Storage (:meth:`BinaryQuantizer.pack_weight`): one bit per element and basis (``b_k = +1`` stored as 1), eight per
byte, plus the scales; the reloaded weight is ``sum_k s_k b_k``, exactly the forward value.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from qat.checks import at_least, one_of
from qat.packing import pack, packed_numel, unpack
from qat.quantizers.base import Quantizer, QuantizerConfig, register_quantizer
from qat.ste import binarize_ste

__all__ = ["BinaryConfig", "BinaryQuantizer"]


@dataclass
class BinaryConfig(QuantizerConfig):
    """Config of :class:`BinaryQuantizer`.

    Args:
        n_bits: always 1 (one bit per element and basis).
        num_bases: ``K`` in Eq. (1): 1 for ``s sign(x)``, 2 for BinaryDM's multi-basis binarizer.
        granularity: ``channel`` (one scale per slice along the channel axis, per basis) or ``tensor``.
        learn_scale: the scales are trained (``nn.Parameter``); otherwise buffers kept at their initial value.
    """

    name: ClassVar[str] = "binary"
    bits_range: ClassVar[tuple[int, int]] = (1, 1)
    n_bits: int = 1
    num_bases: int = 1
    granularity: str = "channel"
    learn_scale: bool = True

    def problems(self) -> list[tuple[str, str]]:
        return (super().problems() + at_least("num_bases", self.num_bases, 1)
                + one_of("granularity", self.granularity, ("channel", "tensor")))


@register_quantizer(BinaryConfig)
class BinaryQuantizer(Quantizer):
    """Eq. (1) with scales ``scale`` of shape ``(K, C)`` (``channel``) or ``(K,)`` (``tensor``).

    Args:
        config: the binary config.
        num_channels: size of ``channel_axis`` (``channel`` granularity).
        channel_axis: the axis of the channels (0 for weights).
        group_count: unused (no per-group binarization).
    """

    config: BinaryConfig

    def __init__(self, config: BinaryConfig, num_channels: int | None = None, channel_axis: int = 0,
                 group_count: int | None = None) -> None:
        super().__init__(config)
        if config.granularity == "channel" and num_channels is None:
            raise ValueError("binary quantizer with granularity 'channel' needs num_channels")
        self.channel_axis = channel_axis
        self.param_shape: tuple[int, ...] = (num_channels,) if config.granularity == "channel" else ()
        scale = torch.ones(config.num_bases, *self.param_shape)
        if config.learn_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("active_bases", torch.tensor(config.num_bases))
        self._active: int | None = config.num_bases  # the buffer's value, read once per load (no GPU sync per call)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._active = None

    @property
    def num_active(self) -> int:
        """How many bases the forward sums (``active_bases``; all ``num_bases`` unless a schedule switched some
        off)."""
        if self._active is None:
            self._active = int(self.active_bases)
        return self._active

    @torch.no_grad()
    def set_active_bases_(self, n: int) -> None:
        """Sums only the first ``n`` bases from now on (``1 <= n <= num_bases``); the other scales are kept."""
        if not 1 <= n <= self.config.num_bases:
            raise ValueError(f"active bases must be in [1, {self.config.num_bases}], got {n}")
        self.active_bases.fill_(n)
        self._active = n

    @torch.no_grad()
    def collapse_(self) -> None:
        """Drops the inactive bases: the config becomes ``num_bases = active_bases`` and ``scale`` keeps its first
        rows. The forward value is unchanged; export stores only the bases that remain."""
        n = self.num_active
        if n == self.config.num_bases:
            return
        self.config = dataclasses.replace(self.config, num_bases=n)
        scale = self.scale[:n].detach().clone()
        if isinstance(self.scale, nn.Parameter):
            self.scale = nn.Parameter(scale, requires_grad=self.scale.requires_grad)
        else:
            self.scale = scale

    def _view(self, s: Tensor, x: Tensor) -> Tensor:
        """One basis' scales viewed to broadcast against ``x``."""
        if not self.param_shape:
            return s
        shape = [1] * x.dim()
        shape[self.channel_axis] = self.param_shape[0]
        return s.reshape(shape)

    def _mean_abs(self, r: Tensor) -> Tensor:
        """``mean |r|`` per channel (``param_shape``)."""
        if not self.param_shape:
            return r.abs().mean()
        return r.abs().movedim(self.channel_axis, 0).reshape(self.param_shape[0], -1).mean(1)

    def forward(self, x: Tensor) -> Tensor:
        """``Q(x)`` of Eq. (1), computed in float32, returned in ``x.dtype``."""
        if not self.enabled:
            return x
        self.check_ready()
        scales = self.scale[:self.num_active]
        return binarize_ste(x, scales, self.channel_axis if self.param_shape else None)

    @torch.no_grad()
    def signs(self, x: Tensor) -> list[Tensor]:
        """The sign tensors ``b_k`` of ``x`` of the active bases (values -1 / +1, float32, shape of ``x``)."""
        r, out = x.float(), []
        for k in range(self.num_active):
            b = torch.where(r >= 0, 1.0, -1.0)
            out.append(b)
            r = r - self._view(self.scale[k].float(), r) * b
        return out

    @torch.no_grad()
    def initialize_(self, x: Tensor) -> None:
        """``s_k = mean |r_k|`` per channel, basis after basis (the l1 scale of XNOR-Net / BinaryDM)."""
        r = x.detach().float()
        for k in range(self.config.num_bases):
            s = self._mean_abs(r)
            self.scale[k].copy_(s)
            r = r - self._view(s, r) * torch.where(r >= 0, 1.0, -1.0)
        self.mark_initialized()

    # -- export ------------------------------------------------------------------------------------------------------
    def packed_names(self) -> list[str]:
        return ["packed" if k == 0 else f"packed_{k}" for k in range(self.config.num_bases)]

    @torch.no_grad()
    def pack_weight(self, weight: Tensor) -> dict[str, Tensor]:
        """One bitstream per basis: bit ``i`` is 1 where ``b_k = +1`` (row-major over the weight's shape)."""
        if self.num_active != self.config.num_bases:
            raise ValueError(f"active_bases: {self.num_active} of {self.config.num_bases} bases are active; call "
                             "collapse_() before export so that only the active bases are stored")
        return {name: pack((b > 0).to(torch.uint8), 1) for name, b in zip(self.packed_names(), self.signs(weight))}

    @torch.no_grad()
    def unpack_weight(self, packed: dict[str, Tensor], shape: torch.Size) -> Tensor:
        """``sum_k s_k b_k`` from the stored bits and scales, in the forward's float32 order."""
        numel = math.prod(shape)
        out = torch.zeros(shape)
        for k, name in enumerate(self.packed_names()):
            data = packed[name]
            if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != packed_numel(numel, 1):
                raise ValueError(f"{name}: must be 1-D uint8 with ceil({numel} / 8) = {packed_numel(numel, 1)} "
                                 f"bytes for a weight of shape {list(shape)}, got {data.dtype} {tuple(data.shape)}")
            try:
                b = unpack(data, 1, numel).reshape(shape).float() * 2.0 - 1.0
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            out = out + self._view(self.scale[k].float(), out) * b
        return out

    def extra_repr(self) -> str:
        c = self.config
        active = "" if self.num_active == c.num_bases else f" ({self.num_active} active)"
        return f"bases={c.num_bases}{active}, granularity={c.granularity}, enabled={self.enabled}"
