"""DiffQAT training entry point.

    python train.py config=efficientdm_digits.yaml [key=value ...]
    accelerate launch train.py config=efficientdm_ldm4.yaml teacher.path=/models/ldm4-cin256
    torchrun --nproc_per_node=4 train.py config=efficientdm_ldm4.yaml

See ``train/cli.py`` for the steps and ``train/config.py`` for every key.
"""

from train.cli import main
from train.entry import run_entry

if __name__ == "__main__":
    run_entry(main)
