"""The evaluation report of a run: ``report.json``, ``report.md`` and PNG plots in the run directory.

``report.json`` layout::

    {"method", "bits", "teacher", "train_steps", "wall_time_s",
     "sampler": {"scheduler", "steps", "guidance_scale", "eta", "num_samples", "seed"},
     "heldout": {"num_trajectories", "num_steps", "timesteps": [...]},
     "variants": {"fp":  {"fd", "class_acc", ...},
                  "ptq": {"fd", "class_acc", "psnr_vs_fp", "ssim_vs_fp", "sample_mse", "eps_mse",
                          "eps_mse_by_step": [...]},
                  "qat": {... same as ptq}},
     "runtime": {"backend", "model", "counts": {backend: modules}, "fake": {module: why}}}     (evaluate.py only)

Metrics appear where they apply: the FP teacher has no ``psnr_vs_fp`` or ``eps_mse`` (it is the reference), and
distribution metrics depend on ``eval.features``. ``runtime`` says what computed the ``qat`` variant's quantized
layers (``eval.backend``, :mod:`qat.runtime`): ``counts`` quantized modules per backend and ``fake`` the reason each
module stays on the fake path (``counts`` is absent for a student evaluated as trained, ``fake`` for the ``fake``
backend). Non-finite values (a PSNR of identical images) are written as ``null``, since JSON has no infinity.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from train.config import build_method
from train.eval.evaluate import Evaluator, SampleSet
from train.models.pipeline import save_adm_npz

__all__ = ["METRIC_LABELS", "write_report", "write_run_report", "sanitize", "plot_eps_curves", "plot_sample_grids"]

#: report key -> (label, format, better) in the order of the tables.
METRIC_LABELS: dict[str, tuple[str, str, str]] = {
    "fd": ("FD-digits", ".3f", "lower"),
    "class_acc": ("class accuracy", ".3f", "higher"),
    "fid": ("FID", ".2f", "lower"),
    "sfid": ("sFID", ".2f", "lower"),
    "is": ("IS", ".2f", "higher"),
    "precision": ("precision", ".3f", "higher"),
    "recall": ("recall", ".3f", "higher"),
    "psnr_vs_fp": ("PSNR vs FP (dB)", ".2f", "higher"),
    "ssim_vs_fp": ("SSIM vs FP", ".4f", "higher"),
    "sample_mse": ("sample MSE vs FP", ".5f", "lower"),
    "eps_mse": ("held-out eps-MSE vs FP", ".5f", "lower"),
    "x0_mse": ("held-out x0-MSE vs FP", ".5f", "lower"),
}

VARIANT_NAMES = {"fp": "FP teacher", "ptq": "PTQ (start)", "qat": "QAT (trained)"}


def sanitize(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None, recursively (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [sanitize(v) for v in value]
    return value


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def markdown_table(variants: dict[str, dict[str, Any]]) -> str:
    """One row per variant, one column per metric present in any variant."""
    keys = [k for k in METRIC_LABELS if any(k in v for v in variants.values())]
    arrow = {"lower": "\u2193", "higher": "\u2191"}
    head = "| variant | " + " | ".join(f"{METRIC_LABELS[k][0]} {arrow[METRIC_LABELS[k][2]]}" for k in keys)
    lines = [head + " |", "|---" * (len(keys) + 1) + "|"]
    for name, metrics in variants.items():
        cells = [_fmt(metrics.get(k), METRIC_LABELS[k][1]) for k in keys]
        lines.append(f"| {VARIANT_NAMES.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_eps_curves(path: Path, timesteps: list[int], variants: dict[str, dict[str, Any]]) -> Path:
    """Held-out eps-MSE (and implied x0-MSE) against the teacher per sampler timestep, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on clusters
    import matplotlib.pyplot as plt

    panels = [(k, label) for k, label in (("eps_mse_by_step", "eps-MSE vs FP teacher"),
                                          ("x0_mse_by_step", "implied x0-MSE vs FP teacher"))
              if any(k in m for m in variants.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.6), dpi=120, squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for name, metrics in variants.items():
            if key in metrics:
                ax.plot(timesteps, metrics[key], marker="o", ms=3, label=VARIANT_NAMES.get(name, name))
        ax.set_xlabel("timestep t (sampling runs left to right)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_sample_grids(path: Path, grids: dict[str, SampleSet], ncol: int = 10) -> Path:
    """The same seeds sampled by each variant, side by side (FP / PTQ / QAT), one panel per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def tile(images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] not in (1, 3):  # undecoded latents (4 or 16 channels): show the first three as RGB
            images = images[:, :3]
        n, c, h, w = images.shape
        rows = math.ceil(n / ncol)
        canvas = torch.ones(c, rows * (h + 1) + 1, ncol * (w + 1) + 1)
        for i in range(n):
            r, q = divmod(i, ncol)
            canvas[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = images[i]
        return ((canvas.clamp(-1, 1) + 1) / 2).permute(1, 2, 0)

    tiles = {name: tile(samples.images.float()) for name, samples in grids.items()}
    aspect = max(t.shape[0] / t.shape[1] for t in tiles.values())
    fig, axes = plt.subplots(1, len(grids), figsize=(3.4 * len(grids), 3.4 * aspect + 0.6), dpi=120, squeeze=False)
    for ax, (name, img) in zip(axes[0], tiles.items()):
        ax.imshow(img.squeeze(-1).numpy() if img.shape[-1] == 1 else img.numpy(), cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title(VARIANT_NAMES.get(name, name))
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(out: Path, report: dict[str, Any], grids: dict[str, SampleSet] | None = None,
                 title: str = "") -> dict[str, Path]:
    """Writes ``report.json``, ``report.md`` and the PNG plots into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    paths["json"].write_text(json.dumps(sanitize(report), indent=2, allow_nan=False) + "\n")
    variants = report["variants"]
    lines = [f"# {title or report.get('method', 'evaluation')}", "", markdown_table(variants), ""]
    s = report.get("sampler", {})
    if s:
        lines.append(f"Samples: {s.get('num_samples')} per variant, {s.get('scheduler')} with {s.get('steps')} steps, "
                     f"CFG {s.get('guidance_scale')}, eta {s.get('eta')}, seeds {s.get('seed')} + i (same noise and "
                     "label for every variant).")
    rt = report.get("runtime")
    if rt:
        counts = ", ".join(f"{n} on {b}" for b, n in rt.get("counts", {}).items())
        lines.append(f"QAT variant computed on backend `{rt['backend']}` ({rt['model']}" +
                     (f"; quantized modules: {counts}" if counts else "") + ").")
    h = report.get("heldout")
    if h and any("eps_mse_by_step" in v for v in variants.values()):
        paths["eps_plot"] = plot_eps_curves(out / "eps_mse_by_step.png", h["timesteps"], variants)
        lines += [f"Held-out eps-MSE: {h['num_trajectories']} teacher trajectories of {h['num_steps']} DDIM steps.",
                  "", "![per-step eps-MSE](eps_mse_by_step.png)"]
    if grids:
        paths["grid"] = plot_sample_grids(out / "samples_fp_ptq_qat.png", grids)
        lines += ["", "![FP / PTQ / QAT samples from the same seeds](samples_fp_ptq_qat.png)"]
    paths["md"].write_text("\n".join(lines) + "\n")
    return paths


def write_run_report(out: Path, cfg: Any, evaluator: Evaluator, variants: dict[str, dict[str, Any]],
                     samples: dict[str, SampleSet], **fields: Any) -> dict[str, Path]:
    """The report of a run or an ``evaluate.py`` call: header fields from the config, the variants' metrics, ADM
    ``.npz`` samples (``eval.save_npz``) and the first ``eval.grid_size`` samples of each variant as a grid."""
    bits = build_method(cfg).bits()
    report = {"method": cfg.method, "bits": bits, "teacher": cfg.teacher.path, **fields,
              "sampler": evaluator.sampler_info(), "heldout": evaluator.heldout_info(), "variants": variants}
    if cfg.eval.save_npz:
        for name, s in samples.items():
            save_adm_npz(out / "samples" / f"{name}.npz", s.images, s.labels)
    n = cfg.eval.grid_size
    grids = {k: SampleSet(s.images[:n], s.labels[:n], s.indices[:n]) for k, s in samples.items()} if n else None
    return write_report(out, report, grids, title=f"{cfg.method} {bits} on {cfg.teacher.path}")
