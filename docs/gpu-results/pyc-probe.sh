#!/usr/bin/env bash
# Issue 14 on one H200: are the image's slow imports (torch 3.4-4.3 s, torch._dynamo +6 s in session 6's probe)
# Python recompiling modules whose bytecode it cannot cache? A user's `pip install` writes __pycache__/*.pyc;
# a read-only or --no-compile install recompiles every module in every process.
#
#   source .gpu/gpu-env.sh; bash docs/gpu-results/pyc-probe.sh
set -uo pipefail
W=${W:-/tmp/pyc-probe}
PY=${PY:-python3}
source "$(dirname "$0")/common.sh"

section "where the packages live, whether they carry bytecode, whether Python can write it"
for mod in torch sympy ray aiohttp; do
  $PY - "$mod" <<'PYEOF'
import importlib.util, os, sys
spec = importlib.util.find_spec(sys.argv[1])
d = os.path.dirname(spec.origin)
py = pyc = 0
for root, dirs, files in os.walk(d):
    py += sum(f.endswith(".py") for f in files)
    pyc += sum(f.endswith(".pyc") for f in files)
print(f"{sys.argv[1]:8s} {d}  .py {py}  .pyc {pyc}  writable {os.access(d, os.W_OK)}  "
      f"cache_tag {sys.implementation.cache_tag}  dont_write {sys.dont_write_bytecode}")
PYEOF
done
echo "PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE-unset} PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX-unset}"
df -h /tmp "$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__))')" | cat
mount | grep -E " / | /tmp " | head -3

imports() {
  for stmt in "import torch" "import torch, torch._dynamo" "import ray.train.torch" "import sdf_ray.train_loop"; do
    for i in 1 2 3; do
      $PY -c "import time; t = time.time(); exec(\"$stmt\"); print(f'{time.time() - t:6.2f}  $stmt')"
    done
  done
}
[ "${AS_IS:-1}" = 1 ] && { section "imports, as the image is"; imports; }
section "bytecode compiled as pip install does (compileall), PYTHONDONTWRITEBYTECODE unset"
t0=$(now)
unset PYTHONDONTWRITEBYTECODE
SITE=$($PY -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))')
$PY -m compileall -q -j 16 "$SITE" /tmp/site >/dev/null 2>&1
echo "compileall of $SITE and /tmp/site: $(since "$t0") s"
imports

ray_start() {
  for i in 1 2 3; do
    $PY - <<'PYEOF'
import time
t0 = time.time()
from sdf_ray.ray_session import connect_ray, disconnect_ray
t1 = time.time()
connect_ray(None, ray_train=False)
t2 = time.time()
disconnect_ray()
print(f"  connect_ray {t2 - t1:.2f} s")
PYEOF
  done
}
section "embedded Ray start with bytecode"
ray_start
section "what a warm import of torch._dynamo spends (top 15 cumulative, -X importtime)"
$PY -X importtime -c "import torch, torch._dynamo" 2>&1 | sort -t'|' -k2 -n -r | head -15
