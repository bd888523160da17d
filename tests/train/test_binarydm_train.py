"""BinaryDM through the trainer on the tiny teacher: schedules logged, resume equal to a straight run (warm-up,
collapse and LRM bases included), the saved student reloads identically and matches its export exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import qat
from tests.train.conftest import fast_overrides, make_tiny_unconditional_teacher, max_student_difference, run_killed_at
from tests.train.test_launchers import _bin, _run
from train.cli import build_student, main
from train.config import ConfigError, load_config
from train.models.teacher import load_teacher

#: recipes this file runs end to end (the unconditional LDM-4 one on a tiny unconditional teacher)
RECIPES_RUN_HERE = {"binarydm_ldm4_bedrooms.yaml"}

SCHEDULE = ["binarydm.warmup_groups=3", "binarydm.collapse_at=0.5", "binarydm.lrm_weight=0.5", "binarydm.lr=1e-3",
            "trainer.deterministic=true"]


def _args(teacher: Path, out: Path, steps: int) -> list[str]:
    return ["config=binarydm_digits.yaml", *fast_overrides(teacher, out, steps, method="binarydm"), *SCHEDULE]


def test_binarydm_resume_equals_straight_run(tiny_teacher: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    n, k = 6, 3  # warm-up groups switch at steps 0, 1, 2; the second basis goes at step 3
    straight = main(_args(tiny_teacher, tmp_path / "straight", n) + ["export=false"])
    run_killed_at(_args(tiny_teacher, tmp_path / "killed", n) + ["export=false"], k, monkeypatch)
    ckpt = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert any(key.startswith("loss_terms.") and ".bases." in key for key in ckpt["state_dict"])  # LRM's bases
    resumed = main(_args(tiny_teacher, tmp_path / "killed", n) + ["export=false", "resume=last"])

    worst = max_student_difference(straight, resumed)
    assert worst <= 1e-6, worst
    a = load_file(str(straight / "student" / "student.safetensors"))
    assert {int(v) for key, v in a.items() if key.endswith("active_bases")} == {1}  # collapsed at the end
    events = EventAccumulator(str(straight / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/lrm", "train/basis_l1", "method/second_basis", "method/binarized_groups"} <= tags
    second = [e.value for e in events.Scalars("method/second_basis")]
    assert second[0] == 1.0 and second[-1] == 0.0


def test_saved_student_reloads_identically_and_matches_its_export(tiny_teacher: Path, tmp_path: Path) -> None:
    run = main(_args(tiny_teacher, tmp_path / "r", 4))
    cfg = load_config([f"config={run / 'config.yaml'}"])
    teacher = load_teacher(cfg.teacher)
    student, _ = build_student(cfg, teacher)
    saved = load_file(str(run / "student" / "student.safetensors"))
    student.load_state_dict(saved)
    assert all(torch.equal(v, saved[k]) for k, v in student.state_dict().items())
    exported = qat.load_quantized(run / "export" / "unet")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=gen)
    t = torch.tensor([5, 400, 990])
    context = torch.randn(3, 1, 8, generator=gen)
    with torch.no_grad(), qat.timestep(student, t), qat.timestep(exported, t):
        a = student(x, t, encoder_hidden_states=context).sample
        b = exported(x, t, encoder_hidden_states=context).sample
    assert torch.equal(a, b)
    assert not torch.equal(a, teacher.unet(x, t, encoder_hidden_states=context).sample)


def test_binarydm_config_errors_name_the_keys(tiny_teacher: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config([*_args(tiny_teacher, tmp_path, 2), "binarydm.act_bits=1", "binarydm.edges=int4"])
    text = str(err.value)
    assert "binarydm.act_bits: must be in [2, 8] or 32 (full precision), got 1" in text
    assert "binarydm.edges: must be one of ['w8a8', 'fp'], got 'int4'" in text
    with pytest.raises(ConfigError, match=r"binarydm.warmup_groups: the warm-up binarizes the last group at step 4, "
                                          r"but trainer.max_steps is 2"):
        load_config([*_args(tiny_teacher, tmp_path, 2), "binarydm.warmup_groups=5"])


def test_two_processes_match_one_process_through_warmup_and_collapse(tiny_teacher: Path, tmp_path: Path) -> None:
    """torchrun (gloo, 2 CPU processes of 2 trajectories) vs 1 process of 4: every process runs the warm-up and the
    collapse at the same steps and projects onto the same LRM bases, so the students agree up to summation order."""
    steps = 4  # groups binarized at steps 0, 1, 2; the second basis dropped at step 2
    common = [*SCHEDULE, "trainer.accelerator=cpu", "export=false", "binarydm.collapse_at=0.5"]
    one = main(["config=binarydm_digits.yaml", *fast_overrides(tiny_teacher, tmp_path / "one", steps, "binarydm"),
                *common, "trajectories.batch_size=4"])
    two_args = ["config=binarydm_digits.yaml", *fast_overrides(tiny_teacher, tmp_path / "two", steps, "binarydm"),
                *common, "trajectories.batch_size=2", "trainer.devices=auto"]
    _run([_bin("torchrun"), "--nproc_per_node=2", "--master_port=29538", "train.py", *two_args], tmp_path)
    a = load_file(str(one / "student" / "student.safetensors"))
    b = load_file(str(tmp_path / "two" / "student" / "student.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())  # flags and basis counts
    # the stated tolerance is on the whole trained state (see the EfficientDM launcher test): relative Frobenius
    keys = [k for k in a if a[k].is_floating_point()]
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys) ** 0.5
    norm = sum(float(a[k].double().pow(2).sum()) for k in keys) ** 0.5
    assert diff / norm < 1e-4, diff / norm
    teacher = load_teacher(load_config([f"config={one / 'config.yaml'}"]).teacher)
    moved = sum(float((a[k] - v).abs().sum()) for k, v in teacher.unet.state_dict().items() if k in a)
    assert moved > 0  # training happened


def test_bedrooms_recipe_runs_on_a_tiny_unconditional_unet(tmp_path: Path) -> None:
    """The LDM-4 recipe's settings (unconditional UNet2DModel with legacy attention, no guidance, DDIM 100 samples)
    on a tiny teacher of the converter's layout family: trains, evaluates, exports and reloads exactly."""
    root = make_tiny_unconditional_teacher(tmp_path / "teacher")
    run = main(["config=binarydm_ldm4_bedrooms.yaml", *fast_overrides(root, tmp_path / "run", 2, "binarydm"),
                "teacher.vae_subfolder=null", "eval.enabled=true"])
    report = (run / "report.md").read_text()
    assert "W1A4" in report and "QAT (trained)" in report
    exported = qat.load_quantized(run / "export" / "unet")
    assert sum(isinstance(m, qat.BinaryQuantizer) for m in exported.modules()) > 0
