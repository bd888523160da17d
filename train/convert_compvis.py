"""Converts CompVis latent-diffusion checkpoints (``openaimodel.UNetModel`` + SpatialTransformer) into teacher
directories in the diffusers layout that :func:`train.teacher.load_teacher` reads.

    python -m train.convert_compvis cin256-v2.safetensors teachers/ldm4-cin256 --layout cin256-v2

The CompVis UNet numbers its blocks sequentially (``input_blocks.N``, ``middle_block.N``, ``output_blocks.N``) while
diffusers nests them (``down_blocks.i.resnets.j``, ``down_blocks.i.attentions.j``, ...). The key map is derived from
the diffusers ``UNet2DConditionModel`` config (channels, depth, which levels have attention), so any UNet of the same
family (LDM-4 ImageNet, LDM-8, smaller test models) converts without a hand-written table.

Checkpoints are read with ``safetensors`` or, for ``.ckpt``, with ``torch.load(weights_only=True)`` only: pickles
that need arbitrary code are refused, never executed.

Output directory::

    <out>/unet/             UNet2DConditionModel (save_pretrained)
    <out>/class_embedder/   train.models.ClassEmbedder from cond_stage_model.embedding.weight (null class = last row)
    <out>/scheduler/        DDPMScheduler with LDM's "linear" betas (= diffusers "scaled_linear")
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from torch import Tensor, nn

from train.models import ClassEmbedder

__all__ = [
    "CIN256_V2_UNET_CONFIG",
    "LAYOUTS",
    "SCHEDULER_CONFIG",
    "compvis_to_diffusers_unet_keys",
    "convert_checkpoint",
    "convert_unet_state_dict",
    "diffusers_to_compvis_unet_keys",
    "load_compvis_state_dict",
    "main",
]

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
CLASS_EMBEDDING_KEY = "cond_stage_model.embedding.weight"

# cin256-v2 (LDM-4 ImageNet): model_channels 192, channel_mult (1, 2, 3, 5), 2 res blocks, attention at
# resolutions 8/4/2 of the 64x64 latent = the three lower levels, one head whose dim is the channel count, context 512.
CIN256_V2_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64, "in_channels": 3, "out_channels": 3, "block_out_channels": (192, 384, 576, 960),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 512, "attention_head_dim": 1,
}
LAYOUTS: dict[str, dict[str, Any]] = {"cin256-v2": CIN256_V2_UNET_CONFIG}

# LDM's "linear" schedule is linear in sqrt(beta), which diffusers calls "scaled_linear".
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0195, "beta_schedule": "scaled_linear",
    "steps_offset": 1, "clip_sample": False,
}

# Config options that add modules (or change their names) which the CompVis UNet has no counterpart for.
_UNSUPPORTED: dict[str, Any] = {
    "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None, "time_cond_proj_dim": None,
    "dual_cross_attention": False, "only_cross_attention": False, "time_embedding_type": "positional",
    "attention_type": "default", "reverse_transformer_layers_per_block": None, "time_embedding_dim": None,
    "timestep_post_act": None, "mid_block_type": "UNetMidBlock2DCrossAttn",
}


# --------------------------------------------------------------------------------------------------------- key maps
def _cfg(config: Any) -> dict[str, Any]:
    """Plain dict of a diffusers config (FrozenDict, model.config or dict)."""
    return dict(config.items()) if hasattr(config, "items") else dict(vars(config))


def _check_supported(cfg: Mapping[str, Any]) -> None:
    for key, supported in _UNSUPPORTED.items():
        value = cfg.get(key, supported)
        if isinstance(value, (list, tuple)) and key == "only_cross_attention":
            value = any(value)
        if value != supported:
            raise ValueError(f"UNet config {key}={value!r} has no CompVis counterpart; the converter supports only "
                             f"{key}={supported!r} (CompVis openaimodel.UNetModel with SpatialTransformer)")


def _module_params(bias: bool = True) -> tuple[str, ...]:
    # GroupNorm/LayerNorm/Conv/Linear all store weight (+ bias); q/k/v projections of both codebases have no bias.
    return ("weight", "bias") if bias else ("weight",)


def _resnet(out: dict[str, str], src: str, dst: str, shortcut: bool) -> None:
    """ResBlock ``src`` (CompVis) -> ResnetBlock2D ``dst`` (diffusers), module prefixes."""
    names = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
             ("out_layers.0", "norm2"), ("out_layers.3", "conv2")]
    if shortcut:  # a 1x1 conv only where the channel count changes
        names.append(("skip_connection", "conv_shortcut"))
    for a, b in names:
        for p in _module_params():
            out[f"{src}.{a}.{p}"] = f"{dst}.{b}.{p}"


def _transformer(out: dict[str, str], src: str, dst: str, depth: int) -> None:
    """SpatialTransformer ``src`` -> Transformer2DModel ``dst``; the inner names are identical in both."""
    for name in ("norm", "proj_in", "proj_out"):
        for p in _module_params():
            out[f"{src}.{name}.{p}"] = f"{dst}.{name}.{p}"
    for d in range(depth):
        block = f"transformer_blocks.{d}"
        names = [("norm1", True), ("norm2", True), ("norm3", True), ("ff.net.0.proj", True), ("ff.net.2", True)]
        for attn in ("attn1", "attn2"):
            names += [(f"{attn}.to_q", False), (f"{attn}.to_k", False), (f"{attn}.to_v", False),
                      (f"{attn}.to_out.0", True)]
        for name, bias in names:
            for p in _module_params(bias):
                out[f"{src}.{block}.{name}.{p}"] = f"{dst}.{block}.{name}.{p}"


def _conv(out: dict[str, str], src: str, dst: str) -> None:
    for p in ("weight", "bias"):
        out[f"{src}.{p}"] = f"{dst}.{p}"


def compvis_to_diffusers_unet_keys(config: Mapping[str, Any] | Any) -> dict[str, str]:
    """CompVis UNet key -> diffusers ``UNet2DConditionModel`` key, for every parameter of the model ``config``.

    Keys are without the ``model.diffusion_model.`` prefix. Derived from ``block_out_channels``,
    ``layers_per_block``, the block types (which levels have attention) and ``transformer_layers_per_block``.

    Raises:
        ValueError: the config uses a diffusers feature without a CompVis counterpart.
    """
    cfg = _cfg(config)
    _check_supported(cfg)
    channels = list(cfg["block_out_channels"])
    levels = len(channels)
    layers = cfg["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"layers_per_block={layers!r}: only one int for all levels is supported")
    depth = cfg.get("transformer_layers_per_block", 1)
    depths = [depth] * levels if isinstance(depth, int) else list(depth)
    down_attn = ["CrossAttn" in t for t in cfg["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]

    out: dict[str, str] = {}
    for a, b in (("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
                 ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out")):
        _conv(out, a, b)
    if cfg.get("num_class_embeds"):
        out["label_emb.weight"] = "class_embedding.weight"

    # Encoder: input_blocks.1.. hold [res, (transformer)] per layer, then a block with only the downsampler.
    n = 1
    skip_channels = [channels[0]]  # channels of every input block output, consumed by the decoder's concats
    ch = channels[0]
    for i, c in enumerate(channels):
        for j in range(layers):
            _resnet(out, f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", shortcut=ch != c)
            if down_attn[i]:
                _transformer(out, f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}", depths[i])
            ch = c
            skip_channels.append(ch)
            n += 1
        if i != levels - 1:
            _conv(out, f"input_blocks.{n}.0.op", f"down_blocks.{i}.downsamplers.0.conv")
            skip_channels.append(ch)
            n += 1

    _resnet(out, "middle_block.0", "mid_block.resnets.0", shortcut=False)
    _transformer(out, "middle_block.1", "mid_block.attentions.0", depths[-1])
    _resnet(out, "middle_block.2", "mid_block.resnets.1", shortcut=False)

    # Decoder: up block u is level levels-1-u; each of its layers_per_block + 1 res blocks concatenates one skip.
    n = 0
    rev_depths = depths[::-1]
    for u in range(levels):
        c = channels[levels - 1 - u]
        for j in range(layers + 1):
            in_ch = ch + skip_channels.pop()
            _resnet(out, f"output_blocks.{n}.0", f"up_blocks.{u}.resnets.{j}", shortcut=in_ch != c)
            sub = 1
            if up_attn[u]:
                _transformer(out, f"output_blocks.{n}.1", f"up_blocks.{u}.attentions.{j}", rev_depths[u])
                sub = 2
            if j == layers and u != levels - 1:  # the upsampler follows the transformer inside the same block
                _conv(out, f"output_blocks.{n}.{sub}.conv", f"up_blocks.{u}.upsamplers.0.conv")
            ch = c
            n += 1
    return out


def diffusers_to_compvis_unet_keys(config: Mapping[str, Any] | Any) -> dict[str, str]:
    """Inverse of :func:`compvis_to_diffusers_unet_keys`: diffusers key -> CompVis key (no prefix)."""
    return {v: k for k, v in compvis_to_diffusers_unet_keys(config).items()}


# ------------------------------------------------------------------------------------------------- state dicts
def _fit(value: Tensor, shape: torch.Size) -> Tensor | None:
    """``value`` in ``shape`` when the two differ only by trailing singleton dims (1x1 conv <-> linear), else None."""
    if value.shape == shape:
        return value
    if value.numel() != shape.numel():
        return None
    a, b = list(value.shape), list(shape)
    while a and a[-1] == 1 and len(a) > len(b):
        a.pop()
    while b and b[-1] == 1 and len(b) > len(a):
        b.pop()
    return value.reshape(shape) if a == b else None


def _listing(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def convert_unet_state_dict(sd: Mapping[str, Tensor], unet: nn.Module,
                            source: str = "state dict") -> dict[str, Tensor]:
    """Renames (and reshapes 1x1 conv <-> linear where the layouts differ) a CompVis UNet state dict for ``unet``.

    Args:
        sd: CompVis UNet tensors, keys with or without the ``model.diffusion_model.`` prefix.
        unet: the target ``UNet2DConditionModel``; its config drives the key map, its tensors the expected shapes.
        source: name of the file the tensors came from, for error messages.

    Returns:
        A state dict that ``unet.load_state_dict(..., strict=True)`` accepts.

    Raises:
        ValueError: unknown CompVis keys, diffusers keys left without a value, or shape mismatches; each listed by
            name (first few and the count) with a hint on the likely config mismatch.
    """
    mapping = compvis_to_diffusers_unet_keys(unet.config)
    expected = unet.state_dict()
    plain = {k.removeprefix(UNET_PREFIX): v for k, v in sd.items()}
    converted: dict[str, Tensor] = {}
    unknown: list[str] = []
    bad_shape: list[str] = []
    for key, value in plain.items():
        target = mapping.get(key)
        if target is None or target not in expected:
            unknown.append(key)
            continue
        fitted = _fit(value, expected[target].shape)
        if fitted is None:
            bad_shape.append(f"{key} -> {target}: checkpoint {tuple(value.shape)} vs model "
                             f"{tuple(expected[target].shape)}")
            continue
        converted[target] = fitted.to(expected[target].dtype)
    supplied = {mapping[k] for k in plain if k in mapping}  # wrong-shaped keys are reported once, not as missing
    missing = [k for k in expected if k not in supplied]
    problems = []
    if unknown:
        problems.append(f"unknown CompVis keys {_listing(unknown)}")
    if missing:
        problems.append(f"diffusers keys without a value in the checkpoint {_listing(missing)}")
    if bad_shape:
        problems.append(f"shape mismatches {_listing(bad_shape, 4)}")
    if problems:
        raise ValueError(f"{source}: the CompVis UNet does not match the diffusers config "
                         f"(block_out_channels={tuple(unet.config.block_out_channels)}, "
                         f"layers_per_block={unet.config.layers_per_block}, "
                         f"down_block_types={tuple(unet.config.down_block_types)}): " + "; ".join(problems)
                         + ". Pass the UNet config matching the checkpoint (--layout / --unet-config).")
    return converted


# ---------------------------------------------------------------------------------------------------- checkpoints
def load_compvis_state_dict(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a CompVis checkpoint (``.safetensors``, or ``.ckpt``/``.pt``/``.pth`` holding plain tensors).

    ``.ckpt`` files are opened with ``torch.load(weights_only=True)``: a pickle that needs anything beyond tensors and
    containers is refused (never executed). Non-tensor entries of ``state_dict`` are dropped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the pickle is not loadable safely, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        raise ValueError(
            f"{path}: refused to unpickle: the file holds objects other than tensors ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Loading it would execute arbitrary code. On a trusted "
            "machine, convert it to safetensors, e.g. safetensors.torch.save_file({k: v.contiguous() for k, v in "
            "torch.load(path, weights_only=False)['state_dict'].items() if isinstance(v, torch.Tensor)}, "
            "'model.safetensors'), and pass the .safetensors file instead."
        ) from err
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a dict with a 'state_dict' entry (CompVis checkpoint), got "
                         f"{type(obj).__name__}")
    tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"{path}: 'state_dict' holds no tensors")
    return tensors


def _split(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor | None, list[str]]:
    """(unet tensors without prefix, first-stage tensors without prefix, class table or None, other keys)."""
    unet, first, other = {}, {}, []
    for k, v in sd.items():
        if k.startswith(UNET_PREFIX):
            unet[k[len(UNET_PREFIX):]] = v
        elif k.startswith(FIRST_STAGE_PREFIX):
            first[k[len(FIRST_STAGE_PREFIX):]] = v
        elif k != CLASS_EMBEDDING_KEY:
            other.append(k)
    return unet, first, sd.get(CLASS_EMBEDDING_KEY), other


def _check_betas(betas: Tensor, scheduler: DDPMScheduler, source: str) -> None:
    # The CompVis checkpoint stores its schedule; a mismatch would silently change every denoising step.
    ours = scheduler.betas.to(torch.float64)
    theirs = betas.to(torch.float64).flatten()
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-4, atol=1e-7):
        raise ValueError(
            f"{source}: key 'betas' ({theirs.numel()} steps, {theirs[0].item():.6g}..{theirs[-1].item():.6g}) does "
            f"not match the scheduler ({ours.numel()} steps, {ours[0].item():.6g}..{ours[-1].item():.6g}); pass "
            "scheduler_config overrides (num_train_timesteps / beta_start / beta_end / beta_schedule) that match")


def convert_checkpoint(checkpoint_path: str | Path, out_dir: str | Path, unet_config: dict[str, Any] | None = None,
                       scheduler_config: dict[str, Any] | None = None) -> Path:
    """Writes a DiffQAT teacher directory (``unet/``, ``scheduler/``, ``class_embedder/``) from a CompVis checkpoint.

    Args:
        checkpoint_path: ``.safetensors`` or ``.ckpt`` with ``model.diffusion_model.*`` (and, for class-conditional
            models, ``cond_stage_model.embedding.weight`` of shape ``(num_classes + 1, context_dim)``).
        out_dir: directory to create or fill.
        unet_config: ``UNet2DConditionModel`` kwargs matching the checkpoint; default cin256-v2.
        scheduler_config: overrides of :data:`SCHEDULER_CONFIG`.

    Returns:
        ``out_dir`` as a Path (use it as ``teacher.path``; conditioning ``class`` when a class embedder was written,
        else ``none``).

    Raises:
        ValueError: missing UNet weights, key/shape mismatches, a class table that does not fit the UNet, betas that
            do not match the scheduler, or an unsafe pickle; messages name the file and key.
    """
    path = Path(checkpoint_path)
    out = Path(out_dir)
    sd = load_compvis_state_dict(path)
    unet_sd, first_stage, class_table, other = _split(sd)
    if not unet_sd:
        raise ValueError(f"{path}: no '{UNET_PREFIX}*' keys; is this a CompVis LatentDiffusion checkpoint? "
                         f"first keys: {list(sd)[:5]}")
    unet = UNet2DConditionModel(**(unet_config or CIN256_V2_UNET_CONFIG))
    unet.load_state_dict(convert_unet_state_dict(unet_sd, unet, source=str(path)), strict=True)

    scheduler = DDPMScheduler(**{**SCHEDULER_CONFIG, **(scheduler_config or {})})
    if "betas" in sd:
        _check_betas(sd["betas"], scheduler, str(path))

    if class_table is not None:
        if class_table.ndim != 2 or class_table.shape[0] < 2:
            raise ValueError(f"{path}: {CLASS_EMBEDDING_KEY} has shape {tuple(class_table.shape)}; expected "
                             "(num_classes + 1, context_dim) with the null class as last row")
        if class_table.shape[1] != unet.config.cross_attention_dim:
            raise ValueError(f"{path}: {CLASS_EMBEDDING_KEY} has width {class_table.shape[1]} but the UNet's "
                             f"cross_attention_dim is {unet.config.cross_attention_dim}; fix the UNet config")
    if first_stage:
        # TODO(issue 7): VQ-f4 first stage -> diffusers VQModel; until then the decoder must be supplied separately.
        log.warning("%s: %d first_stage_model.* tensors not converted (VQModel conversion not implemented); "
                    "teacher.vae_subfolder must stay unset or point to a separately converted VQModel", path,
                    len(first_stage))
    if other:
        log.info("%s: ignored %d keys outside the UNet / class embedder (e.g. %s)", path, len(other), other[:3])

    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(out / "unet"))
    scheduler.save_pretrained(str(out / "scheduler"))
    if class_table is not None:
        embedder = ClassEmbedder(num_classes=class_table.shape[0] - 1, embed_dim=class_table.shape[1])
        embedder.embedding.weight.data.copy_(class_table)
        embedder.save_pretrained(str(out / "class_embedder"))
    return out


# ------------------------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.convert_compvis CHECKPOINT OUT_DIR [--layout cin256-v2 | --unet-config config.json]``."""
    parser = argparse.ArgumentParser(description="Convert a CompVis latent-diffusion checkpoint into a DiffQAT "
                                                 "teacher directory (diffusers layout).")
    parser.add_argument("checkpoint", help=".safetensors (preferred) or .ckpt holding only tensors")
    parser.add_argument("out_dir")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="cin256-v2",
                        help="named UNet2DConditionModel config of the checkpoint")
    parser.add_argument("--unet-config", help="JSON file of UNet2DConditionModel kwargs (overrides --layout)")
    args = parser.parse_args(argv)
    unet_config = LAYOUTS[args.layout]
    if args.unet_config:
        unet_config = {k: v for k, v in json.loads(Path(args.unet_config).read_text()).items()
                       if not k.startswith("_")}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = convert_checkpoint(args.checkpoint, args.out_dir, unet_config=unet_config)
    print(f"wrote {out} (unet/, scheduler/{', class_embedder/' if (out / 'class_embedder').exists() else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
