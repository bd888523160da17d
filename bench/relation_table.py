"""Relation distillation and TopKLD in miniature on the embedded digits teacher: LSQ QAT at W3A3 (QVGen's digits
recipe without its branch: a setting that trains stably with the output MSE alone and still leaves a gap to FP),
trained with the output MSE only, + relation distillation (MPQ-DM's TRD, time-smoothed over two trajectory steps),
+ TopKLD on the self-attention probabilities, + both.

    python bench/relation_table.py                                   # 3 seeds, 4 variants
    python bench/relation_table.py --seeds 0 --jobs 4
    python bench/relation_table.py --seeds 0 --variants trd -- trainer.max_steps=100

Each cell is one ordinary run of ``train.py config=qvgen_digits.yaml qvgen.aux_rank=0 qvgen.weight_bits=3
qvgen.act_bits=3`` plus the variant's ``losses.*`` overrides (:data:`VARIANTS`) and ``seed=<s>
trajectories.seed=<3407 + 10000 s>``. The weights put each term at about the output MSE's size at the start of
training (first 20 steps of the recipe: output MSE 0.004-0.03, relation 0.003-0.005, attention TopKLD 0.012-0.036):
relation 2 on ``conv_norm_out`` (the UNet's features before its last convolution), attention 0.5 on every ``attn1``
(the self-attentions; the digits UNet's cross-attentions attend to one class token, a trivial map). Prints mean +-
standard deviation over the seeds and writes ``<out>/table.md`` and ``<out>/table.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.binarydm_table import Ablation, main  # noqa: E402 - after the path set-up above

_BITS = ["qvgen.aux_rank=0", "qvgen.weight_bits=3", "qvgen.act_bits=3"]
_TRD = ["losses.relation.weight=2", "losses.relation.taps=[conv_norm_out]", "losses.relation.smoothing_steps=2"]
_ATTENTION = ["losses.attention_kl.weight=0.5", "losses.attention_kl.taps=['*.attn1']", "losses.attention_kl.topk=8"]
VARIANTS = {"mse": _BITS, "trd": [*_BITS, *_TRD], "attention": [*_BITS, *_ATTENTION],
            "both": [*_BITS, *_TRD, *_ATTENTION]}
LABELS = {"mse": "output MSE", "trd": "+ TRD (N = 2)", "attention": "+ TopKLD on attention maps (K = 8)",
          "both": "+ TRD + TopKLD on attention maps"}
RELATION = Ablation("qvgen_digits.yaml", "W3A3", VARIANTS, LABELS, "bench/relation_table.py", "runs/relation_table")

if __name__ == "__main__":
    main(ablation=RELATION, doc=__doc__)
