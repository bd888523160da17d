#!/usr/bin/env bash
# GPU smoke run of a full-size video recipe on random weights (bench/make_random_video.py): Wan 2.1 1.3B or
# CogVideoX-2B at the recipe's sample shape, CFG, trajectory grid and batch, with gradient checkpointing.
# Usage: CONFIG=qvgen_wan21_1_3b.yaml [STEPS=12] bash bench/video_recipe_smoke.sh [extra key=value overrides]
# The family comes from the recipe's name (*wan* or *cogvideox*). Text states are random (the text encoder is
# replaced by its output); calibration and evaluation are shortened (one trajectory, 10 sampling steps, 2 videos)
# and the run has STEPS updates, so that QVGen's rank decay passes through all its phases (12 = 6 phases of 2).
# Prints the report, the step time, and per logged step the rank of the auxiliary branch and the peak GPU memory
# so far (from TensorBoard). Quality numbers are meaningless (random teacher).
set -euo pipefail
config=${CONFIG:?set CONFIG to a video recipe}
family=wan
[[ $config == *cogvideox* ]] && family=cogvideox
teacher=${TEACHER:-/tmp/random-$family}
out=${RUN_DIR:-/tmp/video-smoke-${config%.yaml}}
[ -d "$teacher/transformer" ] || python3 bench/make_random_video.py --family "$family" --out "$teacher"
start=$(date +%s)
python3 train.py config="$config" teacher.path="$teacher" teacher.conditioning=prompt_embeds \
  teacher.prompt_embeds_path="$teacher/prompt_embeds.safetensors" output_dir="$out" overwrite=true \
  trainer.max_steps="${STEPS:-12}" optim.warmup_steps=0 performance.gradient_checkpointing=true \
  trainer.enable_progress_bar=false trainer.log_every_n_steps=1 \
  calibration.num_trajectories=1 calibration.num_steps=10 calibration.max_batches=4 \
  eval.num_trajectories=1 eval.num_steps=10 eval.sampling_steps=10 eval.num_samples=2 eval.batch_size=1 \
  monitor.telemetry_every_n_steps=0 monitor.checkpoint_every_n_steps=1000 "$@"
echo "wall time: $(( $(date +%s) - start )) s"
cat "$out/report.md"
python3 - "$out" <<'PY'
import statistics, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(f"{sys.argv[1]}/tensorboard", size_guidance={"scalars": 0}); acc.Reload()
tags = acc.Tags()["scalars"]
rates = [e.value for e in acc.Scalars("perf/samples_per_s")][2:]  # skip warm-up
print(f"train step: median {1 / statistics.median(rates):.2f} s per (x_t, t) sample over {len(rates)} logged steps")
rank = {e.step: e.value for e in acc.Scalars("method/aux_rank")} if "method/aux_rank" in tags else {}
mem = {e.step: e.value for e in acc.Scalars("perf/max_memory_gib")} if "perf/max_memory_gib" in tags else {}
for step in sorted(set(rank) | set(mem)):
    print(f"step {step}: aux rank {rank.get(step, '-')}, peak GPU memory so far {mem.get(step, float('nan')):.2f} GiB")
PY
nvidia-smi --query-gpu=name,memory.used --format=csv
