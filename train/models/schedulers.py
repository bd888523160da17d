"""Diffusers schedulers by short name (``eval.scheduler=dpmsolver``), for sampling with any of them."""

from __future__ import annotations

import diffusers
from diffusers import SchedulerMixin

__all__ = ["SCHEDULER_ALIASES", "scheduler_class"]

#: short names accepted by ``eval.scheduler`` (any diffusers scheduler class name works as well).
SCHEDULER_ALIASES: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
}


def scheduler_class(name: str) -> type[SchedulerMixin]:
    """The diffusers scheduler class for an alias (``ddim``) or a class name (``DDIMScheduler``)."""
    cls_name = SCHEDULER_ALIASES.get(name, name)
    cls = getattr(diffusers, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        known = sorted(SCHEDULER_ALIASES)
        raise ValueError(f"eval.scheduler: unknown scheduler {name!r}; use one of {known} or a diffusers scheduler "
                         "class name such as 'DPMSolverMultistepScheduler'")
    return cls


