"""A method defined entirely in this file trains, samples, exports and reloads through the unchanged platform.

The toy method brings everything a paper's method brings: its own quantizer (ternary weights with its own pack /
unpack), its own exportable module kind (a convolution with a per-channel gain stored in its own packed form), a
loss term on a tapped intermediate feature, a per-step schedule hook, and a pre-forward hook that runs both models
on each sample's previous trajectory step. Nothing in ``qat/`` or ``train/`` knows
about it: it is registered here (and unregistered after the test, so that no other test sees it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn

import qat
from qat.losses import LOSSES, LossConfig, LossInputs, LossTerm, register_loss
from qat.methods import METHODS, Method, register_method
from qat.nn.exportable import EXPORTABLE, ExportTensorError, register_exportable
from qat.packing import pack, unpack
from qat.prepare import LayerRule, QuantSpec, prepare
from qat.quantizers import QUANTIZERS, Quantizer, QuantizerConfig, UniformConfig, register_quantizer
from qat.ste import round_ste
from tests.train.conftest import fast_overrides
from train.cli import main
from train.config import load_config
from train.models.families import denoise


# -- the toy method's pieces ------------------------------------------------------------------------------------------
@dataclass
class TernaryConfig(QuantizerConfig):
    """Ternary weights ``s * {-1, 0, 1}`` with one learned scale per output channel."""

    name: ClassVar[str] = "toy_ternary"
    bits_range: ClassVar[tuple[int, int]] = (2, 2)
    n_bits: int = 2


class TernaryQuantizer(Quantizer):
    """``Q(w) = s * round(clip(w / s, -1, 1))`` (STE rounding), ``s`` per output channel."""

    def __init__(self, config: TernaryConfig, num_channels: int | None = None, channel_axis: int = 0,
                 group_count: int | None = None) -> None:
        super().__init__(config)
        self.scale = nn.Parameter(torch.ones(num_channels))

    def _s(self, w: Tensor) -> Tensor:
        return self.scale.reshape(-1, *([1] * (w.dim() - 1)))

    def forward(self, w: Tensor) -> Tensor:
        if not self.enabled:
            return w
        self.check_ready()
        s = self._s(w)
        return s * round_ste(torch.clamp(w / s, -1.0, 1.0))

    @torch.no_grad()
    def initialize_(self, w: Tensor) -> None:
        self.scale.copy_(w.abs().flatten(1).mean(1).clamp_min(1e-8))
        self.mark_initialized()

    def packed_names(self) -> list[str]:
        return ["packed"]

    @torch.no_grad()
    def pack_weight(self, w: Tensor) -> dict[str, Tensor]:
        codes = torch.round(torch.clamp(w / self._s(w), -1.0, 1.0)) + 1  # {0, 1, 2}
        return {"packed": pack(codes.to(torch.int64), 2)}

    @torch.no_grad()
    def unpack_weight(self, packed: dict[str, Tensor], shape: torch.Size) -> Tensor:
        codes = unpack(packed["packed"], 2, math.prod(shape)).reshape(shape).float() - 1
        return self.scale.detach().float().reshape(-1, *([1] * (len(shape) - 1))) * codes


class GainConv(nn.Conv2d):
    """``conv(x) * g`` with a learned per-output-channel gain ``g``; exports ``g`` as raw float32 bytes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * self.gain[None, :, None, None]

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> GainConv:
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  device=conv.weight.device)
        new.load_state_dict({**conv.state_dict(), "gain": new.gain.detach()})
        return new

    # the exportable protocol (qat.nn.exportable)
    def exports(self) -> bool:
        return True

    def export_entry(self) -> dict[str, Any]:
        return {"channels": self.out_channels}

    def export_tensors(self) -> tuple[dict[str, Tensor], list[str]]:
        return {"gain.bytes": self.gain.detach().float().contiguous().view(torch.uint8)}, ["gain"]

    @classmethod
    def install_exported(cls, root: nn.Module, name: str, entry: dict[str, Any]) -> nn.Module:
        conv = root.get_submodule(name)
        if conv.out_channels != entry["channels"]:
            raise ValueError(f"{name} has {conv.out_channels} channels, the export {entry['channels']}")
        new = cls.from_conv(conv)
        setattr(root, name, new)
        return new

    def exported_keys(self) -> tuple[list[str], list[str]]:
        return ["gain.bytes"], ["gain"]

    def load_exported(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        raw = tensors["gain.bytes"]
        if raw.numel() != 4 * self.out_channels:
            raise ExportTensorError("gain.bytes", f"holds {raw.numel()} bytes, expected {4 * self.out_channels}")
        return {"gain": raw.view(torch.float32).clone()}


@dataclass
class CosineFeatureConfig(LossConfig):
    """``1 - cos(F_s, F_t)`` per sample on the tapped ``mid_block`` output."""

    name: ClassVar[str] = "toy_cosine_feature"
    weight: float = 0.1


class CosineFeature(LossTerm):
    def taps(self) -> list[str]:
        return ["mid_block"]

    def forward(self, inputs: LossInputs) -> Tensor:
        s = inputs.student_features["mid_block"].flatten(1).float()
        t = inputs.teacher_features["mid_block"].flatten(1).float()
        return 1 - torch.nn.functional.cosine_similarity(s, t, dim=1)


@dataclass
class ToyConfig:
    """The toy method's section."""

    lr: float = 1e-3
    act_bits: int = 8
    feature_weight: float = 0.1

    def __post_init__(self) -> None:
        if not 2 <= self.act_bits <= 8:
            from qat.checks import ConfigProblems

            raise ConfigProblems([("act_bits", f"must be in [2, 8], got {self.act_bits}")])


class Toy(Method):
    """Ternary weights, static 8-bit activations, a gained output conv, a cosine feature term; the activation
    quantizers are switched on by the schedule hook at the second step; before each forward, both models run on
    the previous trajectory step (the student with gradients, as a method feeding a cache would)."""

    config_class = ToyConfig
    needs_previous_step = True
    calls: ClassVar[list[int]] = []
    previous: ClassVar[list[tuple[list[bool], tuple[int, ...], tuple[int, ...], bool]]] = []

    def build_student(self, denoiser: nn.Module, family: str) -> tuple[nn.Module, str]:
        import copy

        student = copy.deepcopy(denoiser)
        student.conv_out = GainConv.from_conv(student.conv_out)
        rule = LayerRule(["*"], weight=TernaryConfig(), act=UniformConfig(n_bits=self.config.act_bits))
        report = prepare(student, QuantSpec([rule], exclude=["conv_out", "time_embedding.*"]))
        for layer in qat.quant_layers(student).values():
            layer.weight.requires_grad_(True)  # latent weights are trained (no adapters)
        student.conv_out.gain.requires_grad_(True)
        return student, str(report)

    def bits(self) -> str:
        return f"W2A{self.config.act_bits}"

    def loss_terms(self) -> list[LossTerm]:
        return [CosineFeature(CosineFeatureConfig(weight=self.config.feature_weight))]

    def before_student_forward(self, student: nn.Module, batch: Any, runner: Any) -> None:
        prev = batch.previous
        out = runner.student(prev.x, prev.t)  # with gradients: must not disturb the step's own forward/backward
        ref = runner.teacher(prev.x, prev.t)
        Toy.previous.append((prev.valid.tolist(), tuple(out.shape), tuple(ref.shape), out.requires_grad))

    def on_train_step(self, student: nn.Module, step: int, max_steps: int) -> dict[str, float]:
        Toy.calls.append(step)
        on = step >= 1
        for layer in qat.quant_layers(student).values():
            if layer.act_quantizer is not None:
                layer.act_quantizer.enabled = on
        return {"act_quantizers_on": float(on)}


@pytest.fixture()
def toy_method() -> Iterator[type[Toy]]:
    """Registers the toy pieces for one test and removes them afterwards."""
    register_quantizer(TernaryConfig)(TernaryQuantizer)
    register_exportable("toy_gain_conv")(GainConv)
    register_loss(CosineFeatureConfig)(CosineFeature)
    register_method("toy")(Toy)
    Toy.calls, Toy.previous = [], []
    try:
        yield Toy
    finally:
        METHODS.unregister("toy")
        LOSSES.unregister("toy_cosine_feature")
        EXPORTABLE.unregister("toy_gain_conv")
        QUANTIZERS.unregister("toy_ternary")


def _overrides(teacher: Path, out: Path) -> list[str]:
    return [o for o in fast_overrides(teacher, out, steps=2) if not o.startswith("efficientdm.")]


def test_a_method_defined_outside_the_platform_trains_samples_exports_and_reloads(toy_method, tiny_teacher: Path,
                                                                                  tmp_path: Path) -> None:
    run = main(["method=toy", "toy.lr=0.01", "toy.feature_weight=0.5", *_overrides(tiny_teacher, tmp_path / "run"),
                "eval.enabled=true", "export=true"])

    # the schedule hook ran once per step, before the step, and what it returned was logged
    assert Toy.calls == [0, 1]
    # the pre-forward hook saw each sample's previous step (none at a trajectory's first step, online data) and ran
    # both models on it: [uncond; cond] rows of the 2 trajectories, the student's with a graph
    assert [p[0] for p in Toy.previous] == [[False, False], [True, True]]
    assert all(p[1] == p[2] == (4, 1, 8, 8) and p[3] for p in Toy.previous)
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    switched = [e.value for e in acc.Scalars("method/act_quantizers_on")]
    assert switched == [0.0, 1.0]
    # both loss terms ran and were logged apart; the method's term compared features of the same inputs
    assert {"train/output_mse", "train/toy_cosine_feature", "train/loss"} <= set(acc.Tags()["scalars"])
    assert all(0.0 <= e.value <= 2.0 for e in acc.Scalars("train/toy_cosine_feature"))

    # the saved config names the method's own section and reloads
    cfg = load_config([f"config={run / 'config.yaml'}"])
    assert cfg.method == "toy" and cfg.toy.feature_weight == 0.5

    # the student trained: its ternary scales and the gain moved away from their initial values
    state = load_file(str(run / "student" / "student.safetensors"))
    assert not torch.equal(state["conv_out.gain"], torch.ones_like(state["conv_out.gain"]))
    assert any(k.endswith("weight_quantizer.scale") for k in state)

    # the export holds the toy's own packed forms and reloads to the student's exact outputs
    export = run / "export" / "unet"
    qcfg = json.loads((export / "config.json").read_text())["quantization_config"]
    kinds = {e["kind"] for e in qcfg["modules"].values()}
    assert kinds == {"quant_conv2d", "quant_linear", "toy_gain_conv"}
    ternary = [e for e in qcfg["modules"].values() if e.get("weight") and e["weight"]["quantizer"] == "toy_ternary"]
    assert ternary and all(e["weight"]["n_bits"] == 2 for e in ternary)
    tensors = load_file(str(export / "diffusion_pytorch_model.safetensors"))
    assert tensors["conv_out.gain.bytes"].dtype == torch.uint8 and "conv_out.gain" not in tensors
    packed = [k for k in tensors if k.endswith(".weight.packed")]
    assert packed and not any(k[: -len(".packed")] in tensors for k in packed)  # no float copy of a packed weight

    loaded = qat.load_quantized(export)
    assert isinstance(loaded.conv_out, GainConv)
    torch.testing.assert_close(loaded.conv_out.gain, state["conv_out.gain"], rtol=0, atol=0)
    student = _rebuild_student(run, tiny_teacher, state)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=gen)
    t = torch.tensor([10, 500, 990])
    ctx = torch.randn(3, 1, 8, generator=gen)
    with torch.no_grad():
        a = denoise(student, x, t, ctx, "unet")
        b = denoise(loaded, x, t, ctx, "unet")
    assert torch.equal(a, b)

    # sampling the reloaded export twice with the same seeds gives the same images, equal to the student's
    from train.models.pipeline import QATDiffusionPipeline
    from train.models.teacher import load_teacher

    teacher = load_teacher(cfg.teacher)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([3, 7])
    images = [QATDiffusionPipeline.from_teacher(teacher, unet=m, scheduler="ddim")(
        noise, labels, num_inference_steps=4, guidance_scale=1.5).images for m in (loaded, loaded, student)]
    assert torch.equal(images[0], images[1]) and torch.equal(images[0], images[2])


