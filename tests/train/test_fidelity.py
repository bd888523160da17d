"""Inception distribution metrics against naive references, with a tiny fake torch-fidelity network (no weights,
no torch-fidelity, no network access)."""

from __future__ import annotations

import math
import sys
import types
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from train.eval.fidelity import (
    INCEPTION_WEIGHTS_FILE,
    InceptionFeatures,
    ReferenceStatistics,
    distribution_metrics,
    frechet_distance_from_statistics,
    inception_score,
    load_inception,
    precision_recall,
    reference_statistics,
    to_uint8_rgb,
)
from train.eval.metrics import frechet_distance


class FakeInception(nn.Module):
    """torch-fidelity-like: uint8 ``(B, 3, H, W)`` in, ``(pool, logits)`` out, with a ``Mixed_6d.branch1x1`` map
    ``(B, 192, S, S)``. Records its inputs and spatial maps so the tests can check what the wrapper did."""

    def __init__(self, name: str = "inception-v3-compat", features_list: tuple[str, ...] = ("2048", "logits_unbiased"),
                 feature_extractor_weights_path: str | None = None, *, spatial_size: int = 17, pool_dim: int = 2048,
                 num_classes: int = 1008, seed: int = 0) -> None:
        super().__init__()
        self.spatial_size = spatial_size
        self.Mixed_6d = nn.Module()
        self.Mixed_6d.branch1x1 = nn.Sequential(nn.Conv2d(3, 192, 3, padding=1), nn.ReLU())
        self.pool_proj = nn.Linear(192, pool_dim)
        self.fc = nn.Linear(pool_dim, num_classes, bias=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.loaded_from = feature_extractor_weights_path
        if feature_extractor_weights_path is not None:
            # torch-fidelity uses weights_only=False here; loading with True proves the file it gets is a clean pickle.
            self.load_state_dict(torch.load(feature_extractor_weights_path, weights_only=True))
        self.calls = 0
        self.inputs: list[torch.Tensor] = []
        self.spatial_maps: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3
        self.calls += 1
        self.inputs.append(x.clone())
        h = F.interpolate(x.float() / 127.5 - 1.0, size=(self.spatial_size,) * 2, mode="bilinear", align_corners=False)
        s = self.Mixed_6d.branch1x1(h)
        self.spatial_maps.append(s.detach().clone())
        pool = self.pool_proj(s.mean(dim=(2, 3)))
        return pool, self.fc(pool)


def small_fake(seed: int = 0) -> FakeInception:
    # Small feature widths keep the float64 eigendecompositions of the Frechet distance fast.
    return FakeInception(spatial_size=3, pool_dim=16, num_classes=10, seed=seed)


def _images(n: int, seed: int, channels: int = 3, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


# ---------------------------------------------------------------- Inception Score


def naive_inception_score(logits: torch.Tensor, splits: int) -> tuple[float, float]:
    n = logits.shape[0]
    rows = [[float(v) for v in row] for row in logits.double()]
    probs = []
    for row in rows:
        e = [math.exp(v - max(row)) for v in row]
        probs.append([v / sum(e) for v in e])
    scores = []
    for s in range(splits):
        part = probs[s * n // splits : (s + 1) * n // splits]
        marginal = [sum(p[c] for p in part) / len(part) for c in range(len(part[0]))]
        kl = [sum(p[c] * math.log(p[c] / marginal[c]) for c in range(len(p)) if p[c] > 0) for p in part]
        scores.append(math.exp(sum(kl) / len(kl)))
    mean = sum(scores) / splits
    return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / splits)


def test_is_of_uniform_one_hot_predictions_is_the_number_of_classes() -> None:
    num_classes, splits = 7, 3
    labels = torch.arange(num_classes * splits) % num_classes  # every split holds each class once
    logits = F.one_hot(labels, num_classes).double() * 800  # exp(-800) underflows: exactly one-hot softmax
    mean, std = inception_score(logits, splits=splits)
    assert mean == pytest.approx(num_classes, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_is_of_constant_predictions_is_one() -> None:
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(0)).repeat(30, 1)
    mean, std = inception_score(logits, splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("splits", [1, 3, 20])
def test_is_matches_naive_loop_on_random_logits(splits: int) -> None:
    logits = torch.randn(20, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    mean, std = inception_score(logits, splits=splits)  # splits=3 gives uneven chunks of 6, 7, 7
    ref_mean, ref_std = naive_inception_score(logits, splits)
    assert mean == pytest.approx(ref_mean, rel=1e-10)
    assert std == pytest.approx(ref_std, rel=1e-8, abs=1e-12)
    assert 1.0 <= mean <= 6.0
    assert inception_score(logits.numpy(), splits=splits) == (mean, std)


def test_is_rejects_more_splits_than_samples() -> None:
    with pytest.raises(ValueError, match="splits"):
        inception_score(torch.zeros(4, 3), splits=5)


# ---------------------------------------------------------------- precision / recall


def naive_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int) -> tuple[float, float]:
    def dist(a: torch.Tensor, b: torch.Tensor) -> float:
        return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))

    def radii(x: torch.Tensor) -> list[float]:
        return [sorted(dist(x[i], x[j]) for j in range(len(x)) if j != i)[k - 1] for i in range(len(x))]

    r_real, r_fake = radii(real), radii(fake)
    precision = sum(any(dist(f, real[i]) <= r_real[i] for i in range(len(real))) for f in fake) / len(fake)
    recall = sum(any(dist(r, fake[j]) <= r_fake[j] for j in range(len(fake))) for r in real) / len(real)
    return precision, recall


def test_pr_of_identical_sets_is_one() -> None:
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone(), k=3) == (1.0, 1.0)


