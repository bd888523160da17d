"""PTQ initialisation: weights from the weights themselves, activations from calibration inputs captured by hooks.

This is EfficientDM's "naive" PTQ (dossier Sec. 7.2), run as an explicit pass before the optimizer is built:

* weights: per-channel ``minmax`` (range forced to include 0) or ``mse`` clipping search, from the config's
  ``init`` field (:func:`initialize_weight_quantizers`);
* activations: the model runs on calibration batches with activation quantizers off (weights quantized); a forward
  pre-hook on each quantized layer keeps the exact per-row min and max plus a bounded random subsample of its
  inputs, and each affine activation quantizer is then initialised by its config's method (EfficientDM: per-tensor
  ``mse`` over 80 clipping ratios, ``p = 2.4``). With ``per_timestep=True`` temporal quantizers also get one
  initialisation per timestep row seen during calibration (rows never seen keep the all-timestep value). Other
  quantizers (binary, a method's own) are initialised by their ``initialize_`` from the first input they see.

Deviation from the reference code: activations are calibrated on full-precision inputs in one pass (the reference
quantizes all layers during its single calibration forward, so later layers see perturbed inputs).

Quantizers already initialised (``initialized`` buffer True, e.g. after loading a checkpoint) are skipped unless
``force=True``: a resumed run never re-initialises learned scales.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from qat.nn.attention import QuantAttnProcessor
from qat.prepare import quant_layers
from qat.quantizers.affine import AffineQuantizer
from qat.quantizers.base import Quantizer
from qat.quantizers.temporal_lsq import TemporalLSQQuantizer

__all__ = ["initialize_weight_quantizers", "calibrate", "is_initialized"]


def initialize_weight_quantizers(model: nn.Module, force: bool = False) -> int:
    """Initialises every weight quantizer from its weight. Returns how many were initialised."""
    n = 0
    for layer in quant_layers(model).values():
        q = layer.weight_quantizer
        if q is not None and (force or not bool(q.initialized)):
            q.initialize_(layer.weight)
            n += 1
    return n


#: columns above which the calibration subsample is drawn with replacement (see ``_Collector._pick``)
PERMUTE_LIMIT = 2**24


class _Collector:
    """Bounded per-row statistics of one quantizer's inputs: exact min/max and a random column subsample."""

    def __init__(self, max_samples: int, generator: torch.Generator) -> None:
        self.max_samples = max_samples
        self.gen = generator
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None
        self.samples: list[Tensor] = []
        self.count = 0

    def add(self, rows: Tensor) -> None:
        rows = rows.detach().float()
        lo, hi = rows.min(dim=1).values, rows.max(dim=1).values
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        if rows.shape[1] > self.max_samples:
            rows = rows[:, self._pick(rows.shape[1]).to(rows.device)]
        self.samples.append(rows)
        self.count += rows.shape[1]
        if self.count > 4 * self.max_samples:  # keep memory bounded
            self.samples = [self._subsample(torch.cat(self.samples, dim=1))]
            self.count = self.samples[0].shape[1]

    def _pick(self, n: int) -> Tensor:
        """``max_samples`` column indices out of ``n``: without replacement, or with it beyond ``PERMUTE_LIMIT``
        columns (a video latent layer has ~1e8; a permutation of that many costs about a second per layer)."""
        if n > PERMUTE_LIMIT:
            return torch.randint(n, (self.max_samples,), generator=self.gen)
        return torch.randperm(n, generator=self.gen)[: self.max_samples]

    def _subsample(self, rows: Tensor) -> Tensor:
        if rows.shape[1] <= self.max_samples:
            return rows
        return rows[:, self._pick(rows.shape[1]).to(rows.device)]

    def rows(self) -> Tensor:
        """``(R, N)`` sample with the exact extremes appended as two extra columns."""
        data = self._subsample(torch.cat(self.samples, dim=1))
        return torch.cat([data, self.lo[:, None], self.hi[:, None]], dim=1)


