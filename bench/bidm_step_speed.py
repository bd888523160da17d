"""The BiDM W1A1 training step next to the EfficientDM W4A4 step, side by side on one GPU.

    python bench/bidm_step_speed.py                           # LSUN-Bedrooms LDM-4 layout (274.1M), batch 32, bf16
    python bench/bidm_step_speed.py --rows efficientdm,bidm,bidm_no_connection --profile
    python bench/bidm_step_speed.py --tiny --device cpu       # checks the script itself on a CPU (tiny UNet)

Rows (median of ``--steps`` timed steps after ``--warmup``; peak memory allocated and reserved from the first
warm-up step on; each row builds its own student and optimizer after the previous row's were freed), every sample
at its own timestep of a 100-step DDIM grid:

* ``EfficientDM W4A4 step``: QALoRA rank 32 on 4-bit weights, temporal LSQ 4-bit activations (a table row per
  grid timestep), W8A8 edges; output MSE; AdamW over the adapters and steps (the trainer's groups).
* ``BiDM W1A1 step``: the BiDM student (XNOR convs with scaling maps and shortcuts, W1A1 linears, every parameter
  trained); a ``no_grad`` student forward on each sample's previous grid step fills the cross-timestep
  connection (8 blocks), then the step's forward with gradients; output MSE + SPD (p = 4) on the 25 block outputs;
  AdamW over the trainer's groups.
* ``BiDM W1A1 step, no connection`` (``--rows ...,bidm_no_connection``): the same without the connection and its
  extra forward.

The teacher's targets and block features are computed once before timing, as the trainer's online source captures
them during trajectory generation. Prints the table and the ratio of step times BiDM / EfficientDM W4A4 (target
<= 1.5).
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
from qat.losses import LossInputs  # noqa: E402
from qat.methods import BiDM, BiDMConfig, Calibration, EfficientDM, EfficientDMConfig  # noqa: E402
from qat.taps import FeatureTaps  # noqa: E402


def main() -> None:
    rows_help = "comma-separated: efficientdm, bidm, bidm_no_connection"
    args = step_parser(__doc__, "efficientdm,bidm", rows_help).parse_args()
    device, cuda, teacher = setup(args)
    b, size = args.batch, teacher.config.sample_size
    gen = torch.Generator().manual_seed(0)
    grid = torch.arange(991, 0, -10)  # DDIM, 100 steps, steps_offset 1
    pick = torch.randint(1, len(grid), (b,), generator=gen)
    t, t_prev = grid[pick].to(device), grid[pick - 1].to(device)
    x = torch.randn(b, 3, size, size, generator=gen).to(device)
    x_prev = torch.randn(b, 3, size, size, generator=gen).to(device)

    def efficientdm_step() -> Callable[[], None]:
        method = EfficientDM(EfficientDMConfig(act_init="minmax"))
        student, _ = method.build_student(teacher, "unet")
        student.to(device)
        qat.set_timestep_grid(student, grid.to(device))

        def call(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
            with qat.timestep(m, t):
                return m(batch, t).sample

        with torch.autocast(device.type, torch.bfloat16):
            method.initialize(student, Calibration([x], call))
            with torch.no_grad():
                target = teacher(x, t).sample.float()
        opt = torch.optim.AdamW(method.param_groups(student), fused=cuda)

        def fn() -> None:
            with torch.autocast(device.type, torch.bfloat16):
                out = call(student, x).float()
            F.mse_loss(out, target).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return fn

    def bidm_step(connections: int) -> Callable[[], None]:
        method = BiDM(BiDMConfig(connections=connections))
        student, _ = method.build_student(teacher, "unet")
        student.to(device)
        taps = method.spd.taps()

        def call(m: torch.nn.Module, batch: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
            with qat.timestep(m, ts):
                return m(batch, ts).sample

        with torch.autocast(device.type, torch.bfloat16):
            method.initialize(student, Calibration([x], lambda m, batch: call(m, batch, t)))
            with torch.no_grad(), FeatureTaps(teacher, taps) as tapped:
                target = teacher(x, t).sample.float()
            features = {k: v.detach() for k, v in tapped.features.items()}
        spd = method.spd.to(device)
        conn = BiDM.connection(student)
        opt = torch.optim.AdamW(method.param_groups(student), fused=cuda)

        def fn() -> None:
            with torch.autocast(device.type, torch.bfloat16):
                if conn is not None:
                    conn.reset_sampling_state()
                    with torch.no_grad():
                        call(student, x_prev, t_prev)
                with FeatureTaps(student, names=list(features)) as own:
                    out = call(student, x, t).float()
            inputs = LossInputs(student_out=out, teacher_out=target, t=t, guided=False, guidance=1.0,
                                student_features=own.features, teacher_features=features, student=student)
            loss = F.mse_loss(out, target) + spd.config.weight * spd(inputs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return fn

    rows = {"efficientdm": ("EfficientDM W4A4 step", efficientdm_step),
            "bidm": ("BiDM W1A1 step", lambda: bidm_step(8)),
            "bidm_no_connection": ("BiDM W1A1 step, no connection", lambda: bidm_step(0))}
    if args.tiny:
        rows["bidm"] = ("BiDM W1A1 step", lambda: bidm_step(2))
    args.mode = "eager"
    results = time_rows(rows, args.rows.split(","), args, device, teacher, "eager")
    if "efficientdm" in results and "bidm" in results:
        (e_ms, e_peak), (b_ms, b_peak) = results["efficientdm"], results["bidm"]
        print(f"\nBiDM / EfficientDM W4A4: step time {b_ms / e_ms:.3f} (target <= 1.5), peak memory "
              f"{b_peak / e_peak if cuda else float('nan'):.3f}")


if __name__ == "__main__":
    main()
