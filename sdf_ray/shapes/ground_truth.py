"""Ground-truth surface samples of a dataset's scenes (``sdf_ray.data.format.load_surface``).

Ground truth is in the ORIGINAL mesh frame, with the normalisation ``normalized = (p + offset) * scale``.
Datasets written before ground truth existed, and scenes imported without it, have none: the functions here
then answer "no ground truth" instead of failing, so reconstruction and meshing still run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdf_ray.data.format import MANIFEST_NAME, Manifest, load_surface, read_manifest


@dataclass
class GroundTruth:
    points_M3: np.ndarray
    """Surface points in the original frame (float64)."""
    normals_M3: np.ndarray | None
    """Unit normals at those points, or None (DeepSDF's SurfaceSamples have none)."""
    normalization: dict[str, Any]


@functools.lru_cache(maxsize=4)
def _manifest(path: str, mtime_ns: int) -> Manifest:
    return read_manifest(path)


def _cached_manifest(data_path: str | Path) -> Manifest:
    """The manifest, read once per process (meshing tasks run thousands of shapes on few workers); the file's
    mtime is part of the key, so a dataset rewritten in place is read again."""
    d = Path(data_path)
    return _manifest(str(d), (d / MANIFEST_NAME).stat().st_mtime_ns)


def load_ground_truth(data_path: str | Path, scene_id: int, fallback_normalization: dict[str, Any],
                      ) -> GroundTruth | None:
    """The scene's ground truth, or None when the dataset has none for it."""
    manifest = _cached_manifest(data_path)
    if not manifest.scenes[scene_id].has_ground_truth:
        return None
    surface = load_surface(data_path, [scene_id], manifest=manifest).get(scene_id)
    if surface is None or len(surface.points_M3) == 0:
        return None
    normals = surface.normals_M3
    return GroundTruth(np.asarray(surface.points_M3, dtype=np.float64),
                       None if normals is None or len(normals) == 0 else np.asarray(normals, dtype=np.float64),
                       dict(surface.normalization or fallback_normalization))
