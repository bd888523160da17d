"""Space patched distillation: the loss against a loop-by-loop reference of BiDM's Eq. 13-16, its invariances, its
gradient, token folding, small features, and config validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import qat.losses
from qat.checks import ConfigProblems
from qat.losses import LossInputs, SpacePatchedDistillation, SpacePatchedDistillationConfig


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _inputs(student: dict, teacher: dict) -> LossInputs:
    x = torch.zeros(1)
    return LossInputs(student_out=x, teacher_out=x, t=torch.zeros(1), guided=False, guidance=1.0,
                      student_features=student, teacher_features=teacher)


def _term(taps: list[str], patches: int) -> SpacePatchedDistillation:
    return SpacePatchedDistillation(SpacePatchedDistillationConfig(taps=taps, patches=patches))


def as_tokens(grid: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H W, C)`` tokens, row-major on the grid."""
    return grid.flatten(2).transpose(1, 2)


def _naive_block(student: torch.Tensor, teacher: torch.Tensor, p: int) -> float:
    """Eq. 13-16 for one ``(B, C, H, W)`` block, patch by patch in float64."""
    h, w = student.shape[2] // p, student.shape[3] // p
    total = 0.0
    for i in range(p):
        for j in range(p):
            relations = []
            for f in (teacher.double(), student.double()):
                patch = f[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w]
                a = torch.matmul(patch, patch.transpose(2, 3))
                norm = math.sqrt(float((a * a).sum()))
                relations.append(a / norm if norm > 0 else torch.zeros_like(a))
            total += math.sqrt(float(((relations[0] - relations[1]) ** 2).sum()))
    return total / p ** 2


