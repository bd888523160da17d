"""One call from an export to a diffusers pipeline that samples with the quantized denoiser on a runtime backend.

    pipe = qat.runtime.load_pipeline("out/sd15_w4a8", backend="int8", device="cuda", teacher="models/sd15")
    image = pipe("a photo of a cat", num_inference_steps=25).images[0]
    print(pipe.unet.runtime_report)            # which layer runs where, and why the others stay fake

The export directory holds the quantized denoiser (``unet/``, :func:`qat.export_quantized`); every other component
(scheduler, VAE, text encoder, tokenizer, ...) comes from a diffusers pipeline: the float model's pipeline folder
(with ``model_index.json``), a pipeline object already loaded, or the export directory itself when it holds a
``model_index.json``. The denoiser is loaded with :func:`~qat.runtime.load_for_inference` and takes the place of the
pipeline's ``unet`` (or ``transformer``) component; a forward pre-hook (:func:`qat.attach_timestep_hook`) sets the
temporal activation tables from the timestep argument of every denoiser call, so that they follow whatever scheduler
and step count the pipeline samples with (interpolated between table rows off the training grid).

Exports written by DiffQAT's trainer (``unet/``, ``scheduler/``, ``class_embedder/`` or ``prompt_embeds.safetensors``,
``run_config.yaml``; no ``model_index.json``) are conditioned the trainer's way (class labels through a class
embedder, precomputed prompt embeddings); ``train.models.export_pipeline.load_export_pipeline`` builds the trainer's
pipeline for them and passes diffusers pipeline folders on to this function.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from torch import nn

from qat.runtime.convert import load_for_inference
from qat.timestep import attach_timestep_hook, timestep_modules

__all__ = ["DENOISER_COMPONENTS", "load_pipeline"]

#: the pipeline components a denoiser can be, in the order they are looked for
DENOISER_COMPONENTS = ("unet", "transformer")
_INDEX = "model_index.json"


def _source(export_dir: Path, teacher: str | os.PathLike | DiffusionPipeline | None) -> DiffusionPipeline | Path:
    """The pipeline object, or the folder with ``model_index.json``, that supplies the components besides the
    denoiser."""
    if isinstance(teacher, DiffusionPipeline):
        return teacher
    folder = export_dir if teacher is None else Path(teacher)
    if (folder / _INDEX).is_file():
        return folder
    if teacher is None:
        raise FileNotFoundError(
            f"{export_dir} holds no {_INDEX}: pass teacher=<the float model's diffusers pipeline folder (with "
            f"{_INDEX}) or a loaded DiffusionPipeline> for the scheduler, VAE and text encoder. An export of "
            "DiffQAT's trainer (unet/ + scheduler/ + class_embedder/ or prompt_embeds.safetensors) is sampled with "
            "train.models.export_pipeline.load_export_pipeline")
    raise FileNotFoundError(f"teacher={str(teacher)!r}: {folder / _INDEX} not found; give a diffusers pipeline folder "
                            "(save_pretrained of a DiffusionPipeline) or a loaded DiffusionPipeline")


def _component(names: list[str], component: str | None, where: str) -> str:
    """The name of the denoiser among a pipeline's component ``names``."""
    if component is not None:
        if component not in names:
            raise ValueError(f"component={component!r} is not a component of {where}; its components: {names}")
        return component
    for name in DENOISER_COMPONENTS:
        if name in names:
            return name
    raise ValueError(f"{where} has none of the denoiser components {list(DENOISER_COMPONENTS)} (its components: "
                     f"{names}); name the denoiser with component=")


@torch.no_grad()
def load_pipeline(export_dir: str | os.PathLike, backend: str = "fake", device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None, *, teacher: str | os.PathLike | DiffusionPipeline | None = None,
                  component: str | None = None, model: nn.Module | None = None) -> DiffusionPipeline:
    """The diffusers pipeline of ``teacher`` with its denoiser replaced by the export on ``backend``.

    ``backend="fake"`` samples with the fake-quant reload (:func:`qat.load_quantized`) itself, so its samples are
    those of the exported student exactly; ``int8`` / ``fp8`` / ``int4wo`` compute with the runtime layers
    (``docs/runtime.md``: what each computes, which layers stay fake, tolerances).

    Args:
        export_dir: the export (``config.json`` + weights, or the parent directory of a ``unet/`` export).
        backend: one of :data:`~qat.runtime.BACKENDS`.
        device: where the pipeline goes (the denoiser is converted there).
        dtype: compute dtype of the denoiser's float tensors (as :func:`~qat.runtime.load_for_inference`) and the
            ``torch_dtype`` of the components loaded from a pipeline folder; None: float32 denoiser, the folder's
            own dtypes. A pipeline object keeps its components' dtypes.
        teacher: the float model's diffusers pipeline folder (``model_index.json``; its own denoiser is not
            loaded) or a loaded :class:`diffusers.DiffusionPipeline` (its denoiser is replaced in place); None: the
            export directory, which must then hold a ``model_index.json``.
        component: the denoiser's component name; None: the first of :data:`DENOISER_COMPONENTS` the pipeline has.
        model: a float skeleton of the exported architecture (non-diffusers denoisers), as
            :func:`qat.load_quantized`.

    Returns:
        the pipeline on ``device``; ``getattr(pipe, component).runtime_report`` lists where each quantized layer
        runs.

    Raises:
        ValueError: an unknown backend (before anything is loaded), a pipeline without that component, or a model
            the runtime refuses (see :func:`~qat.runtime.to_backend`).
        FileNotFoundError: no pipeline folder to take the other components from.
    """
    export_dir = Path(export_dir)
    source = _source(export_dir, teacher)  # cheap checks first: the loads below take a while
    if isinstance(source, DiffusionPipeline):
        name = _component(sorted(source.components), component, type(source).__name__)
    else:
        index = json.loads((source / _INDEX).read_text())
        name = _component(sorted(k for k in index if not k.startswith("_")), component, str(source / _INDEX))
    denoiser = load_for_inference(export_dir, backend, device, dtype, model=model)
    if timestep_modules(denoiser):
        # diffusers pipelines call the denoiser with the timestep as its second argument or `timestep=`: the hook
        # reads it there, so the tables follow the sampler without a change to the pipeline's loop
        attach_timestep_hook(denoiser)
    if isinstance(source, DiffusionPipeline):
        source.register_modules(**{name: denoiser})
        pipe = source
    else:
        kwargs = {} if dtype is None else {"torch_dtype": dtype}  # (the name every supported diffusers takes)
        pipe = DiffusionPipeline.from_pretrained(str(source), **kwargs, **{name: denoiser})
    return pipe.to(device)
