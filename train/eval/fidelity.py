"""Distribution metrics through Inception-V3: FID, sFID, Inception Score and improved precision/recall.

Two layers, so the math is testable without the Inception weights:

1. Pure functions on features and logits: :func:`frechet_distance_from_statistics` (FID/sFID from Gaussian
   statistics, sharing ``train.eval.metrics``' symmetric square root), :func:`inception_score` (Salimans et al.,
   2016) and :func:`precision_recall` (Kynkäänniemi et al., 2019).
2. :class:`InceptionFeatures`, a wrapper around an already built torch-fidelity ``FeatureExtractorInceptionV3``
   (the TF-compatible FID Inception that torchmetrics also uses), which turns diffusion-range images into the three
   feature sets the metrics need; :func:`load_inception` builds it from a local weights file, validated without
   unpickling arbitrary objects; :func:`distribution_metrics` ties everything together against a reference set whose
   statistics are cached on disk (:func:`reference_statistics`).

The protocol follows the ADM evaluator (Dhariwal & Nichol, 2021, ``guided-diffusion/evaluations/evaluator.py``):
pool features (2048) for FID and precision/recall, the first 7 channels of ``mixed_6/conv`` (17x17) for sFID (Nash et
al., 2021), bias-free logits for IS, and ADM reference batches (``.npz`` with ``arr_0`` uint8 NHWC images and
optionally precomputed ``mu``/``sigma``/``mu_s``/``sigma_s``) as references.

torch-fidelity is an optional extra (``pip install "diffqat[fid]"``); nothing here downloads anything.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from train.eval.metrics import frechet_distance_from_statistics, mean_and_cov

__all__ = [
    "InceptionFeatures",
    "ReferenceStatistics",
    "distribution_metrics",
    "frechet_distance_from_statistics",
    "inception_score",
    "load_inception",
    "precision_recall",
    "reference_statistics",
    "to_uint8_rgb",
]

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]: 17 * 17 * 7 = 2023 sFID features
_CACHE_VERSION = b"diffqat-inception-reference-v1"
_STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


# ---------------------------------------------------------------- pure math on features and logits


def inception_score(logits: Tensor | np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score (Salimans et al., 2016, "Improved Techniques for Training GANs") from classifier logits.

    .. math::
        \\mathrm{IS} = \\exp\\Big(\\mathbb{E}_x\\, \\mathrm{KL}\\big(p(y|x) \\,\\|\\, p(y)\\big)\\Big), \\qquad
        p(y) = \\mathbb{E}_x\\, p(y|x)

    computed independently on ``splits`` consecutive chunks (boundaries ``i N // splits``) with ``p(y)`` estimated per
    chunk; returns the mean and the population standard deviation over chunks, as the reference implementation
    (openai/improved-gan) and torch-fidelity do. ``p(y|x) = softmax(logits)`` in float64; terms with ``p(y|x) = 0``
    contribute 0 (``0 log 0 = 0``), so saturated one-hot predictions are exact. No shuffling: samples from a
    sampler are already i.i.d. (ADM uses fixed chunks of 5000, i.e. 10 splits for 50k samples).

    Args:
        logits: Shape ``(N, C)``; for Inception the bias-free ``logits_unbiased`` (1008 classes), as in ADM.
        splits: Number of chunks, ``1 <= splits <= N``.

    Returns:
        ``(mean, std)`` of the per-split scores; each score lies in ``[1, C]``.
    """
    x = torch.as_tensor(logits).detach().cpu().double()
    if x.ndim != 2:
        raise ValueError(f"inception_score: expected (N, C) logits, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"inception_score: need 1 <= splits <= N, got splits={splits}, N={n}")
    log_p = torch.log_softmax(x, dim=1)
    p = log_p.exp()
    scores = []
    for i in range(splits):
        p_i, log_p_i = p[i * n // splits : (i + 1) * n // splits], log_p[i * n // splits : (i + 1) * n // splits]
        log_marginal = p_i.mean(dim=0, keepdim=True).log()  # finite wherever some p_i > 0
        kl = torch.where(p_i > 0, p_i * (log_p_i - log_marginal), torch.zeros_like(p_i)).sum(dim=1)
        scores.append(math.exp(kl.mean().item()))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a: Tensor, a_sq: Tensor, b: Tensor, b_sq: Tensor) -> Tensor:
    """Squared Euclidean distances ``(len(a), len(b))`` via ``|a|^2 - 2 a.b + |b|^2``, clamped at 0 (rounding)."""
    return (a_sq[:, None] - 2.0 * (a @ b.T) + b_sq[None, :]).clamp_min_(0.0)


def _knn_radii(x: Tensor, k: int, batch_size: int) -> Tensor:
    """Squared distance of every row of ``x`` to its k-th nearest neighbour in ``x`` (itself excluded).

    Streams over column blocks keeping only the ``k + 1`` smallest distances per row, so memory is
    ``O(batch_size^2)`` instead of ``O(N^2)``. The self-distance is set to exactly 0 and counted, so the radius is the
    ``(k + 1)``-th smallest entry of the row, as in Kynkäänniemi et al.'s code, ADM and torch-fidelity.
    """
    n = x.shape[0]
    x_sq = (x * x).sum(dim=1)
    radii = torch.empty(n, dtype=x.dtype, device=x.device)
    for i in range(0, n, batch_size):
        rows, rows_sq = x[i : i + batch_size], x_sq[i : i + batch_size]
        best: Tensor | None = None
        for j in range(0, n, batch_size):
            d = _sq_dists(rows, rows_sq, x[j : j + batch_size], x_sq[j : j + batch_size])
            if i == j:  # same block boundaries on both sides, so the diagonal is the self-distance
                d.fill_diagonal_(0.0)
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values
        assert best is not None
        radii[i : i + batch_size] = best[:, k]
    return radii


def precision_recall(real_feats: Tensor | np.ndarray, fake_feats: Tensor | np.ndarray, k: int = 3,
                     batch_size: int = 4096, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float64) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019, "Improved Precision and Recall Metric for Assessing
    Generative Models").

    Each set defines a manifold as the union of balls around its points, the radius of the ball around ``x`` being
    the distance to its k-th nearest neighbour in the same set, ``r_k(x)``:

    .. math::
        \\mathrm{precision} = \\frac{1}{M} \\sum_{g \\in \\text{fake}} [\\exists\\, r \\in \\text{real}:
            \\lVert g - r \\rVert \\le r_k(r)], \\qquad
        \\mathrm{recall} = \\frac{1}{N} \\sum_{r \\in \\text{real}} [\\exists\\, g \\in \\text{fake}:
            \\lVert r - g \\rVert \\le r_k(g)]

    Distances are computed block by block (``batch_size x batch_size``), so 50k x 50k sets need a few hundred MB,
    not 20 GB; the real-fake block is used for both directions. Results do not depend on ``batch_size``. ADM applies
    this to the Inception pool features with ``k = 3`` (the paper used VGG-16 features).

    Args:
        real_feats: Shape ``(N, F)``, ``N > k``.
        fake_feats: Shape ``(M, F)``, ``M > k``.
        k: Neighbourhood size.
        batch_size: Rows/columns per distance block (memory only).
        device: Where to compute (default: the device of ``real_feats`` if a tensor, else CPU).
        dtype: Compute dtype; float64 by default so ``|a|^2 - 2 a.b + |b|^2`` does not lose the small distances.

    Returns:
        ``(precision, recall)``, both in ``[0, 1]``.
    """
    if device is None:
        device = real_feats.device if isinstance(real_feats, Tensor) else "cpu"
    real = torch.as_tensor(real_feats).detach().to(device=device, dtype=dtype)
    fake = torch.as_tensor(fake_feats).detach().to(device=device, dtype=dtype)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall: expected (N, F) and (M, F), got {tuple(real.shape)}, {tuple(fake.shape)}")
    if min(real.shape[0], fake.shape[0]) <= k or k < 1 or batch_size < 1:
        raise ValueError(f"precision_recall: need k >= 1 and more than k samples per set, got k={k}, "
                         f"N={real.shape[0]}, M={fake.shape[0]} (batch_size={batch_size})")
    real_radii, fake_radii = _knn_radii(real, k, batch_size), _knn_radii(fake, k, batch_size)
    real_sq, fake_sq = (real * real).sum(dim=1), (fake * fake).sum(dim=1)
    real_in = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)  # real inside the fake manifold
    fake_in = torch.zeros(fake.shape[0], dtype=torch.bool, device=real.device)  # fake inside the real manifold
    for i in range(0, real.shape[0], batch_size):
        r_sl = slice(i, i + batch_size)
        for j in range(0, fake.shape[0], batch_size):
            f_sl = slice(j, j + batch_size)
            d = _sq_dists(real[r_sl], real_sq[r_sl], fake[f_sl], fake_sq[f_sl])  # (rows: real, cols: fake)
            real_in[r_sl] |= (d <= fake_radii[f_sl][None, :]).any(dim=1)
            fake_in[f_sl] |= (d <= real_radii[r_sl][:, None]).any(dim=0)
    return fake_in.double().mean().item(), real_in.double().mean().item()


# ---------------------------------------------------------------- Inception feature extraction


def to_uint8_rgb(images: Tensor) -> Tensor:
    """Diffusion-range images to the uint8 RGB batch the TF-compatible Inception expects.

    ``u = clamp(round((x + 1) * 127.5), 0, 255)`` (round half to even, as ``torch.round``); one-channel images are
    repeated to three channels. uint8 input is passed through (only the channel repeat applies). Note that ADM's
    sampling scripts truncate instead of rounding, i.e. are up to one grey level darker.

    Args:
        images: ``(B, C, H, W)`` with ``C`` in ``{1, 3}``; float in ``[-1, 1]`` (values outside are clamped) or uint8.

    Returns:
        uint8 tensor ``(B, 3, H, W)`` on the input's device.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"to_uint8_rgb: expected (B, C, H, W) with C in {{1, 3}}, got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise ValueError(f"to_uint8_rgb: expected float images in [-1, 1] or uint8, got {images.dtype}")
        # A diverged (e.g. badly quantized) model can emit NaN; casting NaN to uint8 is undefined, so refuse loudly.
        if not torch.isfinite(images).all():
            raise ValueError("to_uint8_rgb: images contain NaN or inf; the metrics would be meaningless")
        images = ((images.float() + 1.0) * 127.5).round_().clamp_(0.0, 255.0).to(torch.uint8)
    # Contiguous NCHW: a channels-last view (e.g. from NHWC files) would pick other conv kernels and change the
    # features in the last float bits, so the same images would not give bit-identical metrics.
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images.contiguous()


class InceptionFeatures(nn.Module):
    """Pool, spatial (sFID) and logit features of an injected torch-fidelity-compatible Inception-V3.

    ``network`` is anything whose ``forward`` takes uint8 ``(B, 3, H, W)`` (resizing to 299 itself) and returns
    ``(pool_2048, logits_unbiased)``, i.e. torch-fidelity's ``FeatureExtractorInceptionV3`` built with
    ``features_list=['2048', 'logits_unbiased']``, and that has a submodule ``Mixed_6d.branch1x1``. That submodule
    (conv + BN + ReLU, ``(B, 192, 17, 17)``) is the TF tensor ``mixed_6/conv:0`` of the 2015 graph that ADM uses for
    sFID (TF names the 17x17 blocks ``mixed_4..mixed_7`` = torch ``Mixed_6b..Mixed_6e``); a forward hook captures it
    and keeps channels ``[:7]`` flattened in TF's channel-last order ``(H, W, C)``. (A Frechet distance is invariant to
    a common permutation of the features, so the order only matters when mixing with ADM's precomputed
    ``mu_s``/``sigma_s``, whose coordinates are in that order.)

    Args:
        network: The Inception network (see above), already on its device and in eval mode.
        batch_size: Images per forward pass (memory only; results do not depend on it).
    """

    def __init__(self, network: nn.Module, batch_size: int = 100) -> None:
        super().__init__()
        try:
            spatial_module = network.get_submodule("Mixed_6d.branch1x1")
        except AttributeError as err:
            raise ValueError("InceptionFeatures: the network has no submodule Mixed_6d.branch1x1; expected "
                             "torch-fidelity's FeatureExtractorInceptionV3 layout") from err
        self.network = network
        self.batch_size = batch_size
        self._spatial: Tensor | None = None
        spatial_module.register_forward_hook(self._capture_spatial)

    def _capture_spatial(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        # Copy now (reshape of a permuted slice copies): later in-place ops in the network must not alter it.
        out = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
        self._spatial = out.reshape(out.shape[0], -1).to(torch.float32, copy=True)

    @property
    def device(self) -> torch.device:
        p = next(self.network.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def fingerprint(self) -> str:
        """SHA-256 of the network's state dict (names, dtypes, shapes, values): identifies the weights for caches."""
        h = hashlib.sha256()
        for name, t in sorted(self.network.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(f"spatial={SPATIAL_CHANNELS}".encode())
        return h.hexdigest()

    @torch.no_grad()
    def extract(self, batches: Iterable[Tensor]) -> dict[str, Tensor]:
        """Features of images given batch by batch (e.g. streamed from a large ``.npz``).

        Args:
            batches: Tensors ``(B, C, H, W)``, float in ``[-1, 1]`` or uint8, ``C`` in ``{1, 3}``.

        Returns:
            ``{"pool": (N, 2048), "spatial": (N, 7 * 17 * 17), "logits": (N, 1008)}``, float32 on the CPU.
        """
        device, out = self.device, {"pool": [], "spatial": [], "logits": []}
        was_training = self.network.training
        self.network.eval()  # BN must use its running statistics
        try:
            for batch in batches:
                self._spatial = None
                result = self.network(to_uint8_rgb(batch).to(device))
                if not isinstance(result, (tuple, list)) or len(result) != 2:
                    raise ValueError("InceptionFeatures: the network must return (pool_2048, logits_unbiased); build "
                                     "it with features_list=['2048', 'logits_unbiased']")
                if self._spatial is None:
                    raise RuntimeError("InceptionFeatures: Mixed_6d.branch1x1 did not run in the forward pass")
                out["pool"].append(result[0].float().cpu())
                out["logits"].append(result[1].float().cpu())
                out["spatial"].append(self._spatial.cpu())
        finally:
            self._spatial = None
            self.network.train(was_training)
        if not out["pool"]:
            raise ValueError("InceptionFeatures: no images")
        return {key: torch.cat(values) for key, values in out.items()}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Features of ``images`` ``(N, C, H, W)`` (float in ``[-1, 1]`` or uint8), in batches of ``batch_size``.

        Returns:
            ``{"pool": (N, 2048), "spatial": (N, 7 * 17 * 17), "logits": (N, 1008)}``, float32 on the CPU.
        """
        return self.extract(images.split(self.batch_size))


def _weights_not_found(detail: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Inception weights {detail}. Set the config key eval.inception_path to a local copy of torch-fidelity's "
        f"{INCEPTION_WEIGHTS_FILE} (download {INCEPTION_WEIGHTS_URL} on a machine with network access and copy it "
        f"here; nothing is downloaded at run time). A .safetensors conversion of it is accepted too.")


def _load_tensor_state_dict(path: Path) -> OrderedDict[str, Tensor]:
    """The weights as a plain ``{name: Tensor}`` dict, read without executing anything from the file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: object = load_file(str(path), device="cpu")
        except Exception as err:  # SafetensorError for malformed headers
            raise ValueError(f"Refusing Inception weights {path}: not a valid safetensors file ({err})") from err
    else:
        try:
            state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError for disallowed globals, RuntimeError for non-zip files, ...
            raise ValueError(f"Refusing Inception weights {path}: not loadable with torch.load(weights_only=True) "
                             f"({type(err).__name__}: {err})") from err
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"Refusing Inception weights {path}: expected a state dict mapping names to tensors only, "
                         f"got {type(state).__name__}")
    # detach() turns nn.Parameter (allowed by weights_only) into plain tensors, so the re-saved pickle is minimal.
    clean: OrderedDict[str, Tensor] = OrderedDict((k, v.detach()) for k, v in state.items())
    # Module-version metadata (nested dicts of ints/None) lets load_state_dict apply BN upgrades; keep it if plain.
    meta = getattr(state, "_metadata", None)
    if isinstance(meta, dict) and all(isinstance(v, dict) for v in meta.values()):
        clean._metadata = meta  # type: ignore[attr-defined]
    return clean


def load_inception(weights_path: str | Path | None, device: torch.device | str = "cpu",
                   batch_size: int = 100) -> InceptionFeatures:
    """Builds :class:`InceptionFeatures` on torch-fidelity's TF-compatible Inception-V3 from a local weights file.

    The file is validated before torch-fidelity sees it: it must load with ``torch.load(weights_only=True)`` (or be a
    ``.safetensors`` file) and hold only tensors. torch-fidelity then unpickles with ``weights_only=False``; that is
    safe because it never reads the user's file but a private temporary ``.pth`` that we ``torch.save`` from the
    validated tensors (a fresh pickle of a tensor dict references nothing but torch's tensor-rebuild functions), which
    also rules out the file being swapped between validation and load.

    Args:
        weights_path: ``weights-inception-2015-12-05-6726825d.pth`` (config key ``eval.inception_path``), or a
            ``.safetensors`` conversion of it.
        device: Where the network runs.
        batch_size: Images per forward pass.

    Returns:
        The wrapper, in eval mode on ``device``.

    Raises:
        FileNotFoundError: ``weights_path`` is None or does not exist (the message says where to get the file).
        ValueError: the file is not a pure tensor state dict (nothing from it is executed).
        ImportError: torch-fidelity (or its torchvision dependency) is not installed.
    """
    if weights_path is None:
        raise _weights_not_found("path not set (None)")
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise _weights_not_found(f"file not found: {path}")
    state = _load_tensor_state_dict(path)  # before importing torch-fidelity: refuse bad files even without it
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise ImportError(
            f'FID/sFID/IS/precision-recall need torch-fidelity: pip install "diffqat[fid]", and first install the '
            f"torchvision build matching the installed torch {torch.__version__} (torch-fidelity imports torchvision; "
            f"a mismatched torchvision fails to import). Import error: {err}") from err
    with tempfile.TemporaryDirectory(prefix="diffqat-inception-") as tmp:
        safe_copy = Path(tmp) / INCEPTION_WEIGHTS_FILE
        torch.save(state, safe_copy)
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                              feature_extractor_weights_path=str(safe_copy))
    network.requires_grad_(False).eval().to(device)
    return InceptionFeatures(network, batch_size=batch_size)


# ---------------------------------------------------------------- reference sets and the metrics


@dataclass
class ReferenceStatistics:
    """What the metrics need from the reference set; any field may be missing (None).

    Attributes:
        mu, sigma: Mean ``(2048,)`` and covariance ``(2048, 2048)`` of the pool features (FID), float64.
        mu_s, sigma_s: The same for the spatial features ``(2023,)``, ``(2023, 2023)`` (sFID), float64.
        pool: The pool features ``(M, 2048)`` themselves (precision/recall need the points), float32.
    """

    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    pool: np.ndarray | None = None

    def save(self, path: str | Path) -> None:
        """Writes an ``.npz`` (no pickled objects) atomically: a crash never leaves a truncated cache file."""
        path = Path(path)
        arrays = {key: value for key, value in vars(self).items() if value is not None}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:  # a file object, so np.savez does not append ".npz" to the name
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStatistics:
        with np.load(path, allow_pickle=False) as data:
            return cls(**{key: data[key] for key in data.files if key in cls.__dataclass_fields__})


def _iter_npz_images(path: Path, batch_size: int) -> Iterator[Tensor]:
    """``arr_0`` of an ADM ``.npz`` (uint8 NHWC) as NCHW uint8 batches, streamed so 50k images never sit in memory."""
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"{path}: unsupported .npy format version {version} for arr_0")
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or fortran:
            raise ValueError(f"{path}: arr_0 must be C-ordered uint8 images (N, H, W, C) with C in {{1, 3}} (ADM "
                             f"layout), got dtype {dtype}, shape {shape}, fortran_order={fortran}")
        per_image = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            buf = f.read(count * per_image)
            if len(buf) != count * per_image:
                raise ValueError(f"{path}: arr_0 is truncated")
            arr = np.frombuffer(buf, dtype=np.uint8).reshape(count, *shape[1:])
            yield torch.from_numpy(arr.copy()).permute(0, 3, 1, 2)


def _npz_has_images(path: Path) -> bool:
    with np.load(path, allow_pickle=False) as data:
        return "arr_0" in data.files


def _content_digest(source: Tensor | Path) -> str:
    """SHA-256 of a file's bytes or of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256()
    if isinstance(source, Tensor):
        t = source.detach().cpu().contiguous()
        h.update(f"tensor|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    else:
        with open(source, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _featurise(source: Tensor | Path, features: InceptionFeatures) -> dict[str, Tensor]:
    if isinstance(source, Tensor):
        return features(source)
    return features.extract(_iter_npz_images(source, features.batch_size))


def _statistics_from_features(feats: dict[str, Tensor]) -> ReferenceStatistics:
    mu, sigma = mean_and_cov(feats["pool"])
    mu_s, sigma_s = mean_and_cov(feats["spatial"])
    return ReferenceStatistics(mu, sigma, mu_s, sigma_s, feats["pool"].numpy())


def reference_statistics(reference: Tensor | str | Path, features: InceptionFeatures,
                         cache_dir: str | Path | None = None) -> ReferenceStatistics:
    """Statistics and pool features of a reference set, cached on disk so it is featurised once.

    Precomputed ``mu``/``sigma``/``mu_s``/``sigma_s`` in an ADM ``.npz`` take precedence over statistics of its images
    (as in ADM's evaluator); the images are still featurised for precision/recall. The cache file is
    ``cache_dir/inception_ref_<key>.npz`` with ``key = sha256(reference bytes, Inception state dict)``, so a changed
    reference or different weights never hit a stale entry.

    Args:
        reference: Images ``(M, C, H, W)`` (float in ``[-1, 1]`` or uint8, ``C`` in ``{1, 3}``), or the path of an ADM
            ``.npz`` (``arr_0``: uint8 ``(M, H, W, C)`` images; optional ``arr_1`` labels are ignored; optional
            precomputed statistics).
        features: The Inception wrapper.
        cache_dir: Directory of the cache (created if needed); None disables caching.

    Returns:
        The statistics; ``pool`` is None for a statistics-only ``.npz``.
    """
    source = reference if isinstance(reference, Tensor) else Path(reference).expanduser()
    if isinstance(source, Path) and not source.is_file():
        raise FileNotFoundError(f"reference set not found: {source} (config key eval.reference_path)")
    cache_file = None
    if cache_dir is not None:
        key = hashlib.sha256(_CACHE_VERSION + _content_digest(source).encode() + features.fingerprint().encode())
        cache_file = Path(cache_dir).expanduser() / f"inception_ref_{key.hexdigest()[:32]}.npz"
        if cache_file.is_file():
            return ReferenceStatistics.load(cache_file)

    if isinstance(source, Tensor):
        stats = _statistics_from_features(features(source))
    else:
        with np.load(source, allow_pickle=False) as data:
            given = {key: data[key] for key in _STAT_KEYS if key in data.files}
        stats = _statistics_from_features(_featurise(source, features)) if _npz_has_images(source) \
            else ReferenceStatistics()
        if {"mu", "sigma"} <= given.keys():
            stats.mu, stats.sigma = given["mu"], given["sigma"]
        if {"mu_s", "sigma_s"} <= given.keys():
            stats.mu_s, stats.sigma_s = given["mu_s"], given["sigma_s"]
        if stats.mu is None and stats.pool is None:
            raise ValueError(f"{source}: neither images (arr_0) nor precomputed statistics (mu, sigma)")

    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        stats.save(cache_file)
    return stats


def distribution_metrics(sample_images: Tensor | str | Path, reference: Tensor | str | Path | ReferenceStatistics,
                         features: InceptionFeatures, cache_dir: str | Path | None = None, k: int = 3,
                         is_splits: int = 10, pr_batch_size: int = 4096) -> dict[str, float]:
    """FID, sFID, Inception Score and improved precision/recall of generated images against a reference set.

    - ``fid``: Frechet distance of the pool features (Heusel et al., 2017), ``sfid``: of the spatial
      ``mixed_6/conv[:7]`` features (Nash et al., 2021), both via :func:`frechet_distance_from_statistics`;
    - ``is``, ``is_std``: :func:`inception_score` of the samples' logits over ``is_splits`` chunks;
    - ``precision``, ``recall``: :func:`precision_recall` of the pool features (reference = real), ``k`` neighbours.

    Metrics the reference cannot support (a statistics-only ``.npz`` without images or without ``mu_s``) are NaN
    with a warning.

    Args:
        sample_images: Generated images ``(N, C, H, W)`` (float in ``[-1, 1]``, clamp sampler output first, or
            uint8), or an ADM-layout sample ``.npz``.
        reference: See :func:`reference_statistics`; or its result, to reuse it across models without any I/O.
        features: The Inception wrapper (:func:`load_inception`).
        cache_dir: Reference cache directory (config key ``eval.stats_cache_dir``); None disables caching.
        k: Neighbourhood size of precision/recall.
        is_splits: Chunks of the Inception Score, at most N.
        pr_batch_size: Block size of the precision/recall distance computation.

    Returns:
        ``{"fid", "sfid", "is", "is_std", "precision", "recall"}`` as floats.
    """
    ref = reference if isinstance(reference, ReferenceStatistics) else \
        reference_statistics(reference, features, cache_dir)
    source = sample_images if isinstance(sample_images, Tensor) else Path(sample_images).expanduser()
    feats = _featurise(source, features)
    mu, sigma = mean_and_cov(feats["pool"])
    mu_s, sigma_s = mean_and_cov(feats["spatial"])
    is_mean, is_std = inception_score(feats["logits"], splits=is_splits)
    nan = float("nan")
    out = {"fid": nan, "sfid": nan, "is": is_mean, "is_std": is_std, "precision": nan, "recall": nan}
    missing = []
    if ref.mu is not None and ref.sigma is not None:
        out["fid"] = frechet_distance_from_statistics(mu, sigma, ref.mu, ref.sigma)
    else:
        missing.append("fid")
    if ref.mu_s is not None and ref.sigma_s is not None:
        out["sfid"] = frechet_distance_from_statistics(mu_s, sigma_s, ref.mu_s, ref.sigma_s)
    else:
        missing.append("sfid")
    if ref.pool is not None:
        out["precision"], out["recall"] = precision_recall(torch.from_numpy(ref.pool), feats["pool"], k=k,
                                                           batch_size=pr_batch_size, device=features.device)
    else:
        missing += ["precision", "recall"]
    if missing:
        warnings.warn(f"distribution_metrics: the reference has no data for {missing} (NaN)", stacklevel=2)
    return out
