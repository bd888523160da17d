"""The QAT training step and trajectory generation next to the FP LoRA reference, on one GPU.

    python bench/qat_step_speed.py                        # LDM-4 layout (400.9M parameters), batch 32, bf16
    python bench/qat_step_speed.py --modes blocks --rows fp,fused   # regional compilation (compile_blocks)
    python bench/qat_step_speed.py --modes blocks --rows fp,fused --compile-mode reduce-overhead   # + CUDA graphs
    python bench/qat_step_speed.py --modes eager --profile          # + torch.profiler: host vs device, top kernels
    python bench/qat_step_speed.py --modes blocks --rows fp,fused --profile --kernels-out k   # + every kernel per row
    python bench/kernel_diff.py k/FP_LoRA_step_blocks.tsv k/W4A4_step_fused_STE_blocks.tsv  # the two by kernel group
    python bench/qat_step_speed.py --tiny --device cpu    # checks the script itself on a CPU (tiny UNet)

Every row is the median of ``--steps`` timed steps after ``--warmup`` untimed ones (a compiled variant compiles
during its warm-up; its compile time is printed apart), with the peak memory allocated during the timed steps:

* ``teacher forward``: the frozen teacher (bf16 weights), no grad, batch ``B``.
* ``FP LoRA step``: the EfficientDM student with every quantizer off: each adapted layer computes
  ``f(x, W + B A)`` (rank-32 adapters merged into the weight on every step), AdamW over the adapters.
* ``W4A4 step, composite STE``: EfficientDM W4A4 (QALoRA + temporal LSQ activations, W8A8 first/last/time
  layers) with the fake quantizers written as composite ``round_ste`` ops (``qat.set_fast_path(fused=False)``), the
  reference path.
* ``W4A4 step, fused STE``: the same model through :func:`qat.ste.fake_quantize_ste` (one autograd node per
  quantizer that keeps only its input), this project's default. In ``--modes blocks`` its quantizers outside the
  compiled blocks (``conv_in``, the time embedding, ``conv_out``) use the compiled kernels below with CUDA graphs,
  as the trainer does with ``performance.compile_blocks`` (``--stem-kernels on|off`` in any mode), and each
  block's memory layout is decided by its convolutions (``train.models.families.prefers_channels_last``;
  ``--inductor-layout``: by inductor's own heuristic, as before).
* ``W4A4 step, fused STE, compiled kernels``: the same with ``qat.set_fast_path(compiled_kernels=True)`` (the quantizer
  math compiled into one kernel per quantizer and pass; the model eager; only with ``--modes`` containing eager).
* ``... mixed timesteps``: every sample of the batch at its own timestep (per-sample temporal steps).
* ``trajectory generation``: :func:`train.data.trajectories.trajectory_steps` (DDIM, eta 1, CFG 1.5: ``B / 2``
  trajectories, so every teacher call has batch ``B``), per teacher call, against the compiled teacher forward;
  one row per ``--gen-modes`` compile mode of the teacher (``reduce-overhead``: CUDA graphs), each checked
  against the first on the same three steps.

"host ms / step" is one step launched on an idle GPU: the host's own work; a row whose host time is near its step
time is bound by the host. "GPU ms / step" is one step queued behind a sleep kernel, so that the GPU runs it without
waiting for the host: its device time; a row whose step time is near it is bound by the GPU. "peak GiB" is the
allocated peak over the timed steps, "peak reserved GiB" the reserved peak from the warm-up on (CUDA graphs
allocate their memory pool while recording, in the warm-up, and the allocated figure does not see it).
``--alternate N`` re-times the FP LoRA and W4A4 steps in N turns after both compiled, ``--gen-repeats N`` pairs
each generation timing with a forward timing just before it. ``--compile-mode`` is the ``torch.compile`` mode of
the compiled and blocks student rows (``performance.compile_mode``; the teacher keeps the default, as in the
trainer); with CUDA graphs every step begins with ``torch.compiler.cudagraph_mark_step_begin()``, as the trainer's.

All steps use bf16 autocast, a fused AdamW on CUDA (parameter groups by role, as the trainer's, with one LoRA
learning rate) and the same inputs; the FP and W4A4 steps share one student
(flags switched between rows) and each row builds its own optimizer. Ratios at the end: QAT / FP LoRA throughput
(target >= 0.95) and peak memory (<= 1.15; the reserved peak for CUDA graphs) with the same compile
setting, mixed / single timestep cost (<= 1.03), generation / compiled forward throughput (>= 0.9).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qat  # noqa: E402
from bench.make_random_ldm4 import ldm4_unet  # noqa: E402
from qat.methods.efficientdm import EfficientDM, EfficientDMConfig  # noqa: E402
from qat.quantizers import Quantizer  # noqa: E402
from train.config import CUDA_GRAPH_MODES  # noqa: E402
from train.models.families import compile_repeated_blocks  # noqa: E402


def tiny_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=512, attention_head_dim=1, norm_num_groups=8)


class Timer:
    """Per-step wall time: CUDA events on a GPU (no host synchronisation between steps), perf_counter on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def host(self, fn: Callable[[], None], steps: int) -> float:
        """Median host time of one call started on an idle GPU: the Python, dispatch and launch work alone (the
        launch queue does not fill in one call of up to ~1000 kernels). A step whose host time is close to its
        step time is bound by the host, not by the GPU."""
        times = []
        for _ in range(steps):
            if self.cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if self.cuda:
            torch.cuda.synchronize()
        return statistics.median(times)

    def device(self, fn: Callable[[], None], steps: int, host_s: float) -> float:
        """Median GPU time of one call whose launches are all queued before the GPU reaches them: a sleep kernel
        longer than the host's time for the call goes first, then the timed call. With no host synchronisation
        inside the call this is its device time alone; a step close to it is bound by the GPU."""
        if not self.cuda:
            return float("nan")
        times = []
        for _ in range(steps):
            torch.cuda.synchronize()
            torch.cuda._sleep(int(2e9 * (2 * host_s + 0.05)))  # ~2 GHz clock: twice the host time, and 50 ms more
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    def run(self, fn: Callable[[], None], steps: int) -> list[float]:
        if not self.cuda:
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return times
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in events]


