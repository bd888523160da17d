"""Fake quantizers: one ``nn.Module`` and one config dataclass each, registered by name.

=============  =====================  =======================================================
name           config                 module
=============  =====================  =======================================================
uniform        UniformConfig          UniformQuantizer (static step / zero-point, PTQ)
lsq            LSQConfig              LSQQuantizer (learned step; LSQ+ learned offset)
temporal_lsq   TemporalLSQConfig      TemporalLSQQuantizer (per-timestep table, EfficientDM)
=============  =====================  =======================================================
"""

from __future__ import annotations

from qat.quantizers.base import FakeQuantizer, QuantizerConfig, fake_quantize, qrange, search_range
from qat.quantizers.lsq import LSQConfig, LSQQuantizer
from qat.quantizers.temporal_lsq import (
    TemporalLSQConfig,
    TemporalLSQQuantizer,
    grid_position,
    interpolation_weights,
)
from qat.quantizers.uniform import UniformConfig, UniformQuantizer
from qat.registry import Registry

__all__ = [
    "QUANTIZERS",
    "FakeQuantizer",
    "QuantizerConfig",
    "UniformConfig",
    "UniformQuantizer",
    "LSQConfig",
    "LSQQuantizer",
    "TemporalLSQConfig",
    "TemporalLSQQuantizer",
    "build_quantizer",
    "config_class",
    "fake_quantize",
    "grid_position",
    "interpolation_weights",
    "qrange",
    "search_range",
]

#: name -> (config class, quantizer class)
QUANTIZERS: Registry[tuple[type[QuantizerConfig], type[FakeQuantizer]]] = Registry("quantizer")
for _cfg, _cls in ((UniformConfig, UniformQuantizer), (LSQConfig, LSQQuantizer),
                   (TemporalLSQConfig, TemporalLSQQuantizer)):
    QUANTIZERS.register(_cfg.name)((_cfg, _cls))


def config_class(name: str) -> type[QuantizerConfig]:
    """The config dataclass registered as ``name`` (a failed lookup lists the known names)."""
    return QUANTIZERS.get(name)[0]


def build_quantizer(config: QuantizerConfig, num_channels: int | None = None, channel_axis: int = 0,
                    group_count: int | None = None) -> FakeQuantizer:
    """Builds the quantizer module for ``config`` (dispatch on its registered ``name``)."""
    _, cls = QUANTIZERS.get(config.name)
    return cls(config, num_channels=num_channels, channel_axis=channel_axis, group_count=group_count)
