"""Samples of an export on every runtime backend against the fake path's, from the same seeds.

    python bench/backend_samples.py runs/efficientdm_digits/export
    python bench/backend_samples.py runs/efficientdm_digits/export --evaluated /tmp/eval  # + checks <dir>/<backend>

Draws the evaluation samples of ``evaluate.py <export>`` (``eval.num_samples`` samples, sample ``i`` from seed
``eval.seed + i`` with label ``i mod classes``, the run's sampler, steps, CFG and eta) with
``train.models.export_pipeline.load_export_pipeline`` on ``fake``, ``int8``, ``fp8`` and ``int4wo``, and prints, per
backend, the PSNR (dB, on ``[-1, 1]`` clamped, as ``psnr_vs_fp`` of the report) and the largest absolute difference
against the ``fake`` samples. With ``--evaluated DIR`` it also checks that the samples are, as 8-bit images, the ones
``evaluate.py <export> eval.backend=<backend> out=DIR/<backend>`` saved (``samples/qat.npz``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from train.config import load_config
from train.eval.metrics import psnr
from train.models.export_pipeline import load_export_pipeline
from train.models.pipeline import sample_seeds, to_uint8_nhwc

BACKENDS = ("fake", "int8", "fp8", "int4wo")


def backend_samples(export: Path, backend: str) -> tuple[torch.Tensor, dict[str, int]]:
    """``(eval.num_samples, C, H, W)`` float samples of the export on ``backend`` and its layer counts."""
    cfg = load_config([f"config={export / 'run_config.yaml'}"])
    ev = cfg.eval
    guidance = cfg.trajectories.guidance_scale if ev.guidance_scale is None else ev.guidance_scale
    pipe = load_export_pipeline(export, backend)
    pipe.set_progress_bar_config(disable=True)
    c, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    out = []
    for start in range(0, ev.num_samples, ev.batch_size):
        idx = list(range(start, min(start + ev.batch_size, ev.num_samples)))
        labels, noise, gens = sample_seeds(idx, pipe.class_embedder.null_label, ev.seed, (c, size, size))
        out.append(pipe(noise, labels, num_inference_steps=ev.sampling_steps, guidance_scale=guidance, eta=ev.eta,
                        generator=gens).images.float().cpu())
    return torch.cat(out), pipe.unet.runtime_report.counts()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, help="an export of train.py / export.py (class-conditional)")
    parser.add_argument("--evaluated", type=Path, help="out= parent of evaluate.py runs, one <backend>/ each")
    args = parser.parse_args()
    samples = {}
    for backend in BACKENDS:
        samples[backend], counts = backend_samples(args.export, backend)
        line = f"{backend}: quantized modules {counts}"
        if args.evaluated is not None:
            with np.load(args.evaluated / backend / "samples" / "qat.npz") as data:
                same = bool(np.array_equal(data["arr_0"], to_uint8_nhwc(samples[backend])))
            line += f"; 8-bit samples equal to evaluate.py's: {same}"
        print(line, flush=True)
    ref = samples["fake"].clamp(-1, 1)
    rows = {b: {"psnr_vs_fake": psnr(s.clamp(-1, 1), ref, data_range=2.0),
                "max_abs_vs_fake": float((s.clamp(-1, 1) - ref).abs().max())} for b, s in samples.items()}
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
