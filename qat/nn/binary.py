"""Modules of fully binarized (W1A1) diffusion models: the XNOR convolution with a learnable scaling map, and the
cross-timestep feature connection. Both from BiDM (Zheng et al., "BiDM: Pushing the Limit of Quantization for
Diffusion Models", NeurIPS 2024, arXiv:2412.05926, Sec. 3.2, "timestep-friendly binary structure").

:class:`XnorConv2d` (paper Eq. 9-10, XNOR-Net's approximation with a learnable kernel ``k``)::

    y = (conv(sign(x + tau), alpha sign(W)) * K) + b + |s| S(x),       K = conv(A, k) + k_0,   A = mean_c |x|

``x`` is the raw input ``(B, C_in, H, W)``; the sign and ``alpha sign(W)`` are the layer's quantizers (a
:class:`~qat.quantizers.SignActQuantizer`, a :class:`~qat.quantizers.BinaryQuantizer`); ``A (B, 1, H, W)`` the
channel mean of ``|x|``, convolved with ``k (1, 1, kh, kw)`` at the layer's stride and padding into the scaling
map ``K (B, 1, H', W')`` that restores the magnitude the two signs discard. ``S`` is ReActNet's shortcut
(Liu et al., ECCV 2020) as in BiDM's code: the input itself, average-pooled or nearest-upsampled to the output
size, through a 1x1 projection when the channel counts differ; ``s`` is learnable.

:class:`CrossTimestepConnection` (paper Eq. 12): the output ``U_m`` of each connected block at the current model
call is blended with the same block's output at the previous call of the same sampling run (the previous, noisier
step), ``(1 - a) U_m^t + a U_m^{t_prev}``, with ``a = alpha[bucket(t), m]`` learnable per timestep bucket and
block. It hooks the blocks of the model it is attached to, keeps the previous call's outputs as its sampling state
(:class:`qat.sampling.SamplingStateful`, reset by every sampler) and reads the timestep explicitly
(:class:`qat.timestep.TimestepAware`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat.nn.exportable import register_exportable
from qat.nn.layers import QuantConv2d
from qat.timestep import TimestepCall

__all__ = ["XnorConv2d", "CrossTimestepConnection"]


@register_exportable("xnor_conv2d")
class XnorConv2d(QuantConv2d):
    """A :class:`QuantConv2d` with BiDM's scaling map and shortcut (see the module docstring).

    Parameters beyond the float conv's (state-dict keys ``weight`` and ``bias`` unchanged): ``kmap_weight
    (1, 1, kh, kw)`` initialised to ``1 / (kh kw)`` (the plain mean of XNOR-Net), ``kmap_bias (1,)`` initialised to
    0; ``shortcut_scale ()`` (``s``, initialised to ``shortcut_init``) and, when ``C_in != C_out``,
    ``shortcut_proj (C_out, C_in, 1, 1)`` initialised to zeros. No initial value is random.

    Built from a prepared layer with :meth:`from_quant`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kmap_weight: nn.Parameter | None = None
        self.kmap_bias: nn.Parameter | None = None
        self.shortcut_scale: nn.Parameter | None = None
        self.shortcut_proj: nn.Parameter | None = None

    @classmethod
    def from_quant(cls, layer: QuantConv2d, scaling: bool = True, shortcut: bool = True,
                   shortcut_init: float = 0.3) -> XnorConv2d:
        """The XNOR form of ``layer``, sharing its weight, bias and quantizers (no copy).

        Args:
            layer: a prepared conv (its quantizers are taken over).
            scaling: multiply by the learnable scaling map ``K``.
            shortcut: add ``|s| S(x)``.
            shortcut_init: the initial ``s``.
        """
        kwargs = cls._conv_kwargs(layer)
        new = cls(**kwargs)
        new.weight, new.bias = layer.weight, layer.bias
        new.weight_quantizer, new.act_quantizer = layer.weight_quantizer, layer.act_quantizer
        device = layer.weight.device
        if scaling:
            kh, kw = layer.kernel_size
            new.kmap_weight = nn.Parameter(torch.full((1, 1, kh, kw), 1.0 / (kh * kw), device=device))
            new.kmap_bias = nn.Parameter(torch.zeros(1, device=device))
        if shortcut:
            new.shortcut_scale = nn.Parameter(torch.tensor(float(shortcut_init), device=device))
            if layer.in_channels != layer.out_channels:
                new.shortcut_proj = nn.Parameter(torch.zeros(layer.out_channels, layer.in_channels, 1, 1,
                                                             device=device))
        return new.train(layer.training)

    def forward(self, x: Tensor, weight_delta: Tensor | None = None, quantized_weight: Tensor | None = None) -> Tensor:
        """``x (B, C_in, H, W) -> (B, C_out, H', W')``; ``weight_delta`` / ``quantized_weight`` as
        :meth:`QuantConv2d.forward`."""
        w = self.quantized_weight(weight_delta) if quantized_weight is None else quantized_weight
        y = self._conv_forward(self.quantize_input(x), w, None)
        if self.kmap_weight is not None:
            a = x.abs().mean(1, keepdim=True)
            y = y * F.conv2d(a, self.kmap_weight.to(a.dtype), self.kmap_bias.to(a.dtype), self.stride, self.padding,
                             self.dilation)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype).reshape(1, -1, 1, 1)
        if self.shortcut_scale is not None:
            y = y + self.shortcut_scale.abs().to(y.dtype) * self._shortcut(x, y.shape[-2:]).to(y.dtype)
        return y

    def _shortcut(self, x: Tensor, size: torch.Size) -> Tensor:
        s = x
        if s.shape[-2:] != size:
            s = (F.adaptive_avg_pool2d(s, size) if s.shape[-2] >= size[0] and s.shape[-1] >= size[1]
                 else F.interpolate(s, size=size, mode="nearest"))
        if self.shortcut_proj is not None:
            s = F.conv2d(s, self.shortcut_proj.to(s.dtype))
        return s

    def export_entry(self) -> dict[str, Any]:
        scale = self.shortcut_scale
        return {**super().export_entry(), "xnor": {"scaling": self.kmap_weight is not None,
                                                   "shortcut": scale is not None,
                                                   "shortcut_init": 0.0 if scale is None else float(scale.detach())}}

    @classmethod
    def install_exported(cls, root: nn.Module, name: str, entry: dict[str, Any]) -> nn.Module:
        xnor = entry.get("xnor")
        if not isinstance(xnor, dict) or not {"scaling", "shortcut"} <= set(xnor):
            raise ValueError(f"an xnor_conv2d entry needs 'xnor': {{'scaling': bool, 'shortcut': bool}}, got "
                             f"{xnor!r}")
        layer = QuantConv2d.install_exported(root, name, entry)
        new = cls.from_quant(layer, scaling=bool(xnor["scaling"]), shortcut=bool(xnor["shortcut"]),
                             shortcut_init=float(xnor.get("shortcut_init", 0.0)))
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, new)
        return new

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, scaling_map={self.kmap_weight is not None}, "
                f"shortcut={'proj' if self.shortcut_proj is not None else self.shortcut_scale is not None}")


