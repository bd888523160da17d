"""Feature taps: the outputs of named modules, captured during a forward by forward hooks.

    with FeatureTaps(student, ["down_blocks.*.attentions.*", "mid_block"]) as taps:
        out = student(x, t, ...)
    taps.features            # {"down_blocks.0.attentions.0": (B, C, H, W), ..., "mid_block": ...}

Names are resolved once from module-name patterns (:func:`qat.prepare.match`); a pattern that matches no module is
an error. A module that returns a tuple or a diffusers output object contributes its first tensor (diffusers blocks
return ``(hidden_states, residuals)``). Features keep their autograd graph (a student's feature loss back-propagates
through them); under ``torch.no_grad`` (a teacher) they hold none. A module called several times in one forward keeps
its last output.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from qat.prepare import match

__all__ = ["FeatureTaps", "resolve_taps"]


def resolve_taps(model: nn.Module, patterns: list[str]) -> list[str]:
    """The module names of ``model`` matched by ``patterns``, in module order.

    Raises:
        ValueError: a pattern matches no module (the message shows what names look like).
    """
    names = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for p in patterns:
        hits = [n for n in names if match(n, p)]
        if not hits:
            raise ValueError(f"feature tap {p!r} matches no module of {type(model).__name__}; module names look "
                             f"like {names[:5]}")
        out += [n for n in hits if n not in out]
    order = {n: i for i, n in enumerate(names)}
    return sorted(out, key=order.__getitem__)


def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[0])
    if hasattr(output, "to_tuple"):  # diffusers BaseOutput
        return _first_tensor(output.to_tuple())
    raise TypeError(f"a tapped module returned {type(output).__name__}, which holds no tensor")


class FeatureTaps:
    """Context manager capturing the outputs of the modules of ``model`` matching ``patterns``.

    Args:
        model: the model to tap.
        patterns: module-name patterns, resolved on ``model``.
        names: exact module names instead (e.g. resolved once on a teacher and tapped on its student too: a
            pattern such as ``up_blocks.*`` would also match a student's quantizers and adapters).

    Attributes:
        names: the resolved module names, in module order.
        features: name -> output of the last forward inside the context.
    """

    def __init__(self, model: nn.Module, patterns: list[str] | None = None, names: list[str] | None = None) -> None:
        self.model = model
        self.names = list(names) if names is not None else resolve_taps(model, patterns) if patterns else []
        self.features: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> FeatureTaps:
        self.features = {}
        for name in self.names:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):  # noqa: ANN202 - a forward hook
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.features[name] = _first_tensor(output)

        return hook

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
