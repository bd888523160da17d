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


def test_evaluate_under_torchrun_matches_one_process(tiny_teacher: Path, tmp_path: Path) -> None:
    """evaluate.py shards the samples over 2 gloo processes and gathers them: the same report as 1 process."""
    from train.cli import main
    from train.eval_cli import main as evaluate_main

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
