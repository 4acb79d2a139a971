"""A shape's SDF samples for reconstruction, read from a dataset with rows holding NaN dropped and counted.

``sdf_ray.data.format.load_scenes`` refuses non-finite rows (a training dataset must be finite). Reconstruction
reads held-out data that other tools may have produced, so it reads the rows as stored
(``load_scene_rows``: only the requested scenes' row groups), drops non-finite rows, counts them, and re-splits
the rest by sign instead of trusting the stored order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdf_ray.data.format import Manifest, load_scene_rows


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
    rows = load_scene_rows(path, scene_ids, manifest=manifest)
    return [split_finite(int(sid), r) for sid, r in zip(scene_ids, rows, strict=True)]
