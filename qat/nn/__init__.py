"""Quantized layers, the quantized attention processor and QALoRA."""

from qat.nn.attention import QuantAttnProcessor
from qat.nn.layers import QuantConv2d, QuantLinear
from qat.nn.qalora import QALoRAConv2d, QALoRALinear, add_qalora, merge_qalora, qalora_layers

__all__ = ["QuantLinear", "QuantConv2d", "QuantAttnProcessor", "QALoRALinear", "QALoRAConv2d", "add_qalora",
           "merge_qalora", "qalora_layers"]
