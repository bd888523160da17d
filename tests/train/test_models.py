"""Behaviour of ``ClassEmbedder``, the digits data loader and the shipped ``assets/digits_teacher`` artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from train.eval.digits import load_digits_tensor
from train.models.class_embedder import ClassEmbedder
from train.tools.digits_teacher import EMBED_DIM, NUM_CLASSES

TEACHER_DIR = Path(__file__).resolve().parents[2] / "assets" / "digits_teacher"


def test_class_embedder_shape_and_null_label() -> None:
    embedder = ClassEmbedder(num_classes=10, embed_dim=16)
    assert embedder.null_label == 10
    # The null class is a real row of the table (LDM layout: num_classes + 1 rows).
    assert embedder.embedding.weight.shape == (11, 16)
    labels = torch.tensor([0, 9, embedder.null_label])
    context = embedder(labels)
    assert context.shape == (3, 1, 16)
    torch.testing.assert_close(context[2, 0], embedder.embedding.weight[10])
    nulls = embedder.null_labels(4)
    assert nulls.dtype == torch.long and nulls.tolist() == [10, 10, 10, 10]


def test_class_embedder_ldm_defaults() -> None:
    embedder = ClassEmbedder()
    assert embedder.null_label == 1000
    assert list(embedder.state_dict()) == ["embedding.weight"]
    assert embedder.embedding.weight.shape == (1001, 512)


def test_class_embedder_rejects_non_1d_labels() -> None:
    with pytest.raises(ValueError):
        ClassEmbedder(num_classes=3, embed_dim=4)(torch.zeros(2, 1, dtype=torch.long))


def test_class_embedder_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    embedder = ClassEmbedder(num_classes=7, embed_dim=12)
    embedder.save_pretrained(tmp_path / "class_embedder")
    loaded = ClassEmbedder.from_pretrained(tmp_path, subfolder="class_embedder")
    assert loaded.config.num_classes == 7 and loaded.config.embed_dim == 12
    labels = torch.arange(8)
    torch.testing.assert_close(loaded(labels), embedder(labels), rtol=0, atol=0)


def test_load_digits_tensor_shape_and_range() -> None:
    images, labels = load_digits_tensor(size=16)
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.long
    assert images.min() >= -1.0 and images.max() <= 1.0
    # The full range is used: background pixels are exactly -1, stroke centres reach +1.
    assert images.min() == -1.0 and images.max() == 1.0
    assert sorted(labels.unique().tolist()) == list(range(10))


def test_load_digits_tensor_native_size_is_scaled_original() -> None:
    images, _ = load_digits_tensor(size=8)
    assert images.shape == (1797, 1, 8, 8)
    # Values 0..16 map to k / 8 - 1, a grid of 17 levels.
    levels = (images + 1.0) * 8.0
    torch.testing.assert_close(levels, levels.round())


def test_shipped_teacher_loads_and_runs() -> None:
    # No skip when missing: the artifacts are part of the repository (python -m train.tools.digits_teacher).
    assert (TEACHER_DIR / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    unet = UNet2DConditionModel.from_pretrained(TEACHER_DIR, subfolder="unet").eval()
    embedder = ClassEmbedder.from_pretrained(TEACHER_DIR, subfolder="class_embedder").eval()
    scheduler = DDPMScheduler.from_pretrained(TEACHER_DIR, subfolder="scheduler")

    assert embedder.config.num_classes == NUM_CLASSES and embedder.null_label == NUM_CLASSES
    assert embedder.embed_dim == EMBED_DIM == unet.config.cross_attention_dim
    assert unet.config.in_channels == unet.config.out_channels == 1
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.prediction_type == "epsilon"

    size = unet.config.sample_size
    x = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    context = embedder(torch.tensor([3, embedder.null_label]))
    with torch.no_grad():
        eps = unet(x, torch.tensor([10, 900]), encoder_hidden_states=context).sample
    assert eps.shape == (2, 1, size, size)
    assert torch.isfinite(eps).all()
