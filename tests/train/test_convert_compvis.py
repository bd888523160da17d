"""CompVis LDM checkpoint -> DiffQAT teacher directory conversion (train.tools.convert_compvis), on tiny CPU models:
the SpatialTransformer UNet map, layouts, full checkpoints (UNet + first stage + class table) loaded by load_teacher,
the CLI, and the EfficientDM layer-map check. The first-stage and legacy-attention maps: test_convert_compvis_parts."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from torch import Tensor

from train.config import TeacherConfig
from train.models.pipeline import QATDiffusionPipeline
from train.models.teacher import load_teacher
from train.tools.convert_compvis import (
    CIN256_V2_UNET_CONFIG,
    LAYOUTS,
    SCHEDULER_CONFIG,
    compvis_to_diffusers_unet_keys,
    convert_checkpoint,
    convert_unet_state_dict,
    diffusers_to_compvis_unet_keys,
    efficientdm_layer_check,
    load_compvis_state_dict,
    main,
    teacher_spec,
)
from train.tools.convert_compvis_unet import build_unet, compvis_unet_config, unet_state_dict_to_compvis
from train.tools.convert_compvis_vae import build_vae, compvis_first_stage_config, vae_state_dict_to_compvis


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread (thread hand-offs cost more than the work, far more on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    source = random_unet(tiny_config())
    write_ldm(tmp_path / "ldm.safetensors", source)
    cfg_path = tmp_path / "unet.json"
    cfg_path.write_text(json.dumps(tiny_config()))
    assert main([str(tmp_path / "ldm.safetensors"), str(tmp_path / "out"), "--unet-config", str(cfg_path)]) == 0
    loaded = UNet2DConditionModel.from_pretrained(str(tmp_path / "out"), subfolder="unet").eval()
    assert torch.equal(run(loaded), run(source))
    assert (tmp_path / "out" / "class_embedder" / "config.json").exists()


# ------------------------------------------------------------------------------- full checkpoints, first stages
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random N(0, 0.2) weights, frozen like a loaded teacher: with weights that require grad, torch takes another
    kernel path for 3-D ``F.linear`` (attention projections) even under no_grad, which changes the last bits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.requires_grad_(False).eval()


def tiny_vq_config() -> dict[str, Any]:
    """A VQ-f4-like first stage at toy size (3 levels, 8x8 latents of 32x32 images), GroupNorm of 4 groups."""
    dd = dict(double_z=False, z_channels=3, resolution=32, in_channels=3, out_ch=3, ch=8, ch_mult=[1, 2, 2],
              num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    return {**compvis_first_stage_config(dd, embed_dim=3, n_embed=16), "norm_num_groups": 4}


def betas(beta_end: float = 0.0195) -> Tensor:
    return (torch.linspace(0.0015 ** 0.5, beta_end ** 0.5, 1000, dtype=torch.float64) ** 2).float()


def test_layouts_translate_to_the_diffusers_configs() -> None:
    cin = teacher_spec(LAYOUTS["cin256-v2"])
    assert cin.unet_config == {"_class_name": "UNet2DConditionModel", **CIN256_V2_UNET_CONFIG}
    assert cin.vae_config["_class_name"] == "VQModel" and cin.vae_subfolder == "vqvae"
    assert (cin.vae_config["num_vq_embeddings"], cin.vae_config["vq_embed_dim"]) == (8192, 3)
    assert cin.vae_config["scaling_factor"] == 1.0 and cin.conditioning == "class"
    assert cin.scheduler_config == SCHEDULER_CONFIG
    bed = teacher_spec(LAYOUTS["lsun_bedrooms-ldm-vq-4"])
    assert bed.unet_config["_class_name"] == "UNet2DModel" and bed.conditioning == "none"
    assert bed.vae_subfolder == "vqvae" and bed.qkv_order == "legacy"
    church = teacher_spec(LAYOUTS["lsun_churches-ldm-kl-8"], lazy_unet=True)
    assert church.vae_config["_class_name"] == "AutoencoderKL" and church.vae_subfolder == "vae"
    assert church.scale_by_std and church.scheduler_config["beta_end"] == 0.0155
    with pytest.raises(ValueError, match=r"num_heads=8 gives a different head dim per level \(level 0: 192 "
                                         r"channels / 8 heads = 24, .*middle: 768 channels / 8 heads = 96\).*"
                                         r"--per-block-heads"):
        teacher_spec(LAYOUTS["lsun_churches-ldm-kl-8"])
    ldm8 = teacher_spec(LAYOUTS["lsun_churches-ldm-kl-8"], per_block_heads=True).unet_config
    assert ldm8["attention_head_dim"] == 24 and ldm8["resnet_time_scale_shift"] == "scale_shift"
    assert ldm8["down_block_types"] == ("AttnDownBlock2D",) * 4 + ("ResnetDownsampleBlock2D",)
    assert ldm8["up_block_types"] == ("ResnetUpsampleBlock2D",) + ("AttnUpBlock2D",) * 4
    heads = ldm8["_compvis_attention_heads"]
    assert len(heads) == 4 * 2 + 1 + 4 * 3 and set(heads.values()) == {8}
    with torch.device("meta"):
        unet = build_unet(ldm8)
    assert {unet.get_submodule(n).heads for n in heads} == {8}


def test_class_conditional_checkpoint_converts_to_a_teacher_that_decodes(tmp_path: Path) -> None:
    unet = random_unet(tiny_config()).requires_grad_(False)  # frozen like the teacher, see randomize()
    vq = randomize(build_vae(tiny_vq_config()), seed=1)
    table = torch.randn(5, 8)
    sd = {**to_compvis(unet, prefix="model.diffusion_model."),
          **vae_state_dict_to_compvis(vq, prefix="first_stage_model."),
          "cond_stage_model.embedding.weight": table, "betas": betas(), "model_ema.decay": torch.tensor(0.9999)}
    save_file(sd, str(tmp_path / "ldm.safetensors"))
    out = convert_checkpoint(tmp_path / "ldm.safetensors", tmp_path / "teacher", unet_config=tiny_config(),
                             vae_config=tiny_vq_config())
    assert sorted(p.name for p in out.iterdir()) == ["class_embedder", "scheduler", "unet", "vqvae"]
    teacher = load_teacher(TeacherConfig(path=str(out), conditioning="class", vae_subfolder="vqvae"))
    assert type(teacher.vae).__name__ == "VQModel" and teacher.vae.config.scaling_factor == 1.0
    assert torch.equal(run(teacher.unet), run(unet))
    # Evaluation decodes the sampled latents with the converted VQ-f4 decoder (quantize, post_quant_conv, decoder).
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 3])
    images = QATDiffusionPipeline.from_teacher(teacher)(noise, labels, num_inference_steps=2, guidance_scale=2.0)
    latents = QATDiffusionPipeline(teacher.unet, teacher.ddim(2), teacher.class_embedder)(
        noise, labels, num_inference_steps=2, guidance_scale=2.0)
    assert images.images.shape == (2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(images.images, vq.decode(latents.images).sample)


def write_compvis_yaml(path: Path, scale_by_std: bool = True) -> dict[str, Any]:
    """A CompVis LSUN-churches-style yaml (unconditional, scale-shift norm, ResBlock resampling, KL first stage) at
    a size where CompVis' 32 GroupNorm groups still fit; returns its model.params."""
    params = {
        "linear_start": 0.0015, "linear_end": 0.0155, "timesteps": 1000, "scale_by_std": scale_by_std,
        "cond_stage_config": "__is_unconditional__",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 4, "in_channels": 4, "out_channels": 4, "model_channels": 32, "channel_mult": [1, 2],
            "num_res_blocks": 1, "attention_resolutions": [1, 2], "num_head_channels": 16,
            "use_scale_shift_norm": True, "resblock_updown": True}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 8, "in_channels": 3,
                                         "out_ch": 3, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                                         "attn_resolutions": [4], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
    }
    path.write_text(json.dumps({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                                          "params": params}}))  # JSON is YAML
    return params


