"""End to end: `cluster/submit.sh` -> `ray job submit` -> `sdf-ray train` on a two-node, token-auth Ray cluster.

Both nodes are real `ray start` processes on this machine (the head and one worker node, 1 CPU each), so
STRICT_SPREAD has to put one Ray Train worker on each node and a local path is "shared storage".
Everything runs with an isolated HOME (the token lives in HOME/.ray/auth_token), so the user's ~/.ray and
any other Ray on the machine are untouched; teardown kills exactly the processes that carry this module's
marker variable in their environment (plain `ray stop` would kill every Ray on the machine).

Notes on Ray 2.60 seen here:
* `ray start --node-ip-address=127.0.0.1` is turned into the host's IP (services.resolve_ip_for_localhost),
  so the nodes advertise that IP; the dashboard / job API stays on 127.0.0.1 and token auth is on.
* The job driver takes no CPU (submit.sh's default `--entrypoint-num-cpus 0`): one reserved for it would
  leave the 2-CPU cluster one short of the 2 workers, and Ray Train would wait for it forever.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "cluster" / "submit.sh"
MARKER = "SDF_RAY_TEST_JOB_CLUSTER"
START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 240  # a job Ray Train cannot place waits forever; ~60 s is normal


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    tmp: Path
    env: dict[str, str]
    dashboard: str  # job API / dashboard URL
    token: str

    def get(self, path: str) -> dict:
        req = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 (127.0.0.1)
            return json.loads(r.read())

    def alive_node_ids(self) -> set[str]:
        nodes = self.get("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return {n["node_id"] for n in nodes if n["state"] == "ALIVE"}


def _sid(pid: int | str) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[3])  # state ppid pgrp session


def _our_pids(marker_value: str, sessions: set[int]) -> set[int]:
    """Processes started by this module: in a session of our `ray start`s, or carrying the marker variable.

    Ray's workers and agents stay in the session of the `ray start` that spawned their raylet; a process
    that starts a session of its own still inherits the marker (setproctitle can clobber /proc/PID/environ,
    hence both). pytest's own session is never a target.
    """
    needle = f"{MARKER}={marker_value}".encode() + b"\0"
    mine = _sid(os.getpid())
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            sid = _sid(entry.name)
            if sid != mine and (sid in sessions or needle in (entry / "environ").read_bytes()):
                found.add(int(entry.name))
        except (OSError, ValueError, IndexError):  # gone, or not ours to read
            continue
    return found


def _kill_ours(marker_value: str, sessions: set[int], grace_s: float = 3.0) -> set[int]:
    """SIGTERM our Ray processes, SIGKILL what is left after ``grace_s``; returns the survivors (should be none).

    gcs_server and the raylets sit out SIGTERM for 10 s and more once their peers are gone (`ray stop` waits
    16 s before SIGKILL); the whole cluster is thrown away here, so do not wait that long.
    """
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = _our_pids(marker_value, sessions)
        deadline = time.monotonic() + wait_s
        while pids and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            time.sleep(0.3)
            pids = _our_pids(marker_value, sessions)
        if not pids:
            return set()
    return _our_pids(marker_value, sessions)


def _ray(env: dict[str, str], cwd: Path, sessions: set[int], *args: str, timeout: float = START_TIMEOUT_S) -> str:
    # Output to a file, not a pipe: the daemons `ray start` leaves behind could hold a pipe open. A new
    # session keeps them out of pytest's process group; they are found again through the marker.
    log = cwd / "ray-cli.log"
    with open(log, "a+") as out:
        out.write(f"\n$ ray {' '.join(args)}\n")
        out.flush()
        start = out.tell()
        proc = subprocess.Popen(["ray", *args], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        sessions.add(proc.pid)  # session leader: its session id is its pid
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        out.seek(start)
        text = out.read()
    assert rc == 0, f"ray {' '.join(args)} failed ({rc}):\n{text[-4000:]}"
    return text


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # Short path under /tmp: Ray's unix sockets live under the session dir (108-byte limit).
    tmp = Path(tempfile.mkdtemp(prefix="sdfjob-", dir="/tmp"))
    home = tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update({
        "HOME": str(home),
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # ray, sdf-ray of this venv
        "SDF_RAY_PYTHON": sys.executable,
        MARKER: str(tmp),
    })
    gcs_port, dash_port = _free_port(), _free_port()
    sessions: set[int] = set()
    try:
        # `ray start --head` refuses token mode without a token: generate one into the isolated HOME.
        _ray(env, tmp, set(), "get-auth-token", "--generate")
        token = (home / ".ray" / "auth_token").read_text().strip()
        assert token
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats",
                  f"--dashboard-agent-listen-port={_free_port()}"]
        _ray(env, tmp, sessions, "start", "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash_port}", f"--ray-client-server-port={_free_port()}",
             f"--temp-dir={tmp / 'ray'}", *common)
        common[-1] = f"--dashboard-agent-listen-port={_free_port()}"
        # Own temp dir per node: each node's runtime-env agent builds the job's pip env under it.
        _ray(env, tmp, sessions, "start", f"--address=127.0.0.1:{gcs_port}", f"--temp-dir={tmp / 'ray2'}", *common)
        c = Cluster(tmp=tmp, env=env, dashboard=f"http://127.0.0.1:{dash_port}", token=token)
        deadline = time.monotonic() + START_TIMEOUT_S
        alive: set[str] = set()
        while time.monotonic() < deadline:
            try:
                alive = c.alive_node_ids()
            except (urllib.error.URLError, OSError, KeyError, ValueError):
                alive = set()
            if len(alive) == 2:
                break
            time.sleep(1)
        assert len(alive) == 2, f"cluster did not come up with 2 alive nodes (saw {len(alive)})"
        yield c
    finally:
        survivors = _kill_ours(str(tmp), sessions)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not survivors, f"Ray processes left behind: {sorted(survivors)}"


def _submit(c: Cluster, *args: str, env: dict[str, str] | None = None,
            timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SUBMIT), "--address", c.dashboard, *args], cwd=REPO, env=env or c.env,
                          capture_output=True, text=True, timeout=timeout)


def test_submit_refuses_missing_or_wrong_token(cluster: Cluster) -> None:
    """Token pre-flight against a real token-auth cluster: one line, exit 2, before anything is uploaded."""
    cmd = ["--", "sdf-ray", "check-config", "sdf_ray/configs/tiny.yaml"]
    empty_home = cluster.tmp / "home-without-token"
    empty_home.mkdir(exist_ok=True)
    r = _submit(cluster, *cmd, env={**cluster.env, "HOME": str(empty_home)}, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "requires a Ray auth token but none was found" in lines[0]

    r = _submit(cluster, *cmd, env={**cluster.env, "RAY_AUTH_TOKEN": "0" * 32}, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "rejected the auth token from RAY_AUTH_TOKEN" in lines[0]


def test_submit_train_strict_spread_across_two_nodes(cluster: Cluster) -> None:
    data, storage = cluster.tmp / "data", cluster.tmp / "shared-runs"
    subprocess.run(["sdf-ray", "data", "synth", "--out", str(data), "--num-scenes", "8",
                    "--samples-per-scene", "512", "--seed", "0"],
                   env=cluster.env, cwd=REPO, check=True, capture_output=True, timeout=120)
    submission_id = f"sdf-ray-test-{os.getpid()}"
    try:
        r = _submit(cluster, "--submission-id", submission_id, "--",
                    "sdf-ray", "train", "--config", "sdf_ray/configs/tiny.yaml",
                    "--set", f"data.path={data}", "--set", f"checkpoint.storage_path={storage}",
                    "--set", "checkpoint.run_name=multinode", "--set", "scaling.num_workers=2",
                    "--set", "scaling.placement_strategy=STRICT_SPREAD")
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"submit.sh did not finish within {JOB_TIMEOUT_S} s; last output:\n{out[-6000:]}")
    log = r.stdout + r.stderr
    assert r.returncode == 0, f"submit.sh exited {r.returncode}:\n{log[-6000:]}"
    assert "token auth on" in r.stderr
    upload = re.search(r"-> ([0-9.]+) MiB upload", r.stderr)
    assert upload and float(upload.group(1)) < 5, f"working dir upload too big: {r.stderr}"

    summary = json.loads((storage / "multinode" / "summary.json").read_text())
    assert summary["status"] == "finished", summary
    checks = summary["replica_checksums"]
    assert len(checks) == 2 and checks[0] == checks[1], summary

    # One Ray Train worker per node (Ray's State API through the dashboard; finished actors are kept as DEAD).
    job_id = cluster.get(f"/api/jobs/{submission_id}")["job_id"]
    query = urllib.parse.urlencode({"limit": 1000, "filter_keys": "class_name", "filter_predicates": "=",
                                    "filter_values": "RayTrainWorker"})
    actors = cluster.get(f"/api/v0/actors?{query}")["data"]["result"]["result"]
    nodes = {a["node_id"] for a in actors if a["job_id"] == job_id}
    assert nodes == cluster.alive_node_ids(), f"Ray Train workers ran on {nodes}, expected both nodes"
