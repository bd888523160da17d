"""Quantized layers (shared parameters, state-dict compatibility, float round trip) and the attention processor."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor
from qat_testutils import naive_fake_quant
from torch import nn

import qat
from qat.nn import QuantAttnProcessor, QuantConv2d, QuantLinear
from qat.prepare import LayerRule, QuantSpec
from qat.quantizers import BinaryConfig, LSQConfig, TemporalLSQConfig, UniformConfig

W4 = LSQConfig(n_bits=4, granularity="channel")
A8 = UniformConfig(n_bits=8)


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(6, 4, 3, padding=2, dilation=2, groups=2, bias=False, padding_mode="reflect")
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.grouped(F.silu(self.conv(x))))
        return self.fc(h.flatten(1))


def test_from_float_shares_the_float_parameters() -> None:
    lin = nn.Linear(8, 4)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    qlin = QuantLinear.from_float(lin, W4, A8)
    qconv = QuantConv2d.from_float(conv, W4, A8)
    assert qlin.weight is lin.weight and qlin.bias is lin.bias
    assert qconv.weight is conv.weight and qconv.bias is conv.bias
    # No copies anywhere: the quantized layer's own parameters are the float ones plus the quantizer steps.
    own = {id(p) for n, p in qlin.named_parameters() if "_quantizer" not in n}
    assert own == {id(lin.weight), id(lin.bias)}
    assert isinstance(qlin, nn.Linear) and isinstance(qconv, nn.Conv2d)


def test_float_state_dict_loads_into_prepared_model_without_lora() -> None:
    torch.manual_seed(0)
    float_model = Small()
    prepared = Small()
    spec = QuantSpec(rules=[LayerRule(patterns=["conv", "fc"], weight=W4, act=A8),
                            LayerRule(patterns=["grouped"], weight=UniformConfig(n_bits=8, granularity="channel"))])
    qat.prepare(prepared, spec)
    result = prepared.load_state_dict(float_model.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys, "the quantizer state must be reported missing"
    assert all("_quantizer." in k for k in result.missing_keys)
    # The float keys are unchanged by prepare, so every float tensor was loaded.
    for k, v in float_model.state_dict().items():
        assert torch.equal(prepared.state_dict()[k], v)
    assert set(prepared.state_dict()) - set(result.missing_keys) == set(float_model.state_dict())


def test_disabled_quantizers_reproduce_the_float_layers_exactly() -> None:
    torch.manual_seed(0)
    float_model = Small()
    prepared = copy.deepcopy(float_model)
    qat.prepare(prepared, QuantSpec(rules=[LayerRule(patterns=["*"], weight=W4, act=A8)]))
    assert isinstance(prepared.grouped, QuantConv2d) and isinstance(prepared.fc, QuantLinear)
    x = torch.randn(2, 3, 8, 8)
    qat.calibrate(prepared, [x], lambda m, b: m(b))
    with torch.no_grad():
        assert not torch.equal(prepared(x), float_model(x))  # enabled: quantized
        for layer in qat.quant_layers(prepared).values():
            layer.weight_quantizer.enabled = False
            layer.act_quantizer.enabled = False
        assert torch.equal(prepared(x), float_model(x))


def test_quant_linear_forward_matches_hand_computation() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    q = QuantLinear.from_float(lin, UniformConfig(n_bits=4, granularity="channel", signed=True, symmetric=True),
                               UniformConfig(n_bits=8))
    x = torch.randn(5, 6)
    q.weight_quantizer.initialize_(lin.weight)
    q.act_quantizer.initialize_(x)
    # By hand: symmetric signed 4-bit per output channel, s = max|w| / 7; activations 8-bit asymmetric min-max.
    s_w = lin.weight.detach().abs().amax(dim=1) / 7
    w_q = naive_fake_quant(lin.weight, s_w, torch.zeros(3), -8, 7, "channel", 0)
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    s_a = (hi - lo) / 255
    x_q = naive_fake_quant(x, torch.tensor(s_a), torch.tensor(float(round(-lo / s_a))), 0, 255)
    torch.testing.assert_close(q(x), F.linear(x_q, w_q, lin.bias))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_channel_activation_quantizer_uses_the_channel_axis(kind: str) -> None:
    """Per-channel input quantization: axis 1 of (B, C, H, W) for convs, the last axis of (..., C) for linears."""
    torch.manual_seed(0)
    scales = torch.tensor([0.1, 1.0, 10.0])
    if kind == "conv":
        mod = nn.Conv2d(3, 4, 3, padding=1)
        x = torch.randn(2, 3, 5, 5) * scales.view(1, 3, 1, 1)
        per_channel = x.transpose(0, 1).reshape(3, -1)
    else:
        mod = nn.Linear(3, 4)
        x = torch.randn(2, 5, 3) * scales
        per_channel = x.reshape(-1, 3).T
    qcls = QuantConv2d if kind == "conv" else QuantLinear
    q = qcls.from_float(mod, None, UniformConfig(n_bits=4, granularity="channel"))
    q.act_quantizer.initialize_(x)
    for c in range(3):
        lo, hi = min(per_channel[c].min().item(), 0.0), max(per_channel[c].max().item(), 0.0)
        assert q.act_quantizer.step[c].item() == pytest.approx((hi - lo) / 15, rel=1e-6)
    expected = naive_fake_quant(x, q.act_quantizer.step, q.act_quantizer.zero_point, 0, 15, "channel",
                                1 if kind == "conv" else -1)
    assert torch.equal(q.quantize_input(x), expected)


@pytest.mark.parametrize("kind", ["linear", "conv", "grouped_conv"])
def test_to_float_round_trip(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "linear":
        mod, x = nn.Linear(8, 4), torch.randn(3, 8)
    elif kind == "conv":
        mod, x = nn.Conv2d(3, 5, 3, stride=2, padding=1), torch.randn(2, 3, 9, 9)
    else:
        mod = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False, padding_mode="reflect")
        x = torch.randn(2, 4, 7, 7)
    qcls = QuantLinear if kind == "linear" else QuantConv2d
    q = qcls.from_float(mod, W4, A8)
    back = q.to_float()
    assert type(back) is type(mod)
    assert back.weight is mod.weight and back.bias is mod.bias
    if kind != "linear":
        for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size"):
            assert getattr(back, attr) == getattr(mod, attr)
    assert set(back.state_dict()) == set(mod.state_dict())
    with torch.no_grad():
        assert torch.equal(back(x), mod(x))


def test_temporal_weight_quantizer_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"^fc: weights cannot use a timestep-dependent quantizer \(temporal_lsq is "
                                         r"for activations\)$"):
        QuantLinear.from_float(nn.Linear(4, 4), TemporalLSQConfig(num_timesteps=3), None, name="fc")


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_binary_weight_quantizer_in_a_quantized_layer(kind: str) -> None:
    """Any registered quantizer fills a slot: a binary weight gives y = f(Q_a(x), s sign(W)) + b, s = mean |W| per
    output channel; an integer-domain (QALoRA) update needs an affine weight quantizer."""
    torch.manual_seed(0)
    if kind == "linear":
        mod, x = nn.Linear(6, 3), torch.randn(5, 6)
    else:
        mod, x = nn.Conv2d(3, 4, 3), torch.randn(2, 3, 5, 5)
    qcls = QuantLinear if kind == "linear" else QuantConv2d
    q = qcls.from_float(mod, BinaryConfig(), UniformConfig(n_bits=8), name="layer")
    qat.calibrate(q, [x], lambda m, b: m(b))
    w = mod.weight.detach()
    s = w.abs().reshape(w.shape[0], -1).mean(1).reshape(-1, *(1,) * (w.dim() - 1))
    w_q = s * torch.where(w >= 0, 1.0, -1.0)
    torch.testing.assert_close(q.quantized_weight(), w_q, rtol=1e-6, atol=0)
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    s_a = (hi - lo) / 255
    x_q = naive_fake_quant(x, torch.tensor(s_a), torch.tensor(float(round(-lo / s_a))), 0, 255)
    ref = F.linear(x_q, w_q, mod.bias) if kind == "linear" else F.conv2d(x_q, w_q, mod.bias)
    with torch.no_grad():
        torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="QALoRA.*needs an affine weight quantizer, not BinaryQuantizer"):
        q.quantized_weight(torch.zeros_like(w))


def test_group_size_must_divide_the_weights_per_channel() -> None:
    with pytest.raises(ValueError, match="not divisible by group_size 4"):
        QuantLinear.from_float(nn.Linear(6, 4), LSQConfig(granularity="group", group_size=4), None, name="fc")


# -- attention processor -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["self_4d_groupnorm", "cross_3d"])
def test_quant_attn_processor_matches_diffusers_when_disabled(variant: str) -> None:
    torch.manual_seed(0)
    if variant == "self_4d_groupnorm":
        # The layout of UNet2DModel's attention blocks: GroupNorm inside Attention, residual, (B, C, H, W) input.
        attn = Attention(query_dim=16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True,
                         rescale_output_factor=2.0, bias=True, upcast_softmax=True)
        x, ctx = torch.randn(2, 16, 3, 3), None
    else:
        attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)
        x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    attn.eval()
    attn.set_processor(AttnProcessor())
    with torch.no_grad():
        ref = attn(x, encoder_hidden_states=ctx)
    proc = QuantAttnProcessor(LSQConfig(n_bits=4, signed=True))
    attn.set_processor(proc)
    for q in (proc.q_quantizer, proc.k_quantizer, proc.v_quantizer, proc.probs_quantizer):
        q.enabled = False
    with torch.no_grad():
        out = attn(x, encoder_hidden_states=ctx)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)

    for q in (proc.q_quantizer, proc.k_quantizer, proc.v_quantizer, proc.probs_quantizer):
        q.enabled = True
    counts = qat.calibrate(attn, [(x, ctx)], lambda m, b: m(b[0], encoder_hidden_states=b[1]))
    assert counts == {"weights": 0, "activations": 4}
    with torch.no_grad():
        out_q = attn(x, encoder_hidden_states=ctx)
    assert not torch.allclose(out_q, ref, atol=1e-4)
    assert (out_q - ref).norm() / ref.norm() < 0.5  # 4-bit operands: changed, but still an attention output
    keys = set(attn.state_dict())
    for part in ("q", "k", "v", "probs"):
        assert {f"processor.{part}_quantizer.step", f"processor.{part}_quantizer.zero_point",
                f"processor.{part}_quantizer.initialized"} <= keys
    # The probabilities are in [0, 1]: their quantizer is unsigned by default.
    assert not proc.probs_quantizer.config.signed and proc.q_quantizer.config.signed


def test_quant_attn_processor_rejects_channel_granularity() -> None:
    with pytest.raises(ValueError, match="granularity 'tensor' only"):
        QuantAttnProcessor(LSQConfig(granularity="channel"))


def test_temporal_attention_quantizers_follow_per_sample_timesteps() -> None:
    """q / k / v see batch B, the probabilities batch B * heads: a (B,) timestep index serves both."""
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    proc = QuantAttnProcessor(TemporalLSQConfig(n_bits=4, num_timesteps=3, learn_offset=True))
    attn.set_processor(proc)
    x = torch.randn(2, 5, 16)
    with qat.timestep_index(attn, 0):
        qat.calibrate(attn, [x], lambda m, b: m(b))
    with torch.no_grad():
        for q in (proc.q_quantizer, proc.k_quantizer, proc.v_quantizer, proc.probs_quantizer):
            q.step.mul_(torch.tensor([0.5, 1.0, 2.0]))  # rows differ
        with qat.timestep_index(attn, torch.tensor([2, 0])):
            mixed = attn(x)
        for i, row in enumerate((2, 0)):
            with qat.timestep_index(attn, row):
                single = attn(x[i: i + 1])
            torch.testing.assert_close(mixed[i: i + 1], single, rtol=1e-6, atol=1e-6)
        with qat.timestep_index(attn, 1):
            assert not torch.allclose(attn(x[:1]), mixed[:1], atol=1e-4)