def test_cli_converts_an_unconditional_kl_checkpoint_from_its_compvis_yaml(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    params = write_compvis_yaml(tmp_path / "churches-tiny.yaml")
    spec = teacher_spec(params)
    unet = randomize(build_unet(spec.unet_config))
    kl = randomize(build_vae(spec.vae_config), seed=1)
    sd = {**unet_state_dict_to_compvis(unet, prefix="model.diffusion_model."),
          **vae_state_dict_to_compvis(kl, prefix="first_stage_model."),
          "scale_factor": torch.tensor(0.75), "betas": betas(0.0155), "logvar": torch.zeros(1000)}
    torch.save({"state_dict": sd}, str(tmp_path / "churches.ckpt"))
    with caplog.at_level(logging.INFO, logger="train.tools.convert_compvis"):
        assert main([str(tmp_path / "churches.ckpt"), str(tmp_path / "out"),
                     "--compvis-config", str(tmp_path / "churches-tiny.yaml")]) == 0
    assert "wrote " in capsys.readouterr().out
    assert "teacher.conditioning=none teacher.vae_subfolder=vae" in caplog.text
    assert "EfficientDM layer map" in caplog.text and "(checked: identical)" in caplog.text
    teacher = load_teacher(TeacherConfig(path=str(tmp_path / "out"), conditioning="none", vae_subfolder="vae"))
    assert type(teacher.unet).__name__ == "UNet2DModel" and teacher.sample_shape == (4, 4, 4)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(teacher.unet(x, t).sample, unet(x, t).sample)
        assert teacher.vae.config.scaling_factor == 0.75
        assert torch.equal(teacher.vae.decode(x).sample, kl.decode(x).sample)
    assert teacher.scheduler.config.beta_end == 0.0155


def test_scale_by_std_checkpoint_without_its_scale_is_refused(tmp_path: Path) -> None:
    params = write_compvis_yaml(tmp_path / "m.yaml")
    spec = teacher_spec(params)
    sd = {**unet_state_dict_to_compvis(build_unet(spec.unet_config), prefix="model.diffusion_model."),
          **vae_state_dict_to_compvis(build_vae(spec.vae_config), prefix="first_stage_model.")}
    save_file(sd, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match=r"m\.safetensors: the layout has scale_by_std=True but the checkpoint has "
                                         r"no 'scale_factor'"):
        convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "t", layout=params)