def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"a connected block returned {type(output).__name__}; the cross-timestep connection needs a "
                    "tensor or a tuple starting with one")


def _replace_first(output: Any, value: Tensor) -> Any:
    return value if isinstance(output, Tensor) else type(output)([value, *output[1:]])


class _BlendHook:
    """Forward hook of connected block ``index`` (a small object, so that a deep copy of the model re-targets it
    at the copied connection)."""

    def __init__(self, connection: CrossTimestepConnection, index: int) -> None:
        self.connection = connection
        self.index = index

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        h = _first_tensor(output)
        blended = self.connection.blend(self.index, h)
        return None if blended is h else _replace_first(output, blended)


@register_exportable("cross_timestep")
class CrossTimestepConnection(nn.Module):
    """BiDM's cross-timestep feature connection (paper Eq. 12; see the module docstring).

    Per model call with timesteps ``t`` (``()`` or ``(B,)``, set through :func:`qat.timestep`), block ``m`` of
    ``units`` returning ``h (N, ...)``:

    * with no output of block ``m`` kept (the first call of a sampling run, or a single call): ``h`` unchanged;
    * otherwise ``(1 - a) h + a h_prev`` with ``a = alpha[bucket(t), m]`` per row (``bucket(t) =
      floor(t num_buckets / num_train_timesteps)``), zero on rows marked invalid (:meth:`set_valid_`);

    and the result (post-mix, as the paper's sampler) is kept for the next call. In inference (``no_grad``) a call
    must come at strictly lower timesteps than the previous one on the same rows: a solver that evaluates the model
    more than once at a timestep (Heun, PNDM's Runge-Kutta warm-up, separate CFG calls) stops with an error instead
    of blending two evaluations of one step. A lone call without a timestep neither blends nor keeps anything.

    Args:
        units: module names of the connected blocks (relative to the model :meth:`attach` receives).
        num_buckets: rows of the ``alpha`` table (the paper's code: 100).
        num_train_timesteps: the timestep range the buckets divide (1000 for DDPM / LDM teachers).
        init: the initial ``alpha`` (paper: 0.3).
    """

    def __init__(self, units: list[str], num_buckets: int = 100, num_train_timesteps: int = 1000,
                 init: float = 0.3) -> None:
        super().__init__()
        if not units:
            raise ValueError("a cross-timestep connection needs at least one block")
        self.units = list(units)
        self.num_buckets = num_buckets
        self.num_train_timesteps = num_train_timesteps
        self.alpha = nn.Parameter(torch.full((num_buckets, len(units)), float(init)))
        self._cache: dict[int, Tensor] = {}
        self._t: Tensor | None = None
        self._previous_t: Tensor | None = None
        self._valid: Tensor | None = None
        self._rows: Tensor | None = None  # alpha rows of the current call's batch, computed once per call

    def attach(self, model: nn.Module) -> CrossTimestepConnection:
        """Hooks the blocks of ``model`` named by ``units``; the blend hooks of any connection attached before are
        removed first (one connection per model)."""
        blocks = []
        for name in self.units:
            try:
                blocks.append(model.get_submodule(name))
            except AttributeError:
                raise ValueError(f"cross-timestep connection: {type(model).__name__} has no block {name!r}") from None
        for m in model.modules():
            for key in [k for k, h in m._forward_hooks.items() if isinstance(h, _BlendHook)]:
                del m._forward_hooks[key]
        for i, block in enumerate(blocks):
            block.register_forward_hook(_BlendHook(self, i))
        return self

    # -- timestep (qat.timestep.TimestepAware) and sampling state (qat.sampling.SamplingStateful) ----------------
    def set_timestep(self, t: Tensor, call: TimestepCall | None = None) -> None:
        t = torch.as_tensor(t).detach().float()
        # checked in inference (no_grad) only: the check reads the timesteps on the host, and the trainer builds each
        # step's pair from consecutive trajectory steps itself
        if self._cache and self._previous_t is not None and not torch.is_grad_enabled():
            prev = self._previous_t.to(t.device)
            if t.dim() and prev.dim() and t.numel() != prev.numel():
                raise RuntimeError(f"cross-timestep connection: {t.numel()} timesteps after {prev.numel()} in the "
                                   "previous call of the same sampling run; a run keeps its batch (reset the sampling "
                                   "state between runs: qat.reset_sampling_state(model))")
            later = t < prev
            if self._valid is not None and later.dim():
                later = later | ~self._valid.to(later.device)[: later.numel()]
            if not bool(later.all()):
                raise RuntimeError(
                    f"cross-timestep connection: a model call at t={t.flatten()[:4].tolist()} follows one at "
                    f"t={prev.flatten()[:4].tolist()} in the same sampling run; each call is blended with the "
                    "previous call as the previous sampling step, so the timesteps must fall call by call. Use a "
                    "sampler with one model evaluation per step (DDIM, DDPM, Euler) and one call for both CFG "
                    "branches, or call qat.reset_sampling_state(model) before an unrelated call")
        self._t, self._rows = t, None

    def clear_timestep(self) -> None:
        self._t, self._rows = None, None

    def reset_sampling_state(self) -> None:
        self._cache, self._previous_t, self._valid = {}, None, None

    def set_valid_(self, valid: Tensor | None) -> None:
        """Rows ``(N,)`` of the next call that may blend (False: a sample with no previous step, e.g. the first
        step of its trajectory in a training batch); None: all."""
        self._valid = None if valid is None else valid.detach().bool()

    @property
    def primed(self) -> bool:
        """Whether outputs of a previous call are kept."""
        return bool(self._cache)

    def bucket(self, t: Tensor) -> Tensor:
        """Rows of ``alpha`` for timesteps ``t``: ``floor(t num_buckets / num_train_timesteps)``, clamped."""
        rows = torch.floor(t.float() * self.num_buckets / self.num_train_timesteps).long()
        return rows.clamp(0, self.num_buckets - 1)

    def blend(self, index: int, h: Tensor) -> Tensor:
        """Block ``index``'s output ``h (N, ...)`` blended with its kept output (see the class docstring)."""
        if self._t is None and not self._cache:
            return h  # a lone call without a timestep (e.g. a calibration forward): nothing to blend, nothing kept
        prev = self._cache.get(index)
        out = h
        if prev is not None:
            if prev.shape != h.shape:
                raise RuntimeError(f"cross-timestep connection: block {self.units[index]!r} gave {tuple(h.shape)} "
                                   f"after {tuple(prev.shape)} in the previous call; a sampling run keeps its batch "
                                   "(reset the sampling state between runs)")
            if self._t is None:
                raise RuntimeError("cross-timestep connection: no timestep set for this call; run the model inside "
                                   "qat.timestep(model, t) or with qat.attach_timestep_hook")
            n = h.shape[0]
            if self._rows is None or self._rows.numel() != n:
                t = self._t.to(h.device)
                t = t.expand(n) if t.dim() == 0 else t.repeat(n // t.numel()) if n % t.numel() == 0 else t
                if t.numel() != n:
                    raise RuntimeError(f"cross-timestep connection: {t.numel()} timesteps for a batch of {n} rows")
                self._rows = self.bucket(t)
            a = self.alpha[self._rows, index]
            if self._valid is not None:
                a = a * self._valid.to(a.device)[:n].to(a.dtype)
            a = a.to(h.dtype).reshape(n, *([1] * (h.dim() - 1)))
            out = (1 - a) * h + a * prev.to(h.dtype)
        self._cache[index] = out.detach()
        if index == len(self.units) - 1:
            self._previous_t, self._valid = self._t, None
        return out

    # -- export (qat.nn.exportable): alpha is stored as an ordinary tensor -----------------------------------------
    def exports(self) -> bool:
        return True

    def export_entry(self) -> dict[str, Any]:
        return {"units": self.units, "num_buckets": self.num_buckets,
                "num_train_timesteps": self.num_train_timesteps}

    def export_tensors(self) -> tuple[dict[str, Tensor], list[str]]:
        return {}, []

    @classmethod
    def install_exported(cls, root: nn.Module, name: str, entry: dict[str, Any]) -> nn.Module:
        units = entry.get("units")
        if not isinstance(units, list) or not units or not all(isinstance(u, str) for u in units):
            raise ValueError(f"a cross_timestep entry needs 'units': a list of block names, got {units!r}")
        module = cls(units, int(entry.get("num_buckets", 100)), int(entry.get("num_train_timesteps", 1000)))
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, module)
        return module.attach(root)

    def exported_keys(self) -> tuple[list[str], list[str]]:
        return [], []

    def load_exported(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return {}

    def extra_repr(self) -> str:
        return f"blocks={len(self.units)}, buckets={self.num_buckets}, primed={self.primed}"
