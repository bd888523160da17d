"""``eval.backend``: validated at load, refused by ``train.py``, and applied by ``evaluate.py`` to an export (and to a
student directory through a temporary export), recorded in the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import qat
from tests.train.conftest import fast_overrides
from train.cli import main as train_main
from train.config import ConfigError, load_config
from train.eval.cli import main as evaluate_main
from train.eval.evaluate import generate
from train.models.families import set_family
from train.models.pipeline import to_uint8_nhwc

KNOWN = r"\['fake', 'int8', 'fp8', 'int4wo'\]"


def test_an_unknown_backend_is_refused_at_load_with_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match=rf"eval.backend: 'int9' is not allowed; choose one of {KNOWN}"):
        load_config(["config=efficientdm_digits.yaml", "eval.backend=int9"])
    assert load_config(["config=efficientdm_digits.yaml"]).eval.backend == "fake"


def test_train_refuses_a_runtime_backend_before_writing_anything(tiny_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"eval.backend: 'int8' is for evaluate.py; .* eval.backend=fake .*"
                                          r"evaluate.py .*/export eval.backend=int8"):
        train_main(["config=efficientdm_digits.yaml", *fast_overrides(tiny_teacher, out), "eval.backend=int8"])
    assert not out.exists()


def _evaluate(source: Path, out: Path, *args: str) -> dict:
    evaluate_main([str(source), f"out={out}", "ptq=false", *args])
    return json.loads((out / "report.json").read_text())


def test_evaluate_on_int8_records_the_backend_and_the_layer_counts(tiny_export: dict, tmp_path: Path) -> None:
    fake = _evaluate(tiny_export["export"], tmp_path / "fake")
    n = sum(fake["runtime"]["counts"].values())
    assert fake["runtime"] == {"backend": "fake", "model": "the export's reload", "counts": {"fake": n}}
    report = _evaluate(tiny_export["export"], tmp_path / "int8", "eval.backend=int8")
    runtime = report["runtime"]
    assert runtime["backend"] == "int8" and runtime["counts"]["int8"] > 0 and sum(runtime["counts"].values()) == n
    assert len(runtime["fake"]) == runtime["counts"].get("fake", 0)  # a reason for each module left fake
    assert "QAT variant computed on backend `int8`" in (tmp_path / "int8" / "report.md").read_text()
    qat_fake, qat_int8 = fake["variants"]["qat"], report["variants"]["qat"]
    assert set(qat_int8) == set(qat_fake)
    # the same student on exact integer sums: the held-out eps error barely moves (measured: equal to 8 digits; the
    # 1% allows a flipped activation code, see tests/qat/test_runtime.py)
    assert qat_int8["eps_mse"] == pytest.approx(qat_fake["eps_mse"], rel=1e-2)
    # a student directory is exported into a temporary directory first: the same codes, the same report
    again = _evaluate(tiny_export["student"], tmp_path / "student_int8", "eval.backend=int8")
    assert again["runtime"]["model"] == "the reload of a temporary export of the student"
    assert again["runtime"]["counts"] == runtime["counts"]
    assert again["variants"]["qat"] == qat_int8


def test_the_default_fake_backend_samples_the_export_as_before(tiny_export: dict, tmp_path: Path) -> None:
    """``evaluate.py <export>`` samples ``qat.load_quantized``'s model, bit for bit (the saved uint8 samples)."""
    _evaluate(tiny_export["export"], tmp_path / "ev")
    cfg, teacher = tiny_export["cfg"], tiny_export["teacher"]
    unet = qat.load_quantized(tiny_export["export"] / "unet")
    set_family(unet, teacher.family)
    ev = cfg.eval
    ref = generate(unet, teacher, list(range(ev.num_samples)), scheduler=ev.scheduler, num_steps=ev.sampling_steps,
                   guidance=cfg.trajectories.guidance_scale, eta=ev.eta, seed=ev.seed, batch_size=ev.batch_size)
    with np.load(tmp_path / "ev" / "samples" / "qat.npz") as data:
        assert np.array_equal(data["arr_0"], to_uint8_nhwc(ref.images))
