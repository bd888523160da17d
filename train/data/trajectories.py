"""Data-free training data: the teacher's own DDIM trajectories (EfficientDM Sec. 3.4, dossier Sec. 6).

The teacher samples from Gaussian noise with classifier-free guidance; every visited ``(x_t, t, c)`` is a training
input and the teacher's noise prediction there is the target. The trajectory is driven by the teacher's CFG eps,
so the student never sees its own drift (as in the paper).

* :class:`OnlineTrajectories` walks ``batch_size`` trajectories from high to low noise, one training batch per
  step (EfficientDM's order). Its state (position, current ``x_t``, RNG) is checkpointed, so a resumed run continues
  the same trajectory.
* :func:`generate_cache` writes trajectories once into safetensors shards plus a ``manifest.json`` (teacher,
  sampler, steps, guidance, seeds); it resumes by skipping finished shards, and process ``rank`` of ``world_size``
  takes every ``world_size``-th shard. :class:`CachedTrajectories` serves shuffled mixed-timestep batches.

Seeds: trajectory ``i`` (a global index) draws its labels and noise from ``torch.Generator().manual_seed(seed + i)``,
so the data do not depend on the number of processes, and ranks never share a trajectory.

Samples may be images ``(C, H, W)`` or videos (``(F, C, H, W)`` CogVideoX, ``(C, F, H, W)`` Wan); the sampler is
DDIM, or for flow-matching teachers its flow counterpart (:func:`flow_step`), with float timesteps ``1000 sigma``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

import qat
from train.models.families import model_dtype
from train.models.teacher import Teacher, denoise

__all__ = ["TrajectoryBatch", "guided_eps", "OnlineTrajectories", "generate_cache", "CachedTrajectories",
           "sample", "trajectory_start"]


@dataclass
class TrajectoryBatch:
    """One training batch: inputs ``x (B, *sample_shape)``, timesteps ``t (B,)``, contexts and targets like ``x``."""

    x: Tensor
    t: Tensor
    labels: Tensor
    cond: Tensor | None
    uncond: Tensor | None
    eps_cond: Tensor
    eps_uncond: Tensor | None

    def to(self, device: torch.device | str) -> TrajectoryBatch:
        def mv(v: Tensor | None) -> Tensor | None:
            return None if v is None else v.to(device, non_blocking=True)

        return TrajectoryBatch(*(mv(getattr(self, k)) for k in self.__dataclass_fields__))


def guided_eps(model: nn.Module, x: Tensor, t: Tensor, cond: Tensor | None, uncond: Tensor | None,
               guidance: float, quantizers: list[nn.Module] | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(eps_u + w (eps_c - eps_u), eps_c, eps_u)`` from one batched call (uncond first, as CompVis LDM).

    ``t`` is ``(B,)``; temporal quantizers of ``model`` are set from it for the duration of the call. Inputs and
    floating-point contexts are cast to the model's parameter dtype (a bf16 teacher next to an fp32 student); label
    contexts (DiT) stay integers. ``quantizers``: ``qat.temporal_quantizers(model)`` computed once by a caller that
    calls many times (skips a walk over every module per call).
    """
    dtype = model_dtype(model)
    x = x.to(dtype)
    reuse = not torch.is_grad_enabled()  # nothing saved for backward: the weights' tensor can be rewritten
    if cond is None:
        with qat.timestep(model, t, quantizers, reuse):
            eps = denoise(model, x, t, None)
        return eps, eps, None
    tt = torch.cat([t, t])
    context = torch.cat([uncond, cond])
    with qat.timestep(model, tt, quantizers, reuse):
        out = denoise(model, torch.cat([x, x]), tt, context.to(dtype) if context.is_floating_point() else context)
    eps_u, eps_c = out.chunk(2)
    return eps_u + guidance * (eps_c - eps_u), eps_c, eps_u


