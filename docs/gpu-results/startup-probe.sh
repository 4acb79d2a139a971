#!/usr/bin/env bash
# Issue 14 on one H200: where a short job's start-up goes, finer than the run's own breakdown.
#
#   source .gpu/gpu-env.sh; bash docs/gpu-results/startup-probe.sh
#
# 1. imports and CUDA initialisation in a fresh process (torch, Ray, Ray Train);
# 2. the embedded Ray's start as `sdf-ray train` does it (connect_ray), RAY_INIT_RUNS times each for the variants
#    in RAY_INIT_VARIANTS ("default" and env assignments such as "RAY_USAGE_STATS_ENABLED=0");
# 3. the issue's 40-step job (deepsdf.yaml on 512 generated scenes, precision and compile auto: bf16 + compile on
#    the GPU), cold then warm compile cache, with the run's own breakdown (JOB40_RUNS; "" skips it).
# IMPORTS=0 skips 1, RAY_INIT_RUNS=0 skips 2; CONFIG, NUM_SCENES and SAMPLES size the job.
# Call 1 of 2026-11-29 also ran the job against a `ray start` cluster; that part failed there (no `ray` on the
# bundle's PATH; Ray's address canonicalisation and token auth when connecting back) and was removed.
set -uo pipefail
W=${W:-/tmp/issue14-probe}
PY=${PY:-python3}
source "$(dirname "$0")/common.sh"

section "imports in a fresh process (seconds)"
[ "${IMPORTS:-1}" = 1 ] && for stmt in "import torch" "import torch; torch.cuda.init(); torch.zeros(1, device='cuda')" "import ray" \
            "import ray.train.torch" "import torch, torch._dynamo" "import sdf_ray.train_loop"; do
  for i in 1 2; do
    $PY -c "import time; t = time.time(); exec(\"$stmt\"); print(f'{time.time() - t:6.2f}  $stmt')"
  done
done

section "embedded Ray start, as sdf-ray train does it"
RAY_INIT_RUNS=${RAY_INIT_RUNS:-2}
RAY_INIT_VARIANTS=${RAY_INIT_VARIANTS:-"default"}
[ "$RAY_INIT_RUNS" -gt 0 ] && for variant in $RAY_INIT_VARIANTS; do
  envs=(); [ "$variant" != default ] && envs=(${variant//,/ })
  for i in $(seq "$RAY_INIT_RUNS"); do
    env "${envs[@]}" $PY - "$variant" <<'EOF'
import sys, time
t0 = time.time()
from sdf_ray.ray_session import connect_ray, disconnect_ray
t1 = time.time()
connect_ray(None)
t2 = time.time()
disconnect_ray()
print(f"  {sys.argv[1]}: import {t1 - t0:.2f} s, connect_ray {t2 - t1:.2f} s, shutdown {time.time() - t2:.2f} s")
EOF
  done
done

job40_setup  # the data and the job's arguments (FAST), common.sh
JOB40_RUNS=${JOB40_RUNS-"cold warm"}
for run in $JOB40_RUNS; do
  section "40-step job, $run compile cache"
  t0=$(now)
  timeout 200 $PY -m sdf_ray.cli train "${FAST[@]}" 2>&1 | grep -v "^\s*$" | tail -25
  echo "command wall time $(since "$t0") s"
done

section "done"
