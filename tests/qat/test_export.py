"""Real low-bit export (``qat.export``): parity with the fake-quant student, the file contents against hand-computed
integer codes, disk sizes, the model card, and every rejection of a damaged export directory.

Reference codes are computed here with numpy float32 scalar formulas from the student's own ``W``, LoRA product,
steps and zero-points (``q = clip(clip(round(W / s) + z) + round(delta / s))``), and packed bytes are decoded with
``numpy.unpackbits`` (little bit order), independently of ``qat.packing``.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer
from qat_testutils import ddim_timesteps, qrange_ref, tiny_unet, tiny_unet_cond
from safetensors.torch import load_file, save_file
from torch import nn

import qat
from qat.export import (
    CONFIG_NAME,
    PACKED_SUFFIX,
    WEIGHTS_NAME,
    ExportError,
    export_quantized,
    load_quantized,
)
from qat.export_card import export_sizes
from qat.methods.efficientdm import EfficientDMConfig, efficientdm_spec
from qat.nn import QuantConv2d, QuantLinear
from qat.nn.qalora import qalora_layers
from qat.prepare import LayerRule, QuantSpec
from qat.quantizers import BinaryConfig, LSQConfig, TemporalLSQConfig, TemporalLSQQuantizer, UniformConfig
from qat.timestep import temporal_quantizers

GRID = ddim_timesteps(10)  # 901, 801, ..., 1
WEIGHT_BITS = (2, 3, 4, 8)
W4 = pytest.mark.parametrize("exported", [4], indirect=True)  # tests for which one bit-width is enough
SPECIAL = {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"}


def _timed(forward):
    def fwd(m, batch):
        with qat.timestep(m, batch[1]):
            return forward(m, batch)

    return fwd


def _randomise_lora_and_tables(model: nn.Module, seed: int = 1) -> None:
    """Non-zero LoRA B (so the integer-domain merge moves codes) and distinct temporal table rows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in qalora_layers(model).values():
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
        for q in temporal_quantizers(model):
            q.step.mul_(1 + 0.3 * torch.rand(q.step.shape, generator=gen))
            shape = q.zero_point.shape  # rows differ in their integer part and in a fractional offset
            q.zero_point.add_(torch.randint(-2, 3, shape, generator=gen) + torch.rand(shape, generator=gen) - 0.5)


def _base_name(name: str) -> str:
    return name.replace(".base_layer", "")


@pytest.fixture(scope="module", params=WEIGHT_BITS)
def exported(request, tmp_path_factory):
    bits = request.param
    torch.manual_seed(0)
    model, forward, make_batch = tiny_unet_cond()
    float_model = copy.deepcopy(model)
    act_bits = max(bits, 4)
    # min-max activation init keeps the fixture fast; the random table perturbation below makes every row differ
    cfg = EfficientDMConfig(weight_bits=bits, act_bits=act_bits, num_timesteps=10, lora_rank=4, act_init="minmax")
    report = qat.prepare(model, efficientdm_spec(cfg))
    qat.set_timestep_grid(model, GRID)
    qat.calibrate(model, [make_batch(GRID[[0, 4]]), make_batch(GRID[[7, 9]])], _timed(forward), max_samples=256)
    _randomise_lora_and_tables(model)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = export_quantized(model, tmp_path_factory.mktemp(f"w{bits}"),
                           model_card={"base_model": "tiny-random-unet", "evaluation": {
                               "PTQ start": {"eps_mse": 0.125}, "trained": {"eps_mse": 0.0625}}})
    loaded = load_quantized(out)
    return dict(bits=bits, act_bits=act_bits, model=model, float_model=float_model, forward=forward,
                make_batch=make_batch, report=report, out=out, loaded=loaded, before=before)


# -- parity ----------------------------------------------------------------------------------------------------------
TIMESTEP_CASES = {
    "grid_scalar": [901, 901],
    "grid_per_sample": [1, 501],
    "interpolated": [350, 17],
    "clamped_beyond_grid": [999, 0],
}


@pytest.mark.parametrize("case", list(TIMESTEP_CASES))
def test_reloaded_model_reproduces_the_fake_quant_student(exported, case: str) -> None:
    torch.manual_seed(5)
    batch = exported["make_batch"](torch.tensor(TIMESTEP_CASES[case]))
    fwd = _timed(exported["forward"])
    with torch.no_grad():
        student = fwd(exported["model"], batch)
        loaded = fwd(exported["loaded"], batch)
    assert (student - loaded).abs().max().item() <= 1e-6
    assert student.abs().max().item() > 0.1  # a real output, not a degenerate one


def test_timestep_index_and_hook_work_on_the_loaded_model(exported) -> None:
    torch.manual_seed(6)
    batch = exported["make_batch"](GRID[[2, 2]])
    with torch.no_grad(), qat.timestep_index(exported["model"], 7):
        ref = exported["forward"](exported["model"], batch)
    with torch.no_grad(), qat.timestep_index(exported["loaded"], 7):
        assert (exported["forward"](exported["loaded"], batch) - ref).abs().max().item() <= 1e-6
    # attach_timestep_hook reads the timestep argument: GRID[2] is table row 7 of the ascending grid
    handle = qat.attach_timestep_hook(exported["loaded"])
    try:
        with torch.no_grad():
            out = exported["forward"](exported["loaded"], batch)
    finally:
        handle.remove()
        qat.clear_timestep(exported["loaded"])
    assert (out - ref).abs().max().item() <= 1e-6
    # the lookup really depends on the timestep: another row gives another output
    with torch.no_grad(), qat.timestep_index(exported["loaded"], 0):
        assert not torch.allclose(exported["forward"](exported["loaded"], batch), ref)


