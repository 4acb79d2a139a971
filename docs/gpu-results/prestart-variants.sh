#!/usr/bin/env bash
# Issue 14, session 10, call 2 (docs/gpu-results/prestart-variants-2026-11-30.txt): the 40-step job with variants of
# the prestart that were NOT adopted, with Ray Train's controller log (DEBUG) after each run. The variants were
# switched by temporary environment variables in the tree of that call, removed afterwards (this script no longer
# changes anything but the log level there):
#   XHOOK=1  the Train workers' setup hook imported ray.train.v2._internal.execution.worker_group.worker before torch;
#   XCTL=5   five processes prestarted with the controller's runtime env instead of one (for the actors the controller
#            starts: placement-group cleaner, state actor, synchronisation actor, preemption watcher);
#   XDBG=1   Ray Train's LoggingConfig at DEBUG (its "[Worker Group Initialization]" timings).
# At that call the prestart was requested after the autoscaling coordinator's creation (it now comes before).
#
#   source .gpu/gpu-env.sh; bash docs/gpu-results/prestart-variants.sh
W=/tmp/issue14-s10x; PY=python3
source docs/gpu-results/common.sh
python3 -m sdf_ray.cli data synth --out "$W/d" --num-scenes 512 --samples-per-scene 16384 --seed 0 --surface-samples 0 >/dev/null 2>&1
FAST=(--config sdf_ray/configs/deepsdf.yaml --set "data.path=$W/d" --set optim.num_epochs=5 --set logging.every_n_steps=8 --set checkpoint.every_n_epochs=5 --set "checkpoint.storage_path=$W/runs" --set checkpoint.run_name=job40 --overwrite)
for v in "cold 0 1" "warm 0 1" "warm 1 1" "warm 0 1" "warm 1 1" "warm 1 5" "warm 1 5"; do
  set -- $v
  section "run $1 XHOOK=$2 XCTL=$3"
  XDBG=1 XHOOK=$2 XCTL=$3 timeout 200 $PY -m sdf_ray.cli train "${FAST[@]}" 2>&1 | grep -A14 "^time:" | grep "time:\|start-up"
  for f in /tmp/ray/session_latest/logs/train/ray-train-sys-controller-*.log; do python3 -c "
import json,sys
for line in open(sys.argv[1]):
    try: d=json.loads(line); m=d.get('message','')
    except Exception: continue
    if 'Initialization' in m or 'Requesting' in m or 'Cleaner launched' in m or 'snapshot' in m: print('   ', d.get('asctime')[11:], m[:110])
" $f; done
  grep -h "Started worker process" /tmp/ray/session_latest/logs/raylet.out | cut -c1-90 | sed 's/^/    /'
done
