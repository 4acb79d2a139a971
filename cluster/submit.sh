#!/usr/bin/env bash
# Submit an sdf-ray command to a Ray cluster as a Ray job.
#
#   cluster/submit.sh [--address URL] [--no-wait] [--submission-id ID]
#                     [--runtime-env FILE] [--working-dir DIR] [--entrypoint-num-cpus N]
#                     -- sdf-ray train --config sdf_ray/configs/deepsdf.yaml --set ...
#
# URL is the dashboard / job API address, e.g. http://127.0.0.1:8265 after
# `ray dashboard ray_cluster.yaml`. Without --address, RAY_API_SERVER_ADDRESS
# then RAY_ADDRESS are used (the same order as `ray job submit`).
#
# Pre-flight checks (each: one line on stderr, exit 2): no address; nothing
# answering at the address; cluster uses token auth but no token here (or the
# token is rejected); working dir upload over the dashboard's 100 MiB limit.
# Warning only: checkpoint.storage_path not on shared storage for a multi-node run.
#
# Exit status when following the job (default): 0 SUCCEEDED, 1 FAILED,
# 3 STOPPED, 4 still running (log stream interrupted; the job goes on),
# 2 pre-flight failure; other non-zero: `ray job submit` itself failed.
# With --no-wait: `ray job submit`'s status (0 = accepted).
set -uo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "submit.sh: error: $*" >&2; exit 2; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ADDRESS=""
NO_WAIT=0
SUBMISSION_ID=""
RUNTIME_ENV="$REPO_ROOT/cluster/runtime_env.yaml"
WORKING_DIR="$REPO_ROOT"
ENTRYPOINT_CPUS=0  # Ray's default: the driver runs on the head and takes no CPU the workers need

