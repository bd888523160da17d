#!/usr/bin/env bash
# The EfficientDM W4A4 recipe in the original code's configuration against DiffQAT's fast one, on
# the same number of (x_t, t) samples, in one script; prints training time, throughput and held-out eps-MSE of both.
#
#   STEPS=256 bash bench/efficientdm_speedup.sh      # LDM-4 layout, random weights (bench/make_random_ldm4.py), GPU
#   CONFIG=efficientdm_digits.yaml TEACHER= STEPS=40 FAST_STUDENT=eager bash bench/efficientdm_speedup.sh  # CPU check
#
# original: trainer.precision=32-true, eager, composite STE (performance.fused_fake_quant=false), online trajectories,
#           2 per update (the reference code's setting, the baseline), STEPS updates: 2 * STEPS samples.
# fast:     bf16 autocast, fused STE, the same samples in FAST_BATCH per update (2 * STEPS / FAST_BATCH updates),
#           learning rates x LR_MULT, + FAST_EXTRA overrides. FAST_STUDENT picks the compilation:
#             graphs (default): the student's blocks compiled and replayed as CUDA graphs (performance.compile_blocks,
#                     compile_mode=reduce-overhead; minutes of compilation), the teacher eager (in the cached mode it
#                     only generates the cache and the evaluation's trajectories);
#             kernels: the student eager with compiled quantizer kernels, the teacher compiled (seconds to compile);
#             eager: nothing compiled (CPU checks).
#           FAST_MODE=cached (default): the teacher first generates ceil(2 * STEPS / NUM_STEPS) whole trajectories
#           into a cache, then each update takes FAST_BATCH shuffled (x_t, t) samples of mixed timesteps;
#           FAST_MODE=online walks FAST_BATCH trajectories in lock step as the original (with few updates, these
#           cover only the first timesteps of one trajectory batch).
# Both use trajectories of NUM_STEPS DDIM steps (a shortened schedule: the paper walks 100-step trajectories for
# 16,000 updates) and the same held-out trajectories for eps-MSE. Time = trajectory generation (the cache) + training.
# RUNS="original" or "fast" runs one of them; the table reads every run found in OUT_DIR, so the two can run in
# separate processes (or calls) that share OUT_DIR. Extra arguments go to both runs.
set -euo pipefail
config=${CONFIG:-efficientdm_ldm4.yaml}
teacher=${TEACHER-/tmp/ldm4-random}
num_steps=${NUM_STEPS:-20}
steps=${STEPS:-200}
fast_batch=${FAST_BATCH:-8}
lr_mult=${LR_MULT:-4}
fast_mode=${FAST_MODE:-cached}
case ${FAST_STUDENT:-graphs} in
  graphs) fast_student=(performance.compile=true performance.compile_blocks=true performance.compile_mode=reduce-overhead
            performance.compile_teacher=false) ;;
  kernels) fast_student=(performance.compile_kernels=true performance.compile_teacher=true) ;;
  eager) fast_student=(performance.compile_kernels=false performance.compile_teacher=false) ;;
  *) echo "FAST_STUDENT: graphs, kernels or eager, not $FAST_STUDENT"; exit 2 ;;
esac
out=${OUT_DIR:-/tmp/efficientdm-speedup}
if [ -n "$teacher" ]; then
  [ -d "$teacher/unet" ] || python3 bench/make_random_ldm4.py --output "$teacher"
  teacher_arg=(teacher.path="$teacher")
else
  teacher_arg=()
fi
fast_steps=$(( steps * 2 / fast_batch ))
fast_data=(trajectories.batch_size="$fast_batch")
if [ "$fast_mode" = cached ]; then
  fast_data+=(trajectories.mode=cached trajectories.num_trajectories=$(( (steps * 2 + num_steps - 1) / num_steps )))
