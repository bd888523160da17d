"""CompVis ``openaimodel.UNetModel`` <-> diffusers UNet key maps, built from the model config, and the state-dict
remapping shared by the UNet and first-stage converters.

Two families of the CompVis UNet are covered, both numbered sequentially (``input_blocks.N``, ``middle_block.N``,
``output_blocks.N``) where diffusers nests (``down_blocks.i.resnets.j``, ``down_blocks.i.attentions.j``, ...):

* with ``SpatialTransformer`` (cin256-v2, LDM-4 ImageNet) -> ``UNet2DConditionModel`` (``CrossAttn*Block2D``);
* with the legacy ``AttentionBlock`` (unconditional LSUN LDMs) -> ``UNet2DModel`` (``Attn*Block2D``), including
  ``use_scale_shift_norm`` (``resnet_time_scale_shift="scale_shift"``) and ``resblock_updown`` (down/up-sampling
  ResBlocks: ``downsample_type="resnet"``, ``ResnetDownsampleBlock2D`` / ``ResnetUpsampleBlock2D``).

``AttentionBlock`` computes ``qkv = Conv1d(C, 3C, 1)(GroupNorm(x))``. ``QKVAttentionLegacy`` (``use_new_attention_order
=False``, every released LDM) splits the 3C output channels *per head first*: head ``h`` owns rows
``[h*3d, (h+1)*3d)`` laid out as ``[q_h (d rows), k_h (d), v_h (d)]`` with ``d = C / H``; ``QKVAttention`` (new order)
splits ``[Q (C rows), K (C), V (C)]`` first, then heads. Both use ``softmax(q.k / sqrt(d)) v`` per head and return the
heads concatenated in head order (channel ``h*d + i``), which is diffusers' head layout, so the map is exact:
``to_q.weight = W_qkv.view(H, 3, d, C)[:, 0].reshape(C, C)`` (legacy) or ``W_qkv[:C]`` (new), likewise ``to_k`` /
``to_v`` and the biases; ``proj_out`` (Conv1d 1x1) is ``to_out.0`` (Linear).

Head layout: a legacy-attention UNet configured with ``num_head_channels`` (LSUN bedrooms LDM-4) has one head dim
everywhere, ``UNet2DModel.attention_head_dim``. One configured with ``num_heads`` keeps the head *count* fixed, so
its head dim changes with the width of the level (LSUN churches LDM-8: 8 heads of 24 to 96 channels), which a single
``attention_head_dim`` cannot express; such UNets convert with ``per_block_heads`` and need
:func:`apply_attention_heads` after loading.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import Tensor, nn

from train.models.families import HEADS_KEY, apply_attention_heads

__all__ = [
    "HEADS_KEY",
    "KeyMap",
    "apply_attention_heads",
    "build_unet",
    "compvis_to_diffusers_unet_keys",
    "compvis_unet_config",
    "convert_unet_state_dict",
    "diffusers_to_compvis_unet_keys",
    "merge_qkv",
    "qkv_order_of",
    "remap_state_dict",
    "remap_to_compvis",
    "split_qkv",
    "unet_class_name",
    "unet_state_dict_to_compvis",
]

#: CompVis key -> diffusers key, or the (to_q, to_k, to_v) keys that one legacy ``qkv`` tensor is split into.
KeyMap = dict[str, str | tuple[str, str, str]]

QKV_ORDERS = ("legacy", "new")

# Config values of a UNet2DConditionModel that add modules (or change their names or maths) which the CompVis UNet
# has no counterpart for; the converter supports only the value given here.
_CROSS_ATTN_REQUIRED: dict[str, Any] = {
    "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None, "time_cond_proj_dim": None,
    "dual_cross_attention": False, "only_cross_attention": False, "time_embedding_type": "positional",
    "attention_type": "default", "reverse_transformer_layers_per_block": None, "time_embedding_dim": None,
    "timestep_post_act": None, "mid_block_type": "UNetMidBlock2DCrossAttn", "flip_sin_to_cos": True,
    "freq_shift": 0, "act_fn": "silu", "downsample_padding": 1, "mid_block_scale_factor": 1,
    "conv_in_kernel": 3, "conv_out_kernel": 3,
}
_UNET2D_REQUIRED: dict[str, Any] = {
    "time_embedding_type": "positional", "time_embedding_dim": None, "center_input_sample": False,
    "class_embed_type": None, "mid_block_type": "UNetMidBlock2D", "add_attention": True, "flip_sin_to_cos": True,
    "freq_shift": 0, "act_fn": "silu", "downsample_padding": 1, "mid_block_scale_factor": 1,
}
_DOWN_TYPES = {"UNet2DConditionModel": ("DownBlock2D", "CrossAttnDownBlock2D"),
               "UNet2DModel": ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")}
_UP_TYPES = {"UNet2DConditionModel": ("UpBlock2D", "CrossAttnUpBlock2D"),
             "UNet2DModel": ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")}


# ------------------------------------------------------------------------------------------------ shared helpers
def plain_config(config: Any) -> dict[str, Any]:
    """Plain dict of a diffusers config (FrozenDict, model.config or dict)."""
    return dict(config.items()) if hasattr(config, "items") else dict(vars(config))


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


def key_listing(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def split_qkv(value: Tensor, heads: int, order: str = "legacy") -> tuple[Tensor, Tensor, Tensor] | None:
    """Splits a CompVis ``AttentionBlock.qkv`` weight ``(3C, C[, 1])`` or bias ``(3C,)`` into q, k, v ``(C, ...)``.

    ``legacy`` (``QKVAttentionLegacy``): rows are ``H`` blocks of ``[q_h, k_h, v_h]``, ``d = C / H`` rows each;
    ``new`` (``QKVAttention``): rows are ``[Q, K, V]``, each in head order. None when the rows do not split.
    """
    if order not in QKV_ORDERS:
        raise ValueError(f"qkv order must be one of {QKV_ORDERS}, got {order!r}")
    rows, rest = value.shape[0], tuple(value.shape[1:])
    if rows % (3 * heads):
        return None
    d = rows // (3 * heads)
    if order == "legacy":
        parts = value.reshape(heads, 3, d, *rest).unbind(1)  # 3 x (H, d, *rest)
    else:
        parts = value.reshape(3, heads, d, *rest).unbind(0)
    q, k, v = (p.reshape(heads * d, *rest) for p in parts)
    return q, k, v


def merge_qkv(q: Tensor, k: Tensor, v: Tensor, heads: int, order: str = "legacy") -> Tensor:
    """Inverse of :func:`split_qkv`: ``(C, ...)`` x 3 -> ``(3C, ...)`` in the CompVis channel order."""
    if order not in QKV_ORDERS:
        raise ValueError(f"qkv order must be one of {QKV_ORDERS}, got {order!r}")
    if order == "new":
        return torch.cat([q, k, v], dim=0)
    c, rest = q.shape[0], tuple(q.shape[1:])
    return torch.stack([t.reshape(heads, c // heads, *rest) for t in (q, k, v)], dim=1).reshape(3 * c, *rest)


def _heads(model: nn.Module, key: str) -> int:
    """Head count of the diffusers ``Attention`` owning ``...to_q.weight`` / ``...to_q.bias``."""
    return int(model.get_submodule(key.rsplit(".to_q.", 1)[0]).heads)


def remap_state_dict(sd: Mapping[str, Tensor], mapping: KeyMap, model: nn.Module, *, what: str, source: str,
                     hint: str, qkv_order: str = "legacy") -> dict[str, Tensor]:
    """Renames CompVis tensors to ``model``'s keys: reshapes 1x1 conv <-> linear, splits legacy ``qkv`` tensors.

    Args:
        sd: CompVis tensors without prefix.
        mapping: CompVis key -> diffusers key(s), generated from ``model``'s config.
        model: the target diffusers model; its tensors give the expected shapes (and its attention modules the head
            count of a ``qkv`` split).
        what / source / hint: for the error message: the part ("UNet", "first stage"), the file, and the fix.
        qkv_order: ``legacy`` or ``new`` (``use_new_attention_order``), see :func:`split_qkv`.

    Returns:
        A state dict that ``model.load_state_dict(..., strict=True)`` accepts.

    Raises:
        ValueError: unknown CompVis keys, diffusers keys left without a value, or shape mismatches, each listed by
            name (first few and the count), followed by ``hint``.
    """
    expected = model.state_dict()
    converted: dict[str, Tensor] = {}
    unknown: list[str] = []
    bad_shape: list[str] = []
    supplied: set[str] = set()
    for key, value in sd.items():
        target = mapping.get(key)
        targets = (target,) if isinstance(target, str) else target
        if targets is None or any(t not in expected for t in targets):
            unknown.append(key)
            continue
        supplied.update(targets)  # a wrong-shaped key is reported once, not also as missing
        if isinstance(target, str):
            values: Sequence[Tensor] | None = (value,)
        else:
            values = split_qkv(value, _heads(model, target[0]), qkv_order)
        if values is None:
            bad_shape.append(f"{key} -> {'/'.join(targets)}: checkpoint {tuple(value.shape)} does not split into "
                             f"q, k, v of {_heads(model, targets[0])} heads")
            continue
        for t, v in zip(targets, values):
            fitted = _fit(v, expected[t].shape)
            if fitted is None:
                bad_shape.append(f"{key} -> {t}: checkpoint {tuple(v.shape)} vs model {tuple(expected[t].shape)}")
                continue
            converted[t] = fitted.to(expected[t].dtype)
    missing = [k for k in expected if k not in supplied]
    problems = []
    if unknown:
        problems.append(f"unknown CompVis keys {key_listing(unknown)}")
    if missing:
        problems.append(f"diffusers keys without a value in the checkpoint {key_listing(missing)}")
    if bad_shape:
        problems.append(f"shape mismatches {key_listing(bad_shape, 4)}")
    if problems:
        raise ValueError(f"{source}: the CompVis {what} does not match the diffusers config: " + "; ".join(problems)
                         + f". {hint}")
    return converted


def remap_to_compvis(model: nn.Module, mapping: KeyMap, conv_dims: Mapping[str, int], prefix: str = "",
                     qkv_order: str = "legacy") -> dict[str, Tensor]:
    """The tensors of diffusers ``model`` under CompVis names (the inverse of :func:`remap_state_dict`).

    ``conv_dims[k]`` is the number of trailing singleton dims CompVis key ``k`` has over its diffusers tensor (a 1x1
    ``Conv1d`` / ``Conv2d`` stored by diffusers as a ``Linear``).
    """
    state = model.state_dict()
    out: dict[str, Tensor] = {}
    for key, target in mapping.items():
        if isinstance(target, str):
            value = state[target]
        else:
            value = merge_qkv(*(state[t] for t in target), heads=_heads(model, target[0]), order=qkv_order)
        extra = conv_dims.get(key, 0)
        out[prefix + key] = value.reshape(*value.shape, *([1] * extra)).clone()
    return out


# ------------------------------------------------------------------------------------------------ UNet key maps
def unet_class_name(config: Mapping[str, Any] | Any) -> str:
    """``UNet2DConditionModel`` or ``UNet2DModel``: ``_class_name`` if given, else cross-attention blocks decide."""
    if isinstance(config, (UNet2DConditionModel, UNet2DModel)):
        return type(config).__name__
    cfg = plain_config(config)
    name = cfg.get("_class_name")
    if name is None:
        blocks = list(cfg.get("down_block_types", ())) + list(cfg.get("up_block_types", ()))
        cross = "cross_attention_dim" in cfg or any("CrossAttn" in b for b in blocks)
        name = "UNet2DConditionModel" if cross else "UNet2DModel"
    if name not in _DOWN_TYPES:
        raise ValueError(f"_class_name={name!r}: the CompVis UNet converts to one of {sorted(_DOWN_TYPES)}")
    return name


def build_unet(config: Mapping[str, Any]) -> UNet2DConditionModel | UNet2DModel:
    """The diffusers UNet of ``config`` (kwargs, optionally with ``_class_name``; other ``_*`` keys are ignored,
    except :data:`HEADS_KEY`, which is stored in the model config and applied, see :func:`apply_attention_heads`)."""
    cfg = plain_config(config)
    cls = UNet2DConditionModel if unet_class_name(cfg) == "UNet2DConditionModel" else UNet2DModel
    unet = cls(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    if cfg.get(HEADS_KEY):
        unet.register_to_config(**{HEADS_KEY: dict(cfg[HEADS_KEY])})  # saved in config.json by save_pretrained
        apply_attention_heads(unet)
    return unet


def _check_required(cfg: Mapping[str, Any], required: Mapping[str, Any], kind: str) -> None:
    for key, supported in required.items():
        value = cfg.get(key, supported)
        if isinstance(value, (list, tuple)) and key == "only_cross_attention":
            value = any(value)
        if value != supported:
            raise ValueError(f"UNet config {key}={value!r} has no CompVis counterpart; the converter supports only "
                             f"{key}={supported!r} (CompVis openaimodel.UNetModel -> {kind})")
    shift = cfg.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise ValueError(f"UNet config resnet_time_scale_shift={shift!r}: CompVis ResBlocks add the time embedding "
                         "('default') or use it as scale and shift (use_scale_shift_norm: 'scale_shift')")
    if kind == "UNet2DModel" and shift == "scale_shift" and cfg.get("attn_norm_num_groups") is None:
        raise ValueError("UNet2DModel config with resnet_time_scale_shift='scale_shift' needs attn_norm_num_groups "
                         "(32 for CompVis): without it diffusers builds the middle attention without the GroupNorm "
                         "that CompVis' AttentionBlock has")


def _module_params(bias: bool = True) -> tuple[str, ...]:
    # GroupNorm/LayerNorm/Conv/Linear all store weight (+ bias); q/k/v of the SpatialTransformer have no bias.
    return ("weight", "bias") if bias else ("weight",)


def map_pair(out: KeyMap, src: str, dst: str, bias: bool = True) -> None:
    for p in _module_params(bias):
        out[f"{src}.{p}"] = f"{dst}.{p}"


def _resnet(out: KeyMap, src: str, dst: str, shortcut: bool) -> None:
    """ResBlock ``src`` (CompVis) -> ResnetBlock2D ``dst`` (diffusers), module prefixes."""
    names = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
             ("out_layers.0", "norm2"), ("out_layers.3", "conv2")]
    if shortcut:  # a 1x1 conv only where the channel count changes
        names.append(("skip_connection", "conv_shortcut"))
    for a, b in names:
        map_pair(out, f"{src}.{a}", f"{dst}.{b}")


def _transformer(out: KeyMap, src: str, dst: str, depth: int) -> None:
    """SpatialTransformer ``src`` -> Transformer2DModel ``dst``; the inner names are identical in both."""
    for name in ("norm", "proj_in", "proj_out"):
        map_pair(out, f"{src}.{name}", f"{dst}.{name}")
    for d in range(depth):
        block = f"transformer_blocks.{d}"
        names = [("norm1", True), ("norm2", True), ("norm3", True), ("ff.net.0.proj", True), ("ff.net.2", True)]
        for attn in ("attn1", "attn2"):
            names += [(f"{attn}.to_q", False), (f"{attn}.to_k", False), (f"{attn}.to_v", False),
                      (f"{attn}.to_out.0", True)]
        for name, bias in names:
            map_pair(out, f"{src}.{block}.{name}", f"{dst}.{block}.{name}", bias)


def _legacy_attention(out: KeyMap, conv_dims: dict[str, int], src: str, dst: str) -> None:
    """AttentionBlock ``src`` (norm, qkv Conv1d, proj_out Conv1d) -> deprecated-attn-block ``Attention`` ``dst``."""
    map_pair(out, f"{src}.norm", f"{dst}.group_norm")
    for p in ("weight", "bias"):
        out[f"{src}.qkv.{p}"] = (f"{dst}.to_q.{p}", f"{dst}.to_k.{p}", f"{dst}.to_v.{p}")
    map_pair(out, f"{src}.proj_out", f"{dst}.to_out.0")
    conv_dims[f"{src}.qkv.weight"] = 1
    conv_dims[f"{src}.proj_out.weight"] = 1


def _sampler_kind(cfg: Mapping[str, Any], block_type: str, direction: str) -> str:
    """``conv`` (Downsample/Upsample) or ``resnet`` (resblock_updown) for a block that resamples."""
    if block_type in ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D"):
        return "resnet"
    if block_type in ("AttnDownBlock2D", "AttnUpBlock2D"):
        return cfg.get(f"{direction}sample_type") or "conv"
    return "conv"


def unet_key_map(config: Mapping[str, Any] | Any) -> tuple[KeyMap, dict[str, int]]:
    """(CompVis key -> diffusers key(s), CompVis key -> extra trailing 1x1 dims) for the UNet of ``config``."""
    kind = unet_class_name(config)
    cfg = plain_config(config.config if isinstance(config, nn.Module) else config)
    _check_required(cfg, _CROSS_ATTN_REQUIRED if kind == "UNet2DConditionModel" else _UNET2D_REQUIRED, kind)
    channels = list(cfg["block_out_channels"])
    levels = len(channels)
    layers = cfg["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"layers_per_block={layers!r}: only one int for all levels is supported")
    down_types, up_types = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    for types, allowed in ((down_types, _DOWN_TYPES[kind]), (up_types, _UP_TYPES[kind])):
        bad = [t for t in types if t not in allowed]
        if bad:
            raise ValueError(f"{kind} block types {bad} have no CompVis counterpart; supported: {list(allowed)}")
    down_attn = ["Attn" in t for t in down_types]
    up_attn = ["Attn" in t for t in up_types]
    # CompVis resamples with convs or, with resblock_updown, with ResBlocks: one choice for the whole UNet.
    samplers = {_sampler_kind(cfg, t, "down") for t in down_types[:-1]} | \
               {_sampler_kind(cfg, t, "up") for t in up_types[:-1]}
    if len(samplers) > 1:
        raise ValueError(f"{kind} mixes conv and ResBlock resampling ({down_types} / {up_types}, downsample_type="
                         f"{cfg.get('downsample_type')!r}, upsample_type={cfg.get('upsample_type')!r}); CompVis uses "
                         "one for every level (resblock_updown)")
    updown = samplers == {"resnet"}
    depth = cfg.get("transformer_layers_per_block", 1)
    depths = [depth] * levels if isinstance(depth, int) else list(depth)

    out: KeyMap = {}
    conv_dims: dict[str, int] = {}

    def attention(src: str, dst: str, level: int) -> None:
        if kind == "UNet2DConditionModel":
            _transformer(out, src, dst, depths[level])
        else:
            _legacy_attention(out, conv_dims, src, dst)

    for a, b in (("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
                 ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out")):
        map_pair(out, a, b)
    if cfg.get("num_class_embeds"):
        out["label_emb.weight"] = "class_embedding.weight"

    # Encoder: input_blocks.1.. hold [res, (attention)] per layer, then a block with only the downsampler.
    n = 1
    skip_channels = [channels[0]]  # channels of every input block output, consumed by the decoder's concats
    ch = channels[0]
    for i, c in enumerate(channels):
        for j in range(layers):
            _resnet(out, f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", shortcut=ch != c)
            if down_attn[i]:
                attention(f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}", i)
            ch = c
            skip_channels.append(ch)
            n += 1
        if i != levels - 1:
            if updown:  # a ResBlock with down=True (avg-pool inside), channels unchanged
                _resnet(out, f"input_blocks.{n}.0", f"down_blocks.{i}.downsamplers.0", shortcut=False)
            else:
                map_pair(out, f"input_blocks.{n}.0.op", f"down_blocks.{i}.downsamplers.0.conv")
            skip_channels.append(ch)
            n += 1

    _resnet(out, "middle_block.0", "mid_block.resnets.0", shortcut=False)
    attention("middle_block.1", "mid_block.attentions.0", levels - 1)
    _resnet(out, "middle_block.2", "mid_block.resnets.1", shortcut=False)

    # Decoder: up block u is level levels-1-u; each of its layers_per_block + 1 res blocks concatenates one skip.
    n = 0
    for u in range(levels):
        c = channels[levels - 1 - u]
        for j in range(layers + 1):
            in_ch = ch + skip_channels.pop()
            _resnet(out, f"output_blocks.{n}.0", f"up_blocks.{u}.resnets.{j}", shortcut=in_ch != c)
            sub = 1
            if up_attn[u]:
                attention(f"output_blocks.{n}.1", f"up_blocks.{u}.attentions.{j}", levels - 1 - u)
                sub = 2
            if j == layers and u != levels - 1:  # the upsampler follows the attention inside the same block
                if updown:
                    _resnet(out, f"output_blocks.{n}.{sub}", f"up_blocks.{u}.upsamplers.0", shortcut=False)
                else:
                    map_pair(out, f"output_blocks.{n}.{sub}.conv", f"up_blocks.{u}.upsamplers.0.conv")
            ch = c
            n += 1
    return out, conv_dims


def compvis_to_diffusers_unet_keys(config: Mapping[str, Any] | Any) -> KeyMap:
    """CompVis UNet key -> diffusers key, for every parameter of the UNet of ``config``.

    ``config`` is a ``UNet2DConditionModel`` (SpatialTransformer family) or ``UNet2DModel`` (legacy AttentionBlock
    family) config or model; keys are without the ``model.diffusion_model.`` prefix. The map is derived from
    ``block_out_channels``, ``layers_per_block``, the block types (which levels have attention, conv or ResBlock
    resampling) and ``transformer_layers_per_block``. A legacy ``qkv`` key maps to the tuple ``(to_q, to_k, to_v)``.

    Raises:
        ValueError: the config uses a diffusers feature without a CompVis counterpart.
    """
    return unet_key_map(config)[0]


def diffusers_to_compvis_unet_keys(config: Mapping[str, Any] | Any) -> dict[str, str]:
    """Inverse of :func:`compvis_to_diffusers_unet_keys`: diffusers key -> CompVis key (no prefix); ``to_q`` /
    ``to_k`` / ``to_v`` of a legacy attention block all map to its ``qkv`` key."""
    inverse: dict[str, str] = {}
    for key, target in compvis_to_diffusers_unet_keys(config).items():
        for t in (target,) if isinstance(target, str) else target:
            inverse[t] = key
    return inverse


def convert_unet_state_dict(sd: Mapping[str, Tensor], unet: nn.Module, source: str = "state dict",
                            qkv_order: str = "legacy") -> dict[str, Tensor]:
    """Renames (and reshapes 1x1 conv <-> linear, splits legacy ``qkv``) a CompVis UNet state dict for ``unet``.

    Args:
        sd: CompVis UNet tensors, keys with or without the ``model.diffusion_model.`` prefix.
        unet: the target ``UNet2DConditionModel`` or ``UNet2DModel``; its config drives the key map, its tensors the
            expected shapes, its attention modules the head count of the ``qkv`` split.
        source: name of the file the tensors came from, for error messages.
        qkv_order: ``legacy`` (CompVis default) or ``new`` (``use_new_attention_order=True``).

    Returns:
        A state dict that ``unet.load_state_dict(..., strict=True)`` accepts.

    Raises:
        ValueError: unknown CompVis keys, diffusers keys left without a value, or shape mismatches; each listed by
            name (first few and the count) with a hint on the likely config mismatch.
    """
    cfg = unet.config
    plain = {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()}
    hint = (f"The UNet config (block_out_channels={tuple(cfg.block_out_channels)}, layers_per_block="
            f"{cfg.layers_per_block}, down_block_types={tuple(cfg.down_block_types)}) must match the checkpoint's "
            "unet_config (model_channels x channel_mult, num_res_blocks, attention_resolutions, resblock_updown): "
            "pass the matching --layout / --compvis-config / --unet-config.")
    return remap_state_dict(plain, compvis_to_diffusers_unet_keys(unet), unet, what="UNet", source=source,
                            hint=hint, qkv_order=qkv_order)


def unet_state_dict_to_compvis(unet: nn.Module, prefix: str = "", qkv_order: str = "legacy") -> dict[str, Tensor]:
    """The tensors of a diffusers UNet under CompVis names (legacy ``qkv`` merged, attention projections as 1x1
    ``Conv1d`` weights); the inverse of :func:`convert_unet_state_dict`."""
    mapping, conv_dims = unet_key_map(unet)
    return remap_to_compvis(unet, mapping, conv_dims, prefix=prefix, qkv_order=qkv_order)


# ------------------------------------------------------------------------------------------ CompVis config -> kwargs
def _refuse(params: Mapping[str, Any], what: str, **supported: Any) -> None:
    for key, value in supported.items():
        if params.get(key, value) != value:
            raise ValueError(f"CompVis {what} {key}={params[key]!r} is not supported by the converter "
                             f"(only {key}={value!r})")


def compvis_unet_config(params: Mapping[str, Any], per_block_heads: bool = False) -> dict[str, Any]:
    """diffusers kwargs (plus ``_class_name``) of the CompVis ``openaimodel.UNetModel`` built from ``params``.

    ``params`` is the ``unet_config.params`` of a CompVis yaml: ``image_size``, ``in_channels``, ``out_channels``,
    ``model_channels``, ``channel_mult``, ``num_res_blocks``, ``attention_resolutions`` (downsampling factors ``ds``
    of the levels with attention), ``num_heads`` / ``num_head_channels``, ``use_spatial_transformer``
    (+ ``context_dim``, ``transformer_depth``, ``use_linear_in_transformer``), ``use_scale_shift_norm``,
    ``resblock_updown``, ``num_classes``. GroupNorm is 32 groups, eps 1e-5, as in CompVis.

    ``per_block_heads``: for a legacy-attention UNet whose head dim changes per level (``num_heads`` with levels of
    different width, e.g. LSUN churches LDM-8), record the head count of every attention module under
    :data:`HEADS_KEY` (see :func:`apply_attention_heads`) instead of refusing.

    Raises:
        ValueError: an option without a diffusers counterpart, or a head layout diffusers cannot express (the
            legacy-attention ``UNet2DModel`` has one ``attention_head_dim`` for every block) without
            ``per_block_heads``.
    """
    p = dict(params)
    _refuse(p, "unet_config", dims=2, conv_resample=True, n_embed=None)
    mc = int(p["model_channels"])
    mult = [int(m) for m in p.get("channel_mult", (1, 2, 4, 8))]
    channels = [mc * m for m in mult]
    levels = len(channels)
    attn_res = {int(r) for r in p["attention_resolutions"]}
    attn = [2 ** i in attn_res for i in range(levels)]
    num_heads, head_ch = int(p.get("num_heads", -1)), int(p.get("num_head_channels", -1))
    up_heads = int(p.get("num_heads_upsample", -1))
    if num_heads == -1 and head_ch == -1:
        raise ValueError("CompVis unet_config: set num_heads or num_head_channels")
    if head_ch == -1 and up_heads not in (-1, num_heads):
        raise ValueError(f"CompVis unet_config num_heads_upsample={up_heads} differs from num_heads={num_heads}; "
                         "diffusers uses the same heads in the down and up blocks")

    def heads(c: int) -> int:
        return max(1, c // head_ch) if head_ch != -1 else num_heads

    spatial = bool(p.get("use_spatial_transformer", False))
    cfg: dict[str, Any] = {"_class_name": "UNet2DConditionModel" if spatial else "UNet2DModel",
                           "sample_size": int(p["image_size"]), "in_channels": int(p["in_channels"]),
                           "out_channels": int(p["out_channels"]), "block_out_channels": tuple(channels),
                           "layers_per_block": int(p["num_res_blocks"])}
    updown = bool(p.get("resblock_updown", False))
    if spatial:
        if updown:
            raise ValueError("CompVis unet_config resblock_updown=True with use_spatial_transformer: diffusers' "
                             "CrossAttn blocks resample with convs only")
        context = p.get("context_dim")
        if not isinstance(context, int):
            raise ValueError(f"CompVis unet_config context_dim={context!r}: one int is supported")
        cfg["down_block_types"] = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
        cfg["up_block_types"] = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1])
        cfg["cross_attention_dim"] = context
        per_level = [heads(c) for c in channels]  # diffusers' UNet2DConditionModel calls the head count this
        cfg["attention_head_dim"] = per_level[0] if len(set(per_level)) == 1 else tuple(per_level)
        if int(p.get("transformer_depth", 1)) != 1:
            cfg["transformer_layers_per_block"] = int(p["transformer_depth"])
        if p.get("use_linear_in_transformer"):
            cfg["use_linear_projection"] = True
    else:
        plain_down = "ResnetDownsampleBlock2D" if updown else "DownBlock2D"
        plain_up = "ResnetUpsampleBlock2D" if updown else "UpBlock2D"
        cfg["down_block_types"] = tuple("AttnDownBlock2D" if a else plain_down for a in attn)
        cfg["up_block_types"] = tuple("AttnUpBlock2D" if a else plain_up for a in attn[::-1])
        # The middle block always has attention, at the last level's width.
        dims = {i: channels[i] // heads(channels[i]) for i in range(levels) if attn[i]}
        dims[levels] = channels[-1] // heads(channels[-1])
        if len(set(dims.values())) == 1:
            cfg["attention_head_dim"] = next(iter(dims.values()))
        elif per_block_heads:
            cfg["attention_head_dim"] = math.gcd(*dims.values())  # divides every width: projections stay C x C
            cfg[HEADS_KEY] = _heads_by_module(channels, attn, int(p["num_res_blocks"]), heads)
        else:
            detail = ", ".join(f"{'middle' if i == levels else f'level {i}'}: {channels[min(i, levels - 1)]} "
                               f"channels / {heads(channels[min(i, levels - 1)])} heads = {d}"
                               for i, d in sorted(dims.items()))
            raise ValueError(
                f"CompVis unet_config num_heads={num_heads} gives a different head dim per level ({detail}); "
                "diffusers' UNet2DModel has one attention_head_dim for every attention block, so a stock "
                "UNet2DModel config cannot express it. Convert with per_block_heads (--per-block-heads): the head "
                f"counts are stored in unet/config.json ({HEADS_KEY}) and loaders must apply them with "
                "train.tools.convert_compvis_unet.apply_attention_heads")
        cfg["attn_norm_num_groups"] = 32  # keep the middle AttentionBlock's GroupNorm with scale_shift too
        if updown:
            cfg["downsample_type"] = cfg["upsample_type"] = "resnet"
    if p.get("use_scale_shift_norm"):
        cfg["resnet_time_scale_shift"] = "scale_shift"
    if p.get("num_classes") is not None:
        cfg["num_class_embeds"] = int(p["num_classes"])
    return cfg


def _heads_by_module(channels: Sequence[int], attn: Sequence[bool], layers: int,
                     heads: Callable[[int], int]) -> dict[str, int]:
    """Attention module name -> CompVis head count, for a UNet2DModel of ``channels`` with attention at ``attn``."""
    out: dict[str, int] = {}
    levels = len(channels)
    for i, c in enumerate(channels):
        for j in range(layers if attn[i] else 0):
            out[f"down_blocks.{i}.attentions.{j}"] = heads(c)
    out["mid_block.attentions.0"] = heads(channels[-1])
    for u in range(levels):
        level = levels - 1 - u
        for j in range(layers + 1 if attn[level] else 0):
            out[f"up_blocks.{u}.attentions.{j}"] = heads(channels[level])
    return out


def qkv_order_of(params: Mapping[str, Any]) -> str:
    """``new`` if the CompVis ``unet_config`` sets ``use_new_attention_order``, else ``legacy``."""
    return "new" if params.get("use_new_attention_order") else "legacy"

