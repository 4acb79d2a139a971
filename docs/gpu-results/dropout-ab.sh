#!/usr/bin/env bash
# Session 9: the training step's samples/s with the old (uncacheable) and new (cacheable) dropout and output layer,
# alternated in one call (deepsdf.yaml, bf16 + compile, 1,000 scenes on the device).
#
#   source .gpu/gpu-env.sh; bash docs/gpu-results/dropout-ab.sh
set -uo pipefail
W=${W:-/tmp/dropout-ab}
PY=${PY:-python3}
source "$(dirname "$0")/common.sh"
export TORCHINDUCTOR_CACHE_DIR=$W/cache/inductor TRITON_CACHE_DIR=$W/cache/triton
for variant in ${VARIANTS:-old new old new}; do
  section "bench, $variant"
  timeout ${BENCH_TIMEOUT:-150} $PY docs/gpu-results/dropout-ab.py "$variant" --config sdf_ray/configs/deepsdf.yaml \
    --set optim.precision=bf16 --set model.compile=true --skip-reference --steps 50 --warmup 10 --rounds 3 2>&1 \
    | grep -E "variant|guarded|overhead"
done
