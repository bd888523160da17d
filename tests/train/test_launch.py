"""Launcher settings -> Lightning, 2-process equivalence, preemption, atomic checkpoints, non-finite losses."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from tests.train.conftest import fast_overrides
from tests.train.test_launchers import _bin, _run
from train.callbacks import Preemption
from train.cli import main
from train.config import ConfigError, load_config
from train.launch import apply_launcher, deepspeed_kwargs, launcher_name, trainer_kwargs
from train.system import DistillQATSystem


def _cfg(*overrides: str):
    return load_config(["config=efficientdm_digits.yaml", *overrides])


ACCEL = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_USE_CPU": "False"}


@pytest.mark.parametrize(("env", "expected"), [
    ({**ACCEL, "ACCELERATE_MIXED_PRECISION": "bf16"}, {"precision": "bf16-mixed"}),
    ({**ACCEL, "ACCELERATE_MIXED_PRECISION": "fp16"}, {"precision": "16-mixed"}),
    ({**ACCEL, "ACCELERATE_USE_CPU": "true"}, {"accelerator": "cpu"}),
    ({**ACCEL, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
     {"strategy": "deepspeed_stage_2"}),
    ({**ACCEL, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
      "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, {"strategy": "deepspeed_stage_3_offload"}),
    ({**ACCEL, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "/x/ds.json"},
     {"strategy": "deepspeed_config:/x/ds.json"}),
    ({**ACCEL, "ACCELERATE_GRADIENT_CLIPPING": "1.0"}, {"gradient_clip_val": 1.0}),
    ({**ACCEL, "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "RANK": "5"},
     {"devices": 4, "num_nodes": 2, "strategy": "ddp"}),
    ({"TORCHELASTIC_RUN_ID": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"},
     {"devices": 2, "num_nodes": 1, "strategy": "ddp"}),
    ({"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_JOB_NUM_NODES": "2"},
     {"devices": 4, "num_nodes": 2, "strategy": "ddp"}),
    ({}, {"devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "32-true"}),  # the recipe as written
])
def test_launcher_settings_become_trainer_settings(env: dict, expected: dict) -> None:
    cfg = _cfg()
    notes = apply_launcher(cfg, env)
    for key, value in expected.items():
        assert getattr(cfg.trainer, key) == value, key
    assert len(notes) == sum(1 for k, v in expected.items() if getattr(_cfg().trainer, k) != v)


@pytest.mark.parametrize("omp, cpus, hint", [("1", 64, "OMP_NUM_THREADS=16"), ("16", 64, None), (None, 64, None),
                                             ("1", 4, None)])
def test_one_thread_per_process_is_pointed_out(omp: str | None, cpus: int, hint: str | None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's default of one CPU thread per process is named with the thread count to set instead."""
    monkeypatch.setattr("os.cpu_count", lambda: cpus)
    env = {"TORCHELASTIC_RUN_ID": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    notes = [n for n in apply_launcher(_cfg(), env) if "OMP_NUM_THREADS" in n]
    assert (notes == []) if hint is None else (len(notes) == 1 and hint in notes[0])


def test_launcher_names() -> None:
    assert launcher_name(ACCEL) == "accelerate" and launcher_name({"LOCAL_WORLD_SIZE": "2"}) == "torchrun"
    assert launcher_name({"SLURM_NTASKS": "4"}) == "slurm" and launcher_name({}) == "python"


@pytest.mark.parametrize(("env", "message"), [
    ({**ACCEL, "ACCELERATE_USE_FSDP": "true"}, r"distributed_type FSDP is not supported.*DEEPSPEED"),
    ({**ACCEL, "ACCELERATE_USE_MEGATRON_LM": "true"}, r"Megatron-LM is not supported"),
    ({**ACCEL, "ACCELERATE_MIXED_PRECISION": "fp8"}, r"mixed_precision 'fp8' is not supported"),
    ({**ACCEL, "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, r"dynamo_backend 'inductor' is not supported"),
    ({**ACCEL, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, r"gradient_accumulation_steps 4 .*batch_size"),
    ({**ACCEL, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"}, r"zero_stage '0'"),
])
def test_unsupported_accelerate_settings_are_named(env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_launcher(_cfg(), env)


def test_explicit_devices_that_contradict_the_launcher_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"trainer.devices: 3 but the launcher started 2 process"):
        apply_launcher(_cfg("trainer.devices=3"), {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match=r"trainer.num_nodes: 4 but the launcher started 1 node"):
        apply_launcher(_cfg("trainer.num_nodes=4"), {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
    cfg = _cfg("trainer.devices=2")
    apply_launcher(cfg, {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})  # agreeing settings are fine
    assert cfg.trainer.devices == 2


def test_without_a_launcher_one_process_uses_one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # Lightning would re-run the script on every visible GPU; the setup before fit would not know its rank.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    cfg = _cfg("trainer.devices=auto")
    notes = apply_launcher(cfg, {})
    assert cfg.trainer.devices == 1 and any("no launcher" in n for n in notes)
    with pytest.raises(ConfigError, match=r"trainer.devices=2.*without a launcher.*torchrun --nproc_per_node"):
        apply_launcher(_cfg("trainer.devices=2"), {})
    with pytest.raises(ConfigError, match=r"trainer.num_nodes=2 without a launcher"):
        apply_launcher(_cfg("trainer.num_nodes=2"), {})


def test_trainer_kwargs_are_trainer_arguments() -> None:
    import inspect

    cfg = _cfg()
    apply_launcher(cfg, {**ACCEL, "ACCELERATE_MIXED_PRECISION": "bf16"})
    kwargs = trainer_kwargs(cfg)
    assert kwargs["precision"] == "bf16-mixed" and kwargs["strategy"] == "auto"
    assert set(kwargs) <= set(inspect.signature(L.Trainer.__init__).parameters)


@pytest.mark.parametrize(("name", "expected"), [
    ("deepspeed_stage_1", {"stage": 1, "offload_optimizer": False, "offload_parameters": False}),
    ("deepspeed_stage_2", {"stage": 2, "offload_optimizer": False, "offload_parameters": False}),
    ("deepspeed_stage_2_offload", {"stage": 2, "offload_optimizer": True, "offload_parameters": False}),
    ("deepspeed_stage_3_offload", {"stage": 3, "offload_optimizer": True, "offload_parameters": True}),
])
def test_deepspeed_strategies_carry_the_trajectory_batch(name: str, expected: dict) -> None:
    # Lightning would read the micro batch from the step loader's batch sampler, which it does not have (this
    # failed on 2 H200s before the fix: "'NoneType' object has no attribute 'batch_size'").
    import inspect

    from lightning.pytorch.strategies import DeepSpeedStrategy

    kwargs = deepspeed_kwargs(name, micro_batch=6)
    assert kwargs == {**expected, "logging_batch_size_per_gpu": 6}
    assert set(kwargs) <= set(inspect.signature(DeepSpeedStrategy.__init__).parameters)


def test_deepspeed_config_files_get_the_micro_batch_and_bad_ones_are_named(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2}}')
    assert deepspeed_kwargs(f"deepspeed_config:{path}", 4)["config"] == {
        "zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4}
    path.write_text('{"train_micro_batch_size_per_gpu": 8}')  # the user's own value wins
    assert deepspeed_kwargs(f"deepspeed_config:{path}", 4)["config"]["train_micro_batch_size_per_gpu"] == 8
    with pytest.raises(ConfigError, match=r"cannot read the DeepSpeed config .*missing.json"):
        deepspeed_kwargs(f"deepspeed_config:{tmp_path / 'missing.json'}", 4)
    with pytest.raises(ConfigError, match=r"unknown DeepSpeed strategy 'deepspeed_stage_4'"):
        deepspeed_kwargs("deepspeed_stage_4", 4)


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_teacher: Path, tmp_path: Path) -> None:
    """torchrun (gloo, 2 CPU processes of 2 trajectories) vs 1 process of 4 trajectories: the same trajectories
    (global indices), the same mean loss, DDP's averaged gradients -> the same student up to summation order."""
    steps = 4
    common = ["config=efficientdm_digits.yaml", "trainer.accelerator=cpu", "export=false"]
    one = main([*common, *fast_overrides(tiny_teacher, tmp_path / "one", steps=steps), "trajectories.batch_size=4"])
    two_args = [*common, *fast_overrides(tiny_teacher, tmp_path / "two", steps=steps), "trajectories.batch_size=2",
                "trainer.devices=auto"]
    _run([_bin("torchrun"), "--nproc_per_node=2", "--master_port=29534", "train.py", *two_args], tmp_path)
    a = load_file(str(one / "student" / "student.safetensors"))
    b = load_file(str(tmp_path / "two" / "student" / "student.safetensors"))
    assert a.keys() == b.keys()
    trained = [k for k in a if "lora_B" in k]
    assert any(a[k].abs().sum() > 0 for k in trained)  # training happened
    # Element-wise comparisons are ill-posed under Adam (a gradient near 0 becomes a +-lr step either way), so the
    # stated tolerance is on the whole trained state: ||a - b|| / ||a|| over LoRA and quantizer tensors < 1e-4.
    keys = [k for k in a if a[k].is_floating_point() and ("lora" in k or "quantizer" in k)]
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys) ** 0.5
    norm = sum(float(a[k].double().pow(2).sum()) for k in keys) ** 0.5
    assert diff / norm < 1e-4, diff / norm


class _SendSignal(L.Callback):
    """Sends SIGUSR1 to this process after ``at`` steps, as SLURM's --signal=USR1@T would."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_preemption_saves_stops_and_resume_auto_finishes_identically(tiny_teacher: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    n = 6
    args = ["config=efficientdm_digits.yaml", "trainer.deterministic=true", "export=false",
            "monitor.checkpoint_every_n_steps=100"]
    straight = main([*args, *fast_overrides(tiny_teacher, tmp_path / "straight", steps=n)])
    run = main([*args, *fast_overrides(tiny_teacher, tmp_path / "pre", steps=n), "resume=auto"],
               callbacks=[_SendSignal(at=2)])
    assert "preempted: saved" in capsys.readouterr().out
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert 2 <= ckpt["global_step"] < n  # saved at the signal, not at the end
    assert not (run / "student").exists()  # stopped before the end-of-run work
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.default_int_handler) or callable(
        signal.getsignal(signal.SIGUSR1))
    resumed = main([*args, *fast_overrides(tiny_teacher, tmp_path / "pre", steps=n), "resume=auto"])
    a = load_file(str(straight / "student" / "student.safetensors"))
    b = load_file(str(resumed / "student" / "student.safetensors"))
    worst = max(float((a[key].float() - b[key].float()).abs().max()) for key in a)
    assert worst <= 1e-6, worst


def test_resume_auto_starts_fresh_without_a_checkpoint(tiny_teacher: Path, tmp_path: Path) -> None:
    run = main(["config=efficientdm_digits.yaml", *fast_overrides(tiny_teacher, tmp_path / "r", steps=1),
                "resume=auto", "export=false"])
    assert (run / "checkpoints" / "last.ckpt").is_file()
    with pytest.raises(ConfigError, match="resume: 'last' but .* holds no run"):
        main(["config=efficientdm_digits.yaml", *fast_overrides(tiny_teacher, tmp_path / "fresh", steps=1),
              "resume=last"])


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tiny_teacher: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's checkpoint writer writes ``<name>.partial`` beside the checkpoint and renames it when complete; a
    resume removes a partial file that a killed process left."""
    from train.checkpoints import AtomicCheckpointIO, remove_partial_files

    run = main(["config=efficientdm_digits.yaml", *fast_overrides(tiny_teacher, tmp_path / "r", steps=2),
                "export=false"])
    last = run / "checkpoints" / "last.ckpt"
    before, files = last.read_bytes(), sorted(p.name for p in last.parent.iterdir())
    state = torch.load(last, map_location="cpu", weights_only=True)
    state["global_step"] = 999

    def dies_halfway(obj: object, f: io.BufferedWriter, *args: object, **kwargs: object) -> None:
        f.write(before[: len(before) // 2])
        raise OSError("simulated crash while saving")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="simulated crash"):
        AtomicCheckpointIO().save_checkpoint(state, last)
    monkeypatch.undo()
    assert last.read_bytes() == before
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
    assert remove_partial_files(last.parent) == ["last.ckpt.partial"]
    assert sorted(p.name for p in last.parent.iterdir()) == files


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tiny_teacher: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    original = DistillQATSystem.student_loss

    def nan_at_step_3(self: DistillQATSystem, batch: object):
        loss, per, terms = original(self, batch)
        return (loss * float("nan"), per, terms) if self.global_step == 3 else (loss, per, terms)

    monkeypatch.setattr(DistillQATSystem, "student_loss", nan_at_step_3)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient norm nan \(loss here nan\) at global step 3"):
        main(["config=efficientdm_digits.yaml", *fast_overrides(tiny_teacher, tmp_path / "r", steps=6)])
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3  # the last good step
    assert all(torch.isfinite(v).all() for k, v in ckpt["state_dict"].items() if v.is_floating_point())


_NAN_ON_RANK_1 = """
import sys
from train.cli import main
from train.system import DistillQATSystem

original = DistillQATSystem.student_loss

def nan_on_rank_1_at_step_3(self, batch):
    loss, per, terms = original(self, batch)
    return (loss * float("nan"), per, terms) if self.global_step == 3 and self.global_rank == 1 else (loss, per, terms)

DistillQATSystem.student_loss = nan_on_rank_1_at_step_3
main(sys.argv[1:])
"""


def test_non_finite_loss_on_one_process_stops_every_process_at_that_step(tiny_teacher: Path, tmp_path: Path) -> None:
    """DDP checks the all-reduced gradients (no collective of its own): rank 1's NaN stops rank 0 too."""
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(_NAN_ON_RANK_1)
    args = ["config=efficientdm_digits.yaml", "export=false", "trainer.devices=auto",
            *fast_overrides(tiny_teacher, tmp_path / "r", steps=6)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([_bin("torchrun"), "--nproc_per_node=2", "--master_port=29536", str(script), *args],
                          env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "non-finite gradient norm nan (loss here nan) at global step 3" in out  # rank 1
    assert re.search(r"non-finite gradient norm nan \(loss here \d[^)]*\) at global step 3", out)  # rank 0
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3


def _agreement_worker(rank: int, port: int, out_dir: str) -> None:
    """One of 2 gloo processes: rank 1 receives the signal before its step 2; records every step's decision."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    callback = Preemption("unused.ckpt", signals=())
    trainer = SimpleNamespace(world_size=2)
    callback.on_train_start(trainer, None)
    decisions = []
    for step in range(6):
        if rank == 1 and step == 2:
            callback.received = True
        decisions.append(callback.agreed())
    callback.on_train_end(trainer, None)
    dist.destroy_process_group()
    Path(out_dir, f"{rank}.json").write_text(json.dumps(decisions))


def test_preemption_is_agreed_by_every_process_one_step_later(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_agreement_worker, args=(29537, str(tmp_path)), nprocs=2)
    decisions = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert decisions[0] == decisions[1] == [False, False, False, True, True, True]
