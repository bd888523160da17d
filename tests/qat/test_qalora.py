"""QALoRA (EfficientDM Eq. 6): exactness at init, the integer-domain update, merging, gradients, param groups.

With W_int = clip(round(W / s) + z) the QALoRA weight is  W_hat = s * (clip(W_int + round(scaling * B A / s)) - z).
Every expected value here is computed by hand with numpy from the layer's own W, A, B, s and z.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from qat_testutils import naive_fake_quant
from torch import nn

import qat
from qat.nn import QALoRAConv2d, QALoRALinear, QuantConv2d, QuantLinear
from qat.optim import param_groups, scale_aware_gradient_hooks
from qat.prepare import LayerRule, QuantSpec
from qat.quantizers import LSQConfig, TemporalLSQConfig
from qat.ste import fake_quantize_lowrank_ste

W4 = LSQConfig(n_bits=4, granularity="channel")  # unsigned asymmetric per channel, as EfficientDM
RANK = 4


class Net(nn.Module):
    """One conv and one linear, used separately."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(10, 7)


def make(lora: bool = True, lora_alpha: float | None = None, act=None, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    spec = QuantSpec(rules=[LayerRule(patterns=["conv", "fc"], weight=W4, act=act, lora=lora)], lora_rank=RANK,
                     lora_alpha=lora_alpha)
    qat.prepare(net, spec)
    qat.initialize_weight_quantizers(net)
    return net


def inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {"conv": torch.randn(2, 3, 8, 8, generator=gen), "fc": torch.randn(5, 10, generator=gen)}


def base(layer: nn.Module) -> QuantLinear | QuantConv2d:
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


def float_op(name: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, w, b, stride=2, padding=1) if name == "conv" else F.linear(x, w, b)


def hand_delta(layer: nn.Module) -> np.ndarray:
    """scaling * B A in the weight's layout, from the adapter matrices."""
    a = layer.lora_A["default"].weight.detach().double().numpy()
    b = layer.lora_B["default"].weight.detach().double().numpy()
    scaling = layer.scaling["default"]
    if a.ndim == 2:
        return scaling * (b @ a)
    return scaling * np.einsum("or,rikl->oikl", b[:, :, 0, 0], a)


def hand_qalora_weight(layer: nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(W_hat, codes, s, z) by hand; s and z broadcast over the output-channel axis."""
    bl = base(layer)
    q = bl.weight_quantizer
    w = bl.weight.detach().double().numpy()
    shape = (-1,) + (1,) * (w.ndim - 1)
    s = q.step.detach().double().numpy().reshape(shape)
    z = np.round(q.zero_point.detach().double().numpy()).reshape(shape)
    w_int = np.clip(np.round(w / s) + z, 0, 15)
    codes = np.clip(w_int + np.round(hand_delta(layer) / s), 0, 15)
    return s * (codes - z), codes, s, z


def randomise_b(net: Net, scale: float = 0.6, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("conv", "fc"):
            b = getattr(net, name).lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen) * scale)


@pytest.mark.parametrize("name", ["conv", "fc"])
def test_zero_init_qalora_equals_ptq_bitwise(name: str) -> None:
    net, ptq = make(lora=True), make(lora=False)
    layer = getattr(net, name)
    assert isinstance(layer, QALoRAConv2d if name == "conv" else QALoRALinear)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert torch.count_nonzero(layer.lora_A["default"].weight) > 0
    x = inputs()[name]
    with torch.no_grad():
        out = layer(x)
        assert torch.equal(out, getattr(ptq, name)(x))
        # ... and both equal the float op on the naively fake-quantized weight.
        q = base(layer).weight_quantizer
        w_q = naive_fake_quant(base(layer).weight, q.step, q.zero_point, 0, 15, "channel", 0)
        torch.testing.assert_close(out, float_op(name, x, w_q, base(layer).bias), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lora_alpha", [None, 8.0])
@pytest.mark.parametrize("name", ["conv", "fc"])
def test_random_b_moves_the_integer_weights(name: str, lora_alpha: float | None) -> None:
    net = make(lora_alpha=lora_alpha)
    randomise_b(net)
    layer = getattr(net, name)
    assert layer.scaling["default"] == (1.0 if lora_alpha is None else lora_alpha / RANK)
    w_hat, codes, s, z = hand_qalora_weight(layer)
    w = base(layer).weight.detach().double().numpy()
    w_int = np.clip(np.round(w / s) + z, 0, 15)
    shift = np.round(hand_delta(layer) / s)
    assert np.count_nonzero(shift) > 0.3 * shift.size  # the adapter does move integers
    assert np.any((w_int + shift < 0) | (w_int + shift > 15))  # and the clip is exercised
    x = inputs()[name]
    with torch.no_grad():
        out = layer(x)
    expected = float_op(name, x.double(), torch.from_numpy(w_hat), base(layer).bias.double()).float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # The adapter is *not* a float LoRA branch: W_hat differs from Q(W) + BA.
    q_w = naive_fake_quant(base(layer).weight, base(layer).weight_quantizer.step,
                           base(layer).weight_quantizer.zero_point, 0, 15, "channel", 0).double().numpy()
    assert not np.allclose(w_hat, q_w + hand_delta(layer), atol=1e-3)


def test_merge_is_exact_and_lands_on_the_integer_grid() -> None:
    net = make(act=TemporalLSQConfig(n_bits=8, num_timesteps=3, learn_offset=True))
    randomise_b(net)
    xs = inputs()
    with qat.timestep_index(net, 1):
        qat.calibrate(net, [xs], lambda m, b: (m.conv(b["conv"]), m.fc(b["fc"])))
    hand = {name: hand_qalora_weight(getattr(net, name)) for name in ("conv", "fc")}
    with torch.no_grad(), qat.timestep_index(net, 1):
        before = {name: getattr(net, name)(xs[name]) for name in ("conv", "fc")}
    float_keys = {k.replace("base_layer.", "") for k in net.state_dict() if "lora_" not in k}

    qat.convert(net)

    assert type(net.conv) is QuantConv2d and type(net.fc) is QuantLinear  # peft wrappers are gone
    assert set(net.state_dict()) == float_keys  # no LoRA keys left
    assert not any(p.requires_grad for p in net.parameters())
    with torch.no_grad(), qat.timestep_index(net, 1):
        for name in ("conv", "fc"):
            after = getattr(net, name)(xs[name])
            torch.testing.assert_close(after, before[name], rtol=0, atol=1e-6)
    for name in ("conv", "fc"):
        _, codes, s, z = hand[name]
        w = getattr(net, name).weight.detach().double().numpy()
        merged_codes = w / s + z
        np.testing.assert_allclose(merged_codes, np.round(merged_codes), atol=1e-4)  # on the grid
        np.testing.assert_array_equal(np.round(merged_codes), codes)  # = clip(W_int + round(BA / s))
        # Quantizing the merged weight again changes nothing.
        q = getattr(net, name).weight_quantizer
        assert torch.equal(q(getattr(net, name).weight), getattr(net, name).weight)


def test_unmerge_is_refused() -> None:
    net = make()
    with pytest.raises(RuntimeError, match="cannot be undone"):
        net.fc.unmerge()


@pytest.mark.parametrize("random_b", [False, True])
def test_gradients_reach_lora_and_weight_steps(random_b: bool) -> None:
    net = make()
    if random_b:
        randomise_b(net)
    xs = inputs()
    loss = sum(getattr(net, name)(xs[name]).square().sum() for name in ("conv", "fc"))
    loss.backward()
    for name in ("conv", "fc"):
        layer = getattr(net, name)
        assert torch.count_nonzero(layer.lora_B["default"].weight.grad) > 0
        a_grad = layer.lora_A["default"].weight.grad
        if random_b:
            assert torch.count_nonzero(a_grad) > 0
        else:  # B = 0: dL/dA = B^T (...) = 0
            assert a_grad is None or torch.count_nonzero(a_grad) == 0
        assert torch.count_nonzero(base(layer).weight_quantizer.step.grad) > 0
        assert base(layer).weight.grad is None and not base(layer).weight.requires_grad
        assert base(layer).bias.grad is None


def _set_weight_steps(net: Net, steps: dict[str, list[float]]) -> None:
    with torch.no_grad():
        for name, values in steps.items():
            base(getattr(net, name)).weight_quantizer.step.copy_(torch.tensor(values))


STEPS = {"conv": [0.1, 0.2, 0.3, 0.1, 0.2, 0.3], "fc": [0.5, 0.5, 1.0, 1.0, 0.5, 0.5, 1.5]}
MEANS = {"conv": 0.2, "fc": 5.5 / 7}  # mean(s_w) by hand


def test_scale_aware_param_groups() -> None:
    act = TemporalLSQConfig(n_bits=4, num_timesteps=3, learn_offset=True)
    net = make(act=act)
    _set_weight_steps(net, STEPS)
    groups = param_groups(net, lora_lr=4e-4, weight_step_lr=1e-6, act_step_lr=5e-4)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"lora/conv", "lora/fc", "weight_quantizers", "act_quantizers"}
    for name in ("conv", "fc"):
        g = by_name[f"lora/{name}"]
        assert g["lr"] == pytest.approx(4e-4 * MEANS[name], rel=1e-6)
        layer = getattr(net, name)
        assert {id(p) for p in g["params"]} == {id(layer.lora_A["default"].weight),
                                                id(layer.lora_B["default"].weight)}
        assert g["weight_decay"] == 0.0
    assert by_name["lora/conv"]["lr"] != by_name["lora/fc"]["lr"]
    wq, aq = by_name["weight_quantizers"], by_name["act_quantizers"]
    assert wq["lr"] == 1e-6 and aq["lr"] == 5e-4
    assert wq["weight_decay"] == 0.0 and aq["weight_decay"] == 0.0  # no decay on quantizer params by default
    assert {id(p) for p in wq["params"]} == {id(base(net.conv).weight_quantizer.step),
                                             id(base(net.fc).weight_quantizer.step)}
    assert {id(p) for p in aq["params"]} == {id(p) for n in ("conv", "fc")
                                             for p in (base(getattr(net, n)).act_quantizer.step,
                                                       base(getattr(net, n)).act_quantizer.zero_point)}
    # Every trainable parameter is in exactly one group.
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in net.parameters() if p.requires_grad}
    torch.optim.AdamW(groups)  # the groups are valid optimizer input

    custom = {g["name"]: g for g in param_groups(net, quantizer_weight_decay=0.01, lora_weight_decay=0.1)}
    assert custom["weight_quantizers"]["weight_decay"] == 0.01 and custom["lora/fc"]["weight_decay"] == 0.1

    flat = {g["name"]: g for g in param_groups(net, lora_lr=1e-3, scale_aware=False)}
    assert flat["lora"]["lr"] == 1e-3 and len(flat["lora"]["params"]) == 4


def test_scale_aware_activation_step_groups() -> None:
    """act_scale_aware: each activation quantizer's steps get lr = c * mean(|s_a|); zero-points keep c."""
    act = TemporalLSQConfig(n_bits=8, num_timesteps=3, learn_offset=True)
    net = make(act=act)
    _set_weight_steps(net, STEPS)
    tables = {"conv": [[0.01], [0.02], [0.06]], "fc": [[0.5], [0.25], [0.75]]}
    with torch.no_grad():
        for name, rows in tables.items():
            q = base(getattr(net, name)).act_quantizer
            q.step.copy_(torch.tensor(rows).reshape(q.step.shape))
    groups = param_groups(net, act_step_lr=0.01, act_scale_aware=True)
    by_name = {g["name"]: g for g in groups}
    for name, rows in tables.items():
        g = by_name[f"act_step/{name}.base_layer.act_quantizer"]  # the module path inside the peft wrapper
        mean = sum(r[0] for r in rows) / len(rows)  # by hand
        assert g["lr"] == pytest.approx(0.01 * mean, rel=1e-6)
        assert [id(p) for p in g["params"]] == [id(base(getattr(net, name)).act_quantizer.step)]
    offsets = by_name["act_quantizers"]
    assert offsets["lr"] == 0.01
    assert {id(p) for p in offsets["params"]} == {id(base(getattr(net, n)).act_quantizer.zero_point)
                                                  for n in ("conv", "fc")}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in net.parameters() if p.requires_grad}


def test_frozen_rules_have_no_trainable_quantizer_params() -> None:
    torch.manual_seed(0)
    net = Net()
    spec = QuantSpec(rules=[LayerRule(patterns=["conv"], weight=W4, act=None, trainable=False),
                            LayerRule(patterns=["fc"], weight=W4, act=None, lora=True)], lora_rank=RANK)
    qat.prepare(net, spec)
    qat.initialize_weight_quantizers(net)
    assert not net.conv.weight_quantizer.step.requires_grad
    names = {g["name"] for g in param_groups(net)}
    assert names == {"lora/fc", "weight_quantizers"}
    assert all(p is not net.conv.weight_quantizer.step for g in param_groups(net) for p in g["params"])


def test_scale_aware_gradient_hooks_multiply_lora_grads_by_mean_step() -> None:
    xs = inputs()
    grads = []
    for hooked in (False, True):
        net = make()
        randomise_b(net)
        _set_weight_steps(net, STEPS)
        handles = scale_aware_gradient_hooks(net) if hooked else []
        loss = sum(getattr(net, name)(xs[name]).square().sum() for name in ("conv", "fc"))
        loss.backward()
        grads.append({(name, part): getattr(getattr(net, name), part)["default"].weight.grad.clone()
                      for name in ("conv", "fc") for part in ("lora_A", "lora_B")})
        step_grads = {name: base(getattr(net, name)).weight_quantizer.step.grad.clone() for name in ("conv", "fc")}
        grads[-1].update({(name, "step"): g for name, g in step_grads.items()})
        for h in handles:
            h.remove()
    plain, hooked = grads
    for name in ("conv", "fc"):
        for part in ("lora_A", "lora_B"):
            torch.testing.assert_close(hooked[(name, part)], plain[(name, part)] * MEANS[name])
        assert torch.equal(hooked[(name, "step")], plain[(name, "step")])  # only LoRA grads are scaled


def test_qalora_needs_a_weight_quantizer() -> None:
    with pytest.raises(ValueError, match="lora needs a weight quantizer"):
        LayerRule(patterns=["fc"], weight=None, act=None, lora=True)


def test_deepcopy_of_prepared_model_is_independent() -> None:
    net = make()
    clone = copy.deepcopy(net)
    randomise_b(clone)
    with torch.no_grad():
        assert not torch.equal(net.fc(inputs()["fc"]), clone.fc(inputs()["fc"]))


def _grads_of(net: Net, xs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    loss = sum(getattr(net, name)(xs[name]).square().sum() for name in ("conv", "fc"))
    loss.backward()
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def test_recomputed_weight_node_matches_checkpoint_and_plain_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    """The eager recompute node gives the gradients of the compiled branch (the low-rank node, and
    torch.utils.checkpoint where that does not apply) and of keeping the whole graph; the parameters are restored
    after its backward."""
    xs = inputs()
    nets = [make() for _ in range(4)]
    for net in nets:
        randomise_b(net)
    eager = _grads_of(nets[0], xs)
    calls: list[int] = []
    with monkeypatch.context() as m:  # the branch a compiled graph takes: qat.ste.fake_quantize_lowrank_ste
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        m.setattr(qat.nn.qalora, "fake_quantize_lowrank_ste",
                  lambda *args: calls.append(1) or fake_quantize_lowrank_ste(*args))
        lowrank = _grads_of(nets[1], xs)
    assert len(calls) == 2  # conv and fc
    with monkeypatch.context() as m:  # where it does not apply: a checkpoint region
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        m.setattr(qat.nn.qalora._QALoRAMixin, "_lowrank_inputs", lambda self: None)
        ckpt = _grads_of(nets[2], xs)
    with monkeypatch.context() as m:  # no recomputation at all
        m.setattr(qat.nn.qalora, "checkpoint", lambda fn, use_reentrant: fn())
        m.setattr(qat.nn.qalora._QALoRAMixin, "_lowrank_inputs", lambda self: None)
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        plain = _grads_of(nets[3], xs)
    assert set(eager) == set(lowrank) == set(ckpt) == set(plain) and any("lora_A" in k for k in eager)
    assert any("weight_quantizer.step" in k for k in eager)
    for k in eager:
        torch.testing.assert_close(eager[k], ckpt[k], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(eager[k], plain[k], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(eager[k], lowrank[k], rtol=1e-5, atol=1e-6)  # sums in another order
    for name in ("conv", "fc"):  # every slot holds its nn.Parameter again
        layer = getattr(nets[0], name)
        assert all(isinstance(p, nn.Parameter) for p in layer.parameters())
        params = dict(nets[0].named_parameters())
        assert base(layer).weight_quantizer.step is params[f"{name}.base_layer.weight_quantizer.step"]


def test_lowrank_node_applies_only_to_its_layout() -> None:
    """The compiled branch's low-rank node needs one adapter, a frozen base weight and a per-channel or per-tensor
    weight quantizer; other layers keep the checkpoint region."""
    net = make()
    assert all(getattr(net, n)._lowrank_inputs() is not None for n in ("conv", "fc"))
    base(net.fc).weight.requires_grad_(True)  # a trained base weight needs its gradient
    assert net.fc._lowrank_inputs() is None
    net = make()
    base(net.conv).weight_quantizer.enabled = False
    assert net.conv._lowrank_inputs() is None
    net, other = make(), make()
    assert qat.set_fast_path(net, fused=False) > 0  # the composite round_ste weight quantizer: no low-rank node
    assert all(getattr(net, n)._lowrank_inputs() is None for n in ("conv", "fc"))
    assert all(getattr(other, n)._lowrank_inputs() is not None for n in ("conv", "fc"))  # per model, not global
    net = make()
    for branch in (net.fc.lora_A, net.fc.lora_B):  # a second adapter: delta is the sum of two products
        branch["second"] = copy.deepcopy(branch["default"])
    net.fc.scaling["second"] = 1.0
    net.fc.set_adapter(["default", "second"])
    assert list(net.fc.active_adapters) == ["default", "second"]
    assert net.fc._lowrank_inputs() is None
    group = LSQConfig(n_bits=4, granularity="group", group_size=5)
    spec = QuantSpec(rules=[LayerRule(patterns=["fc"], weight=group, lora=True)], lora_rank=RANK)
    net = Net()
    qat.prepare(net, spec)
    qat.initialize_weight_quantizers(net)
    assert net.fc._lowrank_inputs() is None


@pytest.mark.parametrize("name", ["conv", "fc"])
def test_compiled_layer_keeps_int8_codes_not_b_a_and_gives_the_eager_gradients(name: str) -> None:
    """Compiled (AOTAutograd's min-cut partitioner), a QALoRA layer keeps for backward its inputs, parameters and
    one int8 code per weight element, no float32 weight-sized tensor (B A or the quantizer's input; under bf16
    autocast), and its gradients are the eager recompute node's (float32)."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    kept: list[torch.Tensor] = []

    def forward_compiler(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        kept.extend(n.meta["val"] for n in out[1:] if isinstance(n, torch.fx.Node) and n.op == "call_function")
        return gm

    def backend(gm: torch.fx.GraphModule, example_inputs: list):  # noqa: ANN202 - dynamo's backend signature
        return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler, bw_compiler=lambda g, _: g,
                                     partition_fn=min_cut_rematerialization_partition)

    x = inputs()[name]
    grads = []
    for autocast, compiled in ((True, True), (False, False), (False, True)):
        net = make()
        randomise_b(net)
        layer = getattr(net, name)
        torch._dynamo.reset()
        kept.clear()
        call = torch.compile(layer, backend=backend, dynamic=False) if compiled else layer
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = call(x)
        out.float().square().sum().backward()
        if autocast:
            numel = base(layer).weight.numel()
            weight_sized = [t.dtype for t in kept if t.numel() == numel]
            assert torch.int8 in weight_sized and torch.float32 not in weight_sized, weight_sized
        else:
            grads.append({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("weight_quantizer.step" in k for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6, msg=k)


def test_recomputed_weight_node_recomputes_under_the_forwards_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backward runs outside the autocast region; the eager node recomputes peft's product B A in the forward's
    autocast dtype, so its gradients are those of keeping the whole graph (float32 recomputation moved codes)."""
    xs = inputs()
    grads = []
    for keep_graph in (False, True):
        net = make()
        randomise_b(net)
        with monkeypatch.context() as m:
            if keep_graph:
                m.setattr(qat.nn.qalora._RecomputedWeight, "apply", lambda layer, slots, *p: layer._quantized_weight())
            with torch.autocast("cpu", torch.bfloat16):
                loss = sum(getattr(net, n)(xs[n]).float().square().sum() for n in ("conv", "fc"))
            loss.backward()
        grads.append({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("weight_quantizer.step" in k for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-6, atol=1e-7, msg=k)
