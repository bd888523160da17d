"""Optional work around the loop: sample grids and quantizer telemetry in TensorBoard, preemption handling, the
progress bar in steps."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch import Tensor

import qat
from qat.quantizers import AffineQuantizer
from train.data.trajectories import trajectory_start
from train.models.pipeline import QATDiffusionPipeline

__all__ = ["SampleGrid", "QuantizerTelemetry", "Preemption", "StepProgress", "make_grid"]


def make_grid(rows: list[Tensor]) -> Tensor:
    """Stacks image batches ``(B, C, H, W)`` in ``[-1, 1]`` as grid rows; returns ``(3, H', W')`` in ``[0, 1]``."""
    rows = [r.clamp(-1, 1).add(1).div(2) for r in rows]
    b, c, h, w = rows[0].shape
    grid = torch.ones(3, len(rows) * (h + 1) + 1, b * (w + 1) + 1)
    for i, r in enumerate(rows):
        r3 = r.expand(-1, 3, -1, -1) if c == 1 else r[:, :3]
        for j in range(b):
            grid[:, 1 + i * (h + 1) : 1 + i * (h + 1) + h, 1 + j * (w + 1) : 1 + j * (w + 1) + w] = r3[j].cpu()
    return grid


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` (and at the end) logs a grid: teacher samples on top, student samples below.

    Both sample from the same fixed noise and labels (DDIM, eta 0, the pipeline's loop), so rows are directly
    comparable.
    """

    def __init__(self, every_n_steps: int, labels: list[int], num_steps: int, guidance: float,
                 seed: int = 2024) -> None:
        self.every_n_steps, self.label_list, self.num_steps, self.guidance = every_n_steps, labels, num_steps, guidance
        self.seed = seed
        self._teacher_rows: Tensor | None = None
        self._last_step = -1

    @torch.no_grad()
    def log_grid(self, trainer: L.Trainer, module: Any) -> None:
        if trainer.global_rank != 0 or trainer.logger is None or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        teacher = module.teacher
        labels = torch.tensor(self.label_list, device=module.device) % max(teacher.num_classes, 1)
        noise = torch.cat([trajectory_start(teacher, i, self.seed)[1] for i in range(len(labels))]).to(module.device)
        if self._teacher_rows is None:
            self._teacher_rows = self._sample(teacher.unet, teacher, labels, noise)
        was = module.student.training
        module.student.eval()
        student_rows = self._sample(module.student, teacher, labels, noise)
        module.student.train(was)
        grid = make_grid([teacher.as_images(self._teacher_rows), teacher.as_images(student_rows)])  # video: frames
        trainer.logger.experiment.add_image("samples/teacher_top_student_bottom", grid, trainer.global_step)

    def _sample(self, model: torch.nn.Module, teacher: Any, labels: Tensor, noise: Tensor) -> Tensor:
        pipe = QATDiffusionPipeline.from_teacher(teacher, unet=model, scheduler=teacher.ddim(self.num_steps))
        cond, uncond = teacher.contexts(labels)
        return pipe.denoise_loop(noise.float(), cond, uncond if cond is not None else None, self.guidance)

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        self.log_grid(trainer, module)  # the starting point (PTQ, or the resumed state)

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.log_grid(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        self.log_grid(trainer, module)


class QuantizerTelemetry(L.Callback):
    """Every ``every_n_steps``: step statistics of the affine quantizers and the fraction of clipped inputs.

    Logged: histograms of weight steps (per layer means) and activation steps (all table entries), the mean
    fraction of activations clipped by their quantizer (measured on that step's batch), and of weights.
    """

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps
        self._handles: list[Any] = []
        self._clipped: list[float] = []

    def _active(self, trainer: L.Trainer) -> bool:
        return bool(self.every_n_steps) and trainer.global_step % self.every_n_steps == 0

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
        if not self._active(trainer):
            return
        for layer in qat.quant_layers(module.student).values():
            q = layer.act_quantizer
            if isinstance(q, AffineQuantizer) and q.enabled:  # clipping is a property of affine grids
                self._handles.append(q.register_forward_hook(self._record))

    def _record(self, q: Any, args: tuple[Tensor, ...], out: Tensor) -> None:
        with torch.no_grad():
            xv, step, zero = q.grid_params(args[0].detach().float())
            codes = xv / step + zero
            self._clipped.append(float(((codes < q.q_min - 0.5) | (codes > q.q_max + 0.5)).float().mean()))

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if not self._active(trainer) or trainer.logger is None:
            return
        exp = trainer.logger.experiment
        step = trainer.global_step
        w_steps, a_steps, w_clip = [], [], []
        for layer in qat.quant_layers(module.student).values():
            if isinstance(layer.weight_quantizer, AffineQuantizer):
                wq = layer.weight_quantizer
                w_steps.append(float(wq.step.abs().mean()))
                xv, s, z = wq.grid_params(layer.weight.float())
                raw = xv / s + z  # unclipped codes
                w_clip.append(float(((raw < wq.q_min - 0.5) | (raw > wq.q_max + 0.5)).float().mean()))
            if isinstance(layer.act_quantizer, AffineQuantizer):
                a_steps.append(layer.act_quantizer.step.detach().flatten().cpu())
        if w_steps:
            exp.add_histogram("quant/weight_step_mean_per_layer", torch.tensor(w_steps), step)
            exp.add_scalar("quant/weight_clipped_fraction", sum(w_clip) / len(w_clip), step)
        if a_steps:
            exp.add_histogram("quant/act_steps", torch.cat(a_steps), step)
        if self._clipped:
            exp.add_scalar("quant/act_clipped_fraction", sum(self._clipped) / len(self._clipped), step)
            exp.add_histogram("quant/act_clipped_fraction_per_layer", torch.tensor(self._clipped), step)
        self._clipped = []


class Preemption(L.Callback):
    """Saves ``last.ckpt`` and stops when the cluster announces the end of the job (SLURM ``--signal=USR1@T``).

    The signal handler only sets a flag. At the end of every step the processes sum their flags in the background
    (a gloo all-reduce on the host, read at the end of the next step, so that no step waits for the slowest rank
    or for the GPU); one step after any rank received the signal, all save the checkpoint together (atomic:
    Lightning writes through an fsspec transaction, a temporary file renamed into place), process 0 requeues the
    SLURM job (``scontrol requeue``), and training stops. The requeued job runs the same command with
    ``resume=auto`` and continues from that step. This replaces Lightning's own SLURM auto-requeue, whose
    ``hpc_ckpt_*.ckpt`` files ``resume=`` would not find.

    Args:
        checkpoint: path of the checkpoint to write (the run's ``checkpoints/last.ckpt``).
        signals: signals that announce preemption.
    """

    def __init__(self, checkpoint: str, signals: tuple[int, ...] | None = None) -> None:
        import signal as _signal

        self.checkpoint = checkpoint
        self.signals = signals if signals is not None else (_signal.SIGUSR1,)
        self.received = False
        self.preempted = False
        self._previous: dict[int, Any] = {}
        self._group: Any = None  # a gloo process group for the flags (several processes only)
        self._pending: tuple[Any, Tensor] | None = None  # the all-reduce in flight and its flag tensor

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = True

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        import signal as _signal

        for sig in self.signals:
            self._previous[sig] = _signal.signal(sig, self._handler)
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            self._group = torch.distributed.new_group(backend="gloo")  # collective: every rank creates it

    def agreed(self) -> bool:
        """Whether some process had received the signal by the end of the previous call (every process calls
        once per step and gets the same answer at the same step); with one process, whether this one has."""
        if self._group is None:
            return self.received
        decided = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()  # issued a whole step ago: done unless another rank is a step behind
            decided = bool(flag.item() > 0)
        flag = torch.tensor([int(self.received)])
        self._pending = (torch.distributed.all_reduce(flag, group=self._group, async_op=True), flag)
        return decided

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
        if not self.agreed():
            return
        trainer.save_checkpoint(self.checkpoint)
        self.preempted = True
        trainer.should_stop = True
        if trainer.is_global_zero:
            self._requeue(trainer.global_step)

    def _requeue(self, step: int) -> None:
        import os
        import subprocess

        job = os.environ.get("SLURM_JOB_ID")
        msg = f"preempted: saved {self.checkpoint} at step {step}"
        if job:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            msg += f"; scontrol requeue {job}: exit {result.returncode} {result.stderr.strip()}"
        else:
            msg += "; not under SLURM, restart with resume=auto"
        print(msg, flush=True)

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        import signal as _signal

        for sig, previous in self._previous.items():
            _signal.signal(sig, previous)
        self._previous.clear()
        if self._pending is not None:  # every rank issued the same all-reduces: the last one completes
            self._pending[0].wait()
            self._pending = None
        if self._group is not None:
            torch.distributed.destroy_process_group(self._group)
            self._group = None


class StepProgress(TQDMProgressBar):
    """Lightning's progress bar counted in optimizer steps of the whole run: ``train: 20/25`` after a resume at
    step 20 of 25, where the epoch-based bar reads ``Epoch 0`` over a batch count of the current loader (a run is
    one pass over a loader that only counts steps, restarted at each resume)."""

    def on_train_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_start()
        self.on_train_epoch_start(trainer)  # a resume restores the position within the epoch: no epoch start

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        bar.set_description("train", refresh=False)
        bar.reset(total=trainer.max_steps)
        bar.initial = trainer.global_step  # the rate shown counts this process's steps only
        bar.n = trainer.global_step
        bar.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self._should_update(step, trainer.max_steps) and not self.train_progress_bar.disable:
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
            self.train_progress_bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float | dict]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version: always empty here (one run per directory)
        return metrics
