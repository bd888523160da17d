"""How long ``torch.compile`` takes for the EfficientDM student: whole model against its repeated blocks.

    python bench/compile_time.py --width narrow --backend aot_eager --scope whole    # CPU-friendly
    python bench/compile_time.py --width ldm4 --backend inductor --scope blocks      # on a GPU

Builds a random UNet with the LDM-4 layout (``ldm4``: 400.9M parameters; ``narrow``: the same blocks and layers
with channels (32, 64, 96, 160), 12.7M), the W4A4 EfficientDM student (``--fp``: every quantizer off, the FP LoRA
step), compiles it (``--scope whole``: the model; ``blocks``: ``train.models.families.compile_repeated_blocks``) and
times the first forward + backward (the compilation) and the second, at batch 2 and the UNet's sample size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qat  # noqa: E402
from bench.make_random_ldm4 import ldm4_unet  # noqa: E402
from bench.qat_step_speed import set_flags  # noqa: E402
from qat.methods.efficientdm import EfficientDM, EfficientDMConfig  # noqa: E402
from train.models.families import compile_repeated_blocks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", choices=("narrow", "ldm4"), default="narrow")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--scope", choices=("whole", "blocks"), default="whole")
    ap.add_argument("--fp", action="store_true", help="quantizers off (the FP LoRA step)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    with torch.device(device):
        teacher = ldm4_unet()
        if args.width == "narrow":
            from diffusers import UNet2DConditionModel

            teacher = UNet2DConditionModel.from_config({**teacher.config, "block_out_channels": (32, 64, 96, 160),
                                                        "sample_size": 16})
    student, _ = EfficientDM(EfficientDMConfig(act_init="minmax")).build_student(teacher, "unet")
    student.to(device)
    grid = torch.linspace(1, 991, 100, device=device).round()
    qat.set_timestep_grid(student, grid)
    size = teacher.config.sample_size
    x, ctx, t = (torch.randn(2, 3, size, size, device=device), torch.randn(2, 1, 512, device=device), grid[[3, 50]])
    quantizers = qat.temporal_quantizers(student)

    def call(m: torch.nn.Module) -> torch.Tensor:
        with qat.timestep(student, t, quantizers), torch.autocast(device.type, torch.bfloat16):
            return m(x, t, encoder_hidden_states=ctx, return_dict=False)[0]

    with torch.no_grad():
        qat.calibrate(student, [t], lambda m, _: call(m))
    set_flags(student, not args.fp, True)
    torch._dynamo.utils.counters.clear()
    if args.scope == "blocks":
        compiled, regions = student, compile_repeated_blocks(student, backend=args.backend)
    else:
        compiled, regions = torch.compile(student, backend=args.backend), 1
    times = []
    for _ in range(2):
        t0 = time.time()
        call(compiled).float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t0)
    stats = torch._dynamo.utils.counters["stats"]
    kind = "FP LoRA" if args.fp else "W4A4"
    print(f"# {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}\n"
          f"# {' '.join(sys.argv)}\n| width | student | backend | scope | regions | graphs | ops captured | "
          f"first fwd+bwd s | second s |\n|---|---|---|---|---|---|---|---|---|\n| {args.width} | "
          f"{kind} | {args.backend} | {args.scope} | {regions} | {stats['unique_graphs']} | "
          f"{stats['calls_captured']} | {times[0]:.1f} | {times[1]:.2f} |")


if __name__ == "__main__":
    main()
