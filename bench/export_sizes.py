"""Disk size and parity of a real low-bit export for a given denoiser and bit-width.

    python bench/export_sizes.py --teacher assets/digits_teacher --bits 4 --act-bits 4
    python bench/export_sizes.py --ldm4 --bits 4 --act-bits 4 --output /tmp/ldm4-w4a4   # 400M params, ~8 GB RAM
    python bench/export_sizes.py --teacher assets/digits_teacher --method binarydm      # W1A4, one basis left
    python bench/export_sizes.py --teacher assets/digits_teacher --method bidm          # W1A1

Builds the EfficientDM student (or with ``--method``, the BinaryDM / BiDM student at its recipe defaults, BinaryDM
with its second bases already dropped as at the end of training) of a ``UNet2DConditionModel`` (a teacher
directory's ``unet/``, or the random LDM-4 ImageNet layout of ``bench/make_random_ldm4.py``), calibrates it on one
random batch (min-max activations: the numbers are about bytes, not quality), gives every QALoRA adapter a random
non-zero ``B`` so that the integer-domain merge is exercised, exports it with :func:`qat.export.export_quantized`,
reloads it with :func:`qat.export.load_quantized` and prints the sizes and the max output difference at two
timesteps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a clone without installing the package
    sys.path.insert(0, str(REPO))

import qat  # noqa: E402
from qat.export import export_quantized, load_quantized  # noqa: E402
from qat.export_card import export_sizes  # noqa: E402
from qat.methods import BiDM, BiDMConfig, BinaryDM, BinaryDMConfig, Calibration  # noqa: E402
from qat.methods.efficientdm import EfficientDM, EfficientDMConfig  # noqa: E402
from qat.nn.qalora import qalora_layers  # noqa: E402
from qat.quantizers import BinaryQuantizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--teacher", help="diffusers model directory with unet/")
    source.add_argument("--ldm4", action="store_true", help="random LDM-4 ImageNet layout (400.9M parameters)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--act-bits", type=int, default=4)
    parser.add_argument("--timesteps", type=int, default=20, help="rows of the temporal activation tables")
    parser.add_argument("--output", help="export directory (default: a temporary one)")
    parser.add_argument("--method", default="efficientdm", choices=["efficientdm", "binarydm", "bidm"],
                        help="binarydm / bidm: the method's student at its defaults (--bits / --act-bits ignored)")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.ldm4:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from make_random_ldm4 import ldm4_unet

        unet = ldm4_unet()
    else:
        unet = UNet2DConditionModel.from_pretrained(args.teacher, subfolder="unet")
    unet.eval()
    grid = torch.linspace(1, 999, args.timesteps).round()
    c = unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size)
    ctx = torch.randn(2, 1, c.cross_attention_dim)
    t = grid[[0, args.timesteps // 2]]

    def forward(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        with qat.timestep(model, batch[1]):
            return model(batch[0], batch[1], encoder_hidden_states=batch[2]).sample

    start = time.time()
    if args.method == "efficientdm":
        cfg = EfficientDMConfig(weight_bits=args.bits, act_bits=args.act_bits, num_timesteps=args.timesteps,
                                lora_rank=4, act_init="minmax")
        method = EfficientDM(cfg)
        student, report = method.build_student(unet, "unet")
        qat.set_timestep_grid(student, grid)
        qat.calibrate(student, [(x, t, ctx)], forward, max_samples=1024)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in qalora_layers(student).values():
                b = layer.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=gen) * 0.02)
    else:
        method = (BinaryDM(BinaryDMConfig(warmup_groups=0, lrm_weight=0.0)) if args.method == "binarydm"
                  else BiDM(BiDMConfig(spd_weight=0.0, connections=2)))
        student, report = method.build_student(unet, "unet")
        method.initialize(student, Calibration([(x, t, ctx)], forward))
        for q in student.modules():
            if isinstance(q, BinaryQuantizer):
                q.set_active_bases_(1)  # BinaryDM's end of training: the second bases are off
    print(f"student: {report if isinstance(report, str) else report.counts()}; calibrated in "
          f"{time.time() - start:.1f} s")

    out = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="diffqat-export-"))
    start = time.time()
    export_quantized(student, out, model_card={"base_model": args.teacher or "random LDM-4 layout"},
                     convert_fn=method.convert)
    print(f"exported to {out} in {time.time() - start:.1f} s")
    print(export_sizes(out))
    start = time.time()
    loaded = load_quantized(out)
    print(f"loaded in {time.time() - start:.1f} s")
    with torch.no_grad():
        diff = (forward(student, (x, t, ctx)) - forward(loaded, (x, t, ctx))).abs().max().item()
    print(f"max |student - loaded| = {diff:.3g}")


if __name__ == "__main__":
    main()
