"""Reading a dataset: only the row groups of the scenes asked for, checked against the manifest.

:func:`load_scenes` packs SDF samples for the device sampler; :func:`load_surface` returns the ground-truth
surface samples that reconstruction metrics compare against; :func:`validate_files` checks every file's
footer (cheap) before a run starts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdf_ray.data.manifest import (
    SCHEMA,
    SURFACE_COLUMNS,
    SURFACE_SCHEMA,
    Manifest,
    SceneEntry,
    dataset_dir,
    read_manifest,
    to_normalized,
)
from sdf_ray.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class PackedScenes:
    """Samples of a subset of scenes, concatenated: each scene's positive rows then its negative rows.

    All offsets index rows of ``samples_M4``; entry ``j`` of every array describes ``scene_ids[j]``.
    """

    samples_M4: np.ndarray
    pos_offset: np.ndarray
    pos_count: np.ndarray
    neg_offset: np.ndarray
    neg_count: np.ndarray
    scene_ids: np.ndarray

    @property
    def num_scenes(self) -> int:
        return int(self.scene_ids.shape[0])


@dataclass(frozen=True, eq=False)
class SurfaceSamples:
    """One scene's ground-truth surface samples, in the ORIGINAL mesh frame (as DeepSDF's SurfaceSamples).

    ``normalization`` maps them to the frame of the SDF samples: ``normalized = (p + offset) * scale``.
    """

    points_M3: np.ndarray
    """float32 (M, 3)."""
    normals_M3: np.ndarray | None
    """float32 (M, 3) unit normals, or None when the source had none (DeepSDF's .ply files)."""
    normalization: dict[str, Any]

    def normalized_points(self) -> np.ndarray:
        return to_normalized(self.points_M3, self.normalization)


# --------------------------------------------------------------------------------------------------
# Files


def _open_parquet(path: Path) -> pq.ParquetFile:
    if not path.is_file():
        raise DataError(f"missing data file {path.name} in {path.parent}")
    try:
        return pq.ParquetFile(path, memory_map=True)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"corrupt or truncated Parquet file {path.name} in {path.parent}: {e}") from None


def _check_file_metadata(pf: pq.ParquetFile, path: Path, expected_rows: int, schema: pa.Schema = SCHEMA) -> None:
    got = [(f.name, f.type) for f in pf.schema_arrow]
    want = [(f.name, f.type) for f in schema]
    if got != want:
        desc = ", ".join(f"{n}:{t}" for n, t in got)
        expected = ", ".join(f"{n}:{t}" for n, t in want)
        raise DataError(f"wrong schema in {path.name} in {path.parent}: got [{desc}], expected [{expected}]")
    rows = pf.metadata.num_rows
    if rows != expected_rows:
        raise DataError(f"manifest says {expected_rows} rows in {path.name}, file has {rows} (dataset {path.parent})")


def validate_files(path: str | Path) -> Manifest:
    """Check that every data file exists, is readable Parquet with the right schema and the manifest's row count.

    Only Parquet metadata (footers) is read, so this is cheap even for large datasets. Returns the manifest.
    """
    d = dataset_dir(path)
    manifest = read_manifest(d)
    for files, schema in ((manifest.files, SCHEMA), (manifest.surface_files, SURFACE_SCHEMA)):
        for f in files:
            fp = d / f.name
            _check_file_metadata(_open_parquet(fp), fp, f.num_rows, schema)
    listed = {f.name for f in manifest.files + manifest.surface_files}
    extra = sorted(p.name for p in d.glob("*.parquet") if p.name not in listed)
    if extra:
        log.warning("dataset %s holds Parquet files not listed in its manifest: %s", d, ", ".join(extra[:5]))
    return manifest


