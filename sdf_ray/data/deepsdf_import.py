"""Import the original DeepSDF preprocessed samples into an sdf-ray dataset.

DeepSDF layout::

    <data_source>/SdfSamples/<dataset>/<class>/<instance>.npz               arrays pos (N,4), neg (M,4)
    <data_source>/NormalizationParameters/<dataset>/<class>/<instance>.npz  offset (3,), scale ()  [optional]
    <data_source>/SurfaceSamples/<dataset>/<class>/<instance>.ply           surface points         [optional]

and a split file ``{dataset: {class: [instance, ...]}}``. Scenes are named ``<dataset>/<class>/<instance>``
and keep the split's order. The surface samples become the scene's ground truth, in the original mesh frame
(the normalisation maps it to the SDF samples' frame). DeepSDF writes them as ASCII PLY with ``x y z`` only
(no normals, and a face list of consecutive triples that is ignored); ``nx ny nz`` are read when present.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sdf_ray.data.format import IDENTITY_NORMALIZATION, Manifest, SceneSamples, write_dataset
from sdf_ray.errors import DataError

log = logging.getLogger(__name__)

SAMPLES_DIR = "SdfSamples"
NORMALIZATION_DIR = "NormalizationParameters"
SURFACE_DIR = "SurfaceSamples"
_MAX_LISTED = 10


def read_split(split_file: str | Path) -> list[tuple[str, str, str]]:
    """Parse a DeepSDF split JSON into ``(dataset, class, instance)`` triples, in file order."""
    path = Path(split_file)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"split file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read split file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"split file {path} is not valid JSON: {e}") from None
    shape_hint = 'expected {"<dataset>": {"<class>": ["<instance>", ...]}}'
    if not isinstance(raw, dict):
        raise DataError(f"split file {path}: {shape_hint}, got a JSON {type(raw).__name__}")
    triples: list[tuple[str, str, str]] = []
    for dataset, classes in raw.items():
        if not isinstance(classes, dict):
            raise DataError(f"split file {path}: entry {dataset!r} must map class names to instance lists; {shape_hint}")
        for cls, instances in classes.items():
            if not isinstance(instances, list) or not all(isinstance(i, str) and i for i in instances):
                raise DataError(f"split file {path}: {dataset}/{cls} must be a list of instance names; {shape_hint}")
            for inst in instances:
                for part in (dataset, cls, inst):
                    if part in ("", ".", "..") or "/" in part or "\\" in part:
                        raise DataError(f"split file {path}: invalid name {part!r} in {dataset}/{cls}/{inst}")
                triples.append((dataset, cls, inst))
    if not triples:
        raise DataError(f"split file {path} lists no instances")
    seen: set[tuple[str, str, str]] = set()
    for t in triples:
        if t in seen:
            raise DataError(f"split file {path} lists {'/'.join(t)} twice")
        seen.add(t)
    return triples


def _load_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                have = ", ".join(npz.files) or "none"
                raise DataError(f"{path}: missing array(s) {', '.join(missing)} (has: {have})")
            return {k: npz[k] for k in keys}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _read_samples(path: Path, name: str) -> SceneSamples:
    arrays = _load_npz(path, ("pos", "neg"))
    for key, a in arrays.items():
        if a.ndim != 2 or a.shape[1] != 4:
            raise DataError(f"{path}: '{key}' must have shape (N, 4), got {a.shape}")
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise DataError(f"{path}: '{key}' must be numeric, got dtype {a.dtype}")
    rows = np.concatenate([arrays["pos"], arrays["neg"]]).astype(np.float32)
    finite = np.isfinite(rows).all(axis=1)
    dropped = int(len(rows) - finite.sum())
    rows = rows[finite]
    # Re-split by sign: DeepSDF's neg may hold exact zeros and files from other tools may mix signs.
    is_pos = rows[:, 3] > 0
    pos, neg = rows[is_pos], rows[~is_pos]
    if len(pos) == 0 or len(neg) == 0:
        raise DataError(f"{path}: needs both positive and negative samples, has {len(pos)} with sdf > 0 and "
                        f"{len(neg)} with sdf <= 0 after dropping {dropped} NaN/inf rows")
    return SceneSamples(name=name, pos_N4=pos, neg_N4=neg, normalization=dict(IDENTITY_NORMALIZATION),
                        dropped_nan_rows=dropped)


def _read_normalization(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return dict(IDENTITY_NORMALIZATION)
    arrays = _load_npz(path, ("offset", "scale"))
    offset = np.asarray(arrays["offset"], dtype=np.float64).reshape(-1)
    scale = np.asarray(arrays["scale"], dtype=np.float64).reshape(-1)
    if offset.shape != (3,) or scale.shape != (1,):
        raise DataError(f"{path}: expected offset of 3 values and a scalar scale, got shapes "
                        f"{arrays['offset'].shape} and {arrays['scale'].shape}")
    if not (np.isfinite(offset).all() and np.isfinite(scale).all() and scale[0] > 0):
        raise DataError(f"{path}: normalization must be finite with a positive scale")
    return {"offset": [float(v) for v in offset], "scale": float(scale[0])}


_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


def read_ply_points(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Vertex positions (float64, (N, 3)) and normals (or None) of a PLY file; other elements are skipped.

    A small reader for point clouds: ASCII and binary PLY, a ``vertex`` element of scalar properties, and in
    binary files only scalar elements before it (DeepSDF's files put the vertices first).
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    end = data.find(b"end_header")
    newline = data.find(b"\n", end)
    if not data.startswith(b"ply") or end < 0 or newline < 0:
        raise DataError(f"{path}: not a PLY file (no 'ply' ... 'end_header' header)")
    fmt = ""
    elements: list[tuple[str, int, list[tuple[str, str]]]] = []  # (name, count, [(property, numpy type)])
    try:
        for line in data[:end].decode("ascii").splitlines()[1:]:
            words = line.split()
            if not words or words[0] in ("comment", "obj_info"):
                continue
            if words[0] == "format":
                fmt = words[1]
            elif words[0] == "element":
                elements.append((words[1], int(words[2]), []))
            elif words[0] == "property":
                kind = "list" if words[1] == "list" else _PLY_TYPES[words[1]]
                elements[-1][2].append((words[-1], kind))
    except (UnicodeDecodeError, IndexError, KeyError, ValueError):
        raise DataError(f"{path}: malformed PLY header") from None
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise DataError(f"{path}: PLY file has no vertex element")
    v = names.index("vertex")
    count, props = elements[v][1], elements[v][2]
    prop_names = [p for p, _ in props]
    if any(kind == "list" for _, kind in props) or not {"x", "y", "z"} <= set(prop_names):
        raise DataError(f"{path}: the PLY vertex element must have scalar x, y, z properties")
    body = data[newline + 1:]
    try:
        if fmt == "ascii":
            lines = body.decode("ascii").splitlines()
            first = sum(e[1] for e in elements[:v])
            table = np.array(" ".join(lines[first:first + count]).split(), dtype=np.float64).reshape(count, len(props))
            columns = {p: table[:, i] for i, p in enumerate(prop_names)}
        elif fmt in ("binary_little_endian", "binary_big_endian"):
            order = "<" if fmt == "binary_little_endian" else ">"
            if any(kind == "list" for e in elements[:v] for _, kind in e[2]):
                raise DataError(f"{path}: binary PLY with list properties before the vertices is not supported")
            skip = sum(e[1] * np.dtype([(p, order + k) for p, k in e[2]]).itemsize for e in elements[:v])
            rows = np.frombuffer(body, dtype=np.dtype([(p, order + k) for p, k in props]), count=count, offset=skip)
            columns = {p: rows[p].astype(np.float64) for p in prop_names}
        else:
            raise DataError(f"{path}: unknown PLY format {fmt!r}")
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: truncated or malformed PLY data ({e})") from None
    points = np.stack([columns["x"], columns["y"], columns["z"]], axis=1)
    has_normals = {"nx", "ny", "nz"} <= set(prop_names)
    normals = np.stack([columns["nx"], columns["ny"], columns["nz"]], axis=1) if has_normals else None
    return points, normals


def _read_surface(path: Path) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(points, unit normals or None, rows dropped for NaN/inf or a zero normal) of a SurfaceSamples file."""
    points, normals = read_ply_points(path)
    ok = np.isfinite(points).all(axis=1)
    if normals is not None:
        length = np.linalg.norm(normals, axis=1, keepdims=True)
        ok &= np.isfinite(normals).all(axis=1) & (length[:, 0] > 0)
        normals = normals / np.where(length > 0, length, 1.0)
    if not ok.any():
        raise DataError(f"{path}: no usable surface points (the file holds {len(points)})")
    return points[ok], None if normals is None else normals[ok], int(len(points) - ok.sum())


