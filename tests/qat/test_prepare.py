"""``qat.prepare`` on tiny diffusers denoisers with the EfficientDM spec, pattern errors, the report, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from qat_testutils import TINY_MODELS, ddim_timesteps
from safetensors.torch import load_file, save_file
from torch import nn

import qat
from qat.methods.efficientdm import EfficientDMConfig, efficientdm_spec
from qat.nn import QuantAttnProcessor, QuantConv2d, QuantLinear
from qat.nn.qalora import qalora_layers
from qat.prepare import LayerRule, QuantSpec
from qat.quantizers import LSQConfig, TemporalLSQQuantizer, UniformConfig
from qat.timestep import temporal_quantizers

FAMILY = {"unet_cond": "unet", "unet": "unet", "dit": "dit"}

# Expected layer map of each tiny model, derived from the architecture:
#
# unet_cond: UNet2DConditionModel, block_out_channels (32, 64), layers_per_block 1,
#   down (CrossAttnDownBlock2D, DownBlock2D), up (UpBlock2D, CrossAttnUpBlock2D).
#   ResNets: down 2 x 1 + mid 2 + up 2 x 2 = 8, each conv1 / conv2 / time_emb_proj          -> 24
#   Transformer2DModels: down 1 + mid 1 + up 2 = 4, each proj_in, proj_out, attn1 and attn2
#     to_q / to_k / to_v / to_out.0, ff.net.0.proj, ff.net.2 = 12                           -> 48
#   Upsampler conv of up_blocks.0 (every up block but the last)                              -> 1
#   QALoRA W4A4: 24 + 48 + 1 = 73.  W8A8: conv_in, conv_out, time_embedding.linear_1/2 = 4.
#   Full precision: down_blocks.0 downsampler conv (1) + conv_shortcut of every ResNet whose input and output
#   channels differ: down_blocks.1.resnets.0 (32 -> 64) and all 4 up-block ResNets (skip concatenation) = 6.
#   All Linear / Conv2d: 73 + 4 + 6 = 83.
# unet: UNet2DModel, same channels, down (DownBlock2D, AttnDownBlock2D), up (AttnUpBlock2D, UpBlock2D).
#   ResNets 8 x 3 = 24; Attention modules: down 1 + mid 1 + up 2 = 4, each to_q / to_k / to_v / to_out.0 = 16;
#   upsampler conv 1. QALoRA 41, W8A8 4, full precision 6 (same shortcut / downsampler layout). Total 51.
# dit: DiTTransformer2DModel, 2 blocks. Each block: norm1.linear (adaLN-Zero modulation), attn1 to_q / to_k /
#   to_v / to_out.0, ff.net.0.proj, ff.net.2 = 7 QALoRA, and norm1.emb.timestep_embedder.linear_1 / linear_2 =
#   2 W8A8. Plus pos_embed.proj (W8A8), proj_out_1 (QALoRA), proj_out_2 (W8A8).
#   QALoRA 2 x 7 + 1 = 15; W8A8 2 x 2 + 2 = 6; full precision 0. Total 21.
EXPECTED = {
    "unet_cond": ({"W4A4+LoRA": 73, "W8A8": 4}, 6, 83),
    "unet": ({"W4A4+LoRA": 41, "W8A8": 4}, 6, 51),
    "dit": ({"W4A4+LoRA": 15, "W8A8": 6}, 0, 21),
}
W8A8 = {
    "unet_cond": {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"},
    "unet": {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"},
    "dit": {"pos_embed.proj", "proj_out_2"} | {f"transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_{j}"
                                               for i in range(2) for j in (1, 2)},
}
GRID = ddim_timesteps(10)  # 901, 801, ..., 1


def _spec(family: str):
    return efficientdm_spec(EfficientDMConfig(family=family, num_timesteps=10, lora_rank=4))


def _linear_conv_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _timed(forward):
    def fwd(m, batch):
        with qat.timestep(m, batch[1]):
            return forward(m, batch)

    return fwd


@pytest.fixture(scope="module", params=list(TINY_MODELS))
def prepared(request):
    torch.manual_seed(0)
    name = request.param
    model, forward, make_batch = TINY_MODELS[name]()
    fp = copy.deepcopy(model).eval()
    float_names = _linear_conv_names(model)
    report = qat.prepare(model, _spec(FAMILY[name]))
    qat.set_timestep_grid(model, GRID)
    counts = qat.calibrate(model, [make_batch(GRID[[0, 4]]), make_batch(GRID[[7, 9]])], _timed(forward))
    return dict(name=name, model=model.eval(), fp=fp, forward=forward, make_batch=make_batch, report=report,
                float_names=float_names, counts=counts)


def test_counts_per_category(prepared) -> None:
    counts, n_fp, n_total = EXPECTED[prepared["name"]]
    report = prepared["report"]
    assert report.counts() == counts
    assert len(report.excluded) == n_fp
    assert len(prepared["float_names"]) == n_total
    assert {r[0] for r in report.rows if r[2] == "8"} == W8A8[prepared["name"]]
    # The W8A8 layers are frozen and have no adapter; every other quantized layer has one.
    for name, _, w, a, rank, train in report.rows:
        assert (w, a, rank, train) == (("8", "8", 0, False) if name in W8A8[prepared["name"]] else ("4", "4", 4, True))
    assert set(qalora_layers(prepared["model"])) == {r[0] for r in report.rows if r[4]}
    # calibrate initialised every weight and activation quantizer of the quantized layers
    assert prepared["counts"] == {"weights": len(report.rows), "activations": len(report.rows)}
    assert qat.is_initialized(prepared["model"])


def test_every_linear_and_conv_is_accounted_for(prepared) -> None:
    model, report = prepared["model"], prepared["report"]
    quantized = {r[0] for r in report.rows}
    excluded = set(report.excluded)
    assert quantized.isdisjoint(excluded)
    assert quantized | excluded == prepared["float_names"]
    for name in quantized:
        mod = model.get_submodule(name)
        mod = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
        assert isinstance(mod, (QuantLinear, QuantConv2d))
        assert mod.weight_quantizer is not None and mod.act_quantizer is not None
        expect_temporal = name not in W8A8[prepared["name"]]
        assert isinstance(mod.act_quantizer, TemporalLSQQuantizer) == expect_temporal
    for name in excluded:
        assert type(model.get_submodule(name)) in (nn.Linear, nn.Conv2d)  # untouched float layer
    # Only LoRA matrices and the trainable quantizers' steps / offsets require gradients.
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert "lora_" in name or "_quantizer." in name, name


def test_forward_is_close_to_but_not_equal_to_fp(prepared) -> None:
    torch.manual_seed(1)
    batch = prepared["make_batch"](GRID[[2, 6]])
    with torch.no_grad():
        out = _timed(prepared["forward"])(prepared["model"], batch)
        ref = prepared["forward"](prepared["fp"], batch)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-3 < rel < 0.5, rel


def test_zero_match_pattern_names_the_pattern() -> None:
    model, _, _ = TINY_MODELS["unet"]()
    spec = QuantSpec(rules=[LayerRule(patterns=["conv_in", "*.no_such_layer"], weight=UniformConfig())])
    with pytest.raises(ValueError, match=r"rules\[0\]: pattern '\*\.no_such_layer' matches no module"):
        qat.prepare(model, spec)
    model, _, _ = TINY_MODELS["unet"]()
    spec = QuantSpec(rules=[LayerRule(patterns=["*"], weight=UniformConfig())], exclude=["re:down_blocks\\.9.*"])
    with pytest.raises(ValueError, match=r"exclude: pattern 're:down_blocks\\\\.9\.\*' matches no module"):
        qat.prepare(model, spec)


def test_pattern_matching_only_unsupported_types_errors() -> None:
    model, _, _ = TINY_MODELS["unet_cond"]()
    # ResNet norm1 are GroupNorm, transformer-block norm1 are LayerNorm: no Linear / Conv2d among them.
    spec = QuantSpec(rules=[LayerRule(patterns=["*.norm1"], weight=UniformConfig())])
    with pytest.raises(ValueError, match=r"pattern '\*\.norm1' matches only unsupported module types "
                                         r"\['GroupNorm', 'LayerNorm'\]; supported: \['Linear', 'Conv2d'\]"):
        qat.prepare(model, spec)


def test_exclude_wins_over_include() -> None:
    model, _, _ = TINY_MODELS["unet"]()
    spec = QuantSpec(rules=[LayerRule(patterns=["conv_in", "*"], weight=UniformConfig(granularity="channel"))],
                     exclude=["conv_in", "*.time_emb_proj"])
    report = qat.prepare(model, spec)
    assert type(model.conv_in) is nn.Conv2d
    assert "conv_in" in report.excluded
    assert all(type(model.get_submodule(n)) is nn.Linear for n in report.excluded if n.endswith("time_emb_proj"))
    assert not any(r[0] == "conv_in" or r[0].endswith("time_emb_proj") for r in report.rows)
    assert len(report.excluded) == 1 + 8  # conv_in and the 8 ResNets' time_emb_proj


def test_first_rule_wins() -> None:
    model, _, _ = TINY_MODELS["unet"]()
    spec = QuantSpec(rules=[
        LayerRule(patterns=["conv_in", "*.resnets.*.conv1"], weight=UniformConfig(n_bits=8, granularity="channel")),
        LayerRule(patterns=["*"], weight=LSQConfig(n_bits=3, granularity="channel")),
    ])
    report = qat.prepare(model, spec)
    bits = {r[0]: r[2] for r in report.rows}
    assert bits["conv_in"] == "8" and bits["down_blocks.0.resnets.0.conv1"] == "8"
    assert bits["conv_out"] == "3" and bits["down_blocks.0.resnets.0.conv2"] == "3"
    assert model.conv_in.weight_quantizer.config.n_bits == 8
    assert sum(b == "8" for b in bits.values()) == 1 + 8


def test_report_string_has_a_row_per_layer() -> None:
    model, _, _ = TINY_MODELS["dit"]()
    report = qat.prepare(model, _spec("dit"))
    lines = str(report).splitlines()
    assert lines[0].split()[:2] == ["module", "type"]
    body = lines[1:-1]
    assert len(body) == len(report.rows) == 21
    assert [line.split()[0] for line in body] == [r[0] for r in report.rows]
    row = next(line.split() for line in body if line.split()[0] == "proj_out_2")
    assert row[1:] == ["Linear", "8", "8", "-", "no"]
    row = next(line.split() for line in body if line.split()[0] == "proj_out_1")
    assert row[1:] == ["Linear", "4", "4", "4", "yes"]
    assert lines[-1].startswith("quantized: 21 ")
    # The model order: pos_embed.proj comes before the transformer blocks, proj_out_2 last.
    assert body[0].split()[0] == "pos_embed.proj" and body[-1].split()[0] == "proj_out_2"


def test_attention_patterns_install_quantized_processors() -> None:
    torch.manual_seed(0)
    model, forward, make_batch = TINY_MODELS["unet"]()
    spec = QuantSpec(rules=[LayerRule(patterns=["*"], weight=LSQConfig(n_bits=8, granularity="channel"),
                                      act=LSQConfig(n_bits=8))],
                     attention_patterns=["*.attentions.*"], attention_act=LSQConfig(n_bits=8, signed=True))
    report = qat.prepare(model, spec)
    assert len(report.attention) == 4
    for name in report.attention:
        assert isinstance(model.get_submodule(name).processor, QuantAttnProcessor)
    keys = set(model.state_dict())
    assert f"{report.attention[0]}.processor.probs_quantizer.step" in keys
    counts = qat.calibrate(model, [make_batch(torch.tensor([10, 500]))], forward)
    assert counts["activations"] == len(report.rows) + 4 * 4
    groups = {g["name"]: g for g in qat.param_groups(model)}
    proc_steps = {id(model.get_submodule(n).processor.q_quantizer.step) for n in report.attention}
    assert proc_steps <= {id(p) for p in groups["act_quantizers"]["params"]}
    with pytest.raises(ValueError, match="attention_patterns need attention_act"):
        QuantSpec(rules=[LayerRule(patterns=["*"])], attention_patterns=["*"])


def _perturb(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in qalora_layers(model).values():
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
        for q in temporal_quantizers(model):
            q.step.mul_(1 + 0.2 * torch.rand(q.step.shape, generator=gen))
            q.zero_point.add_(torch.rand(q.zero_point.shape, generator=gen) - 0.5)
        for layer in qat.quant_layers(model).values():
            if isinstance(layer.weight_quantizer.step, nn.Parameter):
                layer.weight_quantizer.step.mul_(1.05)


def test_save_load_round_trip_with_safetensors(tmp_path) -> None:
    torch.manual_seed(0)
    model, forward, make_batch = TINY_MODELS["unet_cond"]()
    qat.prepare(model, _spec("unet"))
    qat.set_timestep_grid(model, GRID)
    qat.calibrate(model, [make_batch(GRID[[1, 8]])], _timed(forward), per_timestep=True)
    _perturb(model)
    model.eval()
    path = tmp_path / "student.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))

    torch.manual_seed(123)  # different float weights and LoRA A: everything must come from the file
    fresh, _, _ = TINY_MODELS["unet_cond"]()
    qat.prepare(fresh, _spec("unet"))
    assert not qat.is_initialized(fresh)
    fresh.load_state_dict(load_file(str(path)), strict=True)
    fresh.eval()
    assert qat.is_initialized(fresh)

    torch.manual_seed(9)
    batch = make_batch(torch.tensor([901, 350]))  # one grid timestep, one interpolated
    with torch.no_grad():
        out = _timed(forward)(model, batch)
        out_fresh = _timed(forward)(fresh, batch)
    assert torch.equal(out, out_fresh)

    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    counts = qat.calibrate(fresh, [make_batch(GRID[[0, 3]])], _timed(forward))
    assert counts == {"weights": 0, "activations": 0}
    after = fresh.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_summary_lists_every_quantized_layer_and_its_state() -> None:
    torch.manual_seed(0)
    model, forward, make_batch = TINY_MODELS["dit"]()
    report = qat.prepare(model, _spec("dit"))
    lines = qat.summary(model).splitlines()[1:]
    assert [line.split()[0] for line in lines] == [r[0] for r in report.rows]  # base names, no ".base_layer"
    assert all(line.split()[-1] == "no" for line in lines)
    qat.set_timestep_grid(model, GRID)
    qat.calibrate(model, [make_batch(GRID[[0, 9]])], _timed(forward))
    rows = {line.split()[0]: line.split() for line in qat.summary(model).splitlines()[1:]}
    assert all(r[-1] == "yes" for r in rows.values())
    assert rows["proj_out_1"][1:] == ["4", "4", "channel", "4", "yes"]
    assert rows["proj_out_2"][1:] == ["8", "8", "channel", "-", "yes"]


def test_prepare_keeps_everything_on_the_model_device() -> None:
    """Quantizers, adapters and attention processors are created where the model lives (meta here)."""
    with torch.device("meta"):
        model, _, _ = TINY_MODELS["unet"]()
    spec = _spec("unet")
    spec.attention_patterns = ["*.attentions.*"]
    spec.attention_act = LSQConfig(n_bits=8)
    qat.prepare(model, spec)
    off = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type != "meta"]
    assert off == []
