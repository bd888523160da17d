"""BiDM's binarizers, XNOR convolution, cross-timestep connection, student and export on tiny diffusers models.

References are written out by hand here: the sign quantizer and the XNOR convolution from their formulas (with
``torch.sign`` and plain ``F.conv2d``), the connection from separate single-sample runs of the same student.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from qat_testutils import small_unet
from safetensors.torch import load_file
from torch import nn

import qat
from qat.methods import BiDM, BiDMConfig, Calibration
from qat.nn.binary import CrossTimestepConnection, XnorConv2d
from qat.prepare import quant_layers
from qat.quantizers import BinaryConfig, BinaryQuantizer, SignActConfig, SignActQuantizer
from qat.taps import FeatureTaps


def _student(cfg: BiDMConfig, model: nn.Module | None = None) -> tuple[BiDM, nn.Module]:
    method = BiDM(cfg)
    student, _ = method.build_student(model or small_unet(), "unet")
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def forward(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        qat.reset_sampling_state(m)
        return m(*batch).sample

    method.initialize(student, Calibration([(x, torch.tensor([900, 600, 300, 10]))], forward))
    return method, student


def _sign(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v >= 0, 1.0, -1.0)


# -- sign activations ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis, shape", [(1, (2, 3, 4, 5)), (-1, (2, 7, 3))])
def test_sign_act_forward_and_gradients_against_hand_reference(axis: int, shape: tuple[int, ...]) -> None:
    q = SignActQuantizer(SignActConfig(), num_channels=3, channel_axis=axis)
    with torch.no_grad():
        q.threshold.copy_(torch.tensor([0.3, -0.2, 0.0]))
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.8).requires_grad_(True)
    up = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    y = q(x)
    (y * up).sum().backward()
    view = [1] * len(shape)
    view[axis] = 3
    tau = torch.tensor([0.3, -0.2, 0.0]).reshape(view)
    z = x.detach() + tau
    assert torch.equal(y, _sign(z))
    # Bi-Real's ApproxSign: 2 - 2|z| inside (-1, 1), 0 outside; the threshold gets the same, summed per channel
    local = torch.where(z.abs() < 1, 2 - 2 * z.abs(), torch.zeros_like(z))
    torch.testing.assert_close(x.grad, up * local)
    dims = [d for d in range(len(shape)) if d != axis % len(shape)]
    torch.testing.assert_close(q.threshold.grad, (up * local).sum(dims))


def test_plain_sign_with_the_clipped_ste_and_no_parameters() -> None:
    q = SignActQuantizer(SignActConfig(threshold=False, gradient="clipped"), num_channels=None)
    assert list(q.parameters()) == [] and bool(q.initialized)  # nothing to calibrate
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5], requires_grad=True)
    y = q(x)
    y.sum().backward()
    assert y.tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_sign_act_config_rejects_an_unknown_gradient() -> None:
    with pytest.raises(ValueError, match="gradient"):
        SignActConfig(gradient="tanh")


# -- XNOR convolution ---------------------------------------------------------------------------------------------


def _xnor_layer(c_in: int, c_out: int, stride: int) -> XnorConv2d:
    torch.manual_seed(2)
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
    layer = qat.QuantConv2d.from_float(conv, BinaryConfig(), SignActConfig())
    layer.weight_quantizer.initialize_(layer.weight)
    new = XnorConv2d.from_quant(layer, scaling=True, shortcut=True, shortcut_init=0.3)
    with torch.no_grad():  # move every new parameter off its initial value, so each one is exercised
        new.kmap_weight.add_(torch.randn_like(new.kmap_weight) * 0.05)
        new.kmap_bias.fill_(0.1)
        new.act_quantizer.threshold.copy_(torch.linspace(-0.2, 0.2, c_in))
        if new.shortcut_proj is not None:
            new.shortcut_proj.copy_(torch.randn_like(new.shortcut_proj) * 0.1)
    return new


def _xnor_reference(layer: XnorConv2d, x: torch.Tensor, kmap: torch.Tensor, proj: torch.Tensor | None,
                    scale: torch.Tensor) -> torch.Tensor:
    """The formula with plain ops: (conv(sign(x + tau), s_c sign(W)) * conv(mean_c |x|, k) + k0) + b + |s| S(x)."""
    tau = layer.act_quantizer.threshold.detach().reshape(1, -1, 1, 1)
    w = layer.weight_quantizer.scale.detach()[0].reshape(-1, 1, 1, 1) * _sign(layer.weight.detach())
    main = F.conv2d(_sign(x + tau), w, None, layer.stride, layer.padding)
    k = F.conv2d(x.abs().mean(1, keepdim=True), kmap, layer.kmap_bias.detach(), layer.stride, layer.padding)
    y = main * k + layer.bias.detach().reshape(1, -1, 1, 1)
    short = x
    if layer.stride[0] == 2:
        short = F.avg_pool2d(x, 2)
    if proj is not None:
        short = F.conv2d(short, proj)
    return y + scale.abs() * short


@pytest.mark.parametrize("c_in, c_out, stride", [(4, 4, 1), (4, 6, 2)])
def test_xnor_conv_forward_and_parameter_gradients_against_hand_reference(c_in: int, c_out: int,
                                                                           stride: int) -> None:
    layer = _xnor_layer(c_in, c_out, stride)
    assert (layer.shortcut_proj is None) == (c_in == c_out)
    x = torch.randn(2, c_in, 8, 8, generator=torch.Generator().manual_seed(3))
    up = torch.randn(2, c_out, 8 // stride, 8 // stride, generator=torch.Generator().manual_seed(4))
    y = layer(x)
    (y * up).sum().backward()

    kmap = layer.kmap_weight.detach().clone().requires_grad_(True)
    scale = layer.shortcut_scale.detach().clone().requires_grad_(True)
    proj = None if layer.shortcut_proj is None else layer.shortcut_proj.detach().clone().requires_grad_(True)
    ref = _xnor_reference(layer, x, kmap, proj, scale)
    (ref * up).sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(layer.kmap_weight.grad, kmap.grad)
    torch.testing.assert_close(layer.shortcut_scale.grad, scale.grad)
    if proj is not None:
        torch.testing.assert_close(layer.shortcut_proj.grad, proj.grad)


def test_xnor_conv_initial_values_are_deterministic_and_keep_the_float_keys() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = XnorConv2d.from_quant(qat.QuantConv2d.from_float(conv, BinaryConfig(), SignActConfig()))
    assert torch.equal(layer.kmap_weight, torch.full((1, 1, 3, 3), 1 / 9))
    assert torch.equal(layer.kmap_bias, torch.zeros(1)) and float(layer.shortcut_scale.detach()) == pytest.approx(0.3)
    assert torch.equal(layer.shortcut_proj, torch.zeros(6, 4, 1, 1))
    assert layer.weight is conv.weight and layer.bias is conv.bias
    keys = set(layer.state_dict())
    assert {"weight", "bias"} <= keys and all(k in {"weight", "bias"} or k.startswith(
        ("weight_quantizer.", "act_quantizer.", "kmap_", "shortcut_")) for k in keys)


# -- the student --------------------------------------------------------------------------------------------------


def test_layer_map_fp_edges_and_shortcuts_w1a1_elsewhere_and_bias_handling() -> None:
    method, student = _student(BiDMConfig(connections=2, spd_weight=0.0))
    layers = quant_layers(student)
    for fp in ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2",
               "down_blocks.1.resnets.0.conv_shortcut"):
        assert fp not in layers and isinstance(student.get_submodule(fp), (nn.Conv2d, nn.Linear)), fp
    convs = {n for n, m in student.named_modules() if isinstance(m, XnorConv2d)}
    assert "down_blocks.0.resnets.0.conv1" in convs and "up_blocks.0.upsamplers.0.conv" in convs
    assert "down_blocks.0.downsamplers.0.conv" in convs
    for name in ("down_blocks.1.attentions.0.to_q", "mid_block.resnets.0.time_emb_proj"):
        assert isinstance(layers[name].weight_quantizer, BinaryQuantizer)
        assert isinstance(layers[name].act_quantizer, SignActQuantizer) and not isinstance(layers[name], XnorConv2d)
    assert all(p.requires_grad for p in student.parameters())
    # biases: kept by default (trained), zeroed and frozen on request
    bias = layers["down_blocks.0.resnets.0.conv1"].bias
    assert bias.abs().sum() > 0
    _, dropped = _student(BiDMConfig(connections=0, spd_weight=0.0, keep_bias=False))
    b = quant_layers(dropped)["down_blocks.0.resnets.0.conv1"].bias
    assert torch.equal(b, torch.zeros_like(b)) and not b.requires_grad
    # the connection sits on the last 2 block outputs, in forward order
    assert BiDM.connection(student).units == ["up_blocks.1.resnets.0", "up_blocks.1.resnets.1"]


def test_param_groups_cover_every_trainable_parameter_once() -> None:
    method, student = _student(BiDMConfig(connections=2, spd_weight=0.0))
    groups = method.param_groups(student)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len([p for p in student.parameters() if p.requires_grad])
    extra = {id(p) for g in groups if g["name"] == "binary_params" for p in g["params"]}
    assert id(BiDM.connection(student).alpha) in extra


def _run(student: nn.Module, x: torch.Tensor, t: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
    with torch.no_grad(), qat.timestep(student, t), FeatureTaps(student, names=taps) as tapped:
        student(x, t)
    return dict(tapped.features)


def test_connection_blends_each_row_with_its_own_previous_step_in_a_mixed_timestep_batch() -> None:
    method, student = _student(BiDMConfig(connections=1, spd_weight=0.0))
    conn = BiDM.connection(student)
    unit = conn.units[0]
    with torch.no_grad():
        conn.alpha.copy_(torch.linspace(0.1, 0.9, conn.num_buckets).reshape(-1, 1))  # a different a per bucket
    gen = torch.Generator().manual_seed(5)
    x, x_prev = torch.randn(3, 3, 8, 8, generator=gen), torch.randn(3, 3, 8, 8, generator=gen)
    t, t_prev = torch.tensor([731, 42, 355]), torch.tensor([751, 62, 355])
    valid = torch.tensor([True, True, False])  # the last sample is at its trajectory's first step

    class Batch:
        previous = type("Prev", (), {"x": x_prev, "t": t_prev, "valid": valid})

    class Runner:
        def student(self, xs: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
            with qat.timestep(student, ts):
                return student(xs, ts).sample

    method.before_student_forward(student, Batch(), Runner())
    blended = _run(student, x, t, [unit])[unit]

    for i in range(3):  # each sample on its own: its previous step, then its step, from an empty state
        qat.reset_sampling_state(student)
        prev_i = _run(student, x_prev[i:i + 1], t_prev[i:i + 1], [unit])[unit]
        qat.reset_sampling_state(student)
        plain_i = _run(student, x[i:i + 1], t[i:i + 1], [unit])[unit]
        a = float(conn.alpha.detach()[int(t[i]) // 10, 0]) if valid[i] else 0.0
        torch.testing.assert_close(blended[i:i + 1], (1 - a) * plain_i + a * prev_i, rtol=1e-5, atol=1e-6)
        if valid[i]:
            assert not torch.allclose(blended[i:i + 1], plain_i)


def test_connection_refuses_two_model_calls_of_one_step() -> None:
    _, student = _student(BiDMConfig(connections=2, spd_weight=0.0))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for t in (999, 899):  # one call per step: the timesteps fall
            with qat.timestep(student, torch.tensor(t)):
                student(x, t)
        # Heun's corrector, or a separate call for a CFG branch: the same timestep again
        with pytest.raises(RuntimeError, match="one model evaluation per step"):
            with qat.timestep(student, torch.tensor(899)):
                student(x, 899)
        qat.reset_sampling_state(student)  # a new sampling run starts empty
        with qat.timestep(student, torch.tensor(899)):
            student(x, 899)


def test_connection_outputs_depend_on_the_previous_call_and_reset_restores_them() -> None:
    _, student = _student(BiDMConfig(connections=2, spd_weight=0.0))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))

    def two_steps() -> torch.Tensor:
        with torch.no_grad():
            for t in (999, 500):
                with qat.timestep(student, torch.tensor(t)):
                    out = student(x, t).sample
        return out

    first = two_steps()
    qat.reset_sampling_state(student)
    assert torch.equal(two_steps(), first)
    qat.reset_sampling_state(student)
    with torch.no_grad(), qat.timestep(student, torch.tensor(500)):
        alone = student(x, 500).sample
    assert not torch.allclose(alone, first)  # the blend changed the second call


def test_export_stores_one_bit_codes_and_reloads_to_the_same_outputs(tmp_path) -> None:
    method, student = _student(BiDMConfig(connections=2, spd_weight=0.0))
    with torch.no_grad():
        BiDM.connection(student).alpha.uniform_(0.0, 0.6, generator=torch.Generator().manual_seed(7))
        for m in student.modules():
            if isinstance(m, XnorConv2d):
                m.kmap_bias.fill_(0.05)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(8))

    def sample(model: nn.Module) -> torch.Tensor:
        qat.reset_sampling_state(model)
        with torch.no_grad():
            for t in (999, 666, 333):
                with qat.timestep(model, torch.tensor(t)):
                    out = model(x, t).sample
        return out

    expected = sample(student)
    out = qat.export_quantized(student, tmp_path / "w1a1", convert_fn=method.convert)
    loaded = qat.load_quantized(out)
    tensors = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    name = "down_blocks.0.resnets.0.conv1"
    assert tensors[f"{name}.weight.packed"].dtype == torch.uint8 and f"{name}.weight" not in tensors
    assert tensors[f"{name}.weight.packed"].numel() == -(-student.get_submodule(name).weight.numel() // 8)
    for key in (f"{name}.kmap_weight", f"{name}.act_quantizer.threshold", "cross_timestep.alpha"):
        torch.testing.assert_close(tensors[key], student.state_dict()[key], rtol=0, atol=0)
    assert isinstance(loaded.get_submodule(name), XnorConv2d)
    assert isinstance(BiDM.connection(loaded), CrossTimestepConnection)
    assert torch.equal(sample(loaded), expected)


def test_dit_student_keeps_adaln_fp_connects_the_last_blocks_and_distils_token_grids() -> None:
    from diffusers import DiTTransformer2DModel

    from qat.losses import LossInputs

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8)
    method = BiDM(BiDMConfig(connections=2))
    student, _ = method.build_student(dit, "dit")
    layers = quant_layers(student)
    assert "transformer_blocks.0.norm1.linear" not in layers and "pos_embed.proj" not in layers  # full precision
    assert isinstance(layers["transformer_blocks.1.attn1.to_q"].act_quantizer, SignActQuantizer)
    assert BiDM.connection(student).units == ["transformer_blocks.1", "transformer_blocks.2"]
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([700, 300]), torch.tensor([1, 2])

    def forward(m: nn.Module, batch: tuple) -> torch.Tensor:
        return m(batch[0], timestep=batch[1], class_labels=batch[2]).sample

    method.initialize(student, Calibration([(x, t, y)], forward))
    taps = method.spd.taps()
    with torch.no_grad(), FeatureTaps(dit, names=taps) as teacher_taps:
        target = forward(dit, (x, t, y))
    with qat.timestep(student, t), FeatureTaps(student, names=taps) as own:
        out = forward(student, (x, t, y))
    assert own.features["transformer_blocks.0"].shape == (2, 16, 16)  # 4 x 4 tokens, folded to a grid by SPD
    loss = method.spd(LossInputs(out, target, t, False, 1.0, own.features, teacher_taps.features, student))
    loss.backward()
    assert loss > 0 and layers["transformer_blocks.0.attn1.to_q"].weight.grad.abs().sum() > 0


def test_video_families_refuse_spd_with_the_key_to_change() -> None:
    with pytest.raises(ValueError, match="bidm.spd_weight=0"):
        BiDM(BiDMConfig()).build_student(nn.Linear(2, 2), "wan")


class _Echo(nn.Module):
    """A model of one block that returns its input: the connection's blend is then visible directly."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def test_guidance_rows_blend_with_their_own_sample_timestep() -> None:
    model = _Echo()
    conn = CrossTimestepConnection(["block"], num_buckets=10, num_train_timesteps=1000)
    model.add_module("cross_timestep", conn.attach(model))
    with torch.no_grad():
        conn.alpha.copy_(torch.arange(10.0).reshape(10, 1) / 20)  # bucket b blends with weight b / 20
    gen = torch.Generator().manual_seed(9)
    first, second = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)  # [uncond; cond] of B = 2
    t_prev, t = torch.tensor([950, 420]), torch.tensor([850, 320])
    with torch.no_grad():
        with qat.timestep(model, t_prev):
            assert torch.equal(model(first), first)  # the first call of a run is unchanged
        with qat.timestep(model, t):
            out = model(second)
    a = torch.tensor([8, 3, 8, 3]).reshape(4, 1) / 20  # rows i and B + i belong to sample i
    torch.testing.assert_close(out, (1 - a) * second + a * first)


