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


def test_attention_kl_with_relation_is_logged_per_term_on_the_quantized_attention(tiny_teacher: Path,
                                                                                   tmp_path: Path) -> None:
    """TopKLD on the self-attention maps of the quantized student (heads read from the attention modules) next to
    relation distillation: every term has its own curve and the total is their weighted sum."""
    run = main(["config=qvgen_digits.yaml", *fast_overrides(tiny_teacher, tmp_path / "r", 2, "qvgen"),
                "losses.attention_kl.weight=2", "losses.attention_kl.taps=['*.attn1']", "losses.attention_kl.topk=4",
                "losses.relation.weight=1", "losses.relation.taps=[conv_norm_out]", "export=false"])
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    terms = {k: [e.value for e in acc.Scalars(f"train/{k}")] for k in ("attention_kl", "relation", "output_mse",
                                                                       "loss")}
    assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in terms.values())
    assert all(v > 0 for v in terms["attention_kl"])
    for i in range(2):
        total = 2 * terms["attention_kl"][i] + terms["relation"][i] + terms["output_mse"][i]
        assert math.isclose(terms["loss"][i], total, rel_tol=1e-4)