def test_first_stage_that_does_not_match_the_layout_is_named(tmp_path: Path) -> None:
    unet = random_unet(tiny_config())
    other = {**tiny_vq_config(), "layers_per_block": 2}  # the checkpoint's first stage has 2 res blocks per level
    sd = {**to_compvis(unet, prefix="model.diffusion_model."),
          **vae_state_dict_to_compvis(build_vae(other), prefix="first_stage_model.")}
    save_file(sd, str(tmp_path / "ldm.safetensors"))
    with pytest.raises(ValueError) as err:
        convert_checkpoint(tmp_path / "ldm.safetensors", tmp_path / "t", unet_config=tiny_config(),
                           vae_config=tiny_vq_config())
    msg = str(err.value)
    assert "ldm.safetensors: the CompVis first stage does not match the diffusers config" in msg
    assert "unknown CompVis keys 48 (decoder.up.0.block.2.conv1.bias" in msg
    assert "num_res_blocks" in msg and "--vae-config" in msg


def test_unsupported_conditioning_model_is_named(tmp_path: Path) -> None:
    sd = {**to_compvis(random_unet(tiny_config()), prefix="model.diffusion_model."),
          "cond_stage_model.transformer.token_emb.weight": torch.zeros(4, 8)}
    save_file(sd, str(tmp_path / "txt.safetensors"))
    with pytest.raises(ValueError, match=r"cond_stage_model keys 1 \(cond_stage_model\.transformer\.token_emb\."
                                         r"weight\) are not supported"):
        convert_checkpoint(tmp_path / "txt.safetensors", tmp_path / "t", unet_config=tiny_config())


# ------------------------------------------------------------------------------------------ EfficientDM layer map
def meta_unet(cfg: dict[str, Any]) -> torch.nn.Module:
    with torch.device("meta"):
        return build_unet(cfg)


def test_efficientdm_layer_map_of_cin256_is_the_reference() -> None:
    check = efficientdm_layer_check(meta_unet(CIN256_V2_UNET_CONFIG))
    # dossier Sec. 3.3: 265 quantized modules, 4 of them W8A8 without LoRA; 15 skip 1x1 convs + 3 downsamplers FP
    assert check.counts(check.reference) == {"W8A8": 4, "QALoRA": 261, "FP": 18}
    assert check.mismatches == [] and str(check).endswith("identical")
    assert {n for n, r in check.spec.items() if r == "W8A8"} == {
        "time_embedding.linear_1", "time_embedding.linear_2", "conv_in", "conv_out"}


def test_efficientdm_layer_map_of_lsun_unets_needs_the_attention_exclusion() -> None:
    bedrooms = meta_unet(compvis_unet_config(LAYOUTS["lsun_bedrooms-ldm-vq-4"]["unet_config"]["params"]))
    check = efficientdm_layer_check(bedrooms)
    # 73 quantized: the reference code's count for LSUN-bedrooms LDM-4; FP: 64 attention Conv1d + 15 skip + 3 op
    assert check.counts(check.reference) == {"W8A8": 4, "QALoRA": 69, "FP": 82}
    assert {n.split(".attentions.")[1].split(".", 1)[1] for n, _, _ in check.mismatches} == \
        {"to_q", "to_k", "to_v", "to_out.0"}
    assert len(check.mismatches) == 16 * 4  # 16 AttentionBlocks x 4 projections, QALoRA here
    assert check.fix == {"extra_exclude": ["*.attentions.*"]}
    assert 'efficientdm.extra_exclude=["*.attentions.*"] (checked: identical)' in str(check)
    assert efficientdm_layer_check(bedrooms, extra_exclude=["*.attentions.*"]).mismatches == []


def test_efficientdm_layer_map_of_a_resblock_updown_unet_keeps_the_downsampling_resblocks() -> None:
    # LDM-8 (churches) with 24-channel heads instead of 8 heads: the layer count does not depend on the head layout.
    # The reference quantizes its down-sampling ResBlocks (no module named 'op'); '*.downsamplers.*' would not.
    params = dict(LAYOUTS["lsun_churches-ldm-kl-8"]["unet_config"]["params"], num_heads=-1, num_head_channels=24)
    check = efficientdm_layer_check(meta_unet(compvis_unet_config(params)))
    assert sum(check.counts(check.reference)[r] for r in ("W8A8", "QALoRA")) == 109  # the reference's LDM-8 count
    assert {(r, s) for n, r, s in check.mismatches if ".downsamplers." in n} == {("QALoRA", "FP")}
    assert check.fix == {"extra_exclude": ["*.attentions.*"], "exclude_patterns": ["*.conv_shortcut"]}
