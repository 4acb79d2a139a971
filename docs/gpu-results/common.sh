# Sourced by the GPU scripts of this directory: timestamps, section headers, and what the machine is.
# Expects PY (the Python to run) and W (the work directory, emptied here).
T_START=$(date +%s.%N)
now() { date +%s.%N; }
# awk, not Python: the reconstruction's console lines are timestamped one by one, and a Python start per line
# (~0.1 s) lagged the summary's last lines by ~2 s, which the command's wall time then included (session 13).
if command -v awk >/dev/null; then
  since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f\n", b - a }'; }
else
  since() { $PY -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
fi
section() { echo; echo "=== $* (t=$(since "$T_START") s)"; }

rm -rf "$W"; mkdir -p "$W"
# The device image sets PYTHONDONTWRITEBYTECODE=1 and ships no .pyc files (torch, sympy, and the bundle's Ray: 0 of
# thousands; docs/gpu-results/pyc-probe-2026-11-29.txt), so every process there recompiled every module it imported:
# `import torch, torch._dynamo` 7-9 s instead of 2-2.7 s. A user's `pip install` writes the bytecode, so the scripts
# measure with it: compiled once per machine, as pip does (BYTECODE=0 measures the image as it is).
if [ "${BYTECODE:-1}" = 1 ]; then
  unset PYTHONDONTWRITEBYTECODE
  if [ ! -e /tmp/.bytecode-compiled ]; then
    t_bc=$(date +%s.%N)
    $PY -m compileall -q -j 0 "$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" /tmp/site \
      >/dev/null 2>&1
    touch /tmp/.bytecode-compiled
    echo "bytecode compiled for the image's site-packages and /tmp/site in $($PY -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$t_bc") s"
  fi
fi
section "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv,noheader
$PY -c "import torch, ray, skimage; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| ray', ray.__version__, '| skimage', skimage.__version__)"
nproc; git log -1 --format='commit %h %s' 2>/dev/null || true
# The device machine's .git can lag the working tree it was sent (seen in session 8: every log said the session's
# first commit). The content of the package identifies the tree: compare with the same command at a commit here.
echo "sdf_ray/ content sha1: $(find sdf_ray -name '*.py' | LC_ALL=C sort | xargs cat | sha1sum | cut -c1-12)"

# The issue's 40-step job (deepsdf.yaml on NUM_SCENES generated scenes of SAMPLES samples, precision and compile auto:
# bf16 + compile on the GPU, a report every 8 steps): generates its data under $W/d and sets FAST, the arguments of
# `sdf-ray train`. CONFIG, NUM_SCENES and SAMPLES size it.
job40_setup() {
  NUM_SCENES=${NUM_SCENES:-512}; SAMPLES=${SAMPLES:-16384}; CONFIG=${CONFIG:-sdf_ray/configs/deepsdf.yaml}
  section "data: $NUM_SCENES scenes x $SAMPLES samples"
  $PY -m sdf_ray.cli data synth --out "$W/d" --num-scenes "$NUM_SCENES" --samples-per-scene "$SAMPLES" --seed 0 \
    --surface-samples 0
  FAST=(--config "$CONFIG" --set "data.path=$W/d" --set optim.precision=auto --set model.compile=auto
        --set optim.num_epochs=5 --set logging.every_n_steps=8 --set checkpoint.every_n_epochs=5
        --set "checkpoint.storage_path=$W/runs" --set checkpoint.run_name=job40 --overwrite)
}

