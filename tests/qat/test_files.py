"""Weight-file integrity checks (qat/files.py): a complete safetensors file passes; truncated, garbage and
inconsistent ones are named with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qat.files import require_intact, safetensors_problem, save_tensors


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(10.0), "b": torch.ones(3, 4)}, str(path))
    return path


def test_a_complete_file_passes(weights: Path) -> None:
    assert safetensors_problem(weights) is None
    require_intact([weights], "weights")


@pytest.mark.parametrize("keep", [0, 5, 20, -1])
def test_a_truncated_file_is_named(weights: Path, keep: int) -> None:
    data = weights.read_bytes()
    weights.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    problem = safetensors_problem(weights)
    assert problem is not None and str(weights) in problem and "truncated" in problem
    with pytest.raises(ValueError, match=r"teacher weights: .*w\.safetensors is truncated"):
        require_intact([weights], "teacher weights")


def test_garbage_and_extra_bytes_are_corrupt(weights: Path) -> None:
    data = weights.read_bytes()
    weights.write_bytes(data + b"\0")  # more bytes than the header describes
    assert "corrupt" in safetensors_problem(weights)
    n = int.from_bytes(data[:8], "little")
    weights.write_bytes(data[:8] + b"\xff" * n + data[8 + n:])  # the header is no longer JSON
    assert "corrupt" in safetensors_problem(weights)
    assert "does not exist" in safetensors_problem(weights.with_name("missing.safetensors"))


def test_save_tensors_replaces_the_file_whole_or_not_at_all(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import qat.files

    before = weights.read_bytes()

    def dies_halfway(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError("simulated crash while saving")

    monkeypatch.setattr(qat.files, "save_file", dies_halfway)
    with pytest.raises(OSError, match="simulated crash"):
        save_tensors({"a": torch.zeros(2)}, weights)
    assert weights.read_bytes() == before  # the previous file, untouched
    monkeypatch.undo()
    shared = torch.arange(6.0)
    save_tensors({"x": shared, "y": shared, "z": shared[:3]}, weights, metadata={"k": "v"})
    loaded = load_file(str(weights))
    assert torch.equal(loaded["x"], shared) and torch.equal(loaded["y"], shared)
    assert torch.equal(loaded["z"], shared[:3])  # views of one storage are saved as separate tensors
    assert sorted(p.name for p in weights.parent.iterdir()) == [weights.name]  # the failed write's .tmp replaced
