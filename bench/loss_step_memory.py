"""Step time and peak memory of the EfficientDM W4A4 training step with and without the distillation terms.

    python bench/loss_step_memory.py                       # LSUN-Bedrooms LDM-4 layout (274.1M), batch 32, bf16
    python bench/loss_step_memory.py --rows mse,relation --steps 20
    python bench/loss_step_memory.py --tiny --device cpu   # checks the script itself on a CPU (tiny UNet)

Rows (median of ``--steps`` timed steps after ``--warmup``; peak memory allocated and reserved from the first
warm-up step on; one student, the rows run one after the other with its optimizer rebuilt), every sample at its own
timestep, eager:

* ``mse``: the output MSE only (the reference).
* ``relation``: + relation distillation on ``conv_norm_out`` (64x64 maps pooled to 1024 positions, chunks of 256
  query rows), time-smoothed over two steps: the step includes the teacher's no-grad forward on the previous step.
* ``attention``: + TopKLD (K = 8) on the attention probabilities of every attention module (to_q / to_k taps, up
  to 1024 query rows per head, chunks of 256).
* ``both``: the two terms together.

The teacher's target and current-step features are computed once before timing, as the trainer's online source
captures them during trajectory generation. Prints each row's time and peak memory relative to ``mse`` (target:
peak memory at most 1.15x).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qat  # noqa: E402
from bench.binarydm_step_speed import setup, step_parser, time_rows  # noqa: E402
from qat.losses import AttentionKLConfig, LossInputs, RelationConfig, build_loss  # noqa: E402
from qat.methods import Calibration, EfficientDM, EfficientDMConfig  # noqa: E402
from qat.taps import FeatureTaps  # noqa: E402

ROWS = {"mse": "W4A4 step, output MSE", "relation": "+ relation (conv_norm_out, N = 2)",
        "attention": "+ TopKLD on attention maps (K = 8)", "both": "+ relation + TopKLD on attention maps"}


def main() -> None:
    args = step_parser(__doc__, "mse,relation,attention,both", "comma-separated: " + ", ".join(ROWS)).parse_args()
    device, cuda, teacher = setup(args)
    b, size = args.batch, teacher.config.sample_size
    gen = torch.Generator().manual_seed(0)
    x, x_prev = (torch.randn(b, 3, size, size, generator=gen).to(device) for _ in range(2))
    t = torch.randint(1, 980, (b,), generator=gen).to(device)

    def call(model: torch.nn.Module, batch: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        with qat.timestep(model, steps):
            return model(batch, steps).sample

    method = EfficientDM(EfficientDMConfig(act_init="minmax"))
    student, _ = method.build_student(teacher, "unet")
    student.to(device)
    with torch.autocast(device.type, torch.bfloat16):
        method.initialize(student, Calibration([x], lambda m, batch: call(m, batch, t)))
    qat.set_fast_path(student, fused=True)
    terms = {"relation": build_loss(RelationConfig(weight=1.0, smoothing_steps=2)),
             "attention": build_loss(AttentionKLConfig(weight=1.0, taps=["*.attentions.*"], topk=8))}

    def step(row: str) -> Callable[[], None]:
        used = [terms[k] for k in (["relation", "attention"] if row == "both" else [row] if row in terms else [])]
        names = FeatureTaps(teacher, [p for term in used for p in term.taps()]).names
        previous = FeatureTaps(teacher, [p for term in used for p in term.previous_taps()]).names
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16), FeatureTaps(teacher, names=names) as tt:
            target = teacher(x, t).sample.float()
        opt = torch.optim.AdamW(qat.param_groups(student, lora_lr=1e-6, scale_aware=False), fused=cuda)

        def fn() -> None:
            with torch.autocast(device.type, torch.bfloat16):
                with FeatureTaps(student, names=names) as ts:
                    out = call(student, x, t).float()
                inputs = LossInputs(out, target, t, False, 1.0, ts.features, tt.features, student=student)
                if previous:  # the trainer's extra no-grad teacher call on each sample's previous step
                    with torch.no_grad(), FeatureTaps(teacher, names=previous) as tp:
                        teacher(x_prev, t + 20)
                    inputs.previous_teacher_features = tp.features
                    inputs.previous_valid = torch.ones(b, dtype=torch.bool, device=device)
                loss = F.mse_loss(out, target) + sum(term(inputs).mean() for term in used)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return fn

    rows = {k: (label, lambda k=k: step(k)) for k, label in ROWS.items()}
    results = time_rows(rows, args.rows.split(","), args, device, teacher, "eager")
    if "mse" in results:
        base_ms, base_peak = results["mse"]
        for key, (ms, peak) in results.items():
            if key != "mse":
                print(f"{ROWS[key]} / output MSE: step time {ms / base_ms:.3f}, peak memory "
                      f"{peak / base_peak if cuda else float('nan'):.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
