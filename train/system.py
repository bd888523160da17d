"""The Lightning system: a frozen full-precision teacher distilled into a fake-quantized student, data-free.

    L = || eps_s(x_t, t, c) - eps_T(x_t, t, c) ||^2            (EfficientDM Eq. 7, mean over elements)

with ``eps`` the CFG-combined prediction ``eps_u + w (eps_c - eps_u)`` (``loss_target: cfg``, as EfficientDM) or
both branches supervised separately (``branches``). ``x_t`` comes from the teacher's trajectories (online or
cached, :mod:`train.data.trajectories`).

The system receives built models (Lightning's "systems vs models"); method-specific parts (which layers, which
parameter groups) come from ``qat``. The data source lives in the system because online trajectories need the
teacher on the training device; its position is saved in every checkpoint.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor, nn

import qat
from train.config import OptimConfig
from train.data.trajectories import CachedTrajectories, OnlineTrajectories, TrajectoryBatch
from train.models.families import model_dtype
from train.models.teacher import Teacher, denoise

__all__ = ["DistillQATSystem"]


class DistillQATSystem(L.LightningModule):
    """Frozen teacher + quantized student.

    Args:
        teacher: the loaded teacher (its denoiser is frozen and kept in eval mode).
        student: the prepared and calibrated student denoiser.
        data: online or cached trajectory source.
        optim: optimizer settings (parameter groups from :func:`qat.param_groups`).
        guidance: CFG scale ``w``.
        loss_target: ``cfg`` or ``branches``.
        num_train_timesteps: the teacher's training timesteps (for per-timestep loss buckets).
        timestep_buckets: number of buckets of the per-timestep loss curves.
        cuda_graphs: the student is compiled with CUDA graphs (``performance.compile_mode``): every training step
            starts a new step of torch's CUDA-graph trees, whose replays may then reuse the previous step's memory.
    """

    def __init__(self, teacher: Teacher, student: nn.Module, data: OnlineTrajectories | CachedTrajectories,
                 optim: OptimConfig, guidance: float, loss_target: str = "cfg", num_train_timesteps: int = 1000,
                 timestep_buckets: int = 10, cuda_graphs: bool = False) -> None:
        super().__init__()
        self.teacher = teacher
        # Registered as a child so that Lightning moves it with the system; it has no trainable parameters.
        self.teacher_unet = teacher.unet
        self.student = student
        self.data = data
        self.optim_cfg = optim
        self.guidance = guidance
        self.loss_target = loss_target
        self.num_train_timesteps = num_train_timesteps
        self.timestep_buckets = timestep_buckets
        self.cuda_graphs = cuda_graphs
        self.automatic_optimization = True
        self._t0: float | None = None
        self._loss: Tensor | None = None  # this step's loss, named when the step stops on non-finite gradients
        self._temporal = qat.temporal_quantizers(student)  # walked once, not on every step

    # -- training ---------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DistillQATSystem:
        super().train(mode)
        self.teacher_unet.eval()  # the frozen teacher never leaves eval mode
        return self

    def _next(self) -> TrajectoryBatch:
        if isinstance(self.data, OnlineTrajectories):
            return self.data.next_batch(self.device)
        return self.data.next_batch(self.teacher, self.device)

    def student_loss(self, batch: TrajectoryBatch) -> tuple[Tensor, Tensor]:
        """Mean loss and per-sample loss ``(B,)`` of the student on ``batch``."""
        # DeepSpeed's bf16 casts the parameters themselves (no autocast): inputs follow the student's dtype
        x, t = batch.x.to(model_dtype(self.student)), batch.t
        if batch.cond is None:
            with qat.timestep(self.student, t, self._temporal, reuse=True):  # one forward per backward
                pred = denoise(self.student, x, t, None)
            per = (pred.float() - batch.eps_cond).pow(2).flatten(1).mean(1)
            return per.mean(), per
        tt = torch.cat([t, t])
        context = torch.cat([batch.uncond, batch.cond]).to(x.dtype)  # a bf16 teacher's embedder gives bf16
        with qat.timestep(self.student, tt, self._temporal, reuse=True):  # one forward per backward
            out = denoise(self.student, torch.cat([x, x]), tt, context)
        eps_u, eps_c = out.float().chunk(2)
        if self.loss_target == "cfg":
            pred = eps_u + self.guidance * (eps_c - eps_u)
            target = batch.eps_uncond + self.guidance * (batch.eps_cond - batch.eps_uncond)
            per = (pred - target).pow(2).flatten(1).mean(1)
        else:
            per = 0.5 * ((eps_c - batch.eps_cond).pow(2).flatten(1).mean(1)
                         + (eps_u - batch.eps_uncond).pow(2).flatten(1).mean(1))
        return per.mean(), per

    def extra_losses(self, batch: TrajectoryBatch) -> dict[str, Tensor]:
        """Additional weighted loss terms (e.g. intermediate-feature distillation); none for EfficientDM.

        Methods that need them subclass the system once and return ``{name: weighted term}``; each term is added
        to the loss and logged as ``train/<name>``.
        """
        return {}

    def training_step(self, _: Any, batch_idx: int) -> Tensor:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        batch = self._next()
        loss, per = self.student_loss(batch)
        for name, term in self.extra_losses(batch).items():
            self.log(f"train/{name}", term, batch_size=batch.x.shape[0])
            loss = loss + term
        self._loss = loss.detach()
        if not self._grads_agree():
            # Every process takes the decision, so that no rank is left waiting in the gradient all-reduce: a
            # collective (and a wait for the forward) in the middle of the step. DDP and one device check the
            # all-reduced gradients instead (on_before_optimizer_step), which every rank holds identically.
            if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
                self._stop_non_finite("loss", loss)
        bs = batch.x.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        edges = torch.linspace(0, self.num_train_timesteps, self.timestep_buckets + 1)
        t_host = batch.t.cpu()  # one copy (and wait for the GPU) per step, not two per bucket
        for i in range(self.timestep_buckets):
            mask = (t_host >= edges[i]) & (t_host < edges[i + 1])
            if mask.any():
                name = f"train_loss_by_t/{int(edges[i]):04d}-{int(edges[i + 1]) - 1:04d}"
                n = int(mask.sum())  # a masked mean: boolean indexing on the GPU would wait for it (nonzero)
                self.log(name, (per.detach() * mask.to(per.device, per.dtype)).sum() / n, batch_size=n)
        now = time.perf_counter()
        if self._t0 is not None:
            # per process; the global rate is this times the number of processes
            self.log("perf/samples_per_s", bs / max(now - self._t0, 1e-9), batch_size=bs)
            if batch.x.is_cuda:
                self.log("perf/max_memory_gib", torch.cuda.max_memory_allocated(batch.x.device) / 2**30,
                         batch_size=bs)
        self._t0 = now
        if batch_idx % max(self.trainer.log_every_n_steps, 1) == 0:
            lrs = self.lr_by_group()
            lora = [v for k, v in lrs.items() if k.startswith("lora")]
            if lora:
                self.log("lr/lora_mean", sum(lora) / len(lora), batch_size=1)
            for name in ("weight_quantizers", "act_quantizers"):
                if name in lrs:
                    self.log(f"lr/{name}", lrs[name], batch_size=1)
        return loss

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
        groups = qat.param_groups(self.student, lora_lr=o.lora_lr, scale_aware=o.scale_aware,
                                  weight_step_lr=o.weight_step_lr, act_step_lr=o.act_step_lr,
                                  quantizer_weight_decay=o.quantizer_weight_decay,
                                  lora_weight_decay=o.lora_weight_decay, act_scale_aware=o.act_scale_aware)
        # fused: one kernel for all adapter tensors instead of a loop over hundreds of small ones (CUDA only)
        optimizer = torch.optim.AdamW(groups, betas=tuple(o.betas), fused=self.device.type == "cuda")
        total = max(int(self.trainer.max_steps), 1)
        warmup = o.warmup_steps

        def linear(step: int) -> float:  # warm-up, then linear decay to 0 (EfficientDM: no warm-up)
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(total - warmup, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints: the data position travels with the weights ---------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["trajectory_state"] = self.data.state_dict()
        # The teacher is frozen and reloaded from its own files: do not duplicate it in every checkpoint.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith("teacher_unet.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "trajectory_state" not in checkpoint:
            raise KeyError("checkpoint has no 'trajectory_state': it was not written by DistillQATSystem")
        self.data.load_state_dict(checkpoint["trajectory_state"])
        teacher_state = {f"teacher_unet.{k}": v for k, v in self.teacher_unet.state_dict().items()}
        checkpoint["state_dict"].update(teacher_state)

    def lr_by_group(self) -> dict[str, float]:
        """Current learning rate per optimizer group name (for logging)."""
        opt = self.optimizers()
        opt = opt.optimizer if hasattr(opt, "optimizer") else opt
        return {g["name"]: g["lr"] for g in opt.param_groups}
