"""The on-disk dataset: Parquet files of SDF samples and of ground-truth surface samples, plus ``manifest.json``.

Layout of a dataset directory::

    manifest.json
    part-00000.parquet      SDF samples: scene:int32, x, y, z, sdf: float32 (normalised frame)
    part-00001.parquet      ...
    surface-00000.parquet   ground truth: scene:int32, x, y, z, nx, ny, nz: float32 (original frame)

Rows are grouped by scene (scene = global scene id = index into ``manifest.scenes``); within a scene all
SDF rows with ``sdf > 0`` come first, then the rows with ``sdf <= 0``. Every scene is its own Parquet row group
in each file set, so that a rank reads only the row groups of the scenes it owns. A scene's ``normalization``
maps its original frame to the normalised one: ``normalized = (p + offset) * scale``. Surface samples (DeepSDF
uses 30,000 per shape) stay in the original frame, as DeepSDF's ``SurfaceSamples``; ``num_surface = 0`` means
the scene has no ground truth (and every scene of a format-version-1 dataset).

This module gathers the API; the parts live in :mod:`~sdf_ray.data.manifest` (description and frames),
:mod:`~sdf_ray.data.read` and :mod:`~sdf_ray.data.write`.
"""

from __future__ import annotations

from sdf_ray.data.manifest import (
    COLUMNS,
    FORMAT,
    FORMAT_VERSION,
    IDENTITY_NORMALIZATION,
    MANIFEST_NAME,
    SCHEMA,
    SURFACE_COLUMNS,
    SURFACE_SCHEMA,
    FileEntry,
    Manifest,
    SceneEntry,
    read_manifest,
    to_normalized,
    to_original,
)
from sdf_ray.data.read import (
    PackedScenes,
    SurfaceSamples,
    load_scene_rows,
    load_scenes,
    load_surface,
    validate_files,
)
from sdf_ray.data.write import DEFAULT_MAX_ROWS_PER_FILE, SceneSamples, write_dataset

__all__ = [
    "COLUMNS", "DEFAULT_MAX_ROWS_PER_FILE", "FORMAT", "FORMAT_VERSION", "IDENTITY_NORMALIZATION", "MANIFEST_NAME",
    "SCHEMA", "SURFACE_COLUMNS", "SURFACE_SCHEMA", "FileEntry", "Manifest", "PackedScenes", "SceneEntry",
    "SceneSamples", "SurfaceSamples", "load_scene_rows", "load_scenes", "load_surface", "read_manifest", "to_normalized",
    "to_original", "validate_files", "write_dataset",
]
