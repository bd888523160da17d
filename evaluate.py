"""Re-evaluates a trained, checkpointed or exported student: ``python evaluate.py <source> [key=value ...]``.

See :mod:`train.eval_cli` for the accepted sources and keys.
"""

from train.eval_cli import main

if __name__ == "__main__":
    main()
