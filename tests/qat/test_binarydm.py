"""BinaryDM's student, schedules and export on tiny diffusers models (no trainer).

The layer map is checked against names written out by hand for a four-level UNet (the LDM-4 shape: the two bases
cover the two highest resolutions), the collapse and warm-up against the step numbers they must happen at, the
``basis_l1`` penalty against its formula evaluated by hand on the scales.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DModel
from torch import nn

import qat
from qat.export import ExportError
from qat.losses import BasisL1, LossInputs
from qat.methods import BinaryDM, BinaryDMConfig, Calibration
from qat.methods.binarydm import multi_basis_scope, warmup_groups
from qat.prepare import quant_layers
from qat.quantizers import BinaryQuantizer, LSQQuantizer, UniformQuantizer


def four_level_unet() -> UNet2DModel:
    """LDM-4's block structure (four levels, attention at the three lower ones) at toy width."""
    torch.manual_seed(0)
    return UNet2DModel(
        block_out_channels=(8, 8, 8, 8), layers_per_block=2, norm_num_groups=4, sample_size=16, in_channels=3,
        out_channels=3, attention_head_dim=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )


def _bases(student: nn.Module) -> dict[str, int]:
    return {n: layer.weight_quantizer.config.num_bases for n, layer in quant_layers(student).items()
            if isinstance(layer.weight_quantizer, BinaryQuantizer)}


def test_unet_layer_map_two_bases_at_the_two_highest_resolutions() -> None:
    model = four_level_unet()
    method = BinaryDM(BinaryDMConfig())
    student, report = method.build_student(model, "unet")
    layers = quant_layers(student)
    for edge in ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"):
        assert isinstance(layers[edge].weight_quantizer, UniformQuantizer), edge
        assert layers[edge].weight_quantizer.config.n_bits == 8 and layers[edge].act_quantizer.config.n_bits == 8
    bases = _bases(student)
    two = {n for n, k in bases.items() if k == 2}
    # level 0 (with its downsampler), level 1 (without: that one leads to level 2), and the up blocks of levels 1, 0
    high_res = ("down_blocks.0.", "down_blocks.1.resnets.", "down_blocks.1.attentions.", "up_blocks.2.",
                "up_blocks.3.")
    assert two == {n for n in bases if n.startswith(high_res)}
    assert "down_blocks.1.downsamplers.0.conv" in bases and bases["down_blocks.1.downsamplers.0.conv"] == 1
    assert bases["up_blocks.2.upsamplers.0.conv"] == 2 and bases["up_blocks.1.upsamplers.0.conv"] == 1
    # the ResBlocks' time projections and shortcuts are binarized too (the reference code's map)
    assert bases["mid_block.resnets.0.time_emb_proj"] == 1 and bases["down_blocks.0.resnets.0.time_emb_proj"] == 2
    assert all(isinstance(layers[n].act_quantizer, LSQQuantizer) and layers[n].act_quantizer.config.n_bits == 4
               for n in bases)
    assert all(p.requires_grad for p in student.parameters())  # full QAT fine-tuning
    assert not quant_layers(model)  # the teacher is left untouched
    assert f"two bases (second dropped at collapse_at=0.5): {len(two)} layers" in report
    assert method.multi_basis_layers == sorted(two, key=list(layers).index)


def test_edges_fp_modulation_and_the_plain_baseline() -> None:
    model = four_level_unet()
    student, _ = BinaryDM(BinaryDMConfig(edges="fp", modulation="fp", multi_basis=[], act_bits=32)).build_student(
        model, "unet")
    layers = quant_layers(student)
    assert "conv_in" not in layers and "time_embedding.linear_1" not in layers
    assert not any(n.endswith("time_emb_proj") for n in layers)
    assert set(_bases(student).values()) == {1} and all(layer.act_quantizer is None for layer in layers.values())
    with pytest.raises(ValueError, match=r"^binarydm.multi_basis: pattern 'nope\.\*' matches no linear or conv"):
        BinaryDM(BinaryDMConfig(multi_basis=["nope.*"])).build_student(model, "unet")


def test_transformer_layer_map_keeps_adaln_w8a8_and_two_bases_at_both_ends() -> None:
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                  num_layers=14, sample_size=4, patch_size=2, num_embeds_ada_norm=10,
                                  norm_num_groups=4)
    student, _ = BinaryDM(BinaryDMConfig()).build_student(model, "dit")
    layers = quant_layers(student)
    assert isinstance(layers["transformer_blocks.5.norm1.linear"].weight_quantizer, UniformQuantizer)
    assert isinstance(layers["pos_embed.proj"].weight_quantizer, UniformQuantizer)
    two = {n.split(".")[1] for n, k in _bases(student).items() if k == 2}
    assert two == {"0", "1", "12", "13"}  # ceil(0.075 * 14) = 2 blocks at each end
    assert multi_basis_scope(model, "dit") == [f"transformer_blocks.{i}.*" for i in (0, 1, 12, 13)]


def _initialised(method: BinaryDM, model: nn.Module) -> nn.Module:
    student, _ = method.build_student(model, "unet")
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([10, 500])) for _ in range(2)]
    method.initialize(student, Calibration(batches, lambda m, b: m(b[0], b[1]).sample))
    return student


