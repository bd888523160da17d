"""``load_export_pipeline``: an export of the trainer sampled in its pipeline on a runtime backend.

The export is a calibrated W4A4 student of the tiny class-conditional teacher (temporal tables on a 4-step grid);
samples use DDIM 3 steps (timesteps between the grid's rows), CFG 1.5. ``fake`` must reproduce evaluation's path
(``qat.load_quantized`` in :func:`train.eval.evaluate.generate`) bit for bit; ``int8`` must stay within 5% relative
L2 of it (the end-to-end bound of ``tests/qat/test_runtime.py``: exact integer sums, but one flipped activation code
can cascade in a random tiny UNet; measured here: 1.6e-7).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import qat
from qat.runtime import Int8Layer
from train.config import ConfigError
from train.eval.evaluate import generate
from train.models.export_pipeline import load_export_pipeline
from train.models.families import set_family
from train.models.pipeline import QATDiffusionPipeline, sample_seeds
from train.models.teacher import load_teacher

INDICES = [0, 1, 2, 3]


def _sample(pipe: QATDiffusionPipeline, teacher) -> torch.Tensor:
    labels, noise, _ = sample_seeds(INDICES, teacher.num_classes, 7, teacher.sample_shape)
    pipe.set_progress_bar_config(disable=True)
    return pipe(noise, labels, num_inference_steps=3, guidance_scale=1.5).images


def _evaluation_samples(export: dict) -> torch.Tensor:
    """What evaluation samples from an export (``evaluate.py <export>`` before ``eval.backend`` existed)."""
    teacher = export["teacher"]
    unet = qat.load_quantized(export["export"] / "unet")
    set_family(unet, teacher.family)
    return generate(unet, teacher, INDICES, scheduler="ddim", num_steps=3, guidance=1.5, seed=7).images


def test_fake_backend_samples_what_evaluation_samples(tiny_export: dict) -> None:
    pipe = load_export_pipeline(tiny_export["export"], "fake")
    assert isinstance(pipe, QATDiffusionPipeline) and pipe.class_embedder is not None
    n = len(qat.quant_layers(pipe.unet))
    assert pipe.unet.runtime_report.counts() == {"fake": n}
    samples = _sample(pipe, tiny_export["teacher"])
    assert samples.shape == (4, 1, 8, 8)
    assert torch.equal(samples, _evaluation_samples(tiny_export))


def test_int8_samples_stay_close_to_the_fake_path(tiny_export: dict) -> None:
    pipe = load_export_pipeline(tiny_export["export"], "int8")
    counts = pipe.unet.runtime_report.counts()
    assert counts.get("int8", 0) > 0 and sum(isinstance(m, Int8Layer) for m in pipe.unet.modules()) == counts["int8"]
    samples, fake = _sample(pipe, tiny_export["teacher"]), _evaluation_samples(tiny_export)
    assert float((samples - fake).norm() / fake.norm()) <= 0.05


def test_parts_from_the_teacher_folder_or_a_loaded_teacher_sample_the_same(tiny_export: dict,
                                                                             tiny_teacher: Path) -> None:
    """The scheduler and class embedder the export holds are the teacher's: every source samples the same."""
    ref = _sample(load_export_pipeline(tiny_export["export"], "int8"), tiny_export["teacher"])
    for teacher in (tiny_teacher, str(tiny_teacher), tiny_export["teacher"]):
        pipe = load_export_pipeline(tiny_export["export"], "int8", teacher=teacher)
        assert torch.equal(_sample(pipe, tiny_export["teacher"]), ref)


def test_a_directory_that_is_no_trainer_export_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"run_config.yaml not found: .*qat.runtime.load_pipeline"):
        load_export_pipeline(tmp_path, "int8")


def test_a_denoiser_of_another_class_is_refused_by_the_teacher_loader(tiny_export: dict) -> None:
    with pytest.raises(ConfigError, match=r"config.json names UNet2DConditionModel, but the denoiser given .* Linear"):
        load_teacher(tiny_export["cfg"].teacher, unet=torch.nn.Linear(2, 2))
