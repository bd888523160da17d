#!/usr/bin/env bash
# GPU smoke run of a real-size LDM-4 recipe on random weights (bench/make_random_ldm4.py).
# Usage: [LAUNCH="accelerate launch --num_processes=1"] [CONFIG=binarydm_ldm4_bedrooms.yaml] \
#          bash bench/ldm4_recipe_smoke.sh [extra key=value overrides]
# CONFIG defaults to efficientdm_ldm4.yaml (cin256-v2 layout); a recipe named *bedrooms* gets the random
# lsun_bedrooms-ldm-vq-4 layout. Prints the run summary, the median training throughput and the peak GPU memory of
# training from TensorBoard. Quality numbers are meaningless (random teacher); the point is that the recipe runs end
# to end on a GPU, how fast a step is and how much memory it takes.
set -euo pipefail
config=${CONFIG:-efficientdm_ldm4.yaml}
layout=cin256-v2
[[ $config == *bedrooms* ]] && layout=lsun_bedrooms-ldm-vq-4
teacher=${TEACHER:-/tmp/ldm4-random-$layout}
out=${RUN_DIR:-/tmp/ldm4-smoke-${config%.yaml}}
[ -d "$teacher/unet" ] || python3 bench/make_random_ldm4.py --output "$teacher" --layout "$layout"
start=$(date +%s)
${LAUNCH:-python3} train.py config="$config" teacher.path="$teacher" output_dir="$out" overwrite=true \
  trainer.max_steps=60 trainer.enable_progress_bar=false trainer.log_every_n_steps=5 \
  calibration.num_trajectories=4 calibration.num_steps=20 calibration.max_batches=8 \
  eval.num_trajectories=2 eval.num_steps=20 eval.sampling_steps=20 monitor.sample_steps=20 \
  monitor.sample_every_n_steps=0 monitor.telemetry_every_n_steps=30 monitor.checkpoint_every_n_steps=60 "$@"
echo "wall time: $(( $(date +%s) - start )) s"
cat "$out/report.md"
python3 - "$out" <<'PY'
import statistics, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(f"{sys.argv[1]}/tensorboard"); acc.Reload()
rates = [e.value for e in acc.Scalars("perf/samples_per_s")][2:]  # skip warm-up
print(f"train step: median {statistics.median(rates):.1f} (x_t, t) samples/s over {len(rates)} logged steps")
if "perf/max_memory_gib" in acc.Tags()["scalars"]:
    print(f"peak GPU memory in training: {max(e.value for e in acc.Scalars('perf/max_memory_gib')):.2f} GiB")
PY
nvidia-smi --query-gpu=name,memory.used --format=csv
