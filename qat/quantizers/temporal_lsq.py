"""Temporal LSQ (EfficientDM's TALSQ): one learned (step, zero-point) pair per denoising timestep.

He et al., "EfficientDM: Efficient Quantization-Aware Fine-Tuning of Low-Bit Diffusion Models", ICLR 2024,
arXiv:2310.03270, Eq. 9: ``S_x = {s_x^0, ..., s_x^{T-1}}``, one activation scale per fine-tuning step.

Deviations from the reference code (ThisisBillhe/EfficientDM@293e212, ``TemporalActivationQuantizer``):
    * The timestep is explicit: the caller sets it (an int index, a ``(B,)`` index tensor, or sampler timestep
      values mapped through the stored grid). The reference decrements a hidden per-layer counter on each forward,
      which breaks on any extra forward. Using the quantizer with no timestep set raises.
    * The table is one ``(T, *param_shape)`` parameter, not per-step Python lists, and the timestep grid it was
      trained on is a buffer, so a checkpoint carries everything needed to sample with another step count.
    * Sampling on a grid that does not nest in the training grid interpolates linearly in timestep between the two
      nearest entries (the paper says "interpolate"; the reference only subsamples ``[::5]``).
    * The learned zero-point is rounded (STE) in the forward pass, so the trained model has integer zero-points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from qat.quantizers.base import register_quantizer
from qat.quantizers.lsq import LSQConfig, LSQQuantizer
from qat.timestep import TimestepCall

__all__ = ["TemporalLSQConfig", "TemporalLSQQuantizer", "grid_position", "interpolation_weights"]


@dataclass
class TemporalLSQConfig(LSQConfig):
    """Config of :class:`TemporalLSQQuantizer`.

    Args:
        num_timesteps: ``T``, rows of the table (EfficientDM: 100, the DDIM steps used for fine-tuning).
    """

    name: ClassVar[str] = "temporal_lsq"
    num_timesteps: int = 100

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        if self.num_timesteps < 1:
            out.append(("num_timesteps", f"must be >= 1, got {self.num_timesteps}"))
        if self.granularity == "group":
            out.append(("granularity", "temporal_lsq quantizes activations: granularity must be 'tensor' or "
                                       "'channel'"))
        return out


def grid_position(grid: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Locates timestep values ``t`` on an ascending ``grid``.

    Args:
        grid: ``(T,)`` ascending timestep values of the table rows.
        t: ``(B,)`` or ``()`` sampler timestep values.

    Returns:
        ``(lo, hi, w)`` with the shape of ``t``: the value at ``t`` is ``(1 - w) * table[lo] + w * table[hi]``.
        ``w`` is exactly 0 where ``t`` is on the grid, and ``t`` outside ``[grid[0], grid[-1]]`` is clamped to the
        nearest end.
    """
    grid = grid.float()
    t = t.to(grid.device).float()
    n = grid.numel()
    if n == 1:
        zero = torch.zeros_like(t, dtype=torch.long)
        return zero, zero, torch.zeros_like(t)
    tc = t.clamp(grid[0], grid[-1])
    hi = torch.searchsorted(grid, tc).clamp(1, n - 1)
    lo = hi - 1
    w = (tc - grid[lo]) / (grid[hi] - grid[lo])
    on_hi = w >= 1.0
    # Put exact grid points on ``lo`` with w == 0 so they index the table without arithmetic.
    lo = torch.where(on_hi, hi, lo)
    w = torch.where(on_hi, torch.zeros_like(w), w)
    return lo, hi, w


def interpolation_weights(position: tuple[Tensor, Tensor, Tensor], num_rows: int) -> Tensor:
    """The rows of :func:`grid_position` as weights over the table: ``(T,)`` for a scalar ``t``, ``(B, T)`` for
    ``(B,)``, with ``1 - w`` at ``lo`` and ``w`` at ``hi`` (exactly 1.0 at ``lo`` on grid points), so that the
    interpolated row is ``sum_j weights[..., j] * table[j]``.

    Why a weighted sum instead of ``table[lo]``: the backward of an indexing op is an accumulating ``index_put_``
    (a zero fill, a sort and a scatter per table and call, about 0.1 ms of host time each on a GPU host, two per
    temporal quantizer), while a product with fixed weights backpropagates as one multiply; the weights are
    computed once per model call and shared by every quantizer on the same grid.
    """
    lo, hi, w = position
    coef = torch.zeros(*lo.shape, num_rows, device=w.device, dtype=w.dtype)
    coef.scatter_add_(-1, lo.unsqueeze(-1), (1.0 - w).unsqueeze(-1))
    return coef.scatter_add_(-1, hi.unsqueeze(-1), w.unsqueeze(-1))


