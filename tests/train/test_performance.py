"""``performance.*`` settings train the same student as the reference settings (within a stated tolerance)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from qat.quantizers import AffineQuantizer
from tests.train.conftest import fast_overrides
from train.cli import main


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    # As in the 2-process test: Adam turns near-zero gradients into +-lr steps, so compare the whole trained state.
    keys = [k for k in a if a[k].is_floating_point() and ("lora" in k or "quantizer" in k)]
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys) ** 0.5
    return diff / sum(float(a[k].double().pow(2).sum()) for k in keys) ** 0.5


def _quantized_model() -> torch.nn.Module:
    """Two quantized layers (four affine quantizers, one of them temporal), on the default paths."""
    from qat.nn import QuantConv2d, QuantLinear
    from qat.quantizers import LSQConfig, TemporalLSQConfig

    wcfg = LSQConfig(n_bits=4, granularity="channel")
    return torch.nn.Sequential(
        QuantConv2d.from_float(torch.nn.Conv2d(3, 4, 3), wcfg, LSQConfig(n_bits=4, learn_offset=True)),
        QuantLinear.from_float(torch.nn.Linear(4, 4), wcfg, TemporalLSQConfig(n_bits=4, num_timesteps=3)))


def _paths(model: torch.nn.Module) -> set[tuple[bool, bool]]:
    """The ``(fused, compiled_kernels)`` pairs of the affine quantizers of ``model`` (one pair: all alike)."""
    quantizers = [m for m in model.modules() if isinstance(m, AffineQuantizer)]
    assert len(quantizers) == 4
    return {(q.fused, q.compiled_kernels) for q in quantizers}


def test_compiled_fused_training_equals_the_eager_composite_reference(tiny_teacher: Path, tmp_path: Path,
                                                                     one_intra_op_thread: None) -> None:
    """Three training steps on the fused fake quantizers in a ``torch.compile``d student (and teacher) end at the
    student of the eager composite reference.

    Both runs are seeded by ``main``; the intra-op thread count is pinned (``one_intra_op_thread``) and dynamo
    starts from an empty cache, so neither run depends on what ran earlier in the process (alone a test gets one
    thread per core, after ``tests/qat`` one; earlier tests may leave compiled frames and recompile counts behind).
    Tolerance: the two paths differ only in float32 rounding (the fused backward's mask for ``(g s) / s``, the
    compiled graph's op order); over seeds 0-3 on one and on two threads the relative difference measured 1.6e-8
    to 2.8e-8, far below the 1e-4 bound.
    """
    common = ["config=efficientdm_digits.yaml", "export=false"]
    torch._dynamo.reset()  # no compiled frames or recompile counts left by earlier tests
    try:
        ref = main([*common, *fast_overrides(tiny_teacher, tmp_path / "ref", steps=3),
                    "performance.fused_fake_quant=false"])
        fast = main([*common, *fast_overrides(tiny_teacher, tmp_path / "fast", steps=3),
                     "performance.compile=true", "performance.compile_backend=aot_eager"])
    finally:
        torch._dynamo.reset()
    a = load_file(str(ref / "student" / "student.safetensors"))
    b = load_file(str(fast / "student" / "student.safetensors"))
    assert a.keys() == b.keys()  # compiling in place keeps the state-dict keys
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # training happened
    assert _relative_difference(a, b) < 1e-4


def test_performance_keys_switch_the_quantizer_paths() -> None:
    """``performance.fused_fake_quant`` / ``compile_kernels`` reach the student's quantizers, and only those (per
    model, no process-wide switch: the teacher and any other model keep their own)."""
    import qat
    from train.cli import apply_performance
    from train.config import load_config

    student, other = _quantized_model(), _quantized_model()
    teacher = SimpleNamespace(unet=_quantized_model())  # quantizers in the teacher too: must stay untouched
    cfg = load_config(["config=efficientdm_digits.yaml", "performance.fused_fake_quant=false",
                       "performance.compile_kernels=true"])
    apply_performance(cfg, student, teacher)
    assert _paths(student) == {(False, True)}
    assert _paths(other) == _paths(teacher.unet) == {(True, False)}
    assert not student[0]._fused_input() and other[0]._fused_input()  # the layers follow their quantizers
    q = student[0].act_quantizer
    assert qat.ste._kernel("value", q.compiled_kernels) is not qat.ste._fq_value
    assert qat.ste._kernel("value", False) is qat.ste._fq_value  # the eager kernels still serve the other models
    apply_performance(load_config(["config=efficientdm_digits.yaml"]), student, teacher)
    assert _paths(student) == _paths(other) == _paths(teacher.unet) == {(True, False)}
    assert student[0]._fused_input() and qat.ste._kernel("value", q.compiled_kernels) is qat.ste._fq_value


def test_compiled_kernels_follow_compile_blocks_unless_set(monkeypatch) -> None:
    """Unset, ``performance.compile_kernels`` is on exactly when the student is compiled by blocks with CUDA graphs
    (its quantized layers outside the blocks, ``conv_in``, the time embedding and ``conv_out``, stay eager there and
    cost GPU time); set, it wins. It is set on the student's quantizers only."""
    import train.cli as cli
    from train.config import load_config

    monkeypatch.setattr(cli, "compile_repeated_blocks", lambda model, **kw: 0)  # records nothing, compiles nothing
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: None)
    blocks, graphs = "performance.compile_blocks=true", "performance.compile_mode=reduce-overhead"
    cases = [((), False), ((blocks, graphs), True), ((blocks,), False), ((graphs,), False),
             ((blocks, graphs, "performance.compile_kernels=false"), False),
             (("performance.compile_kernels=true",), True)]
    student, other = _quantized_model(), _quantized_model()
    for overrides, on in cases:
        cfg = load_config(["config=efficientdm_digits.yaml", "performance.compile=true",
                           "performance.compile_teacher=false", *overrides])
        cli.apply_performance(cfg, student, teacher=None)
        assert _paths(student) == {(True, on)}, overrides
        assert _paths(other) == {(True, False)}, overrides  # another model in the process: untouched
    cli.apply_performance(load_config(["config=efficientdm_digits.yaml"]), student, teacher=None)
    assert _paths(student) == {(True, False)}  # nothing compiled: eager kernels


