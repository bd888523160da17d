"""The BinaryDM W1A4 training step (with LRM) next to the FP LoRA step, side by side on one GPU.

    python bench/binarydm_step_speed.py                       # LSUN-Bedrooms LDM-4 layout (274.1M), batch 32, bf16
    python bench/binarydm_step_speed.py --mode blocks --compile-mode reduce-overhead   # regional compile + CUDA graphs
    python bench/binarydm_step_speed.py --rows fp,binary,binary_no_lrm --profile       # + LRM's share, top kernels
    python bench/binarydm_step_speed.py --tiny --device cpu   # checks the script itself on a CPU (tiny UNet)

Rows (median of ``--steps`` timed steps after ``--warmup``; peak memory allocated and reserved from the first
warm-up step on). Each row builds its own student and optimizer and frees them before the next, so a row's peak
holds the teacher, its own student, gradients, optimizer state and activations. ``--mode blocks`` compiles every
repeated block of both students in place (``performance.compile_blocks``, :func:`train.models.families.
compile_repeated_blocks`), with ``--compile-mode`` as ``performance.compile_mode``; the quantizers outside the blocks
then use the compiled kernels with CUDA graphs, as the trainer does.

* ``FP LoRA step``: the EfficientDM student of the same teacher with every quantizer off (each adapted layer
  computes ``f(x, W + B A)``), output MSE, AdamW over the adapters: the reference of the issue's targets.
* ``BinaryDM W1A4 step``: the BinaryDM student (1-bit weights, two bases on the high-resolution blocks, 4-bit LSQ
  activations, W8A8 edges, every parameter trained), output MSE + ``basis_l1`` + LRM on the 25 block outputs (the
  student's blocks tapped with gradients, projected onto bases fitted from the teacher), AdamW over the trainer's
  groups. The teacher's target and block features are computed once before timing, as the trainer's online source
  captures them during trajectory generation for both methods.
* ``BinaryDM W1A4 step, no LRM`` (``--rows ...,binary_no_lrm``): the same without the LRM term and its taps.

Prints the table and the ratios BinaryDM / FP LoRA of throughput (target >= 0.9) and peak memory (<= 1.2).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qat  # noqa: E402
from bench.qat_step_speed import Timer, print_profile, set_flags  # noqa: E402
from qat.losses import LossInputs  # noqa: E402
from qat.methods import BinaryDM, BinaryDMConfig, Calibration, EfficientDM, EfficientDMConfig  # noqa: E402
from qat.taps import FeatureTaps  # noqa: E402
from train.config import CUDA_GRAPH_MODES  # noqa: E402
from train.models.families import compile_repeated_blocks  # noqa: E402


def build_teacher(device: torch.device, tiny: bool) -> torch.nn.Module:
    """The random LSUN-Bedrooms LDM-4 layout (or a tiny unconditional UNet), frozen, seed 0."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    if tiny:
        config = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D"), norm_num_groups=8,
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
    else:
        from train.tools.convert_compvis import LAYOUTS, teacher_spec

        config = teacher_spec(LAYOUTS["lsun_bedrooms-ldm-vq-4"]).unet_config
    with torch.device(device):
        teacher = UNet2DModel.from_config(config)
    return teacher.requires_grad_(False).eval()


def step_parser(doc: str, rows: str, rows_help: str) -> argparse.ArgumentParser:
    """The options every step comparison takes (batch, steps, warm-up, tiny, device, rows, profile)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", default=rows, help=rows_help)
    parser.add_argument("--profile", action="store_true", help="torch.profiler over two steps of each row")
    return parser


def setup(args: argparse.Namespace) -> tuple[torch.device, bool, torch.nn.Module]:
    """``(device, is CUDA, frozen teacher)``, with TF32 matmuls on a GPU."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device, cuda, build_teacher(device, args.tiny)


def time_rows(rows: dict[str, tuple[str, Callable[[], Callable[[], None]]]], keys: list[str],
              args: argparse.Namespace, device: torch.device, teacher: torch.nn.Module,
              mode: str) -> dict[str, tuple[float, float]]:
    """Prints the header and one table row per key of ``rows`` (label, step builder); returns key -> (median ms,
    peak GiB). Each row's step is built after the previous row's was freed, so peaks do not add up."""
    cuda = device.type == "cuda"
    b, size = args.batch, teacher.config.sample_size
    timer = Timer(device)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"# {name}, torch {torch.__version__}, {datetime.date.today()}, UNet "
          f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M parameters, batch {b} of 3x{size}x{size}, "
          f"bf16 autocast, {mode}\n# {' '.join(sys.argv)}")
    print("| row | ms / step | samples/s | peak GiB | peak reserved GiB |\n|---|---|---|---|---|", flush=True)
    results = {}
    for key in keys:
        label, make = rows[key]
        torch._dynamo.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        fn = make()
        for _ in range(args.warmup):
            fn()
        ms = statistics.median(timer.run(fn, args.steps)) * 1e3
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
        reserved = torch.cuda.max_memory_reserved(device) / 2**30 if cuda else float("nan")
        results[key] = (ms, peak)
        print(f"| {label} | {ms:.1f} | {b / ms * 1e3:.1f} | {peak:.2f} | {reserved:.2f} |", flush=True)
        if getattr(args, "profile", False):
            print_profile(fn, label, cuda)
        del fn
    return results


