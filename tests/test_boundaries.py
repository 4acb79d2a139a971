"""Module boundaries from DESIGN.md: library code stays free of Ray where it should."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sdf_ray import config as C
from sdf_ray.launch import storage_warning


@pytest.mark.parametrize("module", ["sdf_ray.config", "sdf_ray.model", "sdf_ray.loss", "sdf_ray.latents",
                                    "sdf_ray.guard", "sdf_ray.dist", "sdf_ray.train_loop", "sdf_ray.data.format",
                                    "sdf_ray.data.sampler", "sdf_ray.launch"])
def test_library_modules_do_not_import_ray(module):
    code = f"import sys, {module}; sys.exit(1 if 'ray' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, f"{module} imports ray"


def test_ray_init_happens_only_in_the_cli():
    from pathlib import Path

    root = Path(__file__).parents[1]
    offenders = [str(p.relative_to(root)) for p in list((root / "sdf_ray").rglob("*.py")) + list(
        (root / "tuning").rglob("*.py")) if "ray.init(" in p.read_text() and p.name != "cli.py"]
    assert offenders == []


def test_multi_node_local_storage_is_warned_about():
    cfg = C.TrainConfig()
    assert storage_warning(cfg, 1) is None
    assert "3 nodes" in (storage_warning(cfg, 3) or "")
    from sdf_ray.errors import ConfigError
    from sdf_ray.launch import resolve_paths

    with pytest.raises(ConfigError, match="is a URI"):
        resolve_paths(C.replace(cfg, "checkpoint.storage_path", "s3://bucket/runs"))
