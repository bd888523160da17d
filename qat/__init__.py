"""DiffQAT's quantization library: quantizers, quantized layers, QALoRA, model surgery, PTQ initialisation.

Plain PyTorch (plus peft for LoRA); nothing here imports Lightning. The usual flow::

    report = qat.prepare(unet, spec)             # swap layers by name patterns, add QALoRA
    qat.set_timestep_grid(unet, timesteps)       # the grid temporal tables stand for
    qat.calibrate(unet, batches, forward_fn)     # PTQ init (weights + activations), before the optimizer
    groups = qat.param_groups(unet)              # scale-aware LoRA LRs, quantizer LRs
    ...                                          # train with `with qat.timestep(unet, t): unet(...)`
    qat.convert(unet)                            # merge QALoRA into the integer weights
    qat.export_quantized(unet, "out/unet")       # packed low-bit weights + config.json + model card
    unet = qat.load_quantized("out/unet")        # ... and back, without peft or the training code
"""

from qat.calibration import calibrate, initialize_weight_quantizers, is_initialized
from qat.export import export_quantized, export_sizes, load_quantized
from qat.nn import QALoRAConv2d, QALoRALinear, QuantAttnProcessor, QuantConv2d, QuantLinear
from qat.optim import param_groups, scale_aware_gradient_hooks
from qat.prepare import LayerRule, PrepareReport, QuantSpec, convert, prepare, quant_layers, summary
from qat.quantizers import (
    QUANTIZERS,
    FakeQuantizer,
    LSQConfig,
    LSQQuantizer,
    QuantizerConfig,
    TemporalLSQConfig,
    TemporalLSQQuantizer,
    UniformConfig,
    UniformQuantizer,
    build_quantizer,
)
from qat.timestep import (
    attach_timestep_hook,
    clear_timestep,
    set_timestep,
    set_timestep_grid,
    set_timestep_index,
    temporal_quantizers,
    timestep,
    timestep_index,
)

__all__ = [
    "QUANTIZERS", "FakeQuantizer", "QuantizerConfig", "UniformConfig", "UniformQuantizer", "LSQConfig",
    "LSQQuantizer", "TemporalLSQConfig", "TemporalLSQQuantizer", "build_quantizer",
    "QuantLinear", "QuantConv2d", "QuantAttnProcessor", "QALoRALinear", "QALoRAConv2d",
    "LayerRule", "QuantSpec", "PrepareReport", "prepare", "convert", "quant_layers", "summary",
    "calibrate", "initialize_weight_quantizers", "is_initialized",
    "param_groups", "scale_aware_gradient_hooks",
    "timestep", "timestep_index", "set_timestep", "set_timestep_index", "clear_timestep", "set_timestep_grid",
    "attach_timestep_hook", "temporal_quantizers",
    "export_quantized", "load_quantized", "export_sizes",
]
