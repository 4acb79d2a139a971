"""Writing a dataset, atomically: scenes are consumed one at a time into a temporary sibling directory
(:func:`sdf_ray.fsutil.atomic_directory`) that replaces the target only once complete, so a crash never
leaves a half-written dataset at the target path, and an overwritten dataset survives a failed write.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdf_ray.data.manifest import (
    IDENTITY_NORMALIZATION,
    MANIFEST_NAME,
    SCHEMA,
    SURFACE_SCHEMA,
    FileEntry,
    Manifest,
    SceneEntry,
    normalization_problem,
)
from sdf_ray.errors import DataError
from sdf_ray.fsutil import atomic_directory

log = logging.getLogger(__name__)

DEFAULT_MAX_ROWS_PER_FILE = 2_000_000


@dataclass
class SceneSamples:
    """One scene's samples as produced by a generator or importer, before writing.

    ``pos_N4`` holds rows ``(x, y, z, sdf)`` with ``sdf > 0``; ``neg_N4`` the rows with ``sdf <= 0``.
    ``normalization`` maps original coordinates to the stored ones: ``stored = (orig + offset) * scale``
    (DeepSDF's convention); SDF values are stored in the normalised frame.
    The optional ground truth, ``surface_points_M3`` and ``surface_normals_M3`` (unit normals; may be None
    with points), is in the ORIGINAL frame, exactly like DeepSDF's SurfaceSamples.
    """

    name: str
    pos_N4: np.ndarray
    neg_N4: np.ndarray
    normalization: dict[str, Any] = field(default_factory=lambda: dict(IDENTITY_NORMALIZATION))
    dropped_nan_rows: int = 0
    surface_points_M3: np.ndarray | None = None
    surface_normals_M3: np.ndarray | None = None


# --------------------------------------------------------------------------------------------------
# Checking what is about to be written


def _is_dataset_or_empty(p: Path) -> tuple[bool, bool]:
    """(holds a manifest, is empty)."""
    has_manifest = (p / MANIFEST_NAME).exists()
    return has_manifest, (not has_manifest and not any(p.iterdir()))


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise DataError(f"output path {out} exists and is not a directory")
    has_manifest, empty = _is_dataset_or_empty(out)
    if empty:
        return
    if has_manifest:
        if not overwrite:
            raise DataError(f"output directory {out} already holds a dataset (use --overwrite to replace it)")
        return
    if not overwrite:
        raise DataError(f"output directory {out} is not empty (use --overwrite to replace it)")
    # Refuse to wipe an arbitrary directory: only something that looks like a dataset may be replaced.
    others = [p.name for p in out.iterdir() if p.suffix != ".parquet"]
    if others:
        raise DataError(f"output directory {out} is not empty and is not an sdf-ray dataset "
                        f"(holds {others[0]!r}); refusing to replace it even with --overwrite")


def _finite_float32(a: Any, label: str, scene: str, columns: int) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 2 or arr.shape[1] != columns:
        raise DataError(f"scene {scene}: {label} must have shape (N, {columns}), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"scene {scene}: {label} must be numeric, got {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise DataError(f"scene {scene}: {label} contains NaN or inf values")
    return arr


def _validated_arrays(scene: SceneSamples) -> tuple[np.ndarray, np.ndarray]:
    pos = _finite_float32(scene.pos_N4, "pos_N4", scene.name, 4)
    neg = _finite_float32(scene.neg_N4, "neg_N4", scene.name, 4)
    if len(pos) == 0 or len(neg) == 0:
        raise DataError(f"scene {scene.name}: needs both positive and negative samples "
                        f"(got {len(pos)} with sdf > 0 and {len(neg)} with sdf <= 0)")
    if not (pos[:, 3] > 0).all():
        raise DataError(f"scene {scene.name}: pos_N4 has rows with sdf <= 0")
    if not (neg[:, 3] <= 0).all():
        raise DataError(f"scene {scene.name}: neg_N4 has rows with sdf > 0")
    return pos, neg


def _validated_surface(scene: SceneSamples) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(points, normals or None), or None for a scene without ground truth."""
    if scene.surface_points_M3 is None:
        if scene.surface_normals_M3 is not None:
            raise DataError(f"scene {scene.name}: surface_normals_M3 given without surface_points_M3")
        return None
    points = _finite_float32(scene.surface_points_M3, "surface_points_M3", scene.name, 3)
    if len(points) == 0:
        raise DataError(f"scene {scene.name}: surface_points_M3 is empty (use None for a scene without ground truth)")
    if scene.surface_normals_M3 is None:
        return points, None
    normals = _finite_float32(scene.surface_normals_M3, "surface_normals_M3", scene.name, 3)
    if normals.shape != points.shape:
        raise DataError(f"scene {scene.name}: surface_normals_M3 has shape {normals.shape}, surface_points_M3 "
                        f"{points.shape}")
    return points, normals


def _normalization(scene: SceneSamples) -> dict[str, Any]:
    norm = scene.normalization if scene.normalization is not None else dict(IDENTITY_NORMALIZATION)
    norm = {"offset": [float(v) for v in np.asarray(norm.get("offset", [0, 0, 0])).reshape(-1)],
            "scale": float(norm.get("scale", 1.0)), **{k: v for k, v in norm.items() if k not in ("offset", "scale")}}
    problem = normalization_problem(norm)
    if problem:
        raise DataError(f"scene {scene.name}: normalization {problem}")
    return norm


# --------------------------------------------------------------------------------------------------
# Writing


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _PartWriter:
    """Parquet files ``<prefix>-00000.parquet``... of at most ``max_rows`` rows (a larger scene gets a file of
    its own), one row group per scene, so that a reader reads only the row groups of the scenes it wants."""

    def __init__(self, directory: Path, prefix: str, schema: pa.Schema, max_rows: int) -> None:
        self.directory, self.prefix, self.schema, self.max_rows = directory, prefix, schema, max_rows
        self.files: list[FileEntry] = []
        self._writer: pq.ParquetWriter | None = None
        self._name = ""
        self._rows = 0

    def write(self, scene_id: int, columns: list[np.ndarray]) -> tuple[str, int]:
        """Append one scene's rows; returns (file name, row offset of the scene in it)."""
        n = len(columns[0])
        if self._writer is not None and self._rows + n > self.max_rows:
            self.close()
        if self._writer is None:
            self._name = f"{self.prefix}-{len(self.files):05d}.parquet"
            self._rows = 0
            self._writer = pq.ParquetWriter(self.directory / self._name, self.schema, compression="snappy",
                                            use_dictionary=["scene"], write_statistics=True)
        table = pa.Table.from_arrays([pa.array(np.full(n, scene_id, dtype=np.int32))]
                                     + [pa.array(c) for c in columns], schema=self.schema)
        self._writer.write_table(table, row_group_size=n)
        offset = self._rows
        self._rows += n
        return self._name, offset

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            _fsync_path(self.directory / self._name)
            self.files.append(FileEntry(name=self._name, num_rows=self._rows))

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _write_files(tmp: Path, scenes: Iterable[SceneSamples], source: dict[str, Any], max_rows_per_file: int) -> Manifest:
    entries: list[SceneEntry] = []
    names: set[str] = set()
    parts = _PartWriter(tmp, "part", SCHEMA, max_rows_per_file)
    surfaces = _PartWriter(tmp, "surface", SURFACE_SCHEMA, max_rows_per_file)
    try:
        for scene in scenes:
            if not isinstance(scene.name, str) or not scene.name:
                raise DataError(f"scene {len(entries)}: name must be a non-empty string")
            if scene.name in names:
                raise DataError(f"duplicate scene name {scene.name!r}")
            names.add(scene.name)
            norm = _normalization(scene)
            pos, neg = _validated_arrays(scene)
            surface = _validated_surface(scene)
            samples = np.concatenate([pos, neg])
            file, row_offset = parts.write(len(entries), [samples[:, c] for c in range(4)])
            gt: dict[str, Any] = {}
            if surface is not None:
                points, normals = surface
                has_normals = normals is not None
                if normals is None:
                    normals = np.full_like(points, np.nan)  # never read: the manifest says there are none
                surface_file, surface_offset = surfaces.write(
                    len(entries), [points[:, c] for c in range(3)] + [normals[:, c] for c in range(3)])
                gt = {"num_surface": len(points), "surface_file": surface_file, "surface_row_offset": surface_offset,
                      "surface_has_normals": has_normals}
            entries.append(SceneEntry(name=scene.name, file=file, row_offset=row_offset, num_pos=len(pos),
                                      num_neg=len(neg), normalization=norm,
                                      dropped_nan_rows=int(scene.dropped_nan_rows), **gt))
            if len(entries) % 1000 == 0:
                log.info("wrote %d scenes", len(entries))
        parts.close()
        surfaces.close()
    finally:
        parts.abort()
        surfaces.abort()
    if not entries:
        raise DataError("no scenes to write: a dataset needs at least one scene")
    return Manifest(source=dict(source), num_scenes=len(entries), num_samples=sum(f.num_rows for f in parts.files),
                    files=tuple(parts.files), scenes=tuple(entries), surface_files=tuple(surfaces.files))


def _move_target_aside(out: Path, overwrite: bool) -> Path | None:
    """Clear ``out`` for the rename; a dataset being replaced is moved aside (returned) until the rename
    succeeded, so that a failure can put it back."""
    _check_target(out, overwrite)  # again: something may have appeared while we were writing
    if not out.exists():
        return None
    if _is_dataset_or_empty(out)[1]:
        out.rmdir()
        return None
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old)
    os.replace(out, old)
    return old


