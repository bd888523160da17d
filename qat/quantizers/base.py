"""The open base of every quantizer: one ``nn.Module`` and one config dataclass, registered by name.

A quantizer maps a tensor to its fake-quantized value of the same shape and dtype. What the base fixes for all of
them (affine grids, binary bases, and whatever a method adds):

* ``config``: a :class:`QuantizerConfig` subclass with a class-level ``name``; :func:`register_quantizer` puts the
  pair in :data:`QUANTIZERS`, so configs (YAML, export files) name quantizers and a lookup failure lists the names.
* ``enabled``: on/off. Off, the forward is the identity.
* ``initialized``: a buffer (saved in every state dict), set by the data-dependent initialisation
  (:meth:`Quantizer.initialize_`), which runs before the optimizer is built; a resumed run never re-initialises.
  An enabled quantizer that is not initialised refuses to run.
* export: a weight quantizer says how its codes are stored (:meth:`Quantizer.pack_weight` /
  :meth:`Quantizer.unpack_weight`), so a new quantizer exports and reloads without an edit to :mod:`qat.export`.

Quantizers whose forward depends on the sampler timestep implement :class:`qat.timestep.TimestepAware`; the
affine ones carry their fast-path choice per instance (:func:`qat.set_fast_path`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from qat.checks import raise_problems
from qat.registry import Registry

__all__ = ["QuantizerConfig", "Quantizer", "QUANTIZERS", "register_quantizer", "build_quantizer", "config_class",
           "quantizer_entry", "config_from_entry"]


@dataclass
class QuantizerConfig:
    """Fields every quantizer config has.

    Args:
        n_bits: bits per code; each quantizer family states its range in ``bits_range``.
    """

    name: ClassVar[str] = ""
    #: inclusive range of ``n_bits`` this family supports
    bits_range: ClassVar[tuple[int, int]] = (1, 8)
    n_bits: int = 8

    def __post_init__(self) -> None:
        raise_problems(self.problems())

    def problems(self) -> list[tuple[str, str]]:
        """``(field, message)`` for every invalid field (subclasses extend the list)."""
        lo, hi = self.bits_range
        if isinstance(self.n_bits, bool) or not isinstance(self.n_bits, int) or not lo <= self.n_bits <= hi:
            return [("n_bits", f"must be in [{lo}, {hi}] for {self.name or type(self).__name__}, got {self.n_bits}")]
        return []


class Quantizer(nn.Module):
    """Base class of every quantizer (see the module docstring for the contract).

    Subclasses implement :meth:`forward` (identity when ``enabled`` is False, refusing when not initialised:
    :meth:`check_ready`), :meth:`initialize_` and, to be exportable as a weight quantizer, :meth:`pack_weight`,
    :meth:`unpack_weight` and :meth:`packed_names`.

    Args:
        config: the quantizer's config.
    """

    config: QuantizerConfig

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__()
        self.config = config
        self.enabled = True
        # A buffer, not a Python attribute: a reloaded checkpoint must never be re-initialised.
        self.register_buffer("initialized", torch.tensor(False))
        self._ready: bool | None = None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = None  # re-read the loaded ``initialized`` buffer on the next forward

    def check_ready(self) -> None:
        """Raises when the quantizer has not been initialised (read once per load: no GPU sync per call)."""
        if not self._ready:
            self._ready = bool(self.initialized)
        if not self._ready:
            raise RuntimeError(
                f"{type(self).__name__} is enabled but not initialised: run qat.calibrate(...) (activations) or "
                "qat.initialize_weight_quantizers(...) (weights) before building the optimizer"
            )

    def mark_initialized(self) -> None:
        """Sets the ``initialized`` buffer (the end of every initialisation)."""
        self.initialized.fill_(True)
        self._ready = True

    def initialize_(self, x: Tensor) -> None:
        """Data-dependent initialisation from ``x`` (a weight, or calibration inputs); marks the quantizer ready."""
        raise NotImplementedError(f"{type(self).__name__} has no data-dependent initialisation")

    # -- export (weight quantizers) ----------------------------------------------------------------------------------
    def packed_names(self) -> list[str]:
        """Names of the tensors :meth:`pack_weight` writes (stored as ``<layer>.weight.<name>``)."""
        raise NotImplementedError(f"{type(self).__name__} does not say how its weight codes are stored")

    def pack_weight(self, weight: Tensor) -> dict[str, Tensor]:
        """The codes of ``Q(weight)`` as packed tensors ``{name: tensor}`` (names from :meth:`packed_names`)."""
        raise NotImplementedError(f"{type(self).__name__} does not say how its weight codes are stored")

    def unpack_weight(self, packed: dict[str, Tensor], shape: torch.Size) -> Tensor:
        """The weight ``Q(W)`` (float32, ``shape``) from :meth:`pack_weight`'s tensors and this quantizer's state.

        Raises:
            ValueError: the tensors (or this quantizer's loaded state) do not fit its config and ``shape``; the
                message starts with the packed name or the state key at fault, ``"<name>: why"``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not say how its weight codes are stored")

    def export_state(self) -> dict[str, Tensor]:
        """The quantizer tensors an export stores (its state dict without ``initialized``)."""
        return {k: v.detach() for k, v in self.state_dict().items() if k != "initialized"}

    def extra_repr(self) -> str:
        return f"n_bits={self.config.n_bits}, enabled={self.enabled}"


#: name -> (config class, quantizer class)
QUANTIZERS: Registry[tuple[type[QuantizerConfig], type[Quantizer]]] = Registry("quantizer")


def register_quantizer(config_cls: type[QuantizerConfig]) -> Callable[[type[Quantizer]], type[Quantizer]]:
    """Class decorator: registers a quantizer class with its config class under ``config_cls.name``."""

    return QUANTIZERS.register_config(config_cls)


def config_class(name: str) -> type[QuantizerConfig]:
    """The config dataclass registered as ``name`` (a failed lookup lists the known names)."""
    return QUANTIZERS.get(name)[0]


def build_quantizer(config: QuantizerConfig, num_channels: int | None = None, channel_axis: int = 0,
                    group_count: int | None = None) -> Quantizer:
    """Builds the quantizer module for ``config`` (dispatch on its registered ``name``).

    Args:
        config: any registered quantizer config.
        num_channels: size of ``channel_axis`` (per-channel and per-group parameters).
        channel_axis: the axis of the channels of the tensors this quantizer sees (0 for weights, 1 for conv
            activations ``(B, C, H, W)``, -1 for linear activations ``(..., C)``).
        group_count: groups per channel (per-group weight quantizers).
    """
    _, cls = QUANTIZERS.get(config.name)
    return cls(config, num_channels=num_channels, channel_axis=channel_axis, group_count=group_count)


def quantizer_entry(q: Quantizer) -> dict[str, Any]:
    """``{"quantizer": name, <every config field>}``: enough to rebuild ``q``'s config exactly (export files)."""
    return {"quantizer": q.config.name, **dataclasses.asdict(q.config)}


def config_from_entry(entry: Any, ignore: tuple[str, ...] = ("shape",)) -> QuantizerConfig:
    """The config recorded by :func:`quantizer_entry` (keys in ``ignore`` are allowed and skipped).

    Raises:
        ValueError: not an object with a known ``quantizer`` name, unknown fields, non-integer bits, or a field
            the config rejects; the message says which.
    """
    if not isinstance(entry, dict) or "quantizer" not in entry:
        raise ValueError(f"must be an object with a 'quantizer' name, got {entry!r}")
    try:
        cls = config_class(entry["quantizer"])
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(entry) - fields - {"quantizer", *ignore})
    if unknown:
        raise ValueError(f"has unknown fields {unknown} for quantizer {entry['quantizer']!r} (allowed: "
                         f"{sorted(fields)}); was it written by a newer DiffQAT?")
    bits = entry.get("n_bits")
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"declared bits n_bits={bits!r} are not supported (an integer)")
    try:
        return cls(**{k: v for k, v in entry.items() if k in fields})
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid quantizer config: {err}") from None
