"""Loss terms: one ``nn.Module`` and one config dataclass each, registered by name (:data:`LOSSES`).

============  =================  ==========================================================
name          config             term
============  =================  ==========================================================
output_mse    OutputMSEConfig    student vs teacher prediction (CFG-combined or per branch)
feature_mse   FeatureMSEConfig   student vs teacher tapped features
lrm           LowRankMimicking-  tapped features in the teacher's low-rank principal space
              Config             (BinaryDM's low-rank representation mimicking)
basis_l1      BasisL1Config      L1 of the binary quantizers' scales beyond the first basis
                                 (BinaryDM's evolvable-basis penalty)
spd           SpacePatched-      per-patch normalised spatial relation maps of tapped
              Distillation-      features (BiDM's space patched distillation)
              Config
relation      RelationConfig     relation (cosine-similarity) maps of tapped features, KL or
                                 TopKLD per row (MPQ-DM's relation distillation)
attention_kl  AttentionKLConfig  attention probabilities of tapped attention modules, KL or
                                 TopKLD per query row
============  =================  ==========================================================
"""

from __future__ import annotations

from qat.losses.attention import AttentionKL, AttentionKLConfig, attention_divergence
from qat.losses.base import LOSSES, LossConfig, LossInputs, LossTerm, build_loss, register_loss
from qat.losses.feature import FeatureMSE, FeatureMSEConfig
from qat.losses.lowrank import LowRankMimicking, LowRankMimickingConfig
from qat.losses.output import OutputMSE, OutputMSEConfig
from qat.losses.patch import SpacePatchedDistillation, SpacePatchedDistillationConfig
from qat.losses.regularizers import BasisL1, BasisL1Config
from qat.losses.relation import Relation, RelationConfig, TopKLDSpec, relation_divergence, topk_kl

__all__ = ["LOSSES", "LossConfig", "LossInputs", "LossTerm", "build_loss", "register_loss", "OutputMSE",
           "OutputMSEConfig", "FeatureMSE", "FeatureMSEConfig", "LowRankMimicking", "LowRankMimickingConfig",
           "BasisL1", "BasisL1Config", "SpacePatchedDistillation", "SpacePatchedDistillationConfig",
           "Relation", "RelationConfig", "TopKLDSpec", "relation_divergence", "topk_kl", "AttentionKL",
           "AttentionKLConfig", "attention_divergence"]