def test_a_call_without_timestep_keeps_nothing_and_reattaching_replaces_the_hooks() -> None:
    model = _Echo()
    conn = CrossTimestepConnection(["block"]).attach(model)
    model.add_module("cross_timestep", conn)
    x, y = torch.ones(2, 3), torch.zeros(2, 3)
    with torch.no_grad():
        model(x)  # e.g. a calibration forward: no timestep, nothing kept
        assert not conn.primed
        with qat.timestep(model, torch.tensor(900)):
            assert torch.equal(model(y), y)
    CrossTimestepConnection(["block"]).attach(model)
    conn.attach(model)
    assert len(model.block._forward_hooks) == 1  # one connection per model


def test_a_deep_copy_blends_with_its_own_table() -> None:
    import copy

    _, student = _student(BiDMConfig(connections=2, spd_weight=0.0))
    clone = copy.deepcopy(student)
    with torch.no_grad():
        BiDM.connection(clone).alpha.fill_(0.9)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(10))

    def two_steps(model: nn.Module) -> torch.Tensor:
        qat.reset_sampling_state(model)
        with torch.no_grad():
            for t in (900, 400):
                with qat.timestep(model, torch.tensor(t)):
                    out = model(x, t).sample
        return out

    before = two_steps(student)
    assert not torch.allclose(two_steps(clone), before)
    assert torch.equal(two_steps(student), before)  # the original's hooks still use the original's table
    assert BiDM.connection(clone) is not BiDM.connection(student)
