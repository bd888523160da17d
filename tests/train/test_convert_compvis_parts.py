"""CompVis <-> diffusers key maps of the first stages (VQ-f4 / KL-f8) and of the legacy-attention UNet (LSUN LDMs).

Two kinds of evidence, on tiny random models (CPU, float64 where a reference is involved):

* round trips diffusers -> CompVis layout -> diffusers give bit-identical outputs (``torch.equal``);
* a reference forward written in this file from the CompVis equations (``ldm.modules.diffusionmodules.model`` and
  ``openaimodel``: ResBlocks, ``AttnBlock``, ``AttentionBlock`` + ``QKVAttentionLegacy``, down/up-sampling, the
  timestep embedding), reading the tensors by their CompVis names, matches the converted diffusers model. The
  CompVis code itself is not installed; the reference only uses ``torch.nn.functional``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DModel, VQModel
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from train.tools.convert_compvis_unet import (
    HEADS_KEY,
    apply_attention_heads,
    build_unet,
    compvis_to_diffusers_unet_keys,
    compvis_unet_config,
    convert_unet_state_dict,
    merge_qkv,
    split_qkv,
    unet_state_dict_to_compvis,
)
from train.tools.convert_compvis_vae import (
    build_vae,
    compvis_first_stage_config,
    compvis_to_diffusers_vae_keys,
    convert_vae_state_dict,
    vae_state_dict_to_compvis,
)

GROUPS = 4  # GroupNorm groups of the tiny models (CompVis: 32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread (thread hand-offs cost more than the work, far more on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize(model: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Every parameter ~ N(0, std): default inits zero some output layers, which would hide a swapped key."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval()


# ------------------------------------------------------------------------------------------ first-stage reference
def tiny_ddconfig(**overrides: Any) -> dict[str, Any]:
    """A CompVis ddconfig at toy size: 3 levels (16x16 -> 4x4), attention at the 8x8 level, 2 res blocks."""
    dd: dict[str, Any] = dict(double_z=False, z_channels=3, resolution=16, in_channels=3, out_ch=3, ch=8,
                              ch_mult=[1, 2, 2], num_res_blocks=2, attn_resolutions=[8], dropout=0.0)
    dd.update(overrides)
    return dd


def tiny_vae_config(kind: str, **dd_overrides: Any) -> dict[str, Any]:
    if kind == "vq":
        cfg = compvis_first_stage_config(tiny_ddconfig(**dd_overrides), embed_dim=3, n_embed=16)
    else:
        cfg = compvis_first_stage_config(tiny_ddconfig(double_z=True, z_channels=4, **dd_overrides), embed_dim=4)
    cfg["norm_num_groups"] = GROUPS
    return cfg


def _gn(sd: dict[str, Tensor], pre: str, x: Tensor, eps: float) -> Tensor:
    return F.group_norm(x, GROUPS, sd[f"{pre}.weight"], sd[f"{pre}.bias"], eps=eps)


def _conv(sd: dict[str, Tensor], pre: str, x: Tensor, **kwargs: Any) -> Tensor:
    return F.conv2d(x, sd[f"{pre}.weight"], sd[f"{pre}.bias"], **kwargs)


def ref_ae_resnet(sd: dict[str, Tensor], pre: str, x: Tensor) -> Tensor:
    """taming ResnetBlock without time embedding: x' + conv2(silu(norm2(conv1(silu(norm1(x))))))."""
    h = _conv(sd, f"{pre}.conv1", F.silu(_gn(sd, f"{pre}.norm1", x, 1e-6)), padding=1)
    h = _conv(sd, f"{pre}.conv2", F.silu(_gn(sd, f"{pre}.norm2", h, 1e-6)), padding=1)
    if f"{pre}.nin_shortcut.weight" in sd:
        x = _conv(sd, f"{pre}.nin_shortcut", x)
    return x + h


