"""Sampling an export of the trainer on a runtime backend, in its diffusers pipeline, with one call::

    pipe = load_export_pipeline("runs/efficientdm_digits/export", backend="int8")
    labels, noise, _ = sample_seeds(list(range(8)), 10, seed=0, shape=(1, 32, 32))
    images = pipe(noise, labels, num_inference_steps=20, guidance_scale=1.5).images      # (8, 1, 32, 32)
    print(pipe.unet.runtime_report)

An export of ``train.py`` / ``export.py`` (:mod:`train.export_run`) holds the quantized denoiser (``unet/``), the
teacher's scheduler, its class embedder or encoded prompts, and ``run_config.yaml``; it has no ``model_index.json``,
and its conditioning is DiffQAT's (:class:`~train.models.pipeline.QATDiffusionPipeline`). The pipeline is built from
those files: the denoiser through :func:`qat.runtime.load_for_inference`, everything else from the export directory
itself, or from the teacher's folder where the export lacks it (a latent model's VAE) or where ``teacher=`` names
it. A diffusers pipeline folder (``model_index.json``) or object given as ``teacher`` goes to
:func:`qat.runtime.load_pipeline` instead.

The pipeline's loop sets the temporal activation tables from each call's timestep (:func:`qat.timestep`), as in
evaluation: ``backend="fake"`` samples what ``evaluate.py <export>`` samples, bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, SchedulerMixin

from qat.runtime import load_for_inference, load_pipeline
from train.config import TeacherConfig, load_config, resolve_path
from train.models.families import apply_attention_heads, set_family
from train.models.pipeline import QATDiffusionPipeline
from train.models.teacher import Teacher, load_teacher

__all__ = ["load_export_pipeline"]


def _parts_config(teacher_cfg: TeacherConfig, export_dir: Path,
                  teacher: str | os.PathLike | None = None) -> TeacherConfig:
    """The teacher config that loads every part of the pipeline except the denoiser.

    ``teacher`` None and no VAE: the export directory itself (``export_run`` copies the scheduler and the class
    embedder there); otherwise the teacher's folder (``teacher``, default the run's ``teacher.path``). Encoded
    prompts always come from the export's ``prompt_embeds.safetensors`` where it has one (the run's own; no text
    encoder runs).
    """
    prompts = export_dir / "prompt_embeds.safetensors"
    text = {}
    if teacher_cfg.conditioning in ("prompt_embeds", "prompts") and prompts.is_file():
        text = {"conditioning": "prompt_embeds", "prompt_embeds_path": str(prompts)}
    if teacher is None and not teacher_cfg.vae_subfolder:
        return dataclasses.replace(teacher_cfg, path=str(export_dir), unet_subfolder="unet",
                                   scheduler_subfolder="scheduler", class_embedder_subfolder="class_embedder", **text)
    return dataclasses.replace(teacher_cfg, path=str(teacher if teacher is not None else teacher_cfg.path), **text)


def _is_diffusers_folder(teacher: object) -> bool:
    return isinstance(teacher, (str, os.PathLike)) and (resolve_path(str(teacher)) / "model_index.json").is_file()


@torch.no_grad()
def load_export_pipeline(export_dir: str | os.PathLike, backend: str = "fake", device: str | torch.device = "cpu",
                         dtype: torch.dtype | None = None, *,
                         teacher: str | os.PathLike | Teacher | DiffusionPipeline | None = None,
                         scheduler: str | SchedulerMixin | None = None) -> DiffusionPipeline:
    """The export's denoiser on ``backend`` in the pipeline of its teacher's conditioning and noise schedule.

    Args:
        export_dir: an export of ``train.py`` / ``export.py`` (``unet/`` + ``run_config.yaml``).
        backend: one of :data:`qat.runtime.BACKENDS` (``docs/runtime.md``).
        device: where the pipeline goes (the denoiser is converted there).
        dtype: compute dtype of the denoiser's float tensors (:func:`qat.runtime.load_for_inference`); the
            quantizer steps stay float32. None: float32.
        teacher: where the parts besides the denoiser come from: None (the export directory, plus the run's
            ``teacher.path`` for a VAE), the float teacher's folder (DiffQAT layout, read with the run's subfolder
            settings), a loaded :class:`~train.models.teacher.Teacher` (its scheduler, conditioning and VAE), or a
            diffusers pipeline folder / :class:`diffusers.DiffusionPipeline` (then :func:`qat.runtime.load_pipeline`).
        scheduler: the sampler, a diffusers scheduler name (``ddim``, ``dpmsolver``, ...) or object on the
            teacher's noise schedule; None: the run's ``eval.scheduler``. Ignored for diffusers pipelines, which
            keep their own.

    Returns:
        a :class:`~train.models.pipeline.QATDiffusionPipeline` (``pipe(noise, labels, num_inference_steps=...,
        guidance_scale=...)``), or the diffusers pipeline of ``teacher``; ``pipe.unet.runtime_report`` lists where
        each quantized layer runs.

    Raises:
        FileNotFoundError: the export has no ``run_config.yaml`` (not the trainer's), or a teacher file is missing.
        ValueError: an unknown backend (before anything is loaded) or a model the runtime refuses.
    """
    export_dir = Path(export_dir)
    if isinstance(teacher, DiffusionPipeline) or _is_diffusers_folder(teacher):
        return load_pipeline(export_dir, backend, device, dtype, teacher=teacher)
    run_config = export_dir / "run_config.yaml"
    if not run_config.is_file():
        raise FileNotFoundError(f"{run_config} not found: {export_dir} is not an export of train.py / export.py "
                                "(unet/ + scheduler/ + run_config.yaml); a diffusers export is sampled with "
                                "qat.runtime.load_pipeline(..., teacher=<pipeline folder with model_index.json>)")
    cfg = load_config([f"config={run_config}"])
    unet = load_for_inference(export_dir / "unet", backend, device, dtype)  # checks the backend first
    if isinstance(teacher, Teacher):
        apply_attention_heads(unet)  # as load_teacher does (a no-op but for converted CompVis UNets)
        set_family(unet, teacher.family)
        parts = dataclasses.replace(teacher, unet=unet)
    else:
        parts = load_teacher(_parts_config(cfg.teacher, export_dir, teacher), device, unet=unet)
    pipe = QATDiffusionPipeline.from_teacher(parts, unet=unet,
                                             scheduler=cfg.eval.scheduler if scheduler is None else scheduler)
    return pipe.to(device)
