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

Deviations from the reference code (each is a fix or an option, see the dossier's Sec. 9.4):
    * the timestep is set explicitly on the student (no forward counter);
    * activation zero-points are rounded with an STE in the forward pass (integer-deployable);
    * quantizer parameters get no weight decay by default (the reference's AdamW decays them by 0.01);
    * activations are calibrated on full-precision inputs in one pass.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from qat.methods import register_method
from qat.prepare import LayerRule, PrepareReport, QuantSpec, prepare
from qat.quantizers import LSQConfig, TemporalLSQConfig, UniformConfig

__all__ = ["EfficientDMConfig", "FAMILY_RULES", "efficientdm_spec", "build_student"]

#: family -> (W8A8 frozen "special" layers, full-precision layers), as module-name patterns of diffusers models.
FAMILY_RULES: dict[str, tuple[list[str], list[str]]] = {
    # UNet2DConditionModel / UNet2DModel (LDM-4, Stable Diffusion, DDPM-style UNets)
    "unet": (
        ["time_embedding.linear_1", "time_embedding.linear_2", "conv_in", "conv_out"],
        ["*.conv_shortcut", "*.downsamplers.*"],
    ),
    # DiTTransformer2DModel / PixArtTransformer2DModel: patch embedding, timestep MLPs and the final projection.
    "dit": (
        ["pos_embed.proj", "*timestep_embedder.linear_1", "*timestep_embedder.linear_2", "proj_out_2"],
        [],
    ),
}


@dataclass
class EfficientDMConfig:
    """Hyperparameters of the EfficientDM student (defaults: the paper's LDM-4 ImageNet W4A4 setting).

    Args:
        weight_bits: bits of the QALoRA layers' weights (2..8).
        act_bits: bits of their input activations (2..8).
        special_bits: bits of the frozen first/last/time-embedding layers (weights and activations).
        lora_rank: QALoRA rank.
        num_timesteps: rows of each temporal activation table (the DDIM steps of the fine-tuning trajectories).
        family: which naming rules to apply (``unet`` or ``dit``), see :data:`FAMILY_RULES`.
        special_patterns / exclude_patterns: override the family's patterns when not None.
        act_init: activation calibration method (``mse`` as the reference, or ``minmax``).
        weight_init: weight initialisation (``minmax`` as the reference, or ``mse``).
    """

    weight_bits: int = 4
    act_bits: int = 4
    special_bits: int = 8
    lora_rank: int = 32
    num_timesteps: int = 100
    family: str = "unet"
    special_patterns: list[str] | None = None
    exclude_patterns: list[str] | None = None
    act_init: str = "mse"
    weight_init: str = "minmax"
    extra_exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.family not in FAMILY_RULES:
            raise ValueError(f"family must be one of {sorted(FAMILY_RULES)}, got {self.family!r}")


def efficientdm_spec(cfg: EfficientDMConfig) -> QuantSpec:
    """The :class:`QuantSpec` of the EfficientDM student for ``cfg``."""
    special, exclude = FAMILY_RULES[cfg.family]
    special = cfg.special_patterns if cfg.special_patterns is not None else special
    exclude = (cfg.exclude_patterns if cfg.exclude_patterns is not None else exclude) + cfg.extra_exclude
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
def build_student(denoiser: nn.Module, cfg: EfficientDMConfig) -> tuple[nn.Module, PrepareReport]:
    """A deep copy of ``denoiser`` prepared as the EfficientDM student (quantizers still to be calibrated)."""
    student = copy.deepcopy(denoiser)
    report = prepare(student, efficientdm_spec(cfg))
    return student, report
