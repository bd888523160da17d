"""The digits domain of the embedded teacher: real digits and the classifier behind FD-digits.

Inception-v3 weights (FID, Inception Score) are not available offline and are meaningless on 16x16 one-channel
digits anyway, so :mod:`train.eval.metrics` scores samples of the embedded digits teacher with a small CNN instead:

- ``features(x)`` (the 64-d penultimate layer) feeds the Frechet distance "FD-digits" (FID with this net
  standing in for Inception);
- ``forward(x)`` logits give the class accuracy of class-conditional samples (does a "7" look like a 7?).

The shipped weights (``assets/digits_classifier``) are trained by ``python -m train.tools.digits_classifier``; the
real digits (:func:`load_digits_tensor`) are scikit-learn's bundled 1797 images, no download.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DEFAULT_PATH", "IMAGE_SIZE", "DigitsClassifier", "load_digits_classifier", "load_digits_tensor",
           "resolve_path"]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PATH = "assets/digits_classifier"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
REGEN_COMMAND = "python -m train.tools.digits_classifier --output assets/digits_classifier --seed 0"
IMAGE_SIZE = 16


def load_digits_tensor(size: int = IMAGE_SIZE) -> tuple[Tensor, Tensor]:
    """Load scikit-learn's handwritten digits as a diffusion-ready image tensor.

    Args:
        size: Output side length; the 8x8 originals are resized with bilinear interpolation
            (``align_corners=False``). ``size=8`` returns the originals unchanged apart from scaling.

    Returns:
        images: Float32 tensor of shape ``(N, 1, size, size)`` with values in ``[-1, 1]`` (N = 1797).
        labels: Int64 tensor of shape ``(N,)`` with values in ``0 .. 9``.
    """
    # Imported here so that importing this module (e.g. for ``build_unet``) does not pull in scikit-learn.
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None]  # (N, 1, 8, 8), values 0..16
    images = images / 8.0 - 1.0  # [0, 16] -> [-1, 1]
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    # Bilinear weights are a convex combination, so the range is preserved; the clamp only guards rounding.
    images = images.clamp(-1.0, 1.0).contiguous()
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    return images, labels


class DigitsClassifier(nn.Module):
    """Two conv stages and a 64-unit hidden layer for ``(B, 1, 16, 16)`` digits in ``[-1, 1]``.

    Layout: ``[conv3x3(c1) -> ReLU] x2 -> maxpool2 -> [conv3x3(c2) -> ReLU] x2 -> maxpool2 -> flatten
    (c2 * 4 * 4) -> linear(feature_dim) -> ReLU -> dropout -> linear(num_classes)``.

    No normalisation layers: the features must be a deterministic function of a single image, independent of
    batch composition, so that the Frechet distance does not depend on how samples are batched.

    Args:
        channels: Output channels ``(c1, c2)`` of the two conv stages.
        feature_dim: Width ``F`` of the penultimate layer returned by :meth:`features`.
        num_classes: Number of output logits.
        dropout: Dropout probability before the last layer (training only).
        image_size: Input side length; must be divisible by 4.
    """

    def __init__(
        self,
        channels: tuple[int, int] = (32, 64),
        feature_dim: int = 64,
        num_classes: int = 10,
        dropout: float = 0.3,
        image_size: int = 16,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.config = {
            "channels": [c1, c2],
            "feature_dim": feature_dim,
            "num_classes": num_classes,
            "dropout": dropout,
            "image_size": image_size,
        }
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.hidden = nn.Linear(c2 * (image_size // 4) ** 2, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (the input of the final linear layer).

        Args:
            x: Images of shape ``(B, 1, H, W)`` with values in ``[-1, 1]``.

        Returns:
            Tensor of shape ``(B, feature_dim)`` (post-ReLU, so non-negative).
        """
        return F.relu(self.hidden(self.conv(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of shape ``(B, num_classes)`` for images ``x`` of shape ``(B, 1, H, W)``."""
        return self.head(self.dropout(self.features(x)))


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as given if it exists (or is absolute), else relative to the repository root."""
    p = Path(os.path.expanduser(str(path)))
    if p.exists() or p.is_absolute():
        return p
    return REPO_ROOT / p


def load_digits_classifier(path: str | os.PathLike[str] = DEFAULT_PATH) -> DigitsClassifier:
    """Load the shipped (or a regenerated) classifier in eval mode on the CPU.

    Args:
        path: Directory with ``config.json`` and ``model.safetensors``. A relative path that does not exist
            relative to the working directory is resolved against the repository root.

    Raises:
        FileNotFoundError: If either file is missing; the message names the file and the regeneration command.
    """
    from safetensors.torch import load_file

    root = resolve_path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"Digits classifier file not found: {root / name}. Regenerate it with: {REGEN_COMMAND}"
            )
    config = json.loads((root / CONFIG_NAME).read_text())
    model = DigitsClassifier(
        channels=tuple(config["channels"]),
        feature_dim=config["feature_dim"],
        num_classes=config["num_classes"],
        dropout=config.get("dropout", 0.0),
        image_size=config.get("image_size", 16),
    )
    model.load_state_dict(load_file(str(root / WEIGHTS_NAME)))
    return model.eval()
