"""The frozen full-precision teacher: a local diffusers denoiser, its scheduler, and its conditioning.

Layout of a teacher directory (diffusers' ``from_pretrained(path, subfolder=...)`` convention)::

    <path>/unet/config.json + diffusion_pytorch_model.safetensors       the denoiser (any diffusers model)
    <path>/scheduler/scheduler_config.json                              its noise schedule
    <path>/class_embedder/config.json + *.safetensors                   (class conditioning) labels -> context

Conditioning modes: ``class`` (labels through the ``ClassEmbedder`` into a one-token cross-attention context, the
null class for CFG, as CompVis LDM-4), ``prompt_embeds`` (precomputed text embeddings, Stable Diffusion style) and
``none``. Nothing is downloaded: missing files raise an error that says what to put where.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, SchedulerMixin
from safetensors.torch import load_file
from torch import Tensor, nn

from train.config import ConfigError, TeacherConfig, resolve_path
from train.models import ClassEmbedder

__all__ = ["Teacher", "load_teacher", "denoise"]


def denoise(model: nn.Module, x: Tensor, t: Tensor, context: Tensor | None) -> Tensor:
    """Noise prediction ``eps(x_t, t, c)`` of a diffusers denoiser, shape of ``x``.

    ``context`` is passed as ``encoder_hidden_states`` (cross-attention models); models predicting a learned
    variance (``2C`` output channels, e.g. DiT) return their first ``C`` channels.
    """
    kwargs = {} if context is None else {"encoder_hidden_states": context}
    out = model(x, t, **kwargs, return_dict=False)[0]
    return out[:, : x.shape[1]] if out.shape[1] != x.shape[1] else out


@dataclass
class Teacher:
    """A loaded teacher. ``unet`` is frozen, in eval mode; ``contexts`` gives cross-attention contexts."""

    unet: nn.Module
    scheduler: SchedulerMixin
    conditioning: str
    class_embedder: ClassEmbedder | None = None
    prompt_embeds: Tensor | None = None  # (N, L, D)
    negative_prompt_embeds: Tensor | None = None  # (1, L, D)
    vae: nn.Module | None = None  # latent decoder of latent models (evaluation images only)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the denoiser's input."""
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return int(cfg.in_channels), int(size), int(size)

    @property
    def num_classes(self) -> int:
        """Number of conditions to draw from (classes or prompts); 1 without conditioning."""
        if self.class_embedder is not None:
            return int(self.class_embedder.null_label)
        if self.prompt_embeds is not None:
            return int(self.prompt_embeds.shape[0])
        return 1

    def to(self, device: torch.device | str) -> Teacher:
        self.unet.to(device)
        if self.vae is not None:
            self.vae.to(device)
        if self.class_embedder is not None:
            self.class_embedder.to(device)
        if self.prompt_embeds is not None:
            self.prompt_embeds = self.prompt_embeds.to(device)
            self.negative_prompt_embeds = self.negative_prompt_embeds.to(device)
        return self

    @torch.no_grad()
    def contexts(self, labels: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``(cond, uncond)`` cross-attention contexts ``(B, L, D)`` for condition indices ``labels (B,)``."""
        if self.conditioning == "class":
            null = self.class_embedder.null_labels(labels.shape[0], device=labels.device)
            dtype = next(self.unet.parameters()).dtype
            return self.class_embedder(labels).to(dtype), self.class_embedder(null).to(dtype)
        if self.conditioning == "prompt_embeds":
            cond = self.prompt_embeds[labels.to(self.prompt_embeds.device)]
            return cond, self.negative_prompt_embeds.expand_as(cond)
        return None, None

    def ddim(self, num_steps: int) -> DDIMScheduler:
        """A DDIM scheduler on the teacher's noise schedule with ``num_steps`` timesteps set."""
        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(num_steps)
        return sched


def _require(path: Path, what: str, fix: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} does not exist. {fix}")


def load_teacher(cfg: TeacherConfig, device: torch.device | str = "cpu") -> Teacher:
    """Loads the teacher described by ``cfg`` from local files only.

    Raises:
        FileNotFoundError: a directory or weight file is missing; the message says what to put where.
    """
    import diffusers

    root = resolve_path(cfg.path)
    layout = (f"expected {root}/{cfg.unet_subfolder}/config.json + diffusion_pytorch_model.safetensors and "
              f"{root}/{cfg.scheduler_subfolder}/scheduler_config.json (diffusers save_pretrained layout)")
    _require(root, "teacher directory (teacher.path)",
             f"Set teacher.path to a local diffusers model directory: {layout}")
    unet_dir = root / cfg.unet_subfolder
    _require(unet_dir / "config.json", "denoiser config (teacher.unet_subfolder)", layout)
    if not any(unet_dir.glob("*.safetensors")) and not any(unet_dir.glob("*.bin")):
        raise FileNotFoundError(f"denoiser weights not found in {unet_dir}: put diffusion_pytorch_model.safetensors "
                                f"there ({layout})")
    _require(root / cfg.scheduler_subfolder / "scheduler_config.json",
             "scheduler config (teacher.scheduler_subfolder)", layout)
    class_name = json.loads((unet_dir / "config.json").read_text()).get("_class_name", "")
    model_cls = getattr(diffusers, class_name, None)
    if model_cls is None:
        raise ConfigError(f"teacher.unet_subfolder: unknown diffusers model class {class_name!r} in {unet_dir}")
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    unet = model_cls.from_pretrained(str(root), subfolder=cfg.unet_subfolder, torch_dtype=dtype)
    unet.requires_grad_(False).eval()
    scheduler = DDIMScheduler.from_pretrained(str(root), subfolder=cfg.scheduler_subfolder)

    teacher = Teacher(unet=unet, scheduler=scheduler, conditioning=cfg.conditioning)
    if cfg.vae_subfolder:
        vae_dir = root / cfg.vae_subfolder
        _require(vae_dir / "config.json", "latent decoder (teacher.vae_subfolder)",
                 f"save the VQModel / AutoencoderKL of the latent model with save_pretrained into {vae_dir}, or "
                 "unset teacher.vae_subfolder")
        vae_cls = getattr(diffusers, json.loads((vae_dir / "config.json").read_text()).get("_class_name", ""), None)
        if vae_cls is None:
            raise ConfigError(f"teacher.vae_subfolder: unknown diffusers model class in {vae_dir}/config.json")
        teacher.vae = vae_cls.from_pretrained(str(root), subfolder=cfg.vae_subfolder).requires_grad_(False).eval()
    if cfg.conditioning == "class":
        emb_dir = root / cfg.class_embedder_subfolder
        _require(emb_dir / "config.json", "class embedder (teacher.class_embedder_subfolder)",
                 f"class conditioning needs a ClassEmbedder saved with save_pretrained in {emb_dir}, or set "
                 "teacher.conditioning to 'prompt_embeds' / 'none'")
        teacher.class_embedder = ClassEmbedder.from_pretrained(str(root), subfolder=cfg.class_embedder_subfolder)
        teacher.class_embedder.requires_grad_(False).eval()
    elif cfg.conditioning == "prompt_embeds":
        path = resolve_path(cfg.prompt_embeds_path)
        _require(path, "prompt embeddings (teacher.prompt_embeds_path)",
                 "Save a safetensors file with 'prompt_embeds' (N, L, D) and 'negative_prompt_embeds' (1, L, D).")
        tensors = load_file(str(path))
        missing = {"prompt_embeds", "negative_prompt_embeds"} - set(tensors)
        if missing:
            raise ValueError(f"{path}: missing tensors {sorted(missing)}; expected 'prompt_embeds' (N, L, D) and "
                             "'negative_prompt_embeds' (1, L, D)")
        teacher.prompt_embeds = tensors["prompt_embeds"].to(dtype)
        teacher.negative_prompt_embeds = tensors["negative_prompt_embeds"].to(dtype)
    return teacher.to(device)
