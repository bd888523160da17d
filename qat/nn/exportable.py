"""How a quantized module type exports itself: the protocol :mod:`qat.export` drives, and its registry.

An export stores, for each module of a registered kind, a JSON entry (what to build) and its tensors (packed
codes, quantizer tables, ...), and every other tensor of the model as it is. Loading builds the float model, then
calls each recorded kind's :meth:`Exportable.install_exported` at the recorded name, checks the file's keys against
:meth:`Exportable.exported_keys`, and lets the module turn its tensors back into state with
:meth:`Exportable.load_exported`. So a new module type (a method's binarized conv, a cross-timestep blend) exports
and reloads by implementing this protocol and registering itself with :func:`register_exportable`, without an
edit to :mod:`qat.export`.

All keys a module handles are relative to the module (``weight.packed``, ``act_quantizer.step``); the export adds
the module's name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor, nn

from qat.registry import Registry

__all__ = ["Exportable", "EXPORTABLE", "register_exportable", "ExportTensorError"]


class ExportTensorError(ValueError):
    """A stored tensor of a module does not fit it; ``key`` is relative to the module."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)


@runtime_checkable
class Exportable(Protocol):
    """What a module of a registered kind provides to :func:`qat.export_quantized` / :func:`qat.load_quantized`."""

    export_kind: ClassVar[str]

    def exports(self) -> bool:
        """Whether this instance is recorded (a quantized layer without quantizers stays a plain float layer)."""

    def export_entry(self) -> dict[str, Any]:
        """A JSON-serialisable description (``"kind"`` is added by the export) from which
        :meth:`install_exported` rebuilds the module."""

    def export_tensors(self) -> tuple[dict[str, Tensor], list[str]]:
        """``(tensors to store, state-dict keys they replace)``; the other state keys are stored as they are."""

    @classmethod
    def install_exported(cls, root: nn.Module, name: str, entry: dict[str, Any]) -> nn.Module:
        """Builds the module from ``entry`` into the float model ``root`` at ``name`` and returns it.

        Raises:
            ValueError: the entry does not fit the model (the message says what).
        """

    def exported_keys(self) -> tuple[list[str], list[str]]:
        """``(keys the file must hold, state-dict keys not in the file)`` for this installed module."""

    def load_exported(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """State-dict entries for the replaced keys, from this module's stored tensors.

        Raises:
            ExportTensorError: a tensor does not fit (its relative key and why).
        """


#: kind -> module class
EXPORTABLE: Registry[type[nn.Module]] = Registry("exportable module kind")


def register_exportable(kind: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: registers a module class under ``kind`` (stored in export files) and sets ``export_kind``."""

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        cls.export_kind = kind
        return EXPORTABLE.register(kind)(cls)

    return decorator
