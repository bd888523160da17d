"""A tiny random class-conditional teacher on disk (diffusers layout), shared by the training-system tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

from train.models.class_embedder import ClassEmbedder


def make_tiny_teacher(root: Path, seed: int = 0) -> Path:
    """Saves ``unet/``, ``class_embedder/`` and ``scheduler/`` of a ~50k-parameter 8x8 teacher into ``root``."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=1, norm_num_groups=4,
    )
    ClassEmbedder(num_classes=10, embed_dim=8).save_pretrained(str(root / "class_embedder"))
    unet.save_pretrained(str(root / "unet"))
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(str(root / "scheduler"))
    return root


def make_tiny_unconditional_teacher(root: Path, seed: int = 0) -> Path:
    """``unet/`` and ``scheduler/`` of a tiny unconditional ``UNet2DModel`` with the LDM-4 bedrooms recipe's features
    (legacy attention at the lower level, LDM's "linear" betas), 3x8x8 samples, no first stage."""
    torch.manual_seed(seed)
    UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=4, norm_num_groups=4).save_pretrained(str(root / "unet"))
    DDPMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", steps_offset=1,
                  clip_sample=False).save_pretrained(str(root / "scheduler"))
    return root


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"))


@pytest.fixture(scope="session")
def tiny_export(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A calibrated (untrained) W4A4 EfficientDM student of the tiny teacher, saved as a student directory
    (``student/``: ``student.safetensors`` + ``run_config.yaml``) and exported (``export/``, the layout of
    ``train.export_run``); with the resolved config and the loaded teacher."""
    from train.cli import build_student, calibrate_student, save_student
    from train.config import load_config
    from train.export_run import export_run
    from train.models.teacher import load_teacher

    root = tmp_path_factory.mktemp("tiny_export")
    cfg = load_config(["config=efficientdm_digits.yaml", *fast_overrides(tiny_teacher, root)])
    torch.manual_seed(0)
    teacher = load_teacher(cfg.teacher)
    student, _ = build_student(cfg, teacher)
    calibrate_student(cfg, student, teacher, torch.device("cpu"))
    save_student(student, teacher, root / "student", cfg)
    export_run(student, teacher, cfg, root / "export")
    return {"cfg": cfg, "teacher": teacher, "student": root / "student", "export": root / "export"}


#: per method: the overrides of its own section that fit :func:`fast_overrides` (4-step trajectories, 2 steps)
FAST_METHOD_OVERRIDES = {
    "efficientdm": ["efficientdm.num_timesteps=4", "efficientdm.lora_rank=4"],
    "binarydm": ["binarydm.warmup_groups=0"],
    "bidm": [],
    "qvgen": ["qvgen.aux_rank=2"],  # two rank-decay phases: fits a 2-step run
}


def fast_overrides(teacher: Path, out: Path, steps: int = 2, method: str = "efficientdm") -> list[str]:
    """Overrides that shrink any recipe of ``method`` to seconds on a CPU with the tiny teacher."""
    return [*FAST_METHOD_OVERRIDES[method],
        f"teacher.path={teacher}", f"output_dir={out}", f"trainer.max_steps={steps}",
        "trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_progress_bar=false",
        "trainer.precision=32-true", "trainer.log_every_n_steps=1",
        "trajectories.num_steps=4",
        "trajectories.batch_size=2", "trajectories.num_trajectories=4", "trajectories.shard_size=2",
        "calibration.num_trajectories=2", "calibration.num_steps=4", "calibration.max_batches=4",
        "monitor.sample_every_n_steps=0", "monitor.sample_labels=[0,1]", "monitor.sample_steps=4",
        "monitor.telemetry_every_n_steps=1", "monitor.checkpoint_every_n_steps=1",
        "eval.num_trajectories=2", "eval.num_steps=4", "eval.enabled=false", "eval.num_samples=4",
        "eval.sampling_steps=4", "eval.batch_size=4", "eval.features=none", "eval.grid_size=4",
    ]


class Killed(RuntimeError):
    """The simulated kill of :func:`run_killed_at`."""


def run_killed_at(argv: list[str], step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs ``train.cli.main(argv)`` and kills it when training step ``step`` starts (after ``step`` completed
    steps and their checkpoints), as a pre-empted job would be."""
    from train.cli import main
    from train.system import DistillQATSystem

    original = DistillQATSystem.training_step

    def dies_at(self: DistillQATSystem, batch: object, batch_idx: int) -> torch.Tensor:
        if self.global_step == step:
            raise Killed("simulated kill")
        return original(self, batch, batch_idx)

    with monkeypatch.context() as patch:
        patch.setattr(DistillQATSystem, "training_step", dies_at)
        with pytest.raises(Killed):
            main(argv)


def max_student_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between the saved students (``student/student.safetensors``) of two runs,
    which must hold the same keys."""
    from safetensors.torch import load_file

    sa, sb = (load_file(str(run / "student" / "student.safetensors")) for run in (a, b))
    assert sa.keys() == sb.keys()
    return max(float((sa[key].float() - sb[key].float()).abs().max()) for key in sa)


@pytest.fixture
def one_intra_op_thread() -> Iterator[None]:
    """One intra-op thread for the test, the previous count restored after it.

    The thread count is process state (``tests/conftest.py`` pins one for the session, and a test could change it)
    and it decides how CPU kernels split their reductions, hence the float32 rounding of every sum. A test whose
    outcome follows a training run pins it itself, so that the run computes the same numbers whatever ran before it.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
