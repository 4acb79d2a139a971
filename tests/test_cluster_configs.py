"""Static checks of the cluster configs (no cluster, no cloud, a few seconds).

ray_cluster.yaml is validated with the exact calls `ray up` makes before it
contacts the cloud provider (prepare_config + validate_config from Ray 2.60's
autoscaler), and the raw file against ray-schema.json.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "ray_cluster.yaml"
RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"
SUBMIT = REPO / "cluster" / "submit.sh"
KUBERAY = REPO / "cluster" / "kuberay"

jsonschema = pytest.importorskip("jsonschema")


def pinned_ray_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', text)
    assert m, "pyproject.toml must pin ray[...]==X.Y.Z"
    return m.group(1)


# --------------------------------------------------------------------------- ray up config


def _schema() -> dict:
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


def _ray_up_validate(cfg: dict) -> dict:
    """What `ray up` does offline: merge provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def cluster_cfg() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_ray_cluster_yaml_matches_ray_schema(cluster_cfg):
    jsonschema.validate(cluster_cfg, _schema())
    prepared = _ray_up_validate(cluster_cfg)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize(
    "breakage",
    ["drop_head_node_type", "typo_top_level_key", "typo_node_type_key", "min_over_max_workers"],
)
def test_broken_ray_cluster_yaml_fails_validation(cluster_cfg, breakage):
    cfg = copy.deepcopy(cluster_cfg)
    if breakage == "drop_head_node_type":
        del cfg["head_node_type"]
    elif breakage == "typo_top_level_key":
        cfg["max_worker"] = cfg.pop("max_workers")
    elif breakage == "typo_node_type_key":
        node = cfg["available_node_types"]["gpu_1x_a10g"]
        node["min_worker"] = node.pop("min_workers")
    elif breakage == "min_over_max_workers":
        cfg["available_node_types"]["gpu_1x_a10g"]["min_workers"] = cfg["max_workers"] + 1
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _ray_up_validate(cfg)


def test_ray_cluster_yaml_content(cluster_cfg):
    version = pinned_ray_version()
    types = cluster_cfg["available_node_types"]
    head = cluster_cfg["head_node_type"]
    workers = {k: v for k, v in types.items() if k != head}
    assert workers, "need at least one worker type"
    gpu_instances = [w["node_config"]["InstanceType"] for w in workers.values()]
    assert any(t.startswith(("g5.", "g6", "p4", "p5")) for t in gpu_instances)
    assert all(w.get("min_workers", 0) == 0 for w in workers.values()), "GPU types should scale from zero"
    docker = cluster_cfg["docker"]
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            assert docker[key].startswith(f"rayproject/ray:{version}-"), docker[key]
    assert any("/mnt/shared:/mnt/shared" in o for o in docker["run_options"])
    assert any("/mnt/shared" in c for c in cluster_cfg["initialization_commands"])
    # token auth on both head and workers
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(cluster_cfg[key])
        assert "RAY_AUTH_MODE=token" in start, key
        assert "ray start" in start
    assert "~/.ray/auth_token" in cluster_cfg["file_mounts"]
    assert cluster_cfg["file_mounts"]["~/sdf-ray"] == "."
    setup = " ".join(cluster_cfg["worker_setup_commands"])
    assert "torch" in setup and "pip install -q -e ~/sdf-ray" in setup
    assert setup.index("torch") < setup.index("-e ~/sdf-ray")


# --------------------------------------------------------------------------- runtime env


@pytest.fixture(scope="module")
def runtime_env() -> dict:
    return yaml.safe_load(RUNTIME_ENV.read_text())


def test_runtime_env_accepted_by_ray(runtime_env):
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**runtime_env)
    assert env.get("env_vars", {}).get("NCCL_NVLS_ENABLE") == "0"
    assert "RAY_AUTH_TOKEN" not in env.get("env_vars", {}), "never ship the token in a runtime_env"


def test_runtime_env_excludes_heavy_dirs_but_not_the_package(runtime_env):
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(REPO, runtime_env["excludes"])
    for heavy in (
        ".venv",
        ".venv/lib/x.py",
        "data",
        "data/deepsdf/a.npz",
        "runs",
        "runs/r/summary.json",
        ".git",
        ".gpu",
        "x.parquet",
        "sdf_ray/data/x.parquet",
    ):
        assert excluded(REPO / heavy), heavy
    # anchored patterns: the sdf_ray.data package and configs must still ship
    for keep in (
        "sdf_ray",
        "sdf_ray/data",
        "sdf_ray/data/__init__.py",
        "sdf_ray/configs/deepsdf.yaml",
        "pyproject.toml",
    ):
        assert not excluded(REPO / keep), keep


def _preflight():
    sys.path.insert(0, str(REPO / "cluster"))
    try:
        import preflight
    finally:
        sys.path.pop(0)
    return preflight


def test_working_dir_upload_is_small():
    preflight = _preflight()
    total, files = preflight.upload_size(str(REPO), str(RUNTIME_ENV))
    names = {n for _, n in files}
    assert "pyproject.toml" in names
    assert not any(n.startswith((".venv/", ".git/", "data/", "runs/")) for n in names)
    assert total < preflight.DEFAULT_MAX_UPLOAD_MIB * 1024**2


