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
from qat.quantizers.affine import AffineQuantizer
from qat.ste import fake_quantize_lowrank_ste

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
        # Nothing weight-sized in float32 is kept for backward (B A and the quantizer's input would be one per
        # layer, more than a float LoRA step keeps): compiled, the low-rank node keeps int8 codes; eagerly, and in
        # the compiled fallback, the weight is recomputed in backward (one rank-r product and an elementwise pass).
        if torch.compiler.is_compiling():
            # One node that keeps a small integer per weight element instead of recomputing peft's product B A in
            # backward (a weight-sized float32 tensor written and read again per layer; for k x k convolutions a
            # cuDNN convolution with layout conversions): qat.ste.fake_quantize_lowrank_ste. Other layouts take a
            # checkpoint region, which a compiled graph handles natively.
            lowrank = self._lowrank_inputs()
            if lowrank is not None:
                weight = fake_quantize_lowrank_ste(*lowrank)
            else:
                weight = checkpoint(self._quantized_weight, use_reentrant=False)
        else:  # eager: a plain autograd node, without torch.utils.checkpoint's per-call bookkeeping
            slots = [(m, n) for m, n in self._weight_inputs() if m._parameters[n].requires_grad]
            if slots:
                weight = _RecomputedWeight.apply(self, slots, *(m._parameters[n] for m, n in slots))
            else:
                weight = self._quantized_weight()
        return base(x, quantized_weight=weight)

    def _lowrank_inputs(self) -> tuple | None:
        """Arguments of :func:`qat.ste.fake_quantize_lowrank_ste` for this layer, or None where it does not apply
        (several or no active adapters, DoRA, a transposed or grouped layout, a trained base weight, a disabled,
        composite or per-group weight quantizer)."""
        base = self.get_base_layer()
        q = base.weight_quantizer
        names = [n for n in self.active_adapters if n in self.lora_A]
        if (len(names) != 1 or not isinstance(q, AffineQuantizer) or not q.enabled or not q.fused
                or base.weight.requires_grad
                or q.config.granularity == "group" or (q.config.granularity == "channel" and q.channel_axis != 0)
                or getattr(self, "fan_in_fan_out", False) or getattr(base, "groups", 1) != 1
                or self.use_dora.get(names[0], False) or names[0] in getattr(self, "lora_variant", {})):
            return None
        _, step, zero = q.broadcast_params(base.weight)
        if step.numel() not in (1, base.weight.shape[0]):  # one step per tensor or per output channel only
            return None
        name = names[0]
        with torch.no_grad():  # the layer's own product: forward values equal the checkpointed path's
            delta = self.get_delta_weight(name).float()
        return (base.weight, delta, self.lora_B[name].weight, self.lora_A[name].weight, step, zero,
                float(self.scaling[name]), q.q_min, q.q_max)

    def _quantized_weight(self) -> Tensor:
        return self.get_base_layer().quantized_weight(self.delta_weight())

    def _weight_inputs(self) -> list[tuple[nn.Module, str]]:
        """``(module, parameter name)`` of every parameter ``_quantized_weight`` reads: the base weight, the
        adapters, the weight quantizer's."""
        base = self.get_base_layer()
        owners = [*self.lora_A.modules(), *self.lora_B.modules()]
        if base.weight_quantizer is not None:
            owners += list(base.weight_quantizer.modules())
        return [(base, "weight")] + [(m, n) for m in owners for n, p in m._parameters.items() if p is not None]

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


class _RecomputedWeight(torch.autograd.Function):
    """``Q_w(W + s B A)`` as one autograd node that keeps nothing: backward recomputes the weight under autograd.

    Equivalent to ``torch.utils.checkpoint`` of :meth:`_QALoRAMixin._quantized_weight` (tested), at a fraction of
    its per-call host cost, which matters at the small batches of the EfficientDM recipe (hundreds of layers per
    step). ``slots`` name the ``(module, parameter)`` pairs the weight depends on and ``params`` are those
    parameters. Backward recomputes from detached aliases swapped into the slots, so that tensor hooks on the
    parameters (``qat.scale_aware_gradient_hooks``) run once, on the gradient this node returns. Like
    checkpointing, it assumes the parameters do not change between forward and backward.
    """

    @staticmethod
    def forward(ctx, layer: _QALoRAMixin, slots: list[tuple[nn.Module, str]],  # type: ignore[override]
                *params: Tensor) -> Tensor:
        ctx.layer, ctx.slots, ctx.params = layer, slots, params  # parameters live anyway: no activation memory
        # Backward runs outside the forward's autocast region; the recomputation re-enters it (as
        # torch.utils.checkpoint does), so that peft's product B A and the codes are the forward's.
        device = params[0].device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        with torch.no_grad():
            return layer._quantized_weight()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        aliases = [p.detach().requires_grad_() for p in ctx.params]
        try:
            for (module, name), alias in zip(ctx.slots, aliases):
                module._parameters[name] = alias
            device, enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                weight = ctx.layer._quantized_weight()
        finally:
            for (module, name), param in zip(ctx.slots, ctx.params):
                module._parameters[name] = param
        grads = torch.autograd.grad(weight, aliases, grad, allow_unused=True)
        return (None, None, *grads)


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
