"""Two kernel lists of ``bench/qat_step_speed.py --profile --kernels-out DIR`` side by side, by kernel group.

    python bench/kernel_diff.py docs/profiles/2026-12-06-h100/after_fp.tsv docs/profiles/2026-12-06-h100/after_w4a4.tsv

Triton kernels are named after the ops inductor fused into them, so one step's kernels rarely match the other's by
name; they are grouped here by kind (pointwise, persistent or looped reduction), by the neighbouring op they carry
(normalisation, GEGLU, attention, resampling, convolution) and by whether they carry fake-quant math (``round``).
Library kernels are grouped as in :data:`bench.qat_step_speed.KERNEL_KINDS`, with ATen's copy kernels apart. Each
row: GPU ms per step (kernels per step) in each file and the difference, largest increase first.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.qat_step_speed import KERNEL_KINDS  # noqa: E402

#: op names that say which part of the model a Triton kernel belongs to, first match first
NEIGHBOURS = ("layer_norm", "group_norm", "gelu", "scaled_dot", "index", "convolution")


def group(name: str) -> str:
    """The group of one kernel name (see the module docstring)."""
    if name.startswith("triton_"):
        kind = {"poi": "pointwise", "per": "persistent reduction", "red": "looped reduction"}.get(
            name.split("_")[1], name.split("_")[1])
        parts = [p for p in NEIGHBOURS if p in name] or ["plain"]
        return f"Triton {kind}, {'+'.join(parts)}, {'fake-quant' if 'round' in name else 'float'}"
    if "direct_copy_kernel" in name:
        return "ATen copies"
    return next((k for k, parts in KERNEL_KINDS.items() if any(p in name for p in parts)), "other")


def load(path: Path) -> dict[str, tuple[float, float]]:
    """``{group: (GPU ms / step, kernels / step)}`` of one ``--kernels-out`` file (``ms<TAB>count<TAB>name``)."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for line in path.read_text().splitlines():
        ms, count, name = line.split("\t", 2)
        row = out[group(name)]
        row[0] += float(ms)
        row[1] += float(count)
    return {k: (v[0], v[1]) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("--min-ms", type=float, default=0.05, help="leave out groups that differ by less")
    args = p.parse_args()
    for path in (args.first, args.second):
        if not path.is_file():
            p.error(f"no such file: {path} (write one with bench/qat_step_speed.py --profile --kernels-out DIR)")
    a, b = load(args.first), load(args.second)
    zero = (0.0, 0.0)
    print(f"| group | {args.first.name} ms (kernels) | {args.second.name} ms (kernels) | difference ms |\n"
          "|---|---|---|---|")
    for key in sorted(set(a) | set(b), key=lambda k: a.get(k, zero)[0] - b.get(k, zero)[0]):
        x, y = a.get(key, zero), b.get(key, zero)
        if abs(y[0] - x[0]) >= args.min_ms:
            print(f"| {key} | {x[0]:.2f} ({x[1]:.0f}) | {y[0]:.2f} ({y[1]:.0f}) | {y[0] - x[0]:+.2f} |")
    total = [sum(v[i] for v in d.values()) for d in (a, b) for i in (0, 1)]
    print(f"| all kernels | {total[0]:.2f} ({total[1]:.0f}) | {total[2]:.2f} ({total[3]:.0f}) | "
          f"{total[2] - total[0]:+.2f} |")


if __name__ == "__main__":
    main()
