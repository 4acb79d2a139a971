"""Pre-flight checks for cluster/submit.sh (stdlib + PyYAML; Ray only where noted).

Each subcommand prints its result on stdout and, on a problem, one line on stderr
and exit status 2. Used by submit.sh; runnable by hand:

    python cluster/preflight.py probe http://127.0.0.1:8265
    python cluster/preflight.py size . cluster/runtime_env.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

# `ray job submit` PUTs the working_dir zip to the dashboard, whose aiohttp app is
# built with client_max_size=ray_constants.DASHBOARD_CLIENT_MAX_SIZE (100 MiB in
# Ray 2.60); anything larger is rejected with HTTP 413.
DEFAULT_MAX_UPLOAD_MIB = 100
REPO_ROOT = Path(__file__).resolve().parents[1]


def fail(msg: str) -> int:
    print(f"submit.sh: error: {msg}", file=sys.stderr)
    return 2


def _get(url: str, timeout: float, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (user-given URL)
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read() if e.fp else b""


def find_token() -> tuple[str | None, str]:
    """Same sources, same order as Ray's AuthenticationTokenLoader."""
    tok = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if tok:
        return tok, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        p = Path(path).expanduser()
        if p.is_file() and p.read_text().strip():
            return p.read_text().strip(), f"RAY_AUTH_TOKEN_PATH={p}"
        return None, f"RAY_AUTH_TOKEN_PATH={p} (missing or empty)"
    p = Path.home() / ".ray" / "auth_token"
    if p.is_file() and p.read_text().strip():
        return p.read_text().strip(), str(p)
    return None, str(p)


def cmd_probe(a: argparse.Namespace) -> int:
    """Print the cluster's auth mode ("token"/"disabled"/"unknown"); exit 2 if nothing answers."""
    url = a.address.rstrip("/")
    try:
        status, body = _get(url + "/api/authentication_mode", a.timeout)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return fail(
            f"no Ray dashboard answering at {url} ({reason}); is the cluster up and the port forwarded (ray dashboard ray_cluster.yaml)?"
        )
    if status == 404:
        print("unknown")  # older Ray without the endpoint
        return 0
    if status != 200:
        return fail(f"{url}/api/authentication_mode answered HTTP {status}; is {url} a Ray dashboard?")
    try:
        mode = json.loads(body)["authentication_mode"]
    except (ValueError, KeyError, TypeError):
        return fail(f"{url} answered, but not like a Ray dashboard (/api/authentication_mode returned non-JSON)")
    print(mode)
    return 0


def cmd_token(a: argparse.Namespace) -> int:
    """Exit 2 unless a token is available locally and the dashboard accepts it."""
    tok, where = find_token()
    if tok is None:
        return fail(
            f"cluster {a.address} requires a Ray auth token but none was found ({where}); "
            "get it with `ray get-auth-token` on the machine that ran `ray up` "
            "(or `ray exec ray_cluster.yaml 'ray get-auth-token'`, or "
            "`kubectl get secret <raycluster>-auth-token ...` on KubeRay) and export RAY_AUTH_TOKEN=<token>"
        )
    try:
        status, _ = _get(a.address.rstrip("/") + "/api/version", a.timeout, token=tok)
    except (urllib.error.URLError, OSError) as e:
        return fail(f"lost the dashboard at {a.address} while checking the token ({getattr(e, 'reason', e)})")
    if status in (401, 403):
        return fail(
            f"the cluster at {a.address} rejected the auth token from {where} (HTTP {status}); it belongs to another cluster?"
        )
    print(where)
    return 0


def _runtime_env_excludes(runtime_env_file: str | None) -> list[str]:
    if not runtime_env_file:
        return []
    import yaml

    with open(runtime_env_file) as f:
        env = yaml.safe_load(f) or {}
    return list(env.get("excludes") or [])


def upload_size(working_dir: str, runtime_env_file: str | None) -> tuple[int, list[tuple[int, str]]]:
    """Bytes Ray would zip for this working_dir, using Ray's own traversal.

    Same rules as `ray job submit`: Ray's default excludes
    (RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES), the runtime_env `excludes`,
    .gitignore (unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1) and .rayignore.
    Ray stores files uncompressed, so this is the upload size.
    """
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(working_dir).absolute()
    excludes = ray_constants.get_runtime_env_default_excludes() + _runtime_env_excludes(runtime_env_file)
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    files: list[tuple[int, str]] = []

    def handler(p: Path) -> None:
        if p.is_file():
            files.append((p.stat().st_size, str(p.relative_to(root))))

    quiet = logging.getLogger("sdf_ray.cluster.preflight")
    quiet.setLevel(logging.WARNING)
    _dir_travel(root, [_get_excludes(root, excludes)], handler, include_gitignore=include_gitignore, logger=quiet)
    return sum(s for s, _ in files), sorted(files, reverse=True)


def cmd_size(a: argparse.Namespace) -> int:
    limit = int(float(os.environ.get("SDF_RAY_MAX_UPLOAD_MIB", DEFAULT_MAX_UPLOAD_MIB)) * 1024**2)
    total, files = upload_size(a.working_dir, a.runtime_env)
    mib = total / 1024**2
    if total >= limit:
        top = ", ".join(f"{n} ({s / 1024**2:.1f} MiB)" for s, n in files[:3])
        return fail(
            f"working dir upload would be {mib:.1f} MiB (limit {limit / 1024**2:.0f} MiB); "
            f"largest: {top}; add them to excludes in {a.runtime_env} or to .gitignore/.rayignore"
        )
    print(f"{mib:.1f}")
    return 0


