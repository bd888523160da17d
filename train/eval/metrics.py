"""Image-quality and distribution metrics for comparing teacher and (quantized) student samples.

Pixel metrics (``psnr``, ``ssim``) compare a student sample with the teacher sample drawn from the same noise and
label, so they measure how far quantization moves each trajectory. Distribution metrics compare sets:
``frechet_distance`` is the FID formula on any features, and ``digits_fd_and_accuracy`` applies it to the
penultimate features of ``train.eval.digits.DigitsClassifier`` ("FD-digits"), since Inception weights are unavailable
offline and meaningless for 16x16 one-channel digits.

All image inputs default to the diffusion range ``[-1, 1]``, i.e. ``data_range = 2``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "class_accuracy",
    "digits_fd_and_accuracy",
    "extract_features",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "mean_and_cov",
    "psnr",
    "ssim",
]


def psnr(a: Tensor, b: Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio over all elements of two equally shaped tensors.

    ``PSNR = 10 log10(data_range^2 / MSE)`` with ``MSE = mean((a - b)^2)`` over every element (the whole batch
    at once, not averaged per image).

    Args:
        a: Images of any shape, e.g. ``(B, C, H, W)``.
        b: Images of the same shape as ``a``.
        data_range: ``max - min`` of the value range (2 for ``[-1, 1]``).

    Returns:
        PSNR in dB; ``inf`` when ``a`` and ``b`` are identical.
    """
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    # float64 so that tiny differences between near-identical samples do not round to zero MSE.
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def ssim(a: Tensor, b: Tensor, data_range: float = 2.0) -> float:
    """Mean structural similarity (Wang et al., 2004) of two image batches.

    Uses ``torchmetrics.functional.structural_similarity_index_measure`` with its defaults (11x11 Gaussian window,
    sigma 1.5, ``K1 = 0.01``, ``K2 = 0.03``), averaged over the batch.

    Args:
        a: Images of shape ``(B, C, H, W)``; H and W must be at least 11 for the default window.
        b: Images of the same shape as ``a``.
        data_range: ``max - min`` of the value range (2 for ``[-1, 1]``).

    Returns:
        Mean SSIM, 1.0 for identical images.
    """
    from torchmetrics.functional import structural_similarity_index_measure

    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    value = structural_similarity_index_measure(a.double(), b.double(), data_range=data_range)
    return float(value)


