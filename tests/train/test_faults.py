"""Fault injection: a training run killed with SIGKILL in any phase and resumed with ``resume=auto`` in the same
directory ends with the student, report and export of an uninterrupted run, and leaves no stray files behind.

Each run is a child process (``python -m tests.train.faults``, see :mod:`tests.train.faults`) that counts the calls
of every kill point; an armed point kills the child at its n-th call. The straight run, made once, tells how many
calls each phase makes; the kill call is drawn from those with a seeded generator, so it is arbitrary but the same
on every run of the suite, and never depends on timing or load.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from tests.train.conftest import fast_overrides
from tests.train.faults import POINTS, kill_message

ROOT = Path(__file__).resolve().parents[2]
#: seed of the kill-call draws (one ``random.Random(f"{SEED}:{point}")`` per kill point)
SEED = 20250611
STEPS = 3
#: report keys that measure wall-clock time: a resumed run's differs by construction
TIME_FIELD = re.compile(r".*(_time_s|_seconds)")
#: TensorBoard event files are named after the host, the time and the process id, so they are not compared by name
#: (a resumed run adds its own beside the killed process's, as every resume does)
EVENT_FILE = re.compile(r"tensorboard/events\.out\.tfevents\..*")
#: the one file a resume adds by design: its line in resumes.log
RESUME_LOG = "resumes.log"
#: names of unfinished or temporary files (atomic writes use ``<name>.tmp``; tempfile uses ``tmp*``)
TEMPORARY = re.compile(r".*\.tmp|tmp.*|.*\.part(ial)?|.*~|\..*")


def _argv(teacher: Path, out: Path) -> list[str]:
    # cached trajectories (so they are generated), the evaluation (so the report exists) and the export
    return ["config=efficientdm_digits.yaml", *fast_overrides(teacher, out, steps=STEPS),
            "trajectories.mode=cached", "eval.enabled=true", "export=true"]


def _child(argv: list[str], tmpdir: Path, kill: str | None = None,
           counts: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Runs one training child; its own TMPDIR shows what a killed process leaves in the system temp dir."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TMPDIR": str(tmpdir),
           "CUDA_VISIBLE_DEVICES": ""}
    opts = [*(["--kill", kill] if kill else []), *(["--counts", str(counts)] if counts else [])]
    return subprocess.run([sys.executable, "-m", "tests.train.faults", *opts, "--", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _tail(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit status {proc.returncode}; stderr ends:\n{proc.stderr[-3000:]}"


def _files(run: Path) -> set[str]:
    """The run directory's files (relative paths), TensorBoard event files left out."""
    return {f for p in run.rglob("*") if p.is_file() and not EVENT_FILE.fullmatch(f := p.relative_to(run).as_posix())}


@dataclass
class Straight:
    """The uninterrupted run: its directory and the calls each kill point made."""

    run: Path
    calls: dict[str, int]


