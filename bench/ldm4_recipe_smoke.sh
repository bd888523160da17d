#!/usr/bin/env bash
# GPU smoke run of the real-size EfficientDM LDM-4 recipe on random weights (bench/make_random_ldm4.py).
# Usage: [LAUNCH="accelerate launch --num_processes=1"] bash bench/ldm4_recipe_smoke.sh [extra key=value overrides]
# Prints the run summary and the median training throughput from TensorBoard. Quality numbers are meaningless
# (random teacher); the point is that the recipe runs end to end on a GPU and how fast a step is.
set -euo pipefail
teacher=${TEACHER:-/tmp/ldm4-random}
out=${RUN_DIR:-/tmp/ldm4-smoke}
[ -d "$teacher/unet" ] || python3 bench/make_random_ldm4.py --output "$teacher"
start=$(date +%s)
${LAUNCH:-python3} train.py config=efficientdm_ldm4.yaml teacher.path="$teacher" output_dir="$out" \
  trainer.max_steps=60 trainer.enable_progress_bar=false trainer.log_every_n_steps=5 \
  calibration.num_trajectories=4 calibration.num_steps=20 calibration.max_batches=8 \
  eval.num_trajectories=2 eval.num_steps=20 monitor.sample_labels=[88,417] monitor.sample_steps=20 \
  monitor.sample_every_n_steps=0 monitor.telemetry_every_n_steps=30 monitor.checkpoint_every_n_steps=60 "$@"
echo "wall time: $(( $(date +%s) - start )) s"
cat "$out/report.md"
python3 - "$out" <<'PY'
import statistics, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(f"{sys.argv[1]}/tensorboard"); acc.Reload()
rates = [e.value for e in acc.Scalars("perf/samples_per_s")][2:]  # skip warm-up
print(f"train step: median {statistics.median(rates):.1f} (x_t, t) samples/s over {len(rates)} logged steps")
PY
nvidia-smi --query-gpu=name,memory.used --format=csv
