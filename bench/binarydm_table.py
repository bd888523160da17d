"""BinaryDM's ablation in miniature on the embedded digits teacher, all W1A4: the plain ``s sign(W)`` baseline,
BinaryDM without LRM and BinaryDM, each trained with the same budget, over several seeds (Zheng et al., ICLR 2025,
Tables 2 and 7 have this shape on LSUN-Bedrooms LDM-4).

    python bench/binarydm_table.py                                   # 3 seeds, the digits recipe as it is
    python bench/binarydm_table.py --seeds 0 --variants binarydm -- trainer.max_steps=100
    python bench/binarydm_table.py --jobs 3                          # 3 cells at a time (one GPU holds them all)

Each cell is one ordinary run of ``train.py config=binarydm_digits.yaml`` plus the variant's overrides
(:data:`VARIANTS`) and ``seed=<s> trajectories.seed=<3407 + 10000 s>``. The baseline is the paper's: one basis per
layer, ``s = mean |W|`` per output channel and learned, no warm-up, no LRM, the same activation quantizers, edge
layers, learning rates and steps. Every run evaluates the FP teacher on the same samples (the FP row) and its own PTQ
start. Prints mean +- standard deviation over the seeds and writes ``<out>/table.md`` and ``<out>/table.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.efficientdm_table import COLUMNS, save_table  # noqa: E402 - after the path set-up above

VARIANTS = {
    "baseline": ["binarydm.multi_basis=[]", "binarydm.lrm_weight=0", "binarydm.warmup_groups=0",
                 "binarydm.collapse_at=null"],
    "binarydm_no_lrm": ["binarydm.lrm_weight=0"],
    "binarydm": [],
}
LABELS = {"baseline": "baseline s sign(W)", "binarydm_no_lrm": "BinaryDM w/o LRM", "binarydm": "BinaryDM"}


@dataclass(frozen=True)
class Ablation:
    """One method's table: its digits recipe, the bit-width shown, the variants (name -> overrides) and labels;
    ``recipes``: variants trained from another recipe (name -> recipe)."""

    recipe: str
    bits: str
    variants: dict[str, list[str]]
    labels: dict[str, str]
    script: str
    default_out: str
    recipes: dict[str, str] = field(default_factory=dict)


BINARYDM = Ablation("binarydm_digits.yaml", "W1A4", VARIANTS, LABELS, "bench/binarydm_table.py",
                    "runs/binarydm_table")


def _cell(values: list[float], spec: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def _row(label: str, reports: list[dict], variant: str) -> str:
    cells = [_cell([r["variants"][variant][k] for r in reports if r["variants"][variant].get(k) is not None], spec)
             for k, _, spec in COLUMNS]
    return f"| {label} | " + " | ".join(cells) + " |"


def table(results: dict[str, list[dict]], ablation: Ablation = BINARYDM) -> str:
    """Markdown table: FP, then each variant's PTQ start and trained student (mean ± std over seeds)."""
    lines = [f"| {ablation.bits} variant | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    first = next(iter(results.values()))
    lines.append(_row("FP teacher (W32A32)", first, "fp"))
    for name, reports in results.items():
        lines.append(_row(f"{ablation.labels[name]}, PTQ start", reports, "ptq"))
        lines.append(_row(f"{ablation.labels[name]}, trained", reports, "qat"))
    return "\n".join(lines)


def run_cell(ablation: Ablation, out: Path, name: str, seed: int, overrides: list[str]) -> tuple[dict, float]:
    """One ordinary training run of the digits recipe for a variant and seed; returns its report and wall time."""
    from train.cli import main as train_main

    start = time.time()
    recipe = ablation.recipes.get(name, ablation.recipe)
    run = train_main([f"config={recipe}", f"output_dir={out / name / f'seed{seed}'}", f"seed={seed}",
                      f"trajectories.seed={3407 + 10000 * seed}", "export=false", "overwrite=true",
                      *ablation.variants[name],
                      *overrides])
    return json.loads((run / "report.json").read_text()), round(time.time() - start, 1)


def main(argv: list[str] | None = None, ablation: Ablation = BINARYDM, doc: str = __doc__) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=ablation.default_out, help="parent directory of the runs")
    parser.add_argument("--variants", nargs="+", default=list(ablation.variants), choices=list(ablation.variants))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells run at once, each in its own process (set OMP_NUM_THREADS = cores / jobs)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides (key=value) after --")
    args = parser.parse_args(argv)

    from train.tools.digits_teacher import machine_description

    out = Path(args.out)
    cells = [(ablation, out, name, seed, args.overrides) for name in args.variants for seed in args.seeds]
    if args.jobs > 1:  # spawned, not forked: a CUDA context does not survive a fork
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            done = pool.starmap(run_cell, cells)
    else:
        done = [run_cell(*cell) for cell in cells]
    results: dict[str, list[dict]] = {}
    seconds: dict[str, list[float]] = {}
    for (_, _, name, _, _), (report, wall) in zip(cells, done, strict=True):
        results.setdefault(name, []).append(report)
        seconds.setdefault(name, []).append(wall)
    text = table(results, ablation)
    sampler = next(iter(results.values()))[0]["sampler"]
    command = f"python {ablation.script} " + " ".join(argv if argv is not None else sys.argv[1:])
    note = (f"\n\nCommand: `{command.strip()}` on {machine_description()}, {args.jobs} cell(s) at a time; "
            f"seeds {args.seeds} (mean ± standard deviation); {sampler['num_samples']} class-balanced samples per "
            f"row ({sampler['scheduler']} {sampler['steps']} steps, CFG {sampler['guidance_scale']}, eta "
            f"{sampler['eta']}); run times (s): {seconds}.")
    save_table(out, text + note, {"runs": results, "seconds": seconds, "command": command})
    return results


if __name__ == "__main__":
    main()
