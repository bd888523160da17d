"""Fake quantization of the attention matmul inputs through a diffusers attention processor.

    S = Q_q(q) Q_k(k)^T / sqrt(d),   P = softmax(S),   o = Q_p(P) Q_v(v)

``q, k, v`` are the outputs of ``to_q / to_k / to_v`` (which are themselves quantized linears when selected), and
``P`` the softmax output, quantized with an unsigned quantizer (it lies in [0, 1]). The processor is an
``nn.Module``, so diffusers' ``Attention.set_processor`` registers it as the child ``processor`` and its quantizers
appear in the state dict as ``...attn1.processor.{q,k,v,probs}_quantizer.*`` (new keys only). It is exportable
(:mod:`qat.nn.exportable`, kind ``quant_attention``): its four quantizers' tables are stored as trained.

EfficientDM leaves these matmuls in full precision; this is an option for methods and users that quantize them
(e.g. W4A4 deployments with integer attention).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from qat.nn.exportable import ExportTensorError, register_exportable
from qat.quantizers.affine import AffineConfig
from qat.quantizers.base import Quantizer, QuantizerConfig, build_quantizer, config_from_entry, quantizer_entry

_PARTS = ("q", "k", "v", "probs")

__all__ = ["QuantAttnProcessor"]


@register_exportable("quant_attention")
class QuantAttnProcessor(nn.Module):
    """Attention processor for diffusers ``Attention`` modules with fake-quantized matmul inputs.

    Computes attention explicitly (no fused SDPA) so that each operand can be fake-quantized; the result equals
    diffusers' ``AttnProcessor`` when the quantizers are disabled.

    Args:
        config: quantizer config for ``q``, ``k`` and ``v`` (per tensor).
        probs_config: quantizer config for the softmax output; defaults to ``config`` with ``signed=False``.
    """

    def __init__(self, config: QuantizerConfig, probs_config: QuantizerConfig | None = None) -> None:
        super().__init__()
        if not isinstance(config, AffineConfig) or not isinstance(probs_config, (AffineConfig, type(None))):
            raise ValueError("attention matmul quantizers must be affine (uniform, lsq, temporal_lsq): the softmax "
                             "operand's quantizer is the same config made unsigned")
        if config.granularity != "tensor" or (probs_config is not None and probs_config.granularity != "tensor"):
            raise ValueError("attention matmul quantizers support granularity 'tensor' only")
        self.q_quantizer: Quantizer = build_quantizer(config)
        self.k_quantizer: Quantizer = build_quantizer(config)
        self.v_quantizer: Quantizer = build_quantizer(config)
        probs_config = probs_config or dataclasses.replace(config, signed=False)  # softmax output is in [0, 1]
        self.probs_quantizer: Quantizer = build_quantizer(probs_config)

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        # Not nn.Module.__call__: diffusers calls processors as plain callables with the Attention module first.
        return self.forward(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                attention_mask: Tensor | None = None, temb: Tensor | None = None) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        batch_size, seq_len, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        # Self-attention keys/values come from the *normalised* hidden states, as in diffusers' AttnProcessor.
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        query = attn.to_q(hidden_states)  # (B, Lq, H*d)
        key = attn.to_k(context)  # (B, Lk, H*d)
        value = attn.to_v(context)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        # Quantize before the head split so that per-sample (temporal) parameters see batch B, not B * heads.
        query = attn.head_to_batch_dim(self.q_quantizer(query))  # (B*H, Lq, d)
        key = attn.head_to_batch_dim(self.k_quantizer(key))
        value = attn.head_to_batch_dim(self.v_quantizer(value))

        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*H, Lq, Lk), softmax output
        hidden_states = torch.bmm(self.probs_quantizer(probs), value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    # -- export (qat.nn.exportable) ----------------------------------------------------------------------------------
    def exports(self) -> bool:
        return True

    def export_entry(self) -> dict[str, Any]:
        return {p: quantizer_entry(getattr(self, f"{p}_quantizer")) for p in _PARTS}

    def _keys(self, flags: bool) -> list[str]:
        return [f"{p}_quantizer.{k}" for p in _PARTS for k in getattr(self, f"{p}_quantizer").state_dict()
                if flags or k != "initialized"]

    def export_tensors(self) -> tuple[dict[str, Tensor], list[str]]:
        if not self.export_entry()["q"] == self.export_entry()["k"] == self.export_entry()["v"]:
            raise ValueError("q, k and v quantizers with different configs cannot be rebuilt by "
                             "QuantAttnProcessor(config, probs_config)")
        tensors = {f"{p}_quantizer.{k}": v for p in _PARTS
                   for k, v in getattr(self, f"{p}_quantizer").export_state().items()}
        return tensors, self._keys(flags=True)

    @classmethod
    def install_exported(cls, root: nn.Module, name: str, entry: dict[str, Any]) -> nn.Module:
        parent_name, _, child = name.rpartition(".")
        try:
            attn = root.get_submodule(parent_name) if parent_name else None
        except AttributeError:
            attn = None
        if child != "processor" or attn is None or not hasattr(attn, "set_processor"):
            raise ValueError(f"{name!r} is not the processor of a diffusers Attention module of the model")
        if not isinstance(entry, dict) or not set(_PARTS) <= set(entry):
            raise ValueError(f"must record {list(_PARTS)}, got {entry!r}")
        configs = {}
        for p in _PARTS:
            try:
                configs[p] = config_from_entry(entry[p])
            except ValueError as err:
                raise ValueError(f"{p}: {err}") from None
        device = next(attn.parameters()).device
        attn.set_processor(cls(configs["q"], configs["probs"]).to(device))
        return attn.processor

    def exported_keys(self) -> tuple[list[str], list[str]]:
        return self._keys(flags=False), self._keys(flags=True)

    def load_exported(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        state = {}
        for key in self._keys(flags=True):
            value = torch.tensor(True) if key.endswith(".initialized") else tensors[key]
            expected = self.state_dict()[key].shape
            if value.shape != expected:
                raise ExportTensorError(key, f"has shape {list(value.shape)} but the processor needs {list(expected)}")
            state[key] = value
        return state