def test_export_leaves_the_callers_student_untouched(exported) -> None:
    model = exported["model"]
    assert len(qalora_layers(model)) == len(exported["report"].rows) - len(SPECIAL)
    after = model.state_dict()
    assert set(after) == set(exported["before"])
    assert all(torch.equal(after[k], v) for k, v in exported["before"].items())


def test_loaded_model_is_a_plain_quantized_diffusers_model(exported) -> None:
    loaded, model = exported["loaded"], exported["model"]
    assert type(loaded) is UNet2DConditionModel
    assert not any(isinstance(m, BaseTunerLayer) for m in loaded.modules())
    assert qalora_layers(loaded) == {}
    assert not any("lora" in k or "base_layer" in k for k in loaded.state_dict())
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert qat.is_initialized(loaded)
    student_layers = {_base_name(n): m for n, m in qat.quant_layers(model).items()}
    loaded_layers = qat.quant_layers(loaded)
    assert set(loaded_layers) == student_layers.keys()
    for name, layer in loaded_layers.items():
        ref = student_layers[name]
        assert type(layer) is type(ref) and type(layer) in (QuantLinear, QuantConv2d)
        for part in ("weight_quantizer", "act_quantizer"):
            q, q_ref = getattr(layer, part), getattr(ref, part)
            assert type(q) is type(q_ref) and q.config == q_ref.config
    for name in exported["report"].excluded:
        assert type(loaded.get_submodule(name)) in (nn.Linear, nn.Conv2d)
    for q in temporal_quantizers(loaded):
        assert torch.equal(q.timesteps, GRID.float().sort().values)


# -- file contents ---------------------------------------------------------------------------------------------------
def _decode(packed: torch.Tensor, bits: int, n: int) -> np.ndarray:
    """Codes from bytes with numpy: little-endian bit order, ``bits`` consecutive stream bits per code."""
    stream = np.unpackbits(packed.numpy(), bitorder="little")[: n * bits].reshape(n, bits).astype(np.int64)
    return (stream << np.arange(bits)).sum(axis=1)


