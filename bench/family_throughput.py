"""Throughput of the real-size model families with random weights: teacher trajectories and EfficientDM QAT steps.

    python bench/family_throughput.py                                   # all five families, published sizes, GPU
    python bench/family_throughput.py --families dit,wan --batch 4      # a subset, another batch size
    python bench/family_throughput.py --tiny                            # tiny configs: checks the script on a CPU

Per family the denoiser is built from its published config (written below, nothing is downloaded) directly on the
device with random weights (``torch.device`` as the default device, so no slow CPU init), the teacher in bf16, and
two things are timed (``--warmup`` untimed + ``--steps`` timed iterations, synchronised):

* trajectory generation: one step of :class:`train.data.trajectories.OnlineTrajectories` (the trainer's online data
  source): the teacher's CFG call on ``2 B`` inputs (uncond + cond) and the DDIM / flow update, with the recipe's
  CFG scale. samples/s = ``B`` training samples ``(x_t, t, c, eps)`` produced per second.
* QAT step: the same trajectory step (the teacher targets) plus the EfficientDM student (W4A4 QALoRA rank 32 +
  temporal LSQ activations, W8A8 special layers, fp32 master weights) forward on ``2 B`` inputs under bf16 autocast,
  the CFG-output MSE of :class:`train.system.DistillQATSystem` (``losses.output_mse.target: cfg``), backward and an
  AdamW step over :func:`qat.param_groups`. samples/s = ``B`` per step. ``--method qvgen``: the QVGen student instead
  (W4A4 LSQ+ weights, per-token dynamic activations, the rank-32 auxiliary branch, every parameter trained, AdamW
  over the method's groups); with ``--rank-phases N`` a step is timed at the start of each rank-decay phase of an
  ``N``-step run, the peak memory reset per phase (JSON rows' ``phases``).

Peak memory is ``torch.cuda.max_memory_allocated`` of each phase. Text conditions are random states of the real
length and width (the text encoder is not part of the step). ``--grad-ckpt auto`` checkpoints the student's blocks
for the video families (QVGen trains with checkpointing); the timestep stays set through the backward so that the
recomputed temporal quantizers see it. Each family prints its row when done, is appended to ``--out`` (JSON lines),
and an out-of-memory error becomes a row, so a long or killed run keeps the finished families.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import diffusers  # noqa: E402

import qat  # noqa: E402
from qat.methods import Calibration, Method  # noqa: E402
from qat.methods.efficientdm import EfficientDM, EfficientDMConfig  # noqa: E402
from qat.methods.qvgen import QVGen, QVGenConfig, phase_starts  # noqa: E402
from train.data.trajectories import OnlineTrajectories  # noqa: E402
from train.models.families import denoise, set_family  # noqa: E402
from train.models.teacher import Teacher  # noqa: E402


@dataclass
class Spec:
    """One family at published size (``real``) and at test size (``tiny``).

    Args:
        label: the model in the table; family: :mod:`train.models.families` name; cls: diffusers class name.
        real / tiny: constructor arguments; scheduler: (class name, config) of the teacher's scheduler.
        text: (tokens, width) of the text states, or None (class labels); batch: default batch size (real size).
        guidance: the recipe's CFG scale; shape: sample shape override (Wan: latents of 49 frames at 480x832).
    """

    label: str
    family: str
    cls: str
    real: dict[str, Any]
    tiny: dict[str, Any]
    scheduler: tuple[str, dict[str, Any]]
    text: tuple[int, int] | None
    tiny_text: tuple[int, int] | None
    batch: int
    guidance: float
    shape: tuple[int, ...] | None = None
    tiny_shape: tuple[int, ...] | None = None


SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SPECS: dict[str, Spec] = {s.family: s for s in (
    # runwayml/stable-diffusion-v1-5 unet/config.json
    Spec("SD 1.5 UNet (512px, 64x64x4 latents)", "unet", "UNet2DConditionModel",
         dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
              block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
         dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
              cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
         ("PNDMScheduler", dict(**SD_BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)),
         (77, 768), (8, 8), batch=8, guidance=7.5),
    # facebook/DiT-XL-2-256 transformer/config.json
    Spec("DiT-XL/2 256 (32x32x4 latents)", "dit", "DiTTransformer2DModel",
         dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
              sample_size=32, patch_size=2, num_embeds_ada_norm=1000),
         dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
              sample_size=8, patch_size=2, num_embeds_ada_norm=10),
         ("DDIMScheduler", dict(beta_schedule="linear")), None, None, batch=16, guidance=1.5),
    # PixArt-alpha/PixArt-XL-2-512x512 transformer/config.json (T5-XXL states: 120 tokens x 4096)
    Spec("PixArt-alpha XL/2 512 (64x64x4 latents)", "pixart", "PixArtTransformer2DModel",
         dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
              cross_attention_dim=1152, sample_size=64, patch_size=2, caption_channels=4096,
              use_additional_conditions=False),
         dict(num_attention_heads=2, attention_head_dim=6, in_channels=4, out_channels=8, num_layers=1,
              cross_attention_dim=12, sample_size=8, patch_size=2, caption_channels=6,
              use_additional_conditions=True, norm_num_groups=1),
         ("DPMSolverMultistepScheduler", dict(beta_schedule="linear")), (120, 4096), (5, 6), batch=8,
         guidance=4.5),
    # THUDM/CogVideoX-2b transformer/config.json: 49 frames at 480x720 -> 13 x 60 x 90 latents, 226 T5 tokens
    Spec("CogVideoX-2B (49x480x720: 13x16x60x90 latents)", "cogvideox", "CogVideoXTransformer3DModel",
         dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
              text_embed_dim=4096, num_layers=30, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
              temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=False),
         dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
              text_embed_dim=6, num_layers=1, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
              temporal_compression_ratio=4, max_text_seq_length=3),
         ("CogVideoXDDIMScheduler", dict(**SD_BETAS, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                         snr_shift_scale=3.0, timestep_spacing="trailing", set_alpha_to_one=True)),
         (226, 4096), (3, 6), batch=1, guidance=6.0),
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json: 49 frames at 480x832 -> 16 x 13 x 60 x 104 latents
    Spec("Wan 2.1 T2V 1.3B (49x480x832: 16x13x60x104 latents)", "wan", "WanTransformer3DModel",
         dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
              text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
         dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=6, in_channels=4, out_channels=4,
              text_dim=6, freq_dim=8, ffn_dim=16, num_layers=1, rope_max_seq_len=32),
         ("UniPCMultistepScheduler", dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)),
         (512, 4096), (7, 6), batch=1, guidance=5.0, shape=(16, 13, 60, 104), tiny_shape=(4, 2, 8, 8)),
)}
VIDEO = {"cogvideox", "wan"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _timed(fn: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def build_teacher(spec: Spec, tiny: bool, device: torch.device, dtype: torch.dtype) -> Teacher:
    """The random-weight teacher on ``device`` (built there), with random text states or class labels."""
    with torch.device(device):
        model = getattr(diffusers, spec.cls)(**(spec.tiny if tiny else spec.real))
    # as from_pretrained(torch_dtype=...): modules the class keeps in fp32 (Wan's norms, timestep MLP) stay fp32
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    model.requires_grad_(False).eval()
    set_family(model, spec.family)
    sched_name, sched_cfg = spec.scheduler
    scheduler = getattr(diffusers, sched_name)(**sched_cfg)
    shape = spec.tiny_shape if tiny else spec.shape
    teacher = Teacher(unet=model, scheduler=scheduler, conditioning="class" if spec.text is None else "prompt_embeds",
                      family=spec.family, shape_override=shape)
    text = spec.tiny_text if tiny else spec.text
    if text is not None:
        gen = torch.Generator().manual_seed(0)
        teacher.prompt_embeds = torch.randn(4, *text, generator=gen).to(device, dtype)
        teacher.negative_prompt_embeds = torch.randn(1, *text, generator=gen).to(device, dtype)
    return teacher


def _method(name: str, family: str, num_steps: int) -> Method:
    """The benchmarked method at its paper settings (EfficientDM: minmax ranges, the calibration is not timed)."""
    if name == "qvgen":
        return QVGen(QVGenConfig(family=family))
    return EfficientDM(EfficientDMConfig(family=family, num_timesteps=num_steps, lora_rank=32, act_init="minmax",
                                         weight_init="minmax"))


def measure(spec: Spec, tiny: bool, batch: int, warmup: int, steps: int, grad_ckpt: bool,
            device: torch.device, method_name: str = "efficientdm", phase_run: int = 0) -> dict[str, Any]:
    """Builds teacher and student of ``spec`` and times trajectory generation and QAT steps."""
    t0 = time.perf_counter()
    teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = build_teacher(spec, tiny, device, teacher_dtype)
    params = sum(p.numel() for p in teacher.unet.parameters())
    num_steps = 50
    data = OnlineTrajectories(teacher, num_steps=num_steps, eta=1.0, guidance=spec.guidance, batch_size=batch, seed=0)
    row: dict[str, Any] = {"family": spec.family, "model": ("tiny " if tiny else "") + spec.label,
                           "params_M": round(params / 1e6, 1), "sample_shape": list(teacher.sample_shape),
                           "batch": batch, "cfg": spec.guidance, "grad_ckpt": grad_ckpt}

    _reset_peak(device)
    sec = _timed(lambda: data.next_batch(device), warmup, steps, device)
    row.update(traj_samples_per_s=batch / sec, traj_s_per_step=sec, traj_peak_gib=_peak_gib(device))

    method = _method(method_name, spec.family, num_steps)
    student, _ = method.build_student(teacher.unet, teacher.family)
    student.float()
    qat.set_timestep_grid(student, teacher.ddim(num_steps).timesteps)
    # Quantizer ranges from one sample (and one latent frame of a video): qat.calibrate draws a CPU permutation over
    # every input element of every layer (~1 s per layer for a whole CogVideoX clip), and ranges do not change speed.
    calib = data.next_batch(device)
    x = calib.x[:1]
    if spec.family in VIDEO:
        x = x.narrow(1 if spec.family == "cogvideox" else 2, 0, 1)
    ctx = None if calib.cond is None else calib.cond[:1]
    ctx = ctx.float() if ctx is not None and ctx.is_floating_point() else ctx

    def calib_forward(model: torch.nn.Module, t: torch.Tensor) -> None:
        with qat.timestep(model, t):
            denoise(model, x, t, ctx)

    t_init = time.perf_counter()
    with torch.no_grad():
        method.initialize(student, Calibration([calib.t[:1]], calib_forward))
    row["init_s"] = round(time.perf_counter() - t_init, 1)
    if grad_ckpt:
        student.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(method.param_groups(student), betas=(0.9, 0.999))
    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def qat_step() -> None:
        b = data.next_batch(device)
        tt = torch.cat([b.t, b.t])
        ctx = torch.cat([b.uncond, b.cond])
        ctx = ctx.to(b.x.dtype) if ctx.is_floating_point() else ctx
        qat.set_timestep(student, tt)  # set through backward: checkpointed blocks recompute their quantizers
        try:
            with autocast:
                out = denoise(student, torch.cat([b.x, b.x]), tt, ctx)
            eps_u, eps_c = out.float().chunk(2)
            pred = qat.cfg_combine(eps_u, eps_c, spec.guidance)
            target = qat.cfg_combine(b.eps_uncond, b.eps_cond, spec.guidance)
            loss = (pred - target).pow(2).mean()
            loss.backward()
        finally:
            qat.clear_timestep(student)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{spec.family}: non-finite QAT loss")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # QVGen's rank decay: time each phase at the step where it starts (of a run of ``phase_run`` steps); the
    # branch keeps its shapes, so memory should not change across phases
    phases = [0]
    if isinstance(method, QVGen) and phase_run:
        phases = phase_starts(method.decay_steps(phase_run), len(method.ranks))
    for start in phases:
        method.on_train_step(student, start, phase_run or 1)
        _reset_peak(device)
        sec = _timed(qat_step, warmup, steps, device)
        if start == phases[0]:
            row.update(qat_samples_per_s=batch / sec, qat_s_per_step=sec, qat_peak_gib=_peak_gib(device))
        if len(phases) > 1:
            row.setdefault("phases", []).append({"step": start, "s_per_step": round(sec, 4),
                                                 "peak_gib": _peak_gib(device)})
    row.update(method=method.describe(), trainable_M=round(trainable / 1e6, 2),
               wall_s=round(time.perf_counter() - t0, 1))
    return row  # the models go with this frame; main() collects and empties the CUDA cache


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | params | sample | batch | CFG | trajectories samples/s | traj. peak GiB | QAT samples/s "
            "| QAT s/step | QAT peak GiB | grad ckpt |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | {r['batch']} | | {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['params_M']}M | {'x'.join(map(str, r['sample_shape']))} | {r['batch']} | "
                     f"{r['cfg']} | {_fmt(r['traj_samples_per_s'], '.2f')} | {_fmt(r['traj_peak_gib'], '.1f')} | "
                     f"{_fmt(r['qat_samples_per_s'], '.2f')} | {_fmt(r['qat_s_per_step'], '.3f')} | "
                     f"{_fmt(r['qat_peak_gib'], '.1f')} | {'yes' if r['grad_ckpt'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(SPECS), help=f"comma-separated subset of {list(SPECS)}")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (a CPU check of the script)")
    ap.add_argument("--batch", type=int, default=None, help="batch size for every family (default: per family)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--grad-ckpt", choices=("auto", "on", "off"), default="auto",
                    help="gradient checkpointing of the student: auto = on for the video families")
    ap.add_argument("--method", choices=("efficientdm", "qvgen"), default="efficientdm",
                    help="the student: EfficientDM (QALoRA) or QVGen (full QAT with the auxiliary branch)")
    ap.add_argument("--rank-phases", type=int, default=0, metavar="MAX_STEPS",
                    help="QVGen: time a step at the start of every rank-decay phase of a run of MAX_STEPS steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per family here")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SPECS))
    if unknown:
        ap.error(f"--families: unknown {unknown}; known: {list(SPECS)}")
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    command = "python bench/family_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# family throughput: {gpu}, {datetime.date.today()}, torch {torch.__version__}, diffusers "
          f"{diffusers.__version__}\n# {command}", flush=True)
    rows = []
    for name in names:
        spec = SPECS[name]
        batch = args.batch or (1 if args.tiny else spec.batch)
        ckpt = args.grad_ckpt == "on" or (args.grad_ckpt == "auto" and name in VIDEO)
        try:
            row = measure(spec, args.tiny, batch, args.warmup, args.steps, ckpt, device, args.method,
                          args.rank_phases)
        except torch.cuda.OutOfMemoryError:
            row = {"family": name, "model": spec.label, "batch": batch, "error": f"out of memory at batch {batch}"}
            print(f"{name}: out of memory at batch {batch}", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row.update(gpu=gpu, torch=torch.__version__, date=str(datetime.date.today()), command=command)
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print("\n" + table(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