def write_dataset(out_dir: str | Path, scenes: Iterable[SceneSamples], source: dict[str, Any],
                  overwrite: bool = False, *, max_rows_per_file: int = DEFAULT_MAX_ROWS_PER_FILE) -> Manifest:
    """Write ``scenes`` (consumed lazily, one at a time) as a dataset at ``out_dir``, atomically.

    Refuses an ``out_dir`` that holds a dataset or is a non-empty directory unless ``overwrite``; even with
    ``overwrite`` a non-empty directory that does not look like a dataset (files other than Parquet and a
    manifest) is not deleted. Scenes larger than ``max_rows_per_file`` get a file of their own.
    """
    if max_rows_per_file <= 0:
        raise DataError(f"max_rows_per_file must be positive, got {max_rows_per_file}")
    try:
        json.dumps(source)
    except (TypeError, ValueError) as e:
        raise DataError(f"dataset source description is not JSON-serialisable: {e}") from None
    out = Path(os.path.abspath(out_dir))
    _check_target(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {out.parent}: {e}") from None
    old: Path | None = None
    try:
        with ExitStack() as stack:
            try:
                tmp = stack.enter_context(atomic_directory(out))
            except OSError as e:
                raise DataError(f"cannot write into {out.parent}: {e}") from None
            manifest = _write_files(tmp, scenes, source, max_rows_per_file)
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=1) + "\n", encoding="utf-8")
            _fsync_path(tmp / MANIFEST_NAME)
            old = _move_target_aside(out, overwrite)
        # Leaving the block renamed the temporary directory into place.
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)  # the rename failed: the old dataset goes back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    try:
        _fsync_path(out.parent)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename itself is still atomic
    return manifest
