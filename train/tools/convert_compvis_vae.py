"""CompVis / taming first stages (``first_stage_model.*``) <-> diffusers ``VQModel`` (VQ-f4 of LDM-4 ImageNet and
LSUN bedrooms) and ``AutoencoderKL`` (KL-f8 of LSUN churches LDM-8), key maps built from the autoencoder config.

CompVis layout (``ldm.modules.diffusionmodules.model.Encoder`` / ``Decoder``), per level ``i`` of ``ch_mult``::

    encoder.conv_in, encoder.down.{i}.block.{j} (ResnetBlock: norm1, conv1, norm2, conv2, nin_shortcut),
    encoder.down.{i}.attn.{j} (AttnBlock: norm, q, k, v, proj_out as 1x1 Conv2d), encoder.down.{i}.downsample.conv,
    encoder.mid.{block_1, attn_1, block_2}, encoder.norm_out, encoder.conv_out,
    decoder.conv_in, decoder.mid.*, decoder.up.{i}.block.{j}, decoder.up.{i}.attn.{j}, decoder.up.{i}.upsample.conv,
    decoder.norm_out, decoder.conv_out, quant_conv, post_quant_conv, quantize.embedding (VQ only)

The decoder's ``up`` list is indexed by level (``up.0`` is the full-resolution level, built last and prepended), so
diffusers' ``decoder.up_blocks.{u}`` (run first to last, lowest resolution first) is CompVis ``decoder.up.{L-1-u}``.
Attention projections are 1x1 convs in CompVis and ``Linear`` layers (``to_q``, ``to_k``, ``to_v``, ``to_out.0``)
in diffusers; ``AttnBlock`` is single-head with scale ``C^-1/2``, which is diffusers' ``Attention`` with
``attention_head_dim = C`` (what ``Encoder`` / ``Decoder`` build).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers import AutoencoderKL, VQModel
from torch import Tensor, nn

from train.tools.convert_compvis_unet import KeyMap, map_pair, plain_config, remap_state_dict, remap_to_compvis

__all__ = [
    "build_vae",
    "compvis_first_stage_config",
    "compvis_to_diffusers_vae_keys",
    "convert_vae_state_dict",
    "diffusers_to_compvis_vae_keys",
    "vae_class_name",
    "vae_state_dict_to_compvis",
]

_VAE_CLASSES = {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}
_REQUIRED: dict[str, Any] = {"act_fn": "silu", "norm_type": "group", "mid_block_add_attention": True,
                             "use_quant_conv": True, "use_post_quant_conv": True, "lookup_from_codebook": False}
_DOWN_TYPES = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
_UP_TYPES = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")


def vae_class_name(config: Mapping[str, Any] | Any) -> str:
    """``VQModel`` or ``AutoencoderKL``: the model's class, ``_class_name``, or a codebook size in the config."""
    if isinstance(config, (VQModel, AutoencoderKL)):
        return type(config).__name__
    cfg = plain_config(config)
    name = cfg.get("_class_name") or ("VQModel" if "num_vq_embeddings" in cfg else "AutoencoderKL")
    if name not in _VAE_CLASSES:
        raise ValueError(f"_class_name={name!r}: the CompVis first stage converts to one of {sorted(_VAE_CLASSES)}")
    return name


def build_vae(config: Mapping[str, Any]) -> VQModel | AutoencoderKL:
    """The diffusers autoencoder of ``config`` (kwargs, optionally with ``_class_name``; other ``_*`` ignored)."""
    kwargs = {k: v for k, v in plain_config(config).items() if not k.startswith("_")}
    return _VAE_CLASSES[vae_class_name(config)](**kwargs)