def _storage_path(entrypoint: list[str], working_dir: str) -> tuple[str | None, bool, str | None]:
    """(checkpoint.storage_path, scaling.use_gpu, data.path) as the entrypoint would see them."""
    import yaml

    cfg: dict = {}
    sets: dict[str, str] = {}
    it = iter(range(len(entrypoint)))
    for i in it:
        tok = entrypoint[i]
        if tok in ("--config", "-c") and i + 1 < len(entrypoint):
            path = Path(entrypoint[i + 1])
            path = path if path.is_absolute() else Path(working_dir) / path
            if path.is_file():
                cfg = yaml.safe_load(path.read_text()) or {}
            next(it, None)
        elif tok.startswith("--config="):
            path = Path(working_dir) / tok.split("=", 1)[1]
            if path.is_file():
                cfg = yaml.safe_load(path.read_text()) or {}
        elif tok == "--set" and i + 1 < len(entrypoint) and "=" in entrypoint[i + 1]:
            k, v = entrypoint[i + 1].split("=", 1)
            sets[k] = v
            next(it, None)
    sp = sets.get("checkpoint.storage_path", (cfg.get("checkpoint") or {}).get("storage_path"))
    gpu = str(sets.get("scaling.use_gpu", (cfg.get("scaling") or {}).get("use_gpu", False))).lower() in (
        "1",
        "true",
        "yes",
    )
    data_path = sets.get("data.path", (cfg.get("data") or {}).get("path"))
    return sp, gpu, data_path


def _storage_kind(path: str) -> str:
    """sdf_ray.launch's storage policy (stdlib only, like this script), so this check and the run agree."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from sdf_ray.launch import storage_kind

    return storage_kind(path)


def cmd_storage(a: argparse.Namespace) -> int:
    """Warn (never fail) when checkpoints would land on node-local disk of a multi-node run, or on a URI."""
    sp, use_gpu, data_path = _storage_path(a.entrypoint, a.working_dir)
    if "train" not in a.entrypoint and "tune" not in a.entrypoint:
        return 0
    nodes = 0
    tok, _ = find_token()
    try:
        status, body = _get(a.address.rstrip("/") + "/nodes?view=hostNameList", a.timeout, token=tok)
        if status == 200:
            data = json.loads(body)["data"]
            nodes = len(data.get("hostNameList", data.get("host_name_list", [])))
    except Exception:  # noqa: BLE001 - a warning helper must not break submission
        pass
    kind = _storage_kind(str(sp)) if sp is not None else None
    if sp is None:
        where = "default (local) storage"
    elif kind == "relative":
        where = f"relative path {sp!r} (resolved per node inside the job's working dir)"
    else:
        where = f"{sp!r}"
    if kind == "uri":
        print(
            f"submit.sh: warning: checkpoint.storage_path is a URI ({sp!r}); sdf-ray refuses it (exit 2): it writes "
            "its run files beside the checkpoints, so use a filesystem path on shared storage, "
            "e.g. --set checkpoint.storage_path=/mnt/shared/runs",
            file=sys.stderr,
        )
    # GPU runs never land on the CPU head, so they are multi-node even if only
    # the head is up right now (the autoscaler adds the GPU nodes).
    elif kind != "shared" and (nodes > 1 or use_gpu):
        print(
            f"submit.sh: warning: checkpoint.storage_path is {where} but the run spans several nodes "
            f"({nodes} alive now{', GPU workers autoscale' if use_gpu else ''}); use shared storage, "
            "e.g. --set checkpoint.storage_path=/mnt/shared/runs",
            file=sys.stderr,
        )
    data_kind = _storage_kind(str(data_path)) if data_path is not None else None
    if data_kind == "relative":
        print(
            f"submit.sh: warning: data.path is relative ({data_path!r}); dataset dirs are not uploaded with the "
            "working dir (/data/ is excluded), put the dataset on shared storage and pass e.g. "
            "--set data.path=/mnt/shared/data/deepsdf",
            file=sys.stderr,
        )
    elif data_kind == "uri":
        print(
            f"submit.sh: warning: data.path is a URI ({data_path!r}); sdf-ray reads datasets from a filesystem "
            "path: put the dataset on shared storage and pass e.g. --set data.path=/mnt/shared/data/deepsdf",
            file=sys.stderr,
        )
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    """Print the job's final status (Ray's JobStatus name)."""
    from ray.job_submission import JobSubmissionClient

    try:
        print(JobSubmissionClient(a.address).get_job_status(a.job_id).value)
    except Exception as e:  # noqa: BLE001
        print(f"submit.sh: could not query job {a.job_id}: {e}", file=sys.stderr)
        print("UNKNOWN")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="preflight.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("probe", "token"):
        s = sub.add_parser(name)
        s.add_argument("address")
        s.add_argument("--timeout", type=float, default=float(os.environ.get("SDF_RAY_PROBE_TIMEOUT", "3")))
    s = sub.add_parser("size")
    s.add_argument("working_dir")
    s.add_argument("runtime_env", nargs="?")
    s = sub.add_parser("storage")
    s.add_argument("address")
    s.add_argument("working_dir")
    s.add_argument("entrypoint", nargs=argparse.REMAINDER)
    s.add_argument("--timeout", type=float, default=3.0)
    s = sub.add_parser("status")
    s.add_argument("address")
    s.add_argument("job_id")
    a = p.parse_args(argv)
    if a.cmd == "storage" and a.entrypoint[:1] == ["--"]:
        a.entrypoint = a.entrypoint[1:]
    return {"probe": cmd_probe, "token": cmd_token, "size": cmd_size, "storage": cmd_storage, "status": cmd_status}[
        a.cmd
    ](a)


if __name__ == "__main__":
    sys.exit(main())