def import_deepsdf(data_source: str | Path, split_file: str | Path, out_dir: str | Path,
                   overwrite: bool = False) -> Manifest:
    """Convert the split's DeepSDF ``.npz`` samples into a dataset at ``out_dir`` (atomically), with each
    instance's ``SurfaceSamples`` ``.ply`` as its ground truth where it exists.

    Rows holding NaN (or inf) in any column are dropped and counted per scene in ``dropped_nan_rows``
    (``Manifest.dropped_nan_rows`` gives the total); such surface rows are dropped and logged. Every missing
    instance is reported in one error before anything is written. ``Manifest.num_with_ground_truth`` says
    how many scenes have ground truth.
    """
    src = Path(data_source)
    if not src.is_dir():
        raise DataError(f"DeepSDF data source {src} does not exist or is not a directory")
    samples_root = src / SAMPLES_DIR
    if not samples_root.is_dir():
        raise DataError(f"{src} has no {SAMPLES_DIR}/ directory: not a DeepSDF data source")
    triples = read_split(split_file)
    rel = [Path(d, c, f"{i}.npz") for d, c, i in triples]
    missing = [r.as_posix() for r in rel if not (samples_root / r).is_file()]
    if missing:
        listed = ", ".join(missing[:_MAX_LISTED])
        more = f", ... and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        noun = "instance" if len(missing) == 1 else "instances"
        raise DataError(f"{len(missing)} {noun} missing from {samples_root}: {listed}{more}")

    dropped_total = 0
    surface_without_normalization: list[str] = []

    def scenes() -> Iterator[SceneSamples]:
        nonlocal dropped_total
        for (dataset, cls, inst), r in zip(triples, rel, strict=True):
            scene = _read_samples(samples_root / r, f"{dataset}/{cls}/{inst}")
            scene.normalization = _read_normalization(src / NORMALIZATION_DIR / r)
            if scene.dropped_nan_rows:
                log.info("%s: dropped %d rows with NaN/inf", scene.name, scene.dropped_nan_rows)
            dropped_total += scene.dropped_nan_rows
            surface_path = src / SURFACE_DIR / r.with_suffix(".ply")
            if surface_path.is_file():
                scene.surface_points_M3, scene.surface_normals_M3, dropped = _read_surface(surface_path)
                if dropped:
                    log.info("%s: dropped %d unusable surface samples", scene.name, dropped)
                if not (src / NORMALIZATION_DIR / r).is_file():
                    surface_without_normalization.append(scene.name)
            yield scene

    source: dict[str, Any] = {"type": "deepsdf", "data_source": str(src.resolve()),
                              "split": str(Path(split_file).resolve()), "num_instances": len(triples)}
    manifest = write_dataset(out_dir, scenes(), source, overwrite=overwrite)
    if dropped_total:
        log.warning("dropped %d rows with NaN/inf across %d scenes", dropped_total, manifest.num_scenes)
    if surface_without_normalization:
        log.warning("%d scene(s) have %s but no %s (e.g. %s): their ground truth is taken to be in the frame of the "
                    "SDF samples", len(surface_without_normalization), SURFACE_DIR, NORMALIZATION_DIR,
                    surface_without_normalization[0])
    log.info("%d of %d scenes have ground-truth surface samples", manifest.num_with_ground_truth, manifest.num_scenes)
    return manifest
