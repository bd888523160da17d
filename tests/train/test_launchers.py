"""The same train.py command under torchrun and accelerate launch (CPU, gloo), as separate processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.conftest import fast_overrides

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _bin(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    assert Path(path).exists(), f"{name} is installed with the project's dependencies"
    return path


@pytest.mark.parametrize("nproc", [1, 2])
def test_torchrun(nproc: int, tiny_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [*fast_overrides(tiny_teacher, out), f"trainer.devices={nproc}", "trainer.strategy=ddp",
            "eval.enabled=true"]
    _run([_bin("torchrun"), f"--nproc_per_node={nproc}", f"--master_port={29530 + nproc}",
          "train.py", "config=efficientdm_digits.yaml", *args], tmp_path)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["train_steps"] == 2 and report["variants"]["qat"]["eps_mse"] > 0


def test_accelerate_launch(tiny_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run([_bin("accelerate"), "launch", "--cpu", "--num_processes=1", "--num_machines=1", "--mixed_precision=no",
          "--dynamo_backend=no", "train.py", "config=efficientdm_digits.yaml", *fast_overrides(tiny_teacher, out)],
         tmp_path)
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "student" / "student.safetensors").is_file()


def test_accelerate_launch_two_processes_sets_layout_and_precision(tiny_teacher: Path, tmp_path: Path) -> None:
    """accelerate's process count and mixed precision become trainer.devices / strategy / precision (gloo on CPU)."""
    out = tmp_path / "run"
    proc = _run([_bin("accelerate"), "launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
                 "--mixed_precision=bf16", "--dynamo_backend=no", "--main_process_port=29535", "train.py",
                 "config=efficientdm_digits.yaml", *fast_overrides(tiny_teacher, out), "trainer.precision=32-true",
                 "export=false"], tmp_path)
    assert "launcher: trainer.precision: '32-true' -> 'bf16-mixed' (accelerate mixed_precision=bf16)" in proc.stdout
    saved = (out / "config.yaml").read_text()
    assert "devices: 2" in saved and "strategy: ddp" in saved and "precision: bf16-mixed" in saved
    assert (out / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "launch" / "accelerate").glob("*.yaml")))
def test_shipped_accelerate_configs_load_and_map(name: str) -> None:
    """Each launch/accelerate config is valid for accelerate and maps onto a supported Lightning setting."""
    from accelerate.commands.config.config_args import ClusterConfig

    from train.config import load_config
    from train.launch import apply_launcher

    cc = ClusterConfig.from_yaml_file(str(REPO / "launch" / "accelerate" / name))
    env = {"ACCELERATE_MIXED_PRECISION": str(cc.mixed_precision), "ACCELERATE_DYNAMO_BACKEND": "no",
           "WORLD_SIZE": str(cc.num_processes), "LOCAL_WORLD_SIZE": str(cc.num_processes // cc.num_machines)}
    if str(cc.distributed_type).endswith("DEEPSPEED"):
        env.update({"ACCELERATE_USE_DEEPSPEED": "true",
                    "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(cc.deepspeed_config["zero_stage"])})
    cfg = load_config(["config=efficientdm_digits.yaml"])
    apply_launcher(cfg, env)
    assert cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.devices * cfg.trainer.num_nodes == cc.num_processes
    expected = f"deepspeed_stage_{cc.deepspeed_config['zero_stage']}" if "deepspeed" in name else "ddp"
    assert cfg.trainer.strategy == expected


def test_evaluate_under_torchrun_matches_one_process(tiny_teacher: Path, tmp_path: Path) -> None:
    """evaluate.py shards the samples over 2 gloo processes and gathers them: the same report as 1 process."""
    from train.cli import main
    from train.eval.cli import main as evaluate_main

    run = main(["config=efficientdm_digits.yaml", *fast_overrides(tiny_teacher, tmp_path / "run"), "export=false"])
    one = evaluate_main([str(run), "eval.num_samples=5", "ptq=false", f"out={tmp_path / 'one'}"])
    _run([_bin("torchrun"), "--nproc_per_node=2", "--master_port=29533", "evaluate.py", str(run),
          "eval.num_samples=5", "ptq=false", f"out={tmp_path / 'two'}"], tmp_path)
    a = json.loads((one / "report.json").read_text())
    b = json.loads((tmp_path / "two" / "report.json").read_text())
    assert a["processes"] == 1 and b["processes"] == 2
    for name in ("fp", "qat"):
        for key, value in a["variants"][name].items():
            assert b["variants"][name][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, key)
