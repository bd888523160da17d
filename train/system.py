"""The Lightning system: a frozen full-precision teacher distilled into a fake-quantized student, data-free.

One training step (:meth:`DistillQATSystem.training_step`):

1. the method's schedule hook (:meth:`qat.methods.Method.on_train_step`), identical on every process;
2. the next batch of ``(x_t, t, c)`` with the teacher's predictions from the trajectory source
   (:mod:`train.data.trajectories`), and the method's pre-forward hook (e.g. a no-grad pass on the previous step);
3. the student's forward, classifier-free-guidance batch ``[uncond; cond]``, with the feature taps of the loss terms
   and the method attached; the teacher's tapped features on the same inputs (from the online source's own teacher
   call, or one more teacher forward under ``no_grad``);
4. the loss: ``sum_i w_i L_i`` over the run config's terms (``losses``; default the output MSE, EfficientDM Eq. 7)
   and the method's own terms, each logged as ``train/<name>``.

The system receives built models and the method (Lightning's "systems vs models"); it never looks inside a method.
The data source lives in the system because online trajectories need the teacher on the training device; its
position and the method's state are saved in every checkpoint.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor, nn

import qat
from qat.losses import LossInputs, LossTerm
from qat.methods import Method
from qat.taps import FeatureTaps, resolve_taps
from train.config import OptimConfig
from train.data.trajectories import CachedTrajectories, OnlineTrajectories, TrajectoryBatch
from train.models.families import denoise, model_dtype
from train.models.teacher import Teacher

__all__ = ["DistillQATSystem", "StepRunner"]


class StepRunner:
    """Runs the student or the teacher on other inputs with one batch's conditions (for method hooks).

    ``student(x, t)`` / ``teacher(x, t)`` take ``x (B, *sample_shape)`` and ``t (B,)`` and return the raw outputs
    of the guidance batch (``[uncond; cond]`` rows with conditioning); the teacher runs under ``no_grad``.
    """

    def __init__(self, system: DistillQATSystem, batch: TrajectoryBatch) -> None:
        self.system, self.batch = system, batch

    def student(self, x: Tensor, t: Tensor) -> Tensor:
        # no reuse of the timestep tensors: the step's own forward reuses them, and this output's backward (if it
        # has one) still needs its own
        return self.system.forward_model(self.system.student, x, t, self.batch, reuse=False)

    @torch.no_grad()
    def teacher(self, x: Tensor, t: Tensor) -> Tensor:
        return self.system.forward_model(self.system.teacher_unet, x, t, self.batch, reuse=False)


class DistillQATSystem(L.LightningModule):
    """Frozen teacher + quantized student, trained by the method's rules.

    Args:
        teacher: the loaded teacher (its denoiser is frozen and kept in eval mode).
        student: the prepared and initialised student denoiser.
        method: the method that built the student (parameter groups, schedules, loss terms, taps).
        data: online or cached trajectory source.
        optim: optimizer settings (the groups' learning rates are the method's).
        guidance: CFG scale ``w``.
        losses: the run config's loss terms (each applied with its config's weight).
        num_train_timesteps: the teacher's training timesteps (for per-timestep loss buckets).
        timestep_buckets: number of buckets of the per-timestep loss curves.
        cuda_graphs: the student is compiled with CUDA graphs (``performance.compile_mode``): every training step
            starts a new step of torch's CUDA-graph trees, whose replays may then reuse the previous step's memory.
    """

    def __init__(self, teacher: Teacher, student: nn.Module, method: Method,
                 data: OnlineTrajectories | CachedTrajectories, optim: OptimConfig, guidance: float,
                 losses: list[LossTerm], num_train_timesteps: int = 1000, timestep_buckets: int = 10,
                 cuda_graphs: bool = False) -> None:
        super().__init__()
        self.teacher = teacher
        # Registered as a child so that Lightning moves it with the system; it has no trainable parameters.
        self.teacher_unet = teacher.unet
        self.student = student
        self.method = method
        self.data = data
        self.optim_cfg = optim
        self.guidance = guidance
        # children: a term's buffers (e.g. a projection) follow the device and the checkpoint; weight 0 is off
        self.loss_terms = nn.ModuleList([t for t in (*losses, *method.loss_terms()) if t.config.weight > 0])
        patterns = list(dict.fromkeys(p for term in self.loss_terms for p in term.taps()))
        patterns += [p for p in method.taps(student) if p not in patterns]
        # Resolved once, on the float teacher: the same names exist in the student (a wrapped layer keeps its
        # name), while a pattern resolved on the student would also catch its quantizers and adapters.
        self.taps = resolve_taps(teacher.unet, patterns) if patterns else []
        previous = list(dict.fromkeys(p for term in self.loss_terms for p in term.previous_taps()))
        self.previous_taps = resolve_taps(teacher.unet, previous) if previous else []
        self.num_train_timesteps = num_train_timesteps
        self.timestep_buckets = timestep_buckets
        self.cuda_graphs = cuda_graphs
        self.automatic_optimization = True
        self._t0: float | None = None
        self._loss: Tensor | None = None  # this step's loss, named when the step stops on non-finite gradients
        self._timestep_modules = qat.timestep_modules(student)  # walked once, not on every step

    # -- training ---------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DistillQATSystem:
        super().train(mode)
        self.teacher_unet.eval()  # the frozen teacher never leaves eval mode
        return self

    def _next(self) -> TrajectoryBatch:
        if isinstance(self.data, OnlineTrajectories):
            return self.data.next_batch(self.device, taps=self.taps)
        return self.data.next_batch(self.teacher, self.device)

    def forward_model(self, model: nn.Module, x: Tensor, t: Tensor, batch: TrajectoryBatch,
                      reuse: bool) -> Tensor:
        """``model``'s raw output on ``x`` at ``t`` with ``batch``'s conditions: ``[uncond; cond]`` rows with
        conditioning (float32). ``reuse``: see :func:`qat.timestep` (one forward per backward)."""
        # DeepSpeed's bf16 casts the parameters themselves (no autocast): inputs follow the model's dtype
        x = x.to(model_dtype(model))
        modules = self._timestep_modules if model is self.student else None
        if batch.cond is None:
            with self._timestep(model, t, modules, reuse):
                return denoise(model, x, t, None).float()
        tt = torch.cat([t, t])
        context = torch.cat([batch.uncond, batch.cond])
        if context.is_floating_point():  # a bf16 teacher's embedder gives bf16; DiT's integer labels stay integers
            context = context.to(x.dtype)
        with self._timestep(model, tt, modules, reuse):
            return denoise(model, torch.cat([x, x]), tt, context).float()

    def _timestep(self, model: nn.Module, t: Tensor, modules: list[nn.Module] | None,
                  reuse: bool) -> contextlib.AbstractContextManager:
        """:func:`qat.timestep` for one model call; a student with gradient checkpointing keeps the timestep after
        the call (its blocks run again in backward, after the call returned; the next call sets its own)."""
        if model is self.student and torch.is_grad_enabled() and getattr(model, "is_gradient_checkpointing", False):
            qat.set_timestep(model, t, modules, reuse=reuse)
            return contextlib.nullcontext()
        return qat.timestep(model, t, modules, reuse=reuse)

    def forward_student(self, x: Tensor, t: Tensor, batch: TrajectoryBatch) -> Tensor:
        """The student's raw output (see :meth:`forward_model`); with gradients, one forward per backward."""
        return self.forward_model(self.student, x, t, batch, reuse=torch.is_grad_enabled())

    def _teacher_features(self, batch: TrajectoryBatch) -> dict[str, Tensor]:
        if not self.taps:
            return {}
        if batch.teacher_features:  # captured by the online source's own teacher call on these inputs
            return batch.teacher_features
        with torch.no_grad(), FeatureTaps(self.teacher_unet, names=self.taps) as tapped:
            self.forward_model(self.teacher_unet, batch.x, batch.t, batch, reuse=False)
        return tapped.features

    @torch.no_grad()
    def _previous_teacher_features(self, batch: TrajectoryBatch) -> tuple[dict[str, Tensor], Tensor]:
        """The teacher's tapped features on each sample's previous trajectory step and the validity mask."""
        prev = batch.previous
        if prev is None:
            raise RuntimeError("a loss term reads the previous trajectory step, but the batch does not carry it")
        with FeatureTaps(self.teacher_unet, names=self.previous_taps) as tapped:
            self.forward_model(self.teacher_unet, prev.x, prev.t, batch, reuse=False)
        return tapped.features, prev.valid

    def student_loss(self, batch: TrajectoryBatch) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(loss, per-sample loss (B,), {term name: unweighted mean})`` of the student on ``batch``."""
        self.method.before_student_forward(self.student, batch, StepRunner(self, batch))
        with FeatureTaps(self.student, names=self.taps) as tapped:
            out = self.forward_student(batch.x, batch.t, batch)
        inputs = LossInputs(student_out=out, teacher_out=batch.targets(), t=batch.t, guided=batch.cond is not None,
                            guidance=self.guidance, student_features=tapped.features,
                            teacher_features=self._teacher_features(batch), student=self.student)
        if self.previous_taps:
            inputs.previous_teacher_features, inputs.previous_valid = self._previous_teacher_features(batch)
        loss: Tensor | None = None
        per: Tensor | None = None
        terms: dict[str, Tensor] = {}
        b = batch.x.shape[0]
        for term in self.loss_terms:
            value = term(inputs)
            w = term.config.weight
            if value.dim() == 1 and value.shape[0] == 2 * b and inputs.guided:  # per guidance row -> per sample
                value = value.reshape(2, b).mean(0)
            mean = value.mean() if value.dim() else value
            terms[term.name] = mean.detach()
            weighted = mean if w == 1.0 else w * mean  # exactly the term when w = 1 (the default output MSE)
            loss = weighted if loss is None else loss + weighted
            if value.dim() == 1:
                per = (value if w == 1.0 else w * value) if per is None else per + w * value
        if loss is None:
            raise ValueError("no loss term has a weight above 0: set losses.<name>.weight or use a method with terms")
        return loss, per.detach() if per is not None else loss.detach().expand(batch.x.shape[0]), terms

    def training_step(self, _: Any, batch_idx: int) -> Tensor:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        for name, value in self.method.on_train_step(self.student, self.global_step,
                                                     int(self.trainer.max_steps)).items():
            self.log(f"method/{name}", value, batch_size=1)
        batch = self._next()
        loss, per, terms = self.student_loss(batch)
        bs = batch.x.shape[0]
        for name, value in terms.items():  # each term unweighted; train/loss is the weighted sum
            self.log(f"train/{name}", value, batch_size=bs)
        self._loss = loss.detach()
        if not self._grads_agree():
            # Every process takes the decision, so that no rank is left waiting in the gradient all-reduce: a
            # collective (and a wait for the forward) in the middle of the step. DDP and one device check the
            # all-reduced gradients instead (on_before_optimizer_step), which every rank holds identically.
            if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
                self._stop_non_finite("loss", loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self._log_by_timestep(batch.t, per)
        now = time.perf_counter()
        if self._t0 is not None:
            # per process; the global rate is this times the number of processes
            self.log("perf/samples_per_s", bs / max(now - self._t0, 1e-9), batch_size=bs)
            if batch.x.is_cuda:
                self.log("perf/max_memory_gib", torch.cuda.max_memory_allocated(batch.x.device) / 2**30,
                         batch_size=bs)
        self._t0 = now
        if batch_idx % max(self.trainer.log_every_n_steps, 1) == 0:
            self._log_learning_rates()
        return loss

    def _log_by_timestep(self, t: Tensor, per: Tensor) -> None:
        edges = torch.linspace(0, self.num_train_timesteps, self.timestep_buckets + 1)
        t_host = t.cpu()  # one copy (and wait for the GPU) per step, not two per bucket
        for i in range(self.timestep_buckets):
            mask = (t_host >= edges[i]) & (t_host < edges[i + 1])
            if mask.any():
                name = f"train_loss_by_t/{int(edges[i]):04d}-{int(edges[i + 1]) - 1:04d}"
                n = int(mask.sum())  # a masked mean: boolean indexing on the GPU would wait for it (nonzero)
                self.log(name, (per * mask.to(per.device, per.dtype)).sum() / n, batch_size=n)

    def _log_learning_rates(self) -> None:
        """``lr/<group>`` for a group with a plain name, ``lr/<role>_mean`` over the groups named ``<role>/...``
        (e.g. one LoRA group per layer)."""
        roles: dict[str, list[float]] = {}
        for name, lr in self.lr_by_group().items():
            if "/" in name:
                roles.setdefault(name.split("/")[0], []).append(lr)
            else:
                self.log(f"lr/{name}", lr, batch_size=1)
        for role, lrs in roles.items():
            self.log(f"lr/{role}_mean", sum(lrs) / len(lrs), batch_size=1)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.log("train/grad_norm", norm, batch_size=1)
            # A non-finite loss on any process makes the all-reduced gradients non-finite on every process.
            if self._grads_agree() and not bool(torch.isfinite(norm)):
                self._stop_non_finite("gradient norm", norm)

    def _grads_agree(self) -> bool:
        """Whether every process holds the same full gradients before the optimizer step (DDP, one device):
        then a finiteness check of them needs no collective. DeepSpeed keeps its own partitioned gradients."""
        strategy = self.trainer.strategy
        return type(strategy) in (DDPStrategy, SingleDeviceStrategy)

    def _stop_non_finite(self, what: str, value: Tensor) -> None:
        loss = self._loss
        here = "" if what == "loss" or loss is None else f" (loss here {loss.item()})"
        raise FloatingPointError(f"non-finite {what} {value.item()}{here} at global step {self.global_step}: a "
                                 "non-finite loss here or on another process; the last good checkpoint is kept in "
                                 "the run's checkpoints/ directory")

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim_cfg
        groups = self.method.param_groups(self.student)
        # fused: one kernel for all adapter tensors instead of a loop over hundreds of small ones (CUDA only)
        optimizer = torch.optim.AdamW(groups, betas=tuple(o.betas), fused=self.device.type == "cuda")
        total = max(int(self.trainer.max_steps), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then_linear(o.warmup_steps, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints: the data position and the method's state travel with the weights ------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["trajectory_state"] = self.data.state_dict()
        checkpoint["method_state"] = self.method.state_dict()
        # The teacher is frozen and reloaded from its own files: do not duplicate it in every checkpoint.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith("teacher_unet.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "trajectory_state" not in checkpoint:
            raise KeyError("checkpoint has no 'trajectory_state': it was not written by DistillQATSystem")
        self.data.load_state_dict(checkpoint["trajectory_state"])
        self.method.load_state_dict(checkpoint.get("method_state", {}))
        teacher_state = {f"teacher_unet.{k}": v for k, v in self.teacher_unet.state_dict().items()}
        checkpoint["state_dict"].update(teacher_state)

    def lr_by_group(self) -> dict[str, float]:
        """Current learning rate per optimizer group name (for logging)."""
        opt = self.optimizers()
        opt = opt.optimizer if hasattr(opt, "optimizer") else opt
        return {g["name"]: g["lr"] for g in opt.param_groups}


def _warmup_then_linear(warmup: int, total: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(total - warmup, 1))

    return factor
