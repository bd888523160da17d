"""The timestep as explicit input: a protocol for the modules that need it, and model-level helpers.

Any module whose forward depends on the sampler timestep (EfficientDM's temporal activation tables, a per-timestep
clipping range, a per-timestep blend) implements :class:`TimestepAware`; the helpers here find such modules by
that protocol (not by class) and set the timestep on all of them before a model call::

    qat.set_timestep_grid(student, scheduler.timesteps)     # once: the grid per-timestep tables are trained on
    with qat.timestep(student, t):                          # t: scalar or (B,) sampler timestep values
        eps = student(x_t, t, encoder_hidden_states=ctx).sample

For diffusers pipelines, :func:`attach_timestep_hook` reads the ``timestep`` argument of every forward call of a
denoiser, so the same student samples with any scheduler and step count. A module never counts calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "TimestepAware",
    "TimestepCall",
    "timestep_modules",
    "temporal_quantizers",
    "set_timestep",
    "set_timestep_index",
    "clear_timestep",
    "timestep",
    "timestep_index",
    "set_timestep_grid",
    "attach_timestep_hook",
]


@dataclass
class TimestepCall:
    """One model call's timestep, as every :class:`TimestepAware` module of the model receives it.

    Attributes:
        t: sampler timestep values, ``()`` for the whole batch or ``(B,)`` per sample.
        reuse: the module may write per-call tensors into those of its previous call instead of allocating new
            ones (CUDA graphs read module tensors from fixed addresses). Only valid for one forward per backward.
        memo: shared among the modules of this call, so that work that depends only on ``t`` and a module's
            grid (e.g. interpolation weights over a table's rows) is done once per call, not once per module.
    """

    t: Tensor
    reuse: bool = False
    memo: dict[Any, Any] = field(default_factory=dict)


@runtime_checkable
class TimestepAware(Protocol):
    """A module whose forward depends on the sampler timestep, set before each model call (never counted)."""

    def set_timestep(self, t: Tensor, call: TimestepCall | None = None) -> None:
        """Selects what the next forwards use for timestep values ``t`` (``()`` or ``(B,)``)."""

    def clear_timestep(self) -> None:
        """Forgets the timestep; a forward without one raises."""


def timestep_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` that implements :class:`TimestepAware`, in module order."""
    return [m for m in model.modules() if isinstance(m, TimestepAware)]


def temporal_quantizers(model: nn.Module) -> list[nn.Module]:
    """The per-timestep-table quantizers of ``model`` (:class:`~qat.quantizers.TemporalLSQQuantizer` and any
    timestep-aware module with a table grid, i.e. a ``set_grid`` method)."""
    return [m for m in timestep_modules(model) if hasattr(m, "set_grid")]


def set_timestep(model: nn.Module, t: float | Tensor, modules: list[nn.Module] | None = None,
                 reuse: bool = False) -> None:
    """Sets sampler timestep value(s) ``t`` (scalar or ``(B,)``) on every timestep-aware module of ``model``.

    ``modules``: ``timestep_modules(model)`` computed once by the caller; a training loop passes it to skip the walk
    over thousands of modules on every call. ``reuse``: see :class:`TimestepCall` (a training step that runs one
    forward per backward under CUDA graphs; a second call before the first forward's backward overwrites tensors
    autograd saved, and the backward raises autograd's in-place error).
    """
    call = TimestepCall(torch.as_tensor(t), reuse)
    for m in timestep_modules(model) if modules is None else modules:
        m.set_timestep(call.t, call)


def set_timestep_index(model: nn.Module, index: int | Tensor) -> None:
    """Sets the table row index (int or ``(B,)`` long tensor) on every module that has one."""
    for m in timestep_modules(model):
        if hasattr(m, "set_timestep_index"):
            m.set_timestep_index(index)


def clear_timestep(model: nn.Module, modules: list[nn.Module] | None = None) -> None:
    """Unsets the timestep everywhere; a later forward without a timestep raises."""
    for m in timestep_modules(model) if modules is None else modules:
        m.clear_timestep()


@contextmanager
def timestep(model: nn.Module, t: float | Tensor, modules: list[nn.Module] | None = None,
             reuse: bool = False) -> Iterator[None]:
    """Context manager: :func:`set_timestep` on entry, :func:`clear_timestep` on exit (``modules``, ``reuse``: see
    there)."""
    if modules is None:
        modules = timestep_modules(model)
    set_timestep(model, t, modules, reuse)
    try:
        yield
    finally:
        clear_timestep(model, modules)


@contextmanager
def timestep_index(model: nn.Module, index: int | Tensor) -> Iterator[None]:
    """Context manager: :func:`set_timestep_index` on entry, :func:`clear_timestep` on exit."""
    set_timestep_index(model, index)
    try:
        yield
    finally:
        clear_timestep(model)


def set_timestep_grid(model: nn.Module, timesteps: Tensor | list[int]) -> None:
    """Stores the ``(T,)`` timestep values that per-timestep tables stand for (e.g. a DDIM scheduler's timesteps)."""
    for m in temporal_quantizers(model):
        m.set_grid(torch.as_tensor(timesteps))


def attach_timestep_hook(model: nn.Module, arg_index: int = 1, kwarg: str = "timestep") -> RemovableHandle:
    """Makes every ``model(sample, timestep, ...)`` call set the timestep-aware modules from its ``timestep`` input.

    Diffusers denoisers (``UNet2DConditionModel``, ``UNet2DModel``, ``DiTTransformer2DModel``...) take the timestep
    as the second positional argument or the ``timestep`` keyword; a scalar is used for the whole batch and a
    ``(B,)`` tensor per sample. The timestep is still an explicit input: it is read from the call, not counted.

    Returns:
        the hook handle; ``handle.remove()`` detaches it.
    """

    modules = timestep_modules(model)  # the module objects survive merges and device moves

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        t = kwargs[kwarg] if kwarg in kwargs else args[arg_index] if len(args) > arg_index else None
        if t is None:
            raise ValueError(f"{type(module).__name__} was called without a {kwarg!r} argument")
        set_timestep(module, t, modules)

    return model.register_forward_pre_hook(hook, with_kwargs=True)