def test_pr_of_far_apart_sets_is_zero() -> None:
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(30, 4, generator=g), torch.randn(25, 4, generator=g) + 100
    assert precision_recall(real, fake, k=3) == (0.0, 0.0)


@pytest.mark.parametrize("k", [1, 3])
def test_pr_matches_naive_double_loop(k: int) -> None:
    g = torch.Generator().manual_seed(2)
    real = torch.randn(30, 5, generator=g, dtype=torch.float64)
    fake = torch.randn(23, 5, generator=g, dtype=torch.float64) * 1.3 + 0.6  # wider and shifted: partial overlap
    expected = naive_precision_recall(real, fake, k)
    assert all(0.0 < v < 1.0 for v in expected)  # otherwise the comparison would be weak
    assert precision_recall(real, fake, k=k) == pytest.approx(expected, abs=1e-12)
    assert precision_recall(real.numpy(), fake.float(), k=k) == pytest.approx(expected, abs=1e-12)


def test_pr_does_not_depend_on_batch_size() -> None:
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(37, 4, generator=g), torch.randn(29, 4, generator=g) * 1.5 + 0.5
    results = {bs: precision_recall(real, fake, k=3, batch_size=bs) for bs in (1, 4, 7, 1000)}
    assert len(set(results.values())) == 1, results


def test_pr_rejects_sets_not_larger_than_k() -> None:
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(torch.randn(3, 2), torch.randn(10, 2), k=3)


# ---------------------------------------------------------------- Frechet distance from statistics


