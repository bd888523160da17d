"""The relation term through the trainer, composed with a method from the command line: logged every step, and the
only loss of a run it still trains the student (its features keep their graph)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.train.conftest import fast_overrides
from train.cli import main


def test_relation_alone_trains_the_student_and_is_logged(tiny_teacher: Path, tmp_path: Path) -> None:
    run = main(["config=efficientdm_digits.yaml", *fast_overrides(tiny_teacher, tmp_path / "r", 3),
                "losses.output_mse.weight=0", "losses.relation.weight=10", "losses.relation.taps=[conv_norm_out]",
                "losses.relation.topk=3", "export=false"])
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    values = [e.value for e in acc.Scalars("train/relation")]
    assert len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values)
    state = load_file(str(run / "student" / "student.safetensors"))
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().sum()) > 0 for v in lora_b)  # moved off its zero init by this term alone


@pytest.mark.parametrize("mode", ["online", "cached"])
def test_time_smoothed_relation_runs_online_and_cached(mode: str, tiny_teacher: Path, tmp_path: Path) -> None:
    """Both sources carry each sample's previous step; the trainer runs the teacher there for the smoothing."""
    run = main(["config=efficientdm_digits.yaml", *fast_overrides(tiny_teacher, tmp_path / "r", 2),
                f"trajectories.mode={mode}", "losses.relation.weight=1", "losses.relation.taps=[conv_norm_out]",
                "losses.relation.smoothing_steps=2", "export=false"])
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    values = [e.value for e in acc.Scalars("train/relation")]
    assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)
