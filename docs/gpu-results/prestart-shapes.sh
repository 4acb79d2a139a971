#!/usr/bin/env bash
# Measured the tree of commit d759689 (the actors' prestart), reverted in the next commit: on this tree SDF_RAY_PRESTART no
# longer changes `sdf-ray reconstruct`.
# Issue 12 on one H200: the optimiser actors' processes prestarted (SDF_RAY_PRESTART=1, the default) against not,
# alternating, for `sdf-ray reconstruct` of 64 held-out shapes (one batch: the run is its start-up), warm cache.
#
#   source .gpu/gpu-env.sh; bash docs/gpu-results/prestart-shapes.sh 2>&1 | tee docs/gpu-results/prestart-shapes-DATE.txt
set -uo pipefail
W=${W:-/tmp/prestart-shapes}
PY=${PY:-python3}
RUNS=${RUNS:-"0 1 0 1 0"}   # SDF_RAY_PRESTART per run; the first fills the compile cache
source "$(dirname "$0")/common.sh"

section "data and a model (deepsdf.yaml, 5 steps: the start-up does not depend on the model's quality)"
$PY -m sdf_ray.cli data synth --out "$W/train" --num-scenes 64 --samples-per-scene 16384 --seed 100 --surface-samples 0 >/dev/null
$PY -m sdf_ray.cli data synth --out "$W/held-out" --num-scenes 64 --samples-per-scene 16384 --seed 7 >/dev/null
$PY -m sdf_ray.cli train --config sdf_ray/configs/deepsdf.yaml --set "data.path=$W/train" --set optim.num_epochs=5 \
  --set "checkpoint.storage_path=$W/runs" --set checkpoint.run_name=model --overwrite 2>&1 | tail -1
for p in $RUNS; do
  section "reconstruct 64 shapes, 200 iterations, 128^3, SDF_RAY_PRESTART=$p"
  rm -rf "$W/rec"
  t0=$(now)
  SDF_RAY_PRESTART=$p timeout 120 $PY -m sdf_ray.cli reconstruct --run "$W/runs/model" --data "$W/held-out" \
    --out "$W/rec" --set reconstruct.num_iterations=200 --set reconstruct.mesh_resolution=128 2>&1 \
    | grep "first shape done\|actor_\|first_\|ray_start\|launch\|warning"
  echo "exit code ${PIPESTATUS[0]}; command wall time $(since "$t0") s"
  $PY -c "import json, sys; s = json.load(open(sys.argv[1])); print('prestart requested', s.get('startup_prestart_requested'), 'used', s.get('startup_prestarted'))" "$W/rec/summary.json"
done
section "done"
