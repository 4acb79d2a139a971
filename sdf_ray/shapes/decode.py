"""Decoding SDF grids on a device: the torch half of coarse-to-fine meshing (the numpy half is ``meshing``).

The refinement plan (which blocks, which points, in which order) is computed on the device with the same rules
as :mod:`sdf_ray.shapes.meshing`, so a CPU can rebuild the volume from the values alone; a test checks that both
plans agree point for point. Planning on the device keeps the host out of the loop: a 256^3 point mask is
16 M elements, ~0.1 s of numpy per shape, which the per-shape budget of the reconstruction cannot afford.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from sdf_ray.shapes.meshing import GridSpec, SparseGrid, cell_blocks, coarse_points, parent_blocks
from sdf_ray.shapes.reconstruct import decoding_context


def _in_chunks(decoder: nn.Module, precision: str, device: torch.device, total: int, chunk: int, pad: bool,
               call: Callable[[int, int], torch.Tensor]) -> list[torch.Tensor]:
    """``call(start, size)`` decodes the points ``[start, start + size)``, its inputs padded to ``size`` rows; over
    consecutive chunks of ``chunk`` points (``size`` the whole chunk when ``pad``: a compiled decoder then sees one
    input shape), each output fp32, cut back to its real points along the last dim."""
    out = []
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        with decoding_context(decoder, precision, device):
            values = call(start, chunk if pad else n).float()[..., :n]
        # A CUDA-graphed decoder (compile mode reduce-overhead) overwrites its output on the next call.
        out.append(values.clone() if pad else values)
    return out


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with zero rows appended up to ``rows``."""
    return t if len(t) >= rows else torch.cat([t, t.new_zeros((rows - len(t),) + tuple(t.shape[1:]))])


