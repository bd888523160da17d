"""The frozen full-precision teacher: a local diffusers denoiser, its scheduler, and its conditioning.

Layout of a teacher directory (diffusers' ``from_pretrained(path, subfolder=...)`` convention)::

    <path>/unet/config.json + diffusion_pytorch_model.safetensors       the denoiser (any supported diffusers model;
                                                                        ``transformer/`` for the transformer families)
    <path>/scheduler/scheduler_config.json                              its noise schedule
    <path>/class_embedder/config.json + *.safetensors                   (class conditioning) labels -> context
    <path>/text_encoder/ + tokenizer/                                   (prompts conditioning) transformers files
    <path>/vae/                                                         (optional) latent decoder, evaluation only

The denoiser's family (:mod:`train.models.families`: unet, dit, pixart, cogvideox, wan) comes from its class or
``teacher.family``; it fixes the sample layout and how the condition reaches the model.

Conditioning modes: ``class`` (labels through the ``ClassEmbedder`` into a one-token cross-attention context, the
null class for CFG, as CompVis LDM-4; DiT embeds the labels itself, null class = number of classes),
``prompt_embeds`` (precomputed text embeddings, Stable Diffusion style), ``prompts`` (a prompt file encoded once at
load by the local text encoder, :mod:`train.models.text`) and ``none``. Nothing is downloaded: missing files raise an
error that says what to put where.

Trajectory sampler (:meth:`Teacher.ddim`): DDIM on the teacher's noise schedule (CogVideoX's own DDIM class, so that
its SNR shift is kept), or, for flow-matching teachers (Wan), the flow counterpart of DDIM on the teacher's shifted
sigma schedule (:func:`train.models.pipeline.flow_step`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, SchedulerMixin
from safetensors.torch import load_file
from torch import Tensor, nn

from qat.files import require_intact
from train.config import ConfigError, TeacherConfig, resolve_path
from train.models.class_embedder import ClassEmbedder
from train.models.families import (
    Family,
    apply_attention_heads,
    denoise,
    family_for_class,
    get_family,
    model_dtype,
    set_family,
)

__all__ = ["Teacher", "load_teacher", "check_teacher_files", "denoise", "is_flow_scheduler"]


def is_flow_scheduler(scheduler: SchedulerMixin) -> bool:
    """Whether ``scheduler`` describes a flow-matching model (``x_t = (1 - s) x_0 + s eps``, velocity output)."""
    cfg = scheduler.config
    return (type(scheduler).__name__.startswith("FlowMatch") or cfg.get("prediction_type") == "flow_prediction"
            or bool(cfg.get("use_flow_sigmas", False)))


@dataclass
class Teacher:
    """A loaded teacher. ``unet`` is frozen, in eval mode; ``contexts`` gives the denoiser's conditions."""

    unet: nn.Module
    scheduler: SchedulerMixin
    conditioning: str
    class_embedder: ClassEmbedder | None = None
    prompt_embeds: Tensor | None = None  # (N, L, D)
    negative_prompt_embeds: Tensor | None = None  # (1, L, D)
    vae: nn.Module | None = None  # latent decoder of latent models (evaluation images only)
    family: str = "unet"  # train.models.families name
    prompt_attention_mask: Tensor | None = None  # (N, L), families whose denoiser takes the mask (PixArt)
    negative_prompt_attention_mask: Tensor | None = None  # (1, L)
    shape_override: tuple[int, ...] | None = None  # teacher.sample_shape

    @property
    def adapter(self) -> Family:
        """The family adapter of the denoiser (:mod:`train.models.families`)."""
        return get_family(self.family)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one denoiser input: ``(C, H, W)``, or with frames for video families."""
        return self.shape_override if self.shape_override is not None else self.adapter.sample_shape(self.unet.config)

    @property
    def num_classes(self) -> int:
        """Number of conditions to draw from (classes or prompts); 1 without conditioning."""
        if self.class_embedder is not None:
            return int(self.class_embedder.null_label)
        if self.conditioning == "class" and self.adapter.class_labels:
            return self.adapter.num_classes(self.unet)
        if self.prompt_embeds is not None:
            return int(self.prompt_embeds.shape[0])
        return 1

    @property
    def is_flow(self) -> bool:
        """Whether the teacher is a flow-matching model (velocity prediction, Euler sampling)."""
        return is_flow_scheduler(self.scheduler)

    def to(self, device: torch.device | str) -> Teacher:
        self.unet.to(device)
        if self.vae is not None:
            self.vae.to(device)
        if self.class_embedder is not None:
            self.class_embedder.to(device)
        for name in ("prompt_embeds", "negative_prompt_embeds", "prompt_attention_mask",
                     "negative_prompt_attention_mask"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    def as_images(self, x: Tensor) -> Tensor:
        """Samples ``(B, *sample_shape)`` as images ``(B, C, H, W')`` (video frames side by side)."""
        return self.adapter.as_images(x)

    @torch.no_grad()
    def contexts(self, labels: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``(cond, uncond)`` conditions for condition indices ``labels (B,)``.

        Cross-attention states ``(B, L, D)`` (PixArt with a mask: ``(B, L, D + 1)``, see :mod:`train.models.families`),
        or, for DiT, the labels ``(B,)`` and the null labels.
        """
        if self.conditioning == "class" and self.class_embedder is None:  # the model embeds labels itself (DiT)
            return labels, torch.full_like(labels, self.num_classes)
        if self.conditioning == "class":
            null = self.class_embedder.null_labels(labels.shape[0], device=labels.device)
            dtype = model_dtype(self.unet)
            return self.class_embedder(labels).to(dtype), self.class_embedder(null).to(dtype)
        if self.prompt_embeds is not None:
            idx = labels.to(self.prompt_embeds.device)
            cond, uncond = self.prompt_embeds[idx], self.negative_prompt_embeds.expand(len(idx), -1, -1)
            text = self.adapter.text
            if self.prompt_attention_mask is not None and text is not None and text.model_mask:
                mask = self.prompt_attention_mask[idx].to(cond.dtype)[..., None]
                neg = self.negative_prompt_attention_mask.to(cond.dtype)[..., None].expand(len(idx), -1, -1)
                cond, uncond = torch.cat([cond, mask], -1), torch.cat([uncond, neg], -1)
            return cond, uncond
        return None, None

    def ddim(self, num_steps: int) -> SchedulerMixin:
        """The trajectory sampler with ``num_steps`` timesteps set (DDIM, or Euler for flow-matching teachers)."""
        if self.is_flow:
            sched = _flow_euler(self.scheduler)
        elif type(self.scheduler).__name__ == "CogVideoXDDIMScheduler":  # keeps its SNR shift (not a DDIM option)
            sched = type(self.scheduler).from_config(self.scheduler.config)
        else:
            sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(num_steps)
        return sched


def _flow_euler(scheduler: SchedulerMixin) -> FlowMatchEulerDiscreteScheduler:
    """A flow-matching Euler scheduler with the teacher's training steps and sigma shift."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if scheduler.config.get("use_dynamic_shifting", False):
            raise ValueError("teacher scheduler: resolution-dependent shifting (use_dynamic_shifting) is not "
                             "supported for trajectories; save the scheduler with a fixed shift")
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    cfg = scheduler.config  # e.g. Wan's UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
                                           shift=float(cfg.get("flow_shift", cfg.get("shift", 1.0)) or 1.0))


def _require(path: Path, what: str, fix: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} does not exist. {fix}")


def _scheduler(root: Path, subfolder: str) -> SchedulerMixin:
    """The teacher's own scheduler class (DDIM when the config names no diffusers scheduler)."""
    import diffusers

    name = json.loads((root / subfolder / "scheduler_config.json").read_text()).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        cls = DDIMScheduler
    return cls.from_pretrained(str(root), subfolder=subfolder)


def _resolve_family(cfg: TeacherConfig, model_cls: type, where: Path) -> Family:
    if cfg.family is not None:
        return get_family(cfg.family)
    fam = family_for_class(model_cls)
    if fam is None:
        raise ConfigError(f"teacher.family: {model_cls.__name__} in {where} is not a known denoiser family; set "
                          "teacher.family to one of ['unet', 'dit', 'pixart', 'cogvideox', 'wan'] if its forward "
                          "matches that family's")
    return fam


def check_teacher_files(cfg: TeacherConfig) -> None:
    """The teacher's directories, configs and weight files exist, and its safetensors files are complete (headers
    read, not tensors): cheap, so the trainer runs it before it writes anything.

    Raises:
        FileNotFoundError: a directory or file is missing; the message says what to put where.
        ValueError: a weight file is truncated or corrupt (named), before diffusers' loader turns it into an
            unrelated error.
    """
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
    require_intact(sorted(unet_dir.glob("*.safetensors")), "teacher weights (teacher.path)")
    if cfg.conditioning == "class":
        emb_dir = root / cfg.class_embedder_subfolder
        require_intact(sorted(emb_dir.glob("*.safetensors")), "class embedder (teacher.class_embedder_subfolder)")


def load_teacher(cfg: TeacherConfig, device: torch.device | str = "cpu", unet: nn.Module | None = None) -> Teacher:
    """Loads the teacher described by ``cfg`` from local files only.

    ``unet``: a denoiser to use instead of the one in ``<path>/<unet_subfolder>`` (e.g. a reloaded export, to sample
    it with the teacher's scheduler and conditioning without loading the float weights); it must be of the class that
    the folder's ``config.json`` names, whose family it gets.

    Raises:
        FileNotFoundError: a directory or weight file is missing; the message says what to put where.
        ConfigError: the conditioning does not fit the denoiser's family, the family is unknown, or ``unet`` is not
            of the folder's class.
    """
    import diffusers

    check_teacher_files(cfg)
    root = resolve_path(cfg.path)
    unet_dir = root / cfg.unet_subfolder
    class_name = json.loads((unet_dir / "config.json").read_text()).get("_class_name", "")
    model_cls = getattr(diffusers, class_name, None)
    if model_cls is None:
        raise ConfigError(f"teacher.unet_subfolder: unknown diffusers model class {class_name!r} in {unet_dir}")
    family = _resolve_family(cfg, model_cls, unet_dir)
    _check_conditioning(cfg, family)
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    if unet is None:
        unet = model_cls.from_pretrained(str(root), subfolder=cfg.unet_subfolder, torch_dtype=dtype)
    elif not isinstance(unet, model_cls):
        raise ConfigError(f"teacher.unet_subfolder: {unet_dir}/config.json names {class_name}, but the denoiser "
                          f"given to sample with it is a {type(unet).__name__}")
    apply_attention_heads(unet)  # per-level head counts of converted CompVis UNets (no-op otherwise)
    unet.requires_grad_(False).eval()
    set_family(unet, family.name)  # students are deep copies: they inherit it
    scheduler = _scheduler(root, cfg.scheduler_subfolder)

    teacher = Teacher(unet=unet, scheduler=scheduler, conditioning=cfg.conditioning, family=family.name,
                      shape_override=tuple(cfg.sample_shape) if cfg.sample_shape is not None else None)
    shape = teacher.sample_shape  # Wan without teacher.sample_shape raises here, before the text encoder runs
    if len(shape) != len(family.layout.split(",")):
        raise ConfigError(f"teacher.sample_shape: {list(shape)} does not fit family {family.name!r}, whose samples "
                          f"are {family.layout}")
    if cfg.vae_subfolder:
        teacher.vae = _load_vae(root, cfg.vae_subfolder, family)
    if cfg.conditioning == "class" and not family.class_labels:
        emb_dir = root / cfg.class_embedder_subfolder
        _require(emb_dir / "config.json", "class embedder (teacher.class_embedder_subfolder)",
                 f"class conditioning needs a ClassEmbedder saved with save_pretrained in {emb_dir}, or set "
                 "teacher.conditioning to 'prompt_embeds' / 'prompts' / 'none'")
        teacher.class_embedder = ClassEmbedder.from_pretrained(str(root), subfolder=cfg.class_embedder_subfolder)
        teacher.class_embedder.requires_grad_(False).eval()
    elif cfg.conditioning == "prompt_embeds":
        _set_prompts(teacher, _read_prompt_embeds(resolve_path(cfg.prompt_embeds_path)), dtype)
    elif cfg.conditioning == "prompts":
        from train.models.text import load_or_encode_prompts

        cache = resolve_path(cfg.prompt_embeds_cache) if cfg.prompt_embeds_cache else None
        tensors = load_or_encode_prompts(root, cfg.text_encoder_subfolder, cfg.tokenizer_subfolder, family,
                                         unet.config, resolve_path(cfg.prompt_file), cfg.negative_prompt,
                                         cfg.max_sequence_length, cache, dtype, device)
        _set_prompts(teacher, tensors, dtype)
    return teacher.to(device)


def _check_conditioning(cfg: TeacherConfig, family: Family) -> None:
    """Refuses conditioning modes the denoiser cannot take (e.g. prompts for DiT, classes for PixArt)."""
    text = cfg.conditioning in ("prompt_embeds", "prompts")
    if family.class_labels and cfg.conditioning != "class":
        raise ConfigError(f"teacher.conditioning: family {family.name!r} is class-conditional (labels go into the "
                          f"model); set teacher.conditioning=class, not {cfg.conditioning!r}")
    if family.name != "unet" and not family.class_labels and not text:
        raise ConfigError(f"teacher.conditioning: family {family.name!r} is text-conditioned; set "
                          f"teacher.conditioning to 'prompts' (prompt file + local text encoder) or 'prompt_embeds', "
                          f"not {cfg.conditioning!r}")


def _load_vae(root: Path, subfolder: str, family: Family) -> nn.Module:
    import diffusers

    if family.layout != "(C, H, W)":
        raise ConfigError(f"teacher.vae_subfolder: decoding {family.name} video latents is not supported; unset it "
                          "(evaluation then compares latents)")
    vae_dir = root / subfolder
    _require(vae_dir / "config.json", "latent decoder (teacher.vae_subfolder)",
             f"save the VQModel / AutoencoderKL of the latent model with save_pretrained into {vae_dir}, or "
             "unset teacher.vae_subfolder")
    vae_cls = getattr(diffusers, json.loads((vae_dir / "config.json").read_text()).get("_class_name", ""), None)
    if vae_cls is None:
        raise ConfigError(f"teacher.vae_subfolder: unknown diffusers model class in {vae_dir}/config.json")
    return vae_cls.from_pretrained(str(root), subfolder=subfolder).requires_grad_(False).eval()


def _read_prompt_embeds(path: Path) -> dict[str, Tensor]:
    _require(path, "prompt embeddings (teacher.prompt_embeds_path)",
             "Save a safetensors file with 'prompt_embeds' (N, L, D) and 'negative_prompt_embeds' (1, L, D).")
    tensors = load_file(str(path))
    missing = {"prompt_embeds", "negative_prompt_embeds"} - set(tensors)
    if missing:
        raise ValueError(f"{path}: missing tensors {sorted(missing)}; expected 'prompt_embeds' (N, L, D) and "
                         "'negative_prompt_embeds' (1, L, D)")
    emb, neg = tensors["prompt_embeds"], tensors["negative_prompt_embeds"]
    if emb.dim() != 3 or neg.dim() != 3 or neg.shape[0] != 1 or neg.shape[1:] != emb.shape[1:]:
        raise ValueError(f"{path}: prompt_embeds {tuple(emb.shape)} and negative_prompt_embeds {tuple(neg.shape)} "
                         "must be (N, L, D) and (1, L, D) with the same L and D")
    if ("prompt_attention_mask" in tensors) != ("negative_prompt_attention_mask" in tensors):
        raise ValueError(f"{path}: give both 'prompt_attention_mask' (N, L) and 'negative_prompt_attention_mask' "
                         "(1, L), or neither")
    return tensors


def _set_prompts(teacher: Teacher, tensors: dict[str, Tensor], dtype: torch.dtype) -> None:
    teacher.prompt_embeds = tensors["prompt_embeds"].to(dtype)
    teacher.negative_prompt_embeds = tensors["negative_prompt_embeds"].to(dtype)
    if "prompt_attention_mask" in tensors:
        teacher.prompt_attention_mask = tensors["prompt_attention_mask"].long()
        teacher.negative_prompt_attention_mask = tensors["negative_prompt_attention_mask"].long()
