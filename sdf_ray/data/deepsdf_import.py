"""Import the original DeepSDF preprocessed samples into an sdf-ray dataset.

DeepSDF layout::

    <data_source>/SdfSamples/<dataset>/<class>/<instance>.npz               arrays pos (N,4), neg (M,4)
    <data_source>/NormalizationParameters/<dataset>/<class>/<instance>.npz  offset (3,), scale ()  [optional]

and a split file ``{dataset: {class: [instance, ...]}}``. Scenes are named ``<dataset>/<class>/<instance>``
and keep the split's order.
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


def import_deepsdf(data_source: str | Path, split_file: str | Path, out_dir: str | Path,
                   overwrite: bool = False) -> Manifest:
    """Convert the split's DeepSDF ``.npz`` samples into a dataset at ``out_dir`` (atomically).

    Rows holding NaN (or inf) in any column are dropped and counted per scene in ``dropped_nan_rows``
    (``Manifest.dropped_nan_rows`` gives the total). Every missing
    instance is reported in one error before anything is written.
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

    def scenes() -> Iterator[SceneSamples]:
        nonlocal dropped_total
        for (dataset, cls, inst), r in zip(triples, rel, strict=True):
            scene = _read_samples(samples_root / r, f"{dataset}/{cls}/{inst}")
            scene.normalization = _read_normalization(src / NORMALIZATION_DIR / r)
            if scene.dropped_nan_rows:
                log.info("%s: dropped %d rows with NaN/inf", scene.name, scene.dropped_nan_rows)
            dropped_total += scene.dropped_nan_rows
            yield scene

    source: dict[str, Any] = {"type": "deepsdf", "data_source": str(src.resolve()),
                              "split": str(Path(split_file).resolve()), "num_instances": len(triples)}
    manifest = write_dataset(out_dir, scenes(), source, overwrite=overwrite)
    if dropped_total:
        log.warning("dropped %d rows with NaN/inf across %d scenes", dropped_total, manifest.num_scenes)
    return manifest