def mean_and_cov(feats: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(F,)`` and unbiased covariance ``(F, F)`` of an ``(N, F)`` feature matrix, in float64."""
    x = np.asarray(feats.detach().cpu().double() if isinstance(feats, Tensor) else feats, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"frechet_distance: need a (N, F) feature matrix with N >= 2, got shape {x.shape}")
    # Unbiased (N - 1) covariance, as in the reference FID implementation.
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _sym_sqrt(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix; tiny negative eigenvalues (rounding) become 0."""
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula).

    .. math::
        d^2 = \\lVert \\mu_a - \\mu_b \\rVert^2 + \\operatorname{Tr}\\big(S_a + S_b - 2 (S_a S_b)^{1/2}\\big)

    The trace of the non-symmetric ``(S_a S_b)^{1/2}`` is computed as
    ``Tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}) = sum_i sqrt(lambda_i)``: the two products are similar matrices, so they
    share eigenvalues, but the second is symmetric PSD, so a symmetric eigensolver gives real, non-negative
    eigenvalues without the complex round-off that ``sqrtm`` of the raw product produces for (near-)singular
    covariances, e.g. when N < F or features contain dead ReLU units. Everything runs in float64.

    Args:
        feats_a: Features of shape ``(N, F)``, ``N >= 2``.
        feats_b: Features of shape ``(M, F)``, ``M >= 2``.

    Returns:
        The squared Frechet distance ``d^2`` (non-negative; FID reports this quantity without a square root).
    """
    return frechet_distance_from_statistics(*mean_and_cov(feats_a), *mean_and_cov(feats_b))


def frechet_distance_from_statistics(mu_a: np.ndarray | Tensor, sigma_a: np.ndarray | Tensor,
                                     mu_b: np.ndarray | Tensor, sigma_b: np.ndarray | Tensor) -> float:
    """Frechet distance between two Gaussians given by their statistics (FID / sFID from cached moments).

    .. math::
        d^2 = \\lVert \\mu_a - \\mu_b \\rVert^2 + \\operatorname{Tr}\\big(\\Sigma_a + \\Sigma_b
              - 2 (\\Sigma_a^{1/2} \\Sigma_b \\Sigma_a^{1/2})^{1/2}\\big)

    Same formula and numerics as :func:`frechet_distance` (which takes feature matrices): the trace of
    the square root is taken from the eigenvalues of the symmetric PSD product, everything in float64. It exists so
    that FID can use precomputed reference statistics (ADM ``.npz`` files, the on-disk cache) without features.

    Args:
        mu_a: Mean of shape ``(F,)``.
        sigma_a: Covariance of shape ``(F, F)``.
        mu_b: Mean of shape ``(F,)``.
        sigma_b: Covariance of shape ``(F, F)``.

    Returns:
        The squared Frechet distance ``d^2`` (FID reports it without a square root), never negative.
    """
    def f64(x: np.ndarray | Tensor) -> np.ndarray:
        return np.asarray(x.detach().cpu().double() if isinstance(x, Tensor) else x, dtype=np.float64)

    mu_a, mu_b, sigma_a, sigma_b = f64(mu_a).reshape(-1), f64(mu_b).reshape(-1), f64(sigma_a), f64(sigma_b)
    f = mu_a.shape[0]
    if mu_b.shape != (f,) or sigma_a.shape != (f, f) or sigma_b.shape != (f, f):
        raise ValueError(f"frechet_distance_from_statistics: inconsistent shapes mu_a {mu_a.shape}, sigma_a "
                         f"{sigma_a.shape}, mu_b {mu_b.shape}, sigma_b {sigma_b.shape}")
    sqrt_a = _sym_sqrt(sigma_a)
    inner = sqrt_a @ sigma_b @ sqrt_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2.0), 0.0, None)).sum()
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_covmean
    return float(max(value, 0.0))  # rounding can go slightly negative for identical statistics


def class_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy: fraction of rows whose argmax equals the label.

    Args:
        logits: Scores of shape ``(N, C)``.
        labels: Integer class indices of shape ``(N,)``.

    Returns:
        Accuracy in ``[0, 1]``.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"class_accuracy: expected (N, C) logits and (N,) labels, got {tuple(logits.shape)}, "
                         f"{tuple(labels.shape)}")
    return (logits.argmax(dim=1) == labels.to(logits.device)).double().mean().item()


@torch.no_grad()
def extract_features(classifier: nn.Module, images: Tensor, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """Penultimate features and logits of ``images`` in eval mode, batch by batch.

    Args:
        classifier: A ``DigitsClassifier`` (anything with ``features`` and ``head``-style ``forward``).
        images: Shape ``(N, 1, 16, 16)``, values in ``[-1, 1]``.
        batch_size: Images per forward pass (bounds memory only; results do not depend on it).

    Returns:
        features ``(N, F)`` and logits ``(N, num_classes)``, float32 on the CPU.
    """
    was_training = classifier.training
    classifier.eval()  # dropout off, so features are deterministic
    device = next(classifier.parameters()).device
    feats, logits = [], []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(device=device, dtype=torch.float32)
            f = classifier.features(x)
            # Reuse the features for the logits instead of a second pass through the conv stack.
            head = getattr(classifier, "head", None)
            logits.append((head(f) if head is not None else classifier(x)).cpu())
            feats.append(f.cpu())
    finally:
        classifier.train(was_training)
    return torch.cat(feats), torch.cat(logits)


def digits_fd_and_accuracy(
    classifier: nn.Module,
    samples: Tensor,
    labels: Tensor,
    reference_images: Tensor,
    batch_size: int = 512,
) -> dict[str, float]:
    """FD-digits and class accuracy of generated digits.

    ``fd = frechet_distance(features(samples), features(reference_images))`` with the classifier's penultimate
    features, and ``class_acc`` = fraction of samples the classifier assigns to the label they were generated for.

    Args:
        classifier: The digits classifier (``train.tools.digits_classifier.load_digits_classifier()``).
        samples: Generated images of shape ``(N, 1, 16, 16)`` in ``[-1, 1]`` (clamp sampler output first).
        labels: Conditioning labels of the samples, shape ``(N,)``.
        reference_images: Real digits of shape ``(M, 1, 16, 16)`` in ``[-1, 1]``, e.g.
            ``train.tools.digits_teacher.load_digits_tensor(16)[0]``; or their precomputed features ``(M, F)`` from
            :func:`extract_features`, so that an evaluation loop featurises the fixed real set only once.
        batch_size: Images per classifier forward pass.

    Returns:
        ``{"fd": float, "class_acc": float}``.
    """
    sample_feats, sample_logits = extract_features(classifier, samples, batch_size)
    if reference_images.ndim == 2:
        ref_feats = reference_images
    else:
        ref_feats, _ = extract_features(classifier, reference_images, batch_size)
    return {
        "fd": frechet_distance(sample_feats, ref_feats),
        "class_acc": class_accuracy(sample_logits, labels),
    }
