"""One fake quantizer, eager against compiled kernels (``compiled=True``), forward and backward.

    python bench/fake_quant_kernels.py                    # CUDA if present, else CPU
    python bench/fake_quant_kernels.py --device cpu --dtype float32

Times :func:`qat.ste.fake_quantize_forward` and :func:`qat.ste.fake_quantize_backward` (the math every fused
quantizer and fused layer runs) on activation-shaped tensors, W4 per-tensor (LSQ step and zero point), median of
``--steps`` calls after warm-up; prints the speed-up and the largest differences between the two paths.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qat import ste  # noqa: E402


def timed(fn: Callable[[], object], steps: int, cuda: bool) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


NEEDS = (True, True, False, False)  # dL/dx and dL/ds, as an activation quantizer with a fixed zero point


def one_path(x: torch.Tensor, g: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, steps: int,
             cuda: bool, compiled: bool) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Forward ms, backward ms, forward output and step gradient, eager or with compiled kernels."""
    fwd = timed(lambda: ste.fake_quantize_forward(x, step, zero, 0, 15, compiled), steps, cuda)
    bwd = timed(lambda: ste.fake_quantize_backward(g, x, step, zero, None, 0, 15, NEEDS, compiled), steps, cuda)
    out = ste.fake_quantize_forward(x, step, zero, 0, 15, compiled)
    return fwd, bwd, out, ste.fake_quantize_backward(g, x, step, zero, None, 0, 15, NEEDS, compiled)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--shapes", default="8x192x32x32,32x192x64x64,32x960x8x8",
                    help="comma-separated activation shapes")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    device, dtype, cuda = torch.device(args.device), getattr(torch, args.dtype), args.device.startswith("cuda")
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"# {name}, torch {torch.__version__}, {args.dtype}, W4 per-tensor, median of {args.steps}\n"
          f"# {' '.join(sys.argv)}")
    print("| shape | fwd eager ms | fwd compiled ms | bwd eager ms | bwd compiled ms | fwd diff | step-grad rel diff |"
          "\n|---|---|---|---|---|---|---|")
    step = torch.tensor([0.05], device=device)
    zero = torch.tensor([3.0], device=device)
    for spec in args.shapes.split(","):
        shape = tuple(int(v) for v in spec.split("x"))
        x = torch.randn(shape, device=device, dtype=dtype)
        g = torch.randn(shape, device=device, dtype=dtype)
        results = {}
        for compiled in (False, True):
            results[compiled] = one_path(x, g, step, zero, args.steps, cuda, compiled)
        (fe, be, oe, se), (fc, bc, oc, sc) = results[False], results[True]
        fdiff = (oe.float() - oc.float()).abs().max().item()
        sdiff = ((se - sc).abs() / se.abs().clamp_min(1e-12)).max().item()
        print(f"| {spec} | {fe:.3f} | {fc:.3f} | {be:.3f} | {bc:.3f} | {fdiff:.3g} | {sdiff:.2g} |", flush=True)


if __name__ == "__main__":
    main()
