"""A dataset's description: ``manifest.json`` (structured and checked), the Parquet schemas, the scene frames.

The manifest is parsed by the one structurer (:mod:`sdf_ray.structure`) into the dataclasses below, then
checked for consistency (row offsets, file row counts). Every problem is a ``DataError`` naming the manifest
and, for a scene, its index and name.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow as pa

from sdf_ray.errors import DataError
from sdf_ray.structure import NonNegativeInt, Problem, Rule, convert

FORMAT = "sdf-ray-dataset"
FORMAT_VERSION = 2
"""1: SDF samples only. 2: adds the ground-truth surface samples (``surface_files``, ``num_surface``)."""
MANIFEST_NAME = "manifest.json"
COLUMNS = ("scene", "x", "y", "z", "sdf")
SCHEMA = pa.schema([pa.field(c, pa.int32() if c == "scene" else pa.float32(), nullable=False) for c in COLUMNS])
SURFACE_COLUMNS = ("scene", "x", "y", "z", "nx", "ny", "nz")
SURFACE_SCHEMA = pa.schema([pa.field(c, pa.int32() if c == "scene" else pa.float32(), nullable=False)
                            for c in SURFACE_COLUMNS])
IDENTITY_NORMALIZATION: dict[str, Any] = {"offset": [0.0, 0.0, 0.0], "scale": 1.0}


# --------------------------------------------------------------------------------------------------
# Frames: a scene's ``normalization`` maps its original (mesh) frame to the normalised frame of its SDF samples


def to_normalized(points: np.ndarray, normalization: dict[str, Any]) -> np.ndarray:
    """``(p + offset) * scale``: original frame -> normalised frame (DeepSDF's convention)."""
    p = np.asarray(points)
    offset = np.asarray(normalization["offset"], dtype=np.float64)
    out = (p + offset) * float(normalization["scale"])
    return out.astype(p.dtype if np.issubdtype(p.dtype, np.floating) else np.float64, copy=False)


def to_original(points: np.ndarray, normalization: dict[str, Any]) -> np.ndarray:
    """``p / scale - offset``: normalised frame -> original frame (the inverse of :func:`to_normalized`)."""
    p = np.asarray(points)
    offset = np.asarray(normalization["offset"], dtype=np.float64)
    out = p / float(normalization["scale"]) - offset
    return out.astype(p.dtype if np.issubdtype(p.dtype, np.floating) else np.float64, copy=False)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def normalization_problem(norm: dict[str, Any]) -> str | None:
    """What is wrong with a normalization mapping (extra keys are kept), or None."""
    offset: Any = norm.get("offset")
    scale: Any = norm.get("scale")
    if not (isinstance(offset, list) and len(offset) == 3 and all(_is_number(v) for v in offset)):
        return f"'offset' must be a list of 3 finite numbers, got {offset!r}"
    if not (_is_number(scale) and scale > 0):
        return f"'scale' must be a positive number, got {scale!r}"
    return None


# --------------------------------------------------------------------------------------------------
# The manifest


def _plain_file_name(name: str) -> bool:
    return bool(name) and name == Path(name).name and not name.startswith(".") and name != MANIFEST_NAME


FileName = Annotated[str, Rule(_plain_file_name, "invalid file name (must be a plain file name inside the dataset)")]


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    name: FileName
    """A Parquet file of the dataset directory."""
    num_rows: NonNegativeInt
    """Rows in it (its footer must agree)."""


@dataclass(frozen=True, kw_only=True)
class SceneEntry:
    name: str
    """Unique scene name (``synth-000003-torus``, ``<dataset>/<class>/<instance>``)."""
    file: str
    """The ``files`` entry holding the scene's SDF samples: one row group, positive rows first."""
    row_offset: NonNegativeInt
    """Index of the scene's first row inside ``file``."""
    num_pos: NonNegativeInt
    """Rows with sdf > 0."""
    num_neg: NonNegativeInt
    """Rows with sdf <= 0."""
    normalization: Annotated[dict[str, Any], normalization_problem]
    """``{"offset": [x, y, z], "scale": s}``: normalised = (original + offset) * scale."""
    dropped_nan_rows: NonNegativeInt = 0
    """Rows with NaN or Inf dropped at import."""
    num_surface: NonNegativeInt = 0
    """Ground-truth surface samples, in the original frame (0: the scene has no ground truth)."""
    surface_file: str = ""
    """The ``surface_files`` entry holding them (one row group)."""
    surface_row_offset: NonNegativeInt = 0
    """Index of the scene's first row inside ``surface_file``."""
    surface_has_normals: bool = False
    """Whether they come with normals (DeepSDF's SurfaceSamples do not)."""

    @property
    def num_rows(self) -> int:
        return self.num_pos + self.num_neg

    @property
    def has_ground_truth(self) -> bool:
        return self.num_surface > 0

    def validate(self) -> Iterator[tuple[str, str]]:
        if self.num_pos == 0 or self.num_neg == 0:
            yield "", (f"needs both positive and negative samples (num_pos={self.num_pos}, "
                       f"num_neg={self.num_neg})")
        if self.num_surface and not self.surface_file:
            yield "surface_file", "must name a surface file when num_surface > 0"

    def to_dict(self) -> dict[str, Any]:
        entry = {"name": self.name, "file": self.file, "row_offset": self.row_offset, "num_pos": self.num_pos,
                 "num_neg": self.num_neg, "normalization": self.normalization,
                 "dropped_nan_rows": self.dropped_nan_rows, "num_surface": self.num_surface}
        if self.num_surface:
            entry.update(surface_file=self.surface_file, surface_row_offset=self.surface_row_offset,
                         surface_has_normals=self.surface_has_normals)
        return entry


@dataclass(frozen=True, kw_only=True)
class Manifest:
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    source: dict[str, Any]
    """How the dataset was made (JSON object: generator and its arguments, or the imported paths)."""
    num_scenes: NonNegativeInt
    num_samples: NonNegativeInt
    """SDF sample rows over all files."""
    files: tuple[FileEntry, ...]
    """The SDF sample files (``part-00000.parquet`` ...)."""
    scenes: tuple[SceneEntry, ...]
    """Scene id = index in this list."""
    surface_files: tuple[FileEntry, ...] = ()
    """The ground-truth surface files (``surface-00000.parquet`` ...); none before format version 2."""

    @property
    def num_pos(self) -> int:
        return sum(s.num_pos for s in self.scenes)

    @property
    def num_neg(self) -> int:
        return sum(s.num_neg for s in self.scenes)

    @property
    def dropped_nan_rows(self) -> int:
        return sum(s.dropped_nan_rows for s in self.scenes)

    @property
    def num_with_ground_truth(self) -> int:
        """Scenes with ground-truth surface samples."""
        return sum(1 for s in self.scenes if s.num_surface > 0)

    @property
    def num_surface_samples(self) -> int:
        return sum(s.num_surface for s in self.scenes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "format_version": self.format_version,
            "source": self.source,
            "num_scenes": self.num_scenes,
            "num_samples": self.num_samples,
            "files": [{"name": f.name, "num_rows": f.num_rows} for f in self.files],
            "scenes": [s.to_dict() for s in self.scenes],
            "surface_files": [{"name": f.name, "num_rows": f.num_rows} for f in self.surface_files],
        }


# --------------------------------------------------------------------------------------------------
# Reading and checking


def dataset_dir(path: str | Path) -> Path:
    """The dataset directory (``path`` may also name its manifest)."""
    p = Path(path)
    if p.name == MANIFEST_NAME and p.is_file():
        return p.parent
    return p


def _describe(problem: str, raw: dict[str, Any]) -> str:
    """A structurer problem in the manifest's words: scenes by index and name, keys quoted."""
    if not isinstance(problem, Problem):
        return problem
    owner, key = "", problem.path
    m = re.fullmatch(r"scenes\[(\d+)\]\.?(.*)", problem.path)
    if m:
        scene = raw["scenes"][int(m[1])]
        owner, key = f"scene {m[1]} ({scene.get('name') if isinstance(scene, dict) else '?'})", m[2]
    if problem.kind == "missing":
        text = f"missing key '{key}'"
    else:
        text = f"'{key}': {problem.message}" if key else problem.message
    return f"{owner}: {text}" if owner else text


def _check_file_set(where: str, label: str, files: tuple[FileEntry, ...], key: str,
                    placed: list[tuple[int, str, str, int, int]]) -> None:
    """Scenes follow each other in the files of one set (``files`` or ``surface_files``), whose row counts they
    add up to. ``placed``: (scene index, scene name, file, row offset, rows) of each scene in the set."""
    next_row = {f.name: 0 for f in files}
    for i, name, file, offset, rows in placed:
        sw = f"{where}: scene {i} ({name})"
        if file not in next_row:
            raise DataError(f"{sw}: {key}file {file!r} is not listed in '{label}'")
        if offset != next_row[file]:
            raise DataError(f"{sw}: {key}row_offset {offset} in {file} does not follow the previous scene "
                            f"(expected {next_row[file]})")
        next_row[file] += rows
    for f in files:
        if next_row[f.name] != f.num_rows:
            raise DataError(f"{where}: '{label}' says {f.num_rows} rows in {f.name} but its scenes add up to "
                            f"{next_row[f.name]}")


def _check_rows(m: Manifest, where: str) -> None:
    names = [f.name for f in m.files + m.surface_files]
    if len(set(names)) != len(names):
        raise DataError(f"{where}: duplicate file names in 'files' and 'surface_files'")
    scenes = list(enumerate(m.scenes))
    _check_file_set(where, "files", m.files, "", [(i, s.name, s.file, s.row_offset, s.num_rows) for i, s in scenes])
    _check_file_set(where, "surface_files", m.surface_files, "surface_",
                    [(i, s.name, s.surface_file, s.surface_row_offset, s.num_surface) for i, s in scenes if s.num_surface])


def parse_manifest(raw: Any, where: str) -> Manifest:
    """Plain JSON data -> a checked Manifest; a DataError naming ``where`` otherwise."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    fmt = raw.get("format")
    if fmt != FORMAT:
        raise DataError(f"{where}: not an sdf-ray dataset manifest (format is {fmt!r}, expected {FORMAT!r})")
    version: Any = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise DataError(f"{where}: 'format_version' must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise DataError(f"{where}: format_version {version} was written by a newer sdf-ray (this one reads "
                        f"{FORMAT_VERSION})")
    if version < 1:
        raise DataError(f"{where}: unsupported format_version {version} (this sdf-ray reads 1..{FORMAT_VERSION})")
    # Version 1 differs only by lacking the optional ground-truth keys: one parser reads both.
    problems: list[str] = []
    manifest: Manifest | None = convert(Manifest, raw, problems)
    if problems or manifest is None:
        described = [_describe(p, raw) for p in problems] or ["invalid manifest"]
        many = f"{len(described)} problems: " if len(described) > 1 else ""
        raise DataError(f"{where}: {many}{'; '.join(described)}")
    if not manifest.scenes:
        raise DataError(f"{where}: empty dataset (0 scenes)")
    _check_rows(manifest, where)
    if manifest.num_scenes != len(manifest.scenes):
        raise DataError(f"{where}: num_scenes is {manifest.num_scenes} but {len(manifest.scenes)} scenes are listed")
    total = sum(f.num_rows for f in manifest.files)
    if manifest.num_samples != total:
        raise DataError(f"{where}: num_samples is {manifest.num_samples} but the files hold {total} rows")
    return manifest


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate ``<path>/manifest.json`` (``path`` may also be the manifest file itself)."""
    d = dataset_dir(path)
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
    return parse_manifest(raw, str(mpath))
