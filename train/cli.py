"""``train.py config=<recipe> key=value ...``: data-free QAT of a diffusion model, end to end.

Steps: (1) load and validate the config, (2) load the teacher, (3) build the configured method
(:mod:`qat.methods`) and its student, (4) initialise it with the method's pass on the teacher's calibration
trajectories (or restore it from the checkpoint being resumed), (5) measure the PTQ starting point, (6) train with
Lightning, (7) save the student, write the evaluation report (``report.json``, ``report.md``, PNG plots; see
:mod:`train.eval.report`) and the packed low-bit export (``<output_dir>/export``). Works under ``python``, ``torchrun``
and ``accelerate launch`` (each process reads its rank from the launcher's environment; Lightning sets up the process
group).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import qat
from qat.files import safetensors_problem, save_tensors
from qat.losses import build_loss
from qat.methods import Calibration, Method
from train.callbacks import Preemption, QuantizerTelemetry, SampleGrid, StepProgress
from train.checkpoints import (
    AtomicCheckpointIO,
    checkpoint_problem,
    copy_atomic,
    newest_intact,
    remove_partial_files,
)
from train.config import CUDA_GRAPH_MODES, ConfigError, RunConfig, build_method, load_config, to_yaml
from train.data.trajectories import (
    CachedTrajectories,
    OnlineTrajectories,
    check_cache,
    generate_cache,
    trajectory_steps,
)
from train.eval.evaluate import Evaluator, SampleSet
from train.eval.report import sanitize, write_run_report
from train.launch import apply_launcher, trainer_kwargs
from train.models.families import CUDA_GRAPHS_ATTR, compile_repeated_blocks
from train.models.pipeline import guided_eps
from train.models.teacher import Teacher, check_teacher_files, load_teacher
from train.rundir import check_run_dir, clear_run_outputs, record_resume
from train.system import DistillQATSystem

__all__ = ["main", "build_student", "calibrate_student", "restore_student", "save_student"]


def _dist_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from torchrun / accelerate / SLURM environment variables."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    return rank, local, world


def _device(cfg: RunConfig, local_rank: int) -> torch.device:
    if cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def build_student(cfg: RunConfig, teacher: Teacher, method: Method | None = None) -> tuple[torch.nn.Module, str]:
    """The method's student for ``teacher`` (quantizers not yet initialised), its per-timestep tables on the
    trajectory grid; returns it and the method's report. ``method``: the run's method (default: a new one)."""
    method = build_method(cfg) if method is None else method
    student, report = method.build_student(teacher.unet, teacher.family)
    qat.set_timestep_grid(student, teacher.ddim(cfg.trajectories.num_steps).timesteps)
    return student.float(), report


def calibrate_student(cfg: RunConfig, student: torch.nn.Module, teacher: Teacher, device: torch.device,
                      method: Method | None = None, progress: bool = False) -> None:
    """The method's initialisation (:meth:`qat.methods.Method.initialize`) on the teacher's calibration
    trajectories (seeds disjoint from training). ``progress``: bars over the trajectories' steps and over the
    model calls of the initialisation (their number depends on the method: one pass or several)."""
    c, tr = cfg.calibration, cfg.trajectories
    data = trajectory_steps(teacher, list(range(c.num_trajectories)), c.num_steps, tr.eta, tr.guidance_scale,
                            c.seed, device, progress="calibration trajectories" if progress else None)
    n = c.num_trajectories
    steps = torch.linspace(0, c.num_steps - 1, min(c.max_batches, c.num_steps)).round().long().unique()
    batches = [slice(int(s) * n, (int(s) + 1) * n) for s in steps]  # step-major layout

    bar = tqdm(desc="calibration", unit="call", disable=not progress)

    def forward(model: torch.nn.Module, sl: slice) -> None:
        bar.update(1)
        x, t = data["x"][sl].to(device), data["t"][sl].to(device)
        cond, uncond = teacher.contexts(data["labels"][sl].to(device))
        qat.reset_sampling_state(model)  # every batch is a set of independent samples
        guided_eps(model, x, t, cond, uncond, tr.guidance_scale)

    method = build_method(cfg) if method is None else method
    method.initialize(student, Calibration(batches, forward, per_timestep=c.per_timestep))
    bar.close()


def apply_performance(cfg: RunConfig, student: torch.nn.Module, teacher: Teacher) -> None:
    """``performance.*``: the fake-quant implementation, and ``torch.compile`` of both denoisers in place.

    After calibration (its capture hooks run eagerly); in place, so checkpoints keep the plain state-dict keys.
    """
    p = cfg.performance
    if p.gradient_checkpointing:
        if not getattr(student, "_supports_gradient_checkpointing", False):
            raise ValueError(f"performance.gradient_checkpointing: the student ({type(student).__name__}) does not "
                             "support gradient checkpointing; set it to false")
        student.enable_gradient_checkpointing()
    # unset: for the eager layers outside CUDA-graph blocks, where the GPU time is the step time (docs/performance.md)
    graphs = p.compile and p.compile_blocks and p.compile_mode in CUDA_GRAPH_MODES
    qat.set_fast_path(student, fused=p.fused_fake_quant,
                      compiled_kernels=graphs if p.compile_kernels is None else p.compile_kernels)
    if p.compile:
        # mode only where it is not the default: other backends than inductor take no mode
        kwargs = {"backend": p.compile_backend} | ({"mode": p.compile_mode} if p.compile_mode != "default" else {})
        if p.compile_blocks:
            compile_repeated_blocks(student, **kwargs)
        else:
            student.compile(**kwargs)
        if p.compile_mode in CUDA_GRAPH_MODES:
            setattr(student, CUDA_GRAPHS_ATTR, True)  # sampled and evaluated eagerly: train.models.families.denoise
    if p.compile if p.compile_teacher is None else p.compile_teacher:
        # default mode: trajectory generation measured no gain from CUDA graphs (docs/performance.md), whose
        # outputs the next replay overwrites
        teacher.unet.compile(backend=p.compile_backend)


def _resume_path(cfg: RunConfig, out: Path) -> tuple[str | None, str]:
    """The checkpoint to resume from, checked to be a complete archive, and where its state came from (for
    ``resumes.log``). None: none yet (``resume=auto``, or ``resume=last`` of a run stopped before its first
    checkpoint, which then restores the saved calibration if there is one) or no resume.

    When ``last.ckpt`` is missing or damaged, the newest intact step checkpoint is copied over it and the run
    resumes from ``last.ckpt``: Lightning never deletes the checkpoint a run resumed from, so resuming from the
    step checkpoint itself would keep one more than ``monitor.keep_checkpoints``.
    """
    if cfg.resume is None:
        return None, ""
    last = out / "checkpoints" / "last.ckpt"
    if cfg.resume not in ("auto", "last"):
        if problem := checkpoint_problem(cfg.resume):
            raise ConfigError(f"resume: {problem}; point resume= at another checkpoint, or start again with "
                              "overwrite=true")
        return cfg.resume, cfg.resume
    problem = checkpoint_problem(last) if last.is_file() else f"{last} does not exist"
    if problem is None:
        return str(last), str(last)
    if (older := newest_intact(last.parent)) is not None:
        copy_atomic(older, last)
        print(f"resume: {problem}; resuming from {older}, the newest intact checkpoint (copied to {last.name})",
              flush=True)
        return str(last), str(older)
    if last.is_file():
        raise ConfigError(f"resume: {problem}; point resume= at another checkpoint, or start again with "
                          "overwrite=true")
    if cfg.resume == "last" and not (out / "config.yaml").is_file():
        raise ConfigError(f"resume: 'last' but {out} holds no run (no config.yaml, no checkpoint); start without "
                          "resume= or point resume= at a checkpoint file")
    saved = calibration_file(out)
    return None, (f"the saved calibration {saved} (no checkpoint yet)" if saved.is_file()
                  else "the beginning (no checkpoint or saved calibration yet)")


def calibration_file(out: Path) -> Path:
    """Where a run keeps its calibrated student (written once, after calibration; a resume before the first
    training checkpoint restores it, later resumes use the checkpoints)."""
    return out / "calibration" / "student.safetensors"


def _initialise(cfg: RunConfig, student: torch.nn.Module, teacher: Teacher, device: torch.device, method: Method,
                out: Path, ckpt: str | None, rank: int) -> bool:
    """Step 4: the student's state from the resumed checkpoint, else from the run's saved calibration (a resume of
    a run stopped before its first checkpoint), else from the method's calibration, which is then saved (rank 0);
    returns whether the student was calibrated before (its PTQ evaluation may be reused)."""
    if ckpt is not None:  # a resumed run restores the student's state; it never re-initialises
        restore_student(student, ckpt)
        return True
    saved = calibration_file(out)
    if cfg.resume is not None and saved.is_file():
        if (problem := safetensors_problem(saved)) is None:
            student.load_state_dict(load_file(str(saved)), strict=True)
            if rank == 0:
                print(f"resume: no training checkpoint yet; restored the calibrated student from {saved}", flush=True)
            return True
        if rank == 0:
            print(f"resume: {problem}; calibrating again", flush=True)
    elif cfg.resume is not None and rank == 0:
        print(f"resume: no training checkpoint or saved calibration in {out} yet; starting from the beginning",
              flush=True)
    calibrate_student(cfg, student, teacher, device, method, progress=cfg.trainer.enable_progress_bar and rank == 0)
    if rank == 0:
        saved.parent.mkdir(exist_ok=True)
        save_tensors(student.state_dict(), saved, metadata={"method": cfg.method})
    return False


def restore_student(student: torch.nn.Module, ckpt: str) -> None:
    """Loads the student's weights and quantizer state from a Lightning checkpoint (tensors only, no pickle)."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    except (RuntimeError, EOFError, KeyError, OSError) as err:  # a damaged member the archive's directory missed
        raise ValueError(f"checkpoint {ckpt} is corrupt or truncated and cannot be loaded ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    sub = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    hint = "was it written with another method, rank or bit-width config?"
    try:
        missing, unexpected = student.load_state_dict(sub, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"checkpoint {ckpt} does not match the configured student ({hint}): "
                         f"{str(err).splitlines()[1].strip()}") from None
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpt} does not match the configured student: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}; {hint}")