def test_fd_from_statistics_matches_fd_from_features() -> None:
    g = torch.Generator().manual_seed(4)
    a = torch.randn(200, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    b = torch.randn(150, 5, generator=g, dtype=torch.float64) + 0.5
    stats = [(x.mean(0), torch.cov(x.T)) for x in (a, b)]
    assert frechet_distance_from_statistics(*stats[0], *stats[1]) == pytest.approx(frechet_distance(a, b), rel=1e-10)
    # Against a zero covariance the square-root term vanishes: d^2 = |mu_a - mu_b|^2 + Tr(S_a).
    mu_b = torch.arange(5.0, dtype=torch.float64)
    expected = float(((stats[0][0] - mu_b) ** 2).sum() + stats[0][1].trace())
    value = frechet_distance_from_statistics(stats[0][0].numpy(), stats[0][1].numpy(), mu_b, torch.zeros(5, 5))
    assert value == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance_from_statistics(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- InceptionFeatures wrapper


def test_wrapper_shapes_and_spatial_features_in_tf_order() -> None:
    net = FakeInception()
    images = _images(5, seed=0, size=12)
    out = InceptionFeatures(net, batch_size=2)(images)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"pool": (5, 2048), "spatial": (5, 7 * 17 * 17),
                                                          "logits": (5, 1008)}
    assert all(v.dtype == torch.float32 for v in out.values())
    assert net.calls == 3  # batches of 2, 2, 1
    maps = torch.cat(net.spatial_maps)  # (5, 192, 17, 17) as the hooked module produced them
    expected = torch.empty(5, 7 * 17 * 17)
    for b in range(5):
        for h in range(17):
            for w in range(17):
                for c in range(7):
                    expected[b, (h * 17 + w) * 7 + c] = maps[b, c, h, w]
    assert torch.equal(out["spatial"], expected)


def test_uint8_conversion_matches_hand_computation() -> None:
    values = torch.tensor([-1.0, -0.5, 0.3, 1.0, 1.7, -2.2])
    # (x + 1) * 127.5 = 0, 63.75, 165.75, 255, 344.25 -> 255, -153 -> 0
    expected = torch.tensor([0, 64, 166, 255, 255, 0], dtype=torch.uint8)
    rgb = values.reshape(1, 3, 1, 2)
    assert torch.equal(to_uint8_rgb(rgb).reshape(-1), expected)
    net = FakeInception(spatial_size=3)
    InceptionFeatures(net)(rgb)
    assert torch.equal(net.inputs[0].reshape(-1), expected)
    # Grayscale: the single channel is converted once and repeated to three identical channels.
    gray = values.reshape(1, 1, 2, 3)
    InceptionFeatures(net)(gray)
    seen = net.inputs[1]
    assert seen.shape == (1, 3, 2, 3)
    for c in range(3):
        assert torch.equal(seen[0, c].reshape(-1), expected)
    # uint8 input passes through unchanged.
    u8 = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(to_uint8_rgb(u8), u8)


def test_wrapper_grayscale_equals_repeated_rgb_and_batching_is_irrelevant() -> None:
    net = small_fake()
    gray = _images(6, seed=1, channels=1)
    a = InceptionFeatures(net, batch_size=4)(gray)
    b = InceptionFeatures(net, batch_size=1)(gray.repeat(1, 3, 1, 1))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)


