"""How close a quantized student is to its full-precision teacher: fidelity and distribution metrics.

Three kinds of numbers, computed the same way for every variant (``fp`` = the teacher, ``ptq`` = the calibrated
student before training, ``qat`` = the trained student):

* Trajectory fidelity: the CFG eps-MSE against the teacher on held-out teacher trajectories, overall and per
  sampler step (:func:`heldout_eps_mse`). The seeds (``eval.seed``) never occur in training, so this measures
  generalisation over ``(x_t, t, c)``, not memorisation.
* Sample fidelity: final samples drawn from the same noise and labels as the teacher's, in the model's diffusers
  pipeline with the configured scheduler (:func:`generate`), compared by PSNR / SSIM / MSE (:func:`fidelity`).
* Distribution: FD-digits and class accuracy of class-conditional samples for the embedded digits domain, or FID,
  sFID, IS and precision/recall with Inception features (:class:`DistributionScorer`).

Sampling is sharded by sample index (:func:`shard_indices`): sample ``i`` has its own seed, so the gathered set is
identical for any number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

import qat
from qat.sampling import sampling_state_modules
from train.data.trajectories import trajectory_steps
from train.eval.metrics import digits_fd_and_accuracy, extract_features, psnr, ssim
from train.models.pipeline import QATDiffusionPipeline, guided_eps, sample_seeds
from train.models.teacher import Teacher, is_flow_scheduler

__all__ = ["HeldOut", "heldout_eps_mse", "x0_error_weight", "SampleSet", "generate", "shard_indices",
           "gather_samples", "fidelity", "merge_samples", "DistributionScorer", "Evaluator"]


class HeldOut:
    """Teacher trajectories for evaluation, generated once and reused for every model compared."""

    def __init__(self, teacher: Teacher, num_trajectories: int, num_steps: int, eta: float, guidance: float,
                 seed: int, device: torch.device | str) -> None:
        self.teacher, self.guidance, self.num_steps, self.seed = teacher, guidance, num_steps, seed
        self.data = trajectory_steps(teacher, list(range(num_trajectories)), num_steps, eta, guidance, seed, device)
        self.num_trajectories = num_trajectories
        #: sampler timestep of each step, in sampler order (high noise first)
        self.timesteps = [int(t) for t in teacher.ddim(num_steps).timesteps]


@torch.no_grad()
def heldout_eps_mse(model: nn.Module, held: HeldOut, batch_size: int = 256) -> dict[str, Any]:
    """Error of the CFG eps of ``model`` against the teacher's on the held-out ``(x_t, t, c)``.

    ``eps_mse = mean_{n, t} ||eps_model(x_t, t, c) - eps_teacher(x_t, t, c)||^2 / D`` (CFG-combined eps, ``D``
    elements per sample) is the distillation objective. Near ``t = 0`` the eps error barely moves the sample but
    dominates that mean, so the implied clean-sample error is reported too:
    ``x0_mse = mean (1 - abar_t) / abar_t * ||eps_model - eps_teacher||^2 / D``, since
    ``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (for other model outputs see :func:`x0_error_weight`;
    "eps" then stands for whatever the model predicts, ``v`` or a flow velocity).

    A model with per-sampling-call state (:class:`qat.sampling.SamplingStateful`, e.g. a cross-timestep feature
    cache) is called once per trajectory step with all trajectories, in sampler order after one reset, so that each
    call sees the previous step of the same trajectories (teacher-forced, as in training); any other model in
    batches of ``batch_size`` independent samples.

    Returns:
        ``eps_mse``, ``x0_mse`` and their per-step means ``eps_mse_by_step`` / ``x0_mse_by_step`` (high noise
        first, in sampler order; the timesteps are ``held.timesteps``).
    """
    device = next(model.parameters()).device
    d = held.data
    n = d["x"].shape[0]
    per_sample = torch.empty(n)
    modules = qat.timestep_modules(model)
    stateful = bool(sampling_state_modules(model))
    # trajectory_steps lays samples out step-major: (step, trajectory)
    size = held.num_trajectories if stateful else batch_size
    qat.reset_sampling_state(model)
    for start in range(0, n, size):
        sl = slice(start, min(start + size, n))
        x, t = d["x"][sl].to(device), d["t"][sl].to(device)
        cond, uncond = held.teacher.contexts(d["labels"][sl].to(device))
        if not stateful:
            qat.reset_sampling_state(model)  # every batch is a set of independent samples
        eps, _, _ = guided_eps(model, x, t, cond, uncond, held.guidance, modules)
        target = d["eps_cond"][sl].to(device)
        if "eps_uncond" in d:
            eu = d["eps_uncond"][sl].to(device)
            target = qat.cfg_combine(eu, target, held.guidance)
        per_sample[sl] = (eps.float() - target).pow(2).flatten(1).mean(1).cpu()
    x0 = per_sample.double() * x0_error_weight(held.teacher.scheduler, d["t"].cpu())
    qat.reset_sampling_state(model)
    by_step = per_sample.reshape(held.num_steps, held.num_trajectories).mean(1)
    x0_by_step = x0.reshape(held.num_steps, held.num_trajectories).mean(1)
    return {"eps_mse": float(per_sample.mean()), "x0_mse": float(x0.mean()),
            "eps_mse_by_step": [float(v) for v in by_step], "x0_mse_by_step": [float(v) for v in x0_by_step]}


def x0_error_weight(scheduler: Any, t: Tensor) -> Tensor:
    """Factor ``w(t)`` with ``||x0_model - x0_teacher||^2 = w(t) ||out_model - out_teacher||^2`` at ``x_t``, ``(N,)``.

    ``epsilon``: ``(1 - abar) / abar``; ``v_prediction`` (``x0 = sqrt(abar) x - sqrt(1 - abar) v``): ``1 - abar``;
    ``sample``: 1; flow matching (``x0 = x - sigma v``, ``t = sigma * num_train_timesteps``): ``sigma^2``.
    """
    if is_flow_scheduler(scheduler):
        return (t.double() / float(scheduler.config.num_train_timesteps)) ** 2
    abar = scheduler.alphas_cumprod.double()[t.long()]
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "v_prediction":
        return 1 - abar
    if kind == "sample":
        return torch.ones_like(abar)
    return (1 - abar) / abar


@dataclass
class SampleSet:
    """Generated samples: ``images`` float ``(N, C, H, W)`` in ``[-1, 1]`` (unclamped; video latents with their
    frames side by side, :meth:`train.models.teacher.Teacher.as_images`), ``labels`` and sample
    ``indices`` ``(N,)``, all on the CPU and sorted by index."""

    images: Tensor
    labels: Tensor
    indices: Tensor

    def __len__(self) -> int:
        return int(self.indices.numel())


def shard_indices(num_samples: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The sample indices process ``rank`` of ``world_size`` draws: ``rank, rank + world_size, ...``."""
    return list(range(rank, num_samples, world_size))