def test_the_teacher_compiles_alone_when_asked() -> None:
    """``compile_teacher`` follows ``compile`` unless set."""
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


def test_compile_mode_reaches_the_student_and_marks_every_training_step(tiny_teacher: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    """``performance.compile_mode`` is the student's ``torch.compile`` mode (whole model or blocks); the teacher keeps
    the default; with CUDA graphs every training step starts a new CUDA-graph step (``cudagraph_mark_step_begin``),
    so that a replay may reuse the previous step's memory."""
    import train.cli as cli

    compiled: list[tuple[str, dict]] = []

    marks: list[int] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    # records instead of compiling
    monkeypatch.setattr(cli, "compile_repeated_blocks", lambda model, **kw: compiled.append(("blocks", kw)))
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(("module", kw)))

    def run(*overrides: str) -> tuple[list, int]:
        compiled.clear()
        marks.clear()
        main(["config=efficientdm_digits.yaml", "export=false",
              *fast_overrides(tiny_teacher, tmp_path / str(len(list(tmp_path.iterdir()))), steps=3),
              "performance.compile=true", *overrides])
        return list(compiled), len(marks)

    calls, n = run("performance.compile_mode=reduce-overhead", "performance.compile_blocks=true")
    assert calls == [("blocks", {"backend": "inductor", "mode": "reduce-overhead"}),
                     ("module", {"backend": "inductor"})]  # student blocks, then the teacher in the default mode
    assert n == 3
    calls, n = run("performance.compile_mode=max-autotune-no-cudagraphs")
    assert calls == [("module", {"backend": "inductor", "mode": "max-autotune-no-cudagraphs"}),
                     ("module", {"backend": "inductor"})]
    assert n == 0  # no CUDA graphs in this mode
    calls, n = run()
    assert calls == [("module", {"backend": "inductor"})] * 2 and n == 0


def test_a_student_compiled_with_cuda_graphs_samples_eagerly() -> None:
    """Outside autograd a CUDA-graph student runs its eager code (a UNet's skip connections would be overwritten by
    later regions' replays); with gradients, and for any other model, the compiled code runs."""
    from train.models.families import CUDA_GRAPHS_ATTR, denoise, set_family

    calls: list[int] = []

    def counting(gm: torch.fx.GraphModule, inputs: list) -> object:
        def run(*args: object) -> object:
            calls.append(1)
            return gm.forward(*args)
        return run

    class Denoiser(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, return_dict: bool = False) -> tuple:
            return (self.lin(sample),)

    model = Denoiser()
    set_family(model, "unet")
    model.compile(backend=counting)
    x, t = torch.randn(2, 4), torch.zeros(2)
    try:
        with torch.no_grad():
            ref = denoise(model, x, t, None)
        assert len(calls) == 1
        setattr(model, CUDA_GRAPHS_ATTR, True)
        with torch.no_grad():
            out = denoise(model, x, t, None)
        assert len(calls) == 1 and torch.equal(out, ref)  # eager code, same values
        denoise(model, x, t, None).sum().backward()  # a training call keeps the compiled code
        assert len(calls) == 2 and model.lin.weight.grad is not None
    finally:
        torch._dynamo.reset()
