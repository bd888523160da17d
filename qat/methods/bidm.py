"""BiDM: fully binarized (W1A1) diffusion models with the timestep-friendly binary structure and space patched
distillation.

Paper: X. Zheng, X. Liu, Y. Bian, X. Ma, Y. Zhang, J. Wang, J. Guo, H. Qin, "BiDM: Pushing the Limit of Quantization
for Diffusion Models", NeurIPS 2024, arXiv:2412.05926. Reference code: Xingyu-Zheng/BiDM@76170b3 (LDM) and its
``bidm-cifar/`` (dossier ``binarydm_bidm.md`` Sec. 2 and 3.2).

The student:

* every conv of the blocks: :class:`qat.nn.binary.XnorConv2d`, ``(conv(sign(x + tau), alpha sign(W)) * K) + b +
  |s| S(x)``: 1-bit weights with one scale per output channel (initialised to ``mean |W|``, clipped STE),
  1-bit activations with a learnable per-channel threshold and Bi-Real's ApproxSign gradient
  (:class:`qat.quantizers.SignActQuantizer`), the XNOR scaling map ``K = conv(mean_c |x|, k)`` with a learnable
  ``k`` initialised to the mean filter (paper Eq. 9-10), and ReActNet's shortcut (the code's ``BNNConv2d``);
* every linear of the blocks (attention projections, ResBlock time projections): W1A1, ``linear(sign(x + tau),
  alpha sign(W)) + b`` (the code's ``BNNConv1d`` / ``BNNLinear``);
* full precision: the family's edge layers (first and last layers, timestep MLP), residual-shortcut convs
  (``conv_shortcut``), norms, nonlinearities, attention matmuls, and for transformer families the adaLN
  modulation linears (they set the shift, scale and gate of every token; BiDM has no transformer recipe);
* the cross-timestep feature connection on the last ``connections`` blocks (paper Eq. 12, 8 for LDMs):
  :class:`qat.nn.binary.CrossTimestepConnection`, ``alpha`` per (timestep bucket, block), initialised to 0.3.

Training: the run's output loss (data-free distillation against the teacher instead of the paper's epsilon loss on
real images) + ``lambda`` SPD over every block output (paper Eq. 13-16, :mod:`qat.losses.patch`, lambda 1e-2,
p = 4). Before each step's student forward the student runs under ``no_grad`` on each sample's previous trajectory
step (``batch.previous``, the same trajectory one sampler step earlier), which fills the connection's cache; the
step's forward then blends with it (the code: a forward at ``t + 1`` built from the same ``x_0`` and noise).

Deviations from the paper and the reference code:
    * data-free: trained on the teacher's own trajectories (DDIM) against its outputs;
    * the training cache is the previous step of the same trajectory at the sampler's own gap (the code: a
      synthetic ``t + 1``, a gap of one DDPM step where inference has 5-10); it is pre-mix, as the code's;
    * pretrained biases are kept (``keep_bias``; the code drops them silently), added after the scaling map;
    * the scaling map's bias starts at 0 and the shortcut projection (``C_in != C_out``) at zeros (the code: random
      defaults); ``k`` is never reset after initialisation (the code resets it at every process start);
    * the weight scales are learnable parameters (paper Sec. 3.1; the code recomputes a detached ``mean |W|``);
    * the activation threshold also applies in the linears' forward (the code's ``BNNLinear`` skips it);
    * a sampler that evaluates the model more than once per step stops with an error
      (:class:`~qat.nn.binary.CrossTimestepConnection`); the code silently mixes evaluations.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qat.checks import at_least, one_of, raise_problems
from qat.families import FAMILY_RULES, block_outputs, family_rules
from qat.losses.base import LossTerm
from qat.losses.patch import SpacePatchedDistillation, SpacePatchedDistillationConfig
from qat.methods.base import Method, ModelRunner, register_method
from qat.nn.binary import CrossTimestepConnection, XnorConv2d
from qat.nn.layers import QuantConv2d
from qat.prepare import LayerRule, QuantSpec, prepare, quant_layers
from qat.quantizers import BinaryConfig, SignActConfig, UniformConfig
from qat.quantizers.base import Quantizer
from qat.quantizers.binary import BinaryQuantizer

__all__ = ["BiDMConfig", "BiDM", "bidm_spec", "CONNECTION_NAME"]

#: attribute of the student holding the cross-timestep connection (state-dict prefix ``cross_timestep.``)
CONNECTION_NAME = "cross_timestep"
EDGE_MODES = ("fp", "w8a8")
VIDEO_FAMILIES = ("cogvideox", "wan")
#: samplers that call the model several times at one timestep (Heun's corrector, PNDM's Runge-Kutta warm-up)
MULTI_EVALUATION_SCHEDULERS = ("heun", "pndm", "heundiscretescheduler", "pndmscheduler", "kdpm2discretescheduler",
                               "kdpm2ancestraldiscretescheduler")


@dataclass
class BiDMConfig:
    """Hyperparameters of the BiDM student and its training (defaults: the paper's LSUN-Bedrooms LDM-4, W1A1).

    Args:
        family: layer roles to apply (:mod:`qat.families`); ``auto``: the teacher's family.
        edges: the family's edge layers: ``fp`` (the code) or ``w8a8``.
        scaling_map: the convs' XNOR scaling map with a learnable kernel (TBS part 1); off: plain ``sign``
            products (with ``conv_shortcut`` off too, the XNOR baseline without scaling).
        conv_shortcut: ReActNet's shortcut inside every binarized conv (the code).
        shortcut_init: initial shortcut scale ``s`` (the code: 0.3).
        act_threshold: the activations' learnable threshold (RSign); off: ``sign(x)``.
        act_gradient: ``approx_sign`` (Bi-Real, BiDM) or ``clipped`` (the STE of XNOR-Net).
        keep_bias: keep the pretrained biases of the binarized layers (trained); off: set them to 0 and freeze
            them (the code's behaviour).
        connections: the last ``n`` blocks with the cross-timestep connection (paper: 8 for LDMs, 2 for
            CIFAR-10); 0 switches it off.
        alpha_init: initial blend weight (paper: 0.3).
        alpha_buckets: rows of the blend table (timestep buckets; the code: 100).
        num_train_timesteps: the range the buckets divide (the teacher's training timesteps).
        spd_weight: ``lambda`` of SPD (Appendix A and the code: 1e-2); 0 switches it off.
        spd_patches: ``p``, patches per side (paper: 4).
        spd_taps: module-name patterns of the distilled features; None: every block output.
        lr: AdamW learning rate of every trained tensor (paper, bedrooms: 2e-5).
        weight_decay: AdamW weight decay of the latent weights (the rest gets none).
        extra_exclude: more module-name patterns kept in full precision.
    """

    family: str = "auto"
    edges: str = "fp"
    scaling_map: bool = True
    conv_shortcut: bool = True
    shortcut_init: float = 0.3
    act_threshold: bool = True
    act_gradient: str = "approx_sign"
    keep_bias: bool = True
    connections: int = 8
    alpha_init: float = 0.3
    alpha_buckets: int = 100
    num_train_timesteps: int = 1000
    spd_weight: float = 1e-2
    spd_patches: int = 4
    spd_taps: list[str] | None = None
    lr: float = 2e-5
    weight_decay: float = 0.0
    extra_exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        raise_problems(self.problems())

    def problems(self) -> list[tuple[str, str]]:
        """``(field, message)`` for every invalid field."""
        out = one_of("family", self.family, [*sorted(FAMILY_RULES), "auto"]) + one_of("edges", self.edges, EDGE_MODES)
        out += one_of("act_gradient", self.act_gradient, ("approx_sign", "clipped"))
        out += at_least("connections", self.connections, 0) + at_least("alpha_buckets", self.alpha_buckets, 1)
        out += at_least("num_train_timesteps", self.num_train_timesteps, 1)
        out += at_least("spd_patches", self.spd_patches, 1)
        for key in ("spd_weight", "lr", "weight_decay"):
            out += at_least(key, getattr(self, key), 0.0)
        if self.conv_shortcut and not self.shortcut_init > 0:
            out.append(("shortcut_init", f"must be > 0 (the shortcut is scaled by |s|, whose gradient at 0 is 0), got "
                                         f"{self.shortcut_init}"))
        if self.spd_weight > 0 and self.spd_taps is not None and not self.spd_taps:
            out.append(("spd_taps", "needs at least one module-name pattern with spd_weight > 0 (null: every block "
                                    "output)"))
        if self.spd_weight > 0 and self.family in VIDEO_FAMILIES:
            out.append(("spd_weight", f"SPD compares spatial patches of image features; the {self.family} family's "
                                      "blocks give token sequences of several frames: set it to 0"))
        return out


def bidm_spec(cfg: BiDMConfig, family: str) -> QuantSpec:
    """The :class:`QuantSpec` of the W1A1 student (``family``: the resolved family); the convs become
    :class:`XnorConv2d` afterwards (:meth:`BiDM.build_student`)."""
    fam = family_rules(family)
    exclude = list(fam.shortcuts) + list(cfg.extra_exclude)
    if family != "unet":
        exclude += fam.modulation
    rules = []
    if cfg.edges == "w8a8":
        rules.append(LayerRule(list(fam.edges), weight=UniformConfig(n_bits=8, granularity="channel", init="minmax"),
                               act=UniformConfig(n_bits=8, init="mse")))
    else:
        exclude += fam.edges
    act = SignActConfig(threshold=cfg.act_threshold, gradient=cfg.act_gradient)
    rules.append(LayerRule(["*"], weight=BinaryConfig(num_bases=1), act=act))
    return QuantSpec(rules=rules, exclude=exclude)


def connected_blocks(model: nn.Module, family: str, n: int) -> list[str]:
    """The last ``n`` block outputs of ``model`` (:func:`qat.families.block_outputs`), in forward order."""
    blocks = block_outputs(model, family)
    if n > len(blocks):
        raise ValueError(f"bidm.connections: {n} blocks asked for, but the {family} model has {len(blocks)} block "
                         f"outputs ({blocks[:3]}...)")
    return blocks[len(blocks) - n:]


@register_method("bidm")
class BiDM(Method):
    """BiDM on the method contract (:mod:`qat.methods.base`); see the module docstring."""

    config_class = BiDMConfig
    config: BiDMConfig

    def __init__(self, config: BiDMConfig) -> None:
        super().__init__(config)
        self.spd: SpacePatchedDistillation | None = None

    @property
    def needs_previous_step(self) -> bool:  # type: ignore[override]
        return self.config.connections > 0

    def problems_with(self, run: Any) -> list[tuple[str, str]]:
        scheduler = str(getattr(getattr(run, "eval", None), "scheduler", "ddim"))
        if self.config.connections and scheduler.lower() in MULTI_EVALUATION_SCHEDULERS:
            return [("eval.scheduler", f"{scheduler!r} evaluates the model more than once per step, which BiDM's "
                     "cross-timestep connection refuses; use ddim, ddpm, euler, dpmsolver or unipc (one call per "
                     "step), or bidm.connections=0")]
        return []

    def bits(self) -> str:
        return "W1A1"

    def describe(self) -> str:
        c, parts = self.config, ["W1A1"]
        if c.scaling_map:
            parts.append("learnable XNOR scaling map")
        if c.connections:
            parts.append(f"cross-timestep connection on {c.connections} blocks")
        if c.spd_weight > 0:
            parts.append(f"SPD p={c.spd_patches} weight {c.spd_weight:g}")
        return ", ".join(parts)

    # -- student -----------------------------------------------------------------------------------------------------
    def build_student(self, denoiser: nn.Module, family: str) -> tuple[nn.Module, str]:
        """A deep copy of ``denoiser`` with W1A1 layers, XNOR convs and the connection, fully trainable."""
        c = self.config
        self.family = family if c.family == "auto" else c.family
        if c.spd_weight > 0 and self.family in VIDEO_FAMILIES:
            raise ValueError(f"bidm.spd_weight: SPD compares spatial patches of image features; the {self.family} "
                             "family's blocks give token sequences of several frames: set bidm.spd_weight=0")
        student = copy.deepcopy(denoiser)
        report = prepare(student, bidm_spec(c, self.family))
        xnor = 0
        if c.scaling_map or c.conv_shortcut:
            for name, layer in quant_layers(student).items():
                if isinstance(layer, QuantConv2d) and isinstance(layer.weight_quantizer, BinaryQuantizer):
                    parent, _, child = name.rpartition(".")
                    setattr(student.get_submodule(parent) if parent else student, child,
                            XnorConv2d.from_quant(layer, c.scaling_map, c.conv_shortcut, c.shortcut_init))
                    xnor += 1
        student.requires_grad_(True)  # full QAT: latent weights, biases, norms and every new parameter
        if not c.keep_bias:
            for layer in quant_layers(student).values():
                if isinstance(layer.weight_quantizer, BinaryQuantizer) and layer.bias is not None:
                    layer.bias.data.zero_()
                    layer.bias.requires_grad_(False)
        lines = [str(report), f"XNOR convs (scaling map {c.scaling_map}, shortcut {c.conv_shortcut}): {xnor}; "
                 f"biases of binarized layers {'kept' if c.keep_bias else 'zeroed and frozen'}"]
        if c.connections:
            units = connected_blocks(student, self.family, c.connections)
            conn = CrossTimestepConnection(units, c.alpha_buckets, c.num_train_timesteps, c.alpha_init)
            student.add_module(CONNECTION_NAME, conn.to(next(student.parameters()).device))
            conn.attach(student)
            lines.append(f"cross-timestep connection on {units}")
        if c.spd_weight > 0:
            taps = c.spd_taps if c.spd_taps is not None else block_outputs(denoiser, self.family)
            self.spd = SpacePatchedDistillation(SpacePatchedDistillationConfig(
                weight=c.spd_weight, patches=c.spd_patches, taps=list(taps)))
        return student, "\n".join(lines)

    def param_groups(self, student: nn.Module) -> list[dict[str, Any]]:
        """The binarized layers' latent weights (with ``weight_decay``); everything else trained (their biases,
        scales, thresholds, scaling maps, shortcuts, the blend table, norms and full-precision layers), without."""
        c = self.config
        decayed = {id(m.weight) for m in quant_layers(student).values()}
        params = [p for p in student.parameters() if p.requires_grad]
        groups = [("weights", [p for p in params if id(p) in decayed], c.weight_decay),
                  ("binary_params", [p for p in params if id(p) not in decayed], 0.0)]
        return [{"name": n, "params": p, "lr": c.lr, "weight_decay": wd} for n, p, wd in groups if p]

    def loss_terms(self) -> list[LossTerm]:
        return [self.spd] if self.spd is not None else []

    # -- training step -----------------------------------------------------------------------------------------------
    @staticmethod
    def connection(student: nn.Module) -> CrossTimestepConnection | None:
        """The student's cross-timestep connection, if it has one."""
        conn = getattr(student, CONNECTION_NAME, None)
        return conn if isinstance(conn, CrossTimestepConnection) else None

    def before_student_forward(self, student: nn.Module, batch: Any, runner: ModelRunner) -> None:
        """Fills the connection's cache with the student's block outputs on each sample's previous trajectory step
        (under ``no_grad``: the cache is used detached, so the gradients are those of the code's graph); samples
        at the first step of their trajectory (no previous step) do not blend."""
        conn = self.connection(student)
        if conn is None:
            return
        conn.reset_sampling_state()
        prev = batch.previous
        if prev is None:
            raise RuntimeError("BiDM's cross-timestep connection needs each sample's previous trajectory step; the "
                               "training data did not carry it (needs_previous_step)")
        with torch.no_grad():
            out = runner.student(prev.x, prev.t)
        conn.set_valid_(prev.valid.to(out.device).repeat(out.shape[0] // prev.valid.shape[0]))

    def convert(self, student: nn.Module) -> nn.Module:
        """Enables every quantizer, forgets any sampling state, then :func:`qat.convert`."""
        for m in student.modules():
            if isinstance(m, Quantizer):
                m.enabled = True
        conn = self.connection(student)
        if conn is not None:
            conn.reset_sampling_state()
        return super().convert(student)
