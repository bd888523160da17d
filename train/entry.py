"""Command-line entry points: a failure is one paragraph on stderr and exit status 1, not a traceback.

    python train.py ...                      # "error: output_dir: runs/x already holds a run (...); ..."
    DIFFQAT_DEBUG=1 python train.py ...      # the full traceback (or pass --debug)

The messages of DiffQAT's own checks name the key or file and the fix; a traceback helps only when reporting a bug.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["run_entry", "DEBUG_ENV"]

DEBUG_ENV = "DIFFQAT_DEBUG"


def run_entry(main: Callable[[], Any], argv: list[str] | None = None) -> None:
    """Runs ``main()``; on an exception prints ``error: <message>`` and exits 1, unless ``--debug`` is in ``argv``
    (default ``sys.argv``, from which it is removed) or ``DIFFQAT_DEBUG`` is set to a value other than 0."""
    args = sys.argv if argv is None else argv
    debug = os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    while "--debug" in args:
        args.remove("--debug")
        debug = True
    if debug:
        main()
        return
    try:
        main()
    except Exception as exc:  # noqa: BLE001 - the one place that turns any failure into a message
        text = str(exc).strip() or "(no message)"
        kind = "" if type(exc).__name__ in ("ConfigError", "ConfigProblems") else f"{type(exc).__name__}: "
        print(f"error: {kind}{text}\n(set {DEBUG_ENV}=1 or pass --debug for the traceback)", file=sys.stderr,
              flush=True)
        sys.exit(1)
