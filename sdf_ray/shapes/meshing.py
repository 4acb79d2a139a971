"""Meshes from an SDF: coarse-to-fine grid decoding plus marching cubes (scikit-image), numpy only.

The grid is DeepSDF's: N points per axis over [-1, 1]^3, ``x_i = -1 + i * 2 / (N - 1)``, and
``volume[i, j, k] = f(x_i, x_j, x_k)``; marching cubes at level 0 gives the mesh in the normalised frame.

Coarse to fine: decode every ``s``-th point per axis (plus the last), which cuts the grid into blocks of
``s^3`` fine cells. A block is refined when its corners change sign or one of them has
``|f| <= margin * (block half-diagonal)``; a refined block is cut into blocks of half the size, whose corners are
decoded and tested the same way, down to blocks of 2 cells (``GridSpec.block_strides``: 8 -> 4 -> 2), and the
refined blocks of that last level are decoded at full resolution. For a true distance function a margin of 1 is
exact at every level: a zero inside a block lies within a half-diagonal of a corner, so that corner has ``|f|``
at most that. A decoder trained on clamped targets is only close to a distance function near the surface, hence
a generous margin (values beyond the clamp distance only say "far", which the margin test reads as far: blocks
there are skipped as long as the margin is below the clamp distance).

The last level (``GridSpec.follow_surface``, the default) keeps only the blocks whose corners change sign, and then
follows the surface out of them: where a face between a decoded block and another has fine points of both signs,
marching cubes would continue the surface into the other block, so that block is decoded too, until no face leads
out (:func:`follow_surface`). The margin's band, most of the points at the last level and wider the flatter the
field, is no longer decoded, and no slope bound is needed for any surface that crosses a block's corners
somewhere. Marching cubes then runs only on the refined cells (scikit-image's ``mask``); every other cell has
corners of one sign, or belongs to a part of the surface that no decoded block reaches, so the mesh equals the
dense one (tests prove it on analytic shapes, also on fields far steeper than a distance).

Decoding is left to the caller (:class:`SdfFunction` on numpy points, or the device code of
``sdf_ray.shapes.decode``): this module plans which points to decode and turns the values into a mesh.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SdfFunction = Callable[[np.ndarray], np.ndarray]
"""Points ``[P, 3]`` float32 in the normalised frame -> SDF values ``[P]``."""


@dataclass(frozen=True)
class GridSpec:
    """An N^3 grid over [-1, 1]^3 decoded coarse to fine, starting with blocks of ``coarse_stride`` cells per
    axis and halving them while the stride is even and above 2 (8 -> 4 -> 2; a stride of 5 has one level)."""

    resolution: int
    coarse_stride: int = 1
    refine_margin: float = 2.0
    follow_surface: bool = True
    """The final level keeps only the blocks whose corners change sign, and :func:`follow_surface` adds every block
    the surface leaves them through; False: the final level keeps the blocks within the margin too."""
    far: float = math.inf
    """|f| above this never counts as near: a decoder trained on targets clamped at this distance says no more
    than "at least this far" there (the run's clamp distance; inf for a true distance function)."""

    @property
    def voxel_size(self) -> float:
        return 2.0 / (self.resolution - 1)

    @property
    def dense(self) -> bool:
        return self.coarse_stride <= 1

    @property
    def block_strides(self) -> tuple[int, ...]:
        """The block size of each refinement level, coarsest first; the last one's blocks are decoded densely."""
        strides = [max(self.coarse_stride, 1)]
        while strides[-1] % 2 == 0 and strides[-1] > 2:
            strides.append(strides[-1] // 2)
        return tuple(strides)

    @property
    def final_stride(self) -> int:
        return self.block_strides[-1]

    def axis(self) -> np.ndarray:
        """The fine grid's coordinates along one axis (float32, from float64: both paths use this one)."""
        return (-1.0 + np.arange(self.resolution, dtype=np.float64) * self.voxel_size).astype(np.float32)

    def level_index(self, stride: int) -> np.ndarray:
        """Fine indices of a level's points along one axis: 0, s, 2s, ... and always N - 1. Each level's points
        include the coarser levels', so every block of a level lies inside one block of the level above."""
        n = self.resolution
        return np.unique(np.append(np.arange(0, n, max(stride, 1)), n - 1))

    def coarse_index(self) -> np.ndarray:
        """Fine indices of the coarse points along one axis."""
        return self.level_index(self.coarse_stride)

    def margin_at(self, stride: int) -> float:
        """The refinement threshold on |f| for blocks of ``stride`` cells: margin x a full block's half-diagonal."""
        return float(self.refine_margin * stride * self.voxel_size * np.sqrt(3.0) / 2.0)

    def threshold_at(self, stride: int) -> float:
        """The threshold on |f| that refines a block of the ``stride`` level: the margin's, at most :attr:`far`; 0
        at a final level below the coarse one when following the surface (only corners that change sign, or hit
        0, refine)."""
        if self.follow_surface and stride == self.final_stride and len(self.block_strides) > 1:
            return 0.0
        return min(self.margin_at(stride), self.far)


def grid_points(axis_values: np.ndarray) -> np.ndarray:
    """``[n^3, 3]`` float32 points of the grid ``axis x axis x axis`` in C order (x slowest)."""
    x, y, z = np.meshgrid(axis_values, axis_values, axis_values, indexing="ij")
    return np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)


def coarse_points(spec: GridSpec) -> np.ndarray:
    """The points decoded first (the whole grid when ``spec.dense``)."""
    return grid_points(spec.axis()[spec.coarse_index()])


def blocks_to_refine(values: np.ndarray, threshold: float) -> np.ndarray:
    """``[n-1]^3`` bool from a level's ``[n]^3`` values: blocks whose corners change sign, or have one within
    ``threshold`` of zero or not finite (NaN counts as near: it is then decoded and reported)."""
    v = np.asarray(values, dtype=np.float32)
    nb = v.shape[0] - 1
    any_pos = np.zeros((nb,) * 3, dtype=bool)
    any_neg = np.zeros((nb,) * 3, dtype=bool)
    near = np.zeros((nb,) * 3, dtype=bool)
    for dx, dy, dz in itertools.product((0, 1), repeat=3):
        corner = v[dx:dx + nb, dy:dy + nb, dz:dz + nb]
        any_pos |= corner > 0
        any_neg |= corner <= 0
        near |= ~(np.abs(corner) > threshold)
    return (any_pos & any_neg) | near


def refine_blocks(spec: GridSpec, coarse_values: np.ndarray) -> np.ndarray:
    """The coarse level's blocks to refine, from the values at :func:`coarse_points`."""
    nc = len(spec.coarse_index())
    return blocks_to_refine(np.asarray(coarse_values, dtype=np.float32).reshape(nc, nc, nc),
                            spec.threshold_at(spec.coarse_stride))


def parent_blocks(spec: GridSpec, stride: int, parent_stride: int) -> np.ndarray:
    """For each block of the ``stride`` level along an axis, the index of the ``parent_stride`` block holding it."""
    return np.searchsorted(spec.level_index(parent_stride), spec.level_index(stride)[:-1], side="right") - 1


def corner_points(cells: np.ndarray) -> np.ndarray:
    """``[n]^3`` bool: every corner of the ``[n-1]^3`` cells (or blocks) marked in ``cells``."""
    n = cells.shape[0] + 1
    points = np.zeros((n,) * 3, dtype=bool)
    for dx, dy, dz in itertools.product((0, 1), repeat=3):
        points[dx:dx + n - 1, dy:dy + n - 1, dz:dz + n - 1] |= cells
    return points


def level_points(spec: GridSpec, stride: int, mask: np.ndarray) -> np.ndarray:
    """``[P, 3]`` float32 coordinates of the ``stride`` level's points marked in ``mask`` (C order)."""
    a = spec.axis()[spec.level_index(stride)]
    i, j, k = np.nonzero(mask)
    return np.stack([a[i], a[j], a[k]], axis=1)


def cell_blocks(spec: GridSpec) -> np.ndarray:
    """Block index (at the final level) of each fine cell along an axis (``N - 1`` cells)."""
    return parent_blocks(spec, 1, spec.final_stride)


def refined_cells(spec: GridSpec, block_mask: np.ndarray) -> np.ndarray:
    """``[N-1]^3`` bool: the fine cells (by lower corner) inside refined final-level blocks."""
    b = cell_blocks(spec)
    return np.asarray(block_mask[np.ix_(b, b, b)])


def refined_points(spec: GridSpec, block_mask: np.ndarray) -> np.ndarray:
    """``[N]^3`` bool: every corner of a refined cell, i.e. the points decoded at full resolution."""
    return corner_points(refined_cells(spec, block_mask))


def fine_points(spec: GridSpec, block_mask: np.ndarray) -> np.ndarray:
    """``[P, 3]`` float32 coordinates of :func:`refined_points`, in C order (the order values come back in)."""
    return level_points(spec, 1, refined_points(spec, block_mask))


@dataclass
class SparseGrid:
    """What a decoder produces for one shape: coarse values, the refined final-level blocks and their fine
    values. A few MB for N = 256 instead of the 67 MB dense volume: this is what travels from a device to a CPU.
    """

    spec: GridSpec
    coarse_values: np.ndarray
    """``[nc^3]`` float32 at :func:`coarse_points`."""
    block_mask: np.ndarray
    """``[nb, nb, nb]`` bool: the refined blocks of the final level (empty when dense)."""
    fine_values: np.ndarray
    """``[P]`` float32 at :func:`fine_points`."""
    num_mid: int = 0
    """Points decoded at the intermediate levels (planning only: meshing does not need their values)."""

    @property
    def num_decoded(self) -> int:
        return int(self.coarse_values.size + self.num_mid + self.fine_values.size)


def plan_levels(spec: GridSpec, coarse_values: np.ndarray, sdf: SdfFunction) -> tuple[np.ndarray, int]:
    """(the final level's refined blocks, the points decoded on the way): each level decodes the corners of its
    blocks inside the refined blocks of the level above and keeps those that change sign or come within the
    margin. For a true distance function and a margin of at least 1, a block holding a zero of f always has a
    corner within its half-diagonal, at every level, so no zero is lost (the coarse == dense test proves it)."""
    blocks = refine_blocks(spec, coarse_values)
    decoded = 0
    strides = spec.block_strides
    for parent, stride in zip(strides, strides[1:]):
        p = parent_blocks(spec, stride, parent)
        candidates = blocks[np.ix_(p, p, p)]
        points = corner_points(candidates)
        values = np.full(points.shape, np.nan, dtype=np.float32)
        if points.any():
            values[points] = np.asarray(sdf(level_points(spec, stride, points)), dtype=np.float32)
        decoded += int(points.sum())
        # A candidate's corners are all decoded: the NaN placeholders only sit outside the candidates.
        blocks = candidates & blocks_to_refine(values, spec.threshold_at(stride))
    return blocks, decoded


def _window_any(a: np.ndarray, bounds: np.ndarray, axis: int) -> np.ndarray:
    """Along ``axis``: whether any element from ``bounds[j]`` to ``bounds[j + 1]`` (both included) is set."""
    return np.logical_or.reduceat(a, bounds[:-1], axis=axis) | np.take(a, bounds[1:], axis=axis)


def blocks_across_sign_changes(spec: GridSpec, values: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """``[nb]^3`` bool: final-level blocks outside ``blocks`` that share a face with one inside whose fine points
    (decoded in ``values``, ``[N]^3``) change sign: the surface leaves the decoded blocks there. Marching cubes
    joins two cells' pieces across a face exactly when its corners change sign, so every piece connected to a
    decoded block is reached this way."""
    bounds = spec.level_index(spec.final_stride)
    out = np.zeros_like(blocks)
    for axis in range(3):
        planes = np.moveaxis(values, axis, 0)[bounds[1:-1]]  # the faces between blocks j - 1 and j along the axis
        mixed = np.ones((len(planes),) + blocks.shape[1:], dtype=bool)
        for side in (planes > 0, planes <= 0):
            mixed &= _window_any(_window_any(side, bounds, 1), bounds, 2)
        b, o = np.moveaxis(blocks, axis, 0), np.moveaxis(out, axis, 0)
        o[1:] |= mixed & b[:-1] & ~b[1:]
        o[:-1] |= mixed & b[1:] & ~b[:-1]
    return out


def follow_surface(spec: GridSpec, blocks: np.ndarray, sdf: SdfFunction) -> tuple[np.ndarray, np.ndarray]:
    """(the final blocks, their values at :func:`fine_points`): decode the fine points of ``blocks``, then, while
    the surface leaves the decoded blocks through a face (:func:`blocks_across_sign_changes`), the blocks beyond
    it. Without ``spec.follow_surface``, ``blocks`` decoded once."""
    n = spec.resolution
    values = np.full((n,) * 3, np.nan, dtype=np.float32)
    decoded = np.zeros((n,) * 3, dtype=bool)
    while True:
        points = refined_points(spec, blocks) & ~decoded
        if points.any():
            values[points] = np.asarray(sdf(level_points(spec, 1, points)), dtype=np.float32)
        decoded |= points
        grow = blocks_across_sign_changes(spec, values, blocks) if spec.follow_surface else None
        if grow is None or not grow.any():
            return blocks, values[decoded]  # the fine points of the final blocks, and no others
        blocks = blocks | grow


def decode_grid(sdf: SdfFunction, spec: GridSpec) -> SparseGrid:
    """Decode ``sdf`` coarse to fine on the CPU (the device path is ``sdf_ray.shapes.decode``)."""
    coarse = np.asarray(sdf(coarse_points(spec)), dtype=np.float32)
    if spec.dense:
        return SparseGrid(spec, coarse, np.zeros((0, 0, 0), dtype=bool), np.zeros(0, dtype=np.float32))
    blocks, num_mid = plan_levels(spec, coarse, sdf)
    blocks, fine = follow_surface(spec, blocks, sdf)
    return SparseGrid(spec, coarse, blocks, fine, num_mid)


def assemble(grid: SparseGrid) -> tuple[np.ndarray, np.ndarray | None]:
    """(``[N]^3`` float32 volume, cell mask for marching cubes or None when dense).

    Points outside the refined cells take the value of their coarse block's lower corner: no marching-cubes cell
    reads them (the mask leaves their cells out). The mask is placed at each
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
