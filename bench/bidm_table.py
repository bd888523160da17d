"""BiDM's ablation in miniature on the embedded digits teacher, all W1A1: plain XNOR, BiDM without the
cross-timestep connection and BiDM, each trained with the same budget, over several seeds (Zheng et al.,
NeurIPS 2024, Tables 3 and 6 have this shape on LSUN-Bedrooms LDM-4).

    python bench/bidm_table.py                                       # 3 seeds, the digits recipe as it is
    python bench/bidm_table.py --seeds 0 --variants bidm -- trainer.max_steps=100
    python bench/bidm_table.py --jobs 2                              # 2 cells at a time

Each cell is one ordinary run of ``train.py config=bidm_digits.yaml`` plus the variant's overrides
(:data:`VARIANTS`) and ``seed=<s> trajectories.seed=<3407 + 10000 s>``. Plain XNOR is the paper's baseline: 1-bit
weights with per-channel ``mean |W|`` scales (learned), ``sign`` activations with the clipped STE, no scaling map,
no shortcut, no connection, no SPD; the same full-precision layers, learning rate and steps. Every run evaluates the
FP teacher on the same samples (the FP row) and its own PTQ start. Prints mean +- standard deviation over the seeds
and writes ``<out>/table.md`` and ``<out>/table.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.binarydm_table import Ablation, main  # noqa: E402 - after the path set-up above

VARIANTS = {
    "xnor": ["bidm.scaling_map=false", "bidm.conv_shortcut=false", "bidm.act_threshold=false",
             "bidm.act_gradient=clipped", "bidm.connections=0", "bidm.spd_weight=0"],
    "bidm_no_connection": ["bidm.connections=0"],
    "bidm": [],
}
LABELS = {"xnor": "plain XNOR", "bidm_no_connection": "BiDM w/o connection", "bidm": "BiDM"}
BIDM = Ablation("bidm_digits.yaml", "W1A1", VARIANTS, LABELS, "bench/bidm_table.py", "runs/bidm_table")

if __name__ == "__main__":
    main(ablation=BIDM, doc=__doc__)