@torch.no_grad()
def generate(model: nn.Module, teacher: Teacher, indices: list[int], *, scheduler: str = "ddim", num_steps: int = 20,
             guidance: float = 1.0, eta: float = 0.0, seed: int = 0, batch_size: int = 64,
             balanced: bool = True, progress: str | None = None) -> SampleSet:
    """Samples ``indices`` with ``model`` in the teacher's diffusers pipeline (:class:`QATDiffusionPipeline`).

    Labels and noise of sample ``i`` come from :func:`train.models.pipeline.sample_seeds` (seed ``seed + i``), so every
    model sees the same noise and label for the same index, whatever the batching. ``progress``: the description of
    a progress bar over the samples (None: none).
    """
    pipe = QATDiffusionPipeline.from_teacher(teacher, unet=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images, labels = [], []
    bar = tqdm(total=len(indices), desc=progress, unit="sample", disable=progress is None)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        lab, noise, gens = sample_seeds(chunk, teacher.num_classes, seed, teacher.sample_shape, balanced)
        out = pipe(noise, lab, num_inference_steps=num_steps, guidance_scale=guidance, eta=eta, generator=gens)
        images.append(teacher.as_images(out.images.float().cpu()))
        labels.append(lab)
        bar.update(len(chunk))
    bar.close()
    empty = teacher.as_images(torch.empty(0, *teacher.sample_shape))
    return SampleSet(torch.cat(images) if images else empty,
                     torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
                     torch.tensor(indices, dtype=torch.long))


def merge_samples(parts: list[SampleSet]) -> SampleSet:
    """One set from shards, sorted by sample index (so the result does not depend on the number of shards)."""
    idx = torch.cat([p.indices for p in parts])
    order = idx.argsort()
    return SampleSet(torch.cat([p.images for p in parts])[order], torch.cat([p.labels for p in parts])[order],
                     idx[order])


def gather_samples(local: SampleSet, world_size: int = 1) -> SampleSet:
    """All ``world_size`` processes' shards on every process (``torch.distributed``), sorted by index.

    ``world_size=1`` never communicates, even inside a process group: a run evaluates on rank 0 alone.
    """
    if world_size == 1:
        return merge_samples([local])
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != world_size:
        raise RuntimeError(f"gather_samples: {world_size} shards need an initialised process group of that size")
    parts: list[Any] = [None] * world_size
    dist.all_gather_object(parts, (local.images, local.labels, local.indices))
    return merge_samples([SampleSet(*p) for p in parts])


def fidelity(samples: SampleSet, reference: SampleSet) -> dict[str, float]:
    """Final-sample fidelity to the FP samples drawn from the same noise: MSE, PSNR and SSIM on ``[-1, 1]``.

    Both sets are clamped to ``[-1, 1]`` (the range a user sees). SSIM needs images of at least 11x11.
    """
    if not torch.equal(samples.indices, reference.indices):
        raise ValueError("fidelity: the sample sets hold different sample indices; compare samples drawn from the "
                         "same seeds")
    a, b = samples.images.clamp(-1, 1), reference.images.clamp(-1, 1)
    out = {"sample_mse": float((a.double() - b.double()).pow(2).mean()), "psnr_vs_fp": psnr(a, b, data_range=2.0)}
    if min(a.shape[-2:]) >= 11:
        out["ssim_vs_fp"] = ssim(a, b, data_range=2.0)
    return out


class DistributionScorer:
    """Distribution metrics of sample sets against a fixed real reference, featurised once.

    Args:
        kind: ``digits`` (FD-digits + class accuracy with the shipped digits classifier), ``inception`` (FID,
            sFID, IS, precision/recall, see :mod:`train.eval.fidelity`) or ``none``.
        classifier_path: digits classifier directory (``digits``).
        inception_path: local Inception-V3 weights (``inception``).
        reference_path: real images, ADM-layout ``.npz`` (``inception``; for ``digits`` the embedded real digits
            are used when None).
        cache_dir: where reference statistics are cached (``inception``).
        class_conditional: whether ``class_acc`` applies (class-conditional samples).
        device: where the Inception network runs.
    """

    def __init__(self, kind: str, *, classifier_path: str | None = None, inception_path: str | None = None,
                 reference_path: str | None = None, cache_dir: str | None = None,
                 class_conditional: bool = True, device: torch.device | str = "cpu") -> None:
        self.kind, self.class_conditional = kind, class_conditional
        if kind == "digits":
            from train.eval.digits import load_digits_classifier, load_digits_tensor
            from train.models.pipeline import load_adm_npz

            self.classifier = load_digits_classifier(classifier_path) if classifier_path else \
                load_digits_classifier()
            real = load_adm_npz(reference_path)[0] if reference_path else load_digits_tensor(16)[0]
            self.reference_features, _ = extract_features(self.classifier, real)
        elif kind == "inception":
            from train.eval.fidelity import load_inception, reference_statistics

            self.features = load_inception(inception_path, device=device)
            # featurised once per run (and cached on disk across runs, keyed by file contents and weights)
            self.reference = reference_statistics(reference_path, self.features, cache_dir=cache_dir)
        elif kind != "none":
            raise ValueError(f"eval.features: unknown kind {kind!r}; use 'digits', 'inception' or 'none'")

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        images = samples.images.clamp(-1, 1)
        if self.kind == "digits":
            out = digits_fd_and_accuracy(self.classifier, images, samples.labels, self.reference_features)
            if not self.class_conditional:
                out.pop("class_acc")
            return out
        if self.kind == "inception":
            from train.eval.fidelity import distribution_metrics

            return distribution_metrics(images, self.reference, self.features)
        return {}


class Evaluator:
    """Everything a run compares: the held-out trajectories, the FP samples and the distribution scorer.

    Built once (the teacher's trajectories and samples, and the real reference features, are computed here), then
    :meth:`evaluate` scores any number of models against the same references.

    Args:
        ev: the run's ``eval`` config section.
        teacher: the loaded teacher.
        trajectory_eta, trajectory_guidance: the training trajectories' DDIM eta and CFG scale; the held-out
            trajectories use them so that the eps-MSE is measured on the training distribution of ``(x_t, t)``.
        device: where models run.
        cache_dir: reference-statistics cache (Inception features).
        rank, world_size: sample shard of this process; :func:`gather_samples` reassembles the set.
        progress: progress bars over the samples of each model.
    """

    def __init__(self, ev: Any, teacher: Teacher, trajectory_eta: float, trajectory_guidance: float,
                 device: torch.device | str, cache_dir: str | None = None, rank: int = 0,
                 world_size: int = 1, progress: bool = False) -> None:
        self.ev, self.teacher, self.progress = ev, teacher, progress
        self.guidance = trajectory_guidance if ev.guidance_scale is None else ev.guidance_scale
        self.held = HeldOut(teacher, ev.num_trajectories, ev.num_steps, trajectory_eta, trajectory_guidance,
                            ev.seed, device)
        self.scorer = DistributionScorer(ev.features, classifier_path=ev.classifier_path,
                                         inception_path=ev.inception_path, reference_path=ev.reference_path,
                                         cache_dir=ev.stats_cache_dir or cache_dir,
                                         class_conditional=teacher.conditioning == "class", device=device)
        self.world_size = world_size
        self.indices = shard_indices(ev.num_samples, rank, world_size)
        self.fp_samples = self.samples(teacher.unet, "eval samples (FP teacher)")

    def samples(self, model: nn.Module, what: str = "eval samples") -> SampleSet:
        """``eval.num_samples`` samples of ``model`` (this process's shard, then gathered); ``what``: the
        progress bar's description."""
        ev = self.ev
        local = generate(model, self.teacher, self.indices, scheduler=ev.scheduler, num_steps=ev.sampling_steps,
                         guidance=self.guidance, eta=ev.eta, seed=ev.seed, batch_size=ev.batch_size,
                         progress=what if self.progress else None)
        return gather_samples(local, self.world_size)

    def sampler_info(self) -> dict[str, Any]:
        ev = self.ev
        return {"scheduler": ev.scheduler, "steps": ev.sampling_steps, "guidance_scale": self.guidance,
                "eta": ev.eta, "num_samples": ev.num_samples, "seed": ev.seed, "features": ev.features}

    def heldout_info(self) -> dict[str, Any]:
        return {"num_trajectories": self.held.num_trajectories, "num_steps": self.held.num_steps,
                "timesteps": self.held.timesteps}

    def evaluate(self, model: nn.Module | None) -> tuple[dict[str, Any], SampleSet]:
        """Metrics and samples of ``model``; ``None`` evaluates the FP teacher (distribution metrics only)."""
        if model is None:
            return self.scorer(self.fp_samples), self.fp_samples
        metrics: dict[str, Any] = {}
        samples = self.samples(model, "eval samples (student)")
        metrics.update(self.scorer(samples))
        metrics.update(fidelity(samples, self.fp_samples))
        metrics.update(heldout_eps_mse(model, self.held))
        return metrics, samples
