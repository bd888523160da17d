#!/usr/bin/env bash
# Data-parallel scaling of the EfficientDM LDM-4 recipe on random weights (bench/make_random_ldm4.py): training
# throughput and peak GPU memory for each strategy and process count, one short run each.
#   NPROCS="1 2 4" STRATEGIES="ddp deepspeed_stage_2" STEPS=40 bash bench/ldm4_scaling.sh
# Prints one row per run: strategy, processes, global (x_t, t) samples/s (samples of the steps after the first 5,
# over their summed step times, x processes: stalls count, unlike a median), scaling efficiency against 1 process of
# the same strategy, peak memory per GPU (rank 0). EXTRA="key=value ..." adds overrides to every run, e.g. a batch
# per process: EXTRA="trainer.precision=bf16-mixed trajectories.batch_size=16".
# Each process walks trajectories.batch_size trajectories (2 by default, the paper's setting), so the global batch
# grows with the process count (weak scaling). DeepSpeed needs `pip install deepspeed`.
# Threads: a plain 1-process run uses all cores, while torchrun sets OMP_NUM_THREADS=1 for each of its processes,
# which alone cost the 1-process run 25% (docs/results.md). THREADS=split gives every process nproc / n threads
# (OMP_NUM_THREADS, honoured by torchrun), THREADS=<k> k threads; unset keeps the launchers' defaults.
# STRATEGIES=independent runs n unrelated 1-process runs at once, one per GPU (no communication): its efficiency is
# what sharing the host alone costs, the ceiling for DDP on the same machine.
set -euo pipefail
teacher=${TEACHER:-/tmp/ldm4-random}
steps=${STEPS:-40}
[ -d "$teacher/unet" ] || python3 bench/make_random_ldm4.py --output "$teacher"
results=${RESULTS:-/tmp/ldm4-scaling.tsv}
logs=${LOGDIR:-/tmp}  # one <strategy>-<n>.log per run, with the trainer's setup-phase timings
mkdir -p "$logs"
: > "$results"
train_args=(config=efficientdm_ldm4.yaml teacher.path="$teacher" trainer.max_steps="$steps"
  trainer.enable_progress_bar=false trainer.log_every_n_steps=1 eval.enabled=false export=false
  calibration.num_trajectories=2 calibration.num_steps=4 calibration.max_batches=2 efficientdm.act_init=minmax
  monitor.sample_every_n_steps=0 monitor.sample_steps=2 monitor.telemetry_every_n_steps=0
  monitor.checkpoint_every_n_steps=100000)
batch=$(grep -o 'trajectories.batch_size=[0-9]*' <<< "${EXTRA:-}" | tail -1 | cut -d= -f2)
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
    dirs=("$out")
    if [ "$strategy" = independent ]; then
      # n unrelated 1-process runs at once, one per GPU: what sharing the host costs, without any communication
      dirs=(); pids=()
      for ((i = 0; i < n; i++)); do
        dirs+=("$out/$i")
        CUDA_VISIBLE_DEVICES=$i timeout "${RUN_TIMEOUT:-1800}" python3 train.py "${train_args[@]}" output_dir="$out/$i" overwrite=true \
          ${EXTRA:-} > "$log.$i" 2>&1 &
        pids+=($!)
      done
      ok=1; for pid in "${pids[@]}"; do wait "$pid" || ok=0; done
      cp "$log.0" "$log"
      [ $ok -eq 1 ] || { echo "$strategy $n FAILED (logs: $log.*)"; tail -20 "$log"; continue; }
    else
      launcher=(timeout "${RUN_TIMEOUT:-1800}" python3)
      [ "$n" -gt 1 ] && launcher=(timeout "${RUN_TIMEOUT:-1800}" torchrun --nproc_per_node="$n" --master_port=$((29600 + n)))
      "${launcher[@]}" train.py "${train_args[@]}" output_dir="$out" overwrite=true trainer.strategy="$strategy" ${EXTRA:-} \
        > "$log" 2>&1 \
        || { echo "$strategy $n FAILED (log: $log)"; tail -20 "$log"
             [ "$n" -eq 1 ] && continue 2  # the strategy fails on one process: skip its larger runs
             continue; }
    fi
    echo "$strategy $n: $(( $(date +%s) - start )) s wall; $(grep '^\[diffqat\]' "$log" | tr '\n' ';')"
    python3 - "$strategy" "$n" "${batch:-2}" "${dirs[@]}" >> "$results" <<'PY'
import statistics, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
strategy, n, batch, dirs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
total, mem, times = 0.0, float("nan"), []
for out in dirs:  # one run (rank 0 logs), or one per independent process
    acc = EventAccumulator(f"{out}/tensorboard"); acc.Reload()
    # each logged value is batch / step time; skip 5 warm-up steps, then samples over summed time = harmonic mean
    rates = [e.value for e in acc.Scalars("perf/samples_per_s")[5:]]
    total += statistics.harmonic_mean(rates) * (1 if strategy == "independent" else n)
    if "perf/max_memory_gib" in acc.Tags()["scalars"]:
        mem = max(e.value for e in acc.Scalars("perf/max_memory_gib"))
    times += [batch / r for r in rates]
times.sort()
p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
print(f"{strategy}\t{n}\t{total:.2f}\t{mem:.1f}\t{statistics.median(times):.3f}\t{p90:.3f}")
PY
  done
done
echo -e "strategy\tprocesses\tsamples/s (global)\tscaling efficiency\tpeak GiB per GPU\tstep s median\tstep s p90"
awk -F'\t' '{ if ($2 == 1) base[$1] = $3; eff = ($1 in base) ? sprintf("%.0f%%", 100 * $3 / ($2 * base[$1])) : "-";
             print $1 "\t" $2 "\t" $3 "\t" eff "\t" $4 "\t" $5 "\t" $6 }' "$results"
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true