@pytest.mark.parametrize("patches", [4, 2])
def test_loss_matches_a_naive_patch_by_patch_reference(patches: int) -> None:
    shapes = {"down.0": (2, 3, 8, 12), "mid": (2, 5, 10, 9), "up.1": (2, 3, 8, 12)}  # 10 x 9: remainder dropped
    teacher = {n: _randn(i, *s) for i, (n, s) in enumerate(shapes.items())}
    student = {n: t + 0.5 * _randn(10 + i, *t.shape) for i, (n, t) in enumerate(teacher.items())}
    teacher["other"] = _randn(30, 2, 3, 8, 8)  # not tapped: ignored (the student lacks it)
    value = _term(["down.*", "mid", "up.*"], patches)(_inputs(student, teacher))
    expected = sum(_naive_block(student[n], teacher[n], patches) for n in shapes) / len(shapes)
    assert value.dtype == torch.float32 and value.dim() == 0
    assert_close(value.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert expected > 0.1


def test_remainder_rows_and_columns_are_ignored() -> None:
    teacher = _randn(0, 2, 3, 10, 9)
    student = teacher.clone()
    student[:, :, 8:] += 5.0  # only the rows and the column that p = 4 drops differ
    student[:, :, :, 8:] -= 5.0
    term = _term(["blk"], 4)
    assert float(term(_inputs({"blk": student}, {"blk": teacher}))) == 0.0
    student[:, :, 7, 0] += 1.0  # a kept pixel
    assert float(term(_inputs({"blk": student}, {"blk": teacher}))) > 0


def test_equal_features_give_zero_and_the_loss_is_scale_invariant() -> None:
    teacher = _randn(1, 2, 4, 8, 8)
    term = _term(["blk"], 4)
    assert float(term(_inputs({"blk": teacher.clone()}, {"blk": teacher}))) == 0.0
    assert float(term(_inputs({"blk": 3.7 * teacher}, {"blk": teacher}))) < 1e-5
    assert float(term(_inputs({"blk": 1e-3 * teacher}, {"blk": teacher}))) < 1e-5
    assert float(term(_inputs({"blk": teacher + 0.1 * _randn(2, *teacher.shape)}, {"blk": teacher}))) > 1e-3


def test_gradient_reaches_the_student_only() -> None:
    teacher = _randn(3, 2, 3, 8, 12)
    student = (teacher + 0.3 * _randn(4, *teacher.shape)).requires_grad_(True)
    value = _term(["blk"], 4)(_inputs({"blk": student}, {"blk": teacher}))
    value.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert not teacher.requires_grad and teacher.grad is None
    # at the optimum (equal features) the gradient exists and is finite too
    same = teacher.clone().requires_grad_(True)
    _term(["blk"], 4)(_inputs({"blk": same}, {"blk": teacher})).backward()
    assert same.grad is not None and torch.isfinite(same.grad).all()


def test_tokens_fold_row_major_to_a_square_grid() -> None:
    teacher_grid, student_grid = _randn(5, 2, 6, 4, 4), _randn(6, 2, 6, 4, 4)
    term = _term(["attn"], 2)
    folded = term(_inputs({"attn": as_tokens(student_grid)}, {"attn": as_tokens(teacher_grid)}))
    assert_close(folded, term(_inputs({"attn": student_grid}, {"attn": teacher_grid})))
    assert_close(folded.double(), torch.tensor(_naive_block(student_grid, teacher_grid, 2), dtype=torch.float64),
                 rtol=1e-5, atol=1e-6)
    bad = _randn(7, 2, 15, 6)
    with pytest.raises(ValueError, match=r"'attn'.*\(2, 15, 6\).*perfect square"):
        term(_inputs({"attn": bad}, {"attn": bad}))
    flat = _randn(8, 2, 6)
    with pytest.raises(ValueError, match=r"'attn'.*\(2, 6\)"):
        term(_inputs({"attn": flat}, {"attn": flat}))


def test_a_feature_smaller_than_p_contributes_zero_but_counts_in_the_mean() -> None:
    big_t = _randn(9, 2, 3, 8, 8)
    big_s = big_t + 0.5 * _randn(10, *big_t.shape)
    small_t, small_s = _randn(11, 2, 3, 2, 2), _randn(12, 2, 3, 2, 2)
    alone = _term(["big"], 4)(_inputs({"big": big_s}, {"big": big_t}))
    small_s.requires_grad_(True)
    both = _term(["big", "small"], 4)(_inputs({"big": big_s, "small": small_s}, {"big": big_t, "small": small_t}))
    assert float(alone) > 0.1 and torch.isfinite(both)
    assert_close(both, alone / 2)
    both.backward()
    assert small_s.grad is not None and torch.equal(small_s.grad, torch.zeros_like(small_s))


def test_a_zero_patch_gives_zero_relations_not_nan() -> None:
    teacher = _randn(13, 2, 3, 8, 8)
    student = teacher.clone()
    student[:, :, :4, :4] = 0.0  # one of the four 4x4 patches is all zeros in the student
    value = _term(["blk"], 2)(_inputs({"blk": student}, {"blk": teacher}))
    assert torch.isfinite(value)
    assert_close(value, torch.tensor(1.0 / 4))  # that patch: ||Â^T - 0|| = 1, the other three: 0


def test_config_validation_and_registration() -> None:
    with pytest.raises(ConfigProblems, match="patches: must be >= 1"):
        SpacePatchedDistillationConfig(taps=["mid"], patches=0)
    with pytest.raises(ConfigProblems, match="^taps: needs at least one"):
        SpacePatchedDistillation(SpacePatchedDistillationConfig())
    SpacePatchedDistillation(SpacePatchedDistillationConfig(weight=0.0))  # switched off: no taps needed
    config = SpacePatchedDistillationConfig(taps=["mid"])
    assert config.weight == 1e-2 and config.patches == 4
    assert qat.losses.LOSSES.get("spd") == (SpacePatchedDistillationConfig, SpacePatchedDistillation)
    assert isinstance(qat.losses.build_loss(config), SpacePatchedDistillation)
    assert _term(["mid", "up.*"], 4).taps() == ["mid", "up.*"]
    with pytest.raises(ValueError, match="spd: taps"):
        _term(["mid"], 4)(_inputs({}, {"other": torch.zeros(1, 1, 4, 4)}))
    with pytest.raises(ValueError, match="student lacks"):
        _term(["mid"], 4)(_inputs({}, {"mid": torch.zeros(1, 1, 4, 4)}))
