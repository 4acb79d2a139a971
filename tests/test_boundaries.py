"""Module boundaries from DESIGN.md: library code stays free of Ray where it should."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdf_ray import config as C
from sdf_ray.launch import storage_warning

ROOT = Path(__file__).parents[1]


def _sources() -> list[Path]:
    return list((ROOT / "sdf_ray").rglob("*.py")) + list((ROOT / "tuning").rglob("*.py"))


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module", ["sdf_ray.config", "sdf_ray.model", "sdf_ray.loss", "sdf_ray.latents",
                                    "sdf_ray.guard", "sdf_ray.dist", "sdf_ray.train_loop", "sdf_ray.data.format",
                                    "sdf_ray.data.sampler", "sdf_ray.launch", "sdf_ray.ray_session",
                                    "sdf_ray.run_schedule", "sdf_ray.cli", "sdf_ray.train_state", "sdf_ray.checkpoint",
                                    "sdf_ray.validation", "sdf_ray.plots", "sdf_ray.data.mesh_sdf"])
# sdf_ray.shapes' pure modules: tests/test_shapes_reconstruct.py::test_pure_modules_do_not_import_ray
def test_library_modules_do_not_import_ray(module):
    code = f"import sys, {module}; sys.exit(1 if 'ray' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, f"{module} imports ray"


def test_ray_init_happens_only_in_the_ray_session():
    offenders = [str(p.relative_to(ROOT)) for p in _sources()
                 if "ray.init(" in p.read_text() and p.name != "ray_session.py"]
    assert offenders == []


def test_only_the_ray_session_reaches_into_ray_private_api():
    """Every workaround that depends on Ray's internals is in sdf_ray/ray_session.py, next to its Ray issue."""
    private = ("ray._private", "ray._raylet", "._internal", "_experiment_analysis")
    offenders = [f"{p.relative_to(ROOT)}: {needle}" for p in _sources() if p.name != "ray_session.py"
                 for needle in private if needle in p.read_text()]
    assert offenders == []


def test_the_tune_command_does_not_import_the_cli():
    """sdf_ray.cli registers tuning.cli; the way back would be an import circle."""
    assert "sdf_ray.cli" not in _modules_after_import("tuning.cli")
    imports_cli = re.compile(r"^\s*(from sdf_ray\.cli import|from sdf_ray import cli\b|import sdf_ray\.cli\b)", re.M)
    assert [p.name for p in (ROOT / "tuning").rglob("*.py") if imports_cli.search(p.read_text())] == []


def test_launch_needs_only_the_stdlib_and_yaml():
    """cluster/preflight.py asks launch's storage policy under the `ray` CLI's interpreter, before submission."""
    heavy = {"ray", "torch", "numpy", "pyarrow"} & _modules_after_import("sdf_ray.launch")
    assert heavy == set()


def test_multi_node_local_storage_is_warned_about():
    cfg = C.TrainConfig()
    assert storage_warning(cfg.checkpoint.storage_path, 1) is None
    assert "3 nodes" in (storage_warning(cfg.checkpoint.storage_path, 3) or "")
    assert storage_warning("/mnt/shared/runs", 3) is None  # where the cluster configs mount shared storage
    from sdf_ray.errors import ConfigError
    from sdf_ray.launch import resolve_paths

    with pytest.raises(ConfigError, match="is a URI"):
        resolve_paths(C.replace(cfg, "checkpoint.storage_path", "s3://bucket/runs"))


def test_a_failed_batch_reports_its_cause_not_the_ray_task_that_carried_it():
    from ray.exceptions import RayTaskError

    from sdf_ray.errors import cause_line

    actor_error = RayTaskError("_RemoteShapeWorker.run_split", "Traceback ...", RuntimeError("CUDA error: boom\nmore"))
    carried = RayTaskError("finish_shape", "Traceback ...", actor_error.as_instanceof_cause())
    assert cause_line(carried.as_instanceof_cause()) == "RuntimeError: CUDA error: boom"
    assert cause_line(ValueError("plain\nsecond")) == "plain"
    assert cause_line(RayTaskError("f", "Traceback ...", AssertionError())) == "AssertionError"
