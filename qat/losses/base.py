"""The loss contract: one ``nn.Module`` and one config dataclass per term, registered by name.

A term sees one training step's :class:`LossInputs` (the student's and the teacher's outputs on the same inputs,
their tapped features, the timesteps) and returns its unweighted value, a scalar or one value per sample
``(B,)``. The trainer multiplies it by the config's ``weight``, adds the terms, and logs each one. Terms come from
the run config (``losses: {<name>: {weight: ..., ...}}``) and from the method (:meth:`qat.methods.Method.loss_terms`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor, nn

from qat.checks import raise_problems
from qat.registry import Registry

__all__ = ["LossConfig", "LossInputs", "LossTerm", "LOSSES", "register_loss", "build_loss"]


@dataclass
class LossConfig:
    """Fields every loss term config has.

    Args:
        weight: the term's factor in the total loss (0 switches it off).
    """

    name: ClassVar[str] = ""
    weight: float = 1.0

    def __post_init__(self) -> None:
        raise_problems(self.problems())

    def problems(self) -> list[tuple[str, str]]:
        """``(field, message)`` for every invalid field (subclasses extend the list)."""
        return [] if self.weight >= 0 else [("weight", f"must be >= 0, got {self.weight}")]


@dataclass
class LossInputs:
    """What one training step offers a loss term.

    Rows: with classifier-free guidance (``guided``) the batch was run as ``[uncond; cond]``, ``2B`` rows, the
    unconditional half first; otherwise ``B`` rows.

    Attributes:
        student_out: the student's prediction, ``(N, *sample_shape)`` float32.
        teacher_out: the teacher's prediction on the same inputs, same shape (the distillation target).
        t: ``(B,)`` timesteps of the samples (with guidance, rows ``i`` and ``B + i`` share ``t[i]``).
        guided: whether the rows are ``[uncond; cond]``.
        guidance: the CFG scale ``w`` of the trajectories.
        student_features: tapped module name -> the student's output (with its autograd graph).
        teacher_features: tapped module name -> the teacher's output on the same inputs (no graph).
        student: the student model (for regularisers on its parameters).
        previous_teacher_features: for the terms with :meth:`LossTerm.previous_taps`: the teacher's tapped features
            on each sample's previous trajectory step (same rows as ``teacher_features``, no graph).
        previous_valid: ``(B,)`` whether a sample's previous step belongs to its trajectory (False at a
            trajectory's first step, where ``previous_teacher_features`` holds the current step's).
    """

    student_out: Tensor
    teacher_out: Tensor
    t: Tensor
    guided: bool
    guidance: float
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    student: nn.Module | None = None
    previous_teacher_features: dict[str, Tensor] = field(default_factory=dict)
    previous_valid: Tensor | None = None


class LossTerm(nn.Module):
    """Base class of a loss term (see the module docstring).

    A term may hold buffers (a fixed projection, moved and checkpointed with the trainer), not trainable
    parameters: the optimizer's groups come from the method.

    Args:
        config: the term's config; ``config.weight`` is applied by the caller, not by :meth:`forward`.

    Raises:
        qat.checks.ConfigProblems: settings that only make sense together are missing (checked here rather than in
            the config, whose defaults must stay valid on their own).
    """

    config: LossConfig

    def __init__(self, config: LossConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    def taps(self) -> list[str]:
        """Module-name patterns whose outputs this term reads (tapped on the student and the teacher)."""
        return []

    def previous_taps(self) -> list[str]:
        """Module-name patterns whose teacher features at each sample's previous trajectory step this term reads
        (``LossInputs.previous_teacher_features``; the trainer runs the teacher there, online or cached)."""
        return []

    def forward(self, inputs: LossInputs) -> Tensor:
        """The unweighted term: a scalar, ``(B,)`` per sample, or ``(2B,)`` per row of a guided batch (the caller
        averages a sample's two rows, then the samples)."""
        raise NotImplementedError


#: name -> (config class, term class)
LOSSES: Registry[tuple[type[LossConfig], type[LossTerm]]] = Registry("loss")


def register_loss(config_cls: type[LossConfig]) -> Callable[[type[LossTerm]], type[LossTerm]]:
    """Class decorator: registers a loss term class with its config class under ``config_cls.name``."""

    return LOSSES.register_config(config_cls)


def build_loss(config: LossConfig) -> LossTerm:
    """The term of ``config`` (dispatch on its registered ``name``)."""
    return LOSSES.get(config.name)[1](config)
