"""The uniform affine grid shared by the ``uniform``, ``lsq`` and ``temporal_lsq`` quantizers.

All quantizers in this package compute

    Q(x; s, z) = s * (clip(round(x / s) + z, q_min, q_max) - z)                                   (1)

with a step ``s > 0`` and an integer zero-point ``z`` (0 for symmetric schemes), ``round`` replaced by
:func:`qat.ste.round_ste` in the backward pass and ``clip`` by ``torch.clamp`` (gradient 1 inside the range, 0
outside). With this form the step receives the LSQ gradient of Esser et al. (arXiv:1902.08153, Eq. 3):

    dQ/ds = round(x/s) - x/s           if x/s + z lies in [q_min, q_max]
    dQ/ds = q_min - z  or  q_max - z   if clipped below or above

and a learned zero-point receives ``dQ/dz = -s`` where clipped and 0 elsewhere (the LSQ+ offset gradient of Bhalgat
et al., arXiv:2004.09576, expressed in integer units).

Granularity (the shape of ``s`` and ``z``):
    ``tensor``: one pair, shape ``()``.
    ``channel``: one pair per slice along ``channel_axis``, shape ``(C,)``.
    ``group``: weights only, ``channel_axis`` 0; every output channel is flattened and split into groups of
        ``group_size`` consecutive elements, shape ``(C, G)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from qat.checks import one_of
from qat.packing import from_unsigned, pack, packed_numel, qrange, to_unsigned, unpack
from qat.quantizers.base import Quantizer, QuantizerConfig
from qat.ste import fake_quantize_ste, round_ste

__all__ = ["AffineConfig", "AffineQuantizer", "qrange", "fake_quantize", "search_range"]

GRANULARITIES = ("tensor", "channel", "group")
INIT_METHODS = ("minmax", "mse")


@dataclass
class AffineConfig(QuantizerConfig):
    """Fields shared by every uniform affine quantizer config.

    Args:
        n_bits: bit-width, 2 to 8.
        signed: integer range ``[-2^(b-1), 2^(b-1) - 1]`` if True, else ``[0, 2^b - 1]``.
        symmetric: zero-point fixed at 0; otherwise an integer zero-point is kept (asymmetric).
        granularity: ``tensor``, ``channel`` or ``group`` (see the module docstring).
        group_size: elements per group; required for ``group``, forbidden otherwise.
        init: data-dependent initialisation: ``minmax`` (range includes 0) or ``mse`` (search over clipping ratios).
        mse_p: exponent of the ``|x - Q(x)|^p`` error minimised by ``mse`` (2.4 as in EfficientDM / LAPQ).
        mse_ratios: number of clipping ratios ``1, 0.99, ...`` tried by ``mse``.
    """

    bits_range: ClassVar[tuple[int, int]] = (2, 8)
    signed: bool = False
    symmetric: bool = False
    granularity: str = "tensor"
    group_size: int | None = None
    init: str = "minmax"
    mse_p: float = 2.4
    mse_ratios: int = 80

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems() + one_of("granularity", self.granularity, GRANULARITIES)
        if self.granularity == "group":
            if self.group_size is None or self.group_size < 1:
                out.append(("group_size", "granularity 'group' needs a positive group_size"))
        elif self.group_size is not None:
            out.append(("group_size", f"is only valid with granularity 'group', not {self.granularity!r}"))
        out += one_of("init", self.init, INIT_METHODS)
        if not 1 <= self.mse_ratios <= 100:
            out.append(("mse_ratios", f"must be in [1, 100], got {self.mse_ratios}"))
        return out


def fake_quantize(x: Tensor, step: Tensor, zero_point: Tensor, q_min: int, q_max: int) -> Tensor:
    """Eq. (1) with STE rounding. ``step`` and ``zero_point`` broadcast against ``x``; ``zero_point`` is rounded."""
    z = round_ste(zero_point)
    q = torch.clamp(round_ste(x / step) + z, q_min, q_max)
    return (q - z) * step


def _params_from_range(
    lo: Tensor, hi: Tensor, q_min: int, q_max: int, symmetric: bool, signed: bool
) -> tuple[Tensor, Tensor]:
    """Step and zero-point that map ``[lo, hi]`` (which contains 0) onto ``[q_min, q_max]``."""
    if symmetric:
        if signed:
            step = torch.maximum(-lo, hi) / q_max
        else:
            step = hi / q_max
        zero = torch.zeros_like(step)
    else:
        step = (hi - lo) / (q_max - q_min)
        step = step.clamp_min(1e-8)
        zero = (q_min - torch.round(lo / step)).clamp(q_min, q_max)
    return step.clamp_min(1e-8), zero


@torch.no_grad()
def search_range(
    x: Tensor, q_min: int, q_max: int, symmetric: bool, signed: bool, method: str, p: float = 2.4, n_ratios: int = 80
) -> tuple[Tensor, Tensor]:
    """Initial step and zero-point for each row of ``x``.

    ``minmax`` uses ``[min(x, 0), max(x, 0)]``. ``mse`` shrinks that range by ``1 - 0.01 i`` for
    ``i = 0 .. n_ratios - 1`` and keeps, per row, the ratio that minimises ``mean |x - Q(x)|^p``.

    Args:
        x: ``(R, N)``, one row per (step, zero-point) pair.

    Returns:
        ``(step, zero_point)``, each ``(R,)``, float32.
    """
    x = x.float()
    lo = x.min(dim=1).values.clamp_max(0)
    hi = x.max(dim=1).values.clamp_min(0)
    step, zero = _params_from_range(lo, hi, q_min, q_max, symmetric, signed)
    if method == "minmax":
        return step, zero
    best = torch.full_like(step, math.inf)
    for i in range(n_ratios):
        ratio = 1.0 - 0.01 * i
        s, z = _params_from_range(lo * ratio, hi * ratio, q_min, q_max, symmetric, signed)
        err = (fake_quantize(x, s[:, None], z[:, None], q_min, q_max) - x).abs().pow(p).mean(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        step = torch.where(better, s, step)
        zero = torch.where(better, z, zero)
    return step, zero


class AffineQuantizer(Quantizer):
    """Base class of the uniform affine fake quantizers (Eq. 1).

    Subclasses decide where ``step`` and ``zero_point`` live (buffers or parameters, static or per timestep) by
    implementing :meth:`_step_zero`, and how data initialises them in :meth:`_write_init`.

    Args:
        config: the quantizer config.
        num_channels: size of ``channel_axis``; required for ``channel`` and ``group`` granularity.
        channel_axis: the axis that carries the channels of the tensor this quantizer sees (0 for weights, 1 for
            conv activations ``(B, C, H, W)``, -1 for linear activations ``(..., C)``).
        group_count: number of groups per channel for ``group`` granularity.

    Raises:
        RuntimeError: in ``forward`` when enabled but not initialised; call :func:`qat.calibrate` (activations)
            or :func:`qat.initialize_weight_quantizers` first, before building the optimizer.
    """

    config: AffineConfig

    def __init__(
        self,
        config: AffineConfig,
        num_channels: int | None = None,
        channel_axis: int = 0,
        group_count: int | None = None,
    ) -> None:
        super().__init__(config)
        #: forward through :func:`qat.ste.fake_quantize_ste` (one autograd node, input-only saved state); False
        #: selects the composite ``round_ste`` form, the reference the fused path is tested against
        self.fused = True
        #: run the fused path's math as compiled kernels (``fake_quantize_ste(compiled=True)``)
        self.compiled_kernels = False
        self.q_min, self.q_max = qrange(config.n_bits, config.signed)
        self.channel_axis = channel_axis
        if config.granularity == "tensor":
            self.param_shape: tuple[int, ...] = ()
        elif num_channels is None:
            raise ValueError(f"granularity {config.granularity!r} needs num_channels")
        elif config.granularity == "channel":
            self.param_shape = (num_channels,)
        else:
            if channel_axis != 0 or group_count is None:
                raise ValueError("granularity 'group' needs channel_axis 0 and group_count (weights only)")
            self.param_shape = (num_channels, group_count)

    # -- subclass hooks ----------------------------------------------------------------------------------------------
    def _step_zero(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Current ``(step, zero_point)`` for input ``x``, shaped ``param_shape`` or ``(B, *param_shape)``."""
        raise NotImplementedError

    def _write_init(self, step: Tensor, zero_point: Tensor) -> None:
        """Stores initial values shaped ``param_shape``."""
        raise NotImplementedError

    # -- shape handling ----------------------------------------------------------------------------------------------
    def rows(self, x: Tensor) -> Tensor:
        """``x`` as ``(R, N)`` with one row per (step, zero-point) pair, R = prod(param_shape)."""
        if self.config.granularity == "tensor":
            return x.reshape(1, -1)
        c = self.param_shape[0]
        moved = x.movedim(self.channel_axis, 0).reshape(c, -1)
        if self.config.granularity == "group":
            return moved.reshape(c * self.param_shape[1], -1)
        return moved

    def _broadcast(self, p: Tensor, x: Tensor) -> Tensor:
        """Views ``p`` (``param_shape`` or ``(B, *param_shape)``) so that it broadcasts against ``x``."""
        batched = p.dim() > len(self.param_shape)
        shape = [1] * x.dim()
        if batched:
            shape[0] = p.shape[0]
        if self.config.granularity == "channel":
            shape[self.channel_axis] = self.param_shape[0]
        return p.reshape(shape)

    # -- public API --------------------------------------------------------------------------------------------------
    def broadcast_params(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` viewed for its parameters (``(C, G, n)`` for groups), with broadcast step and (unrounded) zero."""
        self.check_ready()
        step, zero = self._step_zero(x)
        if self.config.granularity == "group":
            c, g = self.param_shape
            return x.reshape(c, g, -1), step[..., None], zero[..., None]
        return x, self._broadcast(step, x), self._broadcast(zero, x)

    def grid_params(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Like :meth:`broadcast_params`, with the zero-point STE-rounded (the composite reference path)."""
        xv, step, zero = self.broadcast_params(x)
        return xv, step, round_ste(zero)

    def _codes(self, x: Tensor, delta: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``(codes, step, zero)`` in the parameter view of ``x``: ``clip(clip(round(x/s) + z) + round(delta/s))``."""
        xv, step, zero = self.grid_params(x.float())
        q = torch.clamp(round_ste(xv / step) + zero, self.q_min, self.q_max)
        if delta is not None:
            q = torch.clamp(q + round_ste(delta.float().reshape(xv.shape) / step), self.q_min, self.q_max)
        return q, step, zero

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantizes ``x`` (any shape; the computation runs in float32 and returns ``x.dtype``)."""
        if not self.enabled:
            return x
        if self.fused:
            xv, step, zero = self.broadcast_params(x)
            return fake_quantize_ste(xv, step, zero, self.q_min, self.q_max,
                                     compiled=self.compiled_kernels).reshape(x.shape)
        q, step, zero = self._codes(x, None)
        return ((q - zero) * step).reshape(x.shape).to(x.dtype)

    def integer_codes(self, x: Tensor, delta: Tensor | None = None) -> Tensor:
        """Integer codes ``clip(clip(round(x/s) + z) + round(delta/s))`` as a float tensor shaped like ``x``.

        ``delta`` (same shape as ``x``) is an update added in the integer domain, as QALoRA's merge does
        (EfficientDM Sec. 3.1: the LoRA product moves the stored integer weight by ``round(BA / s)``).
        Gradients flow through the STE.
        """
        return self._codes(x, delta)[0].reshape(x.shape)

    def dequantize(self, codes: Tensor) -> Tensor:
        """``s * (codes - z)``, the inverse of :meth:`integer_codes` on the grid."""
        cv, step, zero = self.grid_params(codes.float())
        return ((cv - zero) * step).reshape(codes.shape)

    def forward_with_delta(self, w: Tensor, delta: Tensor) -> Tensor:
        """QALoRA weight: ``s * (clip(W_int + round(delta / s)) - z)`` with ``W_int = clip(round(w / s) + z)``.

        With ``delta = 0`` this equals ``forward(w)``; when ``w`` is on the grid it equals ``forward(w + delta)``
        up to the rounding of ties. Returns ``w.dtype``.
        """
        if not self.enabled:
            return w + delta
        if self.fused:
            wv, step, zero = self.broadcast_params(w)
            out = fake_quantize_ste(wv, step, zero, self.q_min, self.q_max, delta.reshape(wv.shape),
                                    compiled=self.compiled_kernels)
            return out.reshape(w.shape)
        q, step, zero = self._codes(w, delta)  # one parameter lookup for codes and dequantisation
        return ((q - zero) * step).reshape(w.shape).to(w.dtype)

    @torch.no_grad()
    def _search(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Initial ``(step, zero_point)`` shaped ``param_shape`` from data ``x`` with the config's method."""
        return self._search_rows(self.rows(x.detach()))

    @torch.no_grad()
    def _search_rows(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Like :meth:`_search` for data already laid out as ``(prod(param_shape), N)`` rows."""
        c = self.config
        step, zero = search_range(rows, self.q_min, self.q_max, c.symmetric, c.signed, c.init, c.mse_p, c.mse_ratios)
        return step.reshape(self.param_shape), zero.reshape(self.param_shape)

    @torch.no_grad()
    def initialize_(self, x: Tensor) -> None:
        """Data-dependent initialisation from ``x`` with the config's ``init`` method; marks the quantizer ready."""
        self._write_init(*self._search(x))
        self.mark_initialized()

    @torch.no_grad()
    def initialize_from_rows_(self, rows: Tensor, index: int | None = None) -> None:
        """Initialisation from ``(prod(param_shape), N)`` rows (what :func:`qat.calibrate` collects).

        ``index`` selects one row of a per-timestep table; only :class:`TemporalLSQQuantizer` accepts it.
        """
        if index is not None:
            raise ValueError(f"{type(self).__name__} has no per-timestep table")
        self._write_init(*self._search_rows(rows))
        self.mark_initialized()

    # -- export ------------------------------------------------------------------------------------------------------
    def packed_names(self) -> list[str]:
        return ["packed"]

    @torch.no_grad()
    def pack_weight(self, weight: Tensor) -> dict[str, Tensor]:
        """``{"packed": uint8}``: the codes ``q = clip(round(W / s) + z)`` stored as ``u = q - q_min`` at ``n_bits``
        bits each (:mod:`qat.packing`), row-major over the weight's shape."""
        codes = self.integer_codes(weight.detach())  # float tensor of exact integers, shape of W
        return {"packed": pack(to_unsigned(codes, self.config.n_bits, self.config.signed), self.config.n_bits)}

    @torch.no_grad()
    def unpack_weight(self, packed: dict[str, Tensor], shape: torch.Size) -> Tensor:
        """``W = s (q - z)`` (Eq. 1) through :meth:`dequantize`: the float ops of the fake-quant forward.

        Raises:
            ValueError: ``"<packed name or state key>: why"`` for codes of the wrong size or padding, or a loaded
                step / zero-point that no export writes.
        """
        data, bits, numel = packed["packed"], self.config.n_bits, math.prod(shape)
        expected = packed_numel(numel, bits)
        if data.numel() != expected:  # (the dtype and the padding are checked by qat.packing.unpack)
            raise ValueError(f"packed: has {data.numel()} bytes but n_bits={bits} for a weight of shape "
                             f"{list(shape)} needs ceil({numel} * {bits} / 8) = {expected} bytes")
        step, zero = self.state_dict().get("step"), self.state_dict().get("zero_point")
        if step is not None and not bool((torch.isfinite(step) & (step > 0)).all()):
            raise ValueError("step: has non-positive or non-finite values")
        if zero is not None and not bool((torch.isfinite(zero) & (zero == torch.round(zero))).all()):
            raise ValueError("zero_point: must hold integers (exports store the rounded zero-point)")
        try:
            u = unpack(data, bits, numel)
        except ValueError as err:
            raise ValueError(f"packed: {err}") from None
        codes = from_unsigned(u, bits, self.config.signed).to(torch.float32).reshape(shape)
        return self.dequantize(codes)

    def export_state(self) -> dict[str, Tensor]:
        """The step and the zero-point rounded: the value the forward pass uses (integer zero-points on disk)."""
        state = super().export_state()
        if "zero_point" in state:
            state["zero_point"] = torch.round(state["zero_point"])
        return state

    def extra_repr(self) -> str:
        c = self.config
        kind = "sym" if c.symmetric else "asym"
        sign = "signed" if c.signed else "unsigned"
        return f"n_bits={c.n_bits}, {kind}, {sign}, granularity={c.granularity}, enabled={self.enabled}"
