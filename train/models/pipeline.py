"""Sampling a teacher or a (quantized) student in a diffusers pipeline, with any diffusers scheduler.

:class:`QATDiffusionPipeline` is a :class:`diffusers.DiffusionPipeline` for denoisers conditioned the way DiffQAT's
teachers are (class labels through a ``ClassEmbedder`` into cross-attention, as CompVis LDM-4; precomputed prompt
embeddings; or nothing), in pixel space or in the latent space of an optional ``vae``. It follows diffusers'
sampling loop (``scale_model_input``, ``step`` with the scheduler's own extra arguments, ``init_noise_sigma``), so
any scheduler works: DDIM, DDPM, PNDM, DPM-Solver(++), UniPC, Euler, Heun...

The denoiser is called through its family adapter (:func:`train.models.families.denoise`), so the same pipeline samples
UNets, DiT (class labels), PixArt (text states + mask), CogVideoX and Wan (video latents, ``(B, F, C, H, W)`` /
``(B, C, F, H, W)``). Video latents are returned as they are (no video decoder).

This module holds the one sampling loop of DiffQAT (:meth:`QATDiffusionPipeline.denoise_loop`): evaluation samples,
TensorBoard sample grids, calibration inputs and the teacher's training trajectories all run it, and the online
trajectory walker takes its steps with the same two primitives (:func:`guided_eps`, the one place a denoiser is
called with classifier-free guidance, and :meth:`QATDiffusionPipeline.advance`). Every loop starts by resetting the
state of stateful modules (:func:`qat.reset_sampling_state`), so two calls with the same seeds give the same samples.

Timestep-aware modules (temporal quantizers) are set from each call's timestep (:func:`qat.timestep`), so a student
trained on a 100-step DDIM grid samples with 20, 50 or 250 steps of any scheduler: sampler timesteps on the
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
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput, SchedulerMixin
from torch import Tensor, nn

from qat.sampling import cfg_combine, reset_sampling_state
from qat.timestep import timestep, timestep_modules
from train.models.families import denoise, model_dtype
from train.models.schedulers import scheduler_class
from train.models.teacher import Teacher, is_flow_scheduler

__all__ = ["QATDiffusionPipeline", "guided_eps", "batch_timesteps", "flow_step", "make_scheduler", "sample_seeds",
           "to_uint8_nhwc", "save_adm_npz", "load_adm_npz"]

#: ``callback(step_index, t, x_t, eps_cond, eps_uncond)`` of :meth:`QATDiffusionPipeline.denoise_loop`
StepCallback = Callable[[int, Tensor, Tensor, Tensor, Tensor | None], None]


def guided_eps(model: nn.Module, x: Tensor, t: Tensor, cond: Tensor | None, uncond: Tensor | None,
               guidance: float, modules: list[nn.Module] | None = None,
               family: str | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(eps_u + w (eps_c - eps_u), eps_c, eps_u)`` in float32 from one batched call (uncond first, as CompVis LDM).

    The guidance combination runs in float32 also for a bf16 model (its outputs are cast first), so that trajectory,
    calibration, evaluation and sampling targets do not carry a bf16 rounding of the difference ``eps_c - eps_u``.

    ``t`` is ``(B,)``; timestep-aware modules of ``model`` are set from it for the duration of the call. Without
    ``uncond`` (no guidance) the model runs once on ``cond`` (or unconditioned) and ``eps = eps_c``. Inputs and
    floating-point contexts are cast to the model's parameter dtype (a bf16 teacher next to an fp32 student); label
    contexts (DiT) stay integers. ``modules``: ``qat.timestep_modules(model)`` computed once by a caller that calls
    many times (skips a walk over every module per call).
    """
    dtype = model_dtype(model)
    x = x.to(dtype)
    reuse = not torch.is_grad_enabled()  # nothing saved for backward: the weights' tensor can be rewritten

    def ctx(c: Tensor | None) -> Tensor | None:
        return c.to(dtype) if c is not None and c.is_floating_point() else c

    if uncond is None:
        with timestep(model, t, modules, reuse):
            eps = denoise(model, x, t, ctx(cond), family).float()
        return eps, eps, None
    tt = torch.cat([t, t])
    with timestep(model, tt, modules, reuse):
        out = denoise(model, torch.cat([x, x]), tt, ctx(torch.cat([uncond, cond])), family)
    eps_u, eps_c = out.float().chunk(2)
    return cfg_combine(eps_u, eps_c, guidance), eps_c, eps_u


def batch_timesteps(t: Tensor, batch: int, device: torch.device | str) -> Tensor:
    """``(batch,)`` copies of sampler timestep ``t``: long for DDPM steps, float32 for flow-matching times. A timestep
    already on the device is expanded there; a host one is filled in on the device (no synchronisation either way)."""
    dtype = torch.long if not t.is_floating_point() else torch.float32
    if t.device.type != "cpu":
        return t.reshape(()).expand(batch).to(dtype)
    return torch.full((batch,), t.item(), device=device, dtype=dtype)


def _step_with_noise(sched: Any, eps: Tensor, t: Tensor, x: Tensor, eta: float, noise: Tensor) -> Tensor:
    """One sampler update with externally drawn noise: DDIM (diffusers' ``variance_noise``) or :func:`flow_step`."""
    if isinstance(sched, FlowMatchEulerDiscreteScheduler):
        i = int((sched.timesteps == t).nonzero()[0, 0])
        return flow_step(eps, x, float(sched.sigmas[i]), float(sched.sigmas[i + 1]), eta, noise)
    return sched.step(eps, int(t), x, eta=eta, variance_noise=noise if eta > 0 else None).prev_sample