def _timestep_rows(q: TemporalLSQQuantizer, x: Tensor) -> dict[int, Tensor]:
    """Splits ``x`` by the table row each sample uses (the nearest row for interpolated timesteps)."""
    try:
        lo = q.nearest_rows()
    except RuntimeError:
        raise RuntimeError("per-timestep calibration needs a timestep set on the model during each calibration "
                           "forward (use `with qat.timestep(model, t):` in forward_fn)") from None
    if isinstance(lo, int) or lo.dim() == 0:
        return {int(lo): q.rows(x)}
    idx = lo.repeat_interleave(x.shape[0] // lo.shape[0]) if lo.shape[0] != x.shape[0] else lo
    return {int(u): q.rows(x[idx == u]) for u in idx.unique()}


def _activation_quantizers(model: nn.Module, force: bool) -> dict[str, Quantizer]:
    """Name -> every input-activation and attention-operand quantizer still to initialise (all with ``force``)."""
    targets: dict[str, Quantizer] = {}
    for name, layer in quant_layers(model).items():
        if layer.act_quantizer is not None and (force or not bool(layer.act_quantizer.initialized)):
            targets[f"{name}.act_quantizer"] = layer.act_quantizer
    for name, module in model.named_modules():
        if isinstance(module, QuantAttnProcessor):
            for part in ("q", "k", "v", "probs"):
                q = getattr(module, f"{part}_quantizer")
                if force or not bool(q.initialized):
                    targets[f"{name}.{part}_quantizer"] = q
    return targets


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any],
    per_timestep: bool = False,
    max_samples: int = 8192,
    force: bool = False,
    seed: int = 0,
) -> dict[str, int]:
    """PTQ initialisation of all quantizers of a prepared model.

    Args:
        model: a model prepared with :func:`qat.prepare`.
        batches: calibration batches, passed one by one to ``forward_fn``.
        forward_fn: ``forward_fn(model, batch)`` runs the model; for temporal quantizers it must set the timestep
            (``with qat.timestep(model, t): model(...)``).
        per_timestep: also initialise each temporal table row from the inputs seen at that timestep.
        max_samples: columns of the random subsample kept per quantizer row (and per timestep).
        force: re-initialise quantizers that are already initialised.
        seed: seed of the subsampling.

    Returns:
        ``{"weights": n, "activations": m}``: how many quantizers were initialised.
    """
    n_weights = initialize_weight_quantizers(model, force=force)
    targets = _activation_quantizers(model, force)
    if not targets:
        return {"weights": n_weights, "activations": 0}

    gen = torch.Generator().manual_seed(seed)
    collectors: dict[str, _Collector] = {k: _Collector(max_samples, gen) for k in targets}
    per_t: dict[tuple[str, int], _Collector] = {}
    saved = {k: q.enabled for k, q in targets.items()}

    first: dict[str, Tensor] = {}  # quantizers without per-row statistics initialise from their first input

    def make_hook(key: str, q: Quantizer) -> Callable[[nn.Module, tuple[Tensor, ...]], Tensor]:
        def capture(x: Tensor) -> Tensor:
            if not isinstance(q, AffineQuantizer):
                first.setdefault(key, x.detach())
                return x
            collectors[key].add(q.rows(x))
            if per_timestep and isinstance(q, TemporalLSQQuantizer):
                for row, data in _timestep_rows(q, x).items():
                    per_t.setdefault((key, row), _Collector(max_samples, gen)).add(data)
            return x

        return capture

    handles = []
    for key, q in targets.items():
        q.enabled = False
        hook = make_hook(key, q)
        # Wrapping the quantizer's forward sees exactly its input (layer inputs and attention operands alike).
        handles.append(q.register_forward_pre_hook(lambda mod, args, h=hook: (h(args[0]),)))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            forward_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
        for key, q in targets.items():
            q.enabled = saved[key]
        model.train(was_training)

    missing = [k for k, c in collectors.items() if not c.samples and k not in first]
    if missing:
        raise RuntimeError(f"calibration never reached {len(missing)} quantizers, e.g. {missing[:3]}; "
                           "check that forward_fn runs the whole model")
    for key, q in targets.items():
        if key in first:
            q.initialize_(first[key])
        else:
            q.initialize_from_rows_(collectors[key].rows())
    for (key, row), c in per_t.items():
        targets[key].initialize_from_rows_(c.rows(), index=row)
    return {"weights": n_weights, "activations": len(targets)}


def is_initialized(model: nn.Module) -> bool:
    """True when every quantizer of ``model`` is initialised."""
    return all(bool(m.initialized) for m in model.modules() if isinstance(m, Quantizer))