def _hand_codes(layer: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """(codes with the LoRA update, codes without it) by the float32 formula, for a student layer (peft or not)."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    q = base.weight_quantizer
    w = base.weight.detach().numpy().astype(np.float32)
    shape = (-1,) + (1,) * (w.ndim - 1)
    s = q.step.detach().numpy().astype(np.float32).reshape(shape)
    z = np.round(q.zero_point.detach().numpy().astype(np.float32)).reshape(shape)
    q_min, q_max = qrange_ref(q.config.n_bits, q.config.signed)
    plain = np.clip(np.round(w / s) + z, q_min, q_max)
    if not hasattr(layer, "delta_weight"):
        return plain, plain
    delta = layer.delta_weight().detach().numpy().astype(np.float32)
    return np.clip(plain + np.round(delta / s), q_min, q_max), plain


def test_file_holds_packed_codes_equal_to_hand_computed_codes(exported) -> None:
    model, bits = exported["model"], exported["bits"]
    tensors = load_file(str(exported["out"] / WEIGHTS_NAME))
    moved = total = 0
    for name, layer in qat.quant_layers(model).items():
        base = _base_name(name)
        owner = model.get_submodule(base)  # the peft wrapper for QALoRA layers
        q = layer.weight_quantizer
        b = q.config.n_bits
        assert b == (8 if base in SPECIAL else bits)
        assert f"{base}.weight" not in tensors  # no float copy of a quantized weight
        packed = tensors[base + PACKED_SUFFIX]
        n = layer.weight.numel()
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * b / 8)
        q_min = qrange_ref(b, q.config.signed)[0]
        codes = _decode(packed, b, n).reshape(layer.weight.shape) + q_min
        expect, plain = _hand_codes(owner)
        np.testing.assert_array_equal(codes, expect)
        if base not in SPECIAL:
            moved += int((expect != plain).sum())
            total += expect.size
        # the weight quantizer's step and (rounded) zero-point, under their state-dict names
        assert torch.equal(tensors[f"{base}.weight_quantizer.step"], q.step.detach())
        assert torch.equal(tensors[f"{base}.weight_quantizer.zero_point"], torch.round(q.zero_point.detach()))
        assert f"{base}.weight_quantizer.initialized" not in tensors
        for key, value in layer.act_quantizer.state_dict().items():
            if key != "initialized":
                assert torch.equal(tensors[f"{base}.act_quantizer.{key}"], value)
    assert moved > 0.002 * total  # the LoRA merge does change the stored integers (thousands of codes)
    # every full-precision tensor is there under its diffusers key
    float_state = exported["float_model"].state_dict()
    quantized = {_base_name(n) for n in qat.quant_layers(model)}
    student_state = {_base_name(k): v for k, v in model.state_dict().items() if "lora_" not in k}
    for key in float_state:
        if key.endswith(".weight") and key[: -len(".weight")] in quantized:
            continue
        assert torch.equal(tensors[key], student_state[key]), key


def test_config_json_records_the_scheme(exported) -> None:
    config = json.loads((exported["out"] / CONFIG_NAME).read_text())
    model_config = dict(exported["float_model"].config)
    assert config["_class_name"] == "UNet2DConditionModel"
    assert config["block_out_channels"] == list(model_config["block_out_channels"])
    qc = config["quantization_config"]
    assert qc["quant_method"] == "diffqat" and qc["format_version"] == 2
    assert "layers" not in qc and "attention" not in qc  # format 2: one "modules" section
    report = exported["report"]
    assert report.attention == []  # EfficientDM's spec quantizes no attention processor: layers only
    assert set(qc["modules"]) == {r[0] for r in report.rows}
    assert qc["fp_layers"] == report.excluded
    assert qc["timestep_grid"] == sorted(GRID.tolist()) and qc["num_timesteps"] == 10
    for name, entry in qc["modules"].items():
        layer = exported["loaded"].get_submodule(name)
        special = name in SPECIAL
        assert set(entry) == {"kind", "weight", "act"}
        w, a = entry["weight"], entry["act"]
        assert entry["kind"] == ("quant_conv2d" if isinstance(layer, nn.Conv2d) else "quant_linear")
        assert w["n_bits"] == (8 if special else exported["bits"]) and w["shape"] == list(layer.weight.shape)
        assert (w["quantizer"], w["granularity"], w["signed"], w["symmetric"], w["group_size"]) == (
            "uniform" if special else "lsq", "channel", False, False, None)
        assert a["quantizer"] == ("uniform" if special else "temporal_lsq")
        assert a["n_bits"] == (8 if special else exported["act_bits"]) and a["granularity"] == "tensor"
        assert a.get("num_timesteps") == (None if special else 10)


def test_sizes_match_the_bit_widths(exported, tmp_path) -> None:
    bits = exported["bits"]
    sizes = export_sizes(exported["out"])
    layers = {_base_name(n): m for n, m in qat.quant_layers(exported["model"]).items()}
    numel = {n: m.weight.numel() for n, m in layers.items()}
    width = {n: m.weight_quantizer.config.n_bits for n, m in layers.items()}
    assert sizes.quantized_layers == len(layers)
    assert sizes.quantized_params == sum(numel.values())
    assert sizes.packed_bytes == sum(math.ceil(numel[n] * width[n] / 8) for n in layers)
    # the QALoRA layers alone: 32 / b against fp32, 16 / b against fp16 (up to the last byte of each layer)
    main = [n for n in layers if n not in SPECIAL]
    main_packed = sum(math.ceil(numel[n] * bits / 8) for n in main)
    main_fp32 = 4 * sum(numel[n] for n in main)
    assert main_fp32 / main_packed == pytest.approx(32 / bits, rel=1e-3)
    if bits == 4:
        assert main_fp32 / main_packed == pytest.approx(8.0, rel=1e-4)
    assert 4.0 <= sizes.weight_ratio_fp32 <= 32 / bits + 1e-9  # the W8 special layers pull the ratio towards 4
    assert sizes.weight_ratio_fp16 == pytest.approx(sizes.weight_ratio_fp32 / 2)
    # whole file: its real size, and the FP32 estimate against a real FP32 save of the float model
    assert sizes.file_bytes == (exported["out"] / WEIGHTS_NAME).stat().st_size
    fp_path = tmp_path / "fp.safetensors"
    save_file({k: v.contiguous() for k, v in exported["float_model"].state_dict().items()}, str(fp_path))
    assert sizes.fp32_model_bytes == pytest.approx(fp_path.stat().st_size, abs=64)  # header padding aside, exact
    assert sizes.file_bytes < fp_path.stat().st_size - sizes.fp32_weight_bytes + sizes.packed_bytes \
        + sizes.weight_quantizer_bytes + sizes.act_quantizer_bytes + 65536  # no float copies anywhere
    assert sizes.file_ratio_fp32 > 1.5
    assert "packed codes" in str(sizes)


def test_model_card(exported) -> None:
    card = (exported["out"] / "README.md").read_text()
    bits, act_bits = exported["bits"], exported["act_bits"]
    assert card.startswith(f"# DiffQAT W{bits}A{act_bits} UNet2DConditionModel")
    assert "tiny-random-unet" in card
    assert all(f"`{n}`" in card for n in exported["report"].excluded)  # the full-precision layers are listed
    assert all(f"`{n}`" in card for n in SPECIAL)
    assert "| eps_mse | 0.125 | 0.0625 |" in card
    assert "load_quantized(" in card and "attach_timestep_hook" in card


@W4
def test_an_already_converted_student_exports_the_same_file(exported, tmp_path) -> None:
    converted = qat.convert(copy.deepcopy(exported["model"]))
    assert qalora_layers(converted) == {}
    out = export_quantized(converted, tmp_path / "converted")
    a = load_file(str(out / WEIGHTS_NAME))
    b = load_file(str(exported["out"] / WEIGHTS_NAME))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# -- rejections ------------------------------------------------------------------------------------------------------
@pytest.fixture
def damaged(exported, tmp_path):
    """A fresh copy of the W4 export to damage, with read/write helpers for its tensors and config."""
    root = Path(shutil.copytree(exported["out"], tmp_path / "export"))

    def tensors() -> dict[str, torch.Tensor]:
        return load_file(str(root / WEIGHTS_NAME))

    def write_tensors(t: dict[str, torch.Tensor]) -> None:
        save_file(t, str(root / WEIGHTS_NAME))

    def config() -> dict:
        return json.loads((root / CONFIG_NAME).read_text())

    def write_config(c: dict) -> None:
        (root / CONFIG_NAME).write_text(json.dumps(c))

    return root, tensors, write_tensors, config, write_config


LAYER = "down_blocks.0.resnets.0.conv1"  # a W4 QALoRA conv


@W4
def test_truncated_or_garbage_weights_are_rejected(damaged) -> None:
    root, *_ = damaged
    path = root / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match=rf"{WEIGHTS_NAME}.*corrupt or truncated"):
        load_quantized(root)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ExportError, match=rf"{WEIGHTS_NAME}.*corrupt or truncated"):
        load_quantized(root)
    path.write_bytes(b"")
    with pytest.raises(ExportError, match=WEIGHTS_NAME):
        load_quantized(root)


@W4
def test_wrong_shapes_are_rejected(damaged) -> None:
    root, tensors, write_tensors, *_ = damaged
    t = tensors()
    t["conv_in.bias"] = torch.zeros(33)
    write_tensors(t)
    with pytest.raises(ExportError, match=r"tensor 'conv_in\.bias' has shape \[33\] .* needs \[32\]"):
        load_quantized(root)
    t = tensors()
    t["conv_in.bias"] = torch.zeros(32)
    key = f"{LAYER}.act_quantizer.step"
    t[key] = t[key][:-1].clone()  # a temporal table with T - 1 rows
    write_tensors(t)
    with pytest.raises(ExportError, match=rf"tensor '{key}' has shape \[9\]"):
        load_quantized(root)


@W4
def test_packed_length_that_disagrees_with_bits_and_shape_is_rejected(damaged) -> None:
    root, tensors, write_tensors, *_ = damaged
    t = tensors()
    key = LAYER + PACKED_SUFFIX
    t[key] = t[key][:-1].clone()
    write_tensors(t)
    n = 32 * 32 * 3 * 3  # the conv's weights; 4 bits each: n / 2 bytes, one of them cut off
    with pytest.raises(ExportError, match=rf"{WEIGHTS_NAME}: tensor '{re.escape(key)}' has {n // 2 - 1} bytes but "
                                          rf"n_bits=4 for a weight of shape \[32, 32, 3, 3\] needs "
                                          rf"ceil\({n} \* 4 / 8\) = {n // 2} bytes"):
        load_quantized(root)


def test_non_zero_padding_bits_are_rejected(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(5, 3))  # 15 weights x 3 bits = 45 bits: the last byte has 3 padding bits
    qat.prepare(model, QuantSpec(rules=[LayerRule(["0"], weight=LSQConfig(n_bits=3, granularity="channel"))]))
    qat.initialize_weight_quantizers(model)
    root = export_quantized(model, tmp_path / "export")
    t = load_file(str(root / WEIGHTS_NAME))
    key = "0" + PACKED_SUFFIX
    assert t[key].numel() == 6
    t[key][-1] |= 0x80
    save_file(t, str(root / WEIGHTS_NAME))
    with pytest.raises(ExportError, match=rf"tensor '{re.escape(key)}' non-zero padding bits after the last of 15 "
                                          r"3-bit codes"):
        load_quantized(root, model=nn.Sequential(nn.Linear(5, 3)))


@W4
def test_wrong_bits_in_config_are_rejected(damaged) -> None:
    root, _, _, config, write_config = damaged
    original = config()
    c = copy.deepcopy(original)
    c["quantization_config"]["modules"][LAYER]["weight"]["n_bits"] = 16  # not a supported bit-width
    write_config(c)
    with pytest.raises(ExportError, match=rf"{CONFIG_NAME}: modules\['{LAYER}'\]: weight: invalid quantizer config: "
                                          r"n_bits: must be in \[2, 8\] for lsq, got 16"):
        load_quantized(root)
    c = copy.deepcopy(original)
    c["quantization_config"]["modules"][LAYER]["weight"]["n_bits"] = 8  # supported, but not what was packed
    write_config(c)
    with pytest.raises(ExportError, match=rf"'{LAYER}{PACKED_SUFFIX}' has \d+ bytes but n_bits=8 for a weight"):
        load_quantized(root)
    c = copy.deepcopy(original)
    c["quantization_config"]["modules"][LAYER]["act"]["n_bits"] = "4"
    write_config(c)
    with pytest.raises(ExportError, match=rf"modules\['{LAYER}'\]: act: declared bits n_bits='4' are not supported"):
        load_quantized(root)
    c = copy.deepcopy(original)
    c["quantization_config"]["modules"][LAYER]["weight"]["shape"] = [1, 2, 3, 4]
    write_config(c)
    with pytest.raises(ExportError, match=rf"modules\['{LAYER}'\]: weight\.shape is \[1, 2, 3, 4\]"):
        load_quantized(root)


@W4
def test_missing_tensors_are_rejected(damaged) -> None:
    root, tensors, write_tensors, *_ = damaged
    original = tensors()
    for key in (LAYER + PACKED_SUFFIX, f"{LAYER}.act_quantizer.timesteps", "conv_norm_out.weight"):
        write_tensors({k: v for k, v in original.items() if k != key})
        with pytest.raises(ExportError, match=rf"{WEIGHTS_NAME}: missing tensor '{key}'"):
            load_quantized(root)


@W4
def test_extra_tensors_are_rejected(damaged, exported) -> None:
    root, tensors, write_tensors, *_ = damaged
    t = tensors()
    t[f"{LAYER}.weight"] = exported["loaded"].get_submodule(LAYER).weight.detach().clone()
    write_tensors(t)
    with pytest.raises(ExportError, match=rf"unexpected tensor '{LAYER}\.weight': a float copy of a quantized"):
        load_quantized(root)
    t = tensors()
    del t[f"{LAYER}.weight"]
    t[f"{LAYER}.lora_A.default.weight"] = torch.zeros(4, 4)
    write_tensors(t)
    with pytest.raises(ExportError, match=rf"unexpected tensor '{LAYER}\.lora_A\.default\.weight': a LoRA"):
        load_quantized(root)


@W4
def test_non_integer_zero_point_is_rejected(damaged) -> None:
    root, tensors, write_tensors, *_ = damaged
    t = tensors()
    t[f"{LAYER}.weight_quantizer.zero_point"] = t[f"{LAYER}.weight_quantizer.zero_point"] + 0.25
    write_tensors(t)
    with pytest.raises(ExportError, match=rf"tensor '{LAYER}\.weight_quantizer\.zero_point'.* must hold integers"):
        load_quantized(root)


@W4
def test_missing_or_plain_config_is_rejected(damaged) -> None:
    root, _, _, config, write_config = damaged
    c = config()
    del c["quantization_config"]
    write_config(c)
    with pytest.raises(ExportError, match=rf"{CONFIG_NAME} has no quantization_config"):
        load_quantized(root)
    c["quantization_config"] = {"quant_method": "bitsandbytes"}
    write_config(c)
    with pytest.raises(ExportError, match="not a DiffQAT export"):
        load_quantized(root)
    (root / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ExportError, match=rf"{CONFIG_NAME}: not valid JSON"):
        load_quantized(root)
    (root / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{CONFIG_NAME} not found"):
        load_quantized(root)


@W4
def test_config_naming_a_layer_the_model_lacks_is_rejected(damaged) -> None:
    root, _, _, config, write_config = damaged
    c = config()
    c["quantization_config"]["modules"]["down_blocks.7.conv"] = c["quantization_config"]["modules"][LAYER]
    write_config(c)
    with pytest.raises(ExportError, match=r"quantized layer 'down_blocks\.7\.conv' does not exist"):
        load_quantized(root)


@W4
def test_missing_weights_file_is_rejected(damaged) -> None:
    root, *_ = damaged
    (root / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{WEIGHTS_NAME} not found"):
        load_quantized(root)


# -- format version 1 ------------------------------------------------------------------------------------------------
_V1_MODULE = {"quant_linear": "Linear", "quant_conv2d": "Conv2d"}


def _as_format_1(qc: dict) -> dict:
    """A format-2 ``quantization_config`` written back in the format-1 layout: ``layers`` (``{"module", "weight",
    "act"}`` by layer name) and ``attention`` (``{q, k, v, probs}`` by Attention module name), no ``modules``."""
    v1 = {k: v for k, v in qc.items() if k != "modules"}
    v1["format_version"] = 1
    v1["layers"], v1["attention"] = {}, {}
    for name, entry in qc["modules"].items():
        if entry["kind"] == "quant_attention":
            assert name.endswith(".processor")
            v1["attention"][name[: -len(".processor")]] = {p: entry[p] for p in ("q", "k", "v", "probs")}
        else:
            v1["layers"][name] = {"module": _V1_MODULE[entry["kind"]], "weight": entry["weight"], "act": entry["act"]}
    return v1


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    """Same module types, quantizer configs and state (every tensor bit-identical)."""
    assert {n: type(m) for n, m in a.named_modules()} == {n: type(m) for n, m in b.named_modules()}
    assert {n: m.config for n, m in a.named_modules() if isinstance(m, qat.Quantizer)} == {
        n: m.config for n, m in b.named_modules() if isinstance(m, qat.Quantizer)}
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@W4
def test_format_version_1_config_still_loads(damaged, exported) -> None:
    root, _, _, config, write_config = damaged
    c = config()
    c["quantization_config"] = _as_format_1(c["quantization_config"])
    assert c["quantization_config"]["attention"] == {} and LAYER in c["quantization_config"]["layers"]
    write_config(c)
    loaded = load_quantized(root)
    _assert_same_state(loaded, exported["loaded"])
    torch.manual_seed(7)
    batch = exported["make_batch"](torch.tensor([350, 17]))  # interpolated timesteps: the tables are used
    fwd = _timed(exported["forward"])
    with torch.no_grad():
        assert torch.equal(fwd(loaded, batch), fwd(exported["loaded"], batch))
    # format-1 entries are checked too: an unknown layer module is named
    c["quantization_config"]["layers"][LAYER]["module"] = "Embedding"
    write_config(c)
    with pytest.raises(ExportError, match=rf"quantization_config\.layers\['{LAYER}'\] must record 'module'"):
        load_quantized(root)


# -- other models and refusals ---------------------------------------------------------------------------------------
def _sequential() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),  # 0: signed symmetric per-tensor W3, per-channel signed A8
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),  # 2: grouped conv, per-group W2, LSQ+ A4
        nn.Conv2d(8, 4, 1), nn.Flatten(),  # 4: full precision
        nn.Linear(4 * 6 * 6, 30), nn.ReLU(),  # 6: weight-only W5 per channel with LoRA
        nn.Linear(30, 7), nn.ReLU(),  # 8: activation-only temporal per-channel A6
        nn.Linear(7, 5),  # 10: signed per-channel W8, temporal A4
    )


SEQ_SPEC = QuantSpec(rules=[
    LayerRule(["0"], weight=LSQConfig(n_bits=3, signed=True, symmetric=True),
              act=UniformConfig(n_bits=8, signed=True, granularity="channel")),
    LayerRule(["2"], weight=UniformConfig(n_bits=2, granularity="group", group_size=12),
              act=LSQConfig(n_bits=4, learn_offset=True)),  # no LoRA: peft cannot build it on a grouped conv
    LayerRule(["6"], weight=LSQConfig(n_bits=5, granularity="channel"), lora=True),
    LayerRule(["8"], act=TemporalLSQConfig(n_bits=6, granularity="channel", learn_offset=True, num_timesteps=3)),
    LayerRule(["10"], weight=LSQConfig(n_bits=8, signed=True, granularity="channel"),
              act=TemporalLSQConfig(n_bits=4, learn_offset=True, num_timesteps=3)),
], exclude=["4"], lora_rank=2)


def test_non_diffusers_model_with_every_quantizer_kind(tmp_path) -> None:
    torch.manual_seed(0)
    model = _sequential()
    qat.prepare(model, SEQ_SPEC)
    qat.set_timestep_grid(model, torch.tensor([10, 20, 30]))
    x = torch.randn(4, 3, 6, 6)

    def forward(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        with qat.timestep_index(m, 1):
            return m(batch)

    qat.calibrate(model, [x], forward, max_samples=256)
    _randomise_lora_and_tables(model)
    model.eval()
    out = export_quantized(model, tmp_path / "seq")
    with pytest.raises(ExportError, match=r"has no _class_name.*load_quantized\(path, model=\.\.\.\)"):
        load_quantized(out)
    torch.manual_seed(99)  # a skeleton with other random weights: everything must come from the file
    loaded = load_quantized(out, model=_sequential())
    assert type(loaded[4]) is nn.Conv2d and type(loaded[0]) is QuantConv2d and type(loaded[8]) is QuantLinear
    assert loaded[8].weight_quantizer is None and loaded[6].act_quantizer is None
    for t in (torch.tensor(20.0), torch.tensor([10.0, 30.0, 15.0, 27.5])):  # on the grid, mixed, interpolated
        with torch.no_grad(), qat.timestep(model, t), qat.timestep(loaded, t):
            assert (model(x) - loaded(x)).abs().max().item() <= 1e-6
    # signed symmetric codes are stored offset by -q_min = 4; check them against the float32 formula
    tensors = load_file(str(out / WEIGHTS_NAME))
    w0 = model[0].weight.detach().numpy()
    s0 = np.float32(model[0].weight_quantizer.step.item())
    codes = _decode(tensors["0" + PACKED_SUFFIX], 3, w0.size).reshape(w0.shape) - 4
    np.testing.assert_array_equal(codes, np.clip(np.round(w0 / s0), -4, 3))
    assert codes.min() < 0
    assert "8.weight" in tensors and "8" + PACKED_SUFFIX not in tensors  # activation-only layer keeps FP weights
    assert tensors["2.weight_quantizer.step"].shape == (8, 3)  # per-group steps: 36 weights per channel / 12
    assert json.loads((out / CONFIG_NAME).read_text())["quantization_config"]["fp_layers"] == ["4"]


def _binary_student() -> nn.Sequential:
    # 135 and 315 weights: neither a multiple of 8, so each bitstream ends in a padded byte
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 3 * 3, 7))


BINARY_SPEC = QuantSpec(rules=[LayerRule(["0", "3"], weight=BinaryConfig(num_bases=2), act=LSQConfig(n_bits=4))])


def _hand_sign_bits(w: np.ndarray, scale: np.ndarray) -> list[np.ndarray]:
    """Sign bits (1 where the sign is +1, sign(0) = +1) of w and of r_1 = w - s_1 sign(w), per output channel."""
    shape = (-1,) + (1,) * (w.ndim - 1)
    b1 = np.where(w >= 0, np.float32(1), np.float32(-1))
    r1 = w - scale[0].reshape(shape) * b1
    return [w >= 0, r1 >= 0]


def test_binary_weights_export_and_reload_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    model = _binary_student()
    qat.prepare(model, BINARY_SPEC)
    x = torch.randn(6, 3, 3, 3)
    assert qat.calibrate(model, [x], lambda m, b: m(b)) == {"weights": 2, "activations": 2}
    model.eval()
    out = export_quantized(model, tmp_path / "binary")
    torch.manual_seed(99)  # a skeleton with other random weights: everything must come from the file
    loaded = load_quantized(out, model=_binary_student())
    assert isinstance(loaded[0].weight_quantizer, qat.BinaryQuantizer)
    with torch.no_grad():
        assert (model(x) - loaded(x)).abs().max().item() == 0
        for i in (0, 3):  # the stored weight is the student's Q(W) itself
            assert torch.equal(loaded[i].weight, model[i].weight_quantizer(model[i].weight))
    tensors = load_file(str(out / WEIGHTS_NAME))
    modules = json.loads((out / CONFIG_NAME).read_text())["quantization_config"]["modules"]
    for i in (0, 3):
        layer = model[i]
        w = layer.weight.detach().numpy().astype(np.float32)
        scale = layer.weight_quantizer.scale.detach().numpy()
        assert f"{i}.weight" not in tensors
        for key, bits in zip((f"{i}{PACKED_SUFFIX}", f"{i}{PACKED_SUFFIX}_1"), _hand_sign_bits(w, scale), strict=True):
            packed = tensors[key]
            assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(w.size / 8) and w.size % 8
            np.testing.assert_array_equal(packed.numpy(), np.packbits(bits.ravel(), bitorder="little"))
        assert torch.equal(tensors[f"{i}.weight_quantizer.scale"], layer.weight_quantizer.scale.detach())
        entry = modules[str(i)]["weight"]
        assert (entry["quantizer"], entry["n_bits"], entry["num_bases"], entry["shape"]) == (
            "binary", 1, 2, list(w.shape))
    assert not np.array_equal(*_hand_sign_bits(model[3].weight.detach().numpy(),
                                               model[3].weight_quantizer.scale.detach().numpy()))
    # a bitstream of the wrong length is named, basis and all
    tensors[f"3{PACKED_SUFFIX}_1"] = tensors[f"3{PACKED_SUFFIX}_1"][:-1].clone()
    save_file(tensors, str(out / WEIGHTS_NAME))
    with pytest.raises(ExportError, match=rf"tensor '3{re.escape(PACKED_SUFFIX)}_1' must be 1-D uint8 with "
                                          r"ceil\(315 / 8\) = 40 bytes for a weight of shape \[7, 45\]"):
        load_quantized(out, model=_binary_student())


def test_binary_export_refuses_a_weight_that_is_not_a_fixed_point(tmp_path) -> None:
    torch.manual_seed(0)
    model = _binary_student()
    qat.prepare(model, BINARY_SPEC)
    qat.calibrate(model, [torch.randn(6, 3, 3, 3)], lambda m, b: m(b))
    export_quantized(model, tmp_path / "ok")  # as initialised (s_2 < s_1): a fixed point
    with torch.no_grad():
        scale = model[0].weight_quantizer.scale
        scale[1] = scale[0] * 1.5  # the second basis outweighs the first: Q(Q(W)) != Q(W)
    with pytest.raises(ExportError, match=r"^0: its weight quantizer \(binary\) does not reproduce its own output "
                                          r"\(Q\(Q\(W\)\) != Q\(W\)\)"):
        export_quantized(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_quantized_attention_processors_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model, forward, make_batch = tiny_unet()
    spec = QuantSpec(rules=[LayerRule(patterns=["*"], weight=LSQConfig(n_bits=4, granularity="channel"),
                                      act=LSQConfig(n_bits=8))],
                     attention_patterns=["*.attentions.*"], attention_act=LSQConfig(n_bits=8, signed=True))
    report = qat.prepare(model, spec)
    qat.calibrate(model, [make_batch(torch.tensor([10, 500]))], forward, max_samples=256)
    model.eval()
    out = export_quantized(model, tmp_path / "attn")
    loaded = load_quantized(out)
    recorded = json.loads((out / CONFIG_NAME).read_text())["quantization_config"]["modules"]
    processors = {n: e for n, e in recorded.items() if e["kind"] == "quant_attention"}
    assert set(processors) == {f"{n}.processor" for n in report.attention} and report.attention
    assert all(set(e) == {"kind", "q", "k", "v", "probs"} for e in processors.values())
    assert all(isinstance(loaded.get_submodule(n).processor, qat.QuantAttnProcessor) for n in report.attention)
    batch = make_batch(torch.tensor([3, 700]))
    with torch.no_grad():
        assert (forward(model, batch) - forward(loaded, batch)).abs().max().item() <= 1e-6
    # the same export written in format 1 (attention keyed by the Attention module) loads to the same model
    config = json.loads((out / CONFIG_NAME).read_text())
    config["quantization_config"] = _as_format_1(config["quantization_config"])
    assert set(config["quantization_config"]["attention"]) == set(report.attention)
    (out / CONFIG_NAME).write_text(json.dumps(config))
    loaded_v1 = load_quantized(out)
    assert all(isinstance(loaded_v1.get_submodule(n).processor, qat.QuantAttnProcessor) for n in report.attention)
    _assert_same_state(loaded_v1, loaded)
    with torch.no_grad():
        assert torch.equal(forward(loaded_v1, batch), forward(loaded, batch))


def test_uncalibrated_or_disabled_quantizers_are_refused(tmp_path) -> None:
    torch.manual_seed(0)
    model = _sequential()
    qat.prepare(model, SEQ_SPEC)
    with pytest.raises(ExportError, match=r"quantizer '0\.weight_quantizer' is not initialised"):
        export_quantized(model, tmp_path / "a")
    for q in model.modules():
        if isinstance(q, qat.Quantizer):
            q.mark_initialized()
    model[10].act_quantizer.enabled = False
    with pytest.raises(ExportError, match=r"quantizer '10\.act_quantizer' is disabled"):
        export_quantized(model, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@W4
def test_temporal_table_types_survive(exported) -> None:
    loaded_temporal = temporal_quantizers(exported["loaded"])
    assert len(loaded_temporal) == len(temporal_quantizers(exported["model"])) > 0
    assert all(isinstance(q, TemporalLSQQuantizer) and q.step.shape == (10,) for q in loaded_temporal)


# -- command line ----------------------------------------------------------------------------------------------------
def test_export_cli_end_to_end(tmp_path) -> None:
    """``python export.py <run> <out>`` on a calibrated tiny run (no training steps needed for the export path)."""
    pytest.importorskip("lightning")
    import export as export_cli
    from tests.train.conftest import fast_overrides, make_tiny_teacher
    from train.cli import build_student, calibrate_student, save_student
    from train.config import load_config
    from train.models.teacher import denoise, load_teacher

    teacher_dir = make_tiny_teacher(tmp_path / "teacher")
    run = tmp_path / "run"
    cfg = load_config(["config=efficientdm_digits.yaml", *fast_overrides(teacher_dir, run)])
    teacher = load_teacher(cfg.teacher)
    student, _ = build_student(cfg, teacher)
    calibrate_student(cfg, student, teacher, torch.device("cpu"))
    _randomise_lora_and_tables(student)
    student.eval()
    save_student(student, teacher, run / "student", cfg)
    (run / "report.json").write_text(json.dumps({"variants": {
        "fp": {"fd": 1.5}, "ptq": {"eps_mse": 0.5, "eps_mse_by_step": [0.1]}, "qat": {"eps_mse": 0.25}}}))

    out = export_cli.main([str(run), str(tmp_path / "out")])  # verifies the reload against the student itself
    for path in ("unet/config.json", f"unet/{WEIGHTS_NAME}", "scheduler/scheduler_config.json",
                 "class_embedder/config.json", "README.md"):
        assert (out / path).is_file(), path
    assert not (out / "unet" / "README.md").exists()
    card = (out / "README.md").read_text()
    assert "| metric | FP teacher | PTQ start | trained |" in card and "| eps_mse |  | 0.5 | 0.25 |" in card
    assert "eps_mse_by_step" not in card and str(teacher_dir) in card and '<this directory>/unet"' in card

    loaded = load_quantized(out)  # the model root resolves to its unet/ export
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *teacher.sample_shape, generator=gen)
    t = teacher.ddim(cfg.trajectories.num_steps).timesteps[[0, 2]]
    context = teacher.contexts(torch.tensor([1, 7]))[0]
    with torch.no_grad(), qat.timestep(student, t), qat.timestep(loaded, t):
        assert (denoise(student, x, t, context) - denoise(loaded, x, t, context)).abs().max().item() <= 1e-6

    with pytest.raises(FileExistsError, match="--overwrite"):
        export_cli.main([str(run), str(out)])
    with pytest.raises(FileNotFoundError, match="student.safetensors"):
        export_cli.main([str(tmp_path / "teacher"), str(tmp_path / "out2")])


@W4
def test_re_exporting_a_loaded_model_is_lossless(exported, tmp_path) -> None:
    out = export_quantized(exported["loaded"], tmp_path / "again")
    a, b = load_file(str(out / WEIGHTS_NAME)), load_file(str(exported["out"] / WEIGHTS_NAME))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    qc = lambda p: json.loads((p / CONFIG_NAME).read_text())["quantization_config"]  # noqa: E731
    assert qc(out) == qc(exported["out"])


@W4
def test_plain_diffusers_refuses_the_export_instead_of_loading_garbage(exported) -> None:
    # diffusers dispatches on quantization_config.quant_method and knows no "diffqat": a loud error, never a model
    # with missing weights (use qat.load_quantized)
    with pytest.raises(ValueError, match="diffqat"):
        UNet2DConditionModel.from_pretrained(str(exported["out"]))
