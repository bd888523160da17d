"""Exporting a trained student as a complete low-bit model directory (``export.py`` and the end of every run).

Layout of ``<out>`` (a diffusers-style model directory; :func:`qat.load_quantized` reads ``unet/``)::

    <out>/unet/config.json                           diffusers config + quantization_config
    <out>/unet/diffusion_pytorch_model.safetensors   packed integer weights, quantizer tables, FP tensors
    <out>/scheduler/                                 the teacher's scheduler
    <out>/class_embedder/                            the teacher's class embedder (class conditioning)
    <out>/prompt_embeds.safetensors                  the teacher's prompt embeddings (prompt_embeds / prompts
                                                     conditioning; for prompts: the encoded prompt file)
    <out>/run_config.yaml                            the recipe of the run (``evaluate.py <out>`` reads it)
    <out>/README.md                                  model card (scheme, FP layers, sizes, evaluation, how to load)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from qat.export import CARD_NAME, export_quantized, load_quantized
from qat.export_card import export_sizes, model_card_text
from qat.methods import Method
from train.config import RunConfig, build_method, resolve_path, to_yaml
from train.models.teacher import Teacher

__all__ = ["export_run", "student_dir", "evaluation_summary", "verify_export"]


def student_dir(path: Path) -> Path:
    """The directory with ``student.safetensors`` and ``run_config.yaml``: ``path`` or ``path/student``."""
    for candidate in (path, path / "student"):
        if (candidate / "student.safetensors").is_file() and (candidate / "run_config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"{path} is neither a run directory with student/student.safetensors and "
                            "student/run_config.yaml nor such a student directory; train.py writes them at the end "
                            "of a run (<output_dir>/student/)")


def evaluation_summary(run_dir: Path) -> dict[str, dict[str, float]] | None:
    """The run's metrics as {column -> {metric -> value}}: ``report.json`` (variants fp / ptq / qat), else the older
    ``summary.json`` (ptq / qat); None when the run has neither (e.g. ``eval.enabled=false``)."""
    columns = {"fp": "FP teacher", "ptq": "PTQ start", "qat": "trained"}
    report, summary = run_dir / "report.json", run_dir / "summary.json"
    if report.is_file():
        source = json.loads(report.read_text()).get("variants") or {}
    elif summary.is_file():
        data = json.loads(summary.read_text())
        source = {k: data.get(k) for k in ("ptq", "qat")}
    else:
        return None
    out = {}
    for key, label in columns.items():
        metrics = {k: v for k, v in (source.get(key) or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}  # scalars only (no curves, no nulls)
        if metrics:
            out[label] = metrics
    return out or None


@torch.no_grad()
def verify_export(student: torch.nn.Module, loaded: torch.nn.Module, teacher: Teacher, cfg: RunConfig,
                  device: torch.device) -> float:
    """Max |student - loaded| of the noise prediction on random inputs at the first, middle and last grid timesteps:
    one call with the three rows, or, for a model with per-sampling-call state (a cross-timestep cache), three
    consecutive calls of one sampling run (every row at the first, then the middle, then the last timestep), so that
    the state is exercised too."""
    import qat
    from train.models.families import denoise, model_dtype

    gen = torch.Generator().manual_seed(0)
    grid = teacher.ddim(cfg.trajectories.num_steps).timesteps
    t = grid[[0, len(grid) // 2, -1]].to(device)
    x = torch.randn(len(t), *teacher.sample_shape, generator=gen).to(device)
    labels = torch.randint(0, teacher.num_classes, (len(t),), generator=gen).to(device)
    context = teacher.contexts(labels)[0]
    if context is not None:  # a bf16 teacher's contexts, for an fp32 student
        context = context.to(model_dtype(student))
    calls = [t] if not qat.sampling.sampling_state_modules(student) else [v.repeat(len(t)) for v in t]
    outs = []
    for model in (student, loaded):
        qat.reset_sampling_state(model)  # a new run: no state kept from training or an earlier call
        for ts in calls:
            with qat.timestep(model, ts):
                outs.append(denoise(model, x, ts, context, teacher.family).float())
        qat.reset_sampling_state(model)
    half = len(outs) // 2
    return max(float((a - b).abs().max()) for a, b in zip(outs[:half], outs[half:], strict=True))


def export_run(student: torch.nn.Module, teacher: Teacher, cfg: RunConfig, out: Path, run_dir: Path | None = None,
               verify: bool = True, method: Method | None = None) -> Path:
    """Exports ``student`` (left untouched) with the teacher's scheduler and conditioning files into ``out``.

    The model card takes the evaluation from ``run_dir/report.json`` when present. With ``verify`` the export is
    reloaded and compared with the student (noise prediction at three grid timesteps); a difference above 1e-5
    raises.
    """
    method = build_method(cfg) if method is None else method
    card = {"base_model": cfg.teacher.path, "method": f"{cfg.method} ({method.describe()})",
            "evaluation": evaluation_summary(run_dir) if run_dir is not None else None,
            "source run": str(run_dir) if run_dir is not None else None}
    # the method finalises export_quantized's own working copy: the caller's student stays as trained
    unet_dir = export_quantized(student, out / "unet", model_card=card, convert_fn=method.convert,
                                progress=cfg.trainer.enable_progress_bar)
    (unet_dir / CARD_NAME).unlink()  # the card lives at the model root, with subfolder-aware instructions
    root = resolve_path(cfg.teacher.path)
    shutil.copytree(root / cfg.teacher.scheduler_subfolder, out / "scheduler", dirs_exist_ok=True)
    if teacher.class_embedder is not None:  # (DiT embeds its labels itself)
        shutil.copytree(root / cfg.teacher.class_embedder_subfolder, out / "class_embedder", dirs_exist_ok=True)
    elif cfg.teacher.conditioning == "prompt_embeds":
        shutil.copyfile(resolve_path(cfg.teacher.prompt_embeds_path), out / "prompt_embeds.safetensors")
    elif cfg.teacher.conditioning == "prompts":  # the encoded prompts: sampling the export needs no text encoder
        from train.models.text import save_prompt_embeds

        tensors = {k: getattr(teacher, k).detach().float().cpu() for k in ("prompt_embeds", "negative_prompt_embeds")}
        if teacher.prompt_attention_mask is not None:
            tensors["prompt_attention_mask"] = teacher.prompt_attention_mask.cpu()
            tensors["negative_prompt_attention_mask"] = teacher.negative_prompt_attention_mask.cpu()
        save_prompt_embeds(out / "prompt_embeds.safetensors", tensors)
        shutil.copyfile(resolve_path(cfg.teacher.prompt_file), out / "prompts.txt")
    (out / "run_config.yaml").write_text(to_yaml(cfg))
    (out / CARD_NAME).write_text(model_card_text(unet_dir, card, subfolder="unet"))
    print(export_sizes(unet_dir))
    if verify:
        device = next(student.parameters()).device
        diff = verify_export(student, load_quantized(out, device), teacher, cfg, device)
        print(f"verify: max |student - exported| noise prediction = {diff:.3g}")
        if diff > 1e-5:
            raise RuntimeError(f"the exported model differs from the student by {diff:.3g} (> 1e-5); please report")
    return out
