"""QVGen through the trainer on the tiny teacher: the rank decay logged phase by phase, a run killed across rank
changes resumes to the straight run's student, Phi is gone from the export (which reproduces the trained student
exactly), two gloo processes match one, the video recipes run on tiny teachers of their families."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import qat
from tests.train.conftest import fast_overrides, max_student_difference, run_killed_at
from tests.train.family_fixtures import FAMILY_CASES
from tests.train.test_launchers import _bin, _run
from train.cli import build_student, main
from train.config import ConfigError, load_config
from train.models.families import denoise
from train.models.teacher import load_teacher

#: recipes this file runs end to end (the video ones on tiny teachers of their families)
RECIPES_RUN_HERE = {"qvgen_wan21_1_3b.yaml", "qvgen_cogvideox_2b.yaml"}

SCHEDULE = ["qvgen.aux_rank=4", "qvgen.lr=1e-3", "qvgen.aux_lr=1e-3", "trainer.deterministic=true"]


def _args(teacher: Path, out: Path, steps: int) -> list[str]:
    return ["config=qvgen_digits.yaml", *fast_overrides(teacher, out, steps, method="qvgen"), *SCHEDULE]


def test_resume_across_rank_changes_equals_straight_run(tiny_teacher: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    n, k = 6, 3  # rank 4 -> 2 -> 1 -> 0: phases of 2 steps, rank changes at steps 2 and 4 (re-SVD at step 2 and 4)
    straight = main(_args(tiny_teacher, tmp_path / "straight", n) + ["export=false"])
    run_killed_at(_args(tiny_teacher, tmp_path / "killed", n) + ["export=false"], k, monkeypatch)
    ckpt = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    phases = {int(v) for key, v in ckpt["state_dict"].items() if key.endswith("aux.phase")}
    assert phases == {1}  # saved after step 2: one re-decomposition done, the next one still ahead
    resumed = main(_args(tiny_teacher, tmp_path / "killed", n) + ["export=false", "resume=last"])

    worst = max_student_difference(straight, resumed)
    assert worst <= 1e-6, worst
    a = load_file(str(straight / "student" / "student.safetensors"))
    assert {int(v) for key, v in a.items() if key.endswith("aux.phase")} == {2}  # 4 -> 2 -> 1 re-decomposed
    assert all(float(v.abs().max()) == 0 for key, v in a.items() if key.endswith("aux.gamma"))  # u = 0 at the end
    events = EventAccumulator(str(straight / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("method/aux_rank")] == [4.0, 4.0, 2.0, 2.0, 1.0, 1.0]
    u = [e.value for e in events.Scalars("method/aux_decay_factor")]
    assert u[1] == u[3] == u[5] == 0.0 and all(0.0 < v < 1.0 for v in (u[0], u[2], u[4]))


def test_export_has_no_branch_and_reproduces_the_trained_student(tiny_teacher: Path, tmp_path: Path) -> None:
    run = main(_args(tiny_teacher, tmp_path / "r", 6))
    cfg = load_config([f"config={run / 'config.yaml'}"])
    teacher = load_teacher(cfg.teacher)
    student, _ = build_student(cfg, teacher)
    saved = load_file(str(run / "student" / "student.safetensors"))
    student.load_state_dict(saved)
    assert any(".aux.left" in key for key in saved)  # the trained student still holds its (zeroed) branches
    exported_files = load_file(str(run / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not [key for key in exported_files if ".aux." in key or "base_layer" in key]
    exported = qat.load_quantized(run / "export" / "unet")
    assert not any("aux" in name for name, _ in exported.named_modules())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=gen)
    t = torch.tensor([5, 400, 990])
    context = torch.randn(3, 1, 8, generator=gen)
    student.eval()
    with torch.no_grad(), qat.timestep(student, t), qat.timestep(exported, t):
        a = student(x, t, encoder_hidden_states=context).sample
        b = exported(x, t, encoder_hidden_states=context).sample
    assert torch.equal(a, b)
    assert not torch.equal(a, teacher.unet(x, t, encoder_hidden_states=context).sample)


def test_qvgen_config_errors_name_the_keys(tiny_teacher: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config([*_args(tiny_teacher, tmp_path, 2), "qvgen.annealing=step", "qvgen.clip_init=1.5"])
    text = str(err.value)
    assert "qvgen.annealing: must be one of ['cosine', 'linear'], got 'step'" in text
    assert "qvgen.clip_init: must be in (0, 1), got 1.5" in text
    with pytest.raises(ConfigError, match=r"qvgen.tail: the rank decay has 6 phases but only 4 steps"):
        load_config([*_args(tiny_teacher, tmp_path, 4), "qvgen.aux_rank=32"])


def test_two_processes_match_one_process_across_rank_changes(tiny_teacher: Path, tmp_path: Path) -> None:
    """torchrun (gloo, 2 CPU processes of 2 trajectories) vs 1 process of 4: every process re-decomposes the same
    branches at the same steps, so the students agree up to summation order."""
    steps = 6
    common = [*SCHEDULE, "trainer.accelerator=cpu", "export=false"]
    one = main(["config=qvgen_digits.yaml", *fast_overrides(tiny_teacher, tmp_path / "one", steps, "qvgen"),
                *common, "trajectories.batch_size=4"])
    two_args = ["config=qvgen_digits.yaml", *fast_overrides(tiny_teacher, tmp_path / "two", steps, "qvgen"),
                *common, "trajectories.batch_size=2", "trainer.devices=auto"]
    _run([_bin("torchrun"), "--nproc_per_node=2", "--master_port=29541", "train.py", *two_args], tmp_path)
    a = load_file(str(one / "student" / "student.safetensors"))
    b = load_file(str(tmp_path / "two" / "student" / "student.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())  # phases, flags
    keys = [k for k in a if a[k].is_floating_point()]
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys) ** 0.5
    norm = sum(float(a[k].double().pow(2).sum()) for k in keys) ** 0.5
    assert diff / norm < 1e-4, diff / norm


@pytest.mark.parametrize("family, recipe", [("wan", "qvgen_wan21_1_3b.yaml"),
                                            ("cogvideox", "qvgen_cogvideox_2b.yaml")])
def test_video_recipe_runs_on_a_tiny_teacher_of_its_family(family: str, recipe: str, tmp_path: Path) -> None:
    _, make = FAMILY_CASES[family]
    root = tmp_path / "teacher"
    root.mkdir()
    run = main([f"config={recipe}", *fast_overrides(root, tmp_path / "run", 6, "qvgen"), *make(root),
                "qvgen.aux_rank=4", "optim.warmup_steps=0"])
    cfg = load_config([f"config={run / 'config.yaml'}"])
    teacher = load_teacher(cfg.teacher)
    loaded = qat.load_quantized(run / "export")
    assert not any("aux" in name for name, _ in loaded.named_modules())
    student, _ = build_student(cfg, teacher)
    student.load_state_dict(load_file(str(run / "student" / "student.safetensors")))
    student.eval()
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(1))
    t = teacher.ddim(cfg.trajectories.num_steps).timesteps[[0, -1]]
    cond = teacher.contexts(torch.tensor([0, 1]))[0].float()
    with torch.no_grad(), qat.timestep(student, t), qat.timestep(loaded, t):
        a, b = denoise(student, x, t, cond), denoise(loaded, x, t, cond)
    assert float((a - b).abs().max()) <= 1e-6


def test_gradient_checkpointing_trains_the_same_student(tiny_teacher: Path, tmp_path: Path) -> None:
    """Checkpointed blocks recompute their timestep-aware quantizers in backward: the timestep must still be set."""
    plain = main(_args(tiny_teacher, tmp_path / "plain", 3) + ["export=false"])
    ckpt = main(_args(tiny_teacher, tmp_path / "ckpt", 3)
                + ["export=false", "performance.gradient_checkpointing=true"])
    a = load_file(str(plain / "student" / "student.safetensors"))
    b = load_file(str(ckpt / "student" / "student.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[key].float() - b[key].float()).abs().max()) for key in a)
    assert worst <= 1e-6, worst
