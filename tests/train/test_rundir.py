"""A run directory belongs to one run: a fresh start over an existing run and a resume with a changed student or data
config stop before anything in the directory changes; overwrite=true starts afresh; allowed changes are recorded;
the command line turns a failure into one paragraph."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.conftest import fast_overrides
from train.cli import main
from train.config import ConfigError, load_config
from train.rundir import config_differences

REPO = Path(__file__).resolve().parents[2]


def _snapshot(run: Path) -> dict[str, tuple[int, int]]:
    """Every file of the run directory with its size and modification time (ns)."""
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A 2-step digits run (checkpoint at every step), made once for the tests below, which copy it."""
    out = tmp_path_factory.mktemp("rundir") / "run"
    args = [*fast_overrides(tiny_teacher, out, 2), "export=false"]
    main(["config=efficientdm_digits.yaml", *args])
    return out, args


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _with_out(args: list[str], out: Path) -> list[str]:
    return [a for a in args if not a.startswith("output_dir=")] + [f"output_dir={out}"]


def test_a_fresh_start_over_a_run_stops_before_writing(finished_run: tuple[Path, list[str]], tmp_path: Path) -> None:
    src, args = finished_run
    run = _copy(src, tmp_path)
    before = _snapshot(run)
    with pytest.raises(ConfigError, match=r"output_dir: .* already holds a run .*resume=last.*overwrite=true"):
        main(["config=efficientdm_digits.yaml", *_with_out(args, run), "trainer.max_steps=1"])
    assert _snapshot(run) == before


def test_overwrite_removes_the_old_outputs_first(finished_run: tuple[Path, list[str]], tmp_path: Path) -> None:
    src, args = finished_run
    run = _copy(src, tmp_path)
    (run / "report.md").write_text("an old report")  # an output this short run does not write again
    (run / "eval_cache").mkdir()
    (run / "eval_cache" / "kept.npz").write_bytes(b"cache")  # a cache keyed by its inputs survives
    (run / "notes.txt").write_text("mine")  # not a run output: never touched
    main(["config=efficientdm_digits.yaml", *_with_out(args, run), "trainer.max_steps=1", "overwrite=true"])
    assert not (run / "report.md").exists()
    assert (run / "eval_cache" / "kept.npz").read_bytes() == b"cache" and (run / "notes.txt").read_text() == "mine"
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert len({e.parent for e in events}) == 1  # one run's TensorBoard events, not two mixed
    import torch

    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 1


def test_overwrite_and_resume_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="overwrite"):
        load_config(["config=efficientdm_digits.yaml", "overwrite=true", "resume=auto"])


@pytest.mark.parametrize("change", ["efficientdm.weight_bits=8", "efficientdm.lora_rank=16", "seed=3",
                                    "trajectories.num_trajectories=8"])
def test_a_resume_that_changes_the_student_or_its_data_refuses_and_changes_nothing(
        finished_run: tuple[Path, list[str]], tmp_path: Path, change: str) -> None:
    src, args = finished_run
    run = _copy(src, tmp_path)
    before = _snapshot(run)
    key = change.split("=")[0]
    with pytest.raises(ConfigError, match=rf"resume: {key}: .* -> "):
        main(["config=efficientdm_digits.yaml", *_with_out(args, run), "resume=last", "trainer.max_steps=3", change])
    assert _snapshot(run) == before


def test_a_resume_may_change_steps_logging_and_evaluation_and_records_it(finished_run: tuple[Path, list[str]],
                                                                          tmp_path: Path) -> None:
    src, args = finished_run
    run = _copy(src, tmp_path)
    main(["config=efficientdm_digits.yaml", *_with_out(args, run), "resume=last", "trainer.max_steps=3",
          "trainer.log_every_n_steps=2"])
    log = (run / "resumes.log").read_text().splitlines()
    assert len(log) == 1 and "last.ckpt" in log[0]
    assert "trainer.max_steps: 2 -> 3" in log[0] and "trainer.log_every_n_steps: 1 -> 2" in log[0]
    assert "max_steps: 3" in (run / "config.yaml").read_text()


