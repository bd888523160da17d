"""``performance.*`` settings train the same student as the reference settings (within a stated tolerance)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from qat.quantizers import FakeQuantizer
from tests.train.conftest import fast_overrides
from train.cli import main


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    # As in the 2-process test: Adam turns near-zero gradients into +-lr steps, so compare the whole trained state.
    keys = [k for k in a if a[k].is_floating_point() and ("lora" in k or "quantizer" in k)]
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys) ** 0.5
    return diff / sum(float(a[k].double().pow(2).sum()) for k in keys) ** 0.5


def test_compiled_fused_training_equals_the_eager_composite_reference(tiny_teacher: Path, tmp_path: Path) -> None:
    common = ["config=efficientdm_digits.yaml", "export=false"]
    try:
        ref = main([*common, *fast_overrides(tiny_teacher, tmp_path / "ref", steps=3),
                    "performance.fused_fake_quant=false"])
        fast = main([*common, *fast_overrides(tiny_teacher, tmp_path / "fast", steps=3),
                     "performance.compile=true", "performance.compile_backend=aot_eager"])
    finally:
        FakeQuantizer.fused = True
        torch._dynamo.reset()
    a = load_file(str(ref / "student" / "student.safetensors"))
    b = load_file(str(fast / "student" / "student.safetensors"))
    assert a.keys() == b.keys()  # compiling in place keeps the state-dict keys
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # training happened
    assert _relative_difference(a, b) < 1e-4


def test_performance_keys_switch_the_quantizer_paths() -> None:
    """``performance.fused_fake_quant`` / ``compile_kernels`` reach the quantizers (process-wide switches)."""
    import qat
    from train.cli import apply_performance
    from train.config import load_config

    try:
        cfg = load_config(["config=efficientdm_digits.yaml", "performance.fused_fake_quant=false",
                           "performance.compile_kernels=true"])
        apply_performance(cfg, torch.nn.Identity(), teacher=None)
        assert FakeQuantizer.fused is False and qat.ste._kernel("value") is not qat.ste._fq_value
        apply_performance(load_config(["config=efficientdm_digits.yaml"]), torch.nn.Identity(), teacher=None)
        assert FakeQuantizer.fused is True and qat.ste._kernel("value") is qat.ste._fq_value
    finally:
        FakeQuantizer.fused = True
        qat.ste.use_compiled_kernels(False)


def test_the_teacher_compiles_alone_when_asked() -> None:
    """``compile_teacher`` follows ``compile`` unless set."""
    from types import SimpleNamespace

    from train.cli import apply_performance
    from train.config import load_config

    calls: list[str] = []

    class Recorder(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def compile(self, **kwargs: object) -> None:  # records instead of compiling
            calls.append(self.name)

    def run(*overrides: str) -> list[str]:
        calls.clear()
        cfg = load_config(["config=efficientdm_digits.yaml", *overrides])
        apply_performance(cfg, Recorder("student"), SimpleNamespace(unet=Recorder("teacher")))
        return list(calls)

    assert run() == []
    assert run("performance.compile_teacher=true") == ["teacher"]
    assert run("performance.compile=true") == ["student", "teacher"]
    assert run("performance.compile=true", "performance.compile_teacher=false") == ["student"]


def test_the_trajectory_cache_is_generated_by_the_compiled_teacher(tiny_teacher: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    """Cached trajectories come from the teacher as ``performance`` compiles it (issue 8: generation at compiled
    speed), not from the eager teacher that is compiled only afterwards."""
    import pytest

    import train.cli as cli

    seen: list[bool] = []

    class Generated(Exception):
        pass

    def generate_cache(teacher, *args, **kwargs):
        seen.append(getattr(teacher.unet, "_compiled_call_impl", None) is not None)  # nn.Module.compile was called
        raise Generated

    monkeypatch.setattr(cli, "generate_cache", generate_cache)
    try:
        with pytest.raises(Generated):
            main(["config=efficientdm_digits.yaml", "export=false", *fast_overrides(tiny_teacher, tmp_path, steps=2),
                  "trajectories.mode=cached", "performance.compile_teacher=true", "eval.enabled=false"])
    finally:
        torch._dynamo.reset()
    assert seen == [True]
