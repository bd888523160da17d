"""A random-weight video teacher at published size, in the diffusers layout the video recipes load.

    python bench/make_random_video.py --family wan --out /tmp/wan13       # Wan 2.1 T2V 1.3B (1419.0M)
    python bench/make_random_video.py --family cogvideox --out /tmp/cog2b  # CogVideoX-2B (1693.8M)
    python bench/make_random_video.py --family wan --out /tmp/w --tiny     # the script itself, on a CPU

Writes ``transformer/`` (the published config of :data:`bench.family_throughput.SPECS`, random weights, bf16),
``scheduler/`` (the recipe's) and ``prompt_embeds.safetensors``: ``--prompts`` random text states of the real
length and width (the text encoder is replaced by its output, ``teacher.conditioning=prompt_embeds``) and a zero
negative prompt. Train on it with the recipe and

    teacher.path=<out> teacher.conditioning=prompt_embeds teacher.prompt_embeds_path=<out>/prompt_embeds.safetensors

Nothing is downloaded; seed 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import diffusers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bench.family_throughput import SPECS, VIDEO  # noqa: E402


def make(family: str, out: Path, tiny: bool = False, prompts: int = 4, device: str = "cpu") -> Path:
    """Writes the teacher folder of ``family`` to ``out`` and returns ``out``."""
    spec = SPECS[family]
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(diffusers, spec.cls)(**(spec.tiny if tiny else spec.real))
    model.to(torch.float32 if tiny else torch.bfloat16).save_pretrained(str(out / "transformer"))
    name, config = spec.scheduler
    getattr(diffusers, name)(**config).save_pretrained(str(out / "scheduler"))
    tokens, width = spec.tiny_text if tiny else spec.text
    gen = torch.Generator().manual_seed(0)
    save_file({"prompt_embeds": torch.randn(prompts, tokens, width, generator=gen),
               "negative_prompt_embeds": torch.zeros(1, tokens, width)}, str(out / "prompt_embeds.safetensors"))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=sorted(VIDEO), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="the tiny test config (checks the script on a CPU)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    out = make(args.family, args.out, args.tiny, args.prompts, args.device)
    print(f"{SPECS[args.family].label}: written to {out}")


if __name__ == "__main__":
    main()
