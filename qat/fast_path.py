"""Per-module choice of the fake-quantization implementation (never a process-wide switch).

Every :class:`~qat.quantizers.AffineQuantizer` carries two attributes:

* ``fused`` (default True): its forward is one autograd node that keeps only its input
  (:func:`qat.ste.fake_quantize_ste`), and a quantized layer runs its input quantizer inside the layer's own node
  (:mod:`qat.nn.fused`); False selects the composite ``round_ste`` form, the reference the fused path is tested
  against.
* ``compiled_kernels`` (default False): the fused path's math runs as compiled kernels (one per quantizer and
  pass) while the model stays eager.

:func:`set_fast_path` sets them on the quantizers of one model (or of the modules given), so two models in one
process (a student under test and its reference, a trainer and a benchmark) choose independently.
"""

from __future__ import annotations

from torch import nn

from qat.quantizers.affine import AffineQuantizer

__all__ = ["set_fast_path"]


def set_fast_path(model: nn.Module, *, fused: bool | None = None, compiled_kernels: bool | None = None) -> int:
    """Sets ``fused`` and / or ``compiled_kernels`` (None: unchanged) on every affine quantizer of ``model``.

    Returns:
        the number of quantizers set.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, AffineQuantizer):
            if fused is not None:
                m.fused = fused
            if compiled_kernels is not None:
                m.compiled_kernels = compiled_kernels
            n += 1
    return n
