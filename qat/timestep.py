"""Model-level control of temporal quantizers: the timestep is explicit input, never a hidden counter.

Typical use::

    qat.set_timestep_grid(student, scheduler.timesteps)     # once: the grid the tables are trained on
    with qat.timestep(student, t):                          # t: scalar or (B,) sampler timestep values
        eps = student(x_t, t, encoder_hidden_states=ctx).sample

For diffusers pipelines, :func:`attach_timestep_hook` reads the ``timestep`` argument of every forward call of a
denoiser, so the same student samples with any scheduler and step count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from qat.quantizers.temporal_lsq import TemporalLSQQuantizer, grid_position, interpolation_weights

__all__ = [
    "temporal_quantizers",
    "set_timestep",
    "set_timestep_index",
    "clear_timestep",
    "timestep",
    "timestep_index",
    "set_timestep_grid",
    "attach_timestep_hook",
]


def temporal_quantizers(model: nn.Module) -> list[TemporalLSQQuantizer]:
    """All :class:`TemporalLSQQuantizer` modules of ``model``."""
    return [m for m in model.modules() if isinstance(m, TemporalLSQQuantizer)]


def set_timestep(model: nn.Module, t: float | Tensor, quantizers: list[TemporalLSQQuantizer] | None = None,
                 reuse: bool = False) -> None:
    """Sets sampler timestep value(s) ``t`` (scalar or ``(B,)``) on every temporal quantizer of ``model``.

    ``quantizers``: ``temporal_quantizers(model)`` computed once by the caller; a training loop passes it to skip
    the walk over thousands of modules on every call.

    ``reuse``: write the interpolation weights into the tensor of the previous call (when its shape, dtype and
    device match) instead of a new one. CUDA graphs (``torch.compile(mode="reduce-overhead")``) read module tensors
    from fixed addresses, so a new tensor in every call makes them record every graph again (seconds per step).
    Only for one forward per backward, as a training step: a second call before the first forward's backward
    overwrites weights that autograd saved, and the backward raises autograd's in-place error.
    """
    t = torch.as_tensor(t)
    positions: dict[tuple, tuple[tuple[Tensor, Tensor, Tensor], Tensor]] = {}
    for q in temporal_quantizers(model) if quantizers is None else quantizers:
        key = (q.grid_key, q.timesteps.device)  # the grid is located once per model call, not once per layer
        if key not in positions:
            position = grid_position(q.timesteps, t)
            weights = interpolation_weights(position, len(q.grid_key))
            if reuse:
                weights = _in_place(q, weights)
            positions[key] = position, weights
        q.set_timestep(t, *positions[key])


def _in_place(q: TemporalLSQQuantizer, weights: Tensor) -> Tensor:
    """``weights`` copied into the tensor the first quantizer of its grid held last time (one tensor per grid)."""
    old = q._coef_reused
    if old is not None and old.shape == weights.shape and old.dtype == weights.dtype and old.device == weights.device:
        return old.copy_(weights)
    q._coef_reused = weights
    return weights


def set_timestep_index(model: nn.Module, index: int | Tensor) -> None:
    """Sets the table row index (int or ``(B,)`` long tensor) on every temporal quantizer of ``model``."""
    for q in temporal_quantizers(model):
        q.set_timestep_index(index)


def clear_timestep(model: nn.Module, quantizers: list[TemporalLSQQuantizer] | None = None) -> None:
    """Unsets the timestep everywhere; a later forward without a timestep raises."""
    for q in temporal_quantizers(model) if quantizers is None else quantizers:
        q.clear_timestep()


@contextmanager
def timestep(model: nn.Module, t: float | Tensor, quantizers: list[TemporalLSQQuantizer] | None = None,
             reuse: bool = False) -> Iterator[None]:
    """Context manager: :func:`set_timestep` on entry, :func:`clear_timestep` on exit (``quantizers``, ``reuse``:
    see there)."""
    if quantizers is None:
        quantizers = temporal_quantizers(model)
    set_timestep(model, t, quantizers, reuse)
    try:
        yield
    finally:
        clear_timestep(model, quantizers)


@contextmanager
def timestep_index(model: nn.Module, index: int | Tensor) -> Iterator[None]:
    """Context manager: :func:`set_timestep_index` on entry, :func:`clear_timestep` on exit."""
    set_timestep_index(model, index)
    try:
        yield
    finally:
        clear_timestep(model)


def set_timestep_grid(model: nn.Module, timesteps: Tensor | list[int]) -> None:
    """Stores the ``(T,)`` timestep values that the table rows stand for (e.g. a DDIM scheduler's timesteps)."""
    for q in temporal_quantizers(model):
        q.set_grid(torch.as_tensor(timesteps))


def attach_timestep_hook(model: nn.Module, arg_index: int = 1, kwarg: str = "timestep") -> RemovableHandle:
    """Makes every ``model(sample, timestep, ...)`` call set the temporal quantizers from its ``timestep`` input.

    Diffusers denoisers (``UNet2DConditionModel``, ``UNet2DModel``, ``DiTTransformer2DModel``...) take the timestep
    as the second positional argument or the ``timestep`` keyword; a scalar is used for the whole batch and a
    ``(B,)`` tensor per sample. The timestep is still an explicit input: it is read from the call, not counted.

    Returns:
        the hook handle; ``handle.remove()`` detaches it.
    """

    quantizers = temporal_quantizers(model)  # the quantizer objects survive merges and device moves

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        t = kwargs[kwarg] if kwarg in kwargs else args[arg_index] if len(args) > arg_index else None
        if t is None:
            raise ValueError(f"{type(module).__name__} was called without a {kwarg!r} argument")
        set_timestep(module, t, quantizers)

    return model.register_forward_pre_hook(hook, with_kwargs=True)
