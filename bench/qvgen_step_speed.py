"""The QVGen W4A4 training step (auxiliary rank 32) next to the FP LoRA step, side by side on one GPU.

    python bench/qvgen_step_speed.py                          # LSUN-Bedrooms LDM-4 layout (274.1M), batch 32, bf16
    python bench/qvgen_step_speed.py --rows fp,qvgen,lsq,qvgen_frozen --profile
    python bench/qvgen_step_speed.py --mode blocks --compile-mode reduce-overhead    # both rows compiled per block
    python bench/qvgen_step_speed.py --tiny --device cpu      # checks the script itself on a CPU (tiny UNet)

Rows (median of ``--steps`` timed steps after ``--warmup``; peak memory allocated and reserved from the first
warm-up step on; each row builds its own student and optimizer after the previous row's were freed), every sample at
its own timestep:

* ``FP LoRA step``: the EfficientDM student with every quantizer off (``f(x, W + B A)``), output MSE, AdamW over
  the rank-32 adapters: the reference of the target.
* ``QVGen W4A4 step, rank 32``: the QVGen student (LSQ+ 4-bit weights, per-token dynamic 4-bit activations with
  clipping per timestep group, ``Phi`` of rank 32 on every main layer, W8A8 edges), in the first rank-decay phase;
  output MSE; AdamW over the method's groups (every parameter: full QAT, as the paper).
* ``LSQ QAT W4A4 step`` (``lsq``): the same without ``Phi`` (the paper's baseline), the branch's own cost.
* ``QVGen W4A4 step, rank 32, frozen W`` (``qvgen_frozen``): the QVGen step with the latent weights, biases and
  norms frozen (only quantizer parameters and ``L``, ``R`` train): how much of the gap is full QAT's weight
  gradients and optimizer state rather than quantization.

The teacher's target is computed once before timing, as the trainer's online source captures it during trajectory
generation. Prints the table and the ratios QVGen / FP LoRA of throughput (target >= 0.9) and peak memory.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qat  # noqa: E402
from bench.binarydm_step_speed import (  # noqa: E402
    add_compile_args,
    compile_finisher,
    fp_lora_step,
    setup,
    step_parser,
    time_rows,
)
from qat.methods import Calibration, QVGen, QVGenConfig  # noqa: E402
from qat.nn.auxiliary import AuxLowRank  # noqa: E402
from qat.quantizers.base import Quantizer  # noqa: E402


def main() -> None:
    rows_help = "comma-separated: fp, qvgen, lsq, qvgen_frozen"
    parser = step_parser(__doc__, "fp,qvgen", rows_help)
    add_compile_args(parser)
    args = parser.parse_args()
    device, cuda, teacher = setup(args)
    finish, graphs, mode = compile_finisher(args)
    b, size = args.batch, teacher.config.sample_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, size, size, generator=gen).to(device)
    t = torch.randint(1, 1000, (b,), generator=gen).to(device)

    def qvgen_step(rank: int, frozen: bool = False) -> Callable[[], None]:
        method = QVGen(QVGenConfig(aux_rank=rank))
        student, _ = method.build_student(teacher, "unet")
        student.to(device)

        def call(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
            with qat.timestep(m, t):
                return m(batch, t).sample

        with torch.autocast(device.type, torch.bfloat16):
            method.initialize(student, Calibration([x], call))
            with torch.no_grad():
                target = teacher(x, t).sample.float()
        if frozen:
            student.requires_grad_(False)
            for m in student.modules():
                if isinstance(m, (Quantizer, AuxLowRank)):
                    m.requires_grad_(True)
        method.on_train_step(student, 0, 1000)
        opt = torch.optim.AdamW(method.param_groups(student), fused=cuda)
        model = finish(student)

        def fn() -> None:
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(device.type, torch.bfloat16):
                out = call(model, x).float()
            F.mse_loss(out, target).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return fn

    rows = {"fp": ("FP LoRA step", lambda: fp_lora_step(teacher, x, t, finish, graphs)),
            "qvgen": ("QVGen W4A4 step, rank 32", lambda: qvgen_step(32)),
            "lsq": ("LSQ QAT W4A4 step (no Phi)", lambda: qvgen_step(0)),
            "qvgen_frozen": ("QVGen W4A4 step, rank 32, frozen W", lambda: qvgen_step(32, frozen=True))}
    results = time_rows(rows, args.rows.split(","), args, device, teacher, mode)
    if "fp" in results and "qvgen" in results:
        (fp_ms, fp_peak), (q_ms, q_peak) = results["fp"], results["qvgen"]
        print(f"\nQVGen / FP LoRA: throughput {fp_ms / q_ms:.3f} (target >= 0.9), peak memory "
              f"{q_peak / fp_peak if cuda else float('nan'):.3f}")


if __name__ == "__main__":
    main()