def set_flags(student: torch.nn.Module, quantized: bool, fused: bool) -> None:
    for m in student.modules():
        if isinstance(m, Quantizer):
            m.enabled = quantized
    qat.set_fast_path(student, fused=fused)


def print_saved_bytes(student: torch.nn.Module, call: Callable, t: torch.Tensor, b: int, size: int,
                      device: torch.device) -> None:
    """Bytes saved for backward by one bf16-autocast forward of each variant (``saved_tensors_hooks``)."""
    print(f"# saved-for-backward bytes, one forward, batch {b} of 3x{size}x{size}, bf16 autocast, {device.type}, "
          f"torch {torch.__version__}, {datetime.date.today()}\n# {' '.join(sys.argv)}")
    print("| variant | saved GiB | vs FP LoRA |\n|---|---|---|")
    base = None
    for name, quantized, fused in (("FP LoRA", False, True), ("W4A4, composite STE", True, False),
                                   ("W4A4, fused STE", True, True)):
        set_flags(student, quantized, fused)
        seen: dict[int, int] = {}

        def pack(x: torch.Tensor, seen: dict[int, int] = seen) -> torch.Tensor:
            # a tensor saved by several nodes is stored once; parameters are not activation memory
            if not isinstance(x, torch.nn.Parameter):
                seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), torch.autocast(device.type, torch.bfloat16):
            out = call(student, t)
        total = sum(seen.values()) / 2**30
        base = total if base is None else base
        print(f"| {name} | {total:.2f} | {total / base:.2f}x |", flush=True)
        del out
    set_flags(student, True, True)


def kernel_rows(prof: Any, steps: int) -> list[tuple[str, float, float]]:
    """``(kernel name, GPU ms / step, launches / step)`` of a CUDA ``torch.profiler`` run over ``steps`` steps,
    longest first (the profiler's ``Optimizer.step`` annotation, which also appears on the device, is left out)."""
    rows = [(e.key, e.self_device_time_total / 1e3 / steps, e.count / steps) for e in prof.key_averages()
            if e.device_type.name == "CUDA" and not e.key.startswith(("Optimizer.", "ProfilerStep"))]
    return sorted(rows, key=lambda r: -r[1])


