"""Sampling pipeline, temporal-quantizer remapping, sharded sampling, evaluation metrics, reports, evaluate.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qat.timestep import temporal_quantizers
from tests.train.conftest import fast_overrides
from train.cli import build_student, calibrate_student, main
from train.config import ConfigError, load_config
from train.eval.cli import main as evaluate_main
from train.eval.evaluate import DistributionScorer, SampleSet, fidelity, generate, merge_samples, shard_indices
from train.eval.report import write_report
from train.models.pipeline import QATDiffusionPipeline, load_adm_npz, sample_seeds, save_adm_npz
from train.models.schedulers import SCHEDULER_ALIASES
from train.models.teacher import load_teacher


@pytest.fixture(scope="module")
def setup(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory):
    """A calibrated W4A4 student of the tiny teacher with 20-row temporal tables on the DDIM-20 grid."""
    out = tmp_path_factory.mktemp("eval_setup")
    cfg = load_config(["config=efficientdm_digits.yaml", *fast_overrides(tiny_teacher, out),
                       "trajectories.num_steps=20", "efficientdm.num_timesteps=20", "calibration.num_steps=20",
                       "calibration.max_batches=4"])
    torch.manual_seed(0)
    teacher = load_teacher(cfg.teacher)
    student, _ = build_student(cfg, teacher)
    calibrate_student(cfg, student, teacher, torch.device("cpu"))
    return cfg, teacher, student


def test_pipeline_ddim_matches_the_training_sampler(setup) -> None:
    """The diffusers pipeline call (DDIM by name, eta 0, CFG through its own conditioning) and the trajectories'
    sampler (the teacher's DDIM grid and contexts in the pipeline's loop) agree."""
    _, teacher, student = setup
    labels, noise, _ = sample_seeds([0, 1, 2], teacher.num_classes, 5, teacher.sample_shape)
    for model in (teacher.unet, student):
        cond, uncond = teacher.contexts(labels)
        ref = QATDiffusionPipeline.from_teacher(teacher, unet=model, scheduler=teacher.ddim(6)).denoise_loop(
            noise, cond, uncond, 1.5)
        pipe = QATDiffusionPipeline.from_teacher(teacher, unet=model, scheduler="ddim")
        pipe.set_progress_bar_config(disable=True)
        out = pipe(noise, labels, num_inference_steps=6, guidance_scale=1.5).images
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [20, 50, 100])
def test_temporal_quantizers_follow_the_sampler_timesteps(setup, steps: int) -> None:
    """Under 20, 50 and 100 DDIM steps each call uses the table row of its timestep when the timestep is on the
    20-step training grid, and the linear interpolation of the two neighbouring rows otherwise."""
    _, teacher, student = setup
    quantizers = temporal_quantizers(student)
    q = quantizers[len(quantizers) // 2]
    grid = q.timesteps.clone()
    assert torch.equal(grid, teacher.ddim(20).timesteps.flip(0).float())
    saved = q.step.detach().clone()
    rows = torch.arange(20, dtype=torch.float32)
    table = 0.02 + 1e-3 * rows**2  # non-linear in the row, so interpolation and row lookup differ
    seen: list[float] = []
    original = q._step_zero

    def record(x: torch.Tensor):
        step, zero = original(x)
        assert bool((step == step.reshape(-1)[0]).all())  # one timestep for the whole batch
        seen.append(float(step.reshape(-1)[0]))
        return step, zero

    try:
        with torch.no_grad():
            q.step.copy_(table.reshape(q.step.shape))
        q._step_zero = record
        pipe = QATDiffusionPipeline.from_teacher(teacher, unet=student, scheduler="ddim")
        pipe.set_progress_bar_config(disable=True)
        labels, noise, _ = sample_seeds([0], teacher.num_classes, 0, teacher.sample_shape)
        pipe(noise, labels, num_inference_steps=steps, guidance_scale=1.5)
    finally:
        del q._step_zero
        with torch.no_grad():
            q.step.copy_(saved)
    sampler_t = teacher.ddim(steps).timesteps.float()
    assert len(seen) == steps
    on_grid = 0
    for t, used in zip(sampler_t.tolist(), seen):
        expected = float(np.interp(t, grid.numpy(), table.numpy()))
        if t in grid.tolist():
            on_grid += 1
            assert used == float(table[grid.tolist().index(t)])  # exact row, no arithmetic
        else:
            assert used == pytest.approx(expected, rel=1e-6)
    assert on_grid == {20: 20, 50: 10, 100: 20}[steps]  # nested grids: every 50th / 100th timestep


def test_samples_do_not_depend_on_sharding_or_batching(setup) -> None:
    """Two shards of different batch sizes, merged, equal one process's set (stochastic sampler: DDIM eta 1)."""
    _, teacher, student = setup
    kwargs = dict(scheduler="ddim", num_steps=4, guidance=1.5, eta=1.0, seed=3)
    whole = generate(student, teacher, shard_indices(6), batch_size=6, **kwargs)
    parts = [generate(student, teacher, shard_indices(6, r, 2), batch_size=b, **kwargs)
             for r, b in ((1, 2), (0, 3))]
    merged = merge_samples(parts)
    assert torch.equal(merged.indices, torch.arange(6)) and torch.equal(merged.labels, whole.labels)
    torch.testing.assert_close(merged.images, whole.images, atol=1e-5, rtol=0)
    assert whole.labels.tolist() == [i % 10 for i in range(6)]  # class-balanced, ADM protocol