def _save_samples(path: Path, samples: SampleSet) -> None:
    save_tensors({"images": samples.images, "labels": samples.labels, "indices": samples.indices}, path)


def _load_samples(path: Path) -> SampleSet:
    t = load_file(str(path))
    return SampleSet(t["images"], t["labels"], t["indices"])


def _ptq_start(cfg: RunConfig, evaluator: Evaluator, student: torch.nn.Module, out: Path,
               resumed: bool) -> tuple[dict[str, Any], SampleSet]:
    """Metrics and samples of the calibrated student before training; a resumed run reads the saved ones."""
    ev_dir = out / "eval"
    ev_dir.mkdir(exist_ok=True)
    metrics_path, samples_path = ev_dir / "ptq.json", ev_dir / "ptq_samples.safetensors"
    if resumed and metrics_path.exists() and samples_path.exists():
        return json.loads(metrics_path.read_text()), _load_samples(samples_path)
    metrics, samples = evaluator.evaluate(student)
    metrics_path.write_text(json.dumps(sanitize(metrics), indent=2))
    _save_samples(samples_path, samples)
    return metrics, samples


def _quiet_known_warnings() -> None:
    # Both students and teachers run in eval mode on purpose (EfficientDM trains in eval mode: no dropout), and the
    # step loader only counts steps (batches come from the trajectory source), so workers would not help.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers which may be a bottleneck.*")
    # A resume continues the run in its own directory (train.rundir checks it first), and the trajectory source's
    # position is part of the checkpoint (DistillQATSystem.on_save_checkpoint), so the step loader, which only
    # counts steps, need not resume.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")
    # Raised inside Lightning's own pytree helper by newer torch releases; nothing DiffQAT calls.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