def ref_ae_attn(sd: dict[str, Tensor], pre: str, x: Tensor) -> Tensor:
    """taming AttnBlock: single head over the h*w positions, 1x1 conv projections, scale c^-1/2, residual."""
    b, c, hh, ww = x.shape
    h = _gn(sd, f"{pre}.norm", x, 1e-6)
    q = _conv(sd, f"{pre}.q", h).reshape(b, c, hh * ww).permute(0, 2, 1)  # b, hw, c
    k = _conv(sd, f"{pre}.k", h).reshape(b, c, hh * ww)  # b, c, hw
    v = _conv(sd, f"{pre}.v", h).reshape(b, c, hh * ww)
    w = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)  # b, hw (queries), hw (keys)
    h = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(sd, f"{pre}.proj_out", h)


def ref_encoder(sd: dict[str, Tensor], dd: dict[str, Any], x: Tensor) -> Tensor:
    levels, res = len(dd["ch_mult"]), dd["resolution"]
    h = _conv(sd, "encoder.conv_in", x, padding=1)
    for i in range(levels):
        for j in range(dd["num_res_blocks"]):
            h = ref_ae_resnet(sd, f"encoder.down.{i}.block.{j}", h)
            if res // 2 ** i in dd["attn_resolutions"]:
                h = ref_ae_attn(sd, f"encoder.down.{i}.attn.{j}", h)
        if i != levels - 1:  # asymmetric pad, then a stride-2 conv without padding
            h = _conv(sd, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2)
    h = ref_ae_resnet(sd, "encoder.mid.block_1", h)
    h = ref_ae_attn(sd, "encoder.mid.attn_1", h)
    h = ref_ae_resnet(sd, "encoder.mid.block_2", h)
    return _conv(sd, "encoder.conv_out", F.silu(_gn(sd, "encoder.norm_out", h, 1e-6)), padding=1)


def ref_decoder(sd: dict[str, Tensor], dd: dict[str, Any], z: Tensor) -> Tensor:
    levels, res = len(dd["ch_mult"]), dd["resolution"]
    h = _conv(sd, "decoder.conv_in", z, padding=1)
    h = ref_ae_resnet(sd, "decoder.mid.block_1", h)
    h = ref_ae_attn(sd, "decoder.mid.attn_1", h)
    h = ref_ae_resnet(sd, "decoder.mid.block_2", h)
    for i in reversed(range(levels)):  # decoder.up is indexed by level and run from the last level down
        for j in range(dd["num_res_blocks"] + 1):
            h = ref_ae_resnet(sd, f"decoder.up.{i}.block.{j}", h)
            if res // 2 ** i in dd["attn_resolutions"]:
                h = ref_ae_attn(sd, f"decoder.up.{i}.attn.{j}", h)
        if i != 0:
            h = _conv(sd, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"),
                      padding=1)
    return _conv(sd, "decoder.conv_out", F.silu(_gn(sd, "decoder.norm_out", h, 1e-6)), padding=1)


def ref_vq_decode(sd: dict[str, Tensor], dd: dict[str, Any], h: Tensor) -> Tensor:
    """VQModelInterface.decode: nearest codebook entry per position, post_quant_conv, decoder."""
    codes = sd["quantize.embedding.weight"]  # (n_embed, embed_dim)
    flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    idx = torch.argmin(((flat[:, None, :] - codes[None]) ** 2).sum(-1), dim=1)
    zq = codes[idx].reshape(h.shape[0], h.shape[2], h.shape[3], -1).permute(0, 3, 1, 2)
    return ref_decoder(sd, dd, _conv(sd, "post_quant_conv", zq))