@register_quantizer(TemporalLSQConfig)
class TemporalLSQQuantizer(LSQQuantizer):
    """LSQ / LSQ+ whose step and zero-point are looked up per timestep.

    Parameters: ``step`` and ``zero_point`` of shape ``(T, *param_shape)``; buffer ``timesteps`` ``(T,)``, the
    ascending sampler timestep values that rows correspond to (default ``0 .. T-1``; :func:`qat.set_timestep_grid`
    writes the real grid, e.g. DDIM-100's ``1, 11, ..., 991``).

    Before each forward the caller sets the timestep with :meth:`set_timestep_index` (row index: an int, or a
    ``(B,)`` long tensor so that one batch mixes timesteps) or :meth:`set_timestep` (timestep values, mapped with
    :func:`grid_position`); :func:`qat.timestep` does it for a whole model. A per-sample index of length ``B``
    also serves inputs whose batch is ``k * B`` with samples folded batch-major (``repeat_interleave``).

    Optimisation note (a pinned decision, tested): rows not visited in a step get a zero gradient but still move
    under Adam's momentum, as in the reference code. Online training visits one row per step; cached training
    mixes timesteps so that most rows are visited in every batch.
    """

    def __init__(self, config: TemporalLSQConfig, num_channels: int | None = None, channel_axis: int = 0,
                 group_count: int | None = None) -> None:
        super().__init__(config, num_channels, channel_axis, group_count)
        shape = (config.num_timesteps, *self.param_shape)
        self.step = nn.Parameter(torch.ones(shape))
        if config.learn_offset:
            self.zero_point = nn.Parameter(torch.zeros(shape))
        else:
            self.register_buffer("zero_point", torch.zeros(shape))
        self.register_buffer("timesteps", torch.arange(config.num_timesteps, dtype=torch.float32))
        self._grid_key = tuple(float(i) for i in range(config.num_timesteps))
        self._lo: int | Tensor | None = None
        self._hi: Tensor | None = None
        self._w: Tensor | None = None
        self._coef: Tensor | None = None  # interpolation_weights of the timestep values set (None: an index)
        self._coef_reused: Tensor | None = None  # a reuse=True call writes into this one (kept on clear)

    # -- timestep selection ------------------------------------------------------------------------------------------
    def set_timestep_index(self, index: int | Tensor) -> None:
        """Selects table row(s): an int, or a ``(B,)`` long tensor (one row per sample)."""
        t_count = self.config.num_timesteps
        if isinstance(index, Tensor):
            if index.dtype.is_floating_point or index.dim() > 1:
                raise TypeError(f"timestep index must be an int or a 1-D integer tensor, got {index.dtype} "
                                f"{tuple(index.shape)}; use set_timestep for timestep values")
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= t_count):
                raise IndexError(f"timestep index out of range [0, {t_count})")
            index = index.to(self.step.device)
        elif not 0 <= int(index) < t_count:
            raise IndexError(f"timestep index {index} out of range [0, {t_count})")
        self._lo, self._hi, self._w, self._coef = index, None, None, None

    def set_timestep(self, t: float | Tensor, call: TimestepCall | None = None) -> None:
        """Selects rows by sampler timestep value(s) ``t`` (scalar or ``(B,)``), interpolating between rows
        (:class:`qat.timestep.TimestepAware`).

        Always the interpolating form ``(1 - w) table[lo] + w table[hi]``: on grid points ``w = 0`` makes it exactly
        ``table[lo]``, and no value is read back to the host, so a GPU never waits here and a compiled model sees
        the same graph for every timestep. The grid position and its :func:`interpolation_weights` are computed
        once per ``call`` for all quantizers on the same grid (``call.memo``); with ``call.reuse`` the weights are
        written into the tensor of this grid's previous call (fixed addresses for CUDA graphs).
        """
        call = TimestepCall(torch.as_tensor(t)) if call is None else call
        key = ("temporal_lsq", self._grid_key, self.timesteps.device)
        hit = call.memo.get(key)
        if hit is None:
            position = grid_position(self.timesteps, call.t)
            weights = interpolation_weights(position, self.config.num_timesteps)
            if call.reuse:
                weights = self._in_place(weights)
            hit = call.memo[key] = (position, weights)
        (self._lo, self._hi, self._w), self._coef = hit

    def _in_place(self, weights: Tensor) -> Tensor:
        """``weights`` copied into the tensor this quantizer held last time (the first of its grid in a call)."""
        old = self._coef_reused
        if (old is not None and old.shape == weights.shape and old.dtype == weights.dtype
                and old.device == weights.device):
            return old.copy_(weights)
        self._coef_reused = weights
        return weights

    def nearest_rows(self) -> int | Tensor:
        """The table row each sample of the current timestep is nearest to (an int, or ``(B,)``), for per-row
        statistics such as calibration.

        Raises:
            RuntimeError: no timestep is set.
        """
        if self._lo is None:
            raise RuntimeError("no timestep is set on the quantizer (use `with qat.timestep(model, t):`)")
        if self._w is None:
            return self._lo
        return torch.where(self._w > 0.5, self._hi, self._lo)

    @property
    def grid_key(self) -> tuple[float, ...]:
        """The timestep grid as a Python tuple (kept in sync with the buffer; compared without touching a GPU)."""
        return self._grid_key

    def clear_timestep(self) -> None:
        """Forgets the timestep; the next forward raises until one is set."""
        self._lo, self._hi, self._w, self._coef = None, None, None, None

    @torch.no_grad()
    def set_grid(self, timesteps: Tensor) -> None:
        """Stores the ``(T,)`` timestep values of the rows (sorted ascending)."""
        timesteps = torch.as_tensor(timesteps, dtype=torch.float32).flatten()
        if timesteps.numel() != self.config.num_timesteps:
            raise ValueError(f"grid has {timesteps.numel()} timesteps, the table has {self.config.num_timesteps}")
        self.timesteps.copy_(timesteps.sort().values)
        self._grid_key = tuple(self.timesteps.tolist())

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._grid_key = tuple(self.timesteps.tolist())  # once per load, not per forward

    # -- AffineQuantizer hooks ---------------------------------------------------------------------------------------
    def _rows_for(self, table: Tensor, x: Tensor) -> Tensor:
        if self._coef is None:
            rows = table[self._lo]
        else:
            # sum_j c_j table[j] over the T rows: (T, P) -> (P,) or (B, T, P) -> (B, P); exactly table[lo] on grid
            # points (weights 1 and 0). An elementwise product and a sum, not a matmul: TF32 would round the steps.
            coef, flat = self._coef.to(table.dtype), table.reshape(table.shape[0], -1)
            rows = (coef.unsqueeze(-1) * flat).sum(-2).reshape(tuple(coef.shape[:-1]) + tuple(self.param_shape))
        if rows.dim() > len(self.param_shape) and rows.shape[0] != x.shape[0]:
            b = rows.shape[0]
            if x.shape[0] % b:
                raise ValueError(f"per-sample timestep of length {b} does not fit an input batch of {x.shape[0]}")
            rows = rows.repeat_interleave(x.shape[0] // b, dim=0)
        return rows

    def _step_zero(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self._coef is None and self._lo is None:  # _coef first: a compiled region then reads no other tensor
            raise RuntimeError(
                "TemporalLSQQuantizer used with no timestep set: wrap the model call in "
                "`with qat.timestep(model, t):` (or call qat.set_timestep / set_timestep_index first)"
            )
        step = self._rows_for(self.step, x)
        zero = self._rows_for(self.zero_point, x)
        return self._scaled(step, x), zero

    @torch.no_grad()
    def _write_init(self, step: Tensor, zero_point: Tensor) -> None:
        self.step.copy_(step.expand_as(self.step))
        self.zero_point.copy_(zero_point.expand_as(self.zero_point))

    @torch.no_grad()
    def initialize_from_rows_(self, rows: Tensor, index: int | None = None) -> None:
        """Initialises every row (``index=None``) or only table row ``index`` from ``(R, N)`` data rows."""
        step, zero = self._search_rows(rows)
        if index is None:
            self._write_init(step, zero)
        else:
            self.step[index] = step
            self.zero_point[index] = zero
        self.mark_initialized()

    def export_state(self) -> dict[str, Tensor]:
        """The tables as trained: zero-points are interpolated between rows before rounding, so they stay unrounded."""
        return {k: v.detach() for k, v in self.state_dict().items() if k != "initialized"}