def test_preflight_storage_check_agrees_with_the_run(capsys):
    """submit.sh warns exactly where `sdf-ray train` refuses (a URI) or warns (node-local storage, several nodes)."""
    import argparse

    from sdf_ray.errors import ConfigError
    from sdf_ray.launch import check_storage_path, storage_warning

    preflight = _preflight()

    def warnings_for(storage: str) -> str:
        entrypoint = ["sdf-ray", "train", "--config", "sdf_ray/configs/tiny.yaml",
                      "--set", f"checkpoint.storage_path={storage}", "--set", "scaling.use_gpu=true"]
        args = argparse.Namespace(entrypoint=entrypoint, working_dir=str(REPO), address="http://127.0.0.1:1",
                                  timeout=0.2)
        assert preflight.cmd_storage(args) == 0
        return capsys.readouterr().err

    assert "is a URI" in warnings_for("s3://bucket/runs")
    with pytest.raises(ConfigError, match="is a URI"):
        check_storage_path("s3://bucket/runs")
    assert "checkpoint.storage_path" not in warnings_for("/mnt/shared/runs")
    assert storage_warning("/mnt/shared/runs", 3) is None
    assert "spans several nodes" in warnings_for("/tmp/runs")
    assert storage_warning("/tmp/runs", 3) is not None


# --------------------------------------------------------------------------- kuberay


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def _cluster_specs() -> list[tuple[str, dict]]:
    (rc,) = _docs("raycluster.yaml")
    (rj,) = _docs("rayjob.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert rj["apiVersion"] == "ray.io/v1" and rj["kind"] == "RayJob"
    return [("raycluster", rc["spec"]), ("rayjob", rj["spec"]["rayClusterSpec"])]


def _containers(spec: dict) -> list[tuple[str, dict, dict]]:
    out = [
        ("head", c, spec["headGroupSpec"]["template"]["spec"])
        for c in spec["headGroupSpec"]["template"]["spec"]["containers"]
    ]
    for g in spec["workerGroupSpecs"]:
        out += [(g["groupName"], c, g["template"]["spec"]) for c in g["template"]["spec"]["containers"]]
    return out


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_kuberay_cluster_structure(which):
    spec = dict(_cluster_specs())[which]
    version = pinned_ray_version()
    assert str(spec["rayVersion"]) == version
    assert "headGroupSpec" in spec and spec["workerGroupSpecs"], "head + at least one worker group"
    head_res = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head_res.get("limits", {}), "head is a CPU pod"
    for group in spec["workerGroupSpecs"]:
        assert "rayStartParams" in group
        for c in group["template"]["spec"]["containers"]:
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]
    for role, c, pod in _containers(spec):
        image = c["image"]
        assert image.startswith(f"rayproject/ray:{version}-"), f"{role}: {image} does not match ray=={version}"
        env = _env(c)
        assert env.get("RAY_AUTH_MODE") == "token", role
        assert "RAY_AUTH_TOKEN" in env, role
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert "/mnt/shared" in mounts, f"{role}: shared volume not mounted"
        vols = {v["name"]: v for v in pod["volumes"]}
        claim = vols[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"]
        (pvc, *_) = _docs("pvc.yaml")
        assert pvc["kind"] == "PersistentVolumeClaim" and claim == pvc["metadata"]["name"]
        assert "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_rayjob_entrypoint_and_lifecycle():
    (rj,) = _docs("rayjob.yaml")
    spec = rj["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["sdf-ray", "train"]
    config = argv[argv.index("--config") + 1]
    assert (REPO / config).is_file(), f"entrypoint config {config} missing from the repo"
    sets = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")
    assert sets["checkpoint.storage_path"].startswith("/mnt/shared/")
    assert sets["scaling.use_gpu"] == "true"
    n = int(sets["scaling.num_workers"])
    gpus = sum(
        g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert gpus >= n, f"{n} GPU workers requested but the RayJob cluster has {gpus} GPUs"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["backoffLimit"], int)
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode")
    if spec["submissionMode"] == "K8sJobMode":
        (sub,) = spec["submitterPodTemplate"]["spec"]["containers"]
        assert _env(sub).get("RAY_AUTH_MODE") == "token" and "RAY_AUTH_TOKEN" in _env(sub)

    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))


# --------------------------------------------------------------------------- submit.sh


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_submit(args: list[str], **env_over) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(env_over)
    env.setdefault("SDF_RAY_PYTHON", sys.executable)
    return subprocess.run(["bash", str(SUBMIT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_submit_sh_syntax():
    subprocess.run(["bash", "-n", str(SUBMIT)], check=True)


def test_submit_sh_without_address_fails_fast():
    r = _run_submit(["--", "sdf-ray", "train", "--config", "sdf_ray/configs/tiny.yaml"])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no cluster address" in lines[0], r.stderr


def test_submit_sh_with_nothing_listening_fails_fast():
    port = _free_port()
    r = _run_submit(
        ["--address", f"http://127.0.0.1:{port}", "--", "sdf-ray", "train", "--config", "sdf_ray/configs/tiny.yaml"]
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], r.stderr
    # RAY_ADDRESS is honoured the same way
    r = _run_submit(["--", "true"], RAY_ADDRESS=f"127.0.0.1:{port}")
    assert r.returncode == 2 and "no Ray dashboard answering" in r.stderr


def test_submit_sh_needs_a_command():
    r = _run_submit(["--address", "http://127.0.0.1:1"])
    assert r.returncode == 2 and "no command given" in r.stderr
