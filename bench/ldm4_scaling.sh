#!/usr/bin/env bash
# Data-parallel scaling of the EfficientDM LDM-4 recipe on random weights (bench/make_random_ldm4.py): training
# throughput and peak GPU memory for each strategy and process count, one short run each.
#   NPROCS="1 2 4" STRATEGIES="ddp deepspeed_stage_2" STEPS=40 bash bench/ldm4_scaling.sh
# Prints one row per run: strategy, processes, global (x_t, t) samples/s (median of the logged steps after warm-up,
# per process x processes), scaling efficiency against 1 process of the same strategy, peak memory per GPU.
# Each process walks trajectories.batch_size trajectories (2 by default, the paper's setting), so the global batch
# grows with the process count (weak scaling). DeepSpeed needs `pip install deepspeed`.
# Threads: a plain 1-process run uses all cores, while torchrun sets OMP_NUM_THREADS=1 for each of its processes,
# which alone cost the 1-process run 25% (docs/results.md). THREADS=split gives every process nproc / n threads
# (OMP_NUM_THREADS, honoured by torchrun), THREADS=<k> k threads; unset keeps the launchers' defaults.
set -euo pipefail
teacher=${TEACHER:-/tmp/ldm4-random}
steps=${STEPS:-40}
[ -d "$teacher/unet" ] || python3 bench/make_random_ldm4.py --output "$teacher"
results=${RESULTS:-/tmp/ldm4-scaling.tsv}
logs=${LOGDIR:-/tmp}  # one <strategy>-<n>.log per run, with the trainer's setup-phase timings
mkdir -p "$logs"
: > "$results"
for strategy in ${STRATEGIES:-ddp}; do
  for n in ${NPROCS:-1 2}; do
    out=/tmp/ldm4-scaling-$strategy-$n
    log=$logs/ldm4-scaling-$strategy-$n.log
    rm -rf "$out"
    start=$(date +%s)
    case ${THREADS:-} in
      "") ;;
      split) export OMP_NUM_THREADS=$(( $(nproc) / n > 0 ? $(nproc) / n : 1 )) ;;
      *) export OMP_NUM_THREADS=$THREADS ;;
    esac
    launcher=(timeout "${RUN_TIMEOUT:-1800}" python3)
    [ "$n" -gt 1 ] && launcher=(timeout "${RUN_TIMEOUT:-1800}" torchrun --nproc_per_node="$n" --master_port=$((29600 + n)))
    "${launcher[@]}" train.py config=efficientdm_ldm4.yaml teacher.path="$teacher" output_dir="$out" \
      trainer.strategy="$strategy" trainer.max_steps="$steps" trainer.enable_progress_bar=false \
      trainer.log_every_n_steps=1 eval.enabled=false export=false calibration.num_trajectories=2 \
      calibration.num_steps=4 calibration.max_batches=2 efficientdm.act_init=minmax monitor.sample_every_n_steps=0 \
      monitor.sample_steps=2 ${EXTRA:-} \
      monitor.telemetry_every_n_steps=0 monitor.checkpoint_every_n_steps=100000 > "$log" 2>&1 \
      || { echo "$strategy $n FAILED (log: $log)"; tail -20 "$log"
           [ "$n" -eq 1 ] && continue 2  # the strategy fails on one process: skip its larger runs
           continue; }
    echo "$strategy $n: $(( $(date +%s) - start )) s wall; $(grep '^\[diffqat\]' "$log" | tr '\n' ';')"
    python3 - "$out" "$strategy" "$n" >> "$results" <<'PY'
import statistics, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
out, strategy, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
acc = EventAccumulator(f"{out}/tensorboard"); acc.Reload()
rate = statistics.median(e.value for e in acc.Scalars("perf/samples_per_s")[5:])  # skip warm-up
mem = max(e.value for e in acc.Scalars("perf/max_memory_gib")) if "perf/max_memory_gib" in acc.Tags()["scalars"] else float("nan")
print(f"{strategy}\t{n}\t{rate * n:.2f}\t{mem:.1f}")
PY
  done
done
echo -e "strategy\tprocesses\tsamples/s (global)\tscaling efficiency\tpeak GiB per GPU"
awk -F'\t' '{ if ($2 == 1) base[$1] = $3; eff = ($1 in base) ? sprintf("%.0f%%", 100 * $3 / ($2 * base[$1])) : "-";
             print $1 "\t" $2 "\t" $3 "\t" eff "\t" $4 }' "$results"
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true