@pytest.mark.parametrize("name", sorted(SCHEDULER_ALIASES))
def test_every_listed_scheduler_samples_the_quantized_student(setup, name: str) -> None:
    _, teacher, student = setup
    out = generate(student, teacher, [0, 1], scheduler=name, num_steps=5, guidance=1.5)
    assert out.images.shape == (2, *teacher.sample_shape) and torch.isfinite(out.images).all()
    assert not temporal_quantizers(student)[0]._lo  # the hook is removed and the timestep cleared


def test_unknown_scheduler_and_eval_keys_are_refused_at_load() -> None:
    with pytest.raises(ConfigError, match=r"eval.scheduler: unknown scheduler 'fancy'.*'ddim'"):
        load_config(["config=efficientdm_digits.yaml", "eval.scheduler=fancy"])
    with pytest.raises(ConfigError, match=r"eval.inception_path: required when eval.features is 'inception'"):
        load_config(["config=efficientdm_digits.yaml", "eval.features=inception"])
    with pytest.raises(ConfigError, match=r"eval.features: .*'digits'"):
        load_config(["config=efficientdm_digits.yaml", "eval.features=lpips"])
    assert load_config(["config=efficientdm_digits.yaml", "eval.scheduler=KDPM2DiscreteScheduler"])


def test_adm_npz_layout(tmp_path: Path) -> None:
    images = torch.rand(3, 1, 5, 4) * 2.4 - 1.2  # some values outside [-1, 1]
    labels = torch.tensor([7, 0, 3])
    path = save_adm_npz(tmp_path / "s.npz", images, labels)
    with np.load(path) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        arr = data["arr_0"]
        assert arr.dtype == np.uint8 and arr.shape == (3, 5, 4, 1)
        for n, c, h, w in [(0, 0, 0, 0), (1, 0, 4, 3), (2, 0, 2, 1)]:
            v = min(max(float(images[n, c, h, w]), -1.0), 1.0)
            assert int(arr[n, h, w, c]) == round((v + 1) * 127.5)
        assert data["arr_1"].tolist() == [7, 0, 3]
    back, lab = load_adm_npz(path)
    assert torch.equal(lab, labels)
    assert (back - images.clamp(-1, 1)).abs().max() <= 1 / 127.5 + 1e-6


