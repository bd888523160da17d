"""``qat.runtime.load_pipeline``: an export sampled in a diffusers pipeline on each backend.

A tiny W8A8 ``UNet2DModel`` with temporal activation tables on a 10-step DDIM grid is exported, and a float
``DDIMPipeline`` folder (``model_index.json``) supplies the scheduler. Sampling uses 4 DDIM steps, so two sampler
timesteps fall on the tables' grid and two between rows.

Tolerance of ``int8`` against ``fake`` on the final samples: 5% relative L2, the end-to-end bound of
``tests/qat/test_runtime.py`` (the integer sum is exact, but a last-bit difference of a layer output can move a
downstream activation across a rounding boundary of its quantizer, and in a random tiny UNet such a flip cascades).
Measured here: 6.7e-3 (not tested: fp8 0.15 and int4wo 0.12, which do not compute the fake path's numbers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler
from qat_testutils import ddim_timesteps, tiny_unet

import qat
from qat.prepare import LayerRule, QuantSpec
from qat.quantizers import LSQConfig, TemporalLSQConfig
from qat.runtime import Int8Layer, load_pipeline

GRID = ddim_timesteps(10)  # 901, 801, ..., 1: the tables' rows
STEPS = 4  # DDIM 4 (leading spacing): 751, 501, 251, 1


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The export (tables perturbed so that every row differs) and a float pipeline folder of the same UNet."""
    root = tmp_path_factory.mktemp("runtime_pipeline")
    torch.manual_seed(0)
    model, forward, make_batch = tiny_unet()
    act = TemporalLSQConfig(n_bits=8, learn_offset=True, num_timesteps=len(GRID))
    qat.prepare(model, QuantSpec(rules=[LayerRule(["*"], weight=LSQConfig(n_bits=8, granularity="channel"),
                                                  act=act)]))
    qat.set_timestep_grid(model, GRID)

    def timed(m: torch.nn.Module, batch: tuple) -> torch.Tensor:
        with qat.timestep(m, batch[1]):
            return forward(m, batch)

    qat.calibrate(model, [make_batch(GRID[[0, 4]]), make_batch(GRID[[7, 9]])], timed, max_samples=256)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for q in qat.temporal_quantizers(model):
            q.step.mul_(0.7 + 0.6 * torch.rand(q.step.shape, generator=gen))
    model.eval()
    qat.export_quantized(model, root / "export" / "unet")
    DDIMPipeline(unet=tiny_unet()[0], scheduler=DDIMScheduler(num_train_timesteps=1000, steps_offset=1)
                 ).save_pretrained(str(root / "float"))
    return {"export": root / "export", "float": root / "float", "n_layers": len(qat.quant_layers(model))}


def _sample(pipe: DDIMPipeline) -> np.ndarray:
    """Two samples, ``(2, 8, 8, 3)`` in [0, 1], from the same seed for every pipeline."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS,
                output_type="np", return_dict=False)[0]


def _fake_reload_pipeline(export: dict) -> DDIMPipeline:
    """The path that existed before: ``qat.load_quantized`` + ``qat.attach_timestep_hook`` in the float pipeline."""
    unet = qat.load_quantized(export["export"])
    qat.attach_timestep_hook(unet)
    scheduler = DDIMScheduler.from_pretrained(str(export["float"]), subfolder="scheduler")
    return DDIMPipeline(unet=unet, scheduler=scheduler)


def test_fake_backend_samples_the_fake_reload_bit_for_bit(export: dict) -> None:
    pipe = load_pipeline(export["export"], "fake", teacher=export["float"])
    assert isinstance(pipe, DDIMPipeline) and pipe.unet.runtime_report.counts() == {"fake": export["n_layers"]}
    samples = _sample(pipe)
    assert samples.shape == (2, 8, 8, 3) and float(samples.std()) > 0.01
    assert np.array_equal(samples, _sample(_fake_reload_pipeline(export)))


def test_int8_samples_stay_close_to_the_fake_path(export: dict) -> None:
    pipe = load_pipeline(export["export"], "int8", teacher=export["float"])
    assert pipe.unet.runtime_report.counts() == {"int8": export["n_layers"]}
    assert sum(isinstance(m, Int8Layer) for m in pipe.unet.modules()) == export["n_layers"]
    samples, fake = _sample(pipe), _sample(_fake_reload_pipeline(export))
    assert float(np.linalg.norm(samples - fake) / np.linalg.norm(fake)) <= 0.05


def test_temporal_tables_follow_the_sampler_timesteps(export: dict) -> None:
    """Every denoiser call sets the runtime layers' tables from its own timestep (a grid row or an interpolation),
    in the sampler's order."""
    pipe = load_pipeline(export["export"], "int8", teacher=export["float"])
    quantizer = next(m.act_quantizer for m in pipe.unet.modules() if isinstance(m, Int8Layer))
    seen: list[float] = []
    original = quantizer.set_timestep

    def record(t: torch.Tensor, call: object = None) -> None:
        seen.append(float(t.reshape(-1)[0]))
        original(t, call)

    quantizer.set_timestep = record
    _sample(pipe)
    assert seen == [751.0, 501.0, 251.0, 1.0]


def test_a_loaded_pipeline_gets_its_denoiser_replaced(export: dict) -> None:
    float_pipe = DDIMPipeline.from_pretrained(str(export["float"]))
    pipe = load_pipeline(export["export"], "int8", teacher=float_pipe)
    assert pipe is float_pipe and pipe.unet.runtime_report.counts() == {"int8": export["n_layers"]}
    # the same model as from the folder: the same samples, bit for bit
    assert np.array_equal(_sample(pipe), _sample(load_pipeline(export["export"], "int8", teacher=export["float"])))


def test_what_is_refused_and_why(export: dict, tmp_path: Path) -> None:
    known = r"\['fake', 'int8', 'fp8', 'int4wo'\]"
    with pytest.raises(ValueError, match=rf"unknown backend 'int3'; known backends: {known}"):
        load_pipeline(export["export"], "int3", teacher=export["float"])
    with pytest.raises(FileNotFoundError, match=r"holds no model_index.json: pass teacher=.*load_export_pipeline"):
        load_pipeline(export["export"], "int8")
    with pytest.raises(FileNotFoundError, match=r"teacher=.*model_index.json not found"):
        load_pipeline(export["export"], "int8", teacher=tmp_path)
    with pytest.raises(ValueError, match=r"component='transformer' is not a component of .*\['scheduler', 'unet'\]"):
        load_pipeline(export["export"], "int8", teacher=export["float"], component="transformer")
