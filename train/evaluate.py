"""Quality of a student against its teacher: held-out eps-MSE along teacher trajectories and final-sample fidelity.

The held-out trajectories use seeds that training never uses (``eval.seed``), so the numbers measure
generalisation over ``(x_t, t, c)``, not memorisation of the training trajectories.
"""

from __future__ import annotations

import torch
from torch import nn

from train.metrics import psnr
from train.teacher import Teacher
from train.trajectories import _trajectories, guided_eps, sample, trajectory_start

__all__ = ["HeldOut", "heldout_eps_mse", "sample_fidelity"]


class HeldOut:
    """Teacher trajectories for evaluation, generated once and reused for every model compared."""

    def __init__(self, teacher: Teacher, num_trajectories: int, num_steps: int, eta: float, guidance: float,
                 seed: int, device: torch.device | str) -> None:
        self.teacher, self.guidance, self.num_steps, self.seed = teacher, guidance, num_steps, seed
        self.data = _trajectories(teacher, list(range(num_trajectories)), num_steps, eta, guidance, seed, device)
        self.num_trajectories = num_trajectories


@torch.no_grad()
def heldout_eps_mse(model: nn.Module, held: HeldOut, batch_size: int = 256) -> dict[str, float]:
    """Mean squared error of the CFG eps of ``model`` against the teacher's on the held-out ``(x_t, t, c)``.

    Returns:
        ``{"eps_mse": overall mean, "eps_mse_by_step": [...]}`` with one value per trajectory step (high noise
        first, in sampler order).
    """
    device = next(model.parameters()).device
    d = held.data
    n = d["x"].shape[0]
    per_sample = torch.empty(n)
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        x, t = d["x"][sl].to(device), d["t"][sl].to(device)
        cond, uncond = held.teacher.contexts(d["labels"][sl].to(device))
        eps, _, _ = guided_eps(model, x, t, cond, uncond, held.guidance)
        target = d["eps_cond"][sl].to(device)
        if "eps_uncond" in d:
            eu = d["eps_uncond"][sl].to(device)
            target = eu + held.guidance * (target - eu)
        per_sample[sl] = (eps.float() - target).pow(2).flatten(1).mean(1).cpu()
    # _trajectories lays samples out step-major: (step, trajectory)
    by_step = per_sample.reshape(held.num_steps, held.num_trajectories).mean(1)
    return {"eps_mse": float(per_sample.mean()), "eps_mse_by_step": [float(v) for v in by_step]}


@torch.no_grad()
def sample_fidelity(model: nn.Module, teacher: Teacher, num_samples: int, num_steps: int, guidance: float,
                    seed: int, reference: torch.Tensor | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """Final samples of ``model`` from the same noise and labels as the teacher's (DDIM, eta 0).

    Returns:
        ``({"sample_mse": ..., "psnr_vs_fp": ...}, samples)``; with no ``reference`` the teacher is sampled.
    """
    device = next(model.parameters()).device
    starts = [trajectory_start(teacher, i, seed) for i in range(num_samples)]
    labels = torch.cat([s[0] for s in starts]).to(device)
    noise = torch.cat([s[1] for s in starts]).to(device)
    if reference is None:
        reference, _ = sample(teacher.unet, teacher, labels, noise, num_steps, guidance)
    out, _ = sample(model, teacher, labels, noise, num_steps, guidance)
    a, b = out.clamp(-1, 1), reference.clamp(-1, 1)
    return {"sample_mse": float((a - b).pow(2).mean()), "psnr_vs_fp": psnr(a, b, data_range=2.0)}, out
