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
job40_setup  # the data and the job's arguments (FAST), common.sh
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
