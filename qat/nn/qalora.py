"""QALoRA (EfficientDM, He et al. 2024, arXiv:2310.03270, Eq. 6) as custom peft LoRA layers.

    y = f(Q_a(x), Q_w(W + s * B A))                                                          (Eq. 6)

where ``s = lora_alpha / r`` is peft's ``scaling`` (EfficientDM uses ``s = 1``) and ``Q_w`` keeps the integer
weights of the PTQ initialisation: with ``W_int = clip(round(W / s_w) + z_w)``

    Q_w(W + s B A) := s_w * (clip(W_int + round(s B A / s_w)) - z_w)                            (EfficientDM 3.1)

so the adapter moves the stored integers, and merging is exact integer addition (:meth:`QALoRALinear.merge`).
With peft's default init (A Kaiming-uniform, B = 0) the layer equals the PTQ layer exactly.

The layers are registered with peft through ``LoraConfig._register_custom_module`` and injected with
``peft.inject_adapter_in_model`` (:func:`add_qalora`), so ``lora_A`` / ``lora_B`` / ``scaling`` are peft's own.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import layer as lora_layer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from qat.nn.layers import QuantConv2d, QuantLinear

__all__ = ["QALoRALinear", "QALoRAConv2d", "QALORA_LAYERS", "add_qalora", "qalora_layers", "merge_qalora"]


class _QALoRAMixin:
    """Forward and merge shared by the linear and conv variants."""

    def delta_weight(self) -> Tensor | None:
        """``sum_adapters scaling * B A`` in the base weight's layout (float32), or None when no adapter is active."""
        delta = None
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            d = self.get_delta_weight(name).float()
            delta = d if delta is None else delta + d
        return delta

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        base = self.get_base_layer()
        if self.disable_adapters or self.merged:
            return base(x)
        if not torch.is_grad_enabled():
            return base(x, weight_delta=self.delta_weight())
        # Recomputed in backward (one rank-r matmul and an elementwise pass) rather than keeping B A and its
        # quantizer inputs: those are weight-sized float32 tensors per layer, more than a float LoRA step keeps.
        weight = checkpoint(self._quantized_weight, use_reentrant=False)
        return base(x, quantized_weight=weight)

    def _quantized_weight(self) -> Tensor:
        return self.get_base_layer().quantized_weight(self.delta_weight())

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merges the adapters into the integer weights: ``W <- s_w (clip(W_int + round(s B A / s_w)) - z_w)``.

        The merged weight lies on the quantization grid, so ``Q_w(W)`` reproduces the unmerged forward exactly.
        """
        adapter_names = lora_layer.check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        delta = None
        for name in adapter_names:
            d = self.get_delta_weight(name).float()
            delta = d if delta is None else delta + d
        q = base.weight_quantizer
        merged = base.weight.float() + delta if q is None or not q.enabled else q.dequantize(
            q.integer_codes(base.weight, delta))
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"non-finite values in the merged weight of {type(base).__name__}")
        base.weight.data = merged.to(base.weight.dtype)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        raise RuntimeError("a QALoRA merge happens in the integer domain (with clipping) and cannot be undone; "
                           "reload the checkpoint saved before merging")


class QALoRALinear(_QALoRAMixin, lora_layer.Linear):
    """peft LoRA layer for :class:`~qat.nn.layers.QuantLinear` implementing QALoRA (Eq. 6)."""


class QALoRAConv2d(_QALoRAMixin, lora_layer.Conv2d):
    """peft LoRA layer for :class:`~qat.nn.layers.QuantConv2d` implementing QALoRA (Eq. 6).

    ``lora_A`` is a ``k x k`` conv ``C_in -> r`` with the base stride and padding, ``lora_B`` a ``1 x 1`` conv
    ``r -> C_out`` (peft's layout, the same as EfficientDM's).
    """

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().update_layer(adapter_name, *args, **kwargs)
        # peft builds lora_A / lora_B with type(base_layer); the adapters themselves are plain float convs.
        for branch in (self.lora_A, self.lora_B):
            if isinstance(branch[adapter_name], QuantConv2d):
                branch[adapter_name] = branch[adapter_name].to_float()


#: base quantized layer type -> QALoRA layer type, registered with peft
QALORA_LAYERS: dict[type[nn.Module], type[nn.Module]] = {QuantLinear: QALoRALinear, QuantConv2d: QALoRAConv2d}


def add_qalora(model: nn.Module, module_names: list[str], r: int = 32, lora_alpha: float | None = None,
               init_lora_weights: bool | str = True) -> nn.Module:
    """Injects QALoRA adapters (peft) into the quantized layers named ``module_names`` (exact names), in place.

    Args:
        model: a model already prepared with :func:`qat.prepare`.
        module_names: fully qualified names of ``QuantLinear`` / ``QuantConv2d`` modules.
        r: LoRA rank (EfficientDM: 32).
        lora_alpha: peft's alpha; ``scaling = alpha / r``. Default ``r`` (scaling 1, as EfficientDM).
        init_lora_weights: peft's init option (``True``: A Kaiming-uniform, B zeros).

    Returns:
        ``model`` (mutated): each target now is a peft layer whose ``base_layer`` is the quantized layer.
    """
    if not module_names:
        raise ValueError("add_qalora: no module names given")
    pattern = "^(" + "|".join(re.escape(n) for n in module_names) + ")$"
    config = LoraConfig(r=r, lora_alpha=r if lora_alpha is None else lora_alpha, lora_dropout=0.0,
                        target_modules=pattern, init_lora_weights=init_lora_weights, bias="none")
    config._register_custom_module(QALORA_LAYERS)
    # peft freezes every non-adapter parameter; callers re-enable what they train (qat.prepare does).
    return inject_adapter_in_model(config, model)


def qalora_layers(model: nn.Module) -> dict[str, _QALoRAMixin]:
    """Name -> QALoRA layer for every QALoRA layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _QALoRAMixin)}


def merge_qalora(model: nn.Module) -> int:
    """Merges every QALoRA layer in the integer domain and replaces it with its base quantized layer.

    Returns:
        the number of merged layers. Afterwards the model has the float model's state-dict keys plus the
        quantizer keys, and no LoRA keys.
    """
    layers = qalora_layers(model)
    for name, layer in layers.items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return len(layers)
