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
DDIM, or for flow-matching teachers its flow counterpart (:func:`train.models.pipeline.flow_step`), with float
timesteps ``1000 sigma``. Both sources sample through the pipeline's loop and primitives
(:class:`train.models.pipeline.QATDiffusionPipeline`).

A method that needs it (:attr:`qat.methods.Method.needs_previous_step`) gets, with each sample, the input of the
previous (noisier) step of the same trajectory (:attr:`TrajectoryBatch.previous`), in both modes; and with feature
taps, online batches carry the teacher's features captured during the trajectory's own teacher call.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

import qat
from qat.files import require_intact
from qat.taps import FeatureTaps
from train.models.pipeline import QATDiffusionPipeline, batch_timesteps, guided_eps
from train.models.teacher import Teacher

__all__ = ["TrajectoryBatch", "PreviousStep", "OnlineTrajectories", "generate_cache", "CachedTrajectories",
           "trajectory_start", "trajectory_steps", "check_cache"]


@dataclass
class PreviousStep:
    """The previous (noisier) step of each sample's trajectory: inputs ``x (B, *sample_shape)``, timesteps
    ``t (B,)``, and ``valid (B,)`` (False for a trajectory's first step, which has none; ``x`` is then a copy)."""

    x: Tensor
    t: Tensor
    valid: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = True) -> PreviousStep:
        return PreviousStep(*(getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)))


@dataclass
class TrajectoryBatch:
    """One training batch: inputs ``x (B, *sample_shape)``, timesteps ``t (B,)``, contexts and targets like ``x``.

    ``previous``: the previous trajectory step of every sample (when the source was asked for it);
    ``teacher_features``: the teacher's tapped features on these inputs (online sources with taps).
    """

    x: Tensor
    t: Tensor
    labels: Tensor
    cond: Tensor | None
    uncond: Tensor | None
    eps_cond: Tensor
    eps_uncond: Tensor | None
    previous: PreviousStep | None = None
    teacher_features: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> TrajectoryBatch:
        def mv(v: Any) -> Any:
            if v is None:
                return None
            if isinstance(v, dict):
                return {k: t.to(device, non_blocking=True) for k, t in v.items()}
            return v.to(device, non_blocking=True)

        return TrajectoryBatch(*(mv(getattr(self, f.name)) for f in fields(self)))

    def targets(self) -> Tensor:
        """The teacher's predictions in the student's row layout: ``[eps_uncond; eps_cond]`` with guidance, else
        ``eps_cond``."""
        return self.eps_cond if self.eps_uncond is None or self.cond is None else torch.cat(
            [self.eps_uncond, self.eps_cond])


