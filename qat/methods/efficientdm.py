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
The same map for DiT, PixArt, CogVideoX and Wan transformers is in :data:`FAMILY_RULES`.

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

__all__ = ["EfficientDMConfig", "FamilyRules", "FAMILY_RULES", "MODULATION_MODES", "efficientdm_spec",
           "build_student"]


@dataclass(frozen=True)
class FamilyRules:
    """Which layers of one model family get which treatment (module-name patterns, see :func:`qat.prepare`).

    Args:
        special: W8A8 static, no LoRA, not trained (EfficientDM's first/last layers and time-embedding MLP).
        exclude: full precision.
        modulation: the timestep/condition modulation linears (UNet ResBlock ``time_emb_proj``, DiT adaLN); their
            treatment is :attr:`EfficientDMConfig.modulation`.
    """

    special: list[str]
    exclude: list[str]
    modulation: list[str]


#: family -> rules, for the diffusers denoisers of :mod:`train.models.families` (same names). Every other ``nn.Linear``
#: / ``nn.Conv2d`` is a QALoRA W{weight_bits}A{act_bits} layer. Always full precision, whatever the rules: norms,
#: embedding tables, position tables, ``scale_shift_table`` parameters, attention matmuls, and layer types without a
#: quantized version (Wan's ``nn.Conv3d`` patch embedding).
#:
#: How the families map onto EfficientDM's LDM-4 layer map (dossier Sec. 3.3):
#:
#: * W8A8 ``special`` = the paper's first layer, last layer and time-embedding MLP, per family: the patch embedding
#:   (``pos_embed.proj``, CogVideoX ``patch_embed.proj``), the final projection (``proj_out`` / DiT ``proj_out_2``),
#:   the timestep MLP (``*timestep_embedder.linear_{1,2}``, ``time_embedding.linear_{1,2}``, Wan
#:   ``condition_embedder.time_embedder``) and the other condition-embedding MLPs that only see the condition (PixArt's
#:   resolution / aspect-ratio embedders). Our choice beyond the paper: the text-input projections (PixArt
#:   ``caption_projection``, CogVideoX ``patch_embed.text_proj``, Wan ``condition_embedder.text_embedder``) are W8A8
#:   too: they are the first layer of the text stream, as the patch embedding is of the image stream, and read raw T5
#:   states, which have a few channels of very large magnitude (the reason T5 overflows in fp16) that a 4-bit
#:   per-tensor activation grid would clip or resolve coarsely.
#: * ``modulation`` = adaLN modulation linears (``SiLU(c) -> shift, scale, gate``). They play the role of the UNet's
#:   per-ResBlock time projections, which EfficientDM's reference code quantizes as QALoRA layers (265 wrapped
#:   modules), and QVGen quantizes every adaLN linear by default (dossier Sec. 1.3, with a ``--wo_quant_adaln``
#:   option). So the default is QALoRA (``modulation="lora"``); ``"special"`` (W8A8) and ``"fp"`` are the
#:   alternatives, e.g. for 3-bit weights. They hold a large share of a DiT's weights (28 x 1152 x 6912 in DiT-XL/2,
#:   a third of the model), which is why the default quantizes them.
#: * ``exclude`` = EfficientDM's full-precision residual-shortcut and downsample convs (UNet only; the transformer
#:   families have no counterpart).
FAMILY_RULES: dict[str, FamilyRules] = {
    # UNet2DConditionModel / UNet2DModel (LDM-4, Stable Diffusion 1.x / 2.x, DDPM-style UNets)
    "unet": FamilyRules(
        special=["time_embedding.linear_1", "time_embedding.linear_2", "conv_in", "conv_out"],
        exclude=["*.conv_shortcut", "*.downsamplers.*"],
        modulation=["*.time_emb_proj"],
    ),
    # DiTTransformer2DModel: every block has its own timestep + label embedding (norm1.emb) and adaLN-Zero linear.
    "dit": FamilyRules(
        special=["pos_embed.proj", "*timestep_embedder.linear_1", "*timestep_embedder.linear_2", "proj_out_2"],
        exclude=[],
        modulation=["transformer_blocks.*.norm1.linear", "proj_out_1"],
    ),
    # PixArtTransformer2DModel (alpha / sigma): one shared adaLN-single linear, per-block scale_shift_table (FP).
    "pixart": FamilyRules(
        special=["pos_embed.proj", "adaln_single.emb.*.linear_1", "adaln_single.emb.*.linear_2",
                 "caption_projection.linear_1", "caption_projection.linear_2", "proj_out"],
        exclude=[],
        modulation=["adaln_single.linear"],
    ),
    # CogVideoXTransformer3DModel (2B): expert adaLN per block (norm1 / norm2), AdaLayerNorm before the output.
    "cogvideox": FamilyRules(
        special=["patch_embed.proj", "patch_embed.text_proj", "time_embedding.linear_1", "time_embedding.linear_2",
                 "proj_out"],
        exclude=[],
        modulation=["transformer_blocks.*.norm1.linear", "transformer_blocks.*.norm2.linear", "norm_out.linear"],
    ),
    # WanTransformer3DModel (2.1 T2V): the patch embedding is an nn.Conv3d and stays full precision (no QuantConv3d).
    "wan": FamilyRules(
        special=["condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
                 "condition_embedder.text_embedder.linear_1", "condition_embedder.text_embedder.linear_2",
                 "proj_out"],
        exclude=[],
        modulation=["condition_embedder.time_proj"],
    ),
}