def compvis_first_stage_config(ddconfig: Mapping[str, Any], embed_dim: int, n_embed: int | None = None,
                               scaling_factor: float = 1.0) -> dict[str, Any]:
    """diffusers kwargs (plus ``_class_name``) of a CompVis first stage.

    Args:
        ddconfig: the ``first_stage_config.params.ddconfig`` of a CompVis yaml (``ch``, ``ch_mult``,
            ``num_res_blocks``, ``attn_resolutions``, ``z_channels``, ``double_z``, ``resolution``,
            ``in_channels``, ``out_ch``).
        embed_dim: ``first_stage_config.params.embed_dim`` (latent channels after ``quant_conv``).
        n_embed: codebook size of a ``VQModel(Interface)``; None for ``AutoencoderKL``.
        scaling_factor: the LDM's ``scale_factor`` (latents are divided by it before decoding).

    Raises:
        ValueError: an option without a diffusers counterpart (linear attention, ``tanh_out``, KL with
            ``embed_dim != z_channels``, ...).
    """
    dd = dict(ddconfig)
    for key, value in (("resamp_with_conv", True), ("attn_type", "vanilla"), ("use_linear_attn", False),
                       ("tanh_out", False), ("give_pre_end", False)):
        if dd.get(key, value) != value:
            raise ValueError(f"CompVis first stage ddconfig {key}={dd[key]!r} is not supported (only {value!r})")
    z, double_z = int(dd["z_channels"]), bool(dd.get("double_z", True))
    if n_embed is not None and double_z:
        raise ValueError("CompVis VQ first stage with double_z=True: a VQModel encoder outputs z_channels")
    if n_embed is None and not double_z:
        raise ValueError("CompVis KL first stage with double_z=False: AutoencoderKL needs mean and log-variance")
    if n_embed is None and int(embed_dim) != z:
        raise ValueError(f"CompVis KL first stage embed_dim={embed_dim} != z_channels={z}: diffusers' AutoencoderKL "
                         "ties quant_conv / post_quant_conv to latent_channels")
    ch, mult = int(dd["ch"]), [int(m) for m in dd["ch_mult"]]
    res = int(dd["resolution"])
    attn_res = {int(r) for r in dd.get("attn_resolutions", ())}
    attn = [res // 2 ** i in attn_res for i in range(len(mult))]  # both encoder and decoder: level i at res / 2^i
    cfg: dict[str, Any] = {
        "_class_name": "VQModel" if n_embed is not None else "AutoencoderKL",
        "in_channels": int(dd["in_channels"]), "out_channels": int(dd["out_ch"]),
        "down_block_types": tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn),
        "up_block_types": tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in attn[::-1]),
        "block_out_channels": tuple(ch * m for m in mult), "layers_per_block": int(dd["num_res_blocks"]),
        "latent_channels": z, "sample_size": res, "norm_num_groups": 32, "scaling_factor": float(scaling_factor),
    }
    if n_embed is not None:
        cfg["num_vq_embeddings"] = int(n_embed)
        cfg["vq_embed_dim"] = int(embed_dim)
    return cfg


def _check(cfg: Mapping[str, Any], kind: str) -> None:
    for key, supported in _REQUIRED.items():
        if key in cfg and cfg[key] != supported:
            raise ValueError(f"{kind} config {key}={cfg[key]!r} has no CompVis counterpart (only {supported!r})")
    for types, allowed in ((cfg["down_block_types"], _DOWN_TYPES), (cfg["up_block_types"], _UP_TYPES)):
        bad = [t for t in types if t not in allowed]
        if bad:
            raise ValueError(f"{kind} block types {bad} have no CompVis counterpart; supported: {list(allowed)}")


def _resnet(out: KeyMap, src: str, dst: str, shortcut: bool) -> None:
    """Autoencoder ResnetBlock -> ResnetBlock2D (no time embedding); ``nin_shortcut`` where channels change."""
    for name in ("norm1", "conv1", "norm2", "conv2"):
        map_pair(out, f"{src}.{name}", f"{dst}.{name}")
    if shortcut:
        map_pair(out, f"{src}.nin_shortcut", f"{dst}.conv_shortcut")


def _attn(out: KeyMap, conv_dims: dict[str, int], src: str, dst: str) -> None:
    """AttnBlock (1x1 Conv2d q, k, v, proj_out) -> Attention (Linear to_q, to_k, to_v, to_out.0)."""
    map_pair(out, f"{src}.norm", f"{dst}.group_norm")
    for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        map_pair(out, f"{src}.{a}", f"{dst}.{b}")
        conv_dims[f"{src}.{a}.weight"] = 2


