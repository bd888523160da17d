"""What the launcher decided, mapped onto Lightning: ``accelerate launch``, ``torchrun`` and SLURM ``srun``.

A run is launched the way a cluster user already launches jobs; the launcher owns the process layout, and
``accelerate launch`` also owns mixed precision and the DeepSpeed stage. :func:`apply_launcher` reads the launcher's
environment and rewrites ``cfg.trainer`` accordingly (devices per node, nodes, strategy, precision), before any model
is built, so a config never fights its launcher:

=====================================  =============================================================================
launcher setting (environment)         Lightning setting
=====================================  =============================================================================
``WORLD_SIZE`` / ``LOCAL_WORLD_SIZE``  ``trainer.devices`` = processes per node, ``trainer.num_nodes`` = nodes,
(torchrun, accelerate multi-process)   ``trainer.strategy`` = ``ddp`` unless DeepSpeed
``SLURM_NTASKS`` (srun, no torchrun)   the same from ``SLURM_NTASKS_PER_NODE`` and ``SLURM_JOB_NUM_NODES``
``mixed_precision: bf16 / fp16``       ``trainer.precision`` = ``bf16-mixed`` / ``16-mixed``
``use_cpu: true``                      ``trainer.accelerator`` = ``cpu``
``distributed_type: DEEPSPEED``        ``trainer.strategy`` = ``deepspeed_stage_{1,2,3}`` (``_offload`` with CPU
+ ``zero_stage``, offload, config file  offload), or Lightning's ``DeepSpeedStrategy(config=file)``
``gradient_clipping``                  ``trainer.gradient_clip_val``
=====================================  =============================================================================

Settings with no faithful equivalent stop the run with :class:`~train.config.ConfigError` naming the setting: FSDP,
Megatron-LM, fp8, torch dynamo through accelerate, gradient accumulation.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from train.config import ConfigError, RunConfig

__all__ = ["apply_launcher", "launcher_name", "trainer_kwargs"]

_PRECISION = {"no": None, "bf16": "bf16-mixed", "fp16": "16-mixed"}


def _true(env: Mapping[str, str], key: str) -> bool:
    return env.get(key, "").strip().lower() in ("1", "true", "yes")


def launcher_name(env: Mapping[str, str] = os.environ) -> str:
    """``accelerate``, ``torchrun``, ``slurm`` or ``python`` (a plain single process)."""
    if any(k in env for k in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "ACCELERATE_DYNAMO_BACKEND")):
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in env or "LOCAL_WORLD_SIZE" in env:
        return "torchrun"
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    return "python"


def _layout(env: Mapping[str, str]) -> tuple[int, int] | None:
    """``(processes per node, nodes)`` started by the launcher, or None for a single plain process."""
    if "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env:
        world, local = int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])
        return local, max(world // max(local, 1), 1)
    ntasks = int(env.get("SLURM_NTASKS", "1"))
    if ntasks > 1:
        # SLURM_NTASKS_PER_NODE looks like "4" or "4(x2)"
        per_node = env.get("SLURM_NTASKS_PER_NODE", "")
        match = re.match(r"(\d+)", per_node)
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
        local = int(match.group(1)) if match else ntasks // max(nodes, 1)
        return local, nodes
    return None


def apply_launcher(cfg: RunConfig, env: Mapping[str, str] = os.environ) -> list[str]:
    """Makes ``cfg.trainer`` agree with the launcher; returns one note per changed setting (for the log).

    Raises:
        ConfigError: an accelerate setting without a faithful Lightning equivalent, or an explicit
            ``trainer.devices`` / ``trainer.num_nodes`` that contradicts the processes the launcher started.
    """
    t = cfg.trainer
    notes: list[str] = []

    def set_(key: str, value: Any, why: str) -> None:
        if getattr(t, key) != value:
            notes.append(f"trainer.{key}: {getattr(t, key)!r} -> {value!r} ({why})")
            setattr(t, key, value)

    if launcher_name(env) == "accelerate":
        for key, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")):
            if _true(env, key):
                raise ConfigError(f"accelerate config: distributed_type {what} is not supported (the student trains "
                                  "a few percent of its parameters); use MULTI_GPU (DDP) or DEEPSPEED with ZeRO-2/3, "
                                  "e.g. launch/accelerate/ddp.yaml or launch/accelerate/deepspeed_zero2.yaml")
        mp = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        if mp not in _PRECISION:
            raise ConfigError(f"accelerate config: mixed_precision {mp!r} is not supported; use 'no', 'bf16' or "
                              "'fp16'")
        if _PRECISION[mp] is not None:
            set_("precision", _PRECISION[mp], f"accelerate mixed_precision={mp}")
        dynamo = env.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
        if dynamo not in ("no", ""):
            raise ConfigError(f"accelerate config: dynamo_backend {dynamo!r} is not supported; set it to 'no' "
                              "(accelerate's compile wrapper does not apply to a Lightning loop)")
        if _true(env, "ACCELERATE_USE_CPU"):
            set_("accelerator", "cpu", "accelerate use_cpu")
        accumulation = int(env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1"))
        if accumulation > 1:
            raise ConfigError(f"accelerate config: gradient_accumulation_steps {accumulation} is not supported; "
                              "raise trajectories.batch_size (or the process count) instead")
        clip = env.get("ACCELERATE_GRADIENT_CLIPPING", "").lower()
        if clip not in ("", "none", "false", "auto"):
            set_("gradient_clip_val", float(clip), "accelerate gradient_clipping")
        if _true(env, "ACCELERATE_USE_DEEPSPEED"):
            config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
            if config_file and config_file.lower() != "none":
                set_("strategy", f"deepspeed_config:{config_file}", "accelerate deepspeed_config_file")
            else:
                stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
                if stage not in ("1", "2", "3"):
                    raise ConfigError(f"accelerate config: deepspeed zero_stage {stage!r} is not supported; use 1, "
                                      "2 or 3")
                offload = any(env.get(k, "none").lower() == "cpu" for k in (
                    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"))
                suffix = "_offload" if offload and stage in ("2", "3") else ""
                set_("strategy", f"deepspeed_stage_{stage}{suffix}", f"accelerate zero_stage={stage}")

    layout = _layout(env)
    if layout is not None:
        local, nodes = layout
        if t.devices not in ("auto", 1, "1", local) and str(t.devices) != str(local):
            raise ConfigError(f"trainer.devices: {t.devices!r} but the launcher started {local} process(es) per "
                              "node; leave trainer.devices unset (the launcher decides)")
        if t.num_nodes not in (1, nodes):
            raise ConfigError(f"trainer.num_nodes: {t.num_nodes} but the launcher started {nodes} node(s); leave "
                              "trainer.num_nodes unset")
        threads = (os.cpu_count() or 1) // max(local, 1)
        if env.get("OMP_NUM_THREADS") == "1" and threads > 1:
            # torchrun (and accelerate through it) sets 1 unless told otherwise; on a host-bound step it matters:
            # a 1-process LDM-4 run took 25% longer with one thread than with all (docs/results.md)
            notes.append(f"OMP_NUM_THREADS=1: each of the {local} processes per node uses one CPU thread; set "
                         f"OMP_NUM_THREADS={threads} (cores / processes) before the launcher to use the node's cores")
        set_("devices", local, f"{launcher_name(env)}: processes per node")
        set_("num_nodes", nodes, f"{launcher_name(env)}: nodes")
        if local * nodes > 1 and t.strategy == "auto":
            set_("strategy", "ddp", f"{local * nodes} processes")
    else:
        # No launcher: one process. Lightning's own launcher would re-run this script for the other GPUs, but the
        # setup before ``fit`` (calibration, trajectory seeds per rank) must know its rank from the start.
        if str(t.devices) not in ("auto", "1") or t.num_nodes != 1:
            raise ConfigError(f"trainer.devices={t.devices!r}, trainer.num_nodes={t.num_nodes} without a launcher: "
                              "start one process per GPU with `torchrun --nproc_per_node N train.py ...` or "
                              "`accelerate launch --num_processes N train.py ...` (or srun under SLURM)")
        if t.accelerator != "cpu" and str(t.devices) == "auto" and torch.cuda.device_count() > 1:
            set_("devices", 1, "no launcher: one process on one GPU; use torchrun/accelerate for more")
    return notes


def deepspeed_kwargs(strategy: str, micro_batch: int) -> dict[str, Any]:
    """``DeepSpeedStrategy`` keyword arguments for ``deepspeed_stage_{1,2,3}[_offload]`` or ``deepspeed_config:<f>``.

    Lightning reads DeepSpeed's ``train_micro_batch_size_per_gpu`` from the train loader's batch sampler; DiffQAT's
    loader only counts steps (batches come from the trajectory source) and has none, so it is set here to
    ``trajectories.batch_size`` (DeepSpeed uses it for its throughput log only).
    """
    if strategy.startswith("deepspeed_config:"):
        path = strategy.split(":", 1)[1]
        try:
            config = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"trainer.strategy: cannot read the DeepSpeed config {path}: {err}") from None
        config.setdefault("train_micro_batch_size_per_gpu", micro_batch)
        return {"config": config}
    match = re.fullmatch(r"deepspeed_stage_([123])(_offload)?", strategy)
    if match is None:
        raise ConfigError(f"trainer.strategy: unknown DeepSpeed strategy {strategy!r}; use deepspeed_stage_1, "
                          "deepspeed_stage_2[_offload], deepspeed_stage_3[_offload] or deepspeed_config:<file.json>")
    stage, offload = int(match.group(1)), match.group(2) is not None
    return {"stage": stage, "offload_optimizer": offload, "offload_parameters": offload and stage == 3,
            "logging_batch_size_per_gpu": micro_batch}


def trainer_kwargs(cfg: RunConfig, find_unused_parameters: bool = False) -> dict[str, Any]:
    """``lightning.Trainer`` keyword arguments from ``cfg.trainer`` (DeepSpeed strategies become strategy objects).

    ``find_unused_parameters``: the method's flag (:attr:`qat.methods.Method.find_unused_parameters`); with DDP,
    parameters that get no gradient in a step are then allowed.
    """
    import dataclasses

    kwargs = dataclasses.asdict(cfg.trainer)
    strategy = kwargs["strategy"]
    if isinstance(strategy, str) and strategy.startswith("deepspeed"):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        kwargs["strategy"] = DeepSpeedStrategy(**deepspeed_kwargs(strategy, cfg.trajectories.batch_size))
    elif strategy == "ddp" and find_unused_parameters:
        from lightning.pytorch.strategies import DDPStrategy

        kwargs["strategy"] = DDPStrategy(find_unused_parameters=True)
    return kwargs