while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) [[ $# -ge 2 ]] || die "--address needs a value"; ADDRESS="$2"; shift 2 ;;
    --address=*) ADDRESS="${1#*=}"; shift ;;
    --no-wait) NO_WAIT=1; shift ;;
    --submission-id) [[ $# -ge 2 ]] || die "--submission-id needs a value"; SUBMISSION_ID="$2"; shift 2 ;;
    --submission-id=*) SUBMISSION_ID="${1#*=}"; shift ;;
    --runtime-env) [[ $# -ge 2 ]] || die "--runtime-env needs a value"; RUNTIME_ENV="$2"; shift 2 ;;
    --runtime-env=*) RUNTIME_ENV="${1#*=}"; shift ;;
    --working-dir) [[ $# -ge 2 ]] || die "--working-dir needs a value"; WORKING_DIR="$2"; shift 2 ;;
    --working-dir=*) WORKING_DIR="${1#*=}"; shift ;;
    --entrypoint-num-cpus) [[ $# -ge 2 ]] || die "--entrypoint-num-cpus needs a value"; ENTRYPOINT_CPUS="$2"; shift 2 ;;
    --entrypoint-num-cpus=*) ENTRYPOINT_CPUS="${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (the command to run goes after '--'; see --help)" ;;
  esac
done
[[ $# -gt 0 ]] || die "no command given; usage: cluster/submit.sh [--address URL] -- sdf-ray train --config FILE ..."
ENTRYPOINT=("$@")

# --- address -----------------------------------------------------------------
if [[ -z "$ADDRESS" ]]; then
  ADDRESS="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-}}"
fi
[[ -n "$ADDRESS" ]] || die "no cluster address: pass --address http://HOST:8265 or export RAY_ADDRESS (after 'ray dashboard ray_cluster.yaml' it is http://127.0.0.1:8265)"
case "$ADDRESS" in
  auto|ray://*) die "address '$ADDRESS' is not a dashboard URL; use the job API address, e.g. http://127.0.0.1:8265" ;;
  http://*|https://*) ;;
  *) ADDRESS="http://$ADDRESS" ;;
esac
ADDRESS="${ADDRESS%/}"
# `ray job submit` lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override --address;
# pin both to the address we checked.
export RAY_API_SERVER_ADDRESS="$ADDRESS" RAY_ADDRESS="$ADDRESS"

# --- tools -------------------------------------------------------------------
if [[ -n "${SDF_RAY_PYTHON:-}" ]]; then
  PY="$SDF_RAY_PYTHON"
elif command -v ray >/dev/null 2>&1 && [[ -x "$(dirname "$(command -v ray)")/python" ]]; then
  PY="$(dirname "$(command -v ray)")/python"   # the interpreter that runs the `ray` CLI
else
  PY="$(command -v python3 || true)"
fi
[[ -n "$PY" ]] || die "no python found (set SDF_RAY_PYTHON)"
PREFLIGHT=("$PY" "$REPO_ROOT/cluster/preflight.py")

# --- is anything there? ------------------------------------------------------
AUTH_MODE="$("${PREFLIGHT[@]}" probe "$ADDRESS")" || exit 2

command -v ray >/dev/null 2>&1 || die "the 'ray' CLI is not on PATH (pip install 'ray[default]==2.60.0', or activate the project's venv)"
[[ -f "$RUNTIME_ENV" ]] || die "runtime env file not found: $RUNTIME_ENV"
[[ -d "$WORKING_DIR" ]] || die "working dir not found: $WORKING_DIR"

# --- token auth --------------------------------------------------------------
if [[ "$AUTH_MODE" == "token" ]]; then
  TOKEN_SOURCE="$("${PREFLIGHT[@]}" token "$ADDRESS")" || exit 2
  # The job CLI only attaches the token when token mode is on client-side.
  export RAY_AUTH_MODE=token
  echo "submit.sh: token auth on (token from $TOKEN_SOURCE)" >&2
elif [[ "$AUTH_MODE" == "disabled" ]]; then
  echo "submit.sh: warning: the cluster at $ADDRESS runs WITHOUT token auth; anyone who reaches it can run code" >&2
fi

# --- upload size -------------------------------------------------------------
UPLOAD_MIB="$("${PREFLIGHT[@]}" size "$WORKING_DIR" "$RUNTIME_ENV")" || exit 2
echo "submit.sh: working dir $WORKING_DIR -> ${UPLOAD_MIB} MiB upload" >&2

# --- storage sanity (warning only) --------------------------------------------
"${PREFLIGHT[@]}" storage "$ADDRESS" "$WORKING_DIR" -- "${ENTRYPOINT[@]}" || true

# --- submit ------------------------------------------------------------------
if [[ -z "$SUBMISSION_ID" ]]; then
  SUBMISSION_ID="sdf-ray-${USER:-$(id -un 2>/dev/null || echo user)}-$(date +%Y%m%d-%H%M%S)"
fi

ARGS=(job submit --address "$ADDRESS" --submission-id "$SUBMISSION_ID"
      --runtime-env "$RUNTIME_ENV" --working-dir "$WORKING_DIR"
      --entrypoint-num-cpus "$ENTRYPOINT_CPUS")
[[ $NO_WAIT -eq 1 ]] && ARGS+=(--no-wait)
ARGS+=(-- "${ENTRYPOINT[@]}")

echo "submit.sh: submission id $SUBMISSION_ID" >&2
if [[ $NO_WAIT -eq 1 ]]; then
  ray "${ARGS[@]}"
  exit $?
fi

# Ctrl-C stops following the logs, not the job.
trap 'echo; echo "submit.sh: stopped following; job $SUBMISSION_ID keeps running (ray job logs -f $SUBMISSION_ID / ray job stop $SUBMISSION_ID)" >&2; exit 4' INT
ray "${ARGS[@]}"
SUBMIT_RC=$?
trap - INT

# `ray job submit` exits 1 only for FAILED (STOPPED and an interrupted log
# stream exit 0), so ask for the final status and map it ourselves.
STATUS="$("${PREFLIGHT[@]}" status "$ADDRESS" "$SUBMISSION_ID")"
case "$STATUS" in
  SUCCEEDED) exit 0 ;;
  FAILED) echo "submit.sh: job $SUBMISSION_ID FAILED (ray job logs $SUBMISSION_ID)" >&2; exit 1 ;;
  STOPPED) echo "submit.sh: job $SUBMISSION_ID was STOPPED" >&2; exit 3 ;;
  PENDING|RUNNING) echo "submit.sh: job $SUBMISSION_ID is still $STATUS (ray job logs -f $SUBMISSION_ID)" >&2; exit 4 ;;
  *) [[ $SUBMIT_RC -ne 0 ]] && exit "$SUBMIT_RC"; echo "submit.sh: could not determine the job's final status" >&2; exit 1 ;;
esac
