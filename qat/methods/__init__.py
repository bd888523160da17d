"""One file per paper method. Each registers its ``build_student(denoiser, config)`` under its name."""

from __future__ import annotations

from qat.registry import Registry

__all__ = ["METHODS", "register_method"]

METHODS: Registry = Registry("method")
register_method = METHODS.register

# Importing the method modules registers them.
from qat.methods import efficientdm  # noqa: E402, F401