def _mid(out: KeyMap, conv_dims: dict[str, int], part: str) -> None:
    _resnet(out, f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", shortcut=False)
    _attn(out, conv_dims, f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0")
    _resnet(out, f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", shortcut=False)


def _vae_map(config: Mapping[str, Any] | Any) -> tuple[KeyMap, dict[str, int]]:
    """(CompVis key -> diffusers key, CompVis key -> extra trailing 1x1 dims) for the autoencoder of ``config``."""
    kind = vae_class_name(config)
    cfg = plain_config(config.config if isinstance(config, nn.Module) else config)
    _check(cfg, kind)
    channels = list(cfg["block_out_channels"])
    levels, layers = len(channels), int(cfg["layers_per_block"])
    down_attn = ["Attn" in t for t in cfg["down_block_types"]]
    up_attn = ["Attn" in t for t in cfg["up_block_types"]]
    out: KeyMap = {}
    conv_dims: dict[str, int] = {}

    map_pair(out, "encoder.conv_in", "encoder.conv_in")
    ch = channels[0]
    for i, c in enumerate(channels):
        for j in range(layers):
            _resnet(out, f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", shortcut=ch != c)
            if down_attn[i]:
                _attn(out, conv_dims, f"encoder.down.{i}.attn.{j}", f"encoder.down_blocks.{i}.attentions.{j}")
            ch = c
        if i != levels - 1:
            map_pair(out, f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    _mid(out, conv_dims, "encoder")
    map_pair(out, "encoder.norm_out", "encoder.conv_norm_out")
    map_pair(out, "encoder.conv_out", "encoder.conv_out")

    map_pair(out, "decoder.conv_in", "decoder.conv_in")
    _mid(out, conv_dims, "decoder")
    ch = channels[-1]
    for u in range(levels):
        level = levels - 1 - u  # CompVis decoder.up is indexed by level, diffusers' up_blocks by execution order
        c = channels[level]
        for j in range(layers + 1):
            _resnet(out, f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{u}.resnets.{j}", shortcut=ch != c)
            if up_attn[u]:
                _attn(out, conv_dims, f"decoder.up.{level}.attn.{j}", f"decoder.up_blocks.{u}.attentions.{j}")
            ch = c
        if level != 0:
            map_pair(out, f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{u}.upsamplers.0.conv")
    map_pair(out, "decoder.norm_out", "decoder.conv_norm_out")
    map_pair(out, "decoder.conv_out", "decoder.conv_out")

    map_pair(out, "quant_conv", "quant_conv")
    map_pair(out, "post_quant_conv", "post_quant_conv")
    if kind == "VQModel":
        out["quantize.embedding.weight"] = "quantize.embedding.weight"
    return out, conv_dims


def compvis_to_diffusers_vae_keys(config: Mapping[str, Any] | Any) -> KeyMap:
    """CompVis first-stage key (no ``first_stage_model.`` prefix) -> diffusers ``VQModel`` / ``AutoencoderKL`` key.

    Derived from ``block_out_channels``, ``layers_per_block`` and which blocks have attention.

    Raises:
        ValueError: the config uses a diffusers feature without a CompVis counterpart.
    """
    return _vae_map(config)[0]


def diffusers_to_compvis_vae_keys(config: Mapping[str, Any] | Any) -> dict[str, str]:
    """Inverse of :func:`compvis_to_diffusers_vae_keys`."""
    return {v: k for k, v in compvis_to_diffusers_vae_keys(config).items() if isinstance(v, str)}


def convert_vae_state_dict(sd: Mapping[str, Tensor], vae: nn.Module, source: str = "state dict") -> dict[str, Tensor]:
    """Renames a CompVis first-stage state dict for ``vae`` (1x1 conv attention weights reshaped to linears).

    Args:
        sd: first-stage tensors, keys with or without the ``first_stage_model.`` prefix.
        vae: the target ``VQModel`` / ``AutoencoderKL``.
        source: the file name, for error messages.

    Raises:
        ValueError: unknown, missing or mis-shaped keys, listed by name with the config to fix.
    """
    cfg = vae.config
    plain = {k.removeprefix("first_stage_model."): v for k, v in sd.items()}
    hint = (f"The {type(vae).__name__} config (block_out_channels={tuple(cfg.block_out_channels)}, layers_per_block="
            f"{cfg.layers_per_block}, down_block_types={tuple(cfg.down_block_types)}, latent_channels="
            f"{cfg.latent_channels}) must match the checkpoint's first_stage_config (ch x ch_mult, num_res_blocks, "
            "attn_resolutions, z_channels, embed_dim, n_embed): pass the matching --layout / --compvis-config / "
            "--vae-config.")
    return remap_state_dict(plain, compvis_to_diffusers_vae_keys(vae), vae, what="first stage", source=source,
                            hint=hint)


def vae_state_dict_to_compvis(vae: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """The tensors of a diffusers autoencoder under CompVis names (attention projections as 1x1 convs)."""
    mapping, conv_dims = _vae_map(vae)
    return remap_to_compvis(vae, mapping, conv_dims, prefix=prefix)