def _read_ranges(d: Path, fname: str, expected_rows: int, schema: pa.Schema, starts: np.ndarray,
                 counts: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Read only the row groups of ``fname`` that overlap the row ranges ``[start, start + count)``.

    Returns the columns read and, for each range, the row where it begins in them.
    """
    fp = d / fname
    pf = _open_parquet(fp)
    _check_file_metadata(pf, fp, expected_rows, schema)
    md = pf.metadata
    rg_sizes = np.array([md.row_group(k).num_rows for k in range(md.num_row_groups)], dtype=np.int64)
    rg_starts = np.concatenate([[0], np.cumsum(rg_sizes)])
    k0 = np.searchsorted(rg_starts, starts, side="right") - 1
    k1 = np.searchsorted(rg_starts, starts + counts, side="left")  # exclusive
    wanted = np.zeros(len(rg_sizes), dtype=bool)
    for lo, hi in zip(k0.tolist(), k1.tolist(), strict=True):
        wanted[lo:hi] = True
    rgs = np.flatnonzero(wanted)
    # Position of each selected row group inside the table we read.
    table_pos = np.full(len(rg_sizes), -1, dtype=np.int64)
    table_pos[rgs] = np.concatenate([[0], np.cumsum(rg_sizes[rgs])[:-1]]) if rgs.size else []
    try:
        table = pf.read_row_groups(rgs.tolist(), columns=schema.names, use_threads=True)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"corrupt or truncated Parquet file {fname} in {d}: {e}") from None
    cols = [table.column(c).to_numpy() for c in schema.names]
    return cols, table_pos[k0] + (starts - rg_starts[k0])


def _check_ids(ids: np.ndarray, manifest: Manifest, d: Path) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= manifest.num_scenes):
        bad_id = int(ids[(ids < 0) | (ids >= manifest.num_scenes)][0])
        raise DataError(f"scene id {bad_id} out of range: dataset {d} has {manifest.num_scenes} scenes")


def _by_file(files: Sequence[str]) -> dict[str, list[int]]:
    """Positions grouped by file, so that each file is opened and read once."""
    groups: dict[str, list[int]] = {}
    for j, name in enumerate(files):
        groups.setdefault(name, []).append(j)
    return groups


# --------------------------------------------------------------------------------------------------
# SDF samples


def _read_scene_rows(d: Path, manifest: Manifest, ids: np.ndarray,
                     ) -> tuple[list[SceneEntry], np.ndarray, np.ndarray, np.ndarray]:
    """The rows of the scenes ``ids``, packed in that order: (entries, samples ``[M, 4]``, each scene's first row,
    each scene's row count). Only their row groups are read; the ``scene`` column must hold each scene's id."""
    _check_ids(ids, manifest, d)
    entries = [manifest.scenes[int(i)] for i in ids]
    totals = np.array([e.num_pos + e.num_neg for e in entries], dtype=np.int64)
    starts = np.zeros(len(entries), dtype=np.int64)
    if len(entries):
        starts[1:] = np.cumsum(totals)[:-1]
    num_rows = int(totals.sum())
    samples = np.empty((num_rows, 4), dtype=np.float32)
    scene_col = np.empty(num_rows, dtype=np.int32)

    file_rows = {f.name: f.num_rows for f in manifest.files}
    for fname, js in _by_file([e.file for e in entries]).items():
        a = np.array([entries[j].row_offset for j in js], dtype=np.int64)
        cols, src = _read_ranges(d, fname, file_rows[fname], SCHEMA, a, totals[js])
        for j, s0 in zip(js, src.tolist(), strict=True):
            n = int(totals[j])
            dst = int(starts[j])
            scene_col[dst:dst + n] = cols[0][s0:s0 + n]
            for c in range(4):
                samples[dst:dst + n, c] = cols[c + 1][s0:s0 + n]
        del cols

    expected_scene = np.repeat(ids.astype(np.int32), totals)
    scene_ok = np.asarray(scene_col == expected_scene)
    if not scene_ok.all():
        j = int(np.searchsorted(np.cumsum(totals), int(np.flatnonzero(~scene_ok)[0]), side="right"))
        raise DataError(f"scene column mismatch in {entries[j].file} ({d}): rows of scene {int(ids[j])} "
                        f"({entries[j].name}) hold another scene's id")
    return entries, samples, starts, totals


def load_scene_rows(path: str | Path, scene_ids: Sequence[int], *, manifest: Manifest | None = None,
                    ) -> list[np.ndarray]:
    """Each scene's rows ``(x, y, z, sdf)`` as stored, in the order given, without the finiteness and sign
    checks of :func:`load_scenes` (reconstruction reads held-out data other tools wrote, and cleans it itself)."""
    d = dataset_dir(path)
    if manifest is None:
        manifest = read_manifest(d)
    ids = np.asarray(scene_ids, dtype=np.int64).reshape(-1)
    _, samples, starts, totals = _read_scene_rows(d, manifest, ids)
    return [samples[a:a + n] for a, n in zip(starts.tolist(), totals.tolist(), strict=True)]


def load_scenes(path: str | Path, scene_ids: Sequence[int], *, manifest: Manifest | None = None) -> PackedScenes:
    """Read only the row groups holding ``scene_ids`` and pack them, in the order given.

    Each scene's rows are checked against the manifest: the ``scene`` column must hold the scene's id and
    the first ``num_pos`` rows must have ``sdf > 0``, the rest ``sdf <= 0``.
    """
    d = dataset_dir(path)
    if manifest is None:
        manifest = read_manifest(d)
    ids = np.asarray(scene_ids, dtype=np.int64).reshape(-1)
    entries, samples, starts, totals = _read_scene_rows(d, manifest, ids)
    pos_count = np.array([e.num_pos for e in entries], dtype=np.int64)
    neg_count = np.array([e.num_neg for e in entries], dtype=np.int64)
    row_ends = np.cumsum(totals)

    def first_bad(ok_rows: np.ndarray) -> tuple[int, SceneEntry]:
        """(global scene id, manifest entry) of the scene holding the first row where ``ok_rows`` is False."""
        j = int(np.searchsorted(row_ends, int(np.flatnonzero(~ok_rows)[0]), side="right"))
        return int(ids[j]), entries[j]

    finite = np.asarray(np.isfinite(samples).all(axis=1))
    if not finite.all():
        sid, bad = first_bad(finite)
        raise DataError(f"scene {sid} ({bad.name}) in {bad.file} ({d}): {int((~finite).sum())} row(s) hold "
                        f"NaN or Inf values; a dataset must be finite (import-deepsdf drops such rows)")
    is_pos_row = np.repeat(np.tile(np.array([True, False]), len(entries)), np.stack([pos_count, neg_count], 1).ravel())
    sign_ok = (samples[:, 3] > 0) == is_pos_row
    if not sign_ok.all():
        sid, bad = first_bad(sign_ok)
        raise DataError(f"scene {sid} ({bad.name}) in {bad.file} ({d}): rows are not positive-first as the "
                        f"manifest says ({bad.num_pos} with sdf > 0, then {bad.num_neg} with sdf <= 0)")
    return PackedScenes(samples_M4=samples, pos_offset=starts, pos_count=pos_count, neg_offset=starts + pos_count,
                        neg_count=neg_count, scene_ids=ids)


# --------------------------------------------------------------------------------------------------
# Ground-truth surface samples


def load_surface(path: str | Path, scene_ids: Sequence[int], *,
                 manifest: Manifest | None = None) -> dict[int, SurfaceSamples]:
    """Ground-truth surface samples of those of ``scene_ids`` that have them (``Manifest.num_with_ground_truth``),
    keyed by scene id; reads only their row groups."""
    d = dataset_dir(path)
    if manifest is None:
        manifest = read_manifest(d)
    ids = np.asarray(scene_ids, dtype=np.int64).reshape(-1)
    _check_ids(ids, manifest, d)
    wanted = sorted({int(i) for i in ids if manifest.scenes[int(i)].num_surface > 0})
    entries = [manifest.scenes[i] for i in wanted]
    file_rows = {f.name: f.num_rows for f in manifest.surface_files}
    out: dict[int, SurfaceSamples] = {}
    for fname, js in _by_file([e.surface_file for e in entries]).items():
        a = np.array([entries[j].surface_row_offset for j in js], dtype=np.int64)
        n = np.array([entries[j].num_surface for j in js], dtype=np.int64)
        cols, src = _read_ranges(d, fname, file_rows[fname], SURFACE_SCHEMA, a, n)
        for j, s0, count in zip(js, src.tolist(), n.tolist(), strict=True):
            e, sid = entries[j], wanted[j]
            rows = slice(s0, s0 + count)
            if not (cols[0][rows] == sid).all():
                raise DataError(f"scene column mismatch in {fname} ({d}): surface rows of scene {sid} ({e.name}) "
                                f"hold another scene's id")
            points = np.stack([cols[SURFACE_COLUMNS.index(c)][rows] for c in ("x", "y", "z")], axis=1)
            normals = (np.stack([cols[SURFACE_COLUMNS.index(c)][rows] for c in ("nx", "ny", "nz")], axis=1)
                       if e.surface_has_normals else None)
            if not np.isfinite(points).all() or (normals is not None and not np.isfinite(normals).all()):
                raise DataError(f"scene {sid} ({e.name}) in {fname} ({d}): surface samples hold NaN or Inf values")
            out[sid] = SurfaceSamples(points_M3=points, normals_M3=normals, normalization=dict(e.normalization))
        del cols
    return out

