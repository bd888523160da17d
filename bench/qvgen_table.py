"""QVGen's comparison in miniature on the embedded digits teacher at W4A4 and W3A3: the LSQ QAT baseline (the same
quantizers and full QAT, no auxiliary branch), EfficientDM (QALoRA) and QVGen (branch decayed and removed), each
trained with the same budget, over several seeds (Huang et al., ICLR 2026, Tables 1-2 have this shape on video
models).

    python bench/qvgen_table.py                                      # 3 seeds, 6 variants
    python bench/qvgen_table.py --seeds 0 --variants qvgen_w4a4 -- trainer.max_steps=100
    python bench/qvgen_table.py --jobs 6                             # 6 cells at a time (one GPU holds them all)

Each cell is one ordinary run of ``train.py config=qvgen_digits.yaml`` (``efficientdm_digits.yaml`` for EfficientDM)
plus the variant's overrides (:data:`VARIANTS`) and ``seed=<s> trajectories.seed=<3407 + 10000 s>``: 600 steps at
batch 8 for every variant. The QVGen row is the exported model, without the branch (its ``trained`` row is measured
after the last step, where the branch is exactly zero); its ``PTQ start`` row still has the SVD-initialised branch,
so the deployable PTQ start is the LSQ baseline's. Prints mean +- standard deviation over the seeds and writes
``<out>/table.md`` and ``<out>/table.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.binarydm_table import Ablation, main  # noqa: E402 - after the path set-up above

VARIANTS, LABELS, RECIPES = {}, {}, {}
for _bits in (4, 3):
    _qv = [f"qvgen.weight_bits={_bits}", f"qvgen.act_bits={_bits}"]
    VARIANTS[f"lsq_w{_bits}a{_bits}"] = [*_qv, "qvgen.aux_rank=0"]
    VARIANTS[f"efficientdm_w{_bits}a{_bits}"] = [f"efficientdm.weight_bits={_bits}", f"efficientdm.act_bits={_bits}"]
    VARIANTS[f"qvgen_w{_bits}a{_bits}"] = _qv
    RECIPES[f"efficientdm_w{_bits}a{_bits}"] = "efficientdm_digits.yaml"
    LABELS |= {f"lsq_w{_bits}a{_bits}": f"W{_bits}A{_bits} LSQ QAT", f"efficientdm_w{_bits}a{_bits}":
               f"W{_bits}A{_bits} EfficientDM", f"qvgen_w{_bits}a{_bits}": f"W{_bits}A{_bits} QVGen"}
QVGEN = Ablation("qvgen_digits.yaml", "W4A4 / W3A3", VARIANTS, LABELS, "bench/qvgen_table.py", "runs/qvgen_table",
                 recipes=RECIPES)

if __name__ == "__main__":
    main(ablation=QVGEN, doc=__doc__)
