"""BiDM through the trainer on tiny teachers: the connection's cache comes from each sample's previous trajectory
step (online and cached, mixed-timestep batches), SPD is logged, two gloo processes match one, the export reloads to
the student's outputs, and sampling from it resets the connection's state at every pipeline call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import qat
from qat.methods import BiDM
from tests.train.conftest import fast_overrides, make_tiny_unconditional_teacher
from tests.train.test_launchers import _bin, _run
from train.cli import build_student, main
from train.config import ConfigError, load_config
from train.models import pipeline as pipeline_module
from train.models.pipeline import QATDiffusionPipeline
from train.models.teacher import load_teacher

#: recipes this file runs end to end (the unconditional LDM-4 one on a tiny unconditional teacher)
RECIPES_RUN_HERE = {"bidm_ldm4_bedrooms.yaml"}


def _args(teacher: Path, out: Path, steps: int, *more: str) -> list[str]:
    return ["config=bidm_digits.yaml", *fast_overrides(teacher, out, steps, method="bidm"), "bidm.lr=1e-3", *more]


@pytest.mark.parametrize("mode", ["online", "cached"])
def test_each_step_primes_the_connection_with_the_previous_step_of_each_sample(
        mode: str, tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    original = BiDM.before_student_forward

    def spy(self: BiDM, student: torch.nn.Module, batch: object, runner: object) -> None:
        original(self, student, batch, runner)
        conn = BiDM.connection(student)
        seen.append((batch.t.clone(), batch.previous.t.clone(), batch.previous.valid.clone(), conn.primed,
                     conn._valid.clone()))

    monkeypatch.setattr(BiDM, "before_student_forward", spy)
    run = main(_args(tiny_teacher, tmp_path / mode, 4, f"trajectories.mode={mode}", "export=false"))
    assert len(seen) == 4
    for t, t_prev, valid, primed, mask in seen:
        assert primed and mask.shape[0] == 2 * t.shape[0]  # [uncond; cond] rows, both halves masked alike
        assert torch.equal(mask, valid.repeat(2))
        # 4 DDIM steps (750, 500, 250, 0): the previous step is 250 timesteps noisier, absent at the first one
        assert torch.equal(valid, t < 750)
        assert torch.equal(t_prev[valid], t[valid] + 250)
    if mode == "cached":  # shuffled batches mix the steps of different trajectories
        assert any(len(set(t.tolist())) > 1 for t, *_ in seen)
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    spd = [e.value for e in acc.Scalars("train/spd")]
    assert len(spd) == 4 and all(v > 0 for v in spd)


def _relative_difference(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor],
                         start: dict[str, torch.Tensor]) -> float:
    """``||one - two|| / ||one - start||`` over all tensors of ``one``: the disagreement of two runs as a fraction of
    what training changed."""
    def norm(pairs: object) -> float:
        return sum(float((x.double() - y.double()).pow(2).sum()) for x, y in pairs) ** 0.5

    return norm((one[k], two[k]) for k in one) / norm((one[k], start[k]) for k in one)


def test_two_processes_match_one_process_through_the_cross_timestep_connection(
        tiny_teacher: Path, tmp_path: Path, one_intra_op_thread: None) -> None:
    """torchrun (gloo, 2 CPU processes of 2 trajectories) vs 1 process of 4: every process primes the connection
    with the previous steps of its own samples (the same trajectories, by global index), so the students and the
    optimizer states agree up to the summation order of the averaged gradients."""
    steps = 4  # one 4-step trajectory: no previous step at the first training step, blended at the other three
    # alpha_init 0.3 (the paper's): the blend is open from the first step with a previous one, so the cache is in the
    # forward. lr 1e-4: W1A1's sign activations amplify rounding from the second step on; at 1e-3, one process
    # at 1 vs 2 threads already differs by ~6% of what training changed. SPD is off: it normalises each patch's
    # relation map over the whole per-process batch, so its value depends on how the global batch is split (step 0,
    # identical inputs: 0.872 for one batch of 4, 0.861 as the mean over two batches of 2).
    common = ["bidm.lr=1e-4", "bidm.alpha_init=0.3", "bidm.spd_weight=0", "trainer.deterministic=true",
              "trainer.accelerator=cpu", "export=false"]
    one = main(["config=bidm_digits.yaml", *fast_overrides(tiny_teacher, tmp_path / "one", steps, "bidm"), *common,
                "trajectories.batch_size=4"])
    two = tmp_path / "two"
    _run([_bin("torchrun"), "--nproc_per_node=2", "--master_port=29542", "train.py", "config=bidm_digits.yaml",
          *fast_overrides(tiny_teacher, two, steps, "bidm"), *common, "trajectories.batch_size=2",
          "trainer.devices=auto"], tmp_path)
    ckpt = [torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for run in (one, two)]
    model = [{k.removeprefix("student."): v for k, v in c["state_dict"].items()} for c in ckpt]
    for run, state in zip((one, two), model, strict=True):  # the saved student is the checkpoint's
        saved = load_file(str(run / "student" / "student.safetensors"))
        assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    a, b = model
    assert a.keys() == b.keys()
    assert ckpt[0]["global_step"] == ckpt[1]["global_step"] == steps
    floats = [k for k in a if a[k].is_floating_point()]
    assert len(floats) < len(a) and all(torch.equal(a[k], b[k]) for k in a if k not in floats)  # flags, basis counts
    opt = [c["optimizer_states"][0]["state"] for c in ckpt]
    assert opt[0].keys() == opt[1].keys() and all(torch.equal(opt[0][i]["step"], opt[1][i]["step"]) for i in opt[0])
    # Not bit-equal: DDP sums the two processes' gradients in another order than one process's batch mean, and Adam
    # turns the rounding residue of a gradient that is exactly 0 in one run (4e-9 against 0) into a step of a good
    # part of lr, which the sign activations then spread. Measured, as fractions of what training changed: 2e-3 for
    # the student, 1e-4 for the moments (one process at 1 vs 2 threads: 1e-3 for the student); with each sample's
    # connection fed another sample's previous step: 0.4.
    start = load_file(str(one / "calibration" / "student.safetensors"))
    differences = {"student": _relative_difference({k: a[k] for k in floats}, b, start)}
    for moment in ("exp_avg", "exp_avg_sq"):  # they start at 0
        first, second = ({i: s[moment] for i, s in o.items()} for o in opt)
        differences[moment] = _relative_difference(first, second, {i: torch.zeros_like(v) for i, v in first.items()})
    assert max(differences.values()) < 2e-2, differences
    assert not torch.equal(a["cross_timestep.alpha"], torch.full_like(a["cross_timestep.alpha"], 0.3))  # it trained


def test_export_reloads_exactly_and_pipeline_sampling_resets_the_connection(tiny_teacher: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    run = main(_args(tiny_teacher, tmp_path / "r", 3))
    cfg = load_config([f"config={run / 'config.yaml'}"])
    teacher = load_teacher(cfg.teacher)
    student, _ = build_student(cfg, teacher)
    saved = load_file(str(run / "student" / "student.safetensors"))
    student.load_state_dict(saved)
    alpha = saved["cross_timestep.alpha"]
    assert not torch.equal(alpha, torch.full_like(alpha, cfg.bidm.alpha_init))  # the blend table trained
    exported = qat.load_quantized(run / "export" / "unet")
    assert isinstance(BiDM.connection(exported), qat.nn.binary.CrossTimestepConnection)

    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([3, 7])

    def images(model: torch.nn.Module) -> torch.Tensor:
        pipe = QATDiffusionPipeline.from_teacher(teacher, unet=model, scheduler="ddim")
        return pipe(noise, labels, num_inference_steps=4, guidance_scale=1.5).images

    first = images(exported)
    assert torch.equal(images(exported), first)  # the same seeds give the same images
    assert torch.equal(images(student.eval()), first)  # and the export samples as the student

    # without the reset, the second call's first step follows the first call's last: refused, not silently mixed
    monkeypatch.setattr(pipeline_module, "reset_sampling_state", lambda model: 0)
    qat.reset_sampling_state(exported)
    images(exported)
    with pytest.raises(RuntimeError, match="one model evaluation per step"):
        images(exported)


def test_bedrooms_recipe_runs_on_a_tiny_unconditional_unet(tmp_path: Path) -> None:
    """The LDM-4 recipe's settings (unconditional UNet2DModel, no guidance, 8 connected blocks of 9) on a tiny
    teacher of the converter's layout family: trains, evaluates, exports and reloads."""
    root = make_tiny_unconditional_teacher(tmp_path / "teacher")
    run = main(["config=bidm_ldm4_bedrooms.yaml", *fast_overrides(root, tmp_path / "run", 2, "bidm"),
                "teacher.vae_subfolder=null", "eval.enabled=true"])
    report = (run / "report.md").read_text()
    assert "W1A1" in report and "QAT (trained)" in report
    exported = qat.load_quantized(run / "export" / "unet")
    assert len(BiDM.connection(exported).units) == 8
    assert sum(isinstance(m, qat.nn.binary.XnorConv2d) for m in exported.modules()) > 0


def test_bidm_config_errors_name_the_keys(tiny_teacher: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config([*_args(tiny_teacher, tmp_path, 2), "bidm.act_gradient=tanh", "bidm.connections=-1"])
    text = str(err.value)
    assert "bidm.act_gradient: must be one of ['approx_sign', 'clipped'], got 'tanh'" in text
    assert "bidm.connections" in text
    with pytest.raises(ConfigError, match=r"eval\.scheduler: 'heun' evaluates the model more than once per step"):
        load_config([*_args(tiny_teacher, tmp_path, 2), "eval.scheduler=heun"])
    load_config([*_args(tiny_teacher, tmp_path, 2), "eval.scheduler=heun", "bidm.connections=0"])  # no connection
    with pytest.raises(ConfigError, match=r"bidm\.shortcut_init: must be > 0"):
        load_config([*_args(tiny_teacher, tmp_path, 2), "bidm.shortcut_init=0"])
