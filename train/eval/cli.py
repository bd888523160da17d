"""``evaluate.py <source> [key=value ...]``: re-evaluates a trained student against its FP teacher.

``<source>`` is a run directory, its ``student/`` directory (``student.safetensors`` + ``run_config.yaml``), a
Lightning checkpoint (``<run>/checkpoints/*.ckpt``), or an export directory written by ``export.py``. The run's
resolved config is reloaded, so only what should change is given, e.g. another sampler::

    python evaluate.py runs/efficientdm_digits eval.scheduler=dpmsolver eval.sampling_steps=50

Extra keys: ``out=<dir>`` (default ``<source>/eval_<scheduler>_<steps>``) and ``ptq=false`` (skip re-calibrating
the PTQ baseline). Under ``torchrun`` / ``accelerate launch`` the samples are sharded over the processes by index
and gathered, so the report is the same for any process count; process 0 writes it.

``eval.backend=int8`` (``fp8``, ``int4wo``) evaluates the student with real low-bit kernels (:mod:`qat.runtime`): an
export is reloaded on that backend; a run, student directory or checkpoint is exported first, as ``export.py``
would, into a temporary directory, and its reload converted. ``report.json`` records it under ``runtime``: the
backend and how many quantized modules run on it or stay on the fake path (with the reasons). The PTQ baseline and
the FP teacher are evaluated as always.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from train.config import ConfigError, RunConfig, build_method, load_config

__all__ = ["main", "resolve_source", "runtime_student", "runtime_summary"]


def resolve_source(source: Path) -> tuple[str, Path, Path]:
    """``(kind, weights, run_config)`` of an evaluation source; kind is ``student``, ``checkpoint`` or ``export``."""
    if source.is_file() and source.suffix == ".ckpt":
        config = source.parent.parent / "config.yaml"
        if not config.is_file():
            raise FileNotFoundError(f"{config} not found: a checkpoint is evaluated with the resolved config of its "
                                    "run (<run>/config.yaml next to <run>/checkpoints/)")
        return "checkpoint", source, config
    if (source / "student" / "student.safetensors").is_file():
        source = source / "student"
    if (source / "student.safetensors").is_file():
        return "student", source / "student.safetensors", source / "run_config.yaml"
    if (source / "unet" / "config.json").is_file() and (source / "run_config.yaml").is_file():
        return "export", source, source / "run_config.yaml"
    raise FileNotFoundError(f"{source}: not a run directory, student directory (student.safetensors + "
                            "run_config.yaml), checkpoint (.ckpt) or export directory (unet/ + run_config.yaml)")


@torch.no_grad()
def runtime_student(student: torch.nn.Module, cfg: RunConfig, backend: str, device: torch.device,
                    family: str) -> torch.nn.Module:
    """A trained (or checkpointed) student on ``backend``: exported as ``export.py`` exports it (the method's
    conversion: QALoRA merged, weights on their grid; ``student`` itself is left as it is) into a temporary
    directory, then reloaded there with :func:`qat.runtime.load_for_inference`. The runtime needs that form: it reads
    the integer codes from weights on the quantizer grid."""
    from qat.export import export_quantized
    from qat.runtime import load_for_inference
    from train.models.families import set_family

    with tempfile.TemporaryDirectory(prefix="diffqat_eval_export_") as tmp:
        unet_dir = export_quantized(student, Path(tmp) / "unet", convert_fn=build_method(cfg).convert)
        loaded = load_for_inference(unet_dir, backend, device)
    set_family(loaded, family)
    return loaded


def runtime_summary(student: torch.nn.Module, backend: str, kind: str) -> dict[str, Any]:
    """The ``runtime`` entry of the report: the backend of the evaluated student and, where it went through
    :func:`qat.runtime.to_backend`, how many quantized modules run on each backend and why the others stay fake."""
    report = getattr(student, "runtime_report", None)
    if report is None:  # a run / checkpoint on the fake path: the student as trained
        return {"backend": backend, "model": "the student as trained (fake quantization)"}
    model = "the export's reload" if kind == "export" else "the reload of a temporary export of the student"
    out = {"backend": backend, "model": model, "counts": report.counts()}
    if backend != "fake":  # (with fake, every row says only that fake was asked for)
        out["fake"] = report.fake
    return out


def _init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def main(argv: list[str] | None = None) -> Path:
    """Evaluates ``argv[0]``; returns the directory holding ``report.json``."""
    from train.cli import build_student, calibrate_student, restore_student
    from train.eval.evaluate import Evaluator
    from train.eval.report import write_run_report
    from train.models.teacher import load_teacher

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or "=" in argv[0]:
        raise ConfigError("usage: evaluate.py <run dir | student dir | checkpoint.ckpt | export dir> [key=value ...]")
    source = Path(argv.pop(0))
    extra = {k: v for k, v in (a.split("=", 1) for a in argv if a.split("=", 1)[0] in ("out", "ptq"))}
    overrides = [a for a in argv if a.split("=", 1)[0] not in ("out", "ptq")]
    kind, weights, run_config = resolve_source(source)
    cfg = load_config([f"config={run_config}", *overrides, "eval.enabled=true"])
    start = time.time()
    rank, world = _init_distributed()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    out = Path(extra.get("out") or (source if source.is_dir() else source.parent.parent)
               / f"eval_{cfg.eval.scheduler}_{cfg.eval.sampling_steps}")

    teacher = load_teacher(cfg.teacher, device)
    backend = cfg.eval.backend
    if kind == "export":
        from qat.runtime import load_for_inference
        from train.models.families import set_family

        # backend fake: qat.load_quantized's model as it is (to_backend only attaches its report)
        student = load_for_inference(weights / "unet", backend, device)
        set_family(student, teacher.family)  # a teacher.family override also applies to the reloaded export
    else:
        student, _ = build_student(cfg, teacher)
        student.to(device)
        if kind == "checkpoint":
            restore_student(student, str(weights))
        else:
            state = load_file(str(weights))
            missing, unexpected = student.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(f"{weights} does not match the student of {run_config}: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
        if backend != "fake":
            student = runtime_student(student, cfg, backend, device, teacher.family)
    student.eval()

    tr = cfg.trajectories
    evaluator = Evaluator(cfg.eval, teacher, tr.eta, tr.guidance_scale, device, cache_dir=str(out / "eval_cache"),
                          rank=rank, world_size=world, progress=rank == 0 and cfg.trainer.enable_progress_bar)
    variants: dict[str, dict[str, Any]] = {}
    samples = {}
    variants["fp"], samples["fp"] = evaluator.evaluate(None)
    if extra.get("ptq", "true").lower() not in ("false", "0", "no"):
        method = build_method(cfg)  # one instance for building and initialising the PTQ student
        ptq_student, _ = build_student(cfg, teacher, method)
        ptq_student.to(device)
        calibrate_student(cfg, ptq_student, teacher, device, method,
                          progress=rank == 0 and cfg.trainer.enable_progress_bar)
        variants["ptq"], samples["ptq"] = evaluator.evaluate(ptq_student)
        del ptq_student
    variants["qat"], samples["qat"] = evaluator.evaluate(student)

    if rank == 0:
        paths = write_run_report(out, cfg, evaluator, variants, samples, source=str(source), source_kind=kind,
                                 runtime=runtime_summary(student, backend, kind), processes=world,
                                 wall_time_s=round(time.time() - start, 1))
        print(paths["md"].read_text())
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return out