class _Phases:
    """Prints how long each setup phase took (rank 0), so a slow start on a cluster can be located."""

    def __init__(self, rank: int) -> None:
        self.rank, self.last = rank, time.time()

    def done(self, what: str) -> None:
        now = time.time()
        if self.rank == 0:
            print(f"[diffqat] {what}: {now - self.last:.1f} s", flush=True)
        self.last = now


def _cache_dir(cfg: RunConfig, out: Path) -> Path:
    return Path(cfg.trajectories.cache_dir) if cfg.trajectories.cache_dir else out / "trajectories"


def _check_cache(cfg: RunConfig, out: Path) -> None:
    """A reused trajectory cache made with other settings, or with a damaged shard, fails before calibration."""
    tr = cfg.trajectories
    if tr.mode == "cached":
        check_cache(_cache_dir(cfg, out), cfg.teacher.path, tr.num_steps, tr.eta, tr.guidance_scale, tr.seed,
                    tr.num_trajectories, tr.shard_size)


def _data_source(cfg: RunConfig, teacher: Teacher, previous: bool, out: Path, device: torch.device, rank: int,
                 world: int) -> OnlineTrajectories | CachedTrajectories:
    """The online walker or the cache (generated here if needed) of the teacher's trajectories; ``previous``: cached
    batches carry each sample's previous step (online ones always do)."""
    tr = cfg.trajectories
    if tr.mode == "online":
        return OnlineTrajectories(teacher, tr.num_steps, tr.eta, tr.guidance_scale, tr.batch_size, tr.seed, rank,
                                  world)
    manifest = generate_cache(teacher, cfg.teacher.path, _cache_dir(cfg, out), tr.num_steps, tr.eta,
                              tr.guidance_scale, tr.seed, tr.num_trajectories, tr.shard_size, device, rank, world,
                              progress=cfg.trainer.enable_progress_bar)
    return CachedTrajectories(manifest, tr.batch_size, tr.seed, rank, world, previous=previous)


