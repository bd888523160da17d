"""EfficientDM: QALoRA + temporal activation LSQ + scale-aware LoRA optimisation, distilled data-free.

Paper: Y. He, J. Liu, W. Wu, H. Zhou, B. Zhuang, "EfficientDM: Efficient Quantization-Aware Fine-Tuning of Low-Bit
Diffusion Models", ICLR 2024, arXiv:2310.03270. Reference code: ThisisBillhe/EfficientDM@293e212.

Student (Sec. 3 of the paper; dossier Sec. 3.3 for the layer map of LDM-4):
    * time-embedding linears, first and last conv: W8A8 static (uniform, per-channel weights, per-tensor MSE
      activations), no LoRA, not trained;
    * residual-shortcut 1x1 convs and downsample convs: full precision;
    * every other conv and linear: QALoRA (rank 32, scaling 1) with per-channel asymmetric LSQ weights (learned step,
      fixed integer zero-point) and temporal LSQ+ input activations (per tensor, one (step, offset) per timestep);
    * attention matmuls, norms, nonlinearities: full precision.
The same map for DiT, PixArt, CogVideoX and Wan transformers comes from the layer roles of :mod:`qat.families`
(``edges`` W8A8, ``shortcuts`` and ``downsamplers`` full precision, ``modulation`` as :attr:`EfficientDMConfig.
modulation`).

Training (Sec. 3.3-3.4): AdamW with scale-aware LoRA learning rates ``lr = lora_lr * mean(s_w)`` per layer
(:func:`qat.param_groups`), the output MSE against the teacher on its own DDIM trajectories (the trainer's
``output_mse`` term, no term of its own), no schedule hooks.

Deviations from the reference code (each is a fix or an option, see the dossier's Sec. 9.4):
    * the timestep is set explicitly on the student (no forward counter);
    * activation zero-points are rounded with an STE in the forward pass (integer-deployable);
    * quantizer parameters get no weight decay by default (the reference's AdamW decays them by 0.01);
    * activations are calibrated on full-precision inputs in one pass.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from qat.checks import at_least, one_of, raise_problems
from qat.families import FAMILY_RULES, family_rules
from qat.methods.base import Method, register_method
from qat.optim import param_groups
from qat.prepare import LayerRule, QuantSpec, prepare
from qat.quantizers import LSQConfig, TemporalLSQConfig, UniformConfig

__all__ = ["EfficientDMConfig", "EfficientDM", "MODULATION_MODES", "efficientdm_spec"]

MODULATION_MODES = ("lora", "special", "fp")
INIT_METHODS = ("mse", "minmax")


@dataclass
class EfficientDMConfig:
    """Hyperparameters of the EfficientDM student and its optimisation (defaults: the paper's LDM-4 ImageNet W4A4
    setting).

    Args:
        weight_bits: bits of the QALoRA layers' weights (2..8).
        act_bits: bits of their input activations (2..8).
        special_bits: bits of the frozen edge layers (first/last/time-embedding; weights and activations).
        lora_rank: QALoRA rank.
        num_timesteps: rows of each temporal activation table (the DDIM steps of the fine-tuning trajectories).
        family: which layer roles to apply (``unet``, ``dit``, ``pixart``, ``cogvideox``, ``wan``, see
            :mod:`qat.families`); ``auto``: the family the student is built for (the trainer passes the teacher's).
        modulation: treatment of the family's modulation linears: ``lora`` (QALoRA like every other layer, the
            reference code's treatment of the UNet's time projections), ``special`` (W8A8, frozen) or ``fp``.
        special_patterns / exclude_patterns: override the family's patterns when not None.
        act_init: activation calibration method (``mse`` as the reference, or ``minmax``).
        weight_init: weight initialisation (``minmax`` as the reference, or ``mse``).
        extra_exclude: more module-name patterns kept in full precision.
        lora_lr: with ``scale_aware`` the factor ``c`` in ``lr = c * mean(s_w)`` (EfficientDM: 1/2500 = 4e-4),
            else the LoRA learning rate.
        scale_aware: EfficientDM's scale-aware LoRA optimisation (per-layer learning rates).
        weight_step_lr: learning rate of the weight steps (EfficientDM: 1e-6).
        act_step_lr: learning rate of the temporal activation steps and offsets (EfficientDM: 5e-4); with
            ``act_scale_aware`` the factor ``c`` in ``lr = c * mean(|s_a|)`` of each activation quantizer's steps.
        act_scale_aware: relative (scale-aware) activation-step learning rates, see :func:`qat.param_groups`;
            needed when one recipe serves 4- and 8-bit activations (a DiffQAT option, off in the paper recipe).
        quantizer_weight_decay: AdamW weight decay of quantizer parameters (default 0; the reference used 0.01).
        lora_weight_decay: AdamW weight decay of LoRA matrices.
    """

    weight_bits: int = 4
    act_bits: int = 4
    special_bits: int = 8
    lora_rank: int = 32
    num_timesteps: int = 100
    family: str = "auto"
    modulation: str = "lora"
    special_patterns: list[str] | None = None
    exclude_patterns: list[str] | None = None
    act_init: str = "mse"
    weight_init: str = "minmax"
    extra_exclude: list[str] = field(default_factory=list)
    lora_lr: float = 4e-4
    scale_aware: bool = True
    weight_step_lr: float = 1e-6
    act_step_lr: float = 5e-4
    act_scale_aware: bool = False
    quantizer_weight_decay: float = 0.0
    lora_weight_decay: float = 0.0

    def __post_init__(self) -> None:
        raise_problems(self.problems())

    def problems(self) -> list[tuple[str, str]]:
        """``(field, message)`` for every invalid field."""
        out = []
        for key in ("weight_bits", "act_bits", "special_bits"):
            bits = getattr(self, key)
            if not 2 <= bits <= 8:
                out.append((key, f"must be in [2, 8], got {bits}"))
        out += at_least("lora_rank", self.lora_rank, 1) + at_least("num_timesteps", self.num_timesteps, 1)
        out += one_of("family", self.family, [*sorted(FAMILY_RULES), "auto"])
        out += one_of("modulation", self.modulation, MODULATION_MODES)
        out += one_of("act_init", self.act_init, INIT_METHODS) + one_of("weight_init", self.weight_init, INIT_METHODS)
        for key in ("lora_lr", "weight_step_lr", "act_step_lr", "quantizer_weight_decay", "lora_weight_decay"):
            out += at_least(key, getattr(self, key), 0.0)
        return out


def efficientdm_spec(cfg: EfficientDMConfig, family: str = "unet") -> QuantSpec:
    """The :class:`QuantSpec` of the EfficientDM student for ``cfg``; ``family`` applies when ``cfg.family`` is
    ``auto``."""
    fam = family_rules(family if cfg.family == "auto" else cfg.family)
    special = list(cfg.special_patterns if cfg.special_patterns is not None else fam.edges)
    default_exclude = fam.shortcuts + fam.downsamplers
    exclude = list(cfg.exclude_patterns if cfg.exclude_patterns is not None else default_exclude) + cfg.extra_exclude
    if cfg.modulation == "special":
        special += fam.modulation
    elif cfg.modulation == "fp":
        exclude += fam.modulation
    w_special = UniformConfig(n_bits=cfg.special_bits, granularity="channel", init="minmax")
    a_special = UniformConfig(n_bits=cfg.special_bits, init="mse")
    w_main = LSQConfig(n_bits=cfg.weight_bits, granularity="channel", init=cfg.weight_init)
    a_main = TemporalLSQConfig(n_bits=cfg.act_bits, init=cfg.act_init, learn_offset=True,
                               num_timesteps=cfg.num_timesteps)
    rules = []
    if special:
        rules.append(LayerRule(patterns=list(special), weight=w_special, act=a_special, trainable=False))
    rules.append(LayerRule(patterns=["*"], weight=w_main, act=a_main, lora=True))
    return QuantSpec(rules=rules, exclude=list(exclude), lora_rank=cfg.lora_rank)


@register_method("efficientdm")
class EfficientDM(Method):
    """EfficientDM on the method contract (:mod:`qat.methods.base`): QALoRA student, PTQ calibration, scale-aware
    parameter groups; loss, taps and schedules are the defaults (none of its own)."""

    config_class = EfficientDMConfig
    config: EfficientDMConfig
    moved_keys: ClassVar[dict[str, str]] = {
        f"optim.{k}": k for k in ("lora_lr", "scale_aware", "weight_step_lr", "act_step_lr", "act_scale_aware",
                                  "quantizer_weight_decay", "lora_weight_decay")}

    def problems_with(self, run: Any) -> list[tuple[str, str]]:
        steps = run.trajectories.num_steps
        if self.config.num_timesteps != steps:
            return [("efficientdm.num_timesteps", f"{self.config.num_timesteps} must equal trajectories.num_steps "
                     f"({steps}): the temporal tables have one row per trajectory step")]
        return []

    def describe(self) -> str:
        c = self.config
        return (f"W{c.weight_bits}A{c.act_bits}, QALoRA rank {c.lora_rank} merged, {c.num_timesteps}-row temporal "
                "activation tables")

    def build_student(self, denoiser: nn.Module, family: str) -> tuple[nn.Module, str]:
        """A deep copy of ``denoiser`` prepared as the EfficientDM student (quantizers still to be calibrated)."""
        self.family = family if self.config.family == "auto" else self.config.family
        student = copy.deepcopy(denoiser)
        report = prepare(student, efficientdm_spec(self.config, self.family))
        return student, str(report)

    def param_groups(self, student: nn.Module) -> list[dict[str, Any]]:
        c = self.config
        return param_groups(student, lora_lr=c.lora_lr, scale_aware=c.scale_aware, weight_step_lr=c.weight_step_lr,
                            act_step_lr=c.act_step_lr, quantizer_weight_decay=c.quantizer_weight_decay,
                            lora_weight_decay=c.lora_weight_decay, act_scale_aware=c.act_scale_aware)