@pytest.fixture(scope="module")
def straight(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Straight:
    root = tmp_path_factory.mktemp("straight")
    counts = root / "calls.json"
    proc = _child(_argv(tiny_teacher, root / "run"), root / "tmp", counts=counts)
    assert proc.returncode == 0, _tail(proc)
    return Straight(root / "run", json.loads(counts.read_text()))


def _tensor_difference(a: Path, b: Path) -> tuple[float, bool]:
    """Max |a - b| over the tensors of two safetensors files with the same keys, and whether they are bit-equal."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    worst = max((float((ta[k].double() - tb[k].double()).abs().max()) for k in ta if ta[k].numel()), default=0.0)
    return worst, all(ta[k].dtype == tb[k].dtype and ta[k].equal(tb[k]) for k in ta)


def _report_differences(a: Any, b: Any, where: str = "report") -> list[str]:
    """Every place where two report trees differ (floats beyond 1e-6 relative), wall-clock fields left out."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = {k for k in a.keys() | b.keys() if not TIME_FIELD.fullmatch(k)}
        return [d for k in sorted(keys) for d in _report_differences(a.get(k, "<absent>"), b.get(k, "<absent>"),
                                                                     f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in _report_differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) else [f"{where}: {a!r} != {b!r}"]
    return [] if a == b and type(a) is type(b) else [f"{where}: {a!r} != {b!r}"]


def test_the_straight_run_reaches_every_kill_point(straight: Straight) -> None:
    """Each phase under test really runs in the straight run (else its kill test would test nothing), and the run
    writes the student, the report and the export that the kill tests compare."""
    assert set(straight.calls) == set(POINTS)
    assert all(n >= 1 for n in straight.calls.values()), straight.calls
    assert straight.calls["training"] == STEPS
    for name in ("student/student.safetensors", "report.json", "export/unet/diffusion_pytorch_model.safetensors"):
        assert (straight.run / name).is_file(), name
    assert not [f for f in _files(straight.run) if TEMPORARY.fullmatch(Path(f).name)]


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_then_resume_auto_ends_like_the_straight_run(point: str, straight: Straight, tiny_teacher: Path,
                                                             tmp_path: Path) -> None:
    """Killed with SIGKILL at a drawn call of ``point`` (exit status -9, before the run finished), the run resumed
    with ``resume=auto`` in the same directory succeeds and ends with the straight run's student (bit-exact), report
    (every field but wall-clock time), export weights (bit-exact) and export config, and its directory holds
    the straight run's files (plus the resume's log, TensorBoard event files not compared) and no temporary file,
    and the killed process left nothing in the system temp dir."""
    calls = straight.calls[point]
    n = random.Random(f"{SEED}:{point}").randint(1, calls)
    run = tmp_path / "run"
    argv = _argv(tiny_teacher, run)

    killed = _child(argv, tmp_path / "tmp-killed", kill=f"{point}:{n}")
    assert killed.returncode == -9, _tail(killed)
    assert kill_message(point, n) in killed.stderr  # killed by the armed point, not by anything else
    assert not (run / "export" / "README.md").is_file()  # the export's last file: the run did not finish

    resumed = _child([*argv, "resume=auto"], tmp_path / "tmp-resumed")
    assert resumed.returncode == 0, _tail(resumed)

    # Bit-exact, not just close: both runs are the same CPU computation in the same thread count, and a resume
    # restores exact tensors (checkpoint, saved calibration) or recomputes them in the same order.
    worst, exact = _tensor_difference(straight.run / "student" / "student.safetensors",
                                      run / "student" / "student.safetensors")
    assert exact, f"{point} call {n}/{calls}: the resumed student differs from the straight one by up to {worst}"
    report = json.loads((run / "report.json").read_text())
    expected = json.loads((straight.run / "report.json").read_text())
    assert _report_differences(expected, report) == [], f"{point} call {n}/{calls}"
    worst, exact = _tensor_difference(straight.run / "export" / "unet" / "diffusion_pytorch_model.safetensors",
                                      run / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    assert exact, f"{point} call {n}/{calls}: the resumed export differs by up to {worst}"
    assert (json.loads((run / "export" / "unet" / "config.json").read_text())
            == json.loads((straight.run / "export" / "unet" / "config.json").read_text()))

    # Leftovers: the same files as the straight run (a stray checkpoint, shard or half export would show here), and
    # nothing in the killed process's system temp dir (a half-written checkpoint there would never be cleaned up).
    assert sorted(p.name for p in (tmp_path / "tmp-killed").rglob("*")) == []
    files = _files(run)
    extra = sorted(files - _files(straight.run) - {RESUME_LOG})
    missing = sorted(_files(straight.run) - files)
    temporary = sorted(f for f in files if TEMPORARY.fullmatch(Path(f).name))
    assert (extra, missing, temporary) == ([], [], []), f"{point} call {n}/{calls}: extra, missing, temporary files"
