"""Optimizer parameter groups for QALoRA students, with EfficientDM's scale-aware LoRA optimisation.

EfficientDM (He et al. 2024, Sec. 3.3, Eq. 8) wants the effective LoRA update of each layer to be proportional to
its weight quantization step, so that layers with large steps still flip integers:

    R = grad_{BA} L / mean(s_w)  roughly constant across layers.

The paper phrases it as multiplying the LoRA gradient by ``mean(s_w)``. Under Adam that does nothing (Adam
normalises gradient magnitudes), so the reference code scales the *learning rate* per layer instead:
``lr_LoRA(layer) = mean(s_w(layer)) / 2500``. :func:`param_groups` does the same with
``lr = lora_lr_scale * mean(s_w)`` (``lora_lr_scale = 1/2500 = 4e-4`` reproduces the reference), computed once
from the PTQ-initialised steps. :func:`scale_aware_gradient_hooks` gives the gradient-scaling form for SGD users.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from qat.nn.attention import QuantAttnProcessor
from qat.nn.qalora import qalora_layers
from qat.prepare import quant_layers

__all__ = ["mean_weight_step", "param_groups", "scale_aware_gradient_hooks"]


def mean_weight_step(layer: nn.Module) -> float:
    """``mean(s_w)`` of a QALoRA layer's base weight quantizer (over channels and groups)."""
    q = layer.get_base_layer().weight_quantizer
    return float(q.step.detach().abs().mean())


def param_groups(
    model: nn.Module,
    lora_lr: float = 4e-4,
    scale_aware: bool = True,
    weight_step_lr: float = 1e-6,
    act_step_lr: float = 5e-4,
    quantizer_weight_decay: float = 0.0,
    lora_weight_decay: float = 0.0,
    act_scale_aware: bool = False,
) -> list[dict[str, Any]]:
    """Parameter groups by role for ``torch.optim`` optimizers; each group has a ``name`` for logging.

    Args:
        model: a prepared, calibrated student (weight steps must be initialised for ``scale_aware``).
        lora_lr: with ``scale_aware`` the factor ``c`` in ``lr = c * mean(s_w)`` (EfficientDM: 1/2500); otherwise
            the LoRA learning rate itself.
        scale_aware: one group per QALoRA layer with ``lr = lora_lr * mean(s_w)``; else one LoRA group.
        weight_step_lr: learning rate of weight steps (and offsets) (EfficientDM: 1e-6).
        act_step_lr: learning rate of activation steps and offsets, temporal tables included (EfficientDM: 5e-4).
        quantizer_weight_decay: weight decay of quantizer parameters; 0 by default (the reference's AdamW default
            of 0.01 also decays the scales, which shrinks ranges for no reason).
        lora_weight_decay: weight decay of LoRA matrices.
        act_scale_aware: one group per activation quantizer whose steps get ``lr = act_step_lr * mean(|s_a|)``
            (a relative rate: Adam moves every parameter by about ``lr`` per update whatever its gradient, so one
            absolute rate is 16x larger relative to 8-bit steps than to 4-bit ones and wrecks 8-bit activation
            ranges). Zero-points are in integer units, already scale-free, and keep ``act_step_lr`` itself.
            Off by default: EfficientDM uses one absolute rate.

    Returns:
        groups ``{"name", "params", "lr", "weight_decay"}``; only parameters with ``requires_grad`` appear.
    """
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()

    def add(name: str, params: list[Tensor], lr: float, wd: float) -> None:
        params = [p for p in params if p.requires_grad and id(p) not in seen]
        if params:
            seen.update(id(p) for p in params)
            groups.append({"name": name, "params": params, "lr": lr, "weight_decay": wd})

    lora = qalora_layers(model)
    if scale_aware:
        for name, layer in lora.items():
            params = list(layer.lora_A.parameters()) + list(layer.lora_B.parameters())
            add(f"lora/{name}", params, lora_lr * mean_weight_step(layer), lora_weight_decay)
    else:
        params = [p for layer in lora.values() for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters())]
        add("lora", params, lora_lr, lora_weight_decay)

    weight_q, act_quantizers = [], {}
    for name, layer in quant_layers(model).items():
        if layer.weight_quantizer is not None:
            weight_q += list(layer.weight_quantizer.parameters())
        if layer.act_quantizer is not None:
            act_quantizers[f"{name}.act_quantizer"] = layer.act_quantizer
    for name, module in model.named_modules():
        if isinstance(module, QuantAttnProcessor):
            act_quantizers.update({f"{name}.{n}": q for n, q in module.named_children()})
    add("weight_quantizers", weight_q, weight_step_lr, quantizer_weight_decay)
    if act_scale_aware:
        for name, q in act_quantizers.items():
            step = getattr(q, "step", None)
            if isinstance(step, nn.Parameter) and step.requires_grad:
                add(f"act_step/{name}", [step], act_step_lr * float(step.detach().abs().mean()),
                    quantizer_weight_decay)
    add("act_quantizers", [p for q in act_quantizers.values() for p in q.parameters()], act_step_lr,
        quantizer_weight_decay)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    if rest:
        names = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
        raise ValueError(f"{len(rest)} trainable parameters belong to no group, e.g. {names[:3]}; freeze them or "
                         "extend param_groups")
    return groups


def scale_aware_gradient_hooks(model: nn.Module) -> list[RemovableHandle]:
    """The gradient-scaling form of Eq. 8 for SGD: ``grad(A), grad(B) *= mean(s_w)`` of the layer, every step.

    Use with plain SGD (without momentum normalisation); under Adam prefer ``param_groups(scale_aware=True)``.
    Returns the hook handles.
    """
    handles = []
    for layer in qalora_layers(model).values():
        for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters()):
            handles.append(p.register_hook(lambda g, lay=layer: g * mean_weight_step(lay)))
    return handles


def as_tensor_lr(groups: list[dict[str, Any]]) -> dict[str, float]:
    """``{group name: lr}``, for logging."""
    return {g["name"]: float(torch.as_tensor(g["lr"])) for g in groups}
