"""Meshes from an SDF: coarse-to-fine grid decoding plus marching cubes (scikit-image), numpy only.

The grid is DeepSDF's: N points per axis over [-1, 1]^3, ``x_i = -1 + i * 2 / (N - 1)``, and
``volume[i, j, k] = f(x_i, x_j, x_k)``; marching cubes at level 0 gives the mesh in the normalised frame.

Coarse to fine: decode every ``s``-th point per axis (plus the last), which cuts the grid into blocks of
``s^3`` fine cells. A block is decoded at full resolution when its coarse corners change sign or one of them
has ``|f| <= margin * (block half-diagonal)``. For a true distance function a margin of 1 is exact: a zero
inside a block lies within a half-diagonal of a corner, so that corner has ``|f|`` at most that. A decoder
trained on clamped targets is only close to a distance function near the surface, hence a generous margin
(values beyond the clamp distance only say "far", which the margin test reads as far: blocks there are skipped
as long as the margin is below the clamp distance). Marching cubes then runs only on the refined cells
(scikit-image's ``mask``); every other cell has corners of one sign and yields nothing in the dense grid
either, so the mesh equals the dense one (a test proves it on analytic shapes).

Decoding is left to the caller (:class:`SdfFunction` on numpy points, or the device code of
``sdf_ray.shapes.decode``): this module plans which points to decode and turns the values into a mesh.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SdfFunction = Callable[[np.ndarray], np.ndarray]
"""Points ``[P, 3]`` float32 in the normalised frame -> SDF values ``[P]``."""


@dataclass(frozen=True)
class GridSpec:
    """An N^3 grid over [-1, 1]^3 decoded coarse to fine with blocks of ``coarse_stride`` cells per axis."""

    resolution: int
    coarse_stride: int = 1
    refine_margin: float = 2.0

    @property
    def voxel_size(self) -> float:
        return 2.0 / (self.resolution - 1)

    @property
    def dense(self) -> bool:
        return self.coarse_stride <= 1

    def axis(self) -> np.ndarray:
        """The fine grid's coordinates along one axis (float32, from float64: both paths use this one)."""
        return (-1.0 + np.arange(self.resolution, dtype=np.float64) * self.voxel_size).astype(np.float32)

    def coarse_index(self) -> np.ndarray:
        """Fine indices of the coarse points along one axis: 0, s, 2s, ... and always N - 1."""
        n = self.resolution
        return np.unique(np.append(np.arange(0, n, max(self.coarse_stride, 1)), n - 1))

    @property
    def margin_abs(self) -> float:
        """The refinement threshold on |f|: margin x the half-diagonal of a full block."""
        return float(self.refine_margin * self.coarse_stride * self.voxel_size * np.sqrt(3.0) / 2.0)


def grid_points(axis_values: np.ndarray) -> np.ndarray:
    """``[n^3, 3]`` float32 points of the grid ``axis x axis x axis`` in C order (x slowest)."""
    x, y, z = np.meshgrid(axis_values, axis_values, axis_values, indexing="ij")
    return np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)


def coarse_points(spec: GridSpec) -> np.ndarray:
    """The points decoded first (the whole grid when ``spec.dense``)."""
    return grid_points(spec.axis()[spec.coarse_index()])


def refine_blocks(spec: GridSpec, coarse_values: np.ndarray) -> np.ndarray:
    """``[nb, nb, nb]`` bool: blocks whose corners change sign, come within the margin, or are not finite."""
    nc = len(spec.coarse_index())
    v = np.asarray(coarse_values, dtype=np.float32).reshape(nc, nc, nc)
    nb = nc - 1
    any_pos = np.zeros((nb,) * 3, dtype=bool)
    any_neg = np.zeros((nb,) * 3, dtype=bool)
    near = np.zeros((nb,) * 3, dtype=bool)
    for dx, dy, dz in itertools.product((0, 1), repeat=3):
        corner = v[dx:dx + nb, dy:dy + nb, dz:dz + nb]
        any_pos |= corner > 0
        any_neg |= corner <= 0
        near |= ~(np.abs(corner) > spec.margin_abs)  # NaN counts as near: it is then decoded and reported
    return (any_pos & any_neg) | near


def cell_blocks(spec: GridSpec) -> np.ndarray:
    """Block index of each fine cell along an axis (``N - 1`` cells)."""
    return np.searchsorted(spec.coarse_index(), np.arange(spec.resolution - 1), side="right") - 1


def refined_cells(spec: GridSpec, block_mask: np.ndarray) -> np.ndarray:
    """``[N-1]^3`` bool: the fine cells (by lower corner) inside refined blocks."""
    b = cell_blocks(spec)
    return np.asarray(block_mask[np.ix_(b, b, b)])


def refined_points(spec: GridSpec, block_mask: np.ndarray) -> np.ndarray:
    """``[N]^3`` bool: every corner of a refined cell, i.e. the points decoded at full resolution."""
    cells = refined_cells(spec, block_mask)
    n = spec.resolution
    points = np.zeros((n,) * 3, dtype=bool)
    for dx, dy, dz in itertools.product((0, 1), repeat=3):
        points[dx:dx + n - 1, dy:dy + n - 1, dz:dz + n - 1] |= cells
    return points


def fine_points(spec: GridSpec, block_mask: np.ndarray) -> np.ndarray:
    """``[P, 3]`` float32 coordinates of :func:`refined_points`, in C order (the order values come back in)."""
    i, j, k = np.nonzero(refined_points(spec, block_mask))
    a = spec.axis()
    return np.stack([a[i], a[j], a[k]], axis=1)


