"""Sampling a teacher or a (quantized) student in a diffusers pipeline, with any diffusers scheduler.

:class:`QATDiffusionPipeline` is a :class:`diffusers.DiffusionPipeline` for denoisers conditioned the way DiffQAT's
teachers are (class labels through a ``ClassEmbedder`` into cross-attention, as CompVis LDM-4; precomputed prompt
embeddings; or nothing), in pixel space or in the latent space of an optional ``vae``. It follows diffusers'
sampling loop (``scale_model_input``, ``step`` with the scheduler's own extra arguments, ``init_noise_sigma``), so
any scheduler works: DDIM, DDPM, PNDM, DPM-Solver(++), UniPC, Euler, Heun...

The denoiser is called through its family adapter (:func:`train.models.families.denoise`), so the same pipeline samples
UNets, DiT (class labels), PixArt (text states + mask), CogVideoX and Wan (video latents, ``(B, F, C, H, W)`` /
``(B, C, F, H, W)``). Video latents are returned as they are (no video decoder).

Temporal quantizers read the sampler's timestep from each denoiser call (:func:`qat.attach_timestep_hook`), so a
student trained on a 100-step DDIM grid samples with 20, 50 or 250 steps of any scheduler: sampler timesteps on the
training grid use their row, the others interpolate between the two nearest rows.

Reproducibility: sample ``i`` of an evaluation draws its label and initial noise from its own generator
(:func:`sample_seeds`), and stochastic schedulers get one generator per sample, so a sample does not depend on the
batch size, on which process drew it, or on the model variant (FP, PTQ, QAT see identical noise).

Outputs in the layout of the ADM evaluator (Dhariwal & Nichol 2021, ``guided-diffusion/evaluations``):
:func:`save_adm_npz` writes ``arr_0`` (uint8 NHWC images) and ``arr_1`` (labels).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin
from torch import Tensor, nn

import qat
from qat.timestep import temporal_quantizers
from train.models.families import denoise, model_dtype
from train.models.teacher import Teacher, is_flow_scheduler

__all__ = ["QATDiffusionPipeline", "SCHEDULER_ALIASES", "make_scheduler", "sample_seeds", "to_uint8_nhwc",
           "save_adm_npz", "load_adm_npz"]

#: short names accepted by ``eval.scheduler`` (any diffusers scheduler class name works as well).
SCHEDULER_ALIASES: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
}


def scheduler_class(name: str) -> type[SchedulerMixin]:
    """The diffusers scheduler class for an alias (``ddim``) or a class name (``DDIMScheduler``)."""
    cls_name = SCHEDULER_ALIASES.get(name, name)
    cls = getattr(diffusers, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        known = sorted(SCHEDULER_ALIASES)
        raise ValueError(f"eval.scheduler: unknown scheduler {name!r}; use one of {known} or a diffusers scheduler "
                         "class name such as 'DPMSolverMultistepScheduler'")
    return cls


def make_scheduler(name: str, base: SchedulerMixin) -> SchedulerMixin:
    """A fresh scheduler of type ``name`` on the noise schedule (betas, prediction type) of ``base``.

    Raises:
        ValueError: ``base`` is a flow-matching schedule and ``name`` a scheduler that cannot sample it.
    """
    cls = scheduler_class(name)
    extra = {}
    if cls.__name__.startswith("FlowMatch") and "flow_shift" in base.config:  # UniPC / DPM-Solver spell it flow_shift
        extra["shift"] = base.config["flow_shift"]
    sched = cls.from_config(base.config, **extra)
    # from_config carries every key over (also to DDIM, which cannot step flow_prediction): ask the class itself
    takes_flow = "use_flow_sigmas" in inspect.signature(cls.__init__).parameters
    flow_capable = cls.__name__.startswith("FlowMatch") or (takes_flow and bool(sched.config.use_flow_sigmas))
    if is_flow_scheduler(base) and not flow_capable:
        raise ValueError(f"eval.scheduler: {name!r} cannot sample the flow-matching teacher "
                         f"({type(base).__name__}); use FlowMatchEulerDiscreteScheduler, or UniPCMultistepScheduler / "
                         "DPMSolverMultistepScheduler with the teacher's use_flow_sigmas config")
    return sched


def sample_seeds(indices: list[int], num_classes: int, seed: int, shape: tuple[int, ...],
                 balanced: bool = True) -> tuple[Tensor, Tensor, list[torch.Generator]]:
    """Labels, initial noise and per-sample generators of evaluation samples ``indices``.

    Sample ``i`` uses ``torch.Generator().manual_seed(seed + i)``: its noise comes from that generator and, with
    ``balanced``, its label is ``i mod num_classes`` (the ADM protocol: equally many samples per class); otherwise
    the label is drawn from the generator first.

    Returns:
        labels ``(B,)``, noise ``(B, *shape)`` on the CPU, and the generators (positioned after the noise), one per
        sample, for the scheduler's stochastic steps.
    """
    labels, noise, gens = [], [], []
    for i in indices:
        gen = torch.Generator().manual_seed(seed + i)
        label = i % num_classes if balanced else int(torch.randint(0, num_classes, (1,), generator=gen))
        labels.append(label)
        noise.append(torch.randn((1, *shape), generator=gen))
        gens.append(gen)
    return torch.tensor(labels, dtype=torch.long), torch.cat(noise) if noise else torch.empty(0, *shape), gens


class QATDiffusionPipeline(DiffusionPipeline):
    """Classifier-free-guided sampling of a diffusers denoiser with DiffQAT's conditioning.

    Args:
        unet: the denoiser (teacher, fake-quantized student, or reloaded export); called through its family
            adapter (:func:`train.models.families.denoise`).
        scheduler: any diffusers scheduler.
        class_embedder: labels -> ``(B, 1, D)`` context (class conditioning), or None.
        vae: decoder of latent models (``VQModel`` / ``AutoencoderKL``), or None for pixel-space models.
    """

    model_cpu_offload_seq = "unet->vae"

    def __init__(self, unet: nn.Module, scheduler: SchedulerMixin, class_embedder: nn.Module | None = None,
                 vae: nn.Module | None = None) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, class_embedder=class_embedder, vae=vae)

    @classmethod
    def from_teacher(cls, teacher: Teacher, unet: nn.Module | None = None,
                     scheduler: str | SchedulerMixin = "ddim") -> QATDiffusionPipeline:
        """The pipeline of ``teacher``'s conditioning and schedule, sampling ``unet`` (default: the teacher)."""
        sched = make_scheduler(scheduler, teacher.scheduler) if isinstance(scheduler, str) else scheduler
        pipe = cls(unet=teacher.unet if unet is None else unet, scheduler=sched,
                   class_embedder=teacher.class_embedder, vae=teacher.vae)
        pipe.prompt_embeds, pipe.negative_prompt_embeds = teacher.prompt_embeds, teacher.negative_prompt_embeds
        pipe.teacher_contexts, pipe.family = teacher.contexts, teacher.family
        return pipe

    prompt_embeds: Tensor | None = None
    negative_prompt_embeds: Tensor | None = None
    #: conditions of a teacher (``Teacher.contexts``): used instead of the class embedder / prompt embeddings
    teacher_contexts: Callable[[Tensor], tuple[Tensor | None, Tensor | None]] | None = None
    #: the denoiser's family (:mod:`train.models.families`); None detects it from the model
    family: str | None = None

    def _contexts(self, labels: Tensor, device: torch.device, dtype: torch.dtype) -> tuple[Tensor | None, ...]:
        if self.teacher_contexts is not None:
            if self.class_embedder is not None:  # the teacher's own embedder: keep it next to the sampled model
                self.class_embedder.to(device)
            # float states follow the model's dtype; DiT's integer labels stay integers
            return tuple(None if c is None else c.to(device, dtype) if c.is_floating_point() else c.to(device)
                         for c in self.teacher_contexts(labels.to(device)))
        if self.class_embedder is not None:
            null = self.class_embedder.null_labels(labels.shape[0], device=device)
            emb = self.class_embedder.to(device)
            return emb(labels.to(device)).to(dtype), emb(null).to(dtype)
        if self.prompt_embeds is not None:
            cond = self.prompt_embeds.to(device, dtype)[labels.to(device)]
            return cond, self.negative_prompt_embeds.to(device, dtype).expand_as(cond)
        return None, None

    def _extra_step_kwargs(self, generator: list[torch.Generator] | None, eta: float) -> dict:
        # Schedulers differ in the arguments of step(); pass eta / generator only to those that take them.
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params and generator is not None:
            kwargs["generator"] = generator
        return kwargs

    @torch.no_grad()
    def __call__(self, noise: Tensor, class_labels: Tensor | None = None, num_inference_steps: int = 20,
                 guidance_scale: float = 1.0, eta: float = 0.0, generator: list[torch.Generator] | None = None,
                 output_type: str = "pt", return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """Samples from initial noise ``x_T ~ N(0, I)`` of shape ``(B, *sample_shape)`` (scaled by the scheduler).

        Args:
            noise: initial Gaussian noise (unit variance); :func:`sample_seeds` gives it per sample index.
            class_labels: ``(B,)`` condition indices (class labels or prompt rows); ignored without conditioning.
            num_inference_steps: sampler steps.
            guidance_scale: classifier-free guidance ``eps_u + w (eps_c - eps_u)``; 1 runs only the conditional
                branch.
            eta: DDIM eta (schedulers without eta ignore it).
            generator: one generator per sample for stochastic schedulers.
            output_type: ``pt`` (float ``(B, C, H, W)`` in ``[-1, 1]``, unclamped; video latents as sampled),
                ``np`` (uint8 NHWC) or ``pil``.

        Returns:
            :class:`diffusers.ImagePipelineOutput` with ``images``.
        """
        unet = self.unet
        device, dtype = next(unet.parameters()).device, model_dtype(unet)
        labels = torch.zeros(noise.shape[0], dtype=torch.long) if class_labels is None else class_labels
        cond, uncond = self._contexts(labels, device, dtype)
        guided = cond is not None and guidance_scale != 1.0
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # flow-matching schedulers start at unit variance and do not rescale inputs
        x = noise.to(device=device, dtype=torch.float32) * getattr(self.scheduler, "init_noise_sigma", 1.0)
        scale_input = getattr(self.scheduler, "scale_model_input", lambda sample, timestep: sample)
        extra = self._extra_step_kwargs(generator, eta)
        # Temporal quantizers take the timestep from every call; a teacher has none and gets no hook.
        hook = qat.attach_timestep_hook(unet) if temporal_quantizers(unet) else None
        try:
            for t in self.progress_bar(self.scheduler.timesteps):
                x_in = scale_input(x, t).to(dtype)
                t_in = t.expand(x.shape[0] * (2 if guided else 1)).to(device)
                if guided:
                    # uncond first, as CompVis LDM and train.data.trajectories.guided_eps
                    out = denoise(unet, torch.cat([x_in, x_in]), t_in, torch.cat([uncond, cond]), self.family)
                    eps_u, eps_c = out.float().chunk(2)
                    eps = eps_u + guidance_scale * (eps_c - eps_u)
                else:
                    eps = denoise(unet, x_in, t_in, cond, self.family).float()
                x = self.scheduler.step(eps, t, x, **extra, return_dict=False)[0]
        finally:
            if hook is not None:
                hook.remove()
                qat.clear_timestep(unet)
        if self.vae is not None:
            scale = getattr(self.vae.config, "scaling_factor", 1.0)
            x = self.vae.decode(x.to(next(self.vae.parameters()).dtype) / scale).sample.float()
        if output_type == "np":
            images = to_uint8_nhwc(x)
        elif output_type == "pil":
            images = self.numpy_to_pil(to_uint8_nhwc(x).astype(np.float32) / 255.0)
        else:
            images = x
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def to_uint8_nhwc(images: Tensor) -> np.ndarray:
    """``[-1, 1]`` float ``(B, C, H, W)`` -> uint8 ``(B, H, W, C)`` with ``round((x + 1) * 127.5)``, clipped."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_adm_npz(path: str | Path, images: Tensor, labels: Tensor | None) -> Path:
    """Writes samples in the ADM evaluator layout: ``arr_0`` uint8 NHWC images, ``arr_1`` int64 labels."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = [to_uint8_nhwc(images)]
    if labels is not None:
        arrays.append(labels.cpu().numpy().astype(np.int64))
    np.savez(path, *arrays)
    return path


def load_adm_npz(path: str | Path) -> tuple[Tensor, Tensor | None]:
    """Reads an ADM-layout ``.npz``: images as float ``(N, C, H, W)`` in ``[-1, 1]`` and labels (or None)."""
    with np.load(path, allow_pickle=False) as data:
        if "arr_0" not in data:
            raise ValueError(f"{path}: no 'arr_0' array; expected the ADM layout (arr_0 uint8 NHWC images, "
                             "optional arr_1 labels)")
        arr = data["arr_0"]
        labels = torch.from_numpy(data["arr_1"]) if "arr_1" in data else None
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, C), got {arr.dtype} {arr.shape}")
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images, labels
