"""Kill points for fault-injection tests: runs ``train.cli.main`` in this process and kills it with SIGKILL at the
n-th call of a chosen point, as a node failure or the out-of-memory killer would.

    python -m tests.train.faults [--kill POINT:N] [--counts FILE] -- key=value ...

Every run installs the same counting wrappers (so a killed, a resumed and a straight run execute the same code);
``--kill`` arms one of them, ``--counts`` writes how often each point was reached (a JSON object) after ``main``
returns, so that a test can draw an arbitrary but reproducible kill call among the calls a phase really makes.

The points (:data:`POINTS`) and where each one kills:

* ``calibration``: before the n-th calibration forward (``train.cli.guided_eps`` inside ``calibrate_student``);
* ``trajectories``: after the n-th cache shard was written to its temporary file, before it is renamed;
* ``training``: at the start of the n-th ``DistillQATSystem.training_step``;
* ``checkpoint``: halfway through the bytes of the n-th checkpoint write (``train.checkpoints.AtomicCheckpointIO``),
  flushed to disk;
* ``evaluation``: before the n-th denoiser call of the final evaluation (``train.cli._report``: sampling and the
  held-out eps-MSE);
* ``export``: before the n-th rename of a finished temporary file into place during ``export_run``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["POINTS", "Probe", "install", "main", "kill_message"]

POINTS = ("calibration", "trajectories", "training", "checkpoint", "evaluation", "export")


def kill_message(point: str, call: int) -> str:
    """The line a killed child prints to stderr just before it kills itself."""
    return f"fault: SIGKILL at {point} call {call}"


class Probe:
    """Counts the calls of one kill point and kills this process at call ``at`` (never when ``at`` is None)."""

    def __init__(self, point: str, at: int | None) -> None:
        self.point, self.at, self.calls = point, at, 0

    def reached(self) -> bool:
        """Counts one call; True when it is the armed one (the caller then finishes its partial work and dies)."""
        self.calls += 1
        return self.calls == self.at

    def die(self) -> NoReturn:
        # stdout and stderr are pipes in the test: flush, or the kill loses what the run printed last
        sys.stdout.flush()
        print(kill_message(self.point, self.calls), file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable: SIGKILL cannot be caught")


def _wrap(owner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replaces ``owner.name`` with ``make(original)``."""
    original = getattr(owner, name)
    setattr(owner, name, functools.wraps(original)(make(original)))


def _gate(owner: Any, name: str) -> Callable[[], bool]:
    """Wraps ``owner.name``; returns a function telling whether a call of it is in progress."""
    depth = [0]

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def gated(*args: Any, **kwargs: Any) -> Any:
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1
        return gated

    _wrap(owner, name, make)
    return lambda: depth[0] > 0


def _before(probe: Probe, inside: Callable[[], bool] = lambda: True
            ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A wrapper factory that kills before the armed call (counting only calls made while ``inside()``)."""
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if inside() and probe.reached():
                probe.die()
            return original(*args, **kwargs)
        return wrapper
    return make


def _install_calibration(probe: Probe) -> None:
    import train.cli as cli

    inside = _gate(cli, "calibrate_student")  # main looks both names up in the module at call time
    _wrap(cli, "guided_eps", _before(probe, inside))


def _install_trajectories(probe: Probe) -> None:
    import train.data.trajectories as trajectories

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def save_file(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)  # the shard's temporary file is complete on disk
            if probe.reached():
                probe.die()
            return result
        return save_file

    _wrap(trajectories, "save_file", make)


def _install_training(probe: Probe) -> None:
    from train.system import DistillQATSystem

    original = DistillQATSystem.training_step

    @functools.wraps(original)
    def training_step(self: DistillQATSystem, batch: Any, batch_idx: int) -> Any:
        if probe.reached():
            probe.die()
        return original(self, batch, batch_idx)

    DistillQATSystem.training_step = training_step


def _install_checkpoint(probe: Probe) -> None:
    import io

    import torch

    from train.checkpoints import AtomicCheckpointIO

    inside = _gate(AtomicCheckpointIO, "save_checkpoint")  # the run's checkpoint writer, not other torch.save

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
            if inside() and probe.reached():
                buffer = io.BytesIO()
                original(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()  # the half reaches the file; Python's buffer would die with the process
                os.fsync(f.fileno())
                probe.die()
            return original(obj, f, *args, **kwargs)
        return save

    _wrap(torch, "save", make)


def _install_evaluation(probe: Probe) -> None:
    import train.cli as cli
    import train.eval.evaluate as evaluate
    import train.models.pipeline as pipeline

    inside = _gate(cli, "_report")  # the evaluation after training, not the FP / PTQ ones before it
    _wrap(pipeline, "guided_eps", _before(probe, inside))  # each sampler step
    _wrap(evaluate, "guided_eps", _before(probe, inside))  # each held-out eps-MSE batch


def _install_export(probe: Probe) -> None:
    import train.export_run as export_run

    inside = _gate(export_run, "export_run")  # main imports it from the module when it exports
    _wrap(os, "replace", _before(probe, inside))


_INSTALLERS: dict[str, Callable[[Probe], None]] = {
    "calibration": _install_calibration, "trajectories": _install_trajectories, "training": _install_training,
    "checkpoint": _install_checkpoint, "evaluation": _install_evaluation, "export": _install_export,
}


def install(kill: tuple[str, int] | None = None) -> dict[str, Probe]:
    """Installs the counting wrapper of every point; ``kill``: ``(point, n)`` arms that point's n-th call."""
    probes = {}
    for point in POINTS:
        probes[point] = Probe(point, kill[1] if kill is not None and kill[0] == point else None)
        _INSTALLERS[point](probes[point])
    return probes


def _kill_spec(text: str) -> tuple[str, int]:
    point, _, n = text.partition(":")
    if point not in POINTS or not n.isdigit() or int(n) < 1:
        raise argparse.ArgumentTypeError(f"expected POINT:N with POINT in {POINTS} and N >= 1, got {text!r}")
    return point, int(n)


def main(args: list[str] | None = None) -> None:
    """Parses the driver's options (before ``--``), installs the probes and runs ``train.cli.main`` on the rest."""
    args = sys.argv[1:] if args is None else args
    split = args.index("--") if "--" in args else len(args)
    parser = argparse.ArgumentParser(prog="python -m tests.train.faults")
    parser.add_argument("--kill", type=_kill_spec, default=None, help="POINT:N, kill at the N-th call of POINT")
    parser.add_argument("--counts", type=Path, default=None, help="write the calls of every point here")
    opts = parser.parse_args(args[:split])
    probes = install(opts.kill)
    from train.cli import main as train_main

    train_main(args[split + 1:])
    if opts.kill is not None:
        raise SystemExit(f"fault: {opts.kill[0]} reached only {probes[opts.kill[0]].calls} calls, "
                         f"fewer than {opts.kill[1]}")
    if opts.counts is not None:
        opts.counts.write_text(json.dumps({p: probe.calls for p, probe in probes.items()}))


if __name__ == "__main__":
    main()
