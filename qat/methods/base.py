"""The method contract: everything a paper's method decides, in one class registered by name.

A method is one file in ``qat/methods/`` with a config dataclass and a :class:`Method` subclass::

    @dataclass
    class MyConfig:                     # the ``my_method:`` section of a run config, validated at load
        weight_bits: int = 4
        def __post_init__(self): raise_problems(self.problems())
        def problems(self): ...         # [(field, message)], reported together with every other config error

    @register_method("my_method")
    class MyMethod(Method):
        config_class = MyConfig
        def build_student(self, denoiser, family): ...   # required; the rest have defaults

The trainer (``train/``) calls the hooks in this order and never looks inside the method:

1. :meth:`Method.problems_with` while the run config is validated (cross-section checks);
2. :meth:`Method.build_student` on the frozen teacher's denoiser (prepare rules per family, from
   :mod:`qat.families`);
3. :meth:`Method.initialize` before the optimizer exists (calibration, SVD inits); skipped on resume, where the
   checkpoint restores the student;
4. :meth:`Method.param_groups` for the optimizer;
5. every step: :meth:`Method.on_train_step` (schedules: a rank that decays, a warm-up that binarises layer by
   layer), then :meth:`Method.before_student_forward` (e.g. a no-grad pass on the previous trajectory step), the
   student and teacher forwards with :meth:`Method.taps` attached, and the loss: the run config's terms plus
   :meth:`Method.loss_terms`;
6. :meth:`Method.convert` before export; the student's modules export themselves (:mod:`qat.nn.exportable`).

Per-sampling-call state lives in the student's modules (:class:`qat.sampling.SamplingStateful`) and is reset by
every sampler; modules that need the timestep implement :class:`qat.timestep.TimestepAware`. A method needing
each sample's previous trajectory step sets :attr:`Method.needs_previous_step`.

Methods never import each other: shared code lives in ``qat/`` (quantizers, layers, losses, families).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn

from qat.calibration import calibrate
from qat.losses.base import LossTerm
from qat.prepare import convert
from qat.registry import Registry

__all__ = ["Method", "Calibration", "ModelRunner", "METHODS", "register_method", "build_method"]


@dataclass
class Calibration:
    """Inputs of a method's data-dependent initialisation.

    Attributes:
        batches: calibration batches (e.g. slices of teacher trajectories), passed one by one to ``forward``.
        forward: ``forward(model, batch)`` runs a model on a batch, timestep set (``qat.timestep``).
        per_timestep: also initialise per-timestep tables row by row.
        seed: seed of any random subsampling.
    """

    batches: list[Any]
    forward: Callable[[nn.Module, Any], Any]
    per_timestep: bool = False
    seed: int = 0


class ModelRunner(Protocol):
    """Runs the student or the teacher on other inputs with the current step's conditions (what
    :meth:`Method.before_student_forward` receives).

    Both take ``x (B, *sample_shape)`` and ``t (B,)`` and return the raw prediction of the guidance batch
    (``[uncond; cond]``, ``2B`` rows, with conditioning; ``B`` rows without). The teacher runs under ``no_grad``;
    the student with gradients where enabled. To record features of such a call, wrap it in
    :class:`qat.taps.FeatureTaps`.
    """

    def student(self, x: Tensor, t: Tensor) -> Tensor: ...

    def teacher(self, x: Tensor, t: Tensor) -> Tensor: ...


class Method:
    """Base class of a QAT method (see the module docstring for the order of the hooks).

    Args:
        config: an instance of :attr:`config_class`.
    """

    #: the registered name (the ``method:`` key and the name of the config section)
    name: ClassVar[str] = ""
    #: the dataclass of the method's config section
    config_class: ClassVar[type] = object
    #: old full keys of a run config that moved into this method's section -> field name (old recipes still load)
    moved_keys: ClassVar[dict[str, str]] = {}
    #: the training data carries each sample's previous trajectory step (``TrajectoryBatch.previous``)
    needs_previous_step: ClassVar[bool] = False
    #: some trainable parameters may get no gradient in a step (a schedule switches parts off): data-parallel
    #: training then looks for unused parameters (``DDPStrategy(find_unused_parameters=True)``)
    find_unused_parameters: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        #: the model family the student was built for (set by :meth:`build_student`)
        self.family: str | None = None

    # -- configuration -----------------------------------------------------------------------------------------------
    def problems_with(self, run: Any) -> list[tuple[str, str]]:
        """Problems of this method's config together with the rest of a run config, as ``(full key, message)``.

        Args:
            run: the trainer's run config (sections ``trajectories``, ``teacher``, ...), already type-checked.
        """
        return []

    def describe(self) -> str:
        """One line for reports and model cards, e.g. ``"W4A4, QALoRA rank 32 merged"``."""
        return self.name

    def bits(self) -> str:
        """The main scheme, ``W<b>A<b>`` (``fp`` for full precision)."""
        w, a = getattr(self.config, "weight_bits", "fp"), getattr(self.config, "act_bits", "fp")
        return f"W{w}A{a}"

    # -- student -----------------------------------------------------------------------------------------------------
    def build_student(self, denoiser: nn.Module, family: str) -> tuple[nn.Module, str]:
        """A new student from the frozen full-precision ``denoiser`` (left untouched) of model ``family``.

        Returns:
            the student (all parameters exist; data-dependent values not yet initialised) and a text report of
            which layer got which treatment.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement build_student")

    def initialize(self, student: nn.Module, calibration: Calibration) -> None:
        """Data-dependent initialisation, before the optimizer is built; default: :func:`qat.calibrate`."""
        calibrate(student, calibration.batches, calibration.forward, per_timestep=calibration.per_timestep,
                  seed=calibration.seed)

    def param_groups(self, student: nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups ``{"name", "params", "lr", "weight_decay"}``; default: every trainable
        parameter in one group at the config's ``lr``."""
        lr = getattr(self.config, "lr", None)
        if lr is None:
            raise NotImplementedError(f"{type(self).__name__} must implement param_groups (its config has no lr)")
        params = [p for p in student.parameters() if p.requires_grad]
        return [{"name": "student", "params": params, "lr": lr, "weight_decay": 0.0}]

    def state_dict(self) -> dict[str, Any]:
        """State of the method's schedules kept outside the student (saved in every checkpoint); keep tensors of
        the student's own modules in their buffers instead."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` on resume."""

    def convert(self, student: nn.Module) -> nn.Module:
        """Finalises a trained student for export, in place; default: :func:`qat.convert` (merges QALoRA)."""
        return convert(student)

    # -- training step -----------------------------------------------------------------------------------------------
    def loss_terms(self) -> list[LossTerm]:
        """The method's own loss terms (each with its config's weight), added to the run config's."""
        return []

    def taps(self, student: nn.Module) -> list[str]:
        """Module-name patterns tapped on the student and the teacher in every step (beyond the loss terms')."""
        return []

    def on_train_step(self, student: nn.Module, step: int, max_steps: int) -> dict[str, float]:
        """Per-step schedule, before the step's forward (every process runs it alike); returns scalars to log."""
        return {}

    def before_student_forward(self, student: nn.Module, batch: Any, runner: ModelRunner) -> None:
        """Called before the student's training forward with the step's batch (``batch.previous`` holds each
        sample's previous trajectory step with :attr:`needs_previous_step`) and a :class:`ModelRunner` that runs
        the student or the teacher on other inputs with the batch's conditions. The state it leaves in the
        student's modules is what the step's forward sees."""


#: name -> method class
METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: registers a :class:`Method` subclass under ``name`` and sets its ``name``."""

    def decorator(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register_method({name!r}) decorates a Method subclass, got {cls!r}")
        if not dataclasses.is_dataclass(cls.config_class):
            raise TypeError(f"{cls.__name__}.config_class must be a dataclass, got {cls.config_class!r}")
        cls.name = name
        return METHODS.register(name)(cls)

    return decorator


def build_method(name: str, config: Any | None = None) -> Method:
    """The registered method ``name`` with ``config`` (default: its config class's defaults)."""
    cls = METHODS.get(name)
    return cls(cls.config_class() if config is None else config)