def test_wrapper_rejects_bad_inputs_and_networks() -> None:
    features = InceptionFeatures(small_fake())
    with pytest.raises(ValueError, match="NaN"):
        features(torch.full((1, 3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match=r"C in \{1, 3\}"):
        features(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="Mixed_6d.branch1x1"):
        InceptionFeatures(nn.Linear(2, 2))


# ---------------------------------------------------------------- distribution_metrics and the reference cache


def test_set_against_itself() -> None:
    net = small_fake()
    features = InceptionFeatures(net, batch_size=8)
    images = _images(24, seed=2)
    out = distribution_metrics(images, images.clone(), features, is_splits=2)
    assert set(out) == {"fid", "sfid", "is", "is_std", "precision", "recall"}
    feats = features(images)
    assert out["fid"] / float(feats["pool"].double().var(0).sum()) < 1e-9
    assert out["sfid"] / float(feats["spatial"].double().var(0).sum()) < 1e-9
    assert out["precision"] == out["recall"] == 1.0
    assert (out["is"], out["is_std"]) == pytest.approx(naive_inception_score(feats["logits"], 2), rel=1e-9)


def test_metrics_against_a_different_set_match_the_building_blocks() -> None:
    features = InceptionFeatures(small_fake(), batch_size=8)
    samples, ref = _images(20, seed=3), _images(24, seed=4) * 0.5
    out = distribution_metrics(samples, ref, features, is_splits=2)
    fs, fr = features(samples), features(ref)
    assert out["fid"] == pytest.approx(frechet_distance(fs["pool"], fr["pool"]), rel=1e-9)
    assert out["sfid"] == pytest.approx(frechet_distance(fs["spatial"], fr["spatial"]), rel=1e-9)
    assert out["fid"] > 0 and out["sfid"] > 0
    assert (out["precision"], out["recall"]) == pytest.approx(naive_precision_recall(fr["pool"], fs["pool"], 3))


def test_reference_cache_is_written_once_reused_and_invalidated(tmp_path: Path) -> None:
    net = small_fake()
    features = InceptionFeatures(net, batch_size=8)
    samples, ref = _images(16, seed=5), _images(24, seed=6)
    first = distribution_metrics(samples, ref, features, cache_dir=tmp_path, is_splits=2)
    assert net.calls == 3 + 2  # reference: 24 / 8 batches, samples: 16 / 8
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    with np.load(files[0], allow_pickle=False) as cached:
        assert {"mu", "sigma", "mu_s", "sigma_s", "pool"} <= set(cached.files)

    second = distribution_metrics(samples, ref, features, cache_dir=tmp_path, is_splits=2)
    assert net.calls == 5 + 2  # only the samples were featurised
    assert second == pytest.approx(first, rel=1e-12)
    assert first == pytest.approx(distribution_metrics(samples, ref, features, is_splits=2), rel=1e-12)

    changed = ref.clone()
    changed[0, 0, 0, 0] = -changed[0, 0, 0, 0]
    net.calls = 0
    distribution_metrics(samples, changed, features, cache_dir=tmp_path, is_splits=2)
    assert net.calls == 3 + 2 and len(list(tmp_path.iterdir())) == 2

    with torch.no_grad():  # different Inception weights must not reuse the statistics either
        net.fc.weight.mul_(2)
    net.calls = 0
    reference_statistics(ref, features, cache_dir=tmp_path)
    assert net.calls == 3 and len(list(tmp_path.iterdir())) == 3


def _write_adm_npz(path: Path, images: torch.Tensor, **extra: np.ndarray) -> torch.Tensor:
    """Saves ``images`` in [-1, 1] as ADM's uint8 NHWC ``arr_0`` (plus labels); returns the uint8 NCHW tensor."""
    u8 = to_uint8_rgb(images) if images.shape[1] == 3 else to_uint8_rgb(images)[:, :1]
    labels = np.arange(images.shape[0]) % 10
    np.savez(path, arr_0=u8.permute(0, 2, 3, 1).numpy(), arr_1=labels, **extra)
    return u8


def test_adm_npz_reference_and_samples(tmp_path: Path) -> None:
    features = InceptionFeatures(small_fake(), batch_size=7)  # 7 does not divide 24: exercises the last batch
    samples, ref = _images(21, seed=7), _images(24, seed=8)
    ref_u8 = _write_adm_npz(tmp_path / "ref.npz", ref)
    sample_u8 = _write_adm_npz(tmp_path / "samples.npz", samples)
    from_npz = distribution_metrics(tmp_path / "samples.npz", str(tmp_path / "ref.npz"), features, is_splits=3)
    from_tensors = distribution_metrics(sample_u8, ref_u8, features, is_splits=3)
    assert from_npz == pytest.approx(from_tensors, rel=1e-12)
    assert from_npz["fid"] > 0
    # The uint8 round trip of [-1, 1] images is what the float path feeds the network too.
    assert from_npz == pytest.approx(distribution_metrics(samples, ref, features, is_splits=3), rel=1e-12)
    # A grayscale ADM file (C = 1) is accepted as well.
    gray_u8 = _write_adm_npz(tmp_path / "gray.npz", _images(24, seed=9, channels=1))
    gray = distribution_metrics(sample_u8, tmp_path / "gray.npz", features, is_splits=3)
    assert gray == pytest.approx(distribution_metrics(sample_u8, gray_u8, features, is_splits=3), rel=1e-12)


def test_precomputed_adm_statistics_are_used(tmp_path: Path) -> None:
    features = InceptionFeatures(small_fake(), batch_size=8)
    samples = _images(16, seed=10)
    fs = {k: v.double().numpy() for k, v in features(samples).items()}
    mu, mu_s = np.linspace(-1, 1, fs["pool"].shape[1]), np.full(fs["spatial"].shape[1], 0.25)
    # Zero reference covariances make the expected value a hand formula: |mu - mu_ref|^2 + Tr(S).
    _write_adm_npz(tmp_path / "ref.npz", samples, mu=mu, sigma=np.zeros((mu.size,) * 2), mu_s=mu_s,
                   sigma_s=np.zeros((mu_s.size,) * 2))
    out = distribution_metrics(samples, tmp_path / "ref.npz", features, cache_dir=tmp_path / "cache", is_splits=2)
    expected_fid = ((fs["pool"].mean(0) - mu) ** 2).sum() + np.trace(np.cov(fs["pool"], rowvar=False))
    expected_sfid = ((fs["spatial"].mean(0) - mu_s) ** 2).sum() + np.trace(np.cov(fs["spatial"], rowvar=False))
    assert out["fid"] == pytest.approx(expected_fid, rel=1e-9)
    assert out["sfid"] == pytest.approx(expected_sfid, rel=1e-9)
    assert out["precision"] == out["recall"] == 1.0  # arr_0 holds the samples themselves
    cached = distribution_metrics(samples, tmp_path / "ref.npz", features, cache_dir=tmp_path / "cache", is_splits=2)
    assert cached == pytest.approx(out, rel=1e-12)


def test_statistics_only_npz_gives_fid_and_nan_for_the_rest(tmp_path: Path) -> None:
    features = InceptionFeatures(small_fake(), batch_size=8)
    samples = _images(16, seed=11)
    pool = features(samples)["pool"].double().numpy()
    np.savez(tmp_path / "stats.npz", mu=pool.mean(0), sigma=np.cov(pool, rowvar=False))
    with pytest.warns(UserWarning, match="sfid"):
        out = distribution_metrics(samples, tmp_path / "stats.npz", features, is_splits=2)
    assert out["fid"] / float(pool.var(0).sum()) < 1e-9
    assert all(math.isnan(out[key]) for key in ("sfid", "precision", "recall"))
    with pytest.raises(FileNotFoundError, match="eval.reference_path"):
        reference_statistics(tmp_path / "missing.npz", features)


def test_reference_statistics_round_trip(tmp_path: Path) -> None:
    stats = ReferenceStatistics(mu=np.arange(3.0), sigma=np.eye(3), pool=np.ones((4, 3), np.float32))
    stats.save(tmp_path / "s.npz")
    loaded = ReferenceStatistics.load(tmp_path / "s.npz")
    assert loaded.mu_s is None and loaded.sigma_s is None
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    np.testing.assert_array_equal(loaded.pool, stats.pool)
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temporary file left behind


# ---------------------------------------------------------------- load_inception


def test_load_inception_without_a_path_names_the_config_key(tmp_path: Path) -> None:
    for path in (None, tmp_path / "nope.pth"):
        with pytest.raises(FileNotFoundError, match="eval.inception_path") as info:
            load_inception(path)
        assert INCEPTION_WEIGHTS_FILE in str(info.value) and "https://" in str(info.value)


_EXECUTED: list[str] = []


def _record_execution() -> str:
    _EXECUTED.append("ran")
    return "pwned"


class _Payload:
    """Unpickles by calling ``_record_execution``: shows whether loading ran code from the file."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return _record_execution, ()


class _SneakyDict(OrderedDict):
    pass


@pytest.mark.parametrize("payload", [
    {"conv.weight": torch.zeros(2), "x": _Payload()},
    _SneakyDict(weight=torch.zeros(2)),
    {"conv.weight": torch.zeros(2), "note": "plain but not a tensor"},
    [torch.zeros(2)],
])
def test_non_tensor_weights_are_refused_before_importing_torch_fidelity(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, payload: object) -> None:
    # With torch-fidelity blocked, an ImportError would mean the file reached the import before being refused.
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    path = tmp_path / "weights.pth"
    torch.save(payload, path)
    _EXECUTED.clear()
    with pytest.raises(ValueError, match="Refusing Inception weights"):
        load_inception(path)
    assert _EXECUTED == []


def test_missing_torch_fidelity_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    path = tmp_path / "weights.pth"
    torch.save(FakeInception(spatial_size=3).state_dict(), path)
    with pytest.raises(ImportError, match=r'pip install "diffqat\[fid\]"') as info:
        load_inception(path)
    assert "torchvision" in str(info.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_inception_builds_the_wrapper_from_a_safe_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    # A stand-in torch_fidelity package whose extractor is the fake: exercises the builder without torch-fidelity.
    package = types.ModuleType("torch_fidelity")
    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    built: list[FakeInception] = []

    def factory(*args: object, **kwargs: object) -> FakeInception:
        built.append(FakeInception(*args, **kwargs))  # type: ignore[arg-type]
        return built[-1]

    module.FeatureExtractorInceptionV3 = factory  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)

    source = FakeInception(seed=3)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    features = load_inception(path)
    (net,) = built
    assert net.loaded_from is not None and Path(net.loaded_from) != path  # torch-fidelity never sees the user's file
    assert not Path(net.loaded_from).exists()  # the private copy is gone after loading
    for key, value in source.state_dict().items():
        assert torch.equal(net.state_dict()[key], value)
    assert not net.training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = features(_images(2, seed=12))
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 2023)