fi
read -r lora_lr act_lr w_lr < <(python3 -c "
import sys
from train.config import load_config
o = load_config(sys.argv[1:]).efficientdm
print(o.lora_lr * $lr_mult, o.act_step_lr * $lr_mult, o.weight_step_lr * $lr_mult)" config="$config" "${teacher_arg[@]}")
common=(config="$config" "${teacher_arg[@]}" trainer.enable_progress_bar=false trainer.log_every_n_steps=1
  export=false trajectories.num_steps="$num_steps" efficientdm.num_timesteps="$num_steps"
  eval.num_steps="$num_steps" eval.sampling_steps="$num_steps" eval.num_trajectories=4 eval.num_samples=16
  eval.features=none eval.grid_size=4 calibration.num_trajectories=2 calibration.num_steps="$num_steps"
  calibration.max_batches=4 monitor.sample_every_n_steps=0 monitor.sample_steps=2 monitor.telemetry_every_n_steps=0
  monitor.checkpoint_every_n_steps=100000)
run() {  # name, overrides...
  local name=$1; shift
  rm -rf "$out/$name"
  python3 train.py "${common[@]}" output_dir="$out/$name" "$@" > "$out/$name.log" 2>&1 \
    || { echo "$name FAILED (log: $out/$name.log)"; tail -20 "$out/$name.log"; exit 1; }
}
mkdir -p "$out"
for name in ${RUNS:-original fast}; do
  case $name in
    original) run original trainer.precision=32-true performance.fused_fake_quant=false \
                performance.compile_kernels=false trajectories.batch_size=2 trainer.max_steps="$steps" "$@" ;;
    fast) run fast trainer.precision=bf16-mixed performance.fused_fake_quant=true "${fast_student[@]}" \
            "${fast_data[@]}" trainer.max_steps="$fast_steps" \
            efficientdm.lora_lr="$lora_lr" efficientdm.act_step_lr="$act_lr" efficientdm.weight_step_lr="$w_lr" ${FAST_EXTRA:-} "$@" ;;
    *) echo "RUNS: original and/or fast, not $name"; exit 2 ;;
  esac
done
python3 - "$out" "$steps" "$fast_steps" "$fast_batch" <<'PY'
import json, re, statistics, sys
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
out, steps, fast_steps, fast_batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rows = {}
for name, updates, batch in (("original", steps, 2), ("fast", fast_steps, fast_batch)):
    if not (out / name / "report.json").is_file():
        print(f"no {name} run in {out} (RUNS={name} with the same OUT_DIR, STEPS and FAST_BATCH runs it)")
        continue
    log = (out / f"{name}.log").read_text()  # the cache's generation counts: it is part of the recipe's time
    train_s = sum(float(re.search(rf"\[diffqat\] {phase}: ([0-9.]+) s", log).group(1))
                  for phase in ("trajectories ready", "training"))
    acc = EventAccumulator(str(out / name / "tensorboard")); acc.Reload()
    rates = [e.value for e in acc.Scalars("perf/samples_per_s")]
    rate = statistics.median(rates[len(rates) // 4:])  # the last three quarters: past compilation and warm-up
    v = json.loads((out / name / "report.json").read_text())["variants"]
    rows[name] = (updates, batch, updates * batch, train_s, rate, v["ptq"]["eps_mse"], v["qat"]["eps_mse"])
print("| configuration | updates | samples / update | (x_t, t) samples | generation + training s | samples/s (steady) "
      "| eps-MSE PTQ | eps-MSE trained |\n|---|---|---|---|---|---|---|---|")
for name, r in rows.items():
    print(f"| {name} | {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.5g} | {r[6]:.5g} |")
if len(rows) < 2:
    sys.exit(0)
o, f = rows["original"], rows["fast"]
print(f"\nspeed-up, training wall time (compilation included): {o[3] / f[3]:.2f}x; steady samples/s: "
      f"{f[4] / o[4]:.2f}x (target: >= 10x at equal or lower eps-MSE); trained eps-MSE fast / original: "
      f"{f[6] / o[6]:.3f}")
PY
