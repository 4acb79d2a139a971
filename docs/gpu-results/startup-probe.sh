#!/usr/bin/env bash
# Issue 14 on one H200: where a short job's start-up goes, finer than the run's own breakdown.
#
#   source .gpu/gpu-env.sh; bash docs/gpu-results/startup-probe.sh
#
# 1. imports and CUDA initialisation in a fresh process (torch, Ray, Ray Train);
# 2. the embedded Ray's start as `sdf-ray train` does it (connect_ray), RAY_INIT_RUNS times each for the variants
#    in RAY_INIT_VARIANTS ("default" and env assignments such as "RAY_USAGE_STATS_ENABLED=0");
# 3. the issue's 40-step job (deepsdf.yaml on 512 generated scenes, bf16 + compile), cold then warm compile cache,
#    with the run's own breakdown (JOB40_RUNS);
# 4. the same job against a running cluster (`ray start --head`, CLUSTER=1), then the state transitions of every
#    actor and task Ray ran for it (Ray Train's controller, worker, coordinator...), from the State API.
set -uo pipefail
W=${W:-/tmp/issue14-probe}
PY=${PY:-python3}
source "$(dirname "$0")/common.sh"

section "imports in a fresh process (seconds)"
for stmt in "import torch" "import torch; torch.cuda.init(); torch.zeros(1, device='cuda')" "import ray" \
            "import ray.train.torch" "import torch, torch._dynamo" "import sdf_ray.train_loop"; do
  for i in 1 2; do
    $PY -c "import time; t = time.time(); exec(\"$stmt\"); print(f'{time.time() - t:6.2f}  $stmt')"
  done
done

section "embedded Ray start, as sdf-ray train does it"
RAY_INIT_RUNS=${RAY_INIT_RUNS:-2}
RAY_INIT_VARIANTS=${RAY_INIT_VARIANTS:-"default"}
for variant in $RAY_INIT_VARIANTS; do
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

section "data: 512 scenes x 16,384 samples"
$PY -m sdf_ray.cli data synth --out "$W/d" --num-scenes 512 --samples-per-scene 16384 --seed 0 --surface-samples 0

FAST=(--config sdf_ray/configs/deepsdf.yaml --set "data.path=$W/d" --set optim.precision=bf16 --set model.compile=true
      --set optim.num_epochs=5 --set logging.every_n_steps=8 --set checkpoint.every_n_epochs=5
      --set "checkpoint.storage_path=$W/runs" --set checkpoint.run_name=job40 --overwrite)
JOB40_RUNS=${JOB40_RUNS-"cold warm"}
for run in $JOB40_RUNS; do
  section "40-step job, $run compile cache"
  t0=$(now)
  timeout 200 $PY -m sdf_ray.cli train "${FAST[@]}" 2>&1 | grep -v "^\s*$" | tail -25
  echo "command wall time $(since "$t0") s"
done

if [ "${CLUSTER:-1}" = 1 ]; then
  section "the same job against a running cluster (ray start --head)"
  t0=$(now)
  $PY -m ray.scripts.scripts start --head --port 6390 --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 --temp-dir "$W/ray" \
    --disable-usage-stats 2>&1 | tail -3
  echo "ray start: $(since "$t0") s"
  $PY -c "import socket; socket.create_connection(('127.0.0.1', 6390), timeout=3)" || { echo "no cluster"; exit 1; }
  t0=$(now)
  timeout 200 $PY -m sdf_ray.cli train "${FAST[@]}" --address 127.0.0.1:6390 2>&1 | grep -v "^\s*$" | tail -18
  echo "command wall time $(since "$t0") s (command started at unix $t0)"
  $PY - "$t0" <<'EOF'
import sys
import ray
from ray.util.state import list_tasks
t0 = float(sys.argv[1])
ray.init(address="127.0.0.1:6390", _node_ip_address="127.0.0.1", logging_level="ERROR")
rows = []
for task in list_tasks(detail=True, limit=10000, raise_on_missing_output=False):
    events = {e["state"]: e["created_ms"] / 1000 - t0 for e in (task.events or [])}
    if events:
        rows.append((min(events.values()), task.name or task.func_or_class_name, str(task.type), events))
for first, name, kind, events in sorted(rows, key=lambda r: r[0])[:80]:
    print(f"  {first:7.2f} {kind:22s} {name[:60]:60s} " + " ".join(f"{k[:12]}={v:.2f}" for k, v in sorted(events.items(), key=lambda kv: kv[1])))
EOF
  $PY -m ray.scripts.scripts stop >/dev/null 2>&1
fi
section "done"