def trajectory_start(teacher: Teacher, index: int, seed: int, batch: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Labels ``(batch,)``, initial noise ``(batch, *sample_shape)`` and the generator state for trajectory
    ``index``."""
    gen = torch.Generator().manual_seed(seed + index)
    labels = torch.randint(0, teacher.num_classes, (batch,), generator=gen)
    noise = torch.randn((batch, *teacher.sample_shape), generator=gen)
    return labels, noise, gen.get_state()


class OnlineTrajectories:
    """Walks ``batch_size`` teacher trajectories step by step (EfficientDM's online data).

    Args:
        teacher: the loaded teacher (on the training device).
        num_steps, eta, guidance: DDIM steps, eta and CFG scale.
        batch_size: trajectories walked together.
        seed: base seed; this process's ``k``-th batch of trajectories uses global indices
            ``(k * world_size + rank) * batch_size + j``.
        rank, world_size: this process among the data-parallel processes.
    """

    def __init__(self, teacher: Teacher, num_steps: int, eta: float, guidance: float, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.teacher = teacher
        self.scheduler = teacher.ddim(num_steps)
        self.num_steps, self.eta, self.guidance = num_steps, eta, guidance
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.round = 0  # trajectory batches started by this process
        self.step = num_steps  # == num_steps: start a new batch on the next call
        self.x: Tensor | None = None
        self.labels: Tensor | None = None
        self.gen_states: list[Tensor] = []  # one noise stream per trajectory (DDIM eta > 0 noise)
        self._quantizers = qat.temporal_quantizers(teacher.unet)  # none for a float teacher; walked once

    def _start(self) -> None:
        first = (self.round * self.world_size + self.rank) * self.batch_size
        starts = [trajectory_start(self.teacher, first + j, self.seed) for j in range(self.batch_size)]
        self.labels = torch.cat([s[0] for s in starts])
        self.x = torch.cat([s[1] for s in starts])
        self.gen_states = [s[2] for s in starts]
        self.round += 1
        self.step = 0

    @torch.no_grad()
    def next_batch(self, device: torch.device | str) -> TrajectoryBatch:
        """The teacher's ``(x_t, t, c)`` at the next step and its predictions; advances ``x_t`` with DDIM."""
        if self.step >= self.num_steps:
            self._start()
        unet = self.teacher.unet
        x = self.x.to(device)
        t_val = self.scheduler.timesteps[self.step]
        t = _batch_t(t_val, x.shape[0], device)
        cond, uncond = self.teacher.contexts(self.labels.to(device))
        eps, eps_c, eps_u = guided_eps(unet, x, t, cond, uncond, self.guidance, self._quantizers)
        batch = TrajectoryBatch(x.float(), t, self.labels.to(device), cond, uncond, eps_c.float(),
                                None if eps_u is None else eps_u.float())
        noise, self.gen_states = _draw(self.gen_states, x.shape[1:])
        self.x = _ddim_step(self.scheduler, eps.float(), t_val, x.float(), self.eta, noise.to(device))
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "step": self.step, "x": self.x, "labels": self.labels,
                "gen_states": list(self.gen_states)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round, self.step = int(state["round"]), int(state["step"])
        self.x, self.labels = state["x"], state["labels"]
        self.gen_states = list(state["gen_states"])


def _manifest(teacher_path: str, num_steps: int, eta: float, guidance: float, seed: int, num_trajectories: int,
              shard_size: int) -> dict[str, Any]:
    return {"teacher": str(teacher_path), "sampler": "ddim", "num_steps": num_steps, "eta": eta,
            "guidance_scale": guidance, "seed": seed, "num_trajectories": num_trajectories, "shard_size": shard_size,
            "format": 1}


def _shard_path(cache_dir: Path, shard: int) -> Path:
    return cache_dir / f"shard-{shard:05d}.safetensors"


@torch.no_grad()
def trajectory_steps(teacher: Teacher, indices: list[int], num_steps: int, eta: float, guidance: float, seed: int,
                  device: torch.device | str) -> dict[str, Tensor]:
    """Every step of the trajectories ``indices``, flattened to ``(len(indices) * num_steps, ...)`` tensors."""
    sched = teacher.ddim(num_steps)
    starts = [trajectory_start(teacher, i, seed) for i in indices]
    labels = torch.cat([s[0] for s in starts])
    x = torch.cat([s[1] for s in starts]).to(device)
    gen_states = [s[2] for s in starts]
    cond, uncond = teacher.contexts(labels.to(device))
    quantizers = qat.temporal_quantizers(teacher.unet)
    # The loop never waits for the GPU, so that teacher calls run back to back while the host prepares the next
    # step: each step's noise is drawn on the host during the previous teacher call and sent from pinned memory,
    # and results go straight into preallocated pinned host tensors by asynchronous copies; one synchronisation
    # at the end. (Drawing all noise first, or concatenating the results after, leaves the GPU idle meanwhile.)
    pinned = torch.device(device).type == "cuda"
    n, steps = len(indices), len(sched.timesteps)
    t_dtype = torch.long if not sched.timesteps.is_floating_point() else torch.float32

    def host(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.empty((steps * n, *shape), dtype=dtype, pin_memory=pinned)

    out = {"x": host(*x.shape[1:]), "t": host(dtype=t_dtype), "eps_cond": host(*x.shape[1:])}
    if cond is not None:
        out["eps_uncond"] = host(*x.shape[1:])
    for k, t_val in enumerate(sched.timesteps):
        # One generator per trajectory, so a trajectory is the same whatever shard or batch it is generated in.
        noise, gen_states = _draw(gen_states, x.shape[1:])
        noise = noise.pin_memory().to(device, non_blocking=True) if pinned else noise.to(device)
        t = _batch_t(t_val, n, device)
        eps, eps_c, eps_u = guided_eps(teacher.unet, x, t, cond, uncond, guidance, quantizers)
        rows = slice(k * n, (k + 1) * n)
        out["x"][rows].copy_(x.float(), non_blocking=pinned)
        out["t"][rows].copy_(t, non_blocking=pinned)
        out["eps_cond"][rows].copy_(eps_c.float(), non_blocking=pinned)
        if eps_u is not None:
            out["eps_uncond"][rows].copy_(eps_u.float(), non_blocking=pinned)
        x = _ddim_step(sched, eps.float(), t_val, x.float(), eta, noise)
    if pinned:
        torch.cuda.current_stream(device).synchronize()  # the asynchronous copies have landed
    out["labels"] = labels.repeat(steps)
    return out


def _draw(states: list[Tensor], shape: torch.Size) -> tuple[Tensor, list[Tensor]]:
    """One ``(1, *shape)`` normal draw per trajectory stream; returns the noise ``(N, *shape)`` and new states."""
    noise, new_states = [], []
    gen = torch.Generator()
    for state in states:
        gen.set_state(state)
        noise.append(torch.randn((1, *shape), generator=gen))
        new_states.append(gen.get_state())
    return torch.cat(noise), new_states


def _batch_t(t_val: Tensor, batch: int, device: torch.device | str) -> Tensor:
    """``(batch,)`` copies of sampler timestep ``t_val``: long for DDPM steps, float for flow-matching times."""
    dtype = torch.long if not t_val.is_floating_point() else torch.float32
    return torch.full((batch,), t_val.item(), device=device, dtype=dtype)


def _ddim_step(sched: Any, eps: Tensor, t: Tensor, x: Tensor, eta: float, noise: Tensor) -> Tensor:
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


def generate_cache(teacher: Teacher, teacher_path: str, cache_dir: str | Path, num_steps: int, eta: float,
                   guidance: float, seed: int, num_trajectories: int, shard_size: int, device: torch.device | str,
                   rank: int = 0, world_size: int = 1, progress: bool = True, wait_timeout: float = 3600.0) -> Path:
    """Generates (or completes) the trajectory cache; returns the path of ``manifest.json``.

    Process ``rank`` generates shards ``rank, rank + world_size, ...``; finished shards are skipped, so an
    interrupted generation resumes where it stopped. Every process then waits until all shards exist; rank 0
    writes the manifest. An existing cache made with other settings is refused.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(teacher_path, num_steps, eta, guidance, seed, num_trajectories, shard_size)
    mpath = cache_dir / "manifest.json"
    spec_path = cache_dir / "cache_spec.json"
    if spec_path.exists():
        old = json.loads(spec_path.read_text())
        if old != manifest:
            diff = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
            raise ValueError(f"trajectory cache {cache_dir} was made with other settings {diff} (cache, config); "
                             "delete it or set trajectories.cache_dir to a new directory")
    elif rank == 0:
        _atomic_write_text(spec_path, json.dumps(manifest, indent=2))
    num_shards = -(-num_trajectories // shard_size)
    mine = [s for s in range(rank, num_shards, world_size) if not _shard_path(cache_dir, s).exists()]
    bar = tqdm(mine, desc=f"trajectories (rank {rank})", disable=not progress)
    # nn.Module.compile in place; with a single shard there is no other batch size to share a compile with
    pad = getattr(teacher.unet, "_compiled_call_impl", None) is not None and num_trajectories > shard_size
    for shard in bar:
        indices = list(range(shard * shard_size, min((shard + 1) * shard_size, num_trajectories)))
        # A compiled teacher recompiles for a new batch size (about 45 s for LDM-4 on an H200): a short last shard
        # is walked at the full size and the trajectories past the end are dropped. Each trajectory has its own
        # noise streams, so the kept ones do not depend on their neighbours.
        walk = list(range(shard * shard_size, (shard + 1) * shard_size)) if pad else indices
        tensors = trajectory_steps(teacher, walk, num_steps, eta, guidance, seed, device)
        if len(walk) > len(indices):
            tensors = {k: _first_trajectories(v, len(walk), len(indices)) for k, v in tensors.items()}
        tmp = _shard_path(cache_dir, shard).with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"trajectories": json.dumps(indices)})
        os.replace(tmp, _shard_path(cache_dir, shard))  # atomic: a shard file is complete or absent
    deadline = time.time() + wait_timeout
    while not all(_shard_path(cache_dir, s).exists() for s in range(num_shards)):
        if time.time() > deadline:
            raise TimeoutError(f"trajectory shards in {cache_dir} did not all appear within {wait_timeout} s")
        time.sleep(1.0)
    if rank == 0:
        manifest["shards"] = [_shard_path(cache_dir, s).name for s in range(num_shards)]
        _atomic_write_text(mpath, json.dumps(manifest, indent=2))
    while not mpath.exists():
        time.sleep(0.5)
    return mpath


def _first_trajectories(rows: Tensor, walked: int, keep: int) -> Tensor:
    """The rows of the first ``keep`` of ``walked`` trajectories in a step-major ``(steps * walked, ...)`` tensor."""
    steps = rows.shape[0] // walked
    return rows.reshape(steps, walked, *rows.shape[1:])[:, :keep].reshape(steps * keep, *rows.shape[1:]).contiguous()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class CachedTrajectories:
    """Shuffled mixed-timestep batches from a trajectory cache.

    Each epoch is a permutation of all cached samples drawn from ``seed + epoch``; process ``rank`` takes every
    ``world_size``-th sample. The position (epoch, offset) is checkpointed, so a resumed run sees exactly the
    batches it would have seen.
    """

    def __init__(self, manifest_path: str | Path, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        manifest_path = Path(manifest_path)
        self.manifest = json.loads(manifest_path.read_text())
        parts = [load_file(str(manifest_path.parent / name)) for name in self.manifest["shards"]]
        self.data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        self.size = self.data["x"].shape[0]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch, self.offset = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> Tensor:
        perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return perm[self.rank :: self.world_size]

    def next_batch(self, teacher: Teacher, device: torch.device | str) -> TrajectoryBatch:
        """The next ``batch_size`` samples (a new permutation starts when an epoch is used up)."""
        if self.offset + self.batch_size > self._order.numel():
            self.epoch, self.offset = self.epoch + 1, 0
            self._order = self._permutation()
        idx = self._order[self.offset : self.offset + self.batch_size]
        self.offset += self.batch_size
        labels = self.data["labels"][idx].to(device)
        cond, uncond = teacher.contexts(labels)
        eps_u = self.data["eps_uncond"][idx] if "eps_uncond" in self.data else None
        return TrajectoryBatch(self.data["x"][idx], self.data["t"][idx], labels, cond, uncond,
                               self.data["eps_cond"][idx], eps_u).to(device)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation()


@torch.no_grad()
def sample(model: nn.Module, teacher: Teacher, labels: Tensor, noise: Tensor, num_steps: int, guidance: float,
           eta: float = 0.0, record_eps: bool = False) -> tuple[Tensor, list[Tensor]]:
    """DDIM sampling of ``model`` (teacher or student) with the teacher's conditioning; deterministic for eta 0.

    Returns:
        final samples ``(B, *sample_shape)`` and, with ``record_eps``, the CFG eps of every step.
    """
    device = noise.device
    sched = teacher.ddim(num_steps)
    cond, uncond = teacher.contexts(labels.to(device))
    x = noise
    record = []
    quantizers = qat.temporal_quantizers(model)
    for t_val in sched.timesteps:
        t = _batch_t(t_val, x.shape[0], device)
        eps, _, _ = guided_eps(model, x, t, cond, uncond, guidance, quantizers)
        if record_eps:
            record.append(eps.float())
        # eta 0 here (the default): deterministic, no noise needed; eta > 0 draws from the global generator
        x = _ddim_step(sched, eps.float(), t_val, x, eta, torch.randn_like(x) if eta > 0 else torch.zeros_like(x))
    return x, record
