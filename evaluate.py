"""Re-evaluates a trained, checkpointed or exported student: ``python evaluate.py <source> [key=value ...]``.

See :mod:`train.eval.cli` for the accepted sources and keys.
"""

from train.entry import run_entry
from train.eval.cli import main

if __name__ == "__main__":
    run_entry(main)
