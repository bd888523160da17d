"""Wiring check of the Inception metrics against the real torch-fidelity network (no pretrained weights needed).

    pip install "diffqat[fid]"      # torch-fidelity + the torchvision matching your torch
    python bench/inception_check.py

The unit tests drive :mod:`train.eval.fidelity` with a small stand-in network because torch-fidelity cannot be
installed next to the CPU torch of CI. This script builds torch-fidelity's own ``FeatureExtractorInceptionV3`` with
random weights (nothing is downloaded), saves them, and runs the real path: ``load_inception`` (safe weights
validation, the sFID hook on ``Mixed_6d.branch1x1``), feature shapes, and ``distribution_metrics`` of an image set
against itself (FID = sFID = 0, precision = recall = 1) and against a shifted set. The numbers mean nothing about image
quality (random weights); the check is that every piece runs on the real network and the identities hold.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def random_inception_weights(path: Path) -> None:
    """A state dict of torch-fidelity's Inception-V3 with random weights (its constructor wants a weights file)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    # Skip the constructor's download and load; keep the freshly initialised parameters.
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    torch.manual_seed(0)
    for m in net.modules():  # He-initialised convs and identity batch norms keep activations alive through the depth
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, path)


def main() -> None:
    from train.eval.fidelity import distribution_metrics, load_inception, reference_statistics

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "inception_random.pth"
        random_inception_weights(weights)
        start = time.time()
        features = load_inception(weights, device=device)
        gen = torch.Generator().manual_seed(0)
        real = torch.rand(64, 3, 32, 32, generator=gen) * 2 - 1
        feats = features(real)
        print({k: tuple(v.shape) for k, v in feats.items()})
        assert feats["pool"].shape == (64, 2048) and feats["spatial"].shape == (64, 7 * 17 * 17)
        assert feats["logits"].shape == (64, 1008)
        ref = reference_statistics(real, features, cache_dir=tmp)
        same = distribution_metrics(real, ref, features, is_splits=4)
        print("set vs itself:", same)
        assert same["fid"] < 1e-3 and same["sfid"] < 1e-3 and same["precision"] == 1 and same["recall"] == 1
        other = distribution_metrics((real * 0.5 + 0.3).clamp(-1, 1), ref, features, is_splits=4)
        print("shifted set:  ", other)
        assert other["fid"] > 0.01 and other["sfid"] > 0.01  # the features see the difference
        gray = distribution_metrics(real[:, :1], real[:, :1].expand(-1, 3, -1, -1), features, is_splits=4)
        assert gray["fid"] < 1e-3  # one-channel images are repeated to RGB
        print(f"ok on {device} ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
