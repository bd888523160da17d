"""Restarting a run before its first checkpoint, and what a run shows while it works.

A run killed before its first training checkpoint resumes from its saved calibration (or from the beginning when it
was killed before calibration finished) and ends with the same student as a straight run; a reused trajectory cache
that does not fit the config is refused before calibration; the progress bars count steps (from the resumed
position after a resume) and name every long phase; Lightning's warnings that do not apply are silenced.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

import train.cli
from tests.train.conftest import Killed, fast_overrides, max_student_difference, run_killed_at
from train.cli import calibration_file, main

RECIPE = "config=efficientdm_digits.yaml"


def _with_out(args: list[str], out: Path) -> list[str]:
    return [a for a in args if not a.startswith("output_dir=")] + [f"output_dir={out}"]


def _never_calibrate(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the student was calibrated again")

    monkeypatch.setattr(train.cli, "calibrate_student", refuse)


def _resume(run: Path, args: list[str], mode: str, reference: Path, capsys: pytest.CaptureFixture) -> str:
    """Resumes ``run`` with ``resume=<mode>``, checks that it trains the straight run's student, returns what it
    printed."""
    main([RECIPE, *_with_out(args, run), f"resume={mode}"])
    assert max_student_difference(run, reference) <= 1e-6
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def straight(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """An uninterrupted 2-step run and its overrides."""
    args = [*fast_overrides(tiny_teacher, tmp_path_factory.mktemp("straight") / "run", 2), "export=false"]
    return main([RECIPE, *args]), args


def test_a_resume_before_the_first_checkpoint_restores_the_saved_calibration(
        straight: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    reference, args = straight
    run = tmp_path / "run"
    run_killed_at([RECIPE, *_with_out(args, run)], 0, monkeypatch)  # calibrated, no checkpoint yet
    assert not (run / "checkpoints" / "last.ckpt").exists() and calibration_file(run).is_file()
    _never_calibrate(monkeypatch)
    assert "restored the calibrated student from" in _resume(run, args, "last", reference, capsys)


def test_a_resume_after_a_kill_during_calibration_starts_again(straight: tuple[Path, list[str]], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    reference, args = straight
    run = tmp_path / "run"

    def killed(*a: object, **k: object) -> None:
        raise Killed("simulated kill during calibration")

    monkeypatch.setattr(train.cli, "calibrate_student", killed)
    with pytest.raises(Killed):
        main([RECIPE, *_with_out(args, run)])
    monkeypatch.undo()
    assert (run / "config.yaml").is_file() and not calibration_file(run).exists()
    assert "starting from the beginning" in _resume(run, args, "last", reference, capsys)


def test_a_damaged_saved_calibration_is_named_and_redone(straight: tuple[Path, list[str]], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    reference, args = straight
    run = tmp_path / "run"
    run_killed_at([RECIPE, *_with_out(args, run)], 0, monkeypatch)
    saved = calibration_file(run)
    saved.write_bytes(saved.read_bytes()[:-5])
    said = _resume(run, args, "auto", reference, capsys)
    assert f"{saved} is truncated or corrupt" in said and "calibrating again" in said


def test_a_cache_made_with_other_settings_is_refused_before_calibration(tiny_teacher: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    common = [RECIPE, "trajectories.mode=cached", f"trajectories.cache_dir={cache}", "export=false"]
    main([*common, *fast_overrides(tiny_teacher, tmp_path / "a", 1)])
    _never_calibrate(monkeypatch)
    with pytest.raises(ValueError, match=r"trajectory cache .* was made with other settings .*'num_trajectories'"):
        main([*common, *fast_overrides(tiny_teacher, tmp_path / "b", 1), "trajectories.num_trajectories=6"])
    assert not (tmp_path / "b").exists()  # nothing written


def test_progress_bars_count_steps_from_the_resumed_position_without_inapplicable_warnings(
        tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = [RECIPE, *fast_overrides(tiny_teacher, tmp_path / "run", 2), "trainer.enable_progress_bar=true",
            "eval.enabled=true", "trajectories.mode=cached", "export=true"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(args)
        first = "".join(capsys.readouterr())  # Lightning's bar writes to stdout, tqdm's default is stderr
        main([*args, "trainer.max_steps=3", "resume=last"])
        second = "".join(capsys.readouterr())
    for phase in ("calibration trajectories:", "calibration:", "trajectories (rank 0):", "eval samples (FP teacher):",
                  "eval samples (student):", "export:"):
        assert phase in first, phase
    assert re.search(r"train: +100%\|[^|]*\| 2/2 ", first)
    assert re.search(r"train: +67%\|[^|]*\| 2/3 ", second) and re.search(r"train: +100%\|[^|]*\| 3/3 ", second)
    assert "Epoch" not in first + second
    from_lightning = [f"{w.category.__name__}: {w.message}" for w in caught if "lightning" in w.filename]
    assert from_lightning == []
