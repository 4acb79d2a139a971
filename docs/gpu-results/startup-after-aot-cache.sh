#!/usr/bin/env bash
# Issue 14 on one H200, session 9: the 40-step job after (1) graphs AOTAutograd's cache accepts and (2) the Train
# workers' early imports, measured with bytecode as a pip install has it (common.sh); the GPU tests of the compiled
# paths; the embedded Ray's start with and without a job runtime env.
#
#   source .gpu/gpu-env.sh; bash docs/gpu-results/startup-after-aot-cache.sh
set -uo pipefail
W=${W:-/tmp/issue14-s9}
PY=${PY:-python3}
source "$(dirname "$0")/common.sh"
section "GPU tests of the compiled paths (dropout, frozen decoder, training step)"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3
section "ray.init with and without a job runtime env (env_vars only), alternating"
for i in 1 2 3; do for env in no yes; do $PY - $env <<'PYEOF' 2>&1 | grep "^ray.init"
import logging, sys, time
import ray
kw = {"runtime_env": {"env_vars": {"SDF_RAY_PROBE": "1"}}} if sys.argv[1] == "yes" else {}
t = time.time()
ray.init(_node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", logging_level=logging.WARNING,
         _system_config={"prestart_worker_first_driver": False}, **kw)
print(f"ray.init runtime_env={sys.argv[1]}: {time.time() - t:.2f} s")
ray.shutdown()
PYEOF
done; done
IMPORTS=0 RAY_INIT_RUNS=0 JOB40_RUNS="cold warm warm" W=$W/job bash "$(dirname "$0")/startup-probe.sh" 2>&1 | grep -v "Token authentication\|^===.*device\|^NVIDIA\|^torch \|^16$\|^commit\|content sha1" 
