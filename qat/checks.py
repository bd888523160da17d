"""Config checks that report every problem at once.

Every config dataclass of DiffQAT (quantizers, losses, methods) lists its problems in ``problems()`` as
``(field, message)`` pairs and raises them together from ``__post_init__`` with :func:`raise_problems`, so that a
user fixing a config sees all of its mistakes in one message, and the run-config loader can prefix each field with
its full key (``efficientdm.weight_bits: must be in [2, 8], got 9``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["ConfigProblems", "raise_problems", "one_of", "at_least"]


class ConfigProblems(ValueError):
    """One or more invalid fields of a config.

    Attributes:
        problems: ``(field, message)`` pairs, e.g. ``("n_bits", "must be in [2, 8], got 9")``.
    """

    def __init__(self, problems: list[tuple[str, str]] | str) -> None:
        # a plain message (as libraries re-raise an exception type with a formatted text) has no field
        self.problems = [("", problems)] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(f"{key}: {msg}" if key else msg for key, msg in self.problems))


def raise_problems(problems: Iterable[tuple[str, str]]) -> None:
    """Raises :class:`ConfigProblems` when ``problems`` is not empty."""
    problems = list(problems)
    if problems:
        raise ConfigProblems(problems)


def one_of(field: str, value: Any, allowed: Iterable[Any]) -> list[tuple[str, str]]:
    """``[(field, "must be one of [...], got ...")]`` when ``value`` is not allowed, else ``[]``."""
    allowed = list(allowed)
    return [] if value in allowed else [(field, f"must be one of {allowed}, got {value!r}")]


def at_least(field: str, value: int | float, low: int | float) -> list[tuple[str, str]]:
    """``[(field, "must be >= low, got value")]`` when ``value < low``, else ``[]``."""
    return [] if value >= low else [(field, f"must be >= {low}, got {value}")]
