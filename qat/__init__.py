"""DiffQAT's quantization library: quantizers, quantized layers, QALoRA, methods, losses, model surgery, export.

Plain PyTorch (plus peft for LoRA); nothing here imports Lightning. The usual flow::

    report = qat.prepare(unet, spec)             # swap layers by name patterns, add QALoRA
    qat.set_timestep_grid(unet, timesteps)       # the grid temporal tables stand for
    qat.calibrate(unet, batches, forward_fn)     # PTQ init (weights + activations), before the optimizer
    groups = qat.param_groups(unet)              # scale-aware LoRA LRs, quantizer LRs
    ...                                          # train with `with qat.timestep(unet, t): unet(...)`
    qat.convert(unet)                            # merge QALoRA into the integer weights
    qat.export_quantized(unet, "out/unet")       # packed low-bit weights + config.json + model card
    unet = qat.load_quantized("out/unet")        # ... and back, without peft or the training code

or a whole paper's method at once: ``qat.build_method("efficientdm")`` (:mod:`qat.methods`).
"""

from qat.calibration import calibrate, initialize_weight_quantizers, is_initialized
from qat.export import export_quantized, load_quantized
from qat.export_card import export_sizes
from qat.fast_path import set_fast_path
from qat.losses import LOSSES, LossConfig, LossInputs, LossTerm, register_loss
from qat.methods import METHODS, Calibration, Method, build_method, register_method
from qat.nn import QALoRAConv2d, QALoRALinear, QuantAttnProcessor, QuantConv2d, QuantLinear
from qat.nn.exportable import EXPORTABLE, register_exportable
from qat.optim import param_groups, scale_aware_gradient_hooks
from qat.prepare import LayerRule, PrepareReport, QuantSpec, convert, prepare, quant_layers, summary
from qat.quantizers import (
    QUANTIZERS,
    AffineConfig,
    AffineQuantizer,
    BinaryConfig,
    BinaryQuantizer,
    LSQConfig,
    LSQQuantizer,
    Quantizer,
    QuantizerConfig,
    TemporalLSQConfig,
    TemporalLSQQuantizer,
    UniformConfig,
    UniformQuantizer,
    build_quantizer,
    register_quantizer,
)
from qat.sampling import cfg_combine, reset_sampling_state
from qat.taps import FeatureTaps
from qat.timestep import (
    TimestepAware,
    attach_timestep_hook,
    clear_timestep,
    set_timestep,
    set_timestep_grid,
    set_timestep_index,
    temporal_quantizers,
    timestep,
    timestep_index,
    timestep_modules,
)

__all__ = [
    "QUANTIZERS", "Quantizer", "QuantizerConfig", "AffineConfig", "AffineQuantizer", "UniformConfig",
    "UniformQuantizer", "LSQConfig", "LSQQuantizer", "TemporalLSQConfig", "TemporalLSQQuantizer", "BinaryConfig",
    "BinaryQuantizer", "build_quantizer", "register_quantizer",
    "QuantLinear", "QuantConv2d", "QuantAttnProcessor", "QALoRALinear", "QALoRAConv2d",
    "EXPORTABLE", "register_exportable",
    "LayerRule", "QuantSpec", "PrepareReport", "prepare", "convert", "quant_layers", "summary",
    "calibrate", "initialize_weight_quantizers", "is_initialized",
    "param_groups", "scale_aware_gradient_hooks", "set_fast_path",
    "METHODS", "Method", "Calibration", "build_method", "register_method",
    "LOSSES", "LossConfig", "LossInputs", "LossTerm", "register_loss", "FeatureTaps",
    "TimestepAware", "timestep", "timestep_index", "set_timestep", "set_timestep_index", "clear_timestep",
    "set_timestep_grid", "attach_timestep_hook", "timestep_modules", "temporal_quantizers",
    "cfg_combine", "reset_sampling_state",
    "export_quantized", "load_quantized", "export_sizes",
]
