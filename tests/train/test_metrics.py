"""Metrics against naive references on small inputs, plus a regression check of the shipped digits classifier."""

from __future__ import annotations

import math

import pytest
import torch

from train.eval.digits import DigitsClassifier, load_digits_classifier
from train.eval.metrics import class_accuracy, digits_fd_and_accuracy, extract_features, frechet_distance, psnr, ssim


def _gaussian(n: int, mean: torch.Tensor, std: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return mean + std * torch.randn(n, mean.numel(), generator=g, dtype=torch.float64)


# ---------------------------------------------------------------- Frechet distance


def test_fd_of_a_set_with_itself_is_zero() -> None:
    x = _gaussian(200, torch.zeros(8), torch.linspace(0.5, 2.0, 8), seed=0)
    scale = float(x.var(0).sum())  # a natural size for "relative" to the features' spread
    assert frechet_distance(x, x) / scale < 1e-6


def test_fd_matches_closed_form_for_diagonal_covariances() -> None:
    # With diagonal covariances, (S_a S_b)^{1/2} = diag(sqrt(va vb)), so the trace term is sum (sqrt va - sqrt vb)^2.
    # Compare against the closed form on the *empirical* moments so the check is exact, not statistical.
    a = _gaussian(4000, torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 0.5, 2.0]), seed=1)
    b = _gaussian(3000, torch.tensor([0.5, 1.0, 0.0]), torch.tensor([2.0, 0.5, 1.0]), seed=2)
    # Decorrelate each set exactly (whiten then rescale by the diagonal) so the sample covariance is diagonal.
    def diagonalise(x: torch.Tensor) -> torch.Tensor:
        xc = x - x.mean(0)
        cov = xc.T @ xc / (x.shape[0] - 1)
        w, v = torch.linalg.eigh(cov)
        white = xc @ v @ torch.diag(w.rsqrt()) @ v.T
        return white * x.std(0) + x.mean(0)

    a, b = diagonalise(a), diagonalise(b)
    va, vb = a.var(0), b.var(0)
    expected = float(((a.mean(0) - b.mean(0)) ** 2).sum() + ((va.sqrt() - vb.sqrt()) ** 2).sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # And it is close to the population value: |dmu|^2 = 0.25 + 0 + 4, trace term = 1 + 0 + 1.
    assert frechet_distance(a, b) == pytest.approx(6.25, rel=0.05)


def test_fd_matches_naive_full_covariance_reference() -> None:
    # Naive reference: eigen-decompose the non-symmetric product S_a S_b directly (fine for well-conditioned data).
    mix = torch.randn(5, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a = _gaussian(300, torch.zeros(5), torch.ones(5), seed=3) @ mix  # correlated features
    b = _gaussian(250, torch.ones(5), torch.ones(5), seed=5)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    tr_sqrt = torch.linalg.eigvals(ca @ cb).real.clamp_min(0).sqrt().sum()
    expected = float(((a.mean(0) - b.mean(0)) ** 2).sum() + ca.trace() + cb.trace() - 2 * tr_sqrt)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_fd_is_symmetric_and_handles_rank_deficient_features() -> None:
    a = _gaussian(50, torch.zeros(6), torch.ones(6), seed=6)
    b = _gaussian(40, torch.ones(6), 2 * torch.ones(6), seed=7)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-10)
    # Fewer samples than features and a dead (constant) unit: singular covariances must still give a finite value.
    a_small, b_small = a[:4].clone(), b[:3].clone()
    a_small[:, 0] = 0.0
    value = frechet_distance(a_small, b_small)
    assert math.isfinite(value) and value >= 0.0
    assert value == pytest.approx(frechet_distance(b_small, a_small), rel=1e-8)


def test_fd_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))


# ---------------------------------------------------------------- PSNR / SSIM / accuracy


def test_psnr_identical_is_inf_and_matches_hand_example() -> None:
    # float64 inputs so the reference arithmetic below is not off by float32 rounding of 0.1.
    a = torch.tensor([[[[0.0, 0.5], [-1.0, 1.0]]]], dtype=torch.float64)
    assert psnr(a, a) == math.inf
    b = a + torch.tensor([[[[0.1, -0.1], [0.0, 0.2]]]], dtype=torch.float64)
    mse = (0.01 + 0.01 + 0.0 + 0.04) / 4  # = 0.015
    assert psnr(a, b) == pytest.approx(10 * math.log10(4.0 / mse), rel=1e-9)
    assert psnr(a, b, data_range=1.0) == pytest.approx(10 * math.log10(1.0 / mse), rel=1e-9)


def test_ssim_identical_is_one_and_noise_lowers_it() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-9)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert ssim(x, noisy) < 0.95


def test_class_accuracy_on_known_labels() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    assert class_accuracy(logits, torch.tensor([0, 1, 2, 1])) == pytest.approx(0.75)
    assert class_accuracy(logits, torch.tensor([1, 0, 0, 1])) == 0.0


# ---------------------------------------------------------------- shipped digits classifier


@pytest.fixture(scope="module")
def real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from train.eval.digits import load_digits_tensor

    return load_digits_tensor(16)


@pytest.fixture(scope="module")
def classifier() -> DigitsClassifier:
    return load_digits_classifier()


@pytest.fixture(scope="module")
def real_features(classifier, real_digits) -> tuple[torch.Tensor, torch.Tensor]:
    # Featurise the 1797 real digits once for the whole module (the slowest step of these tests).
    return extract_features(classifier, real_digits[0])


def test_shipped_classifier_accuracy_regression(classifier, real_digits, real_features) -> None:
    images, labels = real_digits
    assert not classifier.training
    feats, logits = real_features
    assert feats.shape == (len(labels), classifier.config["feature_dim"])
    assert logits.shape == (len(labels), 10)
    with torch.no_grad():  # features + head == forward in eval mode
        assert torch.allclose(logits[:64], classifier(images[:64]), atol=1e-5)
    assert class_accuracy(logits, labels) >= 0.95


def test_fd_digits_real_vs_real_is_zero_and_noise_is_far(classifier, real_digits, real_features) -> None:
    images, labels = real_digits
    ref_feats = real_features[0]
    assert frechet_distance(ref_feats, ref_feats) < 1e-6 * max(1.0, float(ref_feats.var(0).sum()))
    noise = torch.rand(256, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    far = digits_fd_and_accuracy(classifier, noise, labels[:256], ref_feats)
    # 256 random real digits are a fair "good model" baseline at the same sample size: noise must be far worse.
    subset = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))[:256]
    near = digits_fd_and_accuracy(classifier, images[subset], labels[subset], images)  # image path, end to end
    assert near["class_acc"] >= 0.95
    assert far["fd"] > 10 * near["fd"]
    assert far["class_acc"] < 0.5


def test_loader_missing_file_names_file_and_command(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json.*python -m train\.tools\.digits_classifier"):
        load_digits_classifier(tmp_path)