#: kernel kind -> name fragments, first match wins (cuDNN / cuBLAS / Triton / ATen names on an H100 / H200)
KERNEL_KINDS = {
    "attention": ("fmha", "flash", "attention_kernel", "AttentionBackward"),
    "NCHW/NHWC conversion": ("nchwToNhwc", "nhwcToNchw"),
    "fused AdamW": ("FusedOptimizerTensor",),
    "GEMM and convolution": ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_", "splitKreduce"),
    "Triton reduction": ("triton_red", "triton_per"),
    "Triton pointwise": ("triton_poi",),
}


def kernel_kinds(rows: list[tuple[str, float, float]]) -> dict[str, tuple[float, float]]:
    """``{kind: (GPU ms / step, launches / step)}`` of :func:`kernel_rows` by :data:`KERNEL_KINDS` (else "other")."""
    out: dict[str, tuple[float, float]] = {}
    for name, ms, n in rows:
        kind = next((k for k, parts in KERNEL_KINDS.items() if any(p in name for p in parts)), "other")
        old = out.get(kind, (0.0, 0.0))
        out[kind] = (old[0] + ms, old[1] + n)
    return out


def print_profile(fn: Callable[[], None], label: str, cuda: bool, steps: int = 2, out: Path | None = None) -> None:
    """torch.profiler over ``steps`` calls of ``fn``: host time per step, the GPU time by kernel kind and the top
    kernels by device time; with ``out`` also every kernel of the row (name, GPU ms and launches per step) as a
    tab-separated file named after the label, to compare two rows kernel by kernel."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        host = (time.perf_counter() - t0) / steps  # the host's own time: launches are asynchronous
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    rows = kernel_rows(prof, steps) if cuda else []
    print(f"\n## profile: {label}: host {host * 1e3:.1f} ms / step (profiled), device busy "
          f"{sum(r[1] for r in rows):.1f} ms / step, {sum(r[2] for r in rows):.0f} kernels / step\n")
    if out is not None and rows:
        out.mkdir(parents=True, exist_ok=True)
        path = out / (re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_") + ".tsv")
        path.write_text("".join(f"{ms:.4f}\t{n:.1f}\t{name}\n" for name, ms, n in rows))
        print(f"# every kernel: {path}")
    if cuda:
        print("| kernel kind | GPU ms / step | kernels / step |\n|---|---|---|")
        for kind, (ms, n) in kernel_kinds(rows).items():
            print(f"| {kind} | {ms:.2f} | {n:.0f} |")
    for key in (["self_device_time_total"] if cuda else []) + ["self_cpu_time_total"]:
        print(events.table(sort_by=key, row_limit=15, max_name_column_width=70), flush=True)


def build_models(device: torch.device, tiny: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The frozen random teacher (LDM-4 layout, or the tiny UNet) and its EfficientDM W4A4 student (uncalibrated),
    on ``device``, with TF32 matmuls on a GPU and seed 0."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    with torch.device(device):
        teacher = tiny_unet() if tiny else ldm4_unet()
    teacher.requires_grad_(False).eval()
    student, _ = EfficientDM(EfficientDMConfig(act_init="minmax")).build_student(teacher, "unet")
    return teacher, student.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny UNet (checks the script on a CPU)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", default="teacher,fp,composite,fused,kernels,mixed,generation",
                        help="comma-separated subset of the rows")
    parser.add_argument("--modes", default="compiled,eager",
                        help="comma-separated: eager, compiled (whole model), blocks (each ResNet / transformer block "
                             "compiled in place, as performance.compile_blocks; run it last)")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode of the compiled and blocks student rows (performance.compile_mode), "
                             "e.g. reduce-overhead: CUDA graphs of the compiled graphs, replayed in each step; the "
                             "teacher rows keep the default mode")
    parser.add_argument("--gen-steps", type=int, default=10, help="DDIM steps timed for trajectory generation")
    parser.add_argument("--gen-modes", default="default",
                        help="comma-separated torch.compile modes of the teacher for the generation rows, e.g. "
                             "default,reduce-overhead (CUDA graphs; docs/performance.md: no gain measured)")
    parser.add_argument("--gen-repeats", type=int, default=3,
                        help="generation calls, each timed after a timing of the compiled forward (paired ratios)")
    parser.add_argument("--alternate", type=int, default=0,
                        help="after the rows, time the FP LoRA and W4A4 steps in turns this many times each (median "
                             "of --steps per turn); their ratio then uses the medians of the turns")
    parser.add_argument("--inductor-layout", action="store_true",
                        help="leave each compiled region's memory layout to inductor's own heuristic; default: "
                        "decided by the region's convolutions, as the trainer "
                        "(train.models.families.prefers_channels_last)")
    parser.add_argument("--stem-kernels", choices=("auto", "on", "off"), default="auto",
                        help="blocks mode: the W4A4 rows' quantizers outside the compiled blocks (conv_in, the time "
                        "embedding, conv_out) through compiled kernels (qat.set_fast_path(compiled_kernels=True); "
                        "on) or eager (off); auto: as the trainer's unset performance.compile_kernels, on with a "
                        "CUDA-graph --compile-mode")
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip the remaining rows after this long")
    parser.add_argument("--profile", action="store_true",
                        help="after each row, torch.profiler over two more steps: the kernels that take the most "
                             "device time and the host (CPU) time per step")
    parser.add_argument("--kernels-out", type=Path, default=None,
                        help="with --profile: write every kernel of each profiled row to a .tsv file in this folder")
    parser.add_argument("--saved-bytes", action="store_true",
                        help="only count the bytes each variant saves for backward in one eager forward (any device; "
                             "the activation-memory part of the peak, without timing)")
    args = parser.parse_args()
    if args.kernels_out is not None and not (args.profile and args.device.startswith("cuda")):
        parser.error("--kernels-out lists the GPU kernels of --profile: it needs --profile and a CUDA --device")
    device = torch.device(args.device)
    rows, modes = args.rows.split(","), args.modes.split(",")
    start = time.time()
    cuda = device.type == "cuda"
    teacher, student = build_models(device, args.tiny)
    n_params = sum(p.numel() for p in teacher.parameters())
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                         steps_offset=1, clip_sample=False)
    ddim.set_timesteps(100)
    grid = ddim.timesteps.to(device)
    qat.set_timestep_grid(student, grid)
    b, size = args.batch, teacher.config.sample_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(b, 3, size, size, generator=gen).to(device)
    ctx = torch.randn(b, 1, 512, generator=gen).to(device)
    target = torch.randn(b, 3, size, size, generator=gen).to(device)
    t_single = grid[50].repeat(b)
    t_mixed = grid[torch.randint(0, 100, (b,), generator=gen).to(device)]
    quantizers = qat.temporal_quantizers(student)

    def student_call(model: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
        with qat.timestep(student, t, quantizers, reuse=True):  # as the trainer: CUDA graphs keep their inputs
            return model(x, t, encoder_hidden_states=ctx, return_dict=False)[0]

    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):  # PTQ initialisation (min/max, one batch)
        qat.calibrate(student, [t_mixed], lambda m, t: student_call(m, t))
    teacher_bf16 = teacher.to(torch.bfloat16)

    if args.saved_bytes:
        print_saved_bytes(student, student_call, t_single, b, size, device)
        return

    print(f"# {torch.cuda.get_device_name(device) if cuda else 'CPU'}, torch {torch.__version__}, "
          f"{datetime.date.today()}, UNet {n_params / 1e6:.1f}M parameters, batch {b} of 3x{size}x{size}, "
          f"bf16 autocast\n# {' '.join(sys.argv)}", flush=True)
    print("| row | mode | ms / step | samples/s | peak GiB | peak reserved GiB | compile s | host ms / step | "
          "GPU ms / step |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    results: dict[tuple[str, str], tuple[float, float, float]] = {}
    timer = Timer(device)
    graphs = args.compile_mode in CUDA_GRAPH_MODES

    def mark_step() -> None:
        """With CUDA graphs (cudagraph trees), a new step may overwrite the previous step's graph outputs."""
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
    made: dict[tuple[str, str], Callable[[], None]] = {}  # the step of each measured row, for --alternate

    def measure(row: str, mode: str, make_fn: Callable[[], Callable[[], None]], reset: bool = True) -> None:
        if time.time() - start > args.budget_s:
            print(f"| {row} | {mode} | skipped (--budget-s) | | | | | | |", flush=True)
            return
        if reset:  # each row compiles from scratch; ``reset=False`` reuses the previous row's graphs
            torch._dynamo.reset()
        fn = make_fn()
        if cuda:  # the reserved peak covers the warm-up: CUDA graphs take their memory pool while recording
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.time()
        timer.run(fn, args.warmup)
        if cuda:
            torch.cuda.synchronize()
        warm_s = time.time() - t0
        reserved_warm = torch.cuda.max_memory_reserved(device) if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = timer.run(fn, args.steps)
        med = statistics.median(times)
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
        reserved = max(reserved_warm, torch.cuda.max_memory_reserved(device)) / 2**30 if cuda else float("nan")
        results[(row, mode)] = (med, mem, reserved)
        made[(row, mode)] = fn
        compile_s = f"{warm_s:.0f}" if mode != "eager" or "compiled kernels" in row else "-"
        host = timer.host(fn, args.steps)
        gpu = timer.device(fn, args.steps, host)
        print(f"| {row} | {mode} | {med * 1e3:.1f} | {b / med:.1f} | {mem:.1f} | {reserved:.1f} | {compile_s} | "
              f"{host * 1e3:.1f} | {gpu * 1e3:.1f} |", flush=True)
        if args.profile:
            print_profile(fn, f"{row}, {mode}", cuda, out=args.kernels_out)

    def teacher_fn(mode: str) -> Callable[[], Callable[[], None]]:
        def make() -> Callable[[], None]:
            # the default mode, as the trainer's teacher: outside autograd the CUDA graphs of compiled blocks
            # overwrite each other's outputs (train.models.families.denoise); --gen-modes times the teacher's modes
            model = torch.compile(teacher_bf16) if mode == "compiled" else teacher_bf16
            if mode == "blocks" and not getattr(teacher_bf16, "_bench_blocks", False):
                compile_repeated_blocks(teacher_bf16, layout_by_convolutions=not args.inductor_layout)
                teacher_bf16._bench_blocks = True

            def fn() -> None:
                with torch.no_grad():
                    model(x.bfloat16(), t_single, encoder_hidden_states=ctx.bfloat16(), return_dict=False)
            return fn
        return make

    compiled_students: dict[tuple[bool, bool], torch.nn.Module] = {}

    def step_fn(mode: str, quantized: bool, fused: bool, t: torch.Tensor,
                kernels: bool = False) -> Callable[[], Callable[[], None]]:
        # blocks: the quantized layers outside the compiled blocks (conv_in, the time embedding, conv_out) are eager
        stem = args.compile_mode in CUDA_GRAPH_MODES if args.stem_kernels == "auto" else args.stem_kernels == "on"
        kernels = kernels or (mode == "blocks" and stem and quantized and fused)

        def make() -> Callable[[], None]:
            set_flags(student, quantized, fused)
            qat.set_fast_path(student, compiled_kernels=kernels)
            model = student
            if mode == "compiled":
                model = compiled_students.setdefault((quantized, fused),
                                                     torch.compile(student, mode=args.compile_mode))
            elif mode == "blocks" and not getattr(student, "_bench_blocks", False):
                # in place, once: later rows recompile after the dynamo reset
                compile_repeated_blocks(student, mode=args.compile_mode,
                                        layout_by_convolutions=not args.inductor_layout)
                student._bench_blocks = True
            # the trainer's groups by role (adapters, weight quantizers, activation quantizers; one LoRA learning
            # rate): a fused AdamW launch takes a bounded number of tensors, and the quantizers' hundreds of tiny
            # tensors interleaved with the adapters' large ones spread the adapters over many half-empty launches
            groups = qat.param_groups(student, lora_lr=1e-6, scale_aware=False)
            opt = torch.optim.AdamW(groups, fused=cuda)

            def fn() -> None:
                mark_step()
                with torch.autocast(device.type, torch.bfloat16):
                    out = student_call(model, t)
                F.mse_loss(out.float(), target).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            def activate() -> None:  # this row's flags again (--alternate switches between rows)
                set_flags(student, quantized, fused)
                qat.set_fast_path(student, compiled_kernels=kernels)
            fn.activate = activate
            return fn
        return make

    def measure_generation() -> None:
        """Teacher DDIM + CFG trajectories (train.data.trajectories), per teacher call, with the teacher compiled in
        each of ``--gen-modes``; later modes are checked against the first."""
        if time.time() - start > args.budget_s:
            print("| trajectory generation | compiled | skipped (--budget-s) | | | | | | |", flush=True)
            return
        from train.data.trajectories import trajectory_steps
        from train.models.class_embedder import ClassEmbedder
        from train.models.teacher import Teacher

        embedder = ClassEmbedder(num_classes=1000, embed_dim=512).to(device)
        tch = Teacher(unet=teacher_bf16, scheduler=ddim, conditioning="class", class_embedder=embedder)
        steps, first, idx = args.gen_steps, None, list(range(b // 2))
        for gen_mode in args.gen_modes.split(","):
            torch._dynamo.reset()
            teacher_bf16.compile(mode=gen_mode)  # in place, as the trainer compiles: the module keeps its class
            walk = trajectory_steps(tch, idx, 3, 1.0, 1.5, 0, device)  # compile + warm-up
            if first is None:
                first, agree = walk, "reference"
            else:  # the same 3 DDIM steps: equal up to bf16 kernel choices
                worst = max(float((walk[k] - first[k]).abs().max()) for k in ("x", "eps_cond"))
                agree = f"max abs diff vs {args.gen_modes.split(',')[0]}: {worst:.2e}"
            # Warm-up at the timed size too: the pinned host buffers of a new size are allocated once (as over a
            # cache's equal shards), not in every call.
            trajectory_steps(tch, idx, steps, 1.0, 1.5, 0, device)

            def forward() -> None:  # the same in-place compiled teacher at the generation's batch
                with torch.no_grad():
                    teacher_bf16(x.bfloat16(), t_single, encoder_hidden_states=ctx.bfloat16(), return_dict=False)

            timer.run(forward, 1)  # the first run may compile anew (the generator's grad mode)
            pairs = []  # (forward, generation per teacher call), alternated: the ratio of neighbouring timings
            for _ in range(args.gen_repeats):
                fwd = statistics.median(timer.run(forward, args.steps))
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                trajectory_steps(tch, idx, steps, 1.0, 1.5, 0, device)
                if cuda:
                    torch.cuda.synchronize()
                pairs.append((fwd, (time.perf_counter() - t0) / steps))
            fwd = statistics.median(p[0] for p in pairs)
            per_call = statistics.median(p[1] for p in pairs)
            host = timer.host(forward, args.steps)
            row = "trajectory generation" if gen_mode == "default" else f"trajectory generation, {gen_mode}"
            results[(row, "compiled")] = (per_call, float("nan"), float("nan"))
            results[(f"{row}: forward", "compiled")] = (fwd, float("nan"), float("nan"))
            each = ", ".join(f"{f / g:.3f}" for f, g in pairs)
            print(f"| teacher forward, alternating with the next row ({len(pairs)} x median of {args.steps}) | "
                  f"compiled | {fwd * 1e3:.1f} | {b / fwd:.1f} | - | - | - | {host * 1e3:.1f} | - |", flush=True)
            print(f"| {row} (per teacher call, batch {b}, {steps} steps; median of {len(pairs)} calls; forward / "
                  f"generation each: {each}; {agree}) | compiled | {per_call * 1e3:.1f} | {b / per_call:.1f} | - | - "
                  "| - | - | - |", flush=True)
            if args.profile:  # one timed-size call: divide the per-step figures by the steps
                print_profile(lambda: trajectory_steps(tch, idx, steps, 1.0, 1.5, 0, device),
                              f"{row}, one call of {steps} teacher calls", cuda, steps=1)

    # Most important first (a --budget-s cut drops the tail): compiled FP vs fused QAT, mixed timesteps (same
    # compiled graph: the per-sample step lookup is the same code for both), then eager rows, then the old path.
    plan: list[tuple[str, str, str]] = []
    for mode in modes:
        plan += [("teacher", "teacher forward", mode), ("fp", "FP LoRA step", mode),
                 ("fused", "W4A4 step, fused STE", mode)]
        if mode == "eager":
            plan.append(("kernels", "W4A4 step, fused STE, compiled kernels", mode))
        if mode == modes[0]:
            plan.append(("mixed", "W4A4 step, fused STE, mixed timesteps", mode))
    plan.append(("generation", "trajectory generation", "compiled"))  # after the eager teacher row: compiles in place
    plan += [("composite", "W4A4 step, composite STE", mode) for mode in reversed(modes)]
    for key, row, mode in plan:
        if key not in rows:
            continue
        if key == "teacher":
            measure(row, mode, teacher_fn(mode))
        elif key == "generation":
            measure_generation()
        elif key == "mixed":
            measure(row, mode, step_fn(mode, True, True, t_mixed), reset=False)
        elif key == "kernels":
            measure(row, mode, step_fn(mode, True, True, t_single, kernels=True))
        else:
            quantized, fused = key != "fp", key != "composite"
            keep = args.alternate and key == "fused"  # the FP row's graphs stay for the alternation
            if not keep:
                compiled_students.clear()
            measure(row, mode, step_fn(mode, quantized, fused, t_single), reset=not keep)
    for mode in modes:  # FP and W4A4 steps timed in turns: host and clock drift hit both alike
        pair = [made.get(("FP LoRA step", mode)), made.get(("W4A4 step, fused STE", mode))]
        if not (args.alternate and all(pair)):
            continue
        times: list[list[float]] = [[], []]
        for _ in range(args.alternate):
            for i, fn in enumerate(pair):
                fn.activate()
                timer.run(fn, 1)  # untimed: the first step after a switch looks up the other graphs
                times[i].append(statistics.median(timer.run(fn, args.steps)))
        each = ", ".join(f"{f / q:.3f}" for f, q in zip(*times))
        print(f"\n# {mode}, alternating: FP LoRA ms {', '.join(f'{f * 1e3:.1f}' for f in times[0])}; W4A4 ms "
              f"{', '.join(f'{q * 1e3:.1f}' for q in times[1])}; throughput ratio of each pair: {each}", flush=True)
        for row, ts in zip(("FP LoRA step", "W4A4 step, fused STE"), times):
            results[(row, mode)] = (statistics.median(ts), *results[(row, mode)][1:])
    set_flags(student, True, True)

    print("\n| ratio | mode | value | target |\n|---|---|---|---|")

    def ratio(name: str, mode: str, num: tuple[str, str], den: tuple[str, str], idx: int, target: str) -> None:
        if num in results and den in results:
            print(f"| {name} | {mode} | {results[num][idx] / results[den][idx]:.3f} | {target} |")

    for mode in modes:
        fp, fused = ("FP LoRA step", mode), ("W4A4 step, fused STE", mode)
        ratio("QAT / FP LoRA throughput", mode, fp, fused, 0, ">= 0.95")
        ratio("QAT / FP LoRA peak memory", mode, fused, fp, 1, "<= 1.15")
        ratio("QAT / FP LoRA peak reserved memory (CUDA graphs: their pools)", mode, fused, fp, 2, "<= 1.15")
        kernels = ("W4A4 step, fused STE, compiled kernels", mode)
        ratio("QAT (compiled kernels) / FP LoRA throughput", mode, fp, kernels, 0, ">= 0.95")
        ratio("QAT (compiled kernels) / FP LoRA peak memory", mode, kernels, fp, 1, "<= 1.15")
        ratio("composite-STE QAT / FP LoRA throughput", mode, fp, ("W4A4 step, composite STE", mode), 0, "(before)")
        ratio("composite-STE QAT / FP LoRA peak memory", mode, ("W4A4 step, composite STE", mode), fp, 1, "(before)")
        ratio("mixed / single timestep step time", mode, ("W4A4 step, fused STE, mixed timesteps", mode), fused, 0,
              "<= 1.03")
    for gen_mode in args.gen_modes.split(","):
        row = "trajectory generation" if gen_mode == "default" else f"trajectory generation, {gen_mode}"
        ratio(f"{row} / compiled forward throughput", "compiled", (f"{row}: forward", "compiled"),
              (row, "compiled"), 0, ">= 0.9")
    print(f"\n# total {time.time() - start:.0f} s; host {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
