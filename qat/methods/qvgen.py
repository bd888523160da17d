"""QVGen: W4A4 / W3A3 QAT with an auxiliary low-rank branch that rank decay removes before deployment.

Paper: Y. Huang, R. Gong, J. Liu, Y. Ding, C. Lv, H. Qin, J. Zhang, "QVGen: Pushing the Limit of Quantized Video
Generative Models", ICLR 2026, arXiv:2505.11497. Reference code: ModelTC/QVGen@198e761 (dossier Sec. 1).

Student:
    * every linear and conv of the model (the family's modulation linears included, as the code by default):
      per-output-channel asymmetric LSQ+ weights (learned step and zero-point, MSE-searched range, LSQ gradient
      scale) and per-token dynamic asymmetric activations with learnable clipping ratios per timestep group
      (:class:`qat.quantizers.DynamicTokenQuantizer`, 50 groups);
    * those layers carry the auxiliary branch ``Phi = L R`` (rank ``r0 = 32``) added to the dequantized weight and
      fed by the quantized activation, initialised from the SVD of ``W - Q_w(W)`` (:mod:`qat.nn.auxiliary`):
      ``y = Q_a(x) (Q_w(W) + (gamma L) R)^T + b``;
    * the family's edge layers: W8A8 static (``edges``); UNet shortcut and downsample convs: full precision
      (EfficientDM's map, so that the methods compare on the same layers); attention matmuls and norms: full
      precision;
    * every weight, bias, norm, quantizer parameter and ``L``, ``R`` is trained (full QAT, AdamW).

Rank decay (Sec. 4.2): the first ``(1 - tail)`` of training is cut into phases; in a phase of rank ``r`` the last
``r - r'`` directions (``r' = floor((1 - lambda) r)``, the smallest singular values) are scaled by a factor ``u``
annealed from 1 to 0 (cosine), and at the phase's end the ``r'`` survivors are re-decomposed by SVD; ranks
``32, 16, 8, 4, 2, 1`` then 0 for ``lambda = 1/2`` (the code's six phases). ``u`` reaches 0 on the last step of each
phase, so truncation never changes the output and ``Phi`` is exactly zero from the last step of the schedule on.
:func:`rank_schedule` is the schedule as a pure function of the step. ``convert`` removes ``Phi``: the exported
student is a plain W4A4 model.

Loss: the teacher-output MSE of the run (the code's ``--use_teacher`` KD on its own trajectories, data-free here).
``aux_rank: 0`` is the paper's LSQ QAT baseline: the same quantizers and training without ``Phi``.

Deviations from the reference code:
    * data-free: the teacher's own trajectories instead of 16K captioned videos;
    * the re-SVD at a phase boundary is a change of basis held in buffers (``Phi = L A diag(gamma) B R``); ``L``
      and ``R`` are never written in place, so their optimizer state stays valid and ZeRO's master copies need no
      edit (the code rewrote bf16 parameters under DeepSpeed and kept the Adam moments of the old basis);
    * the activations' timestep group is ``floor(t G / T)`` in training and sampling alike (the code's training
      ``t mod G`` and sampling countdown disagree); activation ranges always contain 0 (integer zero-points);
    * edge layers W8A8 instead of W4A4; UNet layers (convs) get the branch too (the paper has linears only);
    * no warm-up phase training only ``L``, ``R`` (the shipped scripts set it to 0); ``tail`` adds a ``Phi``-free
      end of training (0 by default, as the code).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qat.calibration import initialize_weight_quantizers
from qat.checks import at_least, one_of, raise_problems
from qat.families import FAMILY_RULES, family_rules
from qat.methods.base import Calibration, Method, register_method
from qat.nn.auxiliary import AuxLowRank, add_aux, aux_layers, remove_aux
from qat.prepare import LayerRule, QuantSpec, convert, prepare, quant_layers
from qat.quantizers import DynamicTokenConfig, LSQConfig, UniformConfig
from qat.quantizers.base import Quantizer
from qat.quantizers.dynamic import DynamicTokenQuantizer

__all__ = ["QVGenConfig", "QVGen", "qvgen_spec", "decay_ranks", "rank_schedule", "RankStep"]

EDGE_MODES = ("w8a8", "fp", "quant")
MODULATION_MODES = ("quant", "w8a8", "fp")
ANNEALING = ("cosine", "linear")


@dataclass
class QVGenConfig:
    """Hyperparameters of the QVGen student and its training (defaults: the paper's W4A4 recipe).

    Args:
        weight_bits / act_bits: bits of the main layers (2..8; the paper: 4/4 and 3/3).
        aux_rank: ``r0``, the initial rank of ``Phi`` (paper: 32); 0: no ``Phi`` (the LSQ QAT baseline).
        decay_fraction: ``lambda``, the share of the rank decayed per phase (paper: 1/2).
        annealing: the factor ``u`` within a phase: ``cosine`` (paper) or ``linear``.
        tail: fraction of ``trainer.max_steps`` trained after ``Phi`` is gone (paper: 0).
        clip_groups: timestep groups of the activations' clipping ratios (paper: 50).
        clip_init: their initial ratio (paper: 0.95).
        num_train_timesteps: the teacher's training timestep range (1000 for every diffusers family here).
        family: layer roles to apply (:mod:`qat.families`); ``auto``: the teacher's family.
        edges: the family's edge layers: ``w8a8`` (static, as EfficientDM), ``fp`` or ``quant`` (like the rest).
        modulation: the family's modulation linears: ``quant`` (the code's default), ``w8a8`` or ``fp`` (the
            code's ``--wo_quant_adaln``).
        extra_exclude: more module-name patterns kept in full precision.
        lr: AdamW learning rate of the weights, biases and norms (paper: 3e-5).
        weight_quantizer_lr: of the weight steps and zero-points (paper: 3e-5).
        aux_lr: of ``L`` and ``R`` (paper: 3e-5).
        clip_lr: of the activations' clipping logits (paper: 1e-2).
        weight_decay: AdamW weight decay of the weights and ``L``, ``R`` (paper: 1e-4); quantizer parameters none.
    """

    weight_bits: int = 4
    act_bits: int = 4
    aux_rank: int = 32
    decay_fraction: float = 0.5
    annealing: str = "cosine"
    tail: float = 0.0
    clip_groups: int = 50
    clip_init: float = 0.95
    num_train_timesteps: int = 1000
    family: str = "auto"
    edges: str = "w8a8"
    modulation: str = "quant"
    extra_exclude: list[str] = field(default_factory=list)
    lr: float = 3e-5
    weight_quantizer_lr: float = 3e-5
    aux_lr: float = 3e-5
    clip_lr: float = 1e-2
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        raise_problems(self.problems())

    def problems(self) -> list[tuple[str, str]]:
        """``(field, message)`` for every invalid field."""
        out = []
        for key in ("weight_bits", "act_bits"):
            if not 2 <= getattr(self, key) <= 8:
                out.append((key, f"must be in [2, 8], got {getattr(self, key)}"))
        out += at_least("aux_rank", self.aux_rank, 0)
        if not 0.0 < self.decay_fraction <= 1.0:
            out.append(("decay_fraction", f"must be in (0, 1], got {self.decay_fraction}"))
        if not 0.0 <= self.tail < 1.0:
            out.append(("tail", f"must be in [0, 1), got {self.tail}"))
        out += one_of("annealing", self.annealing, ANNEALING)
        out += at_least("clip_groups", self.clip_groups, 1) + at_least("num_train_timesteps",
                                                                       self.num_train_timesteps, 1)
        if not 0.0 < self.clip_init < 1.0:
            out.append(("clip_init", f"must be in (0, 1), got {self.clip_init}"))
        out += one_of("family", self.family, [*sorted(FAMILY_RULES), "auto"])
        out += one_of("edges", self.edges, EDGE_MODES) + one_of("modulation", self.modulation, MODULATION_MODES)
        for key in ("lr", "weight_quantizer_lr", "aux_lr", "clip_lr", "weight_decay"):
            out += at_least(key, getattr(self, key), 0.0)
        return out


# -- the rank-decay schedule -----------------------------------------------------------------------------------------
def decay_ranks(rank: int, decay_fraction: float) -> list[int]:
    """The rank of each phase, ``[r0, r1, ...]`` down to the last non-zero one: ``r_{i+1} = floor((1 - lambda)
    r_i)`` (at least one direction less per phase). ``decay_ranks(32, 0.5) == [32, 16, 8, 4, 2, 1]``."""
    ranks = []
    r = rank
    while r > 0:
        ranks.append(r)
        r = min(r - 1, math.floor((1.0 - decay_fraction) * r + 1e-9))
    return ranks


@dataclass(frozen=True)
class RankStep:
    """The schedule at one step: ``phase`` (``len(ranks)`` once ``Phi`` is gone), its ``rank``, the directions that
    ``keep`` full weight, and the factor ``u`` of the others; ``gamma = [1] * keep + [u] * (rank - keep)``."""

    phase: int
    rank: int
    keep: int
    u: float


def phase_starts(decay_steps: int, phases: int) -> list[int]:
    """The first step of each phase and, last, ``decay_steps``: ``round(i decay_steps / phases)``."""
    return [round(i * decay_steps / phases) for i in range(phases + 1)]


def rank_schedule(step: int, decay_steps: int, ranks: list[int], annealing: str = "cosine") -> RankStep:
    """:class:`RankStep` at training step ``step`` (0-based) of a decay over ``decay_steps`` steps.

    In phase ``i`` (steps ``[b_i, b_{i+1})``), with ``f = (step - b_i + 1) / (b_{i+1} - b_i)`` in ``(0, 1]``:
    ``u = (1 + cos(pi f)) / 2`` (cosine) or ``1 - f`` (linear), so ``u = 0`` on the phase's last step.
    """
    n = len(ranks)
    if n == 0 or step >= decay_steps:
        return RankStep(phase=n, rank=0, keep=0, u=0.0)
    starts = phase_starts(decay_steps, n)
    phase = max(i for i in range(n) if starts[i] <= step)
    f = (step - starts[phase] + 1) / (starts[phase + 1] - starts[phase])
    u = (1.0 + math.cos(math.pi * f)) / 2.0 if annealing == "cosine" else 1.0 - f
    keep = ranks[phase + 1] if phase + 1 < n else 0
    return RankStep(phase=phase, rank=ranks[phase], keep=keep, u=max(0.0, u))


def qvgen_spec(cfg: QVGenConfig, family: str) -> QuantSpec:
    """The :class:`QuantSpec` of the QVGen student (before the branches are added) for the resolved ``family``."""
    fam = family_rules(family)
    exclude = list(fam.shortcuts) + list(fam.downsamplers) + list(cfg.extra_exclude)
    special: list[str] = []
    if cfg.edges == "w8a8":
        special += fam.edges
    elif cfg.edges == "fp":
        exclude += fam.edges
    if cfg.modulation == "w8a8":
        special += fam.modulation
    elif cfg.modulation == "fp":
        exclude += fam.modulation
    weight = LSQConfig(n_bits=cfg.weight_bits, granularity="channel", init="mse", learn_offset=True, grad_scale=True)
    act = DynamicTokenConfig(n_bits=cfg.act_bits, clip_groups=cfg.clip_groups, clip_init=cfg.clip_init,
                             num_train_timesteps=cfg.num_train_timesteps)
    rules = []
    if special:
        rules.append(LayerRule(special, weight=UniformConfig(n_bits=8, granularity="channel", init="minmax"),
                               act=UniformConfig(n_bits=8, init="mse"), trainable=False))
    rules.append(LayerRule(["*"], weight=weight, act=act))
    return QuantSpec(rules=rules, exclude=exclude)


@register_method("qvgen")
class QVGen(Method):
    """QVGen on the method contract (:mod:`qat.methods.base`); see the module docstring."""

    config_class = QVGenConfig
    config: QVGenConfig

    def __init__(self, config: QVGenConfig) -> None:
        super().__init__(config)
        self.ranks = decay_ranks(config.aux_rank, config.decay_fraction) if config.aux_rank > 0 else []
        self._aux: tuple[int, list[AuxLowRank]] | None = None  # (id of the student, its branches), walked once

    def problems_with(self, run: Any) -> list[tuple[str, str]]:
        steps = self.decay_steps(run.trainer.max_steps)
        if self.ranks and steps < len(self.ranks):
            return [("qvgen.tail", f"the rank decay has {len(self.ranks)} phases but only {steps} steps "
                     f"(trainer.max_steps={run.trainer.max_steps}, tail={self.config.tail}): raise max_steps or "
                     "lower tail / aux_rank")]
        return []

    def decay_steps(self, max_steps: int) -> int:
        """Steps over which ``Phi`` decays (the rest of training has none)."""
        return round((1.0 - self.config.tail) * max_steps)

    def describe(self) -> str:
        c = self.config
        acts = f"per-token dynamic activations ({c.clip_groups} clip groups)"
        if not self.ranks:
            return f"W{c.weight_bits}A{c.act_bits} LSQ QAT, {acts}, no auxiliary branch"
        return (f"W{c.weight_bits}A{c.act_bits}, {acts}, auxiliary rank {c.aux_rank} decayed to 0 over "
                f"{len(self.ranks)} phases (removed before export)")

    # -- student -----------------------------------------------------------------------------------------------------
    def build_student(self, denoiser: nn.Module, family: str) -> tuple[nn.Module, str]:
        """A deep copy of ``denoiser`` with W/A-bit layers and their branches, fully trainable."""
        c = self.config
        self.family = family if c.family == "auto" else c.family
        student = copy.deepcopy(denoiser)
        report = prepare(student, qvgen_spec(c, self.family))
        added = 0
        if self.ranks:  # the main layers (per-token activations), not the W8A8 edges
            names = [n for n, layer in quant_layers(student).items()
                     if isinstance(layer.act_quantizer, DynamicTokenQuantizer)]
            added = add_aux(student, names, c.aux_rank)
        student.requires_grad_(True)  # full QAT: latent weights, biases, norms, quantizer parameters, L and R
        self._aux = None
        ranks = " -> ".join(map(str, [*self.ranks, 0])) if self.ranks else "none (LSQ QAT baseline)"
        return student, (f"{report}\nfull QAT: every weight, bias and norm is trained (the quantizers' 'train' "
                         f"column above is about their own parameters)\nauxiliary branches: {added} layers, ranks per "
                         f"phase {ranks}")

    def initialize(self, student: nn.Module, calibration: Calibration) -> None:
        """Weight ranges (MSE search), ``Phi`` from ``W - Q_w(W)``, then the W8A8 edges' activation ranges (their
        calibration pass runs the student with its branches)."""
        initialize_weight_quantizers(student)
        with torch.no_grad():
            for layer in aux_layers(student).values():
                layer.aux.initialize_(layer.quantization_error())
        super().initialize(student, calibration)

    def param_groups(self, student: nn.Module) -> list[dict[str, Any]]:
        c = self.config
        clips, wq, aux, quantizer_params = [], [], [], set()
        for m in student.modules():
            if isinstance(m, Quantizer):
                params = [p for p in m.parameters() if p.requires_grad]
                (clips if isinstance(m, DynamicTokenQuantizer) else wq).extend(params)
                quantizer_params.update(id(p) for p in m.parameters())
            elif isinstance(m, AuxLowRank):
                aux.extend(p for p in m.parameters() if p.requires_grad)
        taken = quantizer_params | {id(p) for p in aux}
        weights = [p for p in student.parameters() if p.requires_grad and id(p) not in taken]
        groups = [("weights", weights, c.lr, c.weight_decay), ("weight_quantizers", wq, c.weight_quantizer_lr, 0.0),
                  ("aux_lowrank", aux, c.aux_lr, c.weight_decay), ("act_clips", clips, c.clip_lr, 0.0)]
        return [{"name": n, "params": p, "lr": lr, "weight_decay": wd} for n, p, lr, wd in groups if p]

    # -- schedule ----------------------------------------------------------------------------------------------------
    def _branches(self, student: nn.Module) -> list[AuxLowRank]:
        if self._aux is None or self._aux[0] != id(student):
            self._aux = (id(student), [layer.aux for layer in aux_layers(student).values()])
        return self._aux[1]

    def on_train_step(self, student: nn.Module, step: int, max_steps: int) -> dict[str, float]:
        """Rank decay at ``step``: re-decomposes the survivors of every phase that ended since the branches' last
        phase (their ``phase`` buffer: a resumed run never repeats or skips one), then sets ``gamma``."""
        branches = self._branches(student)
        if not branches:
            return {}
        now = rank_schedule(step, self.decay_steps(max_steps), self.ranks, self.config.annealing)
        gamma = torch.zeros(self.config.aux_rank)
        gamma[:now.keep] = 1.0
        gamma[now.keep:now.rank] = now.u
        gamma = gamma.to(branches[0].gamma.device)
        for aux in branches:
            while int(aux.phase) < now.phase:
                nxt = int(aux.phase) + 1
                aux.rebasis_(self.ranks[nxt] if nxt < len(self.ranks) else 0)
            aux.gamma.copy_(gamma)
        return {"aux_rank": float(now.rank), "aux_decay_factor": now.u}

    def convert(self, student: nn.Module) -> nn.Module:
        """Removes ``Phi`` from every layer (warning if it was not fully decayed) and finalises the student."""
        with torch.no_grad():
            live = [n for n, layer in aux_layers(student).items() if layer.aux.effective_rank() > 0 and bool(
                layer.aux.initialized) and float(layer.aux.delta().abs().max()) > 0]
        if live:
            warnings.warn(f"QVGen.convert: the auxiliary branch of {len(live)} layers (e.g. {live[0]!r}) had not "
                          "decayed to zero (training stopped before the end of the rank-decay schedule); it is "
                          "removed and the exported student differs from the trained one", stacklevel=2)
        remove_aux(student)
        return convert(student)