def _rebuild_student(run: Path, teacher_dir: Path, state: dict[str, Tensor]) -> nn.Module:
    """The student as ``export.py`` rebuilds it: the recipe's method on the teacher, then the saved state."""
    from train.cli import build_student
    from train.models.teacher import load_teacher

    cfg = load_config([f"config={run / 'config.yaml'}", f"teacher.path={teacher_dir}"])
    student, _ = build_student(cfg, load_teacher(cfg.teacher))
    student.load_state_dict(state, strict=True)
    return student.eval()


def test_the_toy_method_is_refused_once_unregistered(tmp_path: Path) -> None:
    """Outside the fixture the platform does not know the toy: nothing of it leaked into the registries."""
    from train.config import ConfigError

    assert "toy" not in METHODS and "toy_ternary" not in QUANTIZERS and "toy_gain_conv" not in EXPORTABLE
    with pytest.raises(ConfigError, match=r"method: 'toy' is not allowed; choose one of \['bidm', 'binarydm', "
                                          r"'efficientdm', 'qvgen'\]"):
        load_config(["config=efficientdm_digits.yaml", "method=toy"])


def test_a_plugin_module_named_in_the_config_is_imported_first(tmp_path: Path, monkeypatch) -> None:
    """``plugins: [module]`` imports a user's module (which registers a method) before the config is read."""
    import sys

    (tmp_path / "my_toy_plugin.py").write_text(
        "from dataclasses import dataclass\n"
        "from qat.methods import Method, register_method\n"
        "@dataclass\n"
        "class PluginConfig:\n"
        "    lr: float = 0.5\n"
        "@register_method('plugin_toy')\n"
        "class PluginToy(Method):\n"
        "    config_class = PluginConfig\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        cfg = load_config(["teacher.path=assets/digits_teacher", "plugins=[my_toy_plugin]", "method=plugin_toy",
                           "plugin_toy.lr=0.25"])
        assert cfg.method == "plugin_toy" and cfg.plugin_toy.lr == 0.25 and cfg.plugins == ["my_toy_plugin"]
    finally:
        if "plugin_toy" in METHODS:
            METHODS.unregister("plugin_toy")
        sys.modules.pop("my_toy_plugin", None)
