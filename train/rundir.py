"""A run directory belongs to one run: what :func:`train.cli.main` checks before it writes anything there.

* A fresh start (no ``resume=``) in a directory that already holds a run's outputs stops, naming ``resume=last`` /
  ``resume=auto`` and ``overwrite=true``; ``overwrite=true`` removes the old run's outputs first (only the names a
  run writes, :data:`RUN_OUTPUTS`; the reference-statistics cache ``eval_cache/`` is kept: it is keyed by its
  inputs).
* A resume compares the new config with the run's saved ``config.yaml``: a difference in a key that shapes the
  student or its data (method and its section, losses, teacher, seeds, trajectories, calibration, optimizer,
  gradient clipping) refuses, listing every difference; the keys in :data:`MAY_CHANGE` (steps, logging,
  monitoring, evaluation, export, compilation, hardware and launcher) may change, and each change is appended to
  ``resumes.log``.
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from train.config import ConfigError, RunConfig, to_yaml

__all__ = ["RUN_OUTPUTS", "MAY_CHANGE", "config_differences", "check_run_dir", "clear_run_outputs",
           "record_resume"]

#: what a run writes into its directory (``trajectories/``: the default shard cache; ``calibration/``: the calibrated
#: student, restored by a resume before the first checkpoint)
RUN_OUTPUTS = ("config.yaml", "prepare_report.txt", "calibration", "checkpoints", "tensorboard", "student", "export",
               "eval", "samples", "trajectories", "report.json", "report.md", "eps_mse_by_step.png",
               "samples_fp_ptq_qat.png", "resumes.log")
#: keys (or sections, ending in ".") that a resumed run may change
MAY_CHANGE = ("resume", "overwrite", "output_dir", "export", "eval.", "monitor.", "performance.", "trainer.max_steps",
              "trainer.log_every_n_steps", "trainer.enable_progress_bar", "trainer.accelerator", "trainer.devices",
              "trainer.num_nodes", "trainer.strategy", "trainer.precision", "trainer.profiler",
              "trainer.deterministic")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def _may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


def config_differences(saved_yaml: str, cfg: RunConfig) -> tuple[list[str], list[str]]:
    """``(refused, allowed)``: ``"key: saved -> new"`` for every key that differs between a saved config and
    ``cfg``, split by :data:`MAY_CHANGE`."""
    saved = _flat(OmegaConf.to_container(OmegaConf.create(saved_yaml)))
    new = _flat(OmegaConf.to_container(OmegaConf.create(to_yaml(cfg))))
    refused, allowed = [], []
    for key in sorted(set(saved) | set(new) - {"resume", "overwrite"}):  # how a start is asked for, not the run
        old, value = saved.get(key, "<absent>"), new.get(key, "<absent>")
        if old != value:
            (allowed if _may_change(key) else refused).append(f"{key}: {old!r} -> {value!r}")
    return refused, allowed


def _existing(out: Path) -> list[str]:
    return [name for name in RUN_OUTPUTS if (out / name).exists()]


def check_run_dir(cfg: RunConfig, out: Path) -> list[str]:
    """Checks ``out`` against ``cfg`` before anything is written; returns the allowed config changes of a resume.

    Raises:
        ConfigError: a fresh start in a directory holding a run (without ``overwrite=true``), or a resume whose
            config changes keys outside :data:`MAY_CHANGE` (every such key listed).
    """
    if cfg.resume is None:
        present = _existing(out)
        if present and not cfg.overwrite:
            shown = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
            raise ConfigError(
                f"output_dir: {out} already holds a run ({shown}); "
                "continue it with resume=last (or resume=auto), start it again with overwrite=true (removes its "
                "outputs first), or choose another output_dir")
        return []
    saved = out / "config.yaml"
    if not saved.is_file():
        return []
    refused, allowed = config_differences(saved.read_text(), cfg)
    if refused:
        raise ConfigError([f"resume: {d} (the run in {out} was made with the saved value; changing it would train a "
                           "different student from this run's state: start a new run in another output_dir)"
                           for d in refused])
    return allowed


def clear_run_outputs(out: Path) -> list[str]:
    """Removes the outputs of a previous run from ``out`` (``overwrite=true``); returns the removed names."""
    removed = _existing(out)
    for name in removed:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


def record_resume(out: Path, source: str, changes: list[str]) -> None:
    """Appends one line per resume to ``resumes.log``: when, from what (a checkpoint, the saved calibration or the
    beginning), and the allowed changes."""
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    line = f"{stamp} resume from {source}"
    line += ("; changed " + "; ".join(changes)) if changes else "; config unchanged"
    with (out / "resumes.log").open("a") as f:
        f.write(line + "\n")