@dataclass
class SparseGrid:
    """What a decoder produces for one shape: coarse values, the refined blocks and their fine values.

    A few MB for N = 256 instead of the 67 MB dense volume: this is what travels from a device to a CPU.
    """

    spec: GridSpec
    coarse_values: np.ndarray
    """``[nc^3]`` float32 at :func:`coarse_points`."""
    block_mask: np.ndarray
    """``[nb, nb, nb]`` bool (empty when dense)."""
    fine_values: np.ndarray
    """``[P]`` float32 at :func:`fine_points`."""

    @property
    def num_decoded(self) -> int:
        return int(self.coarse_values.size + self.fine_values.size)


def decode_grid(sdf: SdfFunction, spec: GridSpec) -> SparseGrid:
    """Decode ``sdf`` coarse to fine on the CPU (the device path is ``sdf_ray.shapes.decode``)."""
    coarse = np.asarray(sdf(coarse_points(spec)), dtype=np.float32)
    if spec.dense:
        return SparseGrid(spec, coarse, np.zeros((0, 0, 0), dtype=bool), np.zeros(0, dtype=np.float32))
    blocks = refine_blocks(spec, coarse)
    pts = fine_points(spec, blocks)
    fine = np.asarray(sdf(pts), dtype=np.float32) if len(pts) else np.zeros(0, dtype=np.float32)
    return SparseGrid(spec, coarse, blocks, fine)


def assemble(grid: SparseGrid) -> tuple[np.ndarray, np.ndarray | None]:
    """(``[N]^3`` float32 volume, cell mask for marching cubes or None when dense).

    Points outside the refined blocks take the value of their block's lower coarse corner: the corners of an
    unrefined block share one sign, and no marching-cubes cell reads them anyway. The mask is placed at each
    refined cell's UPPER corner index: that is where scikit-image's Lewiner loop reads it (0.26, found by
    comparing against the dense result; the coarse == dense test guards it).
    """
    spec = grid.spec
    n = spec.resolution
    if spec.dense:
        return grid.coarse_values.reshape(n, n, n), None
    nc = len(spec.coarse_index())
    blocks_of_point = np.minimum(np.searchsorted(spec.coarse_index(), np.arange(n), side="right") - 1, nc - 2)
    coarse = grid.coarse_values.reshape(nc, nc, nc)
    volume = np.ascontiguousarray(coarse[np.ix_(blocks_of_point, blocks_of_point, blocks_of_point)])
    points = refined_points(spec, grid.block_mask)
    volume[points] = grid.fine_values
    mask = np.zeros((n,) * 3, dtype=bool)
    mask[1:, 1:, 1:] = refined_cells(spec, grid.block_mask)
    return volume, mask


@dataclass
class Mesh:
    """A triangle mesh: ``verts_V3`` float32, ``faces_F3`` int32 (outward-facing for an inside-negative SDF)."""

    verts_V3: np.ndarray
    faces_F3: np.ndarray


@dataclass
class MeshResult:
    status: str
    """``ok``, ``empty`` (the SDF never crosses zero on the grid) or ``failed``."""
    mesh: Mesh | None
    reason: str = ""


def extract_mesh(grid: SparseGrid) -> MeshResult:
    """Marching cubes at level 0 on the refined cells; the mesh is in the normalised frame."""
    from skimage.measure import marching_cubes

    volume, mask = assemble(grid)
    decoded = volume if mask is None else volume[refined_points(grid.spec, grid.block_mask)]
    all_values = np.concatenate([decoded.ravel(), grid.coarse_values.ravel()])
    if not np.isfinite(all_values).all():
        bad = int((~np.isfinite(all_values)).sum())
        return MeshResult("failed", None, f"the decoder returned {bad} non-finite SDF values on the grid")
    if not (all_values.min() < 0.0 < all_values.max()):
        return MeshResult("empty", None, "the SDF does not cross zero on the grid")
    if mask is not None and not mask.any():
        return MeshResult("empty", None, "the SDF does not cross zero on the grid")
    h = grid.spec.voxel_size
    # "descent" (scikit-image's default, and DeepSDF's) winds the faces outward for an inside-negative SDF.
    verts, faces, _, _ = marching_cubes(volume, level=0.0, spacing=(h, h, h), gradient_direction="descent",
                                        mask=mask)
    if len(faces) == 0:
        return MeshResult("empty", None, "the SDF does not cross zero on the grid")
    return MeshResult("ok", Mesh((verts - 1.0).astype(np.float32), faces.astype(np.int32)))


def ply_bytes(verts_V3: np.ndarray, faces_F3: np.ndarray) -> bytes:
    """A binary little-endian PLY (trimesh), vertices as float32."""
    import trimesh

    mesh = trimesh.Trimesh(vertices=np.asarray(verts_V3, dtype=np.float64), faces=faces_F3, process=False)
    data = mesh.export(file_type="ply", encoding="binary")
    assert isinstance(data, bytes)
    return data


def write_ply(path: str | Path, verts_V3: np.ndarray, faces_F3: np.ndarray) -> None:
    """Write a binary PLY atomically (parents created)."""
    from sdf_ray.fsutil import write_bytes_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, ply_bytes(verts_V3, faces_F3))


def read_mesh(path: str | Path) -> Mesh:
    """Load a triangle mesh (PLY, OBJ, OFF, ...) without trimesh's merging or reordering."""
    import trimesh

    loaded: Any = trimesh.load(str(path), force="mesh", process=False)
    return Mesh(np.asarray(loaded.vertices, dtype=np.float64), np.asarray(loaded.faces, dtype=np.int64))
