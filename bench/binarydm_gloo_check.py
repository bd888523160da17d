"""The LSUN-Bedrooms BinaryDM recipe at full LDM-4 size on CPU processes: 2 processes (torchrun, gloo) against 1.

    python bench/binarydm_gloo_check.py                        # random 274.1M-parameter teacher, 6 steps
    python bench/binarydm_gloo_check.py --teacher /tmp/bed --steps 6 --out /tmp/gloo
    python bench/binarydm_gloo_check.py --teacher /tmp/bed32 --base-channels 32   # 5.6M parameters: minutes on 2 cores

Runs ``configs/binarydm_ldm4_bedrooms.yaml`` twice on a random-weight teacher of the converter's layout
(``bench/make_random_ldm4.py --layout lsun_bedrooms-ldm-vq-4``, written to ``--teacher`` if missing), shrunk to a few
steps: once as 1 process with a trajectory batch of 2, once as ``torchrun --nproc_per_node=2`` with 1 per process
(the same samples: each rank walks its slice of the global batch). Both runs go through the 5-group progressive
warm-up and drop the second basis at half the steps, and both fit the LRM bases from the teacher (rank 0's,
broadcast). Prints the wall times, whether every integer state (warm-up flags, basis counts) is equal, and the
relative Frobenius distance of the whole trained float state, ``||a - b|| / ||a||`` over every float tensor of the
saved students (summation order differs between one batch of 2 and two gradients of 1 averaged by DDP).

Memory: about 7 GB per process (teacher, student, gradients, AdamW state, fp32). At full size a step takes minutes on a
2-core CPU; ``--base-channels 32`` writes the same layout at 1/7 of the width (the same 25 blocks, attention, warm-up
groups and two-basis scope) when the teacher is missing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

SHRINK = ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
          "trainer.log_every_n_steps=1", "trajectories.num_steps=4", "calibration.num_trajectories=2",
          "calibration.num_steps=4", "calibration.max_batches=2", "monitor.sample_every_n_steps=0",
          "monitor.telemetry_every_n_steps=0", "eval.enabled=false", "export=false", "trainer.deterministic=true"]


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[bool, float]:
    """(every non-float tensor equal, ``||a - b|| / ||a||`` over the float tensors), for two state dicts."""
    if a.keys() != b.keys():
        raise ValueError(f"the students differ in keys: {sorted(a.keys() ^ b.keys())[:5]}")
    ints = all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())
    floats = [k for k in a if a[k].is_floating_point()]
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in floats) ** 0.5
    norm = sum(float(a[k].double().pow(2).sum()) for k in floats) ** 0.5
    return ints, diff / norm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="/tmp/ldm4-random-lsun_bedrooms-ldm-vq-4")
    parser.add_argument("--out", default="/tmp/binarydm-gloo")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--port", type=int, default=29541)
    parser.add_argument("--base-channels", type=int, default=None, help="width of a teacher written here (default: "
                        "the layout's 224)")
    args = parser.parse_args()
    teacher, out = Path(args.teacher), Path(args.out)
    if not (teacher / "unet").is_dir():
        width = [] if args.base_channels is None else ["--base-channels", str(args.base_channels)]
        subprocess.run([sys.executable, str(REPO / "bench" / "make_random_ldm4.py"), "--output", str(teacher),
                        "--layout", "lsun_bedrooms-ldm-vq-4", *width], check=True)
    common = ["config=binarydm_ldm4_bedrooms.yaml", f"teacher.path={teacher}", f"trainer.max_steps={args.steps}",
              "overwrite=true", *SHRINK]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    runs = {"one": [sys.executable, "train.py", *common, f"output_dir={out / 'one'}", "trainer.devices=1",
                    "trajectories.batch_size=2"],
            "two": [torchrun, "--nproc_per_node=2", f"--master_port={args.port}", "train.py", *common,
                    f"output_dir={out / 'two'}", "trainer.devices=auto", "trajectories.batch_size=1"]}
    threads = {"one": str(os.cpu_count() or 1), "two": str(max(1, (os.cpu_count() or 2) // 2))}
    seconds = {}
    for name, cmd in runs.items():
        start = time.time()
        subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": threads[name]})
        seconds[name] = round(time.time() - start, 1)
    a = load_file(str(out / "one" / "student" / "student.safetensors"))
    b = load_file(str(out / "two" / "student" / "student.safetensors"))
    ints, rel = relative_distance(a, b)
    print(f"\n# {' '.join(sys.argv)}\nwall s: 1 process {seconds['one']}, 2 processes {seconds['two']}; "
          f"integer state equal: {ints}; relative Frobenius distance of the float state: {rel:.3e}")


if __name__ == "__main__":
    main()
