"""Model surgery: ``prepare`` swaps float layers for quantized ones by module-name patterns, ``convert`` finalises.

A :class:`QuantSpec` is an ordered list of :class:`LayerRule` (first match wins) plus ``exclude`` patterns. Patterns
are shell-style globs on fully qualified module names (``*`` also matches dots, so ``*.resnets.*.conv1`` matches
every ResNet ``conv1``), or regular expressions (full match) when prefixed with ``re:``.

Every pattern must match at least one module, and a pattern whose matches are all of unsupported types is an
error that names the pattern and the supported types: a silent zero-match is the classic QAT misconfiguration.

Supported layer types, first match wins: ``nn.Linear -> QuantLinear``, ``nn.Conv2d -> QuantConv2d``; attention
modules (anything with diffusers' ``set_processor``) for :attr:`QuantSpec.attention_patterns`.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from torch import nn

from qat.nn.attention import QuantAttnProcessor
from qat.nn.layers import QuantConv2d, QuantLinear
from qat.nn.qalora import add_qalora, merge_qalora, qalora_layers
from qat.quantizers.affine import AffineConfig
from qat.quantizers.base import Quantizer, QuantizerConfig

__all__ = ["LayerRule", "QuantSpec", "PrepareReport", "prepare", "convert", "quant_layers", "match", "summary"]

#: float type -> quantized type; "first match wins" (subclasses are matched by isinstance).
LAYER_MAPPING: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}


@dataclass
class LayerRule:
    """How the layers matching ``patterns`` are quantized.

    Args:
        patterns: module-name globs (or ``re:`` regexes).
        weight: weight quantizer config, or None to keep weights in full precision.
        act: input-activation quantizer config, or None for full-precision inputs.
        lora: add a QALoRA adapter (the spec's ``lora_rank``) to these layers.
        trainable: whether the quantizers' learned parameters (steps, offsets) are trained.
    """

    patterns: list[str]
    weight: QuantizerConfig | None = None
    act: QuantizerConfig | None = None
    lora: bool = False
    trainable: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.patterns, str):
            raise TypeError("LayerRule.patterns must be a list of patterns, not a string")
        if self.lora and self.weight is None:
            raise ValueError(f"rule {self.patterns}: lora needs a weight quantizer (QALoRA adds BA inside Q_w)")
        if self.lora and not isinstance(self.weight, AffineConfig):
            raise ValueError(f"rule {self.patterns}: lora needs an affine weight quantizer (QALoRA moves the integer "
                             f"codes of an affine grid), not {self.weight.name!r}")


@dataclass
class QuantSpec:
    """What ``prepare`` does to a model.

    Args:
        rules: ordered rules; a module takes the first rule that matches it.
        exclude: patterns of modules that stay in full precision even if a rule matches them.
        lora_rank: rank of QALoRA adapters (rules with ``lora=True``).
        lora_alpha: peft ``lora_alpha`` (scaling ``alpha / r``); None means ``lora_rank`` (scaling 1).
        attention_patterns: diffusers ``Attention`` modules whose matmul inputs are fake-quantized.
        attention_act: quantizer config for those matmul inputs (required with ``attention_patterns``).
    """

    rules: list[LayerRule]
    exclude: list[str] = field(default_factory=list)
    lora_rank: int = 32
    lora_alpha: float | None = None
    attention_patterns: list[str] = field(default_factory=list)
    attention_act: QuantizerConfig | None = None

    def __post_init__(self) -> None:
        if not self.rules:
            raise ValueError("QuantSpec needs at least one rule")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.attention_patterns and self.attention_act is None:
            raise ValueError("attention_patterns need attention_act (the matmul-input quantizer config)")


def match(name: str, pattern: str) -> bool:
    """True when module name ``name`` matches ``pattern`` (glob, or regex full match with a ``re:`` prefix)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _supported(module: nn.Module) -> bool:
    return any(isinstance(module, t) for t in LAYER_MAPPING) and not isinstance(module, (QuantLinear, QuantConv2d))


def _check_pattern(pattern: str, where: str, modules: dict[str, nn.Module], supported: set[str]) -> list[str]:
    """Names of supported modules matched by ``pattern``; raises on no match or on unsupported matches only."""
    hits = [n for n in modules if n and match(n, pattern)]
    if not hits:
        raise ValueError(f"{where}: pattern {pattern!r} matches no module of the model; "
                         f"module names look like {[n for n in modules if n][:5]}")
    good = [n for n in hits if n in supported]
    if not good:
        types = sorted({type(modules[n]).__name__ for n in hits})
        raise ValueError(f"{where}: pattern {pattern!r} matches only unsupported module types {types}; "
                         f"supported: {[t.__name__ for t in LAYER_MAPPING]}")
    return good


@dataclass
class PrepareReport:
    """What ``prepare`` did: one row per quantized layer, plus the names left in full precision."""

    rows: list[tuple[str, str, str, str, int, bool]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """``{"W4A4+LoRA": n, "W8A8": m, ...}`` over the quantized layers."""
        out: dict[str, int] = {}
        for _, _, w, a, r, _ in self.rows:
            key = f"W{w}A{a}" + ("+LoRA" if r else "")
            out[key] = out.get(key, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [f"{'module':<60} {'type':<8} {'W':>3} {'A':>3} {'LoRA':>5} {'train':>5}"]
        for name, kind, w, a, r, train in self.rows:
            lines.append(f"{name:<60} {kind:<8} {w:>3} {a:>3} {r or '-':>5} {'yes' if train else 'no':>5}")
        lines.append(f"quantized: {len(self.rows)} {self.counts()}; full precision (excluded): {len(self.excluded)}"
                     + (f"; quantized attention matmuls: {len(self.attention)}" if self.attention else ""))
        return "\n".join(lines)


def prepare(model: nn.Module, spec: QuantSpec) -> PrepareReport:
    """Swaps matching ``nn.Linear`` / ``nn.Conv2d`` for quantized layers, adds QALoRA, freezes the rest. In place.

    After ``prepare``: every float parameter is frozen; LoRA parameters and the quantizer parameters of
    ``trainable`` rules require gradients. Quantizers still need initialisation (:func:`qat.calibrate`).

    Raises:
        ValueError: a pattern matches nothing, or only unsupported layer types (the message names the pattern).
    """
    modules = dict(model.named_modules())
    supported = {n for n, m in modules.items() if n and _supported(m)}
    excluded: set[str] = set()
    for p in spec.exclude:
        hits = [n for n in modules if n and match(n, p)]
        if not hits:
            raise ValueError(f"exclude: pattern {p!r} matches no module of the model")
        excluded.update(hits)

    chosen: dict[str, LayerRule] = {}
    for i, rule in enumerate(spec.rules):
        for p in rule.patterns:
            for name in _check_pattern(p, f"rules[{i}]", modules, supported):
                if name not in excluded:
                    chosen.setdefault(name, rule)

    report = PrepareReport(excluded=sorted(n for n in excluded if n in supported))
    for param in model.parameters():
        param.requires_grad_(False)
    lora_targets: list[str] = []
    for name, rule in chosen.items():
        float_mod = modules[name]
        qcls = next(q for f, q in LAYER_MAPPING.items() if isinstance(float_mod, f))
        qmod = qcls.from_float(float_mod, rule.weight, rule.act, name=name)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, qmod)
        if rule.lora:
            lora_targets.append(name)
        w = "fp" if rule.weight is None else str(rule.weight.n_bits)
        a = "fp" if rule.act is None else str(rule.act.n_bits)
        report.rows.append((name, qcls.__name__.replace("Quant", ""), w, a, spec.lora_rank if rule.lora else 0,
                            rule.trainable))

    for p in spec.attention_patterns:
        hits = [n for n, m in model.named_modules() if n and match(n, p) and hasattr(m, "set_processor")]
        if not hits:
            raise ValueError(f"attention_patterns: pattern {p!r} matches no diffusers Attention module")
        for name in hits:
            attn = model.get_submodule(name)
            device = next(attn.parameters()).device  # the processor's quantizers live with the attention weights
            attn.set_processor(QuantAttnProcessor(spec.attention_act).to(device))
            report.attention.append(name)

    if lora_targets:
        add_qalora(model, lora_targets, r=spec.lora_rank, lora_alpha=spec.lora_alpha)
    # peft froze everything but the adapters: re-enable the quantizer parameters of trainable rules.
    trainable_layers = {n for n, r in chosen.items() if r.trainable}
    for name, layer in quant_layers(model).items():
        for q in (layer.weight_quantizer, layer.act_quantizer):
            if q is not None:
                q.requires_grad_(_base_name(name) in trainable_layers)
    for name in report.attention:
        model.get_submodule(name).processor.requires_grad_(True)
    rows = {r[0]: r for r in report.rows}
    report.rows = [rows[n] for n in modules if n in rows]  # model order
    return report


def _base_name(name: str) -> str:
    """``a.b.base_layer`` -> ``a.b`` (peft wraps quantized layers in place)."""
    return name[: -len(".base_layer")] if name.endswith(".base_layer") else name


def quant_layers(model: nn.Module) -> dict[str, QuantLinear | QuantConv2d]:
    """Name -> quantized layer (names of peft-wrapped layers end in ``.base_layer``)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))
            and (m.weight_quantizer is not None or m.act_quantizer is not None)}


def convert(model: nn.Module) -> nn.Module:
    """Finalises a trained student, in place: merges QALoRA into the integer weights and drops the peft wrappers.

    The result keeps the float model's state-dict keys plus ``weight_quantizer.*`` / ``act_quantizer.*``; every
    quantized weight lies on its integer grid (``W = s_w (W_int - z_w)``), so export can store ``W_int`` exactly.
    Nothing is trainable afterwards.
    """
    merge_qalora(model)
    model.requires_grad_(False)
    return model


def summary(model: nn.Module) -> str:
    """A table of the quantized layers of a prepared model: bits, granularity, LoRA rank, initialised."""
    lora = {n: m for n, m in qalora_layers(model).items()}
    lines = [f"{'module':<60} {'W':>3} {'A':>3} {'w-gran':>8} {'LoRA':>5} {'init':>5}"]
    for name, layer in quant_layers(model).items():
        base = _base_name(name)
        wq: Quantizer | None = layer.weight_quantizer
        aq: Quantizer | None = layer.act_quantizer
        ready = all(bool(q.initialized) for q in (wq, aq) if q is not None)
        r = lora[base].r.get("default", 0) if base in lora else 0
        gran = getattr(wq.config, "granularity", "-") if wq else "-"
        lines.append(f"{base:<60} {wq.config.n_bits if wq else 'fp':>3} {aq.config.n_bits if aq else 'fp':>3} "
                     f"{gran:>8} {r or '-':>5} {'yes' if ready else 'no':>5}")
    return "\n".join(lines)