def test_fidelity_against_itself_and_mismatched_sets() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 12, 12, generator=gen) - 0.5  # +0.1 below stays inside the clamp range
    a = SampleSet(images, torch.zeros(4, dtype=torch.long), torch.arange(4))
    same = fidelity(a, a)
    assert same["psnr_vs_fp"] == math.inf and same["sample_mse"] == 0 and same["ssim_vs_fp"] == pytest.approx(1.0)
    b = SampleSet(a.images + 0.1, a.labels, a.indices)
    worse = fidelity(b, a)
    assert worse["psnr_vs_fp"] == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-3)
    with pytest.raises(ValueError, match="different sample indices"):
        fidelity(SampleSet(a.images, a.labels, a.indices + 1), a)


def test_digits_scorer_ranks_real_digits_above_noise() -> None:
    from train.eval.digits import load_digits_tensor

    images, labels = load_digits_tensor(16)
    scorer = DistributionScorer("digits")
    real = scorer(SampleSet(images[:300], labels[:300], torch.arange(300)))
    noise = scorer(SampleSet(torch.rand(300, 1, 16, 16) * 2 - 1, labels[:300], torch.arange(300)))
    assert real["class_acc"] > 0.97 and noise["class_acc"] < 0.5
    assert real["fd"] < 0.05 * noise["fd"]
    unconditional = DistributionScorer("digits", class_conditional=False)
    assert "class_acc" not in unconditional(SampleSet(images[:10], labels[:10], torch.arange(10)))


def test_report_is_strict_json_and_lists_every_variant(tmp_path: Path) -> None:
    variants = {"fp": {"fd": 1.0}, "ptq": {"fd": 9.0, "psnr_vs_fp": 20.0, "eps_mse": 0.1,
                                               "eps_mse_by_step": [0.2, 0.1]},
                "qat": {"fd": 2.0, "psnr_vs_fp": math.inf, "eps_mse": 0.05, "eps_mse_by_step": [0.1, 0.0]}}
    grids = {k: SampleSet(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), torch.arange(2))
             for k in variants}
    paths = write_report(tmp_path, {"method": "m", "variants": variants,
                                    "heldout": {"num_trajectories": 1, "num_steps": 2, "timesteps": [500, 0]}}, grids)
    data = json.loads(paths["json"].read_text())
    assert data["variants"]["qat"]["psnr_vs_fp"] is None and data["variants"]["ptq"]["fd"] == 9.0
    md = paths["md"].read_text()
    assert "| FP teacher | 1.000 |" in md and "| QAT (trained) | 2.000 | inf |" in md
    assert paths["eps_plot"].is_file() and paths["grid"].is_file()


def test_evaluate_entry_point_reproduces_the_run_report(tiny_teacher: Path, tmp_path: Path) -> None:
    run = main(["config=efficientdm_digits.yaml", *fast_overrides(tiny_teacher, tmp_path / "run"),
                "eval.enabled=true"])
    original = json.loads((run / "report.json").read_text())["variants"]
    kinds = {run: "student", run / "checkpoints" / "last.ckpt": "checkpoint", run / "export": "export"}
    for source, kind in kinds.items():
        out = evaluate_main([str(source), f"out={tmp_path / 'ev' / source.name}"])
        again = json.loads((out / "report.json").read_text())
        assert again["source_kind"] == kind
        for name in ("fp", "ptq", "qat"):
            for key, value in original[name].items():
                assert again["variants"][name][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, key)
        with np.load(out / "samples" / "qat.npz") as data:
            assert data["arr_0"].shape == (4, 8, 8, 1)
    other = evaluate_main([str(run), "eval.scheduler=unipc", "eval.sampling_steps=3", "ptq=false"])
    assert other.name == "eval_unipc_3" and set(json.loads((other / "report.json").read_text())["variants"]) == {
        "fp", "qat"}
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        evaluate_main([str(tmp_path)])