MODULATION_MODES = ("lora", "special", "fp")


@dataclass
class EfficientDMConfig:
    """Hyperparameters of the EfficientDM student (defaults: the paper's LDM-4 ImageNet W4A4 setting).

    Args:
        weight_bits: bits of the QALoRA layers' weights (2..8).
        act_bits: bits of their input activations (2..8).
        special_bits: bits of the frozen first/last/time-embedding layers (weights and activations).
        lora_rank: QALoRA rank.
        num_timesteps: rows of each temporal activation table (the DDIM steps of the fine-tuning trajectories).
        family: which naming rules to apply (``unet``, ``dit``, ``pixart``, ``cogvideox``, ``wan``), see
            :data:`FAMILY_RULES`; ``auto`` is resolved by the trainer from the teacher's model class
            (:func:`efficientdm_spec` needs a concrete family).
        modulation: treatment of the family's modulation linears: ``lora`` (QALoRA like every other layer, the
            reference code's treatment of the UNet's time projections), ``special`` (W8A8, frozen) or ``fp``.
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
    modulation: str = "lora"
    special_patterns: list[str] | None = None
    exclude_patterns: list[str] | None = None
    act_init: str = "mse"
    weight_init: str = "minmax"
    extra_exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.family != "auto" and self.family not in FAMILY_RULES:
            raise ValueError(f"family must be one of {sorted(FAMILY_RULES) + ['auto']}, got {self.family!r}")
        if self.modulation not in MODULATION_MODES:
            raise ValueError(f"modulation must be one of {list(MODULATION_MODES)}, got {self.modulation!r}")


def efficientdm_spec(cfg: EfficientDMConfig) -> QuantSpec:
    """The :class:`QuantSpec` of the EfficientDM student for ``cfg``."""
    if cfg.family == "auto":
        raise ValueError("efficientdm_spec: family 'auto' must be resolved to a concrete family first (the trainer "
                         f"takes the teacher's); one of {sorted(FAMILY_RULES)}")
    fam = FAMILY_RULES[cfg.family]
    special = list(cfg.special_patterns if cfg.special_patterns is not None else fam.special)
    exclude = list(cfg.exclude_patterns if cfg.exclude_patterns is not None else fam.exclude) + cfg.extra_exclude
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
def build_student(denoiser: nn.Module, cfg: EfficientDMConfig) -> tuple[nn.Module, PrepareReport]:
    """A deep copy of ``denoiser`` prepared as the EfficientDM student (quantizers still to be calibrated)."""
    student = copy.deepcopy(denoiser)
    report = prepare(student, efficientdm_spec(cfg))
    return student, report
