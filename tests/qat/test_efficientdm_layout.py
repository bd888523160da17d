"""The EfficientDM layer map on the LDM-4 ImageNet UNet (dossier Sec. 3.3 and 7.3).

The reference code wraps 265 modules of ``cin256-v2`` (``total_count = 265``): 4 W8A8 layers without LoRA (the
two time-embedding linears, the first and the last conv) and 261 QALoRA layers; the 15 residual-shortcut 1x1 convs
and the 3 downsampler convs stay in full precision. The 400M-parameter UNet is built on the meta device (no
memory, no init time): ``prepare`` only needs module types, names and shapes.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

import qat
from qat.methods.efficientdm import EfficientDM, EfficientDMConfig, efficientdm_spec
from qat.nn import QuantConv2d, QuantLinear
from qat.nn.qalora import qalora_layers
from qat.quantizers import LSQQuantizer, TemporalLSQQuantizer, UniformQuantizer

SPECIAL = {"time_embedding.linear_1", "time_embedding.linear_2", "conv_in", "conv_out"}


def ldm4_unet() -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(
            block_out_channels=(192, 384, 576, 960), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=512, attention_head_dim=1, in_channels=3, out_channels=3, sample_size=64,
        )


@pytest.fixture(scope="module")
def ldm4():
    model = ldm4_unet()
    float_names = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    report = qat.prepare(model, efficientdm_spec(EfficientDMConfig()))
    return model, report, float_names


def test_model_is_the_ldm4_size() -> None:
    n = sum(p.numel() for p in ldm4_unet().parameters())
    assert 390e6 < n < 410e6  # ~401M parameters, the LDM-4 ImageNet UNet


def test_totals(ldm4) -> None:
    model, report, float_names = ldm4
    assert len(report.rows) == 265  # the reference code's total_count
    assert report.counts() == {"W8A8": 4, "W4A4+LoRA": 261}
    assert len(report.excluded) == 18
    assert len(float_names) == 265 + 18
    assert {r[0] for r in report.rows} | set(report.excluded) == float_names


def test_special_layers_are_w8a8_frozen_without_lora(ldm4) -> None:
    model, report, _ = ldm4
    assert {r[0] for r in report.rows if r[4] == 0} == SPECIAL
    for name in SPECIAL:
        layer = model.get_submodule(name)
        assert type(layer) in (QuantLinear, QuantConv2d)  # not wrapped by peft: no adapter
        for q in (layer.weight_quantizer, layer.act_quantizer):
            assert isinstance(q, UniformQuantizer) and q.config.n_bits == 8
        assert layer.weight_quantizer.config.granularity == "channel"
        assert not any(p.requires_grad for p in layer.parameters())
    assert all(not r[5] for r in report.rows if r[0] in SPECIAL)


def test_full_precision_layers(ldm4) -> None:
    model, report, _ = ldm4
    excluded = set(report.excluded)
    shortcuts = {n for n in excluded if n.endswith(".conv_shortcut")}
    downsamplers = {n for n in excluded if ".downsamplers." in n}
    # conv_shortcut where a ResNet changes channels: down_blocks.{1,2,3}.resnets.0 (192->384, 384->576,
    # 576->960) = 3, plus all 12 up-block ResNets (their input is concatenated with a skip connection) = 15.
    assert len(shortcuts) == 15
    assert {n for n in shortcuts if n.startswith("down_blocks")} == {
        f"down_blocks.{i}.resnets.0.conv_shortcut" for i in (1, 2, 3)}
    # Downsamplers: every down block but the last one = 3.
    assert downsamplers == {f"down_blocks.{i}.downsamplers.0.conv" for i in (0, 1, 2)}
    assert excluded == shortcuts | downsamplers
    for name in excluded:
        assert type(model.get_submodule(name)) is nn.Conv2d


def _kind(name: str) -> str:
    parts = name.split(".")
    if "resnets" in parts:
        return "resnet"  # conv1, conv2, time_emb_proj
    if "upsamplers" in parts:
        return "upsampler"
    if parts[-1] in ("proj_in", "proj_out"):
        return "transformer_proj"
    if "ff" in parts:
        return "feed_forward"  # ff.net.0.proj (GEGLU), ff.net.2
    if "attn1" in parts or "attn2" in parts:
        return "attention_proj"  # to_q, to_k, to_v, to_out.0
    return "other"


def test_qalora_breakdown_by_kind(ldm4) -> None:
    model, report, _ = ldm4
    lora = [r[0] for r in report.rows if r[4]]
    kinds = collections.Counter(_kind(n) for n in lora)
    # ResNets: down 4 blocks x 2 + mid 2 + up 4 blocks x 3 = 22 ResNets, each conv1, conv2, time_emb_proj: 66.
    # Transformer2DModels (one per ResNet of a cross-attention block): down 3 x 2 + mid 1 + up 3 x 3 = 16.
    #   each with proj_in and proj_out (1x1 convs in LDM, Linear here): 16 x 2 = 32;
    #   attn1 (self) and attn2 (cross, context 512-d) with to_q, to_k, to_v, to_out.0: 16 x 2 x 4 = 128;
    #   feed-forward ff.net.0.proj (GEGLU) and ff.net.2: 16 x 2 = 32.
    # Upsampler 3x3 convs: every up block but the last = 3.
    # 66 + 32 + 128 + 32 + 3 = 261.
    assert kinds == {"resnet": 66, "transformer_proj": 32, "attention_proj": 128, "feed_forward": 32,
                     "upsampler": 3}
    suffixes = collections.Counter(n.rsplit(".", 1)[-1] for n in lora if _kind(n) == "resnet")
    assert suffixes == {"conv1": 22, "conv2": 22, "time_emb_proj": 22}
    # The cross-attention keys and values read the 512-d class context.
    assert model.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2.to_k").in_features == 512


def test_qalora_layers_are_w4a4_with_temporal_lsq(ldm4) -> None:
    model, report, _ = ldm4
    layers = qalora_layers(model)
    assert len(layers) == 261
    n_table = 0
    for layer in layers.values():
        assert layer.r["default"] == 32 and layer.scaling["default"] == 1.0
        base = layer.get_base_layer()
        wq, aq = base.weight_quantizer, base.act_quantizer
        assert type(wq) is LSQQuantizer and wq.config.n_bits == 4 and wq.config.granularity == "channel"
        assert not wq.config.learn_offset and wq.step.requires_grad
        assert isinstance(aq, TemporalLSQQuantizer) and aq.config.n_bits == 4
        assert aq.config.learn_offset and aq.config.num_timesteps == 100 and aq.config.granularity == "tensor"
        assert aq.step.requires_grad and aq.zero_point.requires_grad
        n_table += aq.step.numel() + aq.zero_point.numel()
    assert n_table == 261 * 100 * 2  # TALSQ: 52,200 scalars (dossier Sec. 3.2)


def test_build_student_copies_and_reports() -> None:
    teacher = nn.Module()
    teacher.conv_in = nn.Conv2d(3, 4, 3)
    teacher.time_embedding = nn.Module()
    teacher.time_embedding.linear_1 = nn.Linear(4, 4)
    teacher.time_embedding.linear_2 = nn.Linear(4, 4)
    teacher.body = nn.Conv2d(4, 4, 3)
    teacher.conv_out = nn.Conv2d(4, 3, 3)
    teacher.down = nn.Module()
    teacher.down.conv_shortcut = nn.Conv2d(4, 4, 1)
    teacher.down.downsamplers = nn.ModuleList([nn.Conv2d(4, 4, 3, stride=2)])
    method = EfficientDM(EfficientDMConfig(lora_rank=2, num_timesteps=4))
    student, text = method.build_student(teacher, "unet")
    assert student is not teacher and method.family == "unet"  # family "auto" takes the one passed in
    assert type(teacher.body) is nn.Conv2d  # the teacher is left alone
    assert not any(isinstance(m, (QuantConv2d, QuantLinear)) for m in teacher.modules())
    # the report text is the PrepareReport of the same spec on a copy of the teacher
    rep = qat.prepare(copy.deepcopy(teacher), efficientdm_spec(method.config, "unet"))
    assert rep.counts() == {"W8A8": 4, "W4A4+LoRA": 1}
    assert sorted(rep.excluded) == ["down.conv_shortcut", "down.downsamplers.0"]
    assert text == str(rep)
    assert "quantized: 5 {'W8A8': 4, 'W4A4+LoRA': 1}; full precision (excluded): 2" in text
    # ... and describes the student that was built
    assert set(qalora_layers(student)) == {"body"}
    assert all(type(student.get_submodule(n)) in (QuantLinear, QuantConv2d) for n in SPECIAL)
    assert type(student.down.conv_shortcut) is nn.Conv2d and type(student.down.downsamplers[0]) is nn.Conv2d