def test_second_basis_collapses_on_schedule_and_basis_l1_follows() -> None:
    method = BinaryDM(BinaryDMConfig(collapse_at=0.5, warmup_groups=0, lrm_weight=0.0))
    student = _initialised(method, four_level_unet())
    quantizers = [quant_layers(student)[n].weight_quantizer for n in method.multi_basis_layers]
    n_binary = sum(isinstance(layer.weight_quantizer, BinaryQuantizer) for layer in quant_layers(student).values())
    (term,) = [t for t in method.loss_terms() if isinstance(t, BasisL1)]
    x = torch.randn(2, 3, 16, 16)
    inputs = LossInputs(student_out=x, teacher_out=x, t=torch.tensor([1, 2]), guided=False, guidance=1.0,
                        student=student)
    for q in quantizers:  # a negative second scale must still count positively (L1)
        q.scale.data[1, 0] = -0.5
    by_hand = sum(float(q.scale[1].detach().abs().mean()) for q in quantizers) / n_binary
    assert math.isclose(float(term(inputs).detach()), by_hand, rel_tol=1e-6)
    for step in range(10):
        logs = method.on_train_step(student, step, max_steps=10)
        expected = 2 if step < 5 else 1  # round(0.5 * 10)
        assert {q.num_active for q in quantizers} == {expected}, step
        assert logs["second_basis"] == float(expected == 2)
    assert float(term(inputs)) == 0.0
    layer = quant_layers(student)[method.multi_basis_layers[0]]
    w = layer.weight.detach()
    s1 = layer.weight_quantizer.scale[0].detach().reshape(-1, 1, 1, 1)
    assert torch.equal(layer.weight_quantizer(w), s1 * torch.where(w >= 0, 1.0, -1.0))
    # a resumed process starts with fresh (2-basis) quantizers and a checkpoint that says 1: it stays collapsed
    reloaded = copy.deepcopy(student)
    fresh = BinaryDM(BinaryDMConfig(collapse_at=0.5, warmup_groups=0, lrm_weight=0.0))
    rebuilt = _initialised(fresh, four_level_unet())
    rebuilt.load_state_dict(reloaded.state_dict())
    assert {quant_layers(rebuilt)[n].weight_quantizer.num_active for n in fresh.multi_basis_layers} == {1}


def test_convert_drops_the_collapsed_basis_and_export_reloads_exactly(tmp_path) -> None:
    method = BinaryDM(BinaryDMConfig(collapse_at=0.5, warmup_groups=0, lrm_weight=0.0))
    student = _initialised(method, four_level_unet())
    method.on_train_step(student, 7, max_steps=10)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        before = student(x, t).sample
    with pytest.raises(ExportError, match="collapse_"):
        qat.export_quantized(student, tmp_path / "uncollapsed", convert_fn=lambda m: m)
    out = qat.export_quantized(student, tmp_path / "w1a4", convert_fn=method.convert)
    loaded = qat.load_quantized(out)
    q = quant_layers(loaded)[method.multi_basis_layers[0]].weight_quantizer
    assert q.config.num_bases == 1 and tuple(q.scale.shape) == (1, q.param_shape[0])
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, before)


def test_warmup_binarizes_centre_outward_and_reinitialises_each_group_at_its_switch() -> None:
    method = BinaryDM(BinaryDMConfig(warmup_groups=3, warmup_interval=2, collapse_at=None, lrm_weight=0.0))
    student = _initialised(method, four_level_unet())
    groups = warmup_groups(student, "unet", 3)
    assert groups["mid_block.resnets.0.conv1"] == 0
    assert groups["down_blocks.0.resnets.0.conv1"] == 2 and groups["up_blocks.3.resnets.2.conv2"] == 2
    layers = quant_layers(student)
    outer = layers["down_blocks.0.resnets.0.conv1"]

    def enabled() -> dict[str, bool]:
        return {n: layers[n].weight_quantizer.enabled and layers[n].act_quantizer.enabled for n in groups}

    for step in range(6):
        if step == 4:  # trained in full precision until its switch: the scale must follow the new weight
            outer.weight.data.mul_(3.0)
        logs = method.on_train_step(student, step, max_steps=20)
        done = min(3, step // 2 + 1)  # group g switches at step 2 g
        assert enabled() == {n: g < done for n, g in groups.items()}, step
        assert logs["binarized_groups"] == done
    expected = outer.weight.detach().abs().mean(dim=(1, 2, 3))
    torch.testing.assert_close(outer.weight_quantizer.scale[0].detach(), expected)
    # later steps leave the trained scales alone; a fresh method resumed at step 5 sets the same flags
    outer.weight_quantizer.scale.data.fill_(0.25)
    method.on_train_step(student, 5, max_steps=20)
    assert torch.all(outer.weight_quantizer.scale.detach() == 0.25)
    for layer in layers.values():
        for q in (layer.weight_quantizer, layer.act_quantizer):
            q.enabled = False
    BinaryDM(method.config).on_train_step(student, 5, max_steps=20)
    assert all(enabled().values())
    assert method.find_unused_parameters and not BinaryDM(BinaryDMConfig(warmup_groups=0)).find_unused_parameters


def test_param_groups_cover_every_trainable_parameter_once() -> None:
    method = BinaryDM(BinaryDMConfig(lr=1e-3, scale_lr=2e-3, act_step_lr=3e-3, weight_decay=0.01))
    student = _initialised(method, four_level_unet())
    groups = {g["name"]: g for g in method.param_groups(student)}
    assert {n: (g["lr"], g["weight_decay"]) for n, g in groups.items()} == {
        "weights": (1e-3, 0.01), "binary_scales": (2e-3, 0.0), "act_steps": (3e-3, 0.0)}
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in student.parameters() if p.requires_grad}
    scales = [m.scale for m in student.modules() if isinstance(m, BinaryQuantizer)]
    assert [id(p) for p in groups["binary_scales"]["params"]] == [id(p) for p in scales]
