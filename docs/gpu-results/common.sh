# Sourced by the GPU scripts of this directory: timestamps, section headers, and what the machine is.
# Expects PY (the Python to run) and W (the work directory, emptied here).
T_START=$(date +%s.%N)
now() { date +%s.%N; }
since() { $PY -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
section() { echo; echo "=== $* (t=$(since "$T_START") s)"; }

rm -rf "$W"; mkdir -p "$W"
section "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv,noheader
$PY -c "import torch, ray, skimage; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| ray', ray.__version__, '| skimage', skimage.__version__)"
nproc; git log -1 --format='commit %h %s' 2>/dev/null || true
# The device machine's .git can lag the working tree it was sent (seen in session 8: every log said the session's
# first commit). The content of the package identifies the tree: compare with the same command at a commit here.
echo "sdf_ray/ content sha1: $(find sdf_ray -name '*.py' | LC_ALL=C sort | xargs cat | sha1sum | cut -c1-12)"