def test_config_differences_split_by_what_may_change() -> None:
    saved = load_config(["config=efficientdm_digits.yaml"])
    from train.config import to_yaml

    new = load_config(["config=efficientdm_digits.yaml", "trainer.max_steps=5", "eval.num_samples=10",
                       "efficientdm.act_bits=8", "teacher.path=elsewhere"])
    refused, allowed = config_differences(to_yaml(saved), new)
    assert [r.split(":")[0] for r in refused] == ["efficientdm.act_bits", "teacher.path"]
    assert [a.split(":")[0] for a in allowed] == ["eval.num_samples", "trainer.max_steps"]


def test_the_command_line_prints_one_paragraph_and_exits_non_zero(tmp_path: Path) -> None:
    cmd = [sys.executable, "train.py", "config=efficientdm_digits.yaml", f"output_dir={tmp_path / 'r'}",
           "efficientdm.weight_bits=1"]
    env = {k: v for k, v in os.environ.items() if k != "DIFFQAT_DEBUG"}
    quiet = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 1
    assert "Traceback" not in quiet.stderr
    assert quiet.stderr.startswith("error: efficientdm.weight_bits: must be in [2, 8], got 1")
    assert "DIFFQAT_DEBUG=1" in quiet.stderr
    loud = subprocess.run([*cmd, "--debug"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "weight_bits" in loud.stderr
    assert not (tmp_path / "r").exists()


def test_an_accelerator_the_machine_lacks_fails_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"trainer\.accelerator: 'gpu' but this machine has no CUDA device"):
        load_config(["config=efficientdm_digits.yaml", "trainer.accelerator=gpu"])


def test_without_an_intact_checkpoint_the_truncated_one_is_named_and_nothing_changes(
        finished_run: tuple[Path, list[str]], tmp_path: Path) -> None:
    src, args = finished_run
    run = _copy(src, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    for ckpt in run.glob("checkpoints/*.ckpt"):
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = _snapshot(run)
    for mode in ("last", "auto"):
        with pytest.raises(ConfigError, match=rf"resume: checkpoint {last} is truncated or corrupt"):
            main(["config=efficientdm_digits.yaml", *_with_out(args, run), f"resume={mode}"])
    assert _snapshot(run) == before


def test_a_truncated_teacher_file_is_named_before_anything_is_written(tiny_teacher: Path, tmp_path: Path) -> None:
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    weights = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"teacher weights \(teacher\.path\): {weights} is truncated"):
        main(["config=efficientdm_digits.yaml", *fast_overrides(teacher, out, 1)])
    assert not out.exists()


def test_a_corrupt_trajectory_shard_is_named_before_anything_is_written(tiny_teacher: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    common = ["config=efficientdm_digits.yaml", "trajectories.mode=cached", f"trajectories.cache_dir={cache}",
              "export=false"]
    main([*common, *fast_overrides(tiny_teacher, tmp_path / "a", 1)])
    shard = sorted(cache.glob("shard-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(ValueError, match=rf"trajectory cache {cache}: {shard} is truncated or corrupt"):
        main([*common, *fast_overrides(tiny_teacher, tmp_path / "b", 1)])
    assert not (tmp_path / "b").exists()  # found before the run directory is made, so before calibration


def test_a_truncated_last_checkpoint_falls_back_to_the_newest_intact_one(finished_run: tuple[Path, list[str]],
                                                                         tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    src, args = finished_run
    run = _copy(src, tmp_path)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step=1.ckpt", "step=2.ckpt"]  # keep 2
    (ckpts / "last.ckpt").write_bytes((ckpts / "last.ckpt").read_bytes()[:1000])
    (ckpts / "step=2.ckpt").write_bytes(b"")  # the newest step checkpoint is damaged too
    main(["config=efficientdm_digits.yaml", *_with_out(args, run), "resume=auto", "trainer.max_steps=3"])
    said = capsys.readouterr().out
    assert "last.ckpt is truncated or corrupt" in said and "resuming from" in said and "step=1.ckpt" in said
    assert "resume from " + str(ckpts / "step=1.ckpt") in (run / "resumes.log").read_text()
    import torch

    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 3
