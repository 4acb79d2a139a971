#!/usr/bin/env bash
# Issue 14 on one H200, session 10: the 40-step job (deepsdf.yaml on 512 generated scenes, bf16 + compile) with
# Ray Train's controller and worker processes prestarted by the embedded Ray's raylet (ray_session.prestart_train_processes)
# and without (SDF_RAY_PRESTART=0), alternating, warm compile cache after the first run; bytecode as pip has it.
#
#   source .gpu/gpu-env.sh; bash docs/gpu-results/prestart.sh
set -uo pipefail
W=${W:-/tmp/issue14-s10}
PY=${PY:-python3}
source "$(dirname "$0")/common.sh"
NUM_SCENES=${NUM_SCENES:-512}; SAMPLES=${SAMPLES:-16384}; CONFIG=${CONFIG:-sdf_ray/configs/deepsdf.yaml}
section "data: $NUM_SCENES scenes x $SAMPLES samples"
$PY -m sdf_ray.cli data synth --out "$W/d" --num-scenes "$NUM_SCENES" --samples-per-scene "$SAMPLES" --seed 0 \
  --surface-samples 0
FAST=(--config "$CONFIG" --set "data.path=$W/d" --set optim.precision=auto --set model.compile=auto
      --set optim.num_epochs=5 --set logging.every_n_steps=8 --set checkpoint.every_n_epochs=5
      --set "checkpoint.storage_path=$W/runs" --set checkpoint.run_name=job40 --overwrite)
RUNS=${RUNS-"cold:1 warm:1 warm:0 warm:1 warm:0 warm:1 warm:0"}
for run in $RUNS; do
  cache=${run%%:*}; prestart=${run##*:}
  section "40-step job, $cache compile cache, SDF_RAY_PRESTART=$prestart"
  t0=$(now)
  SDF_RAY_PRESTART=$prestart timeout 200 $PY -m sdf_ray.cli train "${FAST[@]}" 2>&1 | grep -v "^\s*$" | tail -22
  echo "command wall time $(since "$t0") s"
  $PY -c "import json,sys; s=json.load(open(sys.argv[1])); print('startup_prestarted', s.get('startup_prestarted'), '| first step', s.get('perf/startup_seconds'))" "$W/runs/job40/summary.json"
done
section "done"