def _trainer(cfg: RunConfig, method: Method, out: Path,
             extra: list[L.Callback] | None) -> tuple[L.Trainer, Preemption]:
    """The Lightning trainer with the run's callbacks, TensorBoard logger and cluster plugins."""
    m = cfg.monitor
    preemption = Preemption(str(out / "checkpoints" / "last.ckpt"))
    callbacks = [
        # the K newest step checkpoints beside last.ckpt (Lightning's "step" monitor: the newest ranks highest)
        ModelCheckpoint(dirpath=out / "checkpoints", filename="{step}", save_last=True, monitor="step", mode="max",
                        every_n_train_steps=m.checkpoint_every_n_steps, save_top_k=m.keep_checkpoints,
                        enable_version_counter=False),
        SampleGrid(m.sample_every_n_steps, list(m.sample_labels), m.sample_steps, cfg.trajectories.guidance_scale),
        QuantizerTelemetry(m.telemetry_every_n_steps),
        preemption,
        *([StepProgress()] if cfg.trainer.enable_progress_bar else []),
        *(extra or []),
    ]
    logger = TensorBoardLogger(str(out), name="tensorboard", version="")
    # Preemption replaces Lightning's SLURM auto-requeue (see train.callbacks.Preemption).
    slurm_managed = SLURMEnvironment.detect() and not TorchElasticEnvironment.detect()  # torchrun inside SLURM
    plugins: list[Any] = [SLURMEnvironment(auto_requeue=False)] if slurm_managed else []
    if not str(cfg.trainer.strategy).startswith("deepspeed"):  # DeepSpeed writes its own checkpoint directories
        plugins.append(AtomicCheckpointIO())
    trainer = L.Trainer(**trainer_kwargs(cfg, method.find_unused_parameters), default_root_dir=str(out), logger=logger,
                        callbacks=callbacks,
                        num_sanity_val_steps=0, plugins=plugins or None)
    return trainer, preemption


def _check_eval_backend(cfg: RunConfig) -> None:
    """A run evaluates the student it trains, which is fake-quantized: ``eval.backend`` is for ``evaluate.py``."""
    if cfg.eval.backend != "fake":
        raise ConfigError(f"eval.backend: {cfg.eval.backend!r} is for evaluate.py; train.py evaluates the student it "
                          f"trains (fake quantization): leave eval.backend=fake here, and after training run "
                          f"python evaluate.py {cfg.output_dir}/export eval.backend={cfg.eval.backend}")


