"""Per-sampling-call pieces shared by every sampler: classifier-free guidance, and the state some modules keep.

:func:`cfg_combine` is the one place where the guided prediction ``eps_u + w (eps_c - eps_u)`` is written; the
trainer's sampling pipeline, its distillation loss and its evaluation all call it.

Modules that keep state across the model calls of one sampling run (a cache of the previous step's features, as
BiDM's cross-timestep connection) implement :class:`SamplingStateful`; every sampling call starts with
:func:`reset_sampling_state`, so two calls with the same seed give the same images.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["cfg_combine", "SamplingStateful", "sampling_state_modules", "reset_sampling_state"]


def cfg_combine(eps_uncond: Tensor, eps_cond: Tensor, guidance: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6): ``eps_u + w (eps_c - eps_u)``; shapes as the inputs."""
    return eps_uncond + guidance * (eps_cond - eps_uncond)


@runtime_checkable
class SamplingStateful(Protocol):
    """A module whose output depends on earlier model calls of the same sampling run."""

    def reset_sampling_state(self) -> None:
        """Forgets everything kept from earlier calls (called at the start of every sampling run)."""


def sampling_state_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` implementing :class:`SamplingStateful`."""
    return [m for m in model.modules() if isinstance(m, SamplingStateful)]


def reset_sampling_state(model: nn.Module) -> int:
    """Resets every :class:`SamplingStateful` module of ``model``; returns how many."""
    modules = sampling_state_modules(model)
    for m in modules:
        m.reset_sampling_state()
    return len(modules)