def flow_step(v: Tensor, x: Tensor, sigma: float, sigma_next: float, eta: float, noise: Tensor) -> Tensor:
    """DDIM with ``eta`` for a flow-matching model: ``x_t = (1 - s) x_0 + s eps``, velocity ``v = eps - x_0``.

    With ``a = 1 - s``, ``b = s`` and ``r = sqrt(a^2 + b^2)``, ``x_t / r`` is a variance-preserving diffusion state
    with ``abar = a^2 / r^2``, so DDIM's update (Song et al. 2021, Eq. 12) applies there:

        x0 = x - s v,   eps = x + (1 - s) v
        c^2 = eta^2 (1 - abar') / (1 - abar) (1 - abar / abar')
        x' = r' (sqrt(abar') x0 + sqrt(1 - abar' - c^2) eps + c z)

    For ``eta = 0`` this is exactly the Euler step ``x + (s' - s) v`` of the flow ODE; ``eta = 1`` is ancestral
    sampling, as EfficientDM's stochastic DDIM trajectories (dossier Sec. 6).

    Args:
        v: model output ``(B, ...)``; x: current sample; sigma, sigma_next: noise levels of this and the next step.
        eta: stochasticity in ``[0, 1]``; noise: standard normal ``z`` of ``x``'s shape.
    """
    x0, eps = x - sigma * v, x + (1.0 - sigma) * v
    a, b, a_n, b_n = 1.0 - sigma, sigma, 1.0 - sigma_next, sigma_next
    if eta == 0.0 or b_n == 0.0:
        return a_n * x0 + b_n * eps
    r2, r2_n = a * a + b * b, a_n * a_n + b_n * b_n
    abar, abar_n = a * a / r2, a_n * a_n / r2_n
    c2 = eta**2 * (1.0 - abar_n) / (1.0 - abar) * (1.0 - abar / abar_n)
    c2 = min(c2, 1.0 - abar_n)  # rounding guard: the deterministic part keeps a non-negative weight
    return r2_n**0.5 * (abar_n**0.5 * x0 + (1.0 - abar_n - c2) ** 0.5 * eps + c2**0.5 * noise)


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

    def advance(self, eps: Tensor, t: Tensor, x: Tensor, *, eta: float = 0.0, noise: Tensor | None = None,
                generator: list[torch.Generator] | None = None) -> Tensor:
        """One scheduler update ``x_t -> x_{t-1}`` from the guided prediction ``eps`` (float32).

        ``noise``: the step's Gaussian draw, given by the caller (DDIM's ``variance_noise``, or the flow
        counterpart :func:`flow_step`), so that a trajectory's noise comes from its own stream; without it the
        scheduler draws from ``generator`` (one per sample) as diffusers pipelines do.
        """
        if noise is not None:
            return _step_with_noise(self.scheduler, eps, t, x, eta, noise)
        extra = self._extra_step_kwargs(generator, eta)
        return self.scheduler.step(eps, t, x, **extra, return_dict=False)[0]

    @torch.no_grad()
    def denoise_loop(self, x: Tensor, cond: Tensor | None, uncond: Tensor | None, guidance: float, *,
                     eta: float = 0.0, generator: list[torch.Generator] | None = None,
                     noise_fn: Callable[[int], Tensor] | None = None, callback: StepCallback | None = None,
                     progress: bool = False) -> Tensor:
        """The sampling loop: from ``x`` (already scaled by ``init_noise_sigma``) over the scheduler's timesteps.

        Args:
            x: ``(B, *sample_shape)`` float32 start.
            cond, uncond: the conditions (:meth:`_contexts` / ``Teacher.contexts``); ``uncond`` None runs the
                conditional branch only (no guidance).
            guidance: CFG scale ``w``.
            eta: DDIM eta (schedulers without eta ignore it).
            generator: per-sample generators for the scheduler's own draws.
            noise_fn: ``noise_fn(i)`` gives step ``i``'s Gaussian draw (called before the step's model call, so a
                host-side draw overlaps the device's work); then :meth:`advance` uses it.
            callback: called after each model call with ``(i, t, x_t, eps_c, eps_u)``.
            progress: show diffusers' progress bar.

        Returns:
            the final sample, float32.
        """
        unet = self.unet
        reset_sampling_state(unet)  # stateful modules (a previous step's cache) start every run empty
        modules = timestep_modules(unet)
        scale_input = getattr(self.scheduler, "scale_model_input", lambda sample, timestep: sample)
        steps = self.scheduler.timesteps
        for i, t in enumerate(self.progress_bar(steps) if progress else steps):
            noise = noise_fn(i) if noise_fn is not None else None
            t_batch = batch_timesteps(t, x.shape[0], x.device)
            eps, eps_c, eps_u = guided_eps(unet, scale_input(x, t), t_batch, cond, uncond, guidance, modules,
                                           self.family)
            if callback is not None:
                callback(i, t_batch, x, eps_c, eps_u)
            x = self.advance(eps, t, x.float(), eta=eta, noise=noise, generator=generator)
        return x

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
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # flow-matching schedulers start at unit variance and do not rescale inputs
        x = noise.to(device=device, dtype=torch.float32) * getattr(self.scheduler, "init_noise_sigma", 1.0)
        guided = cond is not None and guidance_scale != 1.0  # w = 1 runs only the conditional branch
        x = self.denoise_loop(x, cond, uncond if guided else None, guidance_scale, eta=eta, generator=generator,
                              progress=True)
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
