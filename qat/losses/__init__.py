"""Loss terms: one ``nn.Module`` and one config dataclass each, registered by name (:data:`LOSSES`).

============  =================  ==========================================================
name          config             term
============  =================  ==========================================================
output_mse    OutputMSEConfig    student vs teacher prediction (CFG-combined or per branch)
feature_mse   FeatureMSEConfig   student vs teacher tapped features
============  =================  ==========================================================
"""

from __future__ import annotations

from qat.losses.base import LOSSES, LossConfig, LossInputs, LossTerm, build_loss, register_loss
from qat.losses.feature import FeatureMSE, FeatureMSEConfig
from qat.losses.output import OutputMSE, OutputMSEConfig

__all__ = ["LOSSES", "LossConfig", "LossInputs", "LossTerm", "build_loss", "register_loss", "OutputMSE",
           "OutputMSEConfig", "FeatureMSE", "FeatureMSEConfig"]
