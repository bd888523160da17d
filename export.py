"""Export a trained DiffQAT student as a real low-bit model directory.

    python export.py runs/efficientdm_digits out/digits-w4a4
    python export.py runs/efficientdm_digits/student out/digits-w4a4 --teacher /models/ldm4-cin256 --device cuda

The first argument is a run directory (holding ``student/``) or the student directory itself
(``student.safetensors`` + ``run_config.yaml``, written by ``train.py``). The student is rebuilt from its recipe and
the teacher, loaded strictly, exported with :func:`qat.export.export_quantized`, reloaded with
:func:`qat.export.load_quantized` and compared with the student on random inputs (``--no-verify`` skips that).
Every training run already writes this export to ``<output_dir>/export``; the output layout is described in
:mod:`train.export_run`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

__all__ = ["main"]


def main(argv: list[str] | None = None) -> Path:
    """Runs the export; returns the output directory."""
    parser = argparse.ArgumentParser(description="Export a trained DiffQAT student as a low-bit model directory.")
    parser.add_argument("run", type=Path, help="run directory (with student/) or the student directory")
    parser.add_argument("out", type=Path, help="output model directory")
    parser.add_argument("--teacher", help="override teacher.path of the run's recipe (the teacher moved)")
    parser.add_argument("--device", default="cpu", help="device for rebuilding and verifying (default: cpu)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    parser.add_argument("--no-verify", action="store_true", help="skip the reload-and-compare check")
    args = parser.parse_args(argv)

    # train.* (Lightning, omegaconf) is only needed to rebuild the student; qat.export itself never imports it.
    from safetensors.torch import load_file

    from train.cli import build_student
    from train.config import build_method
    from train.config import load_config as load_run_config
    from train.export_run import export_run, student_dir
    from train.models.teacher import load_teacher

    sdir = student_dir(args.run)
    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another directory or pass --overwrite")
    overrides = [f"config={sdir / 'run_config.yaml'}", "resume=null"]  # resuming is irrelevant to an export
    if args.teacher:
        overrides.append(f"teacher.path={args.teacher}")
    cfg = load_run_config(overrides)
    device = torch.device(args.device)
    teacher = load_teacher(cfg.teacher, device)
    method = build_method(cfg)  # one instance for building and converting the student
    student, _ = build_student(cfg, teacher, method)
    weights = sdir / "student.safetensors"
    try:
        student.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not match the student built from {sdir / 'run_config.yaml'}: "
                         f"{str(err).splitlines()[0]}") from None
    student.to(device).eval()
    export_run(student, teacher, cfg, out, run_dir=sdir.parent if sdir.name == "student" else sdir, method=method,
               verify=not args.no_verify)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    from train.entry import run_entry

    run_entry(lambda: main(sys.argv[1:]))
