"""Samples of a real-size exported student through every runtime backend, against the fake-quant reload.

    python bench/runtime_fidelity.py                                  # LDM-4 layout, 2 samples, DDIM 20 steps
    python bench/runtime_fidelity.py --model dit --samples 4 --steps 10
    python bench/runtime_fidelity.py --tiny                           # tiny configs: checks the script

The float model is built with random weights as in ``bench/runtime_speed.py`` (DiT-XL/2, the SD 1.5 UNet or the
LDM-4 ImageNet layout; nothing is downloaded), its EfficientDM W8A8 student (W4A8 for ``int4wo``) is min-max
calibrated on one random batch and exported, and each backend's reload samples ``--samples`` latents with DDIM
(eta 0, ``--steps`` steps, the temporal activation rows set from each call's timestep) from the same noise and
conditioning, in float32. Printed per backend: the relative L2 distance and the PSNR of its final latents against
the ``fake`` reload's (peak = the fake latents' max - min), the largest absolute difference, the quantized modules
per backend, and the wall time. ``int4wo`` is compared with the W4A8 export's own ``fake`` reload (its activations
are not quantized, so it is not expected to match). Random weights: the samples are no images, and FD-style
metrics would say nothing; the numbers say how far the kernels' rounding moves a sampling run of a real-size model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from runtime_speed import build_float, call, export_student, make_inputs  # noqa: E402

import qat  # noqa: E402
from qat.runtime import load_for_inference  # noqa: E402


@torch.no_grad()
def sample(model: torch.nn.Module, name: str, inputs: tuple, steps: int) -> torch.Tensor:
    """DDIM (eta 0) from ``inputs``' latents, conditioning kept; ``call`` sets the temporal rows per step."""
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                              clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(steps)
    x, _, cond = inputs
    for t in scheduler.timesteps:
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        eps = call(model, name, (x, tt, cond))
        if eps.shape[1] != x.shape[1]:  # DiT predicts eps and the variance: keep eps
            eps = eps[:, : x.shape[1]]
        x = scheduler.step(eps, t, x).prev_sample
    return x.float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ldm4", choices=["dit", "sd15", "ldm4"])
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backends", default="int8,fp8,int4wo")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", help="JSON lines file the rows are appended to")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fp32, family = build_float(args.model, args.tiny)
    fp32.to(device)
    tmp = Path(tempfile.mkdtemp(prefix="diffqat-fidelity-"))
    backends = args.backends.split(",")
    start = time.perf_counter()
    exports = {"w8a8": export_student(fp32, family, args.model, 8, 8, device, tmp / "w8a8")}
    if "int4wo" in backends:
        exports["w4a8"] = export_student(fp32, family, args.model, 4, 8, device, tmp / "w4a8")
    print(f"exports built in {time.perf_counter() - start:.1f} s", flush=True)
    inputs = make_inputs(fp32, args.model, args.samples, device, torch.float32, seed=11)
    del fp32
    reference: dict[str, torch.Tensor] = {}
    for key, path in exports.items():
        start = time.perf_counter()
        reference[key] = sample(qat.load_quantized(path, device), args.model, inputs, args.steps)
        print(f"fake ({key}): {time.perf_counter() - start:.1f} s", flush=True)
    for backend in backends:
        key = "w4a8" if backend == "int4wo" else "w8a8"
        model = load_for_inference(exports[key], backend, device)
        start = time.perf_counter()
        y = sample(model, args.model, inputs, args.steps)
        wall = time.perf_counter() - start
        ref = reference[key]
        rel = float((y - ref).norm() / ref.norm())
        peak = float(ref.max() - ref.min())
        mse = float((y - ref).pow(2).mean())
        psnr = math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
        row = {"model": args.model, "backend": backend, "export": key, "samples": args.samples, "steps": args.steps,
               "rel_l2_vs_fake": rel, "psnr_vs_fake_db": psnr, "max_abs_vs_fake": float((y - ref).abs().max()),
               "counts": model.runtime_report.counts(), "wall_s": wall, "device": str(device),
               "torch": torch.__version__, "date": datetime.date.today().isoformat()}
        print(f"{backend:7s} vs fake {key}: rel L2 {rel:.3e}  PSNR {psnr:.2f} dB  max abs {row['max_abs_vs_fake']:.3g}"
              f"  modules {row['counts']}  {wall:.1f} s", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
