"""BinaryDM: 1-bit weights with an evolvable multi-basis binarizer and low-rank representation mimicking.

Paper: X. Zheng, X. Liu, H. Qin, X. Ma, M. Zhang, H. Hao, J. Wang, Z. Zhao, J. Guo, M. Magno, "BinaryDM: Accurate
Weight Binarization for Efficient Diffusion Models", ICLR 2025, arXiv:2404.05662 (v5; v1-v3 describe the earlier
LMB variant). Reference code: Xingyu-Zheng/BinaryDM@2cc5b24 (the v2/v3 variant, see the dossier's Sec. 0 and 1.8).

This implementation follows v5 (the evolvable-basis binarizer, EBB), with v3's progressive warm-up as an option:

* weights, every binarized conv and linear: ``W_bi = s_I sign(W)`` (:class:`qat.quantizers.BinaryQuantizer`, one
  learned scale per output channel, initialised to ``mean |W|``, clipped STE of :func:`qat.ste.sign_ste`); in the
  high-resolution blocks a second basis, ``W_bi = s_I sign(W) + s_II sign(W - s_I sign(W))`` (Eq. 5), trained
  with the L1 penalty ``tau (1 / N) sum |s_II|`` (Eq. 6, loss ``basis_l1``) and dropped at ``collapse_at`` of
  training (Sec. 3.2, "transition"; the paper: at 100k of about 200k iterations), so that the trained model is W1;
* input activations of those layers: per-tensor LSQ (4 or 8 bit; temporal tables optional);
* the model's first and last layers and the timestep embedder: W8A8 (v5, Appendix B.1; ``edges: fp`` keeps them in
  full precision as the reference code does); norms, nonlinearities and attention matmuls: full precision;
* loss: the teacher-output MSE of the run (data-free distillation instead of the paper's epsilon loss on real
  images) + ``lambda`` LRM (Sec. 3.3, Eq. 10-12, loss ``lrm``): block outputs projected onto the top ``C / K``
  principal directions of the teacher's features, computed once from the calibration trajectories;
* progressive warm-up (v1/v3; the reference code's 5 groups, one per step): layers are binarized centre-outward,
  group by group (the middle block first), each group's scales initialised from its weights when it switches;
* every weight, bias and norm of the student is trained (full QAT fine-tuning, AdamW; the code's LR 8e-5).

Layer map per family (:mod:`qat.families`): UNets binarize every other conv and linear, the ResBlocks' time
projections, shortcut and resampling convolutions included (as the reference code); the two bases cover the blocks
at the two highest resolutions (feature scale >= 1/2, the paper's first and last six TimestepEmbed blocks, about
15% of the weights). Transformers (DiT, PixArt, CogVideoX, Wan): adaLN modulation linears stay W8A8 by default
(``modulation``: they set the shift, scale and gate of every token), and the two bases cover the first and last
``ceil(0.075 N)`` of the ``N`` blocks (about the same share of weights as LDM-4's scope; they have no resolution
levels).

Deviations from the paper and the reference code:
    * data-free: trained on the teacher's own trajectories against its outputs (no training images);
    * the L1 penalty takes ``|s_II|`` (the paper penalises ``s_II``, which a negative scale would lower);
    * LRM's principal directions are over channels, as the paper (the code's run over the image width), from the
      calibration trajectories (the paper: the first training batch), and every process uses rank 0's;
    * the warm-up groups are equal-width rings of the block order around the middle (the code's five hand-picked
      groups of LDM-4), and every process runs it (the code's hook ran on rank 0 only);
    * activations use a learned per-tensor LSQ step (the code re-initialised it from every input) and 4 bits by
      default (the code's default was 8); attention matmuls stay in full precision (the code quantized them).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from qat.checks import at_least, one_of, raise_problems
from qat.families import FAMILY_RULES, block_outputs, family_rules
from qat.losses.base import LossTerm
from qat.losses.lowrank import LowRankMimicking, LowRankMimickingConfig
from qat.losses.regularizers import BasisL1, BasisL1Config
from qat.methods.base import Calibration, Method, register_method
from qat.prepare import LayerRule, QuantSpec, convert, match, prepare, quant_layers
from qat.quantizers import BinaryConfig, LSQConfig, TemporalLSQConfig, UniformConfig
from qat.quantizers.base import Quantizer, QuantizerConfig
from qat.quantizers.binary import BinaryQuantizer
from qat.taps import FeatureTaps

__all__ = ["BinaryDMConfig", "BinaryDM", "binarydm_spec", "multi_basis_scope", "warmup_groups"]

#: ``act_bits`` value that keeps the binarized layers' inputs in full precision (the paper's W1A32)
FULL_PRECISION = 32
EDGE_MODES = ("w8a8", "fp")
MODULATION_MODES = ("auto", "binary", "w8a8", "fp")


@dataclass
class BinaryDMConfig:
    """Hyperparameters of the BinaryDM student and its training (defaults: the paper's W1A4 LSUN-Bedrooms LDM-4).

    Args:
        act_bits: input-activation bits of the binarized layers (2..8), or 32 for full precision (W1A32).
        act_symmetric: signed symmetric per-tensor LSQ (the paper) or asymmetric with a learned offset (LSQ+).
        act_temporal: one activation step per trajectory timestep (temporal LSQ) instead of one.
        num_timesteps: rows of the temporal tables (must equal ``trajectories.num_steps``; ``act_temporal`` only).
        family: layer roles to apply (:mod:`qat.families`); ``auto``: the teacher's family.
        edges: the family's edge layers (first, last, timestep embedder): ``w8a8`` (paper v5) or ``fp`` (the code).
        modulation: the family's modulation linears: ``binary``, ``w8a8``, ``fp``; ``auto``: ``binary`` for UNets
            (the code binarizes the ResBlock time projections), ``w8a8`` for transformers (adaLN).
        multi_basis: module-name patterns of the layers with two bases; None: the family's high-resolution blocks
            (:func:`multi_basis_scope`); ``[]``: none (the plain ``s sign(W)`` baseline).
        ebb_weight: ``tau`` of the ``basis_l1`` penalty on the second scales (paper: 9e-2).
        collapse_at: fraction of ``trainer.max_steps`` at which the second basis is dropped (paper: 0.5); None keeps
            both bases to the end (the v2/v3 "W1.1" LMB variant: two bases in the exported model).
        lrm_weight: ``lambda`` of LRM (paper: 1e-4); 0 switches it off.
        lrm_rank_divisor: ``K``: each block keeps ``round(C / K)`` principal directions (paper: 4).
        lrm_taps: module-name patterns of the compared features; None: every block output
            (:func:`qat.families.block_outputs`).
        warmup_groups: progressive warm-up groups (the code: 5); 0 or 1 binarizes every layer from the start.
        warmup_interval: training steps between two groups (the code: 1).
        lr: AdamW learning rate of the weights, biases and norms (the code: 2e-5 x 4 GPUs-batch scaling = 8e-5).
        scale_lr: learning rate of the binary scales; None: ``lr``.
        act_step_lr: learning rate of the activation steps (and offsets); None: ``lr``.
        weight_decay: AdamW weight decay of the weights (quantizer parameters get none).
        extra_exclude: more module-name patterns kept in full precision.
    """

    act_bits: int = 4
    act_symmetric: bool = True
    act_temporal: bool = False
    num_timesteps: int = 100
    family: str = "auto"
    edges: str = "w8a8"
    modulation: str = "auto"
    multi_basis: list[str] | None = None
    ebb_weight: float = 9e-2
    collapse_at: float | None = 0.5
    lrm_weight: float = 1e-4
    lrm_rank_divisor: int = 4
    lrm_taps: list[str] | None = None
    warmup_groups: int = 5
    warmup_interval: int = 1
    lr: float = 8e-5
    scale_lr: float | None = None
    act_step_lr: float | None = None
    weight_decay: float = 0.0
    extra_exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        raise_problems(self.problems())

    def problems(self) -> list[tuple[str, str]]:
        """``(field, message)`` for every invalid field."""
        out = []
        if not (2 <= self.act_bits <= 8 or self.act_bits == FULL_PRECISION):
            out.append(("act_bits", f"must be in [2, 8] or {FULL_PRECISION} (full precision), got {self.act_bits}"))
        out += at_least("num_timesteps", self.num_timesteps, 1)
        out += one_of("family", self.family, [*sorted(FAMILY_RULES), "auto"])
        out += one_of("edges", self.edges, EDGE_MODES) + one_of("modulation", self.modulation, MODULATION_MODES)
        if self.collapse_at is not None and not 0.0 < self.collapse_at <= 1.0:
            out.append(("collapse_at", f"must be in (0, 1] (a fraction of trainer.max_steps) or null, got "
                                       f"{self.collapse_at}"))
        out += at_least("lrm_rank_divisor", self.lrm_rank_divisor, 1)
        out += at_least("warmup_groups", self.warmup_groups, 0) + at_least("warmup_interval", self.warmup_interval, 1)
        for key in ("ebb_weight", "lrm_weight", "lr", "scale_lr", "act_step_lr", "weight_decay"):
            if getattr(self, key) is not None:
                out += at_least(key, getattr(self, key), 0.0)
        return out


def _act_config(cfg: BinaryDMConfig) -> QuantizerConfig | None:
    """Input quantizer of the binarized layers: per-tensor LSQ with the LSQ gradient scale (BinaryDM's ``_ActQ``)."""
    if cfg.act_bits == FULL_PRECISION:
        return None
    kind = dict(n_bits=cfg.act_bits, init="mse", grad_scale=True)
    if cfg.act_symmetric:
        kind |= dict(signed=True, symmetric=True)
    else:
        kind |= dict(learn_offset=True)
    if cfg.act_temporal:
        return TemporalLSQConfig(**kind, num_timesteps=cfg.num_timesteps)
    return LSQConfig(**kind)


def _supported_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def multi_basis_scope(model: nn.Module, family: str) -> list[str]:
    """Module-name patterns of the blocks whose layers get two bases (see the module docstring).

    UNets: the blocks at feature scale >= 1/2 of the input: the first down block with its downsampler, the second
    one's ResNets and attentions, the last two up blocks (the second-to-last with its upsampler to full
    resolution). Transformers: the first and last ``ceil(0.075 N)`` of the ``N`` blocks.
    """
    if family == "unet":
        n = len(model.down_blocks)
        patterns = ["down_blocks.0.*", "down_blocks.1.resnets.*", "down_blocks.1.attentions.*"]
        patterns += [f"up_blocks.{i}.*" for i in range(max(n - 2, 0), n)]
    else:
        blocks = block_outputs(model, family)
        q = math.ceil(0.075 * len(blocks))
        patterns = [f"{b}.*" for b in blocks[:q] + blocks[len(blocks) - q:]]
    layers = _supported_layers(model)
    return [p for p in dict.fromkeys(patterns) if any(match(n, p) for n in layers)]


def binarydm_spec(cfg: BinaryDMConfig, model: nn.Module, family: str) -> QuantSpec:
    """The :class:`QuantSpec` of the BinaryDM student of ``model`` (``family``: the resolved family).

    Raises:
        ValueError: a ``multi_basis`` pattern of the config matches no linear or conv layer.
    """
    fam = family_rules(family)
    act = _act_config(cfg)
    modulation = cfg.modulation if cfg.modulation != "auto" else "binary" if family == "unet" else "w8a8"
    edges, exclude = list(fam.edges), list(cfg.extra_exclude)
    if modulation == "w8a8":
        edges += fam.modulation
    elif modulation == "fp":
        exclude += fam.modulation
    rules = []
    if cfg.edges == "w8a8":
        rules.append(LayerRule(edges, weight=UniformConfig(n_bits=8, granularity="channel", init="minmax"),
                               act=UniformConfig(n_bits=8, init="mse")))
    else:
        exclude += edges
    scope = multi_basis_scope(model, family) if cfg.multi_basis is None else list(cfg.multi_basis)
    layers = _supported_layers(model)
    for p in scope:
        if not any(match(n, p) for n in layers):
            raise ValueError(f"binarydm.multi_basis: pattern {p!r} matches no linear or conv layer of the model; "
                             f"layer names look like {layers[:3]}")
    if scope:
        rules.append(LayerRule(scope, weight=BinaryConfig(num_bases=2), act=act))
    rules.append(LayerRule(["*"], weight=BinaryConfig(num_bases=1), act=act))
    return QuantSpec(rules=rules, exclude=exclude)


_UNET_UNIT = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\.|$)")


def _unit_of(name: str, index: dict[str, int]) -> int | None:
    """Index of the block (in :func:`qat.families.block_outputs` order) that layer ``name`` belongs to."""
    m = _UNET_UNIT.match(name)
    if m:  # a UNet unit is named after its attention (or its ResNet), the last one of a level after the upsampler
        kind, i, j = m[1], m[2], m[4]
        for unit in (f"{kind}_blocks.{i}.attentions.{j}", f"{kind}_blocks.{i}.resnets.{j}",
                     f"{kind}_blocks.{i}.upsamplers.0"):
            if unit in index:
                return index[unit]
    for unit, i in index.items():
        if name == unit or name.startswith(unit + "."):
            return i
    return None


def warmup_groups(model: nn.Module, family: str, groups: int) -> dict[str, int]:
    """Binarized layer name -> warm-up group, ``0`` (the middle of the block order) to ``groups - 1`` (the ends).

    A layer's group is its block's distance from the middle block, ``|2 i / (M - 1) - 1|`` for block ``i`` of
    ``M``, cut into ``groups`` equal rings; layers outside every block (embedders, output layers) are in the last.
    """
    units = block_outputs(model, family)
    index = {u: i for i, u in enumerate(units)}
    out = {}
    for name, layer in quant_layers(model).items():
        if not isinstance(layer.weight_quantizer, BinaryQuantizer):
            continue
        i = _unit_of(name, index)
        distance = 1.0 if i is None or len(units) < 2 else abs(2.0 * i / (len(units) - 1) - 1.0)
        out[name] = min(groups - 1, int(distance * groups))
    return out


@register_method("binarydm")
class BinaryDM(Method):
    """BinaryDM on the method contract (:mod:`qat.methods.base`); see the module docstring."""

    config_class = BinaryDMConfig
    config: BinaryDMConfig

    def __init__(self, config: BinaryDMConfig) -> None:
        super().__init__(config)
        self.teacher: nn.Module | None = None
        self.lrm: LowRankMimicking | None = None
        self.multi_basis_layers: list[str] = []
        # walked once per student, not every step: (id of the student, layers per warm-up group / quantizers)
        self._groups: tuple[int, list[list[nn.Module]]] | None = None
        self._multi: tuple[int, list[BinaryQuantizer]] | None = None

    @property
    def find_unused_parameters(self) -> bool:  # type: ignore[override]
        # during the warm-up the layers not yet binarized leave their scales and steps without a gradient
        return self.config.warmup_groups > 1

    def problems_with(self, run: Any) -> list[tuple[str, str]]:
        c, out = self.config, []
        if c.act_temporal and c.num_timesteps != run.trajectories.num_steps:
            out.append(("binarydm.num_timesteps", f"{c.num_timesteps} must equal trajectories.num_steps "
                        f"({run.trajectories.num_steps}) with act_temporal: one table row per trajectory step"))
        end = self.warmup_steps()
        if end >= run.trainer.max_steps:
            out.append(("binarydm.warmup_groups", f"the warm-up binarizes the last group at step {end - 1}, but "
                        f"trainer.max_steps is {run.trainer.max_steps}: lower warmup_groups / warmup_interval"))
        return out

    def warmup_steps(self) -> int:
        """Steps until every layer is binarized (0 without warm-up)."""
        g = self.config.warmup_groups
        return (g - 1) * self.config.warmup_interval + 1 if g > 1 else 0

    def collapse_step(self, max_steps: int) -> int | None:
        """The step from which the second bases are off (None: never)."""
        c = self.config.collapse_at
        return None if c is None or not self.multi_basis_layers else round(c * max_steps)

    def bits(self) -> str:
        return f"W1A{self.config.act_bits}"

    def describe(self) -> str:
        c = self.config
        parts = [self.bits()]
        if self.multi_basis_layers:
            when = "to the end" if c.collapse_at is None else f"until {c.collapse_at:.0%} of training"
            parts.append(f"two bases on {len(self.multi_basis_layers)} layers {when}")
        if c.lrm_weight > 0:
            parts.append(f"LRM K={c.lrm_rank_divisor} weight {c.lrm_weight:g}")
        if c.warmup_groups > 1:
            parts.append(f"{c.warmup_groups}-group progressive warm-up")
        return ", ".join(parts)

    # -- student -----------------------------------------------------------------------------------------------------
    def build_student(self, denoiser: nn.Module, family: str) -> tuple[nn.Module, str]:
        """A deep copy of ``denoiser`` with binarized layers, fully trainable (scales still to be initialised)."""
        c = self.config
        self.family = family if c.family == "auto" else c.family
        self.teacher = denoiser
        student = copy.deepcopy(denoiser)
        report = prepare(student, binarydm_spec(c, student, self.family))
        student.requires_grad_(True)  # full QAT: latent weights, biases, norms, scales and steps
        self.multi_basis_layers = [n for n, layer in quant_layers(student).items()
                                   if isinstance(layer.weight_quantizer, BinaryQuantizer)
                                   and layer.weight_quantizer.config.num_bases > 1]
        if c.lrm_weight > 0:
            taps = c.lrm_taps if c.lrm_taps is not None else block_outputs(denoiser, self.family)
            self.lrm = LowRankMimicking(LowRankMimickingConfig(weight=c.lrm_weight, taps=list(taps),
                                                               rank_divisor=c.lrm_rank_divisor))
        lines = [str(report), f"two bases (second dropped at collapse_at={c.collapse_at}): "
                 f"{len(self.multi_basis_layers)} layers"]
        if c.warmup_groups > 1:
            sizes = [0] * c.warmup_groups
            for g in warmup_groups(student, self.family, c.warmup_groups).values():
                sizes[g] += 1
            lines.append(f"warm-up groups (middle first, one every {c.warmup_interval} steps): layers {sizes}")
        return student, "\n".join(lines)

    def initialize(self, student: nn.Module, calibration: Calibration) -> None:
        """Scales from the weights, activation steps from calibration inputs, then LRM's principal directions from
        the teacher's features on the same calibration batches."""
        super().initialize(student, calibration)
        if self.lrm is None:
            return
        if self.teacher is None:
            raise RuntimeError("BinaryDM.initialize: build_student first (LRM needs the teacher)")
        with FeatureTaps(self.teacher, self.lrm.taps()) as tapped:
            for batch in calibration.batches:
                calibration.forward(self.teacher, batch)
                self.lrm.observe(tapped.features)
        self.lrm.fit_()

    def param_groups(self, student: nn.Module) -> list[dict[str, Any]]:
        c = self.config
        scales, steps, quantizer_params = [], [], set()
        for m in student.modules():
            if isinstance(m, Quantizer):
                params = [p for p in m.parameters() if p.requires_grad]
                (scales if isinstance(m, BinaryQuantizer) else steps).extend(params)
                quantizer_params.update(id(p) for p in m.parameters())
        weights = [p for p in student.parameters() if p.requires_grad and id(p) not in quantizer_params]
        groups = [("weights", weights, c.lr, c.weight_decay),
                  ("binary_scales", scales, c.lr if c.scale_lr is None else c.scale_lr, 0.0),
                  ("act_steps", steps, c.lr if c.act_step_lr is None else c.act_step_lr, 0.0)]
        return [{"name": n, "params": p, "lr": lr, "weight_decay": wd} for n, p, lr, wd in groups if p]

    def loss_terms(self) -> list[LossTerm]:
        terms: list[LossTerm] = []
        if self.multi_basis_layers:
            terms.append(BasisL1(BasisL1Config(weight=self.config.ebb_weight)))
        if self.lrm is not None:
            terms.append(self.lrm)
        return terms

    # -- schedules ---------------------------------------------------------------------------------------------------
    def _warmup_layers(self, student: nn.Module) -> list[list[nn.Module]]:
        if self._groups is None or self._groups[0] != id(student):
            g = self.config.warmup_groups
            layers = quant_layers(student)
            per: list[list[nn.Module]] = [[] for _ in range(g)]
            for name, group in warmup_groups(student, self.family or "unet", g).items():
                per[group].append(layers[name])
            self._groups = (id(student), per)
        return self._groups[1]

    def on_train_step(self, student: nn.Module, step: int, max_steps: int) -> dict[str, float]:
        """Warm-up (groups binarized centre-outward, scales re-initialised from the weights at each switch) and
        the second bases' collapse; a pure function of ``step``, so a resumed run continues where it stopped."""
        c, logs = self.config, {}
        if c.warmup_groups > 1:
            groups = self._warmup_layers(student)
            done = min(len(groups), step // c.warmup_interval + 1)
            for g, layers in enumerate(groups):
                for layer in layers:
                    if g < done and step == g * c.warmup_interval and g > 0:
                        layer.weight_quantizer.initialize_(layer.weight)  # the weights trained in full precision
                    for q in (layer.weight_quantizer, layer.act_quantizer):
                        if q is not None:
                            q.enabled = g < done
            logs["binarized_groups"] = float(done)
        collapse = self.collapse_step(max_steps)
        if collapse is not None:
            if self._multi is None or self._multi[0] != id(student):
                layers = quant_layers(student)
                self._multi = (id(student), [layers[n].weight_quantizer for n in self.multi_basis_layers])
            active = 1 if step >= collapse else 2
            for q in self._multi[1]:
                if q.num_active != active:
                    q.set_active_bases_(active)
            logs["second_basis"] = float(active == 2)
        return logs

    def convert(self, student: nn.Module) -> nn.Module:
        """Drops the switched-off bases, enables every quantizer and freezes the student (before export)."""
        for m in student.modules():
            if isinstance(m, BinaryQuantizer):
                m.collapse_()
            if isinstance(m, Quantizer):
                m.enabled = True
        return convert(student)
