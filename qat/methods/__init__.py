"""One file per paper method, each a :class:`Method` registered by name (:data:`METHODS`).

=============  ====================  ===============================================================
name           class                 paper
=============  ====================  ===============================================================
efficientdm    EfficientDM           He et al., ICLR 2024, arXiv:2310.03270
binarydm       BinaryDM              Zheng et al., ICLR 2025, arXiv:2404.05662
bidm           BiDM                  Zheng et al., NeurIPS 2024, arXiv:2412.05926
qvgen          QVGen                 Huang et al., ICLR 2026, arXiv:2505.11497
=============  ====================  ===============================================================

``docs/methods.md`` walks through adding one.
"""

from __future__ import annotations

from qat.methods.base import METHODS, Calibration, Method, build_method, register_method
from qat.methods.bidm import BiDM, BiDMConfig
from qat.methods.binarydm import BinaryDM, BinaryDMConfig
from qat.methods.efficientdm import EfficientDM, EfficientDMConfig
from qat.methods.qvgen import QVGen, QVGenConfig

__all__ = ["METHODS", "Method", "Calibration", "build_method", "register_method", "EfficientDM",
           "EfficientDMConfig", "BinaryDM", "BinaryDMConfig", "BiDM", "BiDMConfig", "QVGen", "QVGenConfig"]
