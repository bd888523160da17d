"""Writes a random-weight teacher with the LDM-4 ImageNet (CompVis cin256-v2) layout in diffusers format.

    python bench/make_random_ldm4.py --output /tmp/ldm4-random

The UNet is a ``UNet2DConditionModel`` shaped like cin256-v2 (block_out_channels (192, 384, 576, 960), 2 layers per
block, cross-attention at the three lower resolutions, one head, context 512, 3x64x64 VQ-f4 latents: 400.9M
parameters), the class embedder has 1001 rows (null class 1000) and the scheduler uses LDM's "linear" betas
(0.0015..0.0195 in sqrt space = diffusers' ``scaled_linear``). For benchmarks and GPU smoke runs of the real-size
recipe without the real weights; the numbers it produces say nothing about quality.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from train.models.class_embedder import ClassEmbedder


def ldm4_unet() -> UNet2DConditionModel:
    """Random ``UNet2DConditionModel`` with the cin256-v2 layout."""
    return UNet2DConditionModel(
        sample_size=64, in_channels=3, out_channels=3, block_out_channels=(192, 384, 576, 960), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=512, attention_head_dim=1,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.output)
    torch.manual_seed(args.seed)
    ldm4_unet().save_pretrained(str(out / "unet"))
    ClassEmbedder(num_classes=1000, embed_dim=512).save_pretrained(str(out / "class_embedder"))
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                  steps_offset=1, clip_sample=False).save_pretrained(str(out / "scheduler"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