def main(argv: list[str] | None = None, callbacks: list[L.Callback] | None = None) -> Path:
    """Runs one training job; returns the run directory. ``callbacks`` are added to the run's own."""
    _quiet_known_warnings()
    start = time.time()
    cfg = load_config(sys.argv[1:] if argv is None else argv)  # 1. fails here, before any model is built
    _check_eval_backend(cfg)
    notes = apply_launcher(cfg)  # the launcher's process layout, precision and DeepSpeed stage win
    rank, local_rank, world = _dist_env()
    out = resolve_out(cfg)
    ckpt, source = _resume_path(cfg, out)
    # Rank 0 alone decides: the other processes start beside it and could already see its config.yaml.
    changes = check_run_dir(cfg, out) if rank == 0 else []  # before anything is written
    check_teacher_files(cfg.teacher)
    _check_cache(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        for note in notes:
            print(f"launcher: {note}")
        if cfg.overwrite and (removed := clear_run_outputs(out)):
            print(f"overwrite: removed the previous run's {', '.join(removed)} from {out}")
        if cfg.resume is not None and (removed := remove_partial_files(out / "checkpoints")):
            print(f"resume: removed checkpoints left half-written by the stopped run: {', '.join(removed)}")
        if cfg.resume is not None and (out / "config.yaml").is_file():
            record_resume(out, source, changes)
            for change in changes:
                print(f"resume: {change}")
        (out / "config.yaml").write_text(to_yaml(cfg))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    device = _device(cfg, local_rank)
    phases = _Phases(rank)

    teacher = load_teacher(cfg.teacher, device)  # 2.
    phases.done("teacher loaded")
    method = build_method(cfg)
    student, report = build_student(cfg, teacher, method)  # 3.
    student.to(device)
    phases.done("student built")
    if rank == 0:
        (out / "prepare_report.txt").write_text(report + "\n")
    restored = _initialise(cfg, student, teacher, device, method, out, ckpt, rank)  # 4.
    phases.done("student initialised")
    # The same random state after step 4 whether the student was calibrated or restored.
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    tr = cfg.trajectories
    evaluator: Evaluator | None = None
    if cfg.eval.enabled and rank == 0:  # 5. FP references and the PTQ starting point
        evaluator = Evaluator(cfg.eval, teacher, tr.eta, tr.guidance_scale, device, cache_dir=str(out / "eval_cache"),
                              progress=cfg.trainer.enable_progress_bar)
        fp_metrics, _ = evaluator.evaluate(None)
        ptq, ptq_samples = _ptq_start(cfg, evaluator, student, out, resumed=restored)
        phases.done("FP and PTQ evaluated")

    # Before the cache is generated: a compiled teacher (performance.compile / compile_teacher) generates it faster.
    apply_performance(cfg, student, teacher)
    losses = [build_loss(c) for c in cfg.loss_configs]
    previous = method.needs_previous_step or any(t.previous_taps() for t in (*losses, *method.loss_terms()))
    data = _data_source(cfg, teacher, previous, out, device, rank, world)
    graphs = cfg.performance.compile and cfg.performance.compile_mode in CUDA_GRAPH_MODES
    system = DistillQATSystem(teacher, student, method, data, cfg.optim, tr.guidance_scale, losses,
                              int(teacher.scheduler.config.num_train_timesteps), cfg.monitor.timestep_buckets,
                              cuda_graphs=graphs)
    trainer, preemption = _trainer(cfg, method, out, callbacks)
    # The batches come from the trajectory source inside the system; the loader only counts steps.
    steps = DataLoader(range(cfg.trainer.max_steps), batch_size=None, shuffle=False)
    phases.done("trajectories ready")
    trainer.fit(system, train_dataloaders=steps, ckpt_path=ckpt, weights_only=True)  # 6.
    phases.done("training")
    if preemption.preempted:  # the job is out of time: the checkpoint is saved, the requeued job finishes the run
        return out

    # Lightning's teardown moves the system (student, teacher UNet) back to the CPU; the class embedder stays put.
    student.to(device)
    teacher.to(device)
    if trainer.global_rank == 0:  # 7.
        save_student(student, teacher, out / "student", cfg)
        if evaluator is not None:
            _report(cfg, out, evaluator, student, {"fp": fp_metrics, "ptq": ptq}, ptq_samples, trainer, start)
        if cfg.export:  # after the report, so the model card carries the evaluation
            from train.export_run import export_run

            export_run(student, teacher, cfg, out / "export", run_dir=out, method=method)
    return out


def _report(cfg: RunConfig, out: Path, evaluator: Evaluator, student: torch.nn.Module,
            variants: dict[str, dict[str, Any]], ptq_samples: SampleSet, trainer: L.Trainer, start: float) -> None:
    """Evaluates the trained student and writes the run report (and the metrics to TensorBoard)."""
    trained, qat_samples = evaluator.evaluate(student)
    variants = {**variants, "qat": trained}
    samples = {"fp": evaluator.fp_samples, "ptq": ptq_samples, "qat": qat_samples}
    paths = write_run_report(out, cfg, evaluator, variants, samples, train_steps=cfg.trainer.max_steps,
                             wall_time_s=round(time.time() - start, 1))
    logger = trainer.logger
    for name, metrics in variants.items():
        for key, value in metrics.items():
            if isinstance(value, float) and math.isfinite(value):
                logger.experiment.add_scalar(f"eval/{key}/{name}", value, trainer.global_step)
    logger.experiment.flush()
    print(f"held-out eps-MSE vs teacher: PTQ {variants['ptq']['eps_mse']:.6g} -> trained {trained['eps_mse']:.6g}; "
          f"report: {paths['md']}")


def resolve_out(cfg: RunConfig) -> Path:
    return Path(os.path.expanduser(cfg.output_dir))


def save_student(student: torch.nn.Module, teacher: Teacher, path: Path, cfg: RunConfig) -> None:
    """The trained fake-quantized student: safetensors state dict (LoRA unmerged), the denoiser config, the recipe.

    Reload: build the student from the same config (``build_student``) and ``load_state_dict`` the safetensors.
    """
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(student.state_dict(), path / "student.safetensors", metadata={"method": cfg.method})
    teacher.unet.save_config(str(path))
    (path / "run_config.yaml").write_text(to_yaml(cfg))


