"""Relation distillation and TopKLD in miniature on the embedded digits teacher: EfficientDM at W3A4 (a setting where
the output MSE alone leaves a gap to FP) trained with the output MSE only, + relation distillation (MPQ-DM's TRD,
time-smoothed over two trajectory steps), + TopKLD on the relation rows, + both (TopKLD rows, time-smoothed).

    python bench/relation_table.py                                   # 3 seeds, 4 variants
    python bench/relation_table.py --seeds 0 --jobs 4
    python bench/relation_table.py --seeds 0 --variants trd -- trainer.max_steps=100

Each cell is one ordinary run of ``train.py config=efficientdm_digits.yaml efficientdm.weight_bits=3`` plus the
variant's ``losses.relation.*`` overrides (:data:`VARIANTS`: taps ``conv_norm_out``, the UNet's features before its
last convolution, weight 1) and ``seed=<s> trajectories.seed=<3407 + 10000 s>``. Prints mean +- standard deviation
over the seeds and writes ``<out>/table.md`` and ``<out>/table.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.binarydm_table import Ablation, main  # noqa: E402 - after the path set-up above

_BITS = ["efficientdm.weight_bits=3", "efficientdm.act_bits=4"]
_RELATION = ["losses.relation.weight=1", "losses.relation.taps=[conv_norm_out]"]
VARIANTS = {
    "mse": _BITS,
    "trd": [*_BITS, *_RELATION, "losses.relation.smoothing_steps=2"],
    "topkld": [*_BITS, *_RELATION, "losses.relation.topk=8"],
    "both": [*_BITS, *_RELATION, "losses.relation.topk=8", "losses.relation.smoothing_steps=2"],
}
LABELS = {"mse": "output MSE", "trd": "+ TRD (N = 2)", "topkld": "+ TopKLD on relation rows (K = 8)",
          "both": "+ TRD with TopKLD rows"}
RELATION = Ablation("efficientdm_digits.yaml", "W3A4", VARIANTS, LABELS, "bench/relation_table.py",
                    "runs/relation_table")

if __name__ == "__main__":
    main(ablation=RELATION, doc=__doc__)
