"""CompVis LDM checkpoint -> DiffQAT teacher directory conversion (train.convert_compvis), on tiny CPU models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from torch import Tensor

from train.config import TeacherConfig
from train.convert_compvis import (
    CIN256_V2_UNET_CONFIG,
    SCHEDULER_CONFIG,
    compvis_to_diffusers_unet_keys,
    convert_checkpoint,
    convert_unet_state_dict,
    diffusers_to_compvis_unet_keys,
    load_compvis_state_dict,
    main,
)
from train.teacher import load_teacher


class NotATensor:
    """A custom class: unpickling it would need code from this module, which weights_only must refuse."""


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A cin256-v2-like UNet at toy size: 3 levels, attention at the two lower resolutions, one head."""
    cfg: dict[str, Any] = dict(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16, 24), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=1, norm_num_groups=4,
    )
    cfg.update(overrides)
    return cfg


def random_unet(cfg: dict[str, Any], seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg).eval()
    # Default init zeroes some output convs; randomize everything so that a swapped key changes the output.
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.2)
    return unet


def to_compvis(unet: UNet2DConditionModel, prefix: str = "") -> dict[str, Tensor]:
    """The unet's tensors under CompVis names; proj_in/proj_out as 1x1 convs as in CompVis' SpatialTransformer."""
    inverse = diffusers_to_compvis_unet_keys(unet.config)
    out = {}
    for key, value in unet.state_dict().items():
        if (".proj_in." in key or ".proj_out." in key) and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[prefix + inverse[key]] = value.clone()
    return out


def run(unet: UNet2DConditionModel, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    context = torch.randn(2, 1, cfg.cross_attention_dim, generator=gen)
    kwargs = {"class_labels": torch.tensor([0, cfg.num_class_embeds - 1])} if cfg.num_class_embeds else {}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 900]), encoder_hidden_states=context, **kwargs).sample


@pytest.mark.parametrize("overrides", [
    {},
    {"layers_per_block": 2, "transformer_layers_per_block": 2},
    {"use_linear_projection": True},
    {"down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
     "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"), "num_class_embeds": 5},
], ids=["lpb1", "lpb2-depth2", "linear-proj", "mixed-attn-label-emb"])
def test_round_trip_gives_identical_outputs(overrides: dict[str, Any]) -> None:
    source = random_unet(tiny_config(**overrides))
    converted = convert_unet_state_dict(to_compvis(source, prefix="model.diffusion_model."), source)
    fresh = UNet2DConditionModel(**tiny_config(**overrides)).eval()
    fresh.load_state_dict(converted, strict=True)
    assert torch.equal(run(fresh), run(source))


@pytest.mark.parametrize("cfg", [tiny_config(), tiny_config(layers_per_block=2), CIN256_V2_UNET_CONFIG],
                         ids=["tiny", "tiny-lpb2", "cin256-v2"])
def test_mapping_is_a_bijection_over_every_tensor(cfg: dict[str, Any]) -> None:
    with torch.device("meta"):  # the real-size model without allocating its 400M parameters
        unet = UNet2DConditionModel(**cfg)
    mapping = compvis_to_diffusers_unet_keys(unet.config)
    tensors = set(unet.state_dict()) | {name for name, _ in unet.named_buffers()}
    assert set(mapping.values()) == tensors
    assert len(set(mapping.values())) == len(mapping)  # injective
    inverse = diffusers_to_compvis_unet_keys(unet.config)
    assert {inverse[v]: v for v in mapping.values()} == mapping


def test_cin256_v2_map_uses_the_compvis_block_numbering() -> None:
    mapping = compvis_to_diffusers_unet_keys(CIN256_V2_UNET_CONFIG)
    # openaimodel numbering for 4 levels x 2 res blocks: 12 input blocks (conv_in, 8 res, 3 downsamplers),
    # 12 output blocks (3 per level), upsamplers after the transformer of the last block of levels 3..1.
    assert mapping["input_blocks.0.0.weight"] == "conv_in.weight"
    assert mapping["input_blocks.3.0.op.weight"] == "down_blocks.0.downsamplers.0.conv.weight"
    assert mapping["input_blocks.4.1.proj_in.weight"] == "down_blocks.1.attentions.0.proj_in.weight"
    assert mapping["input_blocks.4.0.skip_connection.weight"] == "down_blocks.1.resnets.0.conv_shortcut.weight"
    assert "input_blocks.2.0.skip_connection.weight" not in mapping  # 192 -> 192 needs no shortcut
    assert mapping["middle_block.2.out_layers.3.weight"] == "mid_block.resnets.1.conv2.weight"
    assert mapping["output_blocks.2.2.conv.weight"] == "up_blocks.0.upsamplers.0.conv.weight"
    assert mapping["output_blocks.8.2.conv.weight"] == "up_blocks.2.upsamplers.0.conv.weight"
    assert mapping["output_blocks.11.0.emb_layers.1.bias"] == "up_blocks.3.resnets.2.time_emb_proj.bias"
    assert mapping["output_blocks.7.1.transformer_blocks.0.attn2.to_k.weight"] == \
        "up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight"
    assert mapping["out.2.weight"] == "conv_out.weight"
    assert mapping["time_embed.2.bias"] == "time_embedding.linear_2.bias"
    assert not any(k.startswith("input_blocks.12") or k.startswith("output_blocks.12") for k in mapping)


