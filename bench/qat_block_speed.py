"""One compiled block's training forward and backward, FP LoRA next to W4A4, on one GPU.

    python bench/qat_block_speed.py                                   # LDM-4 layout, batch 32, bf16, CUDA graphs
    python bench/qat_block_speed.py --blocks up_blocks.3.resnets.1 --top 12     # + the 12 longest kernels of each
    python bench/qat_block_speed.py --rows fp,w4a4,w-only,a-only,a-frozen       # where the extra GPU time goes
    python bench/qat_block_speed.py --config inductor.coordinate_descent_tuning=True   # a compiler setting, both rows
    python bench/qat_block_speed.py --tiny --device cpu --blocks down_blocks.1.attentions.0   # checks the script

The whole-model step (``bench/qat_step_speed.py``) compiles every block variant, minutes per row; this script
compiles one block per row, seconds, so that a change to the fake-quant math can be measured per block kind on
the same inputs. Each row is one block of the EfficientDM student (``--blocks``: module names), compiled as the
trainer's ``performance.compile_blocks`` does (``--compile-mode``, default ``reduce-overhead``; the memory layout
by the block's convolutions, ``--inductor-layout``: by inductor's own heuristic), called on the
inputs it receives in a batch-``B`` forward of the whole student, then ``out.float().square().mean()``
backpropagated into its adapters, quantizer parameters and inputs (no optimizer step). One timestep per sample, as
the trainer's cached batches. Rows (``--rows``):

* ``fp``: FP LoRA, every quantizer off.
* ``w4a4``: EfficientDM W4A4 with the fused STE (this project's default).
* ``w-only`` / ``a-only``: W4A4 with the activation / weight quantizers off.
* ``a-frozen``: W4A4 with the activation quantizers' steps and zero-points frozen (no step gradients).

Columns: "ms / step" (CUDA events, median of ``--steps``), "GPU ms / step" and "kernels / step" (the sum of the
kernels' own durations in ``torch.profiler`` over ``--steps`` steps, and their count), compile seconds (the
warm-up); at the end each row's GPU time over the ``fp`` row's per block, and with ``--kinds`` the GPU time by
kernel kind. ``--config`` sets ``torch._inductor.config`` (``inductor.NAME=VALUE``) or ``torch._functorch.config``
(``functorch.NAME=VALUE``, the partitioner) for every row.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qat  # noqa: E402
from bench.qat_step_speed import build_models, kernel_kinds, kernel_rows, set_flags  # noqa: E402
from qat.nn.layers import QuantConv2d, QuantLinear  # noqa: E402
from train.config import CUDA_GRAPH_MODES  # noqa: E402
from train.models.families import region_compile_kwargs  # noqa: E402

DEFAULT_BLOCKS = ("down_blocks.0.resnets.0,up_blocks.3.resnets.1,down_blocks.1.attentions.0,"
                  "up_blocks.1.attentions.0")
ROWS = {"fp": "FP LoRA", "w4a4": "W4A4", "w-only": "W4A4, weights only", "a-only": "W4A4, activations only",
        "a-frozen": "W4A4, activation steps frozen"}


def block_inputs(student: torch.nn.Module, names: list[str], call: Callable[[], Any]) -> dict[str, tuple]:
    """``(args, kwargs)`` each named block receives during ``call()`` (the first time it runs)."""
    seen: dict[str, tuple] = {}
    handles = []
    for name in names:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            seen.setdefault(name, (args, kwargs))
        handles.append(student.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        call()
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise ValueError(f"blocks never called in a forward: {missing}")
    return seen


def set_row(student: torch.nn.Module, row: str) -> None:
    """The quantizer flags of ``row`` (a key of ``ROWS``) on every quantized layer of ``student``."""
    set_flags(student, row != "fp", fused=True)
    for m in student.modules():
        if not isinstance(m, (QuantConv2d, QuantLinear)):
            continue
        if m.weight_quantizer is not None and row == "a-only":
            m.weight_quantizer.enabled = False
        if m.act_quantizer is not None:
            if row == "w-only":
                m.act_quantizer.enabled = False
            for p in m.act_quantizer.parameters():
                p.requires_grad_(row != "a-frozen")


def compiler_settings(items: list[str]) -> contextlib.ExitStack:
    """``inductor.NAME=VALUE`` / ``functorch.NAME=VALUE`` as patched configs (values are Python literals)."""
    import torch._functorch.config
    import torch._inductor.config

    modules = {"inductor": torch._inductor.config, "functorch": torch._functorch.config}
    stack = contextlib.ExitStack()
    for item in items:
        name, sep, value = item.partition("=")
        scope, _, key = name.partition(".")
        if not sep or scope not in modules or not key:
            raise ValueError(f"--config {item!r}: expected inductor.NAME=VALUE or functorch.NAME=VALUE")
        stack.enter_context(modules[scope].patch({key: ast.literal_eval(value)}))
    return stack


def build(args: argparse.Namespace, names: list[str]) -> tuple[torch.nn.Module, torch.Tensor, dict[str, tuple]]:
    """The calibrated EfficientDM W4A4 student, per-sample timesteps ``(B,)`` and the named blocks' inputs."""
    device = torch.device(args.device)
    teacher, student = build_models(device, args.tiny)
    grid = torch.arange(1, 1000, 10, device=device)  # DDIM-100's timesteps
    qat.set_timestep_grid(student, grid)
    b, size = args.batch, teacher.config.sample_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(b, 3, size, size, generator=gen).to(device)
    ctx = torch.randn(b, 1, 512, generator=gen).to(device)
    t = grid[torch.randint(0, 100, (b,), generator=gen).to(device)]

    def whole() -> torch.Tensor:
        with qat.timestep(student, t):
            return student(x, t, encoder_hidden_states=ctx, return_dict=False)[0]

    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
        qat.calibrate(student, [t], lambda m, t_: whole())
        inputs = block_inputs(student, names, whole)
    return student, t, inputs


