"""Real-kernel runtime for exported low-bit students.

:func:`qat.load_quantized` reloads an export as a fake-quant model (weights dequantized, activations quantized and
dequantized in floating point). :func:`to_backend` swaps its quantized layers, in place, for layers that compute with
real low-bit kernels; :func:`load_for_inference` does both::

    unet = qat.runtime.load_for_inference("out/unet", backend="int8", device="cuda")
    print(unet.runtime_report)                     # which layer runs where, and why the others stay fake
    with qat.timestep(unet, t):                    # temporal activation tables still follow the sampler
        eps = unet(x_t, t, encoder_hidden_states=ctx).sample

Backends (details and exactness: ``docs/runtime.md``):

    fake     no change
    int8     exact integer GEMM (torch._int_mm) of the activation and weight codes, zero-point corrected; W<=8 A<=8
    fp8      the same codes as float8_e4m3fn operands (torch._scaled_mm); exact for codes within +-16
    int4wo   weight-only: packed codes dequantized per call, activations in floating point (not quantized)
"""

from qat.runtime.convert import BACKENDS, RuntimeReport, RuntimeRow, load_for_inference, to_backend
from qat.runtime.kernels import fp8_matmul, int8_matmul, pack_int4, prepare_int8_weight, unpack_int4, zero_point_matmul
from qat.runtime.layers import Float8Layer, Int8Layer, RuntimeLayer, WeightOnlyLayer, weight_codes
from qat.runtime.pipeline import DENOISER_COMPONENTS, load_pipeline

__all__ = [
    "BACKENDS", "RuntimeReport", "RuntimeRow", "to_backend", "load_for_inference", "load_pipeline",
    "DENOISER_COMPONENTS",
    "RuntimeLayer", "Int8Layer", "Float8Layer", "WeightOnlyLayer", "weight_codes",
    "int8_matmul", "prepare_int8_weight", "zero_point_matmul", "fp8_matmul", "pack_int4", "unpack_int4",
]
