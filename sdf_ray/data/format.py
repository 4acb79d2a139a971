"""The on-disk dataset: Parquet files of SDF samples plus ``manifest.json``.

Layout of a dataset directory::

    manifest.json
    part-00000.parquet   columns scene:int32, x, y, z, sdf: float32
    part-00001.parquet   ...

Rows are grouped by scene (scene = global scene id = index into ``manifest.scenes``); within a scene all
rows with ``sdf > 0`` come first, then the rows with ``sdf <= 0``. Every scene is written as its own
Parquet row group so that a rank reads only the row groups of the scenes it owns.

Writing is atomic: everything goes into a hidden temp directory next to the target, which is renamed
into place only once complete, so a crash never leaves a half-written dataset at the target path.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdf_ray.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "sdf-ray-dataset"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DEFAULT_MAX_ROWS_PER_FILE = 2_000_000
COLUMNS = ("scene", "x", "y", "z", "sdf")
SCHEMA = pa.schema(
    [
        pa.field("scene", pa.int32(), nullable=False),
        pa.field("x", pa.float32(), nullable=False),
        pa.field("y", pa.float32(), nullable=False),
        pa.field("z", pa.float32(), nullable=False),
        pa.field("sdf", pa.float32(), nullable=False),
    ]
)
IDENTITY_NORMALIZATION: dict[str, Any] = {"offset": [0.0, 0.0, 0.0], "scale": 1.0}


# --------------------------------------------------------------------------------------------------
# Data classes


@dataclass
class SceneSamples:
    """One scene's samples as produced by a generator or importer, before writing.

    ``pos_N4`` holds rows ``(x, y, z, sdf)`` with ``sdf > 0``; ``neg_N4`` the rows with ``sdf <= 0``.
    ``normalization`` maps original coordinates to the stored ones: ``stored = (orig + offset) * scale``
    (DeepSDF's convention); SDF values are stored in the normalised frame.
    """

    name: str
    pos_N4: np.ndarray
    neg_N4: np.ndarray
    normalization: dict[str, Any] = field(default_factory=lambda: dict(IDENTITY_NORMALIZATION))
    dropped_nan_rows: int = 0


@dataclass(frozen=True)
class FileEntry:
    name: str
    num_rows: int


@dataclass(frozen=True)
class SceneEntry:
    name: str
    file: str
    row_offset: int
    """Index of the scene's first row inside ``file``."""
    num_pos: int
    num_neg: int
    normalization: dict[str, Any]
    dropped_nan_rows: int = 0

    @property
    def num_rows(self) -> int:
        return self.num_pos + self.num_neg


@dataclass(frozen=True)
class Manifest:
    source: dict[str, Any]
    num_scenes: int
    num_samples: int
    files: tuple[FileEntry, ...]
    scenes: tuple[SceneEntry, ...]
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def num_pos(self) -> int:
        return sum(s.num_pos for s in self.scenes)

    @property
    def num_neg(self) -> int:
        return sum(s.num_neg for s in self.scenes)

    @property
    def dropped_nan_rows(self) -> int:
        return sum(s.dropped_nan_rows for s in self.scenes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "format_version": self.format_version,
            "source": self.source,
            "num_scenes": self.num_scenes,
            "num_samples": self.num_samples,
            "files": [{"name": f.name, "num_rows": f.num_rows} for f in self.files],
            "scenes": [
                {
                    "name": s.name,
                    "file": s.file,
                    "row_offset": s.row_offset,
                    "num_pos": s.num_pos,
                    "num_neg": s.num_neg,
                    "normalization": s.normalization,
                    "dropped_nan_rows": s.dropped_nan_rows,
                }
                for s in self.scenes
            ],
        }


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


# --------------------------------------------------------------------------------------------------
# Manifest reading and validation


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _dataset_dir(path: str | Path) -> Path:
    p = Path(path)
    if p.name == MANIFEST_NAME and p.is_file():
        return p.parent
    return p


def _check_normalization(norm: Any, where: str) -> None:
    if not isinstance(norm, dict):
        raise DataError(f"{where}: 'normalization' must be an object with 'offset' and 'scale'")
    offset: Any = norm.get("offset")
    scale: Any = norm.get("scale")
    if not (isinstance(offset, list) and len(offset) == 3 and all(_is_number(v) for v in offset)):
        raise DataError(f"{where}: normalization 'offset' must be a list of 3 finite numbers, got {offset!r}")
    if not (_is_number(scale) and scale > 0):
        raise DataError(f"{where}: normalization 'scale' must be a positive number, got {scale!r}")


def _parse_manifest(raw: Any, where: str) -> Manifest:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    fmt = raw.get("format")
    if fmt != FORMAT:
        raise DataError(f"{where}: not an sdf-ray dataset manifest (format is {fmt!r}, expected {FORMAT!r})")
    version: Any = raw.get("format_version")
    if not _is_int(version):
        raise DataError(f"{where}: 'format_version' must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise DataError(f"{where}: format_version {version} was written by a newer sdf-ray (this one reads {FORMAT_VERSION})")
    if version != FORMAT_VERSION:
        raise DataError(f"{where}: unsupported format_version {version} (this sdf-ray reads {FORMAT_VERSION})")
    required = {"source": dict, "num_scenes": int, "num_samples": int, "files": list, "scenes": list}
    for key, typ in required.items():
        if key not in raw:
            raise DataError(f"{where}: missing key '{key}'")
        value = raw[key]
        if not isinstance(value, typ) or isinstance(value, bool):
            raise DataError(f"{where}: '{key}' must be of type {typ.__name__}, got {type(value).__name__}")

    files: list[FileEntry] = []
    for i, f in enumerate(raw["files"]):
        fw = f"{where}: files[{i}]"
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not _is_int(f.get("num_rows")):
            raise DataError(f"{fw} must be an object with 'name' (string) and 'num_rows' (integer)")
        name = f["name"]
        if not name or name != Path(name).name or name.startswith(".") or name == MANIFEST_NAME:
            raise DataError(f"{fw}: invalid file name {name!r} (must be a plain file name inside the dataset)")
        if f["num_rows"] < 0:
            raise DataError(f"{fw}: negative num_rows {f['num_rows']}")
        files.append(FileEntry(name=name, num_rows=f["num_rows"]))
    file_rows = {f.name: f.num_rows for f in files}
    if len(file_rows) != len(files):
        raise DataError(f"{where}: duplicate file names in 'files'")

    scenes: list[SceneEntry] = []
    next_row: dict[str, int] = dict.fromkeys(file_rows, 0)
    for i, s in enumerate(raw["scenes"]):
        sw = f"{where}: scenes[{i}]"
        if not isinstance(s, dict):
            raise DataError(f"{sw} must be an object")
        for key in ("name", "file"):
            if not isinstance(s.get(key), str):
                raise DataError(f"{sw}: '{key}' must be a string")
        sw = f"{where}: scene {i} ({s['name']})"
        for key in ("row_offset", "num_pos", "num_neg"):
            if not _is_int(s.get(key)) or s[key] < 0:
                raise DataError(f"{sw}: '{key}' must be a non-negative integer, got {s.get(key)!r}")
        dropped = s.get("dropped_nan_rows", 0)
        if not _is_int(dropped) or dropped < 0:
            raise DataError(f"{sw}: 'dropped_nan_rows' must be a non-negative integer, got {dropped!r}")
        if s["num_pos"] == 0 or s["num_neg"] == 0:
            raise DataError(f"{sw}: needs both positive and negative samples (num_pos={s['num_pos']}, num_neg={s['num_neg']})")
        if s["file"] not in file_rows:
            raise DataError(f"{sw}: file {s['file']!r} is not listed in 'files'")
        if s["row_offset"] != next_row[s["file"]]:
            raise DataError(f"{sw}: row_offset {s['row_offset']} in {s['file']} does not follow the previous scene "
                            f"(expected {next_row[s['file']]})")
        _check_normalization(s.get("normalization"), sw)
        entry = SceneEntry(name=s["name"], file=s["file"], row_offset=s["row_offset"], num_pos=s["num_pos"],
                           num_neg=s["num_neg"], normalization=s["normalization"], dropped_nan_rows=dropped)
        next_row[s["file"]] += entry.num_rows
        scenes.append(entry)

    if not scenes:
        raise DataError(f"{where}: empty dataset (0 scenes)")
    for name, rows in file_rows.items():
        if next_row[name] != rows:
            raise DataError(f"{where}: 'files' says {rows} rows in {name} but its scenes add up to {next_row[name]}")
    if raw["num_scenes"] != len(scenes):
        raise DataError(f"{where}: num_scenes is {raw['num_scenes']} but {len(scenes)} scenes are listed")
    total = sum(file_rows.values())
    if raw["num_samples"] != total:
        raise DataError(f"{where}: num_samples is {raw['num_samples']} but the files hold {total} rows")
    return Manifest(source=raw["source"], num_scenes=len(scenes), num_samples=total, files=tuple(files),
                    scenes=tuple(scenes), format=fmt, format_version=version)


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate ``<path>/manifest.json`` (``path`` may also be the manifest file itself)."""
    d = _dataset_dir(path)
    if not d.exists():
        raise DataError(f"dataset directory {d} does not exist")
    if not d.is_dir():
        raise DataError(f"dataset path {d} is not a directory")
    mpath = d / MANIFEST_NAME
    if not mpath.is_file():
        if any(d.iterdir()):
            raise DataError(f"{d} is not an sdf-ray dataset: no {MANIFEST_NAME}")
        raise DataError(f"dataset directory {d} is empty (no {MANIFEST_NAME})")
    try:
        text = mpath.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {mpath}: {e}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"corrupt manifest {mpath}: invalid JSON ({e})") from None
    return _parse_manifest(raw, str(mpath))


def _open_parquet(path: Path) -> pq.ParquetFile:
    if not path.is_file():
        raise DataError(f"missing data file {path.name} in {path.parent}")
    try:
        return pq.ParquetFile(path, memory_map=True)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"corrupt or truncated Parquet file {path.name} in {path.parent}: {e}") from None


def _check_file_metadata(pf: pq.ParquetFile, path: Path, expected_rows: int) -> None:
    schema = pf.schema_arrow
    got = [(f.name, f.type) for f in schema]
    want = [(f.name, f.type) for f in SCHEMA]
    if got != want:
        desc = ", ".join(f"{n}:{t}" for n, t in got)
        raise DataError(f"wrong schema in {path.name} in {path.parent}: got [{desc}], expected "
                        f"[scene:int32, x:float, y:float, z:float, sdf:float]")
    rows = pf.metadata.num_rows
    if rows != expected_rows:
        raise DataError(f"manifest says {expected_rows} rows in {path.name}, file has {rows} (dataset {path.parent})")


def validate_files(path: str | Path) -> Manifest:
    """Check that every data file exists, is readable Parquet with the right schema and the manifest's row count.

    Only Parquet metadata (footers) is read, so this is cheap even for large datasets. Returns the manifest.
    """
    d = _dataset_dir(path)
    manifest = read_manifest(d)
    listed = {f.name for f in manifest.files}
    for f in manifest.files:
        fp = d / f.name
        _check_file_metadata(_open_parquet(fp), fp, f.num_rows)
    extra = sorted(p.name for p in d.glob("*.parquet") if p.name not in listed)
    if extra:
        log.warning("dataset %s holds Parquet files not listed in its manifest: %s", d, ", ".join(extra[:5]))
    return manifest


# --------------------------------------------------------------------------------------------------
# Loading


def load_scenes(path: str | Path, scene_ids: Sequence[int], *, manifest: Manifest | None = None) -> PackedScenes:
    """Read only the row groups holding ``scene_ids`` and pack them, in the order given.

    Each scene's rows are checked against the manifest: the ``scene`` column must hold the scene's id and
    the first ``num_pos`` rows must have ``sdf > 0``, the rest ``sdf <= 0``.
    """
    d = _dataset_dir(path)
    if manifest is None:
        manifest = read_manifest(d)
    ids = np.asarray(scene_ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= manifest.num_scenes):
        bad_id = int(ids[(ids < 0) | (ids >= manifest.num_scenes)][0])
        raise DataError(f"scene id {bad_id} out of range: dataset {d} has {manifest.num_scenes} scenes")

    entries = [manifest.scenes[int(i)] for i in ids]
    pos_count = np.array([e.num_pos for e in entries], dtype=np.int64)
    neg_count = np.array([e.num_neg for e in entries], dtype=np.int64)
    totals = pos_count + neg_count
    starts = np.zeros(len(entries), dtype=np.int64)
    if len(entries):
        starts[1:] = np.cumsum(totals)[:-1]
    num_rows = int(totals.sum())
    samples = np.empty((num_rows, 4), dtype=np.float32)
    scene_col = np.empty(num_rows, dtype=np.int32)

    # Group the requested scenes by file so that each file is opened and read once.
    by_file: dict[str, list[int]] = {}
    for j, e in enumerate(entries):
        by_file.setdefault(e.file, []).append(j)
    file_rows = {f.name: f.num_rows for f in manifest.files}

    for fname, js in by_file.items():
        fp = d / fname
        pf = _open_parquet(fp)
        _check_file_metadata(pf, fp, file_rows[fname])
        md = pf.metadata
        rg_sizes = np.array([md.row_group(k).num_rows for k in range(md.num_row_groups)], dtype=np.int64)
        rg_starts = np.concatenate([[0], np.cumsum(rg_sizes)])
        # Row groups overlapping each requested scene's row range [a, b).
        a = np.array([entries[j].row_offset for j in js], dtype=np.int64)
        b = a + totals[js]
        k0 = np.searchsorted(rg_starts, a, side="right") - 1
        k1 = np.searchsorted(rg_starts, b, side="left")  # exclusive
        wanted = np.zeros(len(rg_sizes), dtype=bool)
        for lo, hi in zip(k0.tolist(), k1.tolist(), strict=True):
            wanted[lo:hi] = True
        rgs = np.flatnonzero(wanted)
        # Position of each selected row group inside the table we read.
        table_pos = np.full(len(rg_sizes), -1, dtype=np.int64)
        table_pos[rgs] = np.concatenate([[0], np.cumsum(rg_sizes[rgs])[:-1]]) if rgs.size else []
        try:
            table = pf.read_row_groups(rgs.tolist(), columns=list(COLUMNS), use_threads=True)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise DataError(f"corrupt or truncated Parquet file {fname} in {d}: {e}") from None
        cols = [table.column(c).to_numpy() for c in COLUMNS]
        src = table_pos[k0] + (a - rg_starts[k0])
        for j, s0 in zip(js, src.tolist(), strict=True):
            n = int(totals[j])
            dst = int(starts[j])
            scene_col[dst:dst + n] = cols[0][s0:s0 + n]
            for c in range(4):
                samples[dst:dst + n, c] = cols[c + 1][s0:s0 + n]
        del table, cols

    expected_scene = np.repeat(ids.astype(np.int32), totals)
    row_ends = np.cumsum(totals)

    def first_bad(ok_rows: np.ndarray) -> tuple[int, SceneEntry]:
        """(global scene id, manifest entry) of the scene holding the first row where ``ok_rows`` is False."""
        j = int(np.searchsorted(row_ends, int(np.flatnonzero(~ok_rows)[0]), side="right"))
        return int(ids[j]), entries[j]

    scene_ok = np.asarray(scene_col == expected_scene)
    if not scene_ok.all():
        sid, bad = first_bad(scene_ok)
        raise DataError(f"scene column mismatch in {bad.file} ({d}): rows of scene {sid} ({bad.name}) "
                        f"hold another scene's id")
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
# Writing


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


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _validated_arrays(scene: SceneSamples) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for label, arr in (("pos_N4", scene.pos_N4), ("neg_N4", scene.neg_N4)):
        a = np.asarray(arr)
        if a.ndim != 2 or a.shape[1] != 4:
            raise DataError(f"scene {scene.name}: {label} must have shape (N, 4), got {a.shape}")
        if not np.issubdtype(a.dtype, np.number):
            raise DataError(f"scene {scene.name}: {label} must be numeric, got {a.dtype}")
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            raise DataError(f"scene {scene.name}: {label} contains NaN or inf values")
        arrays.append(a)
    pos, neg = arrays
    if len(pos) == 0 or len(neg) == 0:
        raise DataError(f"scene {scene.name}: needs both positive and negative samples "
                        f"(got {len(pos)} with sdf > 0 and {len(neg)} with sdf <= 0)")
    if not (pos[:, 3] > 0).all():
        raise DataError(f"scene {scene.name}: pos_N4 has rows with sdf <= 0")
    if not (neg[:, 3] <= 0).all():
        raise DataError(f"scene {scene.name}: neg_N4 has rows with sdf > 0")
    return pos, neg


def _write_parts(tmp: Path, scenes: Iterable[SceneSamples], source: dict[str, Any], max_rows_per_file: int) -> Manifest:
    files: list[FileEntry] = []
    entries: list[SceneEntry] = []
    names: set[str] = set()
    writer: pq.ParquetWriter | None = None
    cur_name = ""
    cur_rows = 0

    def close_current() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            writer = None
            _fsync_path(tmp / cur_name)
            files.append(FileEntry(name=cur_name, num_rows=cur_rows))

    try:
        for scene in scenes:
            if not isinstance(scene.name, str) or not scene.name:
                raise DataError(f"scene {len(entries)}: name must be a non-empty string")
            if scene.name in names:
                raise DataError(f"duplicate scene name {scene.name!r}")
            names.add(scene.name)
            norm = scene.normalization if scene.normalization is not None else dict(IDENTITY_NORMALIZATION)
            norm = {"offset": [float(v) for v in np.asarray(norm.get("offset", [0, 0, 0])).reshape(-1)],
                    "scale": float(norm.get("scale", 1.0)), **{k: v for k, v in norm.items() if k not in ("offset", "scale")}}
            _check_normalization(norm, f"scene {scene.name}")
            pos, neg = _validated_arrays(scene)
            n = len(pos) + len(neg)
            if writer is not None and cur_rows + n > max_rows_per_file:
                close_current()
            if writer is None:
                cur_name = f"part-{len(files):05d}.parquet"
                cur_rows = 0
                writer = pq.ParquetWriter(tmp / cur_name, SCHEMA, compression="snappy", use_dictionary=["scene"],
                                          write_statistics=True)
            samples = np.concatenate([pos, neg])
            table = pa.Table.from_arrays(
                [pa.array(np.full(n, len(entries), dtype=np.int32))] + [pa.array(samples[:, c]) for c in range(4)],
                schema=SCHEMA,
            )
            writer.write_table(table, row_group_size=n)  # one row group per scene
            entries.append(SceneEntry(name=scene.name, file=cur_name, row_offset=cur_rows, num_pos=len(pos),
                                      num_neg=len(neg), normalization=norm,
                                      dropped_nan_rows=int(scene.dropped_nan_rows)))
            cur_rows += n
            if len(entries) % 1000 == 0:
                log.info("wrote %d scenes", len(entries))
        close_current()
    finally:
        if writer is not None:
            writer.close()
    if not entries:
        raise DataError("no scenes to write: a dataset needs at least one scene")
    return Manifest(source=dict(source), num_scenes=len(entries), num_samples=sum(f.num_rows for f in files),
                    files=tuple(files), scenes=tuple(entries))


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
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {parent}: {e}") from None
    tmp = parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
    except OSError as e:
        raise DataError(f"cannot write into {parent}: {e}") from None
    try:
        manifest = _write_parts(tmp, scenes, source, max_rows_per_file)
        mpath = tmp / MANIFEST_NAME
        mpath.write_text(json.dumps(manifest.to_dict(), indent=1) + "\n", encoding="utf-8")
        _fsync_path(mpath)
        _swap_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _swap_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    _check_target(out, overwrite)  # again: something may have appeared while we were writing
    old: Path | None = None
    if out.exists():
        if _is_dataset_or_empty(out)[1]:
            out.rmdir()
        else:
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    try:
        _fsync_path(out.parent)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename itself is still atomic