def trajectory_start(teacher: Teacher, index: int, seed: int, batch: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Labels ``(batch,)``, initial noise ``(batch, *sample_shape)`` and the generator state for trajectory
    ``index``."""
    gen = torch.Generator().manual_seed(seed + index)
    labels = torch.randint(0, teacher.num_classes, (batch,), generator=gen)
    noise = torch.randn((batch, *teacher.sample_shape), generator=gen)
    return labels, noise, gen.get_state()


def _draw(states: list[Tensor], shape: torch.Size) -> tuple[Tensor, list[Tensor]]:
    """One ``(1, *shape)`` normal draw per trajectory stream; returns the noise ``(N, *shape)`` and new states."""
    noise, new_states = [], []
    gen = torch.Generator()
    for state in states:
        gen.set_state(state)
        noise.append(torch.randn((1, *shape), generator=gen))
        new_states.append(gen.get_state())
    return torch.cat(noise), new_states


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
        self.prev_x: Tensor | None = None  # the previous step's input (None at a trajectory's first step)
        self.prev_t: Tensor | None = None
        self.pipe = QATDiffusionPipeline.from_teacher(teacher, scheduler=self.scheduler)
        self._timestep_modules = qat.timestep_modules(teacher.unet)  # none for a float teacher; walked once

    def _start(self) -> None:
        first = (self.round * self.world_size + self.rank) * self.batch_size
        starts = [trajectory_start(self.teacher, first + j, self.seed) for j in range(self.batch_size)]
        self.labels = torch.cat([s[0] for s in starts])
        self.x = torch.cat([s[1] for s in starts])
        self.gen_states = [s[2] for s in starts]
        self.prev_x = self.prev_t = None
        self.round += 1
        self.step = 0

    @torch.no_grad()
    def next_batch(self, device: torch.device | str, taps: list[str] | None = None) -> TrajectoryBatch:
        """The teacher's ``(x_t, t, c)`` at the next step and its predictions; advances ``x_t`` with DDIM.

        ``taps``: module names whose outputs the teacher's call also records (``batch.teacher_features``).
        """
        if self.step >= self.num_steps:
            self._start()
        unet = self.teacher.unet
        x = self.x.to(device)
        t_val = self.scheduler.timesteps[self.step]
        t = batch_timesteps(t_val, x.shape[0], device)
        cond, uncond = self.teacher.contexts(self.labels.to(device))
        with FeatureTaps(unet, names=taps or []) as tapped:
            eps, eps_c, eps_u = guided_eps(unet, x, t, cond, uncond, self.guidance, self._timestep_modules)
        if self.prev_x is None:
            previous = PreviousStep(x.float(), t, torch.zeros(x.shape[0], dtype=torch.bool, device=device))
        else:
            previous = PreviousStep(self.prev_x.to(device), self.prev_t.to(device),
                                    torch.ones(x.shape[0], dtype=torch.bool, device=device))
        batch = TrajectoryBatch(x.float(), t, self.labels.to(device), cond, uncond, eps_c, eps_u, previous,
                                tapped.features)
        noise, self.gen_states = _draw(self.gen_states, x.shape[1:])
        self.prev_x, self.prev_t = x.float(), t
        self.x = self.pipe.advance(eps, t_val, x.float(), eta=self.eta, noise=noise.to(device))
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "step": self.step, "x": self.x, "labels": self.labels,
                "gen_states": list(self.gen_states), "prev_x": self.prev_x, "prev_t": self.prev_t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round, self.step = int(state["round"]), int(state["step"])
        self.x, self.labels = state["x"], state["labels"]
        self.gen_states = list(state["gen_states"])
        self.prev_x, self.prev_t = state.get("prev_x"), state.get("prev_t")


def _manifest(teacher_path: str, num_steps: int, eta: float, guidance: float, seed: int, num_trajectories: int,
              shard_size: int) -> dict[str, Any]:
    return {"teacher": str(teacher_path), "sampler": "ddim", "num_steps": num_steps, "eta": eta,
            "guidance_scale": guidance, "seed": seed, "num_trajectories": num_trajectories, "shard_size": shard_size,
            "format": 1}


def _shard_path(cache_dir: Path, shard: int) -> Path:
    return cache_dir / f"shard-{shard:05d}.safetensors"


def check_cache(cache_dir: str | Path, teacher_path: str, num_steps: int, eta: float, guidance: float, seed: int,
                num_trajectories: int, shard_size: int) -> dict[str, Any]:
    """Checks an existing (possibly partial) trajectory cache against the run's settings, reading only small files,
    so that a mismatch is reported before calibration; returns the settings' manifest.

    Raises:
        ValueError: the cache was made with other settings (each differing key listed), or one of its finished
            shards is truncated or corrupt (named).
    """
    cache_dir = Path(cache_dir)
    manifest = _manifest(teacher_path, num_steps, eta, guidance, seed, num_trajectories, shard_size)
    spec_path = cache_dir / "cache_spec.json"
    if spec_path.exists():
        old = json.loads(spec_path.read_text())
        if old != manifest:
            diff = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
            raise ValueError(f"trajectory cache {cache_dir} was made with other settings {diff} (cache, config); "
                             "delete it or set trajectories.cache_dir to a new directory")
    num_shards = -(-num_trajectories // shard_size)
    require_intact([p for s in range(num_shards) if (p := _shard_path(cache_dir, s)).exists()],
                   f"trajectory cache {cache_dir}")
    return manifest


@torch.no_grad()
def trajectory_steps(teacher: Teacher, indices: list[int], num_steps: int, eta: float, guidance: float, seed: int,
                     device: torch.device | str, progress: str | None = None) -> dict[str, Tensor]:
    """Every step of the trajectories ``indices``, flattened step-major to ``(num_steps * len(indices), ...)``
    tensors ``x``, ``t``, ``eps_cond`` (and ``eps_uncond`` with conditioning), plus ``labels``: the teacher's
    DDIM run in the pipeline's loop, each trajectory drawing its noise from its own stream. ``progress``: the
    description of a progress bar over the steps (None: no bar)."""
    sched = teacher.ddim(num_steps)
    pipe = QATDiffusionPipeline.from_teacher(teacher, scheduler=sched)
    starts = [trajectory_start(teacher, i, seed) for i in indices]
    labels = torch.cat([s[0] for s in starts])
    x = torch.cat([s[1] for s in starts]).to(device)
    gen_states = [s[2] for s in starts]
    cond, uncond = teacher.contexts(labels.to(device))
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

    def noise_fn(k: int) -> Tensor:
        # One generator per trajectory, so a trajectory is the same whatever shard or batch it is generated in.
        nonlocal gen_states
        noise, gen_states = _draw(gen_states, x.shape[1:])
        return noise.pin_memory().to(device, non_blocking=True) if pinned else noise.to(device)

    bar = tqdm(total=steps, desc=progress, unit="step", disable=progress is None)

    def record(k: int, t: Tensor, x_t: Tensor, eps_c: Tensor, eps_u: Tensor | None) -> None:
        bar.update(1)
        rows = slice(k * n, (k + 1) * n)
        out["x"][rows].copy_(x_t.float(), non_blocking=pinned)
        out["t"][rows].copy_(t, non_blocking=pinned)
        out["eps_cond"][rows].copy_(eps_c, non_blocking=pinned)
        if eps_u is not None:
            out["eps_uncond"][rows].copy_(eps_u, non_blocking=pinned)

    pipe.denoise_loop(x, cond, uncond, guidance, eta=eta, noise_fn=noise_fn, callback=record)
    bar.close()
    if pinned:
        torch.cuda.current_stream(device).synchronize()  # the asynchronous copies have landed
    out["labels"] = labels.repeat(steps)
    return out


def generate_cache(teacher: Teacher, teacher_path: str, cache_dir: str | Path, num_steps: int, eta: float,
                   guidance: float, seed: int, num_trajectories: int, shard_size: int, device: torch.device | str,
                   rank: int = 0, world_size: int = 1, progress: bool = True, wait_timeout: float = 3600.0) -> Path:
    """Generates (or completes) the trajectory cache; returns the path of ``manifest.json``.

    Process ``rank`` generates shards ``rank, rank + world_size, ...``; finished shards are skipped, so an
    interrupted generation resumes where it stopped. Every process then waits until all shards exist; rank 0
    writes the manifest. An existing cache made with other settings is refused.
    """
    cache_dir = Path(cache_dir)
    manifest = check_cache(cache_dir, teacher_path, num_steps, eta, guidance, seed, num_trajectories, shard_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    mpath = cache_dir / "manifest.json"
    spec_path = cache_dir / "cache_spec.json"
    if not spec_path.exists() and rank == 0:
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
    batches it would have seen. With ``previous`` every batch carries each sample's previous trajectory step
    (:class:`PreviousStep`), looked up in the cache (shards are step-major: row ``k n + j`` is step ``k`` of the
    shard's trajectory ``j``).
    """

    def __init__(self, manifest_path: str | Path, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, previous: bool = False) -> None:
        manifest_path = Path(manifest_path)
        self.manifest = json.loads(manifest_path.read_text())
        shards = [manifest_path.parent / name for name in self.manifest["shards"]]
        require_intact(shards, f"trajectory cache {manifest_path.parent}")
        parts = [load_file(str(path)) for path in shards]
        self.data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        self.size = self.data["x"].shape[0]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.previous = previous
        self.prev_index = self._previous_rows([p["x"].shape[0] for p in parts], int(self.manifest["num_steps"]))
        self.epoch, self.offset = 0, 0
        self._order = self._permutation()

    @staticmethod
    def _previous_rows(shard_rows: list[int], steps: int) -> Tensor:
        """``(size,)`` index of each row's previous trajectory step in the concatenated cache; -1 at a first step."""
        out, start = [], 0
        for rows in shard_rows:
            n = rows // steps  # trajectories in this shard
            idx = torch.arange(rows)
            out.append(torch.where(idx >= n, start + idx - n, torch.full_like(idx, -1)))
            start += rows
        return torch.cat(out)

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
        previous = None
        if self.previous:
            prev = self.prev_index[idx]
            valid = prev >= 0
            rows = torch.where(valid, prev, idx)  # a first step points at itself (masked out by ``valid``)
            previous = PreviousStep(self.data["x"][rows], self.data["t"][rows], valid)
        return TrajectoryBatch(self.data["x"][idx], self.data["t"][idx], labels, cond, uncond,
                               self.data["eps_cond"][idx], eps_u, previous).to(device)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation()
