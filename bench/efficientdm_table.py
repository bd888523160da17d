"""EfficientDM's main table in miniature, on the embedded digits teacher: FP, naive PTQ and EfficientDM at W8A8,
W4A8, W4A4 and W2A8 (He et al., ICLR 2024, Table 2 has this shape on LDM-4 ImageNet).

    python bench/efficientdm_table.py                       # every bit-width, the digits recipe as it is
    python bench/efficientdm_table.py --bits w4a4 -- trainer.max_steps=100    # a subset, with recipe overrides

Each bit-width is one ordinary run of ``train.py config=efficientdm_digits.yaml`` (plus :data:`BIT_OVERRIDES`).
Its PTQ start is the "naive PTQ" row: min-max weights and MSE-searched activation ranges, no training. Every run
evaluates the FP teacher on the same samples, so the FP row comes from the first run. Prints the table and writes
``<out>/table.md`` and ``<out>/table.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BITS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4), "w2a8": (2, 8)}
#: per-bit-width recipe changes. W2A8: with the recipe's LoRA factor 0.1 the 2-bit student collapsed (FD-digits 88
#: vs 13 for PTQ, H200 run in docs/results.md); a 5x smaller factor trains it. Each integer step of a 2-bit weight
#: is a quarter of its range, so the same integer-unit update (scale-aware LR) is a much larger relative change.
BIT_OVERRIDES = {"w2a8": ["efficientdm.lora_lr=0.02"]}
COLUMNS = [("fd", "FD-digits \u2193", ".3f"), ("class_acc", "class acc \u2191", ".3f"),
           ("psnr_vs_fp", "PSNR vs FP (dB) \u2191", ".2f"), ("ssim_vs_fp", "SSIM vs FP \u2191", ".3f"),
           ("eps_mse", "eps-MSE vs FP \u2193", ".4f"), ("x0_mse", "x0-MSE vs FP \u2193", ".5f")]


def _row(label: str, bits: str, metrics: dict) -> str:
    cells = []
    for key, _, spec in COLUMNS:
        value = metrics.get(key)
        cells.append("-" if value is None else format(value, spec))
    return f"| {bits} | {label} | " + " | ".join(cells) + " |"


def table(results: dict[str, dict]) -> str:
    """Markdown table: the FP row, then naive PTQ and EfficientDM per bit-width."""
    lines = ["| bits | method | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    first = next(iter(results.values()))
    lines.append(_row("FP teacher", "W32A32", first["variants"]["fp"]))
    for name, report in results.items():
        lines.append(_row("naive PTQ", name.upper(), report["variants"]["ptq"]))
        lines.append(_row("EfficientDM", name.upper(), report["variants"]["qat"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/efficientdm_table", help="parent directory of the runs")
    parser.add_argument("--bits", nargs="+", default=list(BITS), choices=list(BITS))
    parser.add_argument("overrides", nargs="*", help="recipe overrides (key=value) after --")
    args = parser.parse_args(argv)

    from train.cli import main as train_main
    from train.tools.digits_teacher import machine_description

    out = Path(args.out)
    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for name in args.bits:
        w, a = BITS[name]
        start = time.time()
        run = train_main(["config=efficientdm_digits.yaml", f"output_dir={out / name}", "overwrite=true",
                          f"efficientdm.weight_bits={w}", f"efficientdm.act_bits={a}",
                          *BIT_OVERRIDES.get(name, []), *args.overrides])
        seconds[name] = round(time.time() - start, 1)
        results[name] = json.loads((run / "report.json").read_text())
    text = table(results)
    sampler = next(iter(results.values()))["sampler"]
    command = "python bench/efficientdm_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    note = (f"\n\nCommand: `{command.strip()}` on {machine_description()}; {sampler['num_samples']} class-balanced "
            f"samples per row ({sampler['scheduler']} {sampler['steps']} steps, CFG {sampler['guidance_scale']}, "
            f"eta {sampler['eta']}); run times (s): {seconds}.")
    save_table(out, text + note, {"runs": results, "seconds": seconds, "command": command})
    return results


def save_table(out: Path, markdown: str, record: dict) -> None:
    """Writes ``<out>/table.md`` and ``<out>/table.json`` and prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown + "\n")
    (out / "table.json").write_text(json.dumps(record, indent=2))
    print(markdown)


if __name__ == "__main__":
    main()