def compvis_vae(kind: str, seed: int = 0) -> tuple[dict[str, Tensor], VQModel | AutoencoderKL, dict[str, Any]]:
    """(CompVis-layout state dict, the diffusers model it was made from, its config)."""
    cfg = tiny_vae_config(kind)
    source = randomize(build_vae(cfg), seed).double()
    return vae_state_dict_to_compvis(source), source, cfg


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_vae_round_trip_gives_identical_encode_and_decode(kind: str) -> None:
    cfg = tiny_vae_config(kind)
    source = randomize(build_vae(cfg))
    sd = vae_state_dict_to_compvis(source, prefix="first_stage_model.")
    assert all(v.ndim == 4 for k, v in sd.items() if k.endswith((".q.weight", ".proj_out.weight")))  # 1x1 convs
    fresh = build_vae(cfg).eval()
    fresh.load_state_dict(convert_vae_state_dict(sd, fresh), strict=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if kind == "vq":
            h_src, h_new = source.encode(x).latents, fresh.encode(x).latents
            assert torch.equal(h_new, h_src)
            assert torch.equal(fresh.decode(h_src).sample, source.decode(h_src).sample)  # quantizes, then decodes
        else:
            d_src, d_new = source.encode(x).latent_dist, fresh.encode(x).latent_dist
            assert torch.equal(d_new.mean, d_src.mean) and torch.equal(d_new.std, d_src.std)
            assert torch.equal(fresh.decode(d_src.mean).sample, source.decode(d_src.mean).sample)


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_vae_matches_the_compvis_equations(kind: str) -> None:
    sd, _, cfg = compvis_vae(kind)
    dd = tiny_ddconfig() if kind == "vq" else tiny_ddconfig(double_z=True, z_channels=4)
    vae = build_vae(cfg).double().eval()
    vae.load_state_dict(convert_vae_state_dict(sd, vae), strict=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    moments = _conv(sd, "quant_conv", ref_encoder(sd, dd, x))
    with torch.no_grad():
        if kind == "vq":
            torch.testing.assert_close(vae.encode(x).latents, moments, rtol=0, atol=1e-10)
            torch.testing.assert_close(vae.decode(moments).sample, ref_vq_decode(sd, dd, moments), rtol=0, atol=1e-10)
        else:  # DiagonalGaussian: moments = [mean, logvar]; decode(z) = decoder(post_quant_conv(z))
            mean, logvar = moments.chunk(2, dim=1)
            dist = vae.encode(x).latent_dist
            torch.testing.assert_close(dist.mean, mean, rtol=0, atol=1e-10)
            torch.testing.assert_close(dist.logvar, logvar.clamp(-30.0, 20.0), rtol=0, atol=1e-10)
            z = mean
            ref = ref_decoder(sd, dd, _conv(sd, "post_quant_conv", z))
            torch.testing.assert_close(vae.decode(z).sample, ref, rtol=0, atol=1e-10)


def test_vq_f4_and_kl_f8_maps_reverse_the_decoder_levels() -> None:
    from train.tools.convert_compvis import KL_F8_DDCONFIG, VQ_F4_DDCONFIG

    vq_cfg = compvis_first_stage_config(VQ_F4_DDCONFIG, embed_dim=3, n_embed=8192)
    kl_cfg = compvis_first_stage_config(KL_F8_DDCONFIG, embed_dim=4, scaling_factor=0.18215)
    assert vq_cfg["block_out_channels"] == (128, 256, 512) and vq_cfg["vq_embed_dim"] == 3
    assert vq_cfg["down_block_types"] == ("DownEncoderBlock2D",) * 3 and vq_cfg["scaling_factor"] == 1.0
    for cfg in (vq_cfg, kl_cfg):
        with torch.device("meta"):
            vae = build_vae(cfg)
        mapping = compvis_to_diffusers_vae_keys(vae)
        assert sorted(mapping.values()) == sorted(vae.state_dict())  # every tensor, once
    m = compvis_to_diffusers_vae_keys(vq_cfg)
    # decoder.up.{level}: up.2 (512 channels, lowest resolution) runs first = up_blocks.0
    assert m["decoder.up.2.block.0.conv1.weight"] == "decoder.up_blocks.0.resnets.0.conv1.weight"
    assert m["decoder.up.2.upsample.conv.weight"] == "decoder.up_blocks.0.upsamplers.0.conv.weight"
    assert m["decoder.up.1.block.0.nin_shortcut.weight"] == "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
    assert m["decoder.up.0.block.2.conv2.bias"] == "decoder.up_blocks.2.resnets.2.conv2.bias"
    assert not any(k.startswith("decoder.up.0.upsample") or k.startswith("encoder.down.2.downsample") for k in m)
    assert m["encoder.down.1.block.0.nin_shortcut.weight"] == "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"
    assert m["encoder.mid.attn_1.proj_out.weight"] == "encoder.mid_block.attentions.0.to_out.0.weight"
    assert m["decoder.mid.attn_1.norm.bias"] == "decoder.mid_block.attentions.0.group_norm.bias"
    assert m["quantize.embedding.weight"] == "quantize.embedding.weight"
    k = compvis_to_diffusers_vae_keys(kl_cfg)
    assert k["decoder.up.3.upsample.conv.weight"] == "decoder.up_blocks.0.upsamplers.0.conv.weight"
    assert "quantize.embedding.weight" not in k and k["quant_conv.weight"] == "quant_conv.weight"


def test_vae_unknown_missing_and_mis_shaped_keys_are_named() -> None:
    sd, vae, _ = compvis_vae("vq")
    sd["encoder.down.0.attn.0.q.weight"] = torch.zeros(8, 8, 1, 1)  # level 0 has no attention
    del sd["decoder.up.1.upsample.conv.bias"]
    sd["quantize.embedding.weight"] = torch.zeros(32, 3)
    with pytest.raises(ValueError) as err:
        convert_vae_state_dict(sd, vae, source="vq-f4.safetensors")
    msg = str(err.value)
    assert msg.startswith("vq-f4.safetensors: the CompVis first stage does not match")
    assert "unknown CompVis keys 1 (encoder.down.0.attn.0.q.weight)" in msg
    assert "without a value in the checkpoint 1 (decoder.up_blocks.1.upsamplers.0.conv.bias)" in msg
    assert "quantize.embedding.weight -> quantize.embedding.weight: checkpoint (32, 3) vs model (16, 3)" in msg
    assert "attn_resolutions" in msg and "--vae-config" in msg  # the fix


def test_first_stage_options_without_a_diffusers_counterpart_are_refused() -> None:
    with pytest.raises(ValueError, match="embed_dim=3 != z_channels=4"):
        compvis_first_stage_config(tiny_ddconfig(double_z=True, z_channels=4), embed_dim=3)
    with pytest.raises(ValueError, match="attn_type='linear'"):
        compvis_first_stage_config(tiny_ddconfig(attn_type="linear"), embed_dim=3, n_embed=16)
    with pytest.raises(ValueError, match="double_z=True"):
        compvis_first_stage_config(tiny_ddconfig(double_z=True), embed_dim=3, n_embed=16)


# ------------------------------------------------------------------------------------- legacy-attention UNet
def tiny_params(**overrides: Any) -> dict[str, Any]:
    """CompVis unet_config.params at toy size: 3 levels, attention at ds 2 and 4, 4-channel heads."""
    p: dict[str, Any] = dict(image_size=8, in_channels=3, out_channels=3, model_channels=8, channel_mult=[1, 2, 3],
                             num_res_blocks=1, attention_resolutions=[2, 4], num_head_channels=4)
    p.update(overrides)
    return p


def tiny_unet2d(params: dict[str, Any], seed: int = 0) -> UNet2DModel:
    cfg = compvis_unet_config(params, per_block_heads=True)  # no effect unless the head dim changes per level
    cfg["norm_num_groups"] = cfg["attn_norm_num_groups"] = GROUPS
    return randomize(build_unet(cfg), seed)


def ref_timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """openaimodel.timestep_embedding: [cos, sin] of t * 10000^(-i / half), computed in float32 as CompVis does."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(torch.float64)


def ref_attention_block(sd: dict[str, Tensor], pre: str, x: Tensor, heads: int, order: str = "legacy") -> Tensor:
    """AttentionBlock: x + proj_out(QKVAttention[Legacy](qkv(norm(x)))) over the flattened positions."""
    b, c, hh, ww = x.shape
    xf = x.reshape(b, c, -1)
    qkv = F.conv1d(F.group_norm(xf, GROUPS, sd[f"{pre}.norm.weight"], sd[f"{pre}.norm.bias"], eps=1e-5),
                   sd[f"{pre}.qkv.weight"], sd[f"{pre}.qkv.bias"])  # (b, 3c, T)
    d, length = c // heads, xf.shape[-1]
    if order == "legacy":  # heads first: (b*H, 3d, T), then q | k | v
        q, k, v = qkv.reshape(b * heads, 3 * d, length).split(d, dim=1)
    else:  # q | k | v first, then heads
        q, k, v = (t.reshape(b * heads, d, length) for t in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(d))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, length)
    h = F.conv1d(a, sd[f"{pre}.proj_out.weight"], sd[f"{pre}.proj_out.bias"])
    return (xf + h).reshape(b, c, hh, ww)


def ref_resblock(sd: dict[str, Tensor], pre: str, x: Tensor, emb: Tensor, scale_shift: bool,
                 up: bool = False, down: bool = False) -> Tensor:
    """openaimodel.ResBlock: in_layers (norm, silu, [resample], conv), emb_layers, out_layers, skip_connection."""
    h = F.silu(_gn(sd, f"{pre}.in_layers.0", x, 1e-5))
    if up:
        h, x = F.interpolate(h, scale_factor=2.0, mode="nearest"), F.interpolate(x, scale_factor=2.0, mode="nearest")
    if down:
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    h = _conv(sd, f"{pre}.in_layers.2", h, padding=1)
    e = F.linear(F.silu(emb), sd[f"{pre}.emb_layers.1.weight"], sd[f"{pre}.emb_layers.1.bias"])[:, :, None, None]
    if scale_shift:
        scale, shift = e.chunk(2, dim=1)
        h = _gn(sd, f"{pre}.out_layers.0", h, 1e-5) * (1 + scale) + shift
    else:
        h = _gn(sd, f"{pre}.out_layers.0", h + e, 1e-5)
    h = _conv(sd, f"{pre}.out_layers.3", F.silu(h), padding=1)
    skip = _conv(sd, f"{pre}.skip_connection", x) if f"{pre}.skip_connection.weight" in sd else x
    return skip + h


def ref_unet(sd: dict[str, Tensor], p: dict[str, Any], x: Tensor, t: Tensor, order: str = "legacy") -> Tensor:
    """openaimodel.UNetModel.forward without context, walking the blocks in CompVis' construction order."""
    mc, mult, nrb = p["model_channels"], p["channel_mult"], p["num_res_blocks"]
    ss, updown = bool(p.get("use_scale_shift_norm")), bool(p.get("resblock_updown"))

    def heads(c: int) -> int:
        return c // p["num_head_channels"] if p.get("num_head_channels", -1) != -1 else p["num_heads"]

    emb = ref_timestep_embedding(t, mc)
    emb = F.linear(F.silu(F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
                   sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    h = _conv(sd, "input_blocks.0.0", x, padding=1)
    hs, n, ds = [h], 1, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            h = ref_resblock(sd, f"input_blocks.{n}.0", h, emb, ss)
            if ds in p["attention_resolutions"]:
                h = ref_attention_block(sd, f"input_blocks.{n}.1", h, heads(mc * m), order)
            hs.append(h)
            n += 1
        if level != len(mult) - 1:
            if updown:
                h = ref_resblock(sd, f"input_blocks.{n}.0", h, emb, ss, down=True)
            else:
                h = _conv(sd, f"input_blocks.{n}.0.op", h, stride=2, padding=1)
            hs.append(h)
            n += 1
            ds *= 2
    h = ref_resblock(sd, "middle_block.0", h, emb, ss)
    h = ref_attention_block(sd, "middle_block.1", h, heads(mc * mult[-1]), order)
    h = ref_resblock(sd, "middle_block.2", h, emb, ss)
    n = 0
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(nrb + 1):
            h = ref_resblock(sd, f"output_blocks.{n}.0", torch.cat([h, hs.pop()], dim=1), emb, ss)
            sub = 1
            if ds in p["attention_resolutions"]:
                h = ref_attention_block(sd, f"output_blocks.{n}.1", h, heads(mc * m), order)
                sub = 2
            if level and i == nrb:
                if updown:
                    h = ref_resblock(sd, f"output_blocks.{n}.{sub}", h, emb, ss, up=True)
                else:
                    h = F.interpolate(h, scale_factor=2.0, mode="nearest")
                    h = _conv(sd, f"output_blocks.{n}.{sub}.conv", h, padding=1)
                ds //= 2
            n += 1
    return _conv(sd, "out.2", F.silu(_gn(sd, "out.0", h, 1e-5)), padding=1)


UNET2D_VARIANTS = {
    "bedrooms-like": {},
    "two-heads-attn-everywhere": {"num_head_channels": 4, "attention_resolutions": [1, 2, 4], "num_res_blocks": 2},
    "churches-like-scale-shift-resblock-updown": {"use_scale_shift_norm": True, "resblock_updown": True,
                                                  "channel_mult": [1, 2, 2], "num_head_channels": 8},
    "new-attention-order": {"use_new_attention_order": True},
    "num-heads-per-block": {"num_head_channels": -1, "num_heads": 2},  # head dims 8 / 12 / 12 (mid)
}


@pytest.mark.parametrize("overrides", list(UNET2D_VARIANTS.values()), ids=list(UNET2D_VARIANTS))
def test_unet2d_round_trip_gives_identical_outputs(overrides: dict[str, Any]) -> None:
    params = tiny_params(**overrides)
    order = "new" if params.get("use_new_attention_order") else "legacy"
    source = tiny_unet2d(params)
    sd = unet_state_dict_to_compvis(source, prefix="model.diffusion_model.", qkv_order=order)
    fresh = tiny_unet2d(params, seed=5)
    fresh.load_state_dict(convert_unet_state_dict(sd, fresh, qkv_order=order), strict=True)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(fresh(x, t).sample, source(x, t).sample)


@pytest.mark.parametrize("overrides", list(UNET2D_VARIANTS.values()), ids=list(UNET2D_VARIANTS))
def test_unet2d_matches_the_compvis_equations(overrides: dict[str, Any]) -> None:
    params = tiny_params(**overrides)
    order = "new" if params.get("use_new_attention_order") else "legacy"
    sd = unet_state_dict_to_compvis(tiny_unet2d(params).double(), qkv_order=order)
    unet = tiny_unet2d(params, seed=5).double()
    unet.load_state_dict(convert_unet_state_dict(sd, unet, qkv_order=order), strict=True)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t).sample, ref_unet(sd, params, x, t, order), rtol=0, atol=1e-9)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_legacy_qkv_split_is_the_attention_block(heads: int) -> None:
    """One AttentionBlock (QKVAttentionLegacy) against diffusers' Attention loaded with the split qkv."""
    c = 8
    gen = torch.Generator().manual_seed(heads)
    sd = {"blk.norm.weight": torch.randn(c, generator=gen, dtype=torch.float64),
          "blk.norm.bias": torch.randn(c, generator=gen, dtype=torch.float64),
          "blk.qkv.weight": torch.randn(3 * c, c, 1, generator=gen, dtype=torch.float64),
          "blk.qkv.bias": torch.randn(3 * c, generator=gen, dtype=torch.float64),
          "blk.proj_out.weight": torch.randn(c, c, 1, generator=gen, dtype=torch.float64),
          "blk.proj_out.bias": torch.randn(c, generator=gen, dtype=torch.float64)}
    attn = Attention(c, heads=heads, dim_head=c // heads, norm_num_groups=GROUPS, eps=1e-5, residual_connection=True,
                     bias=True, upcast_softmax=True, _from_deprecated_attn_block=True).double().eval()
    q, k, v = split_qkv(sd["blk.qkv.weight"], heads, "legacy")
    qb, kb, vb = split_qkv(sd["blk.qkv.bias"], heads, "legacy")
    with torch.no_grad():
        attn.group_norm.weight.copy_(sd["blk.norm.weight"])
        attn.group_norm.bias.copy_(sd["blk.norm.bias"])
        for lin, w, b in ((attn.to_q, q, qb), (attn.to_k, k, kb), (attn.to_v, v, vb)):
            lin.weight.copy_(w[..., 0])
            lin.bias.copy_(b)
        attn.to_out[0].weight.copy_(sd["blk.proj_out.weight"][..., 0])
        attn.to_out[0].bias.copy_(sd["blk.proj_out.bias"])
        x = torch.randn(2, c, 4, 4, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(attn(x), ref_attention_block(sd, "blk", x, heads), rtol=0, atol=1e-12)
        if heads > 1:  # the per-head channel order matters: reading it as [Q, K, V] gives another function
            assert not torch.allclose(attn(x), ref_attention_block(sd, "blk", x, heads, order="new"), atol=1e-3)
    assert torch.equal(merge_qkv(q, k, v, heads, "legacy"), sd["blk.qkv.weight"])


def test_bedrooms_map_uses_the_compvis_block_numbering() -> None:
    from train.tools.convert_compvis import LAYOUTS

    cfg = compvis_unet_config(LAYOUTS["lsun_bedrooms-ldm-vq-4"]["unet_config"]["params"])
    assert cfg["_class_name"] == "UNet2DModel" and cfg["attention_head_dim"] == 32
    assert cfg["down_block_types"] == ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    with torch.device("meta"):
        unet = build_unet(cfg)
    mapping = compvis_to_diffusers_unet_keys(unet)
    flat = [t for v in mapping.values() for t in ((v,) if isinstance(v, str) else v)]
    assert sorted(flat) == sorted(unet.state_dict())  # every tensor, once
    assert mapping["input_blocks.4.1.qkv.weight"] == tuple(f"down_blocks.1.attentions.0.to_{n}.weight" for n in "qkv")
    assert mapping["input_blocks.4.1.proj_out.bias"] == "down_blocks.1.attentions.0.to_out.0.bias"
    assert mapping["input_blocks.3.0.op.weight"] == "down_blocks.0.downsamplers.0.conv.weight"
    assert mapping["middle_block.1.norm.weight"] == "mid_block.attentions.0.group_norm.weight"
    assert mapping["output_blocks.2.2.conv.weight"] == "up_blocks.0.upsamplers.0.conv.weight"
    assert mapping["output_blocks.9.0.skip_connection.weight"] == "up_blocks.3.resnets.0.conv_shortcut.weight"
    assert not any(k.startswith("output_blocks.11.1") for k in mapping)  # level 0 has no attention


def test_resblock_updown_map() -> None:
    params = tiny_params(use_scale_shift_norm=True, resblock_updown=True, channel_mult=[1, 2, 2],
                         attention_resolutions=[2])
    mapping = compvis_to_diffusers_unet_keys(tiny_unet2d(params))
    assert mapping["input_blocks.2.0.in_layers.0.weight"] == "down_blocks.0.downsamplers.0.norm1.weight"
    assert mapping["input_blocks.2.0.emb_layers.1.weight"] == "down_blocks.0.downsamplers.0.time_emb_proj.weight"
    assert mapping["output_blocks.1.1.in_layers.2.weight"] == "up_blocks.0.upsamplers.0.conv1.weight"  # no attn
    assert mapping["output_blocks.3.2.out_layers.3.bias"] == "up_blocks.1.upsamplers.0.conv2.bias"  # after attn


def test_unet2d_unknown_missing_and_mis_shaped_keys_are_named() -> None:
    params = tiny_params()
    unet = tiny_unet2d(params)
    sd = unet_state_dict_to_compvis(unet)
    sd["middle_block.1.qkv.weight"] = torch.zeros(3 * 24 + 1, 24, 1)
    del sd["output_blocks.3.1.proj_out.weight"]
    sd["input_blocks.9.0.in_layers.0.weight"] = torch.zeros(8)
    with pytest.raises(ValueError) as err:
        convert_unet_state_dict(sd, unet, source="bedrooms.ckpt")
    msg = str(err.value)
    assert "unknown CompVis keys 1 (input_blocks.9.0.in_layers.0.weight)" in msg
    assert "without a value in the checkpoint 1 (up_blocks.1.attentions.1.to_out.0.weight)" in msg
    assert ("middle_block.1.qkv.weight -> mid_block.attentions.0.to_q.weight/mid_block.attentions.0.to_k.weight/"
            "mid_block.attentions.0.to_v.weight: checkpoint (73, 24, 1) does not split into q, k, v of 6 heads") in msg
    assert "num_res_blocks" in msg and "--compvis-config" in msg


def test_unet2d_configs_without_a_compvis_counterpart_are_refused() -> None:
    cfg = compvis_unet_config(tiny_params(use_scale_shift_norm=True))
    cfg["norm_num_groups"] = GROUPS
    cfg.pop("attn_norm_num_groups")
    with pytest.raises(ValueError, match="attn_norm_num_groups"):
        compvis_to_diffusers_unet_keys(cfg)
    mixed = compvis_unet_config(tiny_params(resblock_updown=True))
    mixed["up_block_types"] = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    mixed["upsample_type"] = "conv"
    with pytest.raises(ValueError, match="mixes conv and ResBlock resampling"):
        compvis_to_diffusers_unet_keys(mixed)
    with pytest.raises(ValueError, match="center_input_sample"):
        compvis_to_diffusers_unet_keys({**compvis_unet_config(tiny_params()), "center_input_sample": True})


def test_per_block_heads_survive_save_and_load_but_must_be_applied(tmp_path: Path) -> None:
    params = tiny_params(num_head_channels=-1, num_heads=2)
    with pytest.raises(ValueError, match=r"num_heads=2 gives a different head dim per level \(level 1: 16 channels "
                                         r"/ 2 heads = 8, level 2: 24 channels / 2 heads = 12, middle: 24"):
        compvis_unet_config(params)
    source = tiny_unet2d(params)
    assert source.config.attention_head_dim == 4  # gcd(8, 12): the projections stay C x C
    assert getattr(source.config, HEADS_KEY) == {
        "down_blocks.1.attentions.0": 2, "down_blocks.2.attentions.0": 2, "mid_block.attentions.0": 2,
        "up_blocks.0.attentions.0": 2, "up_blocks.0.attentions.1": 2, "up_blocks.1.attentions.0": 2,
        "up_blocks.1.attentions.1": 2}
    source.save_pretrained(str(tmp_path / "unet"))
    loaded = UNet2DModel.from_pretrained(str(tmp_path / "unet")).eval()
    assert getattr(loaded.config, HEADS_KEY) == getattr(source.config, HEADS_KEY)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([10, 900])
    with torch.no_grad():
        assert not torch.allclose(loaded(x, t).sample, source(x, t).sample, atol=1e-4)  # 4 / 6 heads, not 2
        assert apply_attention_heads(loaded) == 7
        assert torch.equal(loaded(x, t).sample, source(x, t).sample)


def test_an_exported_student_reloads_with_the_per_block_heads(tmp_path: Path) -> None:
    """``qat.load_quantized`` builds the model from the export's config, which carries the head counts: it applies
    them, so the reload computes what the student computed (without them it would split 4 / 6 heads, not 2)."""
    import qat
    from qat.methods.efficientdm import EfficientDM, EfficientDMConfig

    source = tiny_unet2d(tiny_params(num_head_channels=-1, num_heads=2)).eval().requires_grad_(False)
    method = EfficientDM(EfficientDMConfig(weight_bits=8, act_bits=8, num_timesteps=2, lora_rank=2,
                                           act_init="minmax"))
    student, _ = method.build_student(source, "unet")
    qat.set_timestep_grid(student, [10, 900])
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([10, 900])

    def run(model: nn.Module) -> Tensor:
        with qat.timestep(model, t):
            return model(x, t).sample

    qat.calibrate(student, [x], lambda m, b: run(m))
    out = qat.export_quantized(student, tmp_path / "unet", convert_fn=method.convert)
    reloaded = qat.load_quantized(out)
    assert {m.heads for m in reloaded.modules() if isinstance(m, Attention)} == {2}
    with torch.no_grad():
        assert torch.equal(run(reloaded), run(student))


def test_load_teacher_applies_per_block_heads(tmp_path: Path) -> None:
    from diffusers import DDPMScheduler

    from train.config import TeacherConfig
    from train.models.teacher import load_teacher

    source = tiny_unet2d(tiny_params(num_head_channels=-1, num_heads=2)).eval().requires_grad_(False)  # as loaded
    source.save_pretrained(str(tmp_path / "unet"))
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(str(tmp_path / "scheduler"))
    teacher = load_teacher(TeacherConfig(path=str(tmp_path), conditioning="none"), "cpu")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(teacher.unet(x, t).sample, source(x, t).sample)