def fp_lora_step(teacher: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                 finish: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
                 graphs: bool = False) -> Callable[[], None]:
    """The reference step: the EfficientDM student of ``teacher`` with every quantizer off (each adapted layer
    computes ``f(x, W + B A)``), output MSE against the teacher, AdamW over the rank-32 adapters."""
    device = x.device
    lora, _ = EfficientDM(EfficientDMConfig(act_init="minmax")).build_student(teacher, "unet")
    lora.to(device)
    set_flags(lora, quantized=False, fused=True)
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
        target = teacher(x, t).sample.float()
    model = finish(lora)
    opt = torch.optim.AdamW(qat.param_groups(lora, lora_lr=1e-6, scale_aware=False), fused=device.type == "cuda")

    def fn() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, torch.bfloat16):
            out = model(x, t).sample
        F.mse_loss(out.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return fn


def add_compile_args(parser: argparse.ArgumentParser) -> None:
    """``--mode eager|blocks`` (regional compilation of the repeated blocks, as ``performance.compile_blocks``) and
    ``--compile-mode``."""
    parser.add_argument("--mode", default="eager", choices=["eager", "blocks"])
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode with --mode blocks")


def compile_finisher(args: argparse.Namespace) -> tuple[Callable[[torch.nn.Module], torch.nn.Module], bool, str]:
    """``(finish, CUDA graphs, mode label)``: ``finish(model)`` applies ``--mode`` to a built student in place."""
    graphs = args.mode == "blocks" and args.compile_mode in CUDA_GRAPH_MODES

    def finish(student: torch.nn.Module) -> torch.nn.Module:
        qat.set_fast_path(student, compiled_kernels=graphs)
        if args.mode == "blocks":
            kwargs = {"mode": args.compile_mode} if args.compile_mode != "default" else {}
            compile_repeated_blocks(student, **kwargs)
        return student

    return finish, graphs, args.mode + (f", {args.compile_mode}" if args.mode == "blocks" else "")


def main() -> None:
    parser = step_parser(__doc__, "fp,binary", "comma-separated: fp, binary, binary_no_lrm")
    add_compile_args(parser)
    args = parser.parse_args()
    device, cuda, teacher = setup(args)
    b, size = args.batch, teacher.config.sample_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, size, size, generator=gen).to(device)
    t = torch.randint(1, 1000, (b,), generator=gen).to(device)
    finish, graphs, mode = compile_finisher(args)

    def binary_step(lrm: bool) -> Callable[[], None]:
        binary = BinaryDM(BinaryDMConfig(lrm_weight=1e-4 if lrm else 0.0))
        student, _ = binary.build_student(teacher, "unet")
        student.to(device)
        taps = binary.lrm.taps() if lrm else []
        with torch.autocast(device.type, torch.bfloat16):
            binary.initialize(student, Calibration([x], lambda m, batch: m(batch, t).sample))
            with torch.no_grad(), FeatureTaps(teacher, taps) as tapped:
                target = teacher(x, t).sample.float()
            features = {k: v.detach() for k, v in tapped.features.items()}
        terms = [term.to(device) for term in binary.loss_terms()]
        model = finish(student)
        opt = torch.optim.AdamW(binary.param_groups(student), fused=cuda)

        def fn() -> None:
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(device.type, torch.bfloat16), FeatureTaps(student, names=list(features)) as own:
                out = model(x, t).sample.float()
            inputs = LossInputs(student_out=out, teacher_out=target, t=t, guided=False, guidance=1.0,
                                student_features=own.features, teacher_features=features, student=student)
            loss = F.mse_loss(out, target) + sum(term.config.weight * term(inputs) for term in terms)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return fn

    rows = {"fp": ("FP LoRA step", lambda: fp_lora_step(teacher, x, t, finish, graphs)),
            "binary": ("BinaryDM W1A4 step", lambda: binary_step(True)),
            "binary_no_lrm": ("BinaryDM W1A4 step, no LRM", lambda: binary_step(False))}
    results = time_rows(rows, args.rows.split(","), args, device, teacher, mode)
    if "fp" in results and "binary" in results:
        (fp_ms, fp_peak), (bin_ms, bin_peak) = results["fp"], results["binary"]
        print(f"\nBinaryDM / FP LoRA: throughput {fp_ms / bin_ms:.3f} (target >= 0.9), peak memory "
              f"{bin_peak / fp_peak if cuda else float('nan'):.3f} (target <= 1.2)")


if __name__ == "__main__":
    main()