@torch.no_grad()
def decode_shared(decoder: nn.Module, codes_BL: torch.Tensor, points_P3: torch.Tensor, precision: str,
                  points_per_forward: int, pad: bool = False) -> torch.Tensor:
    """``[B, P]`` fp32: every code at every point (chunks of about ``points_per_forward`` evaluations).

    ``pad``: the last chunk is padded to a full one (for a compiled decoder: one input shape, one compilation).
    """
    B = codes_BL.shape[0]
    latent = codes_BL.unsqueeze(1)

    def call(start: int, size: int) -> torch.Tensor:
        return decoder(latent, _pad_rows(points_P3[start:start + size].contiguous(), size).unsqueeze(0))

    out = _in_chunks(decoder, precision, points_P3.device, points_P3.shape[0],
                     max(1, points_per_forward // max(B, 1)), pad, call)
    return torch.cat(out, dim=1) if out else torch.zeros(B, 0, device=points_P3.device)


def decode_indexed(decoder: nn.Module, codes_BL: torch.Tensor, index_P: torch.Tensor, points_P3: torch.Tensor,
                   precision: str, points_per_forward: int, pad: bool = False) -> torch.Tensor:
    """``[P]`` fp32: point p decoded with code ``codes_BL[index_P[p]]``, for the points of many shapes in shared
    chunks of ``points_per_forward``. sdf-ray's decoders take the index (``code_index``: each input layer's code
    term computed once per code and gathered per point); any other module gets a code per point.

    ``pad``: the last chunk is padded to a full one (for a compiled decoder: one input shape, one compilation;
    ``codes_BL`` must then have a fixed number of rows too).
    """
    from sdf_ray.model import DeepSDFDecoder
    from sdf_ray.shapes.frozen_decoder import FrozenDecoder

    indexed = isinstance(getattr(decoder, "_orig_mod", decoder), (DeepSDFDecoder, FrozenDecoder))

    def call(start: int, size: int) -> torch.Tensor:
        xyz = _pad_rows(points_P3[start:start + size], size)
        index = _pad_rows(index_P[start:start + size], size)
        return decoder(codes_BL, xyz, code_index=index) if indexed else decoder(codes_BL[index], xyz)

    out = _in_chunks(decoder, precision, points_P3.device, points_P3.shape[0], points_per_forward, pad, call)
    return torch.cat(out) if out else torch.zeros(0, device=points_P3.device)


def decode_points(decoder: nn.Module, codes_BL: torch.Tensor, index_P: torch.Tensor, points_P3: torch.Tensor,
                  precision: str, points_per_forward: int, pad: bool = False,
                  per_shape: bool | None = None) -> torch.Tensor:
    """``[P]`` fp32: the points of several shapes, point p with code ``codes_BL[index_P[p]]``, each shape's points
    consecutive, as the grid decoding decodes them. On a GPU all in shared calls with a code index
    (:func:`decode_indexed`). ``per_shape`` (the default on CPUs): shape by shape, each shape's code shared by its
    points (:func:`decode_shared`), in chunks of a quarter call when padded (the padding of each shape's last chunk
    stays small); eager on a CPU, gathering the code term per point cost more (12.6 s against 15.0 s for 8 shapes at
    96^3) than the host syncs it saves."""
    if per_shape is None:
        per_shape = points_P3.device.type != "cuda"
    if not per_shape:
        return decode_indexed(decoder, codes_BL, index_P, points_P3, precision, points_per_forward, pad)
    chunk = max(1024, points_per_forward // 4) if pad else points_per_forward
    shapes, counts = torch.unique_consecutive(index_P, return_counts=True)
    out, start = [], 0
    for b, count in zip(shapes.tolist(), counts.tolist()):
        out.append(decode_shared(decoder, codes_BL[b:b + 1], points_P3[start:start + count], precision, chunk, pad)[0])
        start += count
    return torch.cat(out) if out else torch.zeros(0, device=points_P3.device)


def _blocks_to_refine(v: torch.Tensor, threshold: float) -> torch.Tensor:
    """:func:`sdf_ray.shapes.meshing.blocks_to_refine` on the device, for ``[B, n, n, n]`` values of B shapes."""
    nb = v.shape[1] - 1
    any_pos = torch.zeros((v.shape[0],) + (nb,) * 3, dtype=torch.bool, device=v.device)
    any_neg = torch.zeros_like(any_pos)
    near = torch.zeros_like(any_pos)
    for dx, dy, dz in itertools.product((0, 1), repeat=3):
        corner = v[:, dx:dx + nb, dy:dy + nb, dz:dz + nb]
        any_pos |= corner > 0
        any_neg |= corner <= 0
        near |= ~(corner.abs() > threshold)
    return (any_pos & any_neg) | near


def _refine_blocks(spec: GridSpec, coarse_values_BP: torch.Tensor) -> torch.Tensor:
    """:func:`sdf_ray.shapes.meshing.refine_blocks` on the device, per shape: ``[B, nb, nb, nb]``."""
    nc = len(spec.coarse_index())
    return _blocks_to_refine(coarse_values_BP.reshape(-1, nc, nc, nc), spec.threshold_at(spec.coarse_stride))


def _corner_points(cells: torch.Tensor) -> torch.Tensor:
    n = cells.shape[1] + 1
    points = torch.zeros((cells.shape[0],) + (n,) * 3, dtype=torch.bool, device=cells.device)
    for dx, dy, dz in itertools.product((0, 1), repeat=3):
        points[:, dx:dx + n - 1, dy:dy + n - 1, dz:dz + n - 1] |= cells
    return points


def _level_points(spec: GridSpec, stride: int, mask: torch.Tensor,
                  axis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sdf_ray.shapes.meshing.level_points` on the device for ``[B, n, n, n]`` masks: (the shape of each
    point, the points), shape by shape and each shape's in the same C order."""
    a = axis[torch.as_tensor(spec.level_index(stride), device=axis.device)]
    n = mask.shape[1]
    # Flat positions in int32 (a group holds fewer than 2^31 grid points: GROUP_POINTS), split by division: 4 bytes
    # per point where nonzero's [P, 4] int64 rows would keep 32.
    flat = torch.nonzero(mask.flatten()).squeeze(1).to(torch.int32)
    k = flat % n
    flat = flat.div_(n, rounding_mode="floor")
    j = flat % n
    flat = flat.div_(n, rounding_mode="floor")
    i = flat % n
    shape = flat.div_(n, rounding_mode="floor")
    return shape, torch.stack([a[i], a[j], a[k]], dim=1)


def _take3(blocks: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    i = torch.as_tensor(index, device=blocks.device)
    return blocks[:, i][:, :, i][:, :, :, i]


Decode = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(the shape of each point ``[P]``, the points ``[P, 3]``) -> values ``[P]``."""


def _plan_levels(spec: GridSpec, coarse_values_BP: torch.Tensor, axis: torch.Tensor,
                 decode: Decode) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sdf_ray.shapes.meshing.plan_levels` on the device for B shapes at once, each level's points of all
    shapes in shared decoder calls: (final refined blocks ``[B, nb, nb, nb]``, points decoded per shape ``[B]``)."""
    blocks = _refine_blocks(spec, coarse_values_BP)
    decoded = torch.zeros(blocks.shape[0], dtype=torch.int64, device=blocks.device)
    strides = spec.block_strides
    for parent, stride in zip(strides, strides[1:]):
        candidates = _take3(blocks, parent_blocks(spec, stride, parent))
        points = _corner_points(candidates)
        shape_index, coords = _level_points(spec, stride, points, axis)
        values = torch.full(points.shape, float("nan"), device=axis.device)
        if len(coords):
            values[points] = decode(shape_index, coords)
        decoded += points.flatten(1).sum(dim=1)
        blocks = candidates & _blocks_to_refine(values, spec.threshold_at(stride))
    return blocks, decoded


def _square_any(mask: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Whether any corner of each unit square in the two ``dims`` is set (those dims shrink by one)."""
    for d in dims:
        m = mask.shape[d] - 1
        mask = mask.narrow(d, 0, m) | mask.narrow(d, 1, m)
    return mask


def _blocks_across_sign_changes(spec: GridSpec, values: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """:func:`sdf_ray.shapes.meshing.blocks_across_sign_changes` on the device for ``[B, n, n, n]`` values and
    ``[B, nb, nb, nb]`` blocks, cell by cell: a cell outside the blocks whose face with a cell inside has corners
    of both signs brings in its block."""
    n, s, nb = spec.resolution, spec.final_stride, blocks.shape[1]
    cells = _take3(blocks, cell_blocks(spec))
    positive, negative = values > 0, values <= 0
    reached = torch.zeros_like(cells)
    for d in (1, 2, 3):
        others = tuple(o for o in (1, 2, 3) if o != d)
        # The faces across dim d at fine index 1 .. n - 2, each between the cells i - 1 and i.
        mixed = (_square_any(positive, others) & _square_any(negative, others)).narrow(d, 1, n - 2)
        below, above = cells.narrow(d, 0, n - 2), cells.narrow(d, 1, n - 2)
        into_above, into_below = reached.narrow(d, 1, n - 2), reached.narrow(d, 0, n - 2)
        into_above |= mixed & below & ~above
        into_below |= mixed & above & ~below
    padded = torch.zeros((blocks.shape[0],) + (nb * s,) * 3, dtype=torch.bool, device=blocks.device)
    padded[:, :n - 1, :n - 1, :n - 1] = reached
    return padded.view(-1, nb, s, nb, s, nb, s).any(6).any(4).any(2) & ~blocks


def _follow_surface(spec: GridSpec, blocks: torch.Tensor, axis: torch.Tensor,
                    decode: Decode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sdf_ray.shapes.meshing.follow_surface` on the device for ``[B, nb, nb, nb]`` blocks, each round's
    points of all shapes in shared decoder calls: (the final blocks, their fine values shape by shape in the order of
    :func:`sdf_ray.shapes.meshing.fine_points`, the number of fine values of each shape)."""
    n = spec.resolution
    values = torch.full((blocks.shape[0],) + (n,) * 3, float("nan"), device=axis.device)
    decoded = torch.zeros(values.shape, dtype=torch.bool, device=axis.device)
    cell_index = cell_blocks(spec)
    while True:
        points = _corner_points(_take3(blocks, cell_index)) & ~decoded
        shape_index, coords = _level_points(spec, 1, points, axis)
        if len(coords):
            values[points] = decode(shape_index, coords)
        decoded |= points
        if not spec.follow_surface:
            break
        grow = _blocks_across_sign_changes(spec, values, blocks)
        if not bool(grow.any()):
            break
        blocks = blocks | grow
    # Every point of the final blocks is decoded by now, and no other: ``decoded`` is their fine points.
    return blocks, values[decoded], decoded.flatten(1).sum(dim=1)


GROUP_POINTS = 1 << 26
"""Grid points (shapes x N^3) planned at once on a GPU: 4 shapes at N = 256. It bounds a group's masks and value
grids, and its points (a trained decoder's 4.3 M per shape at 256^3: under 1 GB of masks, indices, coordinates and
values at once); the decoder calls stay full (262,144 points)."""


@torch.no_grad()
def decode_sparse_grids(decoder: nn.Module, codes_BL: torch.Tensor, spec: GridSpec, precision: str,
                        points_per_forward: int, static_batch: int = 0,
                        per_shape: bool | None = None) -> list[SparseGrid]:
    """Coarse grids of all codes in shared forwards, then the refinement levels and the fine points; CPU numpy
    results.

    On a GPU the levels go group by group (:data:`GROUP_POINTS`), each level's points of a group's shapes in shared
    decoder calls with a code index: a few calls and host syncs per level, not per shape (on an H200, 1,000 shapes
    in 179 s instead of 186: docs/performance.md, session 11). ``per_shape`` (the default on CPUs): one shape at a
    time (:func:`decode_points`).

    ``static_batch`` (a compiled decoder): the decoder always sees this many codes (the extra ones repeat the
    first) and full chunks, so it sees two input shapes in all (the coarse pass, the level passes).
    """
    device = codes_BL.device
    B = codes_BL.shape[0]
    pad = static_batch > 0
    all_codes = codes_BL
    if B < static_batch:
        all_codes = torch.cat([codes_BL, codes_BL[:1].expand(static_batch - B, -1)])
    coarse_pts = torch.from_numpy(coarse_points(spec)).to(device)
    coarse = decode_shared(decoder, all_codes, coarse_pts, precision, points_per_forward, pad)[:B]
    if spec.dense:
        empty_blocks = np.zeros((0, 0, 0), dtype=bool)
        return [SparseGrid(spec, c.cpu().numpy(), empty_blocks, np.zeros(0, dtype=np.float32)) for c in coarse]
    axis = torch.from_numpy(spec.axis()).to(device)
    if per_shape is None:
        per_shape = device.type != "cuda"
    group = 1 if per_shape else max(1, GROUP_POINTS // spec.resolution ** 3)
    grids = []
    for g0 in range(0, B, group):

        def decode(index: torch.Tensor, points: torch.Tensor, g0: int = g0) -> torch.Tensor:
            return decode_points(decoder, all_codes, index + g0, points, precision, points_per_forward, pad, per_shape)

        blocks, num_mid = _plan_levels(spec, coarse[g0:g0 + group], axis, decode)
        blocks, fine, fine_counts = _follow_surface(spec, blocks, axis, decode)
        counts = fine_counts.cpu().numpy()
        fine_np, blocks_np = fine.cpu().numpy(), blocks.cpu().numpy()
        coarse_np = coarse[g0:g0 + group].cpu().numpy()
        starts = np.cumsum(counts) - counts
        for j, mid in enumerate(num_mid.cpu().tolist()):
            grids.append(SparseGrid(spec, coarse_np[j], blocks_np[j], fine_np[starts[j]:starts[j] + counts[j]], mid))
    return grids
