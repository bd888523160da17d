"""Quantizers: one ``nn.Module`` and one config dataclass each, registered by name (:data:`QUANTIZERS`).

=============  =====================  =======================================================
name           config                 module
=============  =====================  =======================================================
uniform        UniformConfig          UniformQuantizer (static affine step / zero-point, PTQ)
lsq            LSQConfig              LSQQuantizer (learned step; LSQ+ learned offset)
temporal_lsq   TemporalLSQConfig      TemporalLSQQuantizer (per-timestep table, EfficientDM)
binary         BinaryConfig           BinaryQuantizer (1 bit, per-channel scales, K bases)
sign_act       SignActConfig          SignActQuantizer (1-bit activations, learnable threshold)
dynamic_token  DynamicTokenConfig     DynamicTokenQuantizer (per-token dynamic, clipping per timestep group)
=============  =====================  =======================================================

All derive from :class:`Quantizer`; the affine ones from :class:`AffineQuantizer`. A quantizer defined elsewhere
(a method file, a test) registers itself with :func:`register_quantizer` and is then buildable from a config and
exportable like these.
"""

from __future__ import annotations

from qat.quantizers.affine import AffineConfig, AffineQuantizer, fake_quantize, search_range
from qat.quantizers.base import (
    QUANTIZERS,
    Quantizer,
    QuantizerConfig,
    build_quantizer,
    config_class,
    register_quantizer,
)
from qat.quantizers.binary import BinaryConfig, BinaryQuantizer
from qat.quantizers.dynamic import DynamicTokenConfig, DynamicTokenQuantizer
from qat.quantizers.lsq import LSQConfig, LSQQuantizer
from qat.quantizers.sign import SignActConfig, SignActQuantizer
from qat.quantizers.temporal_lsq import (
    TemporalLSQConfig,
    TemporalLSQQuantizer,
    grid_position,
    interpolation_weights,
)
from qat.quantizers.uniform import UniformConfig, UniformQuantizer

__all__ = [
    "QUANTIZERS",
    "Quantizer",
    "QuantizerConfig",
    "AffineConfig",
    "AffineQuantizer",
    "UniformConfig",
    "UniformQuantizer",
    "LSQConfig",
    "LSQQuantizer",
    "TemporalLSQConfig",
    "TemporalLSQQuantizer",
    "BinaryConfig",
    "BinaryQuantizer",
    "SignActConfig",
    "SignActQuantizer",
    "DynamicTokenConfig",
    "DynamicTokenQuantizer",
    "build_quantizer",
    "config_class",
    "register_quantizer",
    "fake_quantize",
    "grid_position",
    "interpolation_weights",
    "search_range",
]
