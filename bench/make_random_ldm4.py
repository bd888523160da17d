"""Writes a random-weight teacher with the LDM-4 ImageNet (CompVis cin256-v2) layout in diffusers format.

    python bench/make_random_ldm4.py --output /tmp/ldm4-random
    python bench/make_random_ldm4.py --output /tmp/ldm4-bedrooms-random --layout lsun_bedrooms-ldm-vq-4

The UNet is a ``UNet2DConditionModel`` shaped like cin256-v2 (block_out_channels (192, 384, 576, 960), 2 layers per
block, cross-attention at the three lower resolutions, one head, context 512, 3x64x64 VQ-f4 latents: 400.9M
parameters), the class embedder has 1001 rows (null class 1000) and the scheduler uses LDM's "linear" betas
(0.0015..0.0195 in sqrt space = diffusers' ``scaled_linear``). For benchmarks and GPU smoke runs of the real-size
recipe without the real weights; the numbers it produces say nothing about quality.

``--layout lsun_bedrooms-ldm-vq-4`` writes the unconditional LSUN-Bedrooms LDM-4 instead, as the CompVis converter
builds it (:mod:`train.tools.convert_compvis`: a ``UNet2DModel`` with legacy attention blocks, 224 base channels,
multipliers (1, 2, 3, 4), 32-channel heads at the three lower resolutions, 274.1M parameters), its scheduler and
its VQ-f4 first stage (``vqvae/``, random), so that ``configs/binarydm_ldm4_bedrooms.yaml`` runs on it unchanged.
``--base-channels C`` narrows a converter layout's UNet to ``C`` base channels (the same blocks, attention and
multipliers; e.g. 32 instead of 224 gives 5.7M parameters), for CPU checks of the real-size recipes' structure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a clone without installing the package
    sys.path.insert(0, str(REPO))

from train.models.class_embedder import ClassEmbedder  # noqa: E402


def ldm4_unet() -> UNet2DConditionModel:
    """Random ``UNet2DConditionModel`` with the cin256-v2 layout."""
    return UNet2DConditionModel(
        sample_size=64, in_channels=3, out_channels=3, block_out_channels=(192, 384, 576, 960), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=512, attention_head_dim=1,
    )


def write_converter_layout(layout: str, out: Path, base_channels: int | None = None) -> None:
    """``unet/``, ``scheduler/`` and the first stage (``vqvae/`` or ``vae/``, where the layout has one) of a CompVis
    layout (:data:`train.tools.convert_compvis.LAYOUTS`), random weights: the directory the converter writes;
    ``base_channels``: the UNet's first-level channels (the others keep their multipliers)."""
    from train.tools.convert_compvis import LAYOUTS, teacher_spec
    from train.tools.convert_compvis_unet import build_unet
    from train.tools.convert_compvis_vae import build_vae

    spec = teacher_spec(LAYOUTS[layout])
    config = dict(spec.unet_config)
    if base_channels is not None:
        channels = config["block_out_channels"]
        config["block_out_channels"] = tuple(base_channels * c // channels[0] for c in channels)
    build_unet(config).save_pretrained(str(out / "unet"))
    DDPMScheduler(**spec.scheduler_config).save_pretrained(str(out / "scheduler"))
    if spec.vae_config is not None:
        build_vae(dict(spec.vae_config)).save_pretrained(str(out / spec.vae_subfolder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", default="cin256-v2", choices=["cin256-v2", "lsun_bedrooms-ldm-vq-4"])
    parser.add_argument("--base-channels", type=int, default=None,
                        help="converter layouts: first-level UNet channels (a multiple of the attention head size)")
    args = parser.parse_args()
    out = Path(args.output)
    torch.manual_seed(args.seed)
    if args.layout != "cin256-v2":
        write_converter_layout(args.layout, out, args.base_channels)
        print(f"wrote {out}")
        return
    ldm4_unet().save_pretrained(str(out / "unet"))
    ClassEmbedder(num_classes=1000, embed_dim=512).save_pretrained(str(out / "class_embedder"))
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                  steps_offset=1, clip_sample=False).save_pretrained(str(out / "scheduler"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