def time_block(block: torch.nn.Module, inputs: tuple, t: torch.Tensor, args: argparse.Namespace,
               ) -> tuple[float, float, float, float, list[tuple[str, float, float]]]:
    """Compiles ``block`` afresh and times its forward and backward with the flags as set:
    ``(ms / step, GPU ms / step, kernels / step, compile s, kernel rows)``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(args.device).type == "cuda"
    graphs = args.compile_mode in CUDA_GRAPH_MODES
    quantizers = qat.temporal_quantizers(block)
    a, kw = inputs
    leaves = [v.detach().requires_grad_(v.is_floating_point()) if torch.is_tensor(v) else v for v in a]
    torch._dynamo.reset()
    kwargs = {"mode": args.compile_mode, "dynamic": False}
    compiled = torch.compile(block, **(kwargs if args.inductor_layout else region_compile_kwargs(block, **kwargs)))
    params = [p for p in block.parameters() if p.requires_grad]

    def step() -> None:
        for p in params + [v for v in leaves if torch.is_tensor(v)]:  # as an optimizer's zero_grad(set_to_none)
            p.grad = None
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(args.device.split(":")[0], torch.bfloat16), \
                qat.timestep(block, t, quantizers, reuse=True):
            out = compiled(*leaves, **kw)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()

    t0 = time.time()
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    compile_s = time.time() - t0
    times = []
    for _ in range(args.steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t1 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t1) * 1e3)
    rows: list[tuple[str, float, float]] = []
    if cuda:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        rows = kernel_rows(prof, args.steps)
    gpu = sum(r[1] for r in rows) if cuda else statistics.median(times)
    return statistics.median(times), gpu, sum(r[2] for r in rows), compile_s, rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", default=DEFAULT_BLOCKS, help="comma-separated module names of the student")
    p.add_argument("--rows", default="fp,w4a4", help=f"comma-separated, first the reference: {', '.join(ROWS)}")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile-mode", default="reduce-overhead")
    p.add_argument("--config", action="append", default=[], metavar="SCOPE.NAME=VALUE",
                   help="a torch._inductor / torch._functorch config value for every row (repeatable)")
    p.add_argument("--inductor-layout", action="store_true",
                   help="leave each compiled region's memory layout to inductor's own heuristic; default: decided "
                   "by the region's convolutions, as the trainer "
                   "(train.models.families.prefers_channels_last)")
    p.add_argument("--top", type=int, default=0, help="print the N kernels with the most device time per row")
    p.add_argument("--kinds", action="store_true", help="print the GPU time by kernel kind per row")
    p.add_argument("--tiny", action="store_true", help="tiny UNet (checks the script on a CPU)")
    p.add_argument("--device", default="cuda")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    names = [n for n in args.blocks.split(",") if n]
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise SystemExit(f"--rows: unknown {unknown}; known: {', '.join(ROWS)}")
    device = torch.device(args.device)
    settings = compiler_settings(args.config)  # a bad --config fails here, before the model is built
    with settings:
        _run(args, names, rows, device)


def _run(args: argparse.Namespace, names: list[str], rows: list[str], device: torch.device) -> None:
    student, t, inputs = build(args, names)
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {gpu_name}, torch {torch.__version__}, {datetime.date.today()}, batch {args.batch}, bf16 autocast, "
          f"compile mode {args.compile_mode}\n# {' '.join(sys.argv)}", flush=True)
    print("| block | row | ms / step | GPU ms / step | kernels / step | compile s |\n|---|---|---|---|---|---|",
          flush=True)
    results: dict[tuple[str, str], float] = {}
    notes: list[str] = []
    for name in names:
        for row in rows:
            set_row(student, row)
            ms, gpu, kernels, compile_s, krows = time_block(student.get_submodule(name), inputs[name], t, args)
            results[(name, row)] = gpu
            print(f"| {name} | {ROWS[row]} | {ms:.2f} | {gpu:.2f} | {kernels:.0f} | {compile_s:.0f} |", flush=True)
            if args.top:
                notes.append(f"\n## {name}, {ROWS[row]}: top kernels (ms / step, calls / step)\n" + "\n".join(
                    f"{k_ms:8.3f} {n:5.1f}  {k[:160]}" for k, k_ms, n in krows[:args.top]))
            if args.kinds:
                notes.append(f"\n## {name}, {ROWS[row]}: GPU ms / step by kernel kind (kernels / step)\n"
                             + "\n".join(f"{kind}: {k_ms:.3f} ({n:.0f})"
                                         for kind, (k_ms, n) in kernel_kinds(krows).items()))
    set_row(student, "w4a4")
    ref = rows[0]
    print(f"\n| block | {' | '.join(ROWS[r] for r in rows[1:])} |  GPU time / {ROWS[ref]}\n|---|"
          + "---|" * (len(rows) - 1))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{results[(name, r)] / results[(name, ref)]:.3f}" for r in rows[1:])
              + " |")
    print("\n".join(notes), flush=True)


if __name__ == "__main__":
    main()
