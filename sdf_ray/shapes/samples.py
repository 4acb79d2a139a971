"""A shape's SDF samples for reconstruction, read from a dataset with rows holding NaN dropped and counted.

``sdf_ray.data.format.load_scenes`` refuses non-finite rows (a training dataset must be finite). Reconstruction
reads held-out data that other tools may have produced, so it drops such rows, counts them, and re-splits the
rest by sign instead of trusting the stored order. Only the Parquet row groups of the requested scenes are read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdf_ray.data.format import Manifest, read_manifest
from sdf_ray.errors import DataError


@dataclass
class ShapeSamples:
    """One scene's finite samples: rows ``(x, y, z, sdf)`` in the normalised frame, split by sign."""

    scene_id: int
    pos_N4: np.ndarray
    """Rows with sdf > 0 (float32)."""
    neg_N4: np.ndarray
    """Rows with sdf <= 0 (float32)."""
    dropped_nan_rows: int = 0
    """Rows dropped because a coordinate or the SDF was NaN or infinite."""

    @property
    def num_samples(self) -> int:
        return int(len(self.pos_N4) + len(self.neg_N4))


def split_finite(scene_id: int, rows_N4: np.ndarray) -> ShapeSamples:
    """Drop non-finite rows (counted) and split the rest by the sign of the SDF."""
    rows = np.asarray(rows_N4, dtype=np.float32).reshape(-1, 4)
    finite = np.isfinite(rows).all(axis=1)
    rows = rows[finite]
    pos = rows[:, 3] > 0
    return ShapeSamples(scene_id=scene_id, pos_N4=np.ascontiguousarray(rows[pos]),
                        neg_N4=np.ascontiguousarray(rows[~pos]), dropped_nan_rows=int((~finite).sum()))


def load_shape_samples(path: str | Path, scene_ids: Sequence[int], manifest: Manifest | None = None,
                       ) -> list[ShapeSamples]:
    """The samples of ``scene_ids`` (global ids), in that order; unreadable data is a ``DataError``.

    A scene left without a sample of either sign (after dropping NaN rows) is returned as is: reconstruction
    marks it failed instead of aborting the other shapes.
    """
    d = Path(path)
    manifest = manifest if manifest is not None else read_manifest(d)
    for sid in scene_ids:
        if not 0 <= sid < manifest.num_scenes:
            raise DataError(f"scene id {sid} out of range: dataset {d} has {manifest.num_scenes} scenes")
    by_file: dict[str, list[int]] = {}
    for j, sid in enumerate(scene_ids):
        by_file.setdefault(manifest.scenes[sid].file, []).append(j)
    out: list[ShapeSamples | None] = [None] * len(scene_ids)
    for fname, js in by_file.items():
        fp = d / fname
        try:
            pf = pq.ParquetFile(fp, memory_map=True)
            md = pf.metadata
            sizes = np.array([md.row_group(k).num_rows for k in range(md.num_row_groups)], dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(sizes)])
            for j in js:
                sid = scene_ids[j]
                entry = manifest.scenes[sid]
                a, b = entry.row_offset, entry.row_offset + entry.num_rows
                k0 = int(np.searchsorted(starts, a, side="right") - 1)
                k1 = int(np.searchsorted(starts, b, side="left"))
                table = pf.read_row_groups(list(range(k0, k1)), columns=["scene", "x", "y", "z", "sdf"])
                lo = a - int(starts[k0])
                table = table.slice(lo, entry.num_rows)
                if table.num_rows != entry.num_rows:
                    raise DataError(f"dataset {d}: {fname} ends before scene {sid} ({entry.name})")
                scene_col = table.column("scene").to_numpy()
                if (scene_col != sid).any():
                    raise DataError(f"dataset {d}: rows of scene {sid} ({entry.name}) in {fname} hold another "
                                    f"scene's id")
                rows = np.stack([table.column(c).to_numpy().astype(np.float32) for c in "xyz"]
                                + [table.column("sdf").to_numpy().astype(np.float32)], axis=1)
                out[j] = split_finite(sid, rows)
        except FileNotFoundError:
            raise DataError(f"dataset {d}: missing data file {fname}") from None
        except (pa.ArrowException, OSError, ValueError, KeyError) as e:
            raise DataError(f"dataset {d}: cannot read {fname}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    return [s for s in out if s is not None]