def test_unknown_and_missing_keys_are_named() -> None:
    unet = random_unet(tiny_config())
    sd = to_compvis(unet)
    sd["input_blocks.1.0.bogus.weight"] = torch.zeros(3)
    del sd["middle_block.1.proj_out.bias"]
    with pytest.raises(ValueError) as err:
        convert_unet_state_dict(sd, unet, source="ckpt.safetensors")
    msg = str(err.value)
    assert "ckpt.safetensors" in msg
    assert "unknown CompVis keys 1 (input_blocks.1.0.bogus.weight)" in msg
    assert "mid_block.attentions.0.proj_out.bias" in msg


def test_wrong_shape_names_both_shapes() -> None:
    unet = random_unet(tiny_config())
    sd = to_compvis(unet)
    sd["out.2.weight"] = torch.zeros(4, 8, 3, 3)
    with pytest.raises(ValueError, match=r"out\.2\.weight -> conv_out\.weight: checkpoint \(4, 8, 3, 3\) vs model "
                                         r"\(3, 8, 3, 3\)") as err:
        convert_unet_state_dict(sd, unet)
    assert "without a value" not in str(err.value)  # a wrong-shaped key is not also reported as missing


def test_unsupported_config_is_refused() -> None:
    with pytest.raises(ValueError, match="addition_embed_type"):
        compvis_to_diffusers_unet_keys(tiny_config(addition_embed_type="text"))


def write_ldm(path: Path, unet: UNet2DConditionModel, num_classes: int = 4) -> Tensor:
    """A CompVis-style LatentDiffusion state dict: UNet, class table (null row last) and the schedule buffers."""
    table = torch.randn(num_classes + 1, unet.config.cross_attention_dim)
    sd = to_compvis(unet, prefix="model.diffusion_model.")
    sd["cond_stage_model.embedding.weight"] = table
    betas = torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=torch.float64) ** 2  # LDM "linear"
    sd["betas"] = betas.float()
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, str(path))
    return table


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_convert_checkpoint_writes_a_loadable_teacher(tmp_path: Path, suffix: str) -> None:
    source = random_unet(tiny_config())
    ckpt = tmp_path / f"ldm{suffix}"
    table = write_ldm(ckpt, source)
    out = convert_checkpoint(ckpt, tmp_path / "teacher", unet_config=tiny_config())
    teacher = load_teacher(TeacherConfig(path=str(out), conditioning="class"))
    assert torch.equal(run(teacher.unet), run(source))
    assert teacher.num_classes == table.shape[0] - 1
    cond, uncond = teacher.contexts(torch.tensor([2]))
    assert torch.equal(cond[0, 0], table[2]) and torch.equal(uncond[0, 0], table[-1])
    ref = DDPMScheduler(**SCHEDULER_CONFIG)
    assert torch.allclose(teacher.scheduler.alphas_cumprod, ref.alphas_cumprod)
    assert teacher.scheduler.config.steps_offset == 1 and not teacher.scheduler.config.clip_sample


def test_betas_mismatch_is_refused(tmp_path: Path) -> None:
    source = random_unet(tiny_config())
    ckpt = tmp_path / "ldm.safetensors"
    write_ldm(ckpt, source)
    with pytest.raises(ValueError, match=r"ldm\.safetensors: key 'betas'"):
        convert_checkpoint(ckpt, tmp_path / "t", unet_config=tiny_config(), scheduler_config={"beta_end": 0.012})


def test_pickled_object_is_refused_with_safetensors_advice(tmp_path: Path) -> None:
    source = random_unet(tiny_config())
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": to_compvis(source, prefix="model.diffusion_model."), "x": NotATensor()}, str(ckpt))
    with pytest.raises(ValueError, match="evil.ckpt: refused to unpickle") as err:
        load_compvis_state_dict(ckpt)
    assert "safetensors" in str(err.value)
    with pytest.raises(ValueError, match="refused to unpickle"):
        convert_checkpoint(ckpt, tmp_path / "t", unet_config=tiny_config())
    assert not (tmp_path / "t").exists()


def test_plain_tensor_ckpt_is_accepted(tmp_path: Path) -> None:
    sd = {"model.diffusion_model.out.2.bias": torch.arange(3.0)}
    torch.save({"state_dict": sd}, str(tmp_path / "plain.ckpt"))
    assert torch.equal(load_compvis_state_dict(tmp_path / "plain.ckpt")["model.diffusion_model.out.2.bias"],
                       torch.arange(3.0))


def test_checkpoint_without_unet_is_refused(tmp_path: Path) -> None:
    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)}, str(tmp_path / "vq.safetensors"))
    with pytest.raises(ValueError, match=r"vq\.safetensors: no 'model\.diffusion_model\.\*' keys"):
        convert_checkpoint(tmp_path / "vq.safetensors", tmp_path / "t", unet_config=tiny_config())


def test_cli_converts_with_a_unet_config_file(tmp_path: Path) -> None:
    import json

    source = random_unet(tiny_config())
    write_ldm(tmp_path / "ldm.safetensors", source)
    cfg_path = tmp_path / "unet.json"
    cfg_path.write_text(json.dumps(tiny_config()))
    assert main([str(tmp_path / "ldm.safetensors"), str(tmp_path / "out"), "--unet-config", str(cfg_path)]) == 0
    loaded = UNet2DConditionModel.from_pretrained(str(tmp_path / "out"), subfolder="unet").eval()
    assert torch.equal(run(loaded), run(source))
    assert (tmp_path / "out" / "class_embedder" / "config.json").exists()
